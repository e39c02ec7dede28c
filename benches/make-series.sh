#!/usr/bin/env bash
# make-series.sh: build the series of four real disk images used by benches/peers.sh
# (GPT + ext4 made by tests/fixtures/make-disk.sh, 2 GiB virtual each). Cached: an image
# that already exists is kept, so a rerun costs nothing.
#
# Usage: benches/make-series.sh [DIR]      (default: $BENCH_DIR/images, BENCH_DIR=/tmp/imgvault-peers)
#
#   a.img  base system:  /usr/share + /usr/lib/x86_64-linux-gnu, capped at 1450 MiB of files
#   b.img  a + software: /usr/lib/{gcc,python3,python3.11,git-core,postgresql} added (~300 MB),
#                        8 files removed, 8 changed (make-disk.sh derive defaults)
#   c.img  b, later:     /usr/libexec added (~50 MB), 20 files removed, 40 changed
#   d.img  unrelated:    the stable Rust toolchain under /root/.rustup, capped at 1200 MiB
# Needs root only for reading /root/.rustup; see make-disk.sh for the tools it needs.
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,13s/^# \{0,1\}//p' "$0"; exit 0
fi
REPO=$(cd "$(dirname -- "$0")/.." && pwd)
MK=$REPO/tests/fixtures/make-disk.sh
DIR=${1:-${BENCH_DIR:-/tmp/imgvault-peers}/images}
SIZE_MIB=2048
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
log() { echo "make-series: $*" >&2; }

# Build $1 with the command that follows, atomically (a half-built image is never cached).
build() {
    local out=$1; shift
    if [ -s "$out" ]; then log "cached: $out"; return 0; fi
    log "building $out"
    rm -f -- "$out.tmp"
    "$@" "$out.tmp" >"$out.log" 2>&1 || { log "failed, see $out.log"; tail -n 20 "$out.log" >&2; exit 1; }
    mv -- "$out.tmp" "$out"
}

# Staging directory $1 holding copies of the directories that follow (each under its basename).
stage() {
    local dst=$1; shift
    rm -rf -- "$dst"; mkdir -p "$dst"
    local s
    for s in "$@"; do [ -d "$s" ] && cp -a -- "$s" "$dst/"; done
}

base_a() { MAKE_DISK_MAX_MIB=1450 bash "$MK" base "$1" "$SIZE_MIB" /usr/share /usr/lib/x86_64-linux-gnu; }
derive_b() {
    stage "$DIR/src-b" /usr/lib/gcc /usr/lib/python3 /usr/lib/python3.11 /usr/lib/git-core /usr/lib/postgresql
    bash "$MK" derive "$DIR/a.img" "$1" "$DIR/src-b"
}
derive_c() {
    # Distinct top-level names from src-b: derive puts both under /added.
    stage "$DIR/src-c" /usr/libexec
    DERIVE_REMOVE=20 DERIVE_CHANGE=40 bash "$MK" derive "$DIR/b.img" "$1" "$DIR/src-c"
}
base_d() {
    local tc
    tc=$(ls -d /root/.rustup/toolchains/stable-* 2>/dev/null | head -n1 || true)
    [ -n "$tc" ] || tc=$(ls -d /root/.rustup/toolchains/* | head -n1)
    MAKE_DISK_MAX_MIB=1200 bash "$MK" base "$1" "$SIZE_MIB" "$tc"
}

build "$DIR/a.img" base_a
build "$DIR/b.img" derive_b
build "$DIR/c.img" derive_c
build "$DIR/d.img" base_d
rm -rf -- "$DIR/src-b" "$DIR/src-c"
for i in a b c d; do
    log "$i.img: $(( $(stat -c %s "$DIR/$i.img") >> 20 )) MiB virtual, $(( $(stat -c %b "$DIR/$i.img") * 512 >> 20 )) MiB allocated"
done
