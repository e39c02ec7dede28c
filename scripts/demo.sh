#!/usr/bin/env bash
# demo.sh: imgvault end to end on real disk images (build, import, dedup, export, verify, gc,
# mount, and a VM booted from the mount through a copy-on-write clone).
#
# Usage: scripts/demo.sh        (as root; run from anywhere)
#   DEMO_DIR=/tmp/imgvault-demo  work directory (wiped at start if it holds an earlier demo)
#   IMGVAULT=path/to/imgvault    use this binary instead of `cargo build --bin imgvault`
#   DEMO_SIZE_MIB=400            virtual size of each disk image
#   DEMO_DATA_MIB=240            real files copied into the base image
#   DEMO_CLEAN=1                 remove DEMO_DIR at the end (default: keep it for inspection)
#   DEMO_SKIP_DEPS=1             do not run scripts/install-deps.sh first
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '4,10s/^# \{0,1\}//p' "$0"; exit 0
fi

ROOT=$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH=$PATH:/usr/sbin:/sbin          # fsck.ext4, sfdisk, debugfs
MAKE_DISK=$ROOT/tests/fixtures/make-disk.sh
DEMO_DIR=${DEMO_DIR:-/tmp/imgvault-demo}
SIZE_MIB=${DEMO_SIZE_MIB:-400}
DATA_MIB=${DEMO_DATA_MIB:-240}
MARKER=.imgvault-demo

T_START=$SECONDS
T_SECTION=$SECONDS
section() {
    echo
    echo "==== $* ===="
    T_SECTION=$SECONDS
}
done_in() { echo "---- done in $((SECONDS - T_SECTION)) s"; }
die() { echo "demo: FAILED: $*" >&2; exit 1; }
# Show each imgvault command as it runs.
iv() {
    echo "+ imgvault --store $STORE $*"
    "$IMGVAULT" --store "$STORE" "$@"
}

# ---- system packages (skip with DEMO_SKIP_DEPS=1)
if [ "${DEMO_SKIP_DEPS:-}" != 1 ]; then
    section "install dependencies (scripts/install-deps.sh)"
    bash "$ROOT/scripts/install-deps.sh"
    done_in
fi

# ---- binary
if [ -z "${IMGVAULT:-}" ]; then
    section "build (cargo build --bin imgvault, dev profile)"
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    cargo build --bin imgvault
    IMGVAULT=${CARGO_TARGET_DIR:-$ROOT/target}/debug/imgvault
    done_in
fi
[ -x "$IMGVAULT" ] || die "imgvault binary not found or not executable: $IMGVAULT"

# ---- work directory: only ever wipe one that an earlier demo made (it has the marker).
STORE=$DEMO_DIR/store
MNT=$DEMO_DIR/mnt
unmount_demo() {
    if mountpoint -q "$MNT" 2>/dev/null; then
        "$IMGVAULT" umount "$MNT" 2>/dev/null || fusermount3 -u "$MNT" 2>/dev/null || umount "$MNT" || true
    fi
}
if [ -e "$DEMO_DIR" ]; then
    if [ -f "$DEMO_DIR/$MARKER" ]; then
        unmount_demo
        rm -rf -- "$DEMO_DIR"
    elif [ -n "$(ls -A -- "$DEMO_DIR")" ]; then
        die "$DEMO_DIR exists and is not an imgvault demo directory: set DEMO_DIR elsewhere"
    fi
fi
mkdir -p -- "$DEMO_DIR"
touch -- "$DEMO_DIR/$MARKER"
cleanup() {
    local rc=$?
    unmount_demo
    if [ "$rc" -eq 0 ] && [ "${DEMO_CLEAN:-0}" = 1 ]; then rm -rf -- "$DEMO_DIR"; fi
    [ "$rc" -eq 0 ] || echo "demo: failed (exit $rc); files kept in $DEMO_DIR" >&2
}
trap cleanup EXIT
BASE=$DEMO_DIR/base.img
DERIVED=$DEMO_DIR/derived.img
OUT=$DEMO_DIR/out.img

# ---- disk images
section "make base disk image ($SIZE_MIB MiB, about $DATA_MIB MiB of real files)"
src=()
# Real files of mixed kinds (headers, Python, Perl, tz data, locales, shared libraries); the
# size cap takes a prefix in this order, so the big library dir last only fills up.
for d in /usr/include /usr/lib/python3.* /usr/share/perl /usr/share/zoneinfo /usr/share/locale \
         /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu; do
    [ -d "$d" ] && src+=("$d")
done
[ "${#src[@]}" -gt 0 ] || die "no source directories found under /usr"
echo "sources: ${src[*]}"
MAKE_DISK_MAX_MIB=$DATA_MIB "$MAKE_DISK" base "$BASE" "$SIZE_MIB" "${src[@]}"
done_in

section "make derived disk image (files added, removed, changed)"
# What an application install would add: text files plus an incompressible binary.
ADD=$DEMO_DIR/app-files
mkdir -p "$ADD/etc" "$ADD/bin"
for d in /usr/share/i18n/locales /usr/share/common-licenses; do
    [ -d "$d" ] && cp -a "$d" "$ADD/"
done
printf 'listen = 0.0.0.0:8080\nworkers = 16\nstore = /var/lib/app\n' >"$ADD/etc/app.conf"
head -c $((4 * 1048576)) /dev/urandom >"$ADD/bin/app-server"
"$MAKE_DISK" derive "$BASE" "$DERIVED" "$ADD"
done_in

