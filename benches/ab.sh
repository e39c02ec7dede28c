#!/usr/bin/env bash
# ab.sh: A/B of imgvault builds or settings on the peer series (benches/make-series.sh), the
# variants taking turns each round so a noisy machine hits them alike: import of a (peak RSS),
# then b on top of a and c on top of both (sources in page cache); then, on one shared store
# holding a and c: with the store in page cache, export of c, verify of c and `dd` of c
# through a fresh mount; after `drop_caches`, export of c and `dd` of c through a fresh mount.
# Prints one line per variant and round, in seconds (docs/PERFORMANCE.md, "Allocator settings").
#
# Usage: benches/ab.sh VARIANT...     (as root: the mount needs /dev/fuse)
#   VARIANT  LABEL=BINARY[,VAR=VALUE...], e.g. old=/tmp/iv-old new=target/debug/imgvault
#            defaults=target/debug/imgvault,GLIBC_TUNABLES=  (glibc defaults: a user setting wins)
# Environment: BENCH_DIR [/tmp/imgvault-peers] (images cached in BENCH_DIR/images), ROUNDS [3].
set -euo pipefail

if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0
fi
REPO=$(cd "$(dirname -- "$0")/.." && pwd)
W=${BENCH_DIR:-/tmp/imgvault-peers}
I=$W/images
T=$W/ab
bash "$REPO/benches/make-series.sh" "$I" >&2
mkdir -p "$T/mnt"
cleanup() {
    fusermount3 -u "$T/mnt" 2>/dev/null || true
    rm -rf -- "$T"
}
trap cleanup EXIT

# run VARIANT ARGS...: the variant's binary with its environment (RSS_FILE: peak RSS, KiB).
run() {
    local spec=${1#*=}; shift
    local bin=${spec%%,*} vars=() timer=()
    if [ "$spec" != "$bin" ]; then IFS=, read -r -a vars <<<"${spec#*,}"; fi
    if [ -n "${RSS_FILE:-}" ]; then timer=(/usr/bin/time -f %M -o "$RSS_FILE"); fi
    ${timer[@]+"${timer[@]}"} env ${vars[@]+"${vars[@]}"} "$bin" "$@"
}
# secs CMD...: wall seconds of a command that must succeed.
secs() {
    local s e
    s=$(date +%s.%N)
    "$@" >/dev/null 2>&1 || { echo "ab.sh: failed: $*" >&2; exit 1; }
    e=$(date +%s.%N)
    awk -v a="$s" -v b="$e" 'BEGIN { printf "%.2f", b - a }'
}

# mount_dd VARIANT warm|cold: seconds of `dd` of c through a fresh mount of the shared store
# (cold: the page cache is dropped once the mount is up).
mount_dd() {
    local t
    run "$1" --store "$SHARED" mount "$T/mnt" >/dev/null
    for _ in $(seq 100); do [ -f "$T/mnt/private/c.raw" ] && break; sleep 0.1; done
    if [ "$2" = cold ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
    t=$(secs dd if="$T/mnt/private/c.raw" of=/dev/null bs=1M)
    fusermount3 -u "$T/mnt"
    echo "$t"
}

first=$1
# Each binary names the commit its library was built from (build.rs): a stale build shows here.
for v in "$@"; do echo "ab.sh: ${v%%=*}: $(run "$v" --version)" >&2; done
SHARED=$T/shared
run "$first" --store "$SHARED" init >/dev/null
run "$first" --store "$SHARED" -q import "$I/a.img" --name a >/dev/null
run "$first" --store "$SHARED" -q import "$I/c.img" --name c >/dev/null

for round in $(seq "${ROUNDS:-3}"); do
    for v in "$@"; do
        cat "$I/a.img" "$I/b.img" "$I/c.img" >/dev/null
        S=$T/fresh
        rm -rf -- "$S"
        run "$v" --store "$S" init >/dev/null
        RSS_FILE=$T/rss run "$v" --store "$S" -q import "$I/a.img" --name a >/dev/null
        rss=$(tail -1 "$T/rss")
        import_b=$(secs run "$v" --store "$S" -q import "$I/b.img" --name b)
        import_c=$(secs run "$v" --store "$S" -q import "$I/c.img" --name c)
        rm -rf -- "$S"
        find "$SHARED" -type f -exec cat {} + >/dev/null
        export_c=$(secs run "$v" --store "$SHARED" -q export --force c "$T/c.out")
        rm -f -- "$T/c.out"
        verify_c=$(secs run "$v" --store "$SHARED" -q verify c)
        mount_c=$(mount_dd "$v" warm)
        sync; echo 3 > /proc/sys/vm/drop_caches
        export_cold=$(secs run "$v" --store "$SHARED" -q export --force c "$T/c.out")
        rm -f -- "$T/c.out"
        mount_cold=$(mount_dd "$v" cold)
        echo "${v%%=*} round $round: import b $import_b, c $import_c; warm: export c $export_c, verify c $verify_c, mount dd c $mount_c; cold: export c $export_cold, mount dd c $mount_cold; peak RSS importing a $((rss / 1024)) MiB"
    done
done
