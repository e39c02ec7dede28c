#!/usr/bin/env bash
# fuse-bench.sh: reads through the imgvault FUSE mount vs the same reads of the raw source file
# vs `imgvault export`, all in one run on one image (docs/PERFORMANCE.md, "FUSE mount").
#
# Usage: benches/fuse-bench.sh [IMAGE.raw]
#   IMAGE  a raw disk image [default: a 2 GiB GPT + ext4 disk built once from /usr by
#          tests/fixtures/make-disk.sh into $BENCH_DIR]
# Environment: IMGVAULT (binary, default target/debug/imgvault), BENCH_DIR (default
# target/bench-fuse), RUNTIME (fio seconds per run, default 10), JOBS (fio jobs, default 2).
# Needs root (mount, drop_caches), fio, dd, python3.
#
# Caches: every "cold" row starts after `echo 3 > /proc/sys/vm/drop_caches` and, for the
# mount, on a fresh mount (empty chunk cache). O_DIRECT rows bypass the page cache, so they
# measure the FUSE daemon itself (mount) or the disk (raw file).
set -euo pipefail

REPO=$(cd "$(dirname -- "$0")/.." && pwd)
BIN=${IMGVAULT:-$REPO/target/debug/imgvault}
WORK=${BENCH_DIR:-$REPO/target/bench-fuse}
RUNTIME=${RUNTIME:-10}
JOBS=${JOBS:-2}
[ "$(id -u)" -eq 0 ] || { echo "fuse-bench: needs root" >&2; exit 2; }
[ -x "$BIN" ] || { echo "fuse-bench: build first (cargo build): $BIN" >&2; exit 2; }
mkdir -p "$WORK"

IMG=${1:-$WORK/disk-2g.img}
if [ ! -s "$IMG" ]; then
    echo "building $IMG (2 GiB GPT + ext4 from /usr, once)" >&2
    MAKE_DISK_MAX_MIB=1400 bash "$REPO/tests/fixtures/make-disk.sh" base "$IMG" 2048 \
        /usr/lib /usr/share /usr/bin /usr/libexec /usr/include >/dev/null
fi

STORE=$WORK/store MNT=$WORK/mnt OUT=$WORK/export.raw
iv() { "$BIN" --store "$STORE" "$@"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
unmount() { if mountpoint -q "$MNT"; then iv umount --lazy "$MNT" >/dev/null; sleep 0.5; fi; }
trap 'unmount; rm -f "$OUT"' EXIT

# A fresh mount with an empty chunk cache, after dropping the page cache.
fresh_mount() {
    unmount
    drop
    iv mount "$MNT" "$@" >/dev/null
}

# dd FILE [dd flags...] -> MB/s
dd_rate() {
    local f=$1; shift
    dd if="$f" of=/dev/null bs=1M "$@" 2>&1 | awk '/copied/ {
        for (i = 1; i <= NF; i++) if ($i == "s,") secs = $(i-1)
        bytes = $1; printf "%.0f", bytes / secs / 1e6 }'
}

# fio random 4 KiB reads: FILE DIRECT -> IOPS (sum over jobs)
fio_iops() {
    fio --name=r --filename="$1" --rw=randread --bs=4k --direct="$2" --ioengine=psync \
        --runtime="$RUNTIME" --time_based --numjobs="$JOBS" --group_reporting \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'
}

row() { printf '| %-66s | %8s |\n' "$1" "$2"; }

rm -rf "$STORE" "$MNT"; mkdir -p "$MNT"
iv init -q >/dev/null 2>&1 || iv init >/dev/null
drop
T0=$(date +%s.%N)
iv -q import "$IMG" --name bench >/dev/null
T1=$(date +%s.%N)
SIZE=$(stat -c %s "$IMG")
FILE=$MNT/private/bench.raw
NONZERO=$(iv --json show bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["nonzero_bytes"])')

echo "image: $IMG, $((SIZE >> 20)) MiB virtual, $((NONZERO >> 20)) MiB non-zero; import $(python3 -c "print(round($T1-$T0,1))") s"
echo "machine: $(nproc) CPUs, $(uname -r), fio runtime ${RUNTIME}s x ${JOBS} jobs, load average at start: $(cut -d" " -f1-3 /proc/loadavg)"
echo
row "read" "result"
printf '|%s|%s|\n' "$(printf -- '-%.0s' {1..68})" "$(printf -- '-%.0s' {1..10})"

# ---- sequential ----------------------------------------------------------------------
drop
row "raw file, dd bs=1M, cold page cache (MB/s)" "$(dd_rate "$IMG")"
fresh_mount
row "mount, dd bs=1M, cold (MB/s)" "$(dd_rate "$FILE")"
row "mount, dd bs=1M, again: page cache kept (MB/s)" "$(dd_rate "$FILE")"
fresh_mount
row "mount, dd bs=1M iflag=direct, cold (MB/s)" "$(dd_rate "$FILE" iflag=direct)"
fresh_mount --prefetch-mb 0
row "mount --prefetch-mb 0 (no decode-ahead), dd, cold (MB/s)" "$(dd_rate "$FILE")"
fresh_mount --read-ahead-kb 1024
row "mount --read-ahead-kb 1024, dd, cold (MB/s)" "$(dd_rate "$FILE")"
fresh_mount --read-ahead-kb 0
row "mount --read-ahead-kb 0 (kernel's 128 KiB), dd, cold (MB/s)" "$(dd_rate "$FILE")"
unmount
drop
T0=$(date +%s.%N)
iv -q export bench "$OUT" >/dev/null
T1=$(date +%s.%N)
row "imgvault export (s)" "$(python3 -c "print(round($T1-$T0,2))")"
row "imgvault export, virtual size / time (MB/s)" "$(python3 -c "print(round($SIZE/($T1-$T0)/1e6))")"
rm -f "$OUT"

# ---- random 4 KiB --------------------------------------------------------------------
drop
row "raw file, fio randread 4k O_DIRECT (IOPS)" "$(fio_iops "$IMG" 1)"
drop
row "raw file, fio randread 4k buffered, cold (IOPS)" "$(fio_iops "$IMG" 0)"
fresh_mount
row "mount, fio randread 4k O_DIRECT, cold chunk cache (IOPS)" "$(fio_iops "$FILE" 1)"
fresh_mount
row "mount, fio randread 4k buffered, cold (IOPS)" "$(fio_iops "$FILE" 0)"
fresh_mount --cache-mb 4096
dd_rate "$FILE" iflag=direct >/dev/null   # fills the chunk cache, not the page cache
row "mount --cache-mb 4096, fio randread 4k O_DIRECT, warm cache (IOPS)" "$(fio_iops "$FILE" 1)"
fresh_mount --threads 1 --cache-mb 4096
dd_rate "$FILE" iflag=direct >/dev/null
row "  same with --threads 1 (IOPS)" "$(fio_iops "$FILE" 1)"
unmount
echo; echo "load average at end: $(cut -d" " -f1-3 /proc/loadavg)"