OFFSET=$("$MAKE_DISK" partition-offset "$BASE")
echo "partition offset: $OFFSET bytes"
du -h --apparent-size "$BASE" "$DERIVED" | sed 's/^/virtual  /'
du -h "$BASE" "$DERIVED" | sed 's/^/on disk  /'

# ---- store
section "init"
iv init
done_in

section "import base.img as public debian-base (tenant admin)"
iv import "$BASE" --name debian-base --os-version demo --visibility public
done_in

section "import derived.img as app-server"
iv import "$DERIVED" --name app-server
# The recorded checksum is b3sum's, though most of its windows were not hashed again.
RECORDED=$("$IMGVAULT" --store "$STORE" --json show app-server | sed -n 's/.*"checksum": *"\([0-9a-f]*\)".*/\1/p')
B3SUM=$(b3sum --no-names -- "$DERIVED")
[ "$RECORDED" = "$B3SUM" ] || die "recorded checksum $RECORDED is not b3sum's $B3SUM"
echo "b3sum derived.img: $B3SUM (the recorded checksum)"
done_in

STORE_BYTES=$(du -s -B1 -- "$STORE" | cut -f1)

section "stats"
iv stats
done_in

section "list"
iv list

section "show app-server"
iv show app-server

section "export app-server and compare with derived.img"
iv export app-server "$OUT"
cmp -- "$DERIVED" "$OUT" || die "exported image differs from derived.img"
echo "cmp: out.img is byte-identical to derived.img"
du -h "$OUT" | sed 's/^/on disk  /'
done_in

section "fsck.ext4 -n on the exported image's partition"
"$MAKE_DISK" extract-partition "$OUT" "$DEMO_DIR/out.part"
fsck.ext4 -fn "$DEMO_DIR/out.part" || die "fsck.ext4 found problems in the exported image"
rm -f -- "$DEMO_DIR/out.part"
done_in

section "verify"
iv verify
done_in

section "mount (FUSE)"
if [ -e /dev/fuse ] && "$IMGVAULT" mount --help >/dev/null 2>&1; then
    mkdir -p -- "$MNT"
    iv mount "$MNT"                        # returns once the mount is ready
    ls -la "$MNT" "$MNT/public" || true
    cmp -- "$MNT/public/debian-base.raw" "$BASE" || die "mounted public/debian-base.raw differs from base.img"
    echo "cmp: mounted public/debian-base.raw is byte-identical to base.img"
    done_in

    section "boot a VM from the mount through a copy-on-write clone (qemu)"
    # A small BIOS-bootable disk: GPT, syslinux, Debian's kernel, a busybox root whose init
    # checks every payload file and counts its boots (tests/fixtures/make-bootable.sh).
    bash "$ROOT/tests/fixtures/make-bootable.sh" "$DEMO_DIR/bootable.img"
    iv import "$DEMO_DIR/bootable.img" --name mini-linux --os-type linux
    iv clone-overlay mini-linux "$DEMO_DIR/vm1.qcow2" --mount "$MNT"
    echo "+ qemu-system-x86_64 -accel tcg -m 256 -drive file=vm1.qcow2,if=virtio (serial console below)"
    timeout 600 qemu-system-x86_64 -accel tcg -m 256 -display none -no-reboot \
        -serial "file:$DEMO_DIR/console.log" \
        -drive "file=$DEMO_DIR/vm1.qcow2,format=qcow2,if=virtio" || die "qemu failed"
    grep -a 'imgvault-boot:' "$DEMO_DIR/console.log" || true
    grep -aq 'imgvault-boot: payload verified' "$DEMO_DIR/console.log" \
        || die "the VM did not boot from the mounted image (console: $DEMO_DIR/console.log)"
    echo "the VM booted from the mounted image; its writes went to vm1.qcow2 ($(du -h "$DEMO_DIR/vm1.qcow2" | cut -f1)), the image is unchanged:"
    b3sum --no-names "$MNT/private/mini-linux.raw"
    iv --json show mini-linux | grep '"checksum"'
    echo "+ imgvault umount $MNT"
    "$IMGVAULT" umount "$MNT"
else
    echo "mount step skipped: no /dev/fuse or no \`imgvault mount\` subcommand"
fi
done_in

section "delete app-server (and the VM's image), then gc"
iv delete app-server
if iv list | grep -q ' mini-linux '; then iv delete mini-linux; fi
iv gc
done_in

section "stats after gc"
iv stats
iv list
STORE_AFTER_GC=$(du -s -B1 -- "$STORE" | cut -f1)

section "verify after gc"
iv verify
done_in

# ---- summary
virt=$(( $(stat -c %s -- "$BASE") + $(stat -c %s -- "$DERIVED") ))
alloc=$(( $(du -B1 -- "$BASE" | cut -f1) + $(du -B1 -- "$DERIVED" | cut -f1) ))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo
echo "==== summary ===="
echo "images:                  base.img + derived.img, $(mib "$virt") virtual"
echo "non-zero (allocated):    $(mib "$alloc") (du of the two sparse images)"
echo "store after 2 imports:   $(mib "$STORE_BYTES") (du of $STORE)"
awk -v a="$alloc" -v s="$STORE_BYTES" 'BEGIN { if (s > 0) printf "reduction:               %.2fx (allocated bytes / store bytes)\n", a / s }'
echo "store after delete + gc: $(mib "$STORE_AFTER_GC")"
echo "partition offset:        $OFFSET bytes"
echo "total time:              $((SECONDS - T_START)) s"
if [ "${DEMO_CLEAN:-0}" = 1 ]; then echo "demo: OK"; else echo "demo: OK (files kept in $DEMO_DIR)"; fi
