#!/usr/bin/env bash
# fuse-bench.sh: reads through the imgvault FUSE mount vs the same reads of the raw source file
# vs `imgvault export`, all in one run on one image (docs/PERFORMANCE.md, "FUSE mount").
#
# Usage: benches/fuse-bench.sh [IMAGE.raw]
#   IMAGE  a raw disk image [default: a 2 GiB GPT + ext4 disk built once from /usr by
#          tests/fixtures/make-disk.sh into $BENCH_DIR]
# Environment: IMGVAULT (binary, default target/debug/imgvault), BENCH_DIR (default
# target/bench-fuse), RUNTIME (fio seconds per run, default 10), JOBS (fio jobs, default 2),
# ROUNDS (interleaved repetitions, median reported, default 3).
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

# Every measurement runs ROUNDS times, interleaved with the others (the machines are shared:
# a neighbour's burst hits one round of every row, not every round of one row); the table
# shows the median and the range.
ROUNDS=${ROUNDS:-3}
declare -A R
ORDER=()
measure() {   # measure KEY LABEL COMMAND...
    local key=$1 label=$2; shift 2
    [ -n "${R[$key]+x}" ] || { ORDER+=("$key"); R[$key]=""; R[label_$key]=$label; }
    R[$key]+="$("$@") "
}
median_range() {
    python3 -c 'import sys,statistics as s; v=[float(x) for x in sys.argv[1:]]; print("%g | %g-%g" % (round(s.median(v),2), round(min(v),2), round(max(v),2)))' $1
}

rm -rf "$STORE" "$MNT"; mkdir -p "$MNT"
iv init >/dev/null
drop
T0=$(date +%s.%N)
iv -q import "$IMG" --name bench >/dev/null
T1=$(date +%s.%N)
SIZE=$(stat -c %s "$IMG")
FILE=$MNT/private/bench.raw
NONZERO=$(iv --json show bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["nonzero_bytes"])')

echo "image: $IMG, $((SIZE >> 20)) MiB virtual, $((NONZERO >> 20)) MiB non-zero; import $(python3 -c "print(round($T1-$T0,1))") s"
echo "machine: $(nproc) CPUs, $(uname -r); fio ${RUNTIME}s x ${JOBS} jobs; $ROUNDS rounds; load average at start: $(cut -d" " -f1-3 /proc/loadavg)"

raw_dd() { drop; dd_rate "$IMG"; }
mnt_dd() { fresh_mount "$@"; dd_rate "$FILE"; }
mnt_dd_twice() { fresh_mount; dd_rate "$FILE" >/dev/null; dd_rate "$FILE"; }
mnt_dd_direct() { fresh_mount; dd_rate "$FILE" iflag=direct; }
export_rate() {
    unmount; drop
    local t0 t1; t0=$(date +%s.%N)
    iv -q export --force bench "$OUT" >/dev/null
    t1=$(date +%s.%N); rm -f "$OUT"
    python3 -c "print(round($SIZE/($t1-$t0)/1e6))"
}
raw_fio() { drop; fio_iops "$IMG" "$1"; }
mnt_fio() { local direct=$1; shift; fresh_mount "$@"; fio_iops "$FILE" "$direct"; }
mnt_fio_warm() { fresh_mount --cache-mb 4096 "$@"; dd_rate "$FILE" iflag=direct >/dev/null; fio_iops "$FILE" 1; }

for round in $(seq 1 "$ROUNDS"); do
    echo "round $round (load $(cut -d" " -f1 /proc/loadavg))" >&2
    measure raw_dd "raw file, dd bs=1M, cold page cache (MB/s)" raw_dd
    measure mnt_dd "mount, dd bs=1M, cold (MB/s)" mnt_dd
    measure mnt_dd2 "mount, dd bs=1M, second read: page cache kept (MB/s)" mnt_dd_twice
    measure mnt_direct "mount, dd bs=1M iflag=direct, cold (MB/s)" mnt_dd_direct
    measure mnt_nopf "mount --prefetch-mb 0 (no decode-ahead), dd, cold (MB/s)" mnt_dd --prefetch-mb 0
    measure mnt_pf32 "mount --prefetch-mb 32, dd, cold (MB/s)" mnt_dd --prefetch-mb 32
    measure mnt_ra4m "mount --read-ahead-kb 4096, dd, cold (MB/s)" mnt_dd --read-ahead-kb 4096
    measure mnt_ra0 "mount --read-ahead-kb 0 (kernel's 128 KiB), dd, cold (MB/s)" mnt_dd --read-ahead-kb 0
    measure export "imgvault export to a file, virtual size / time (MB/s)" export_rate
    measure raw_rand_d "raw file, fio randread 4k O_DIRECT (IOPS)" raw_fio 1
    measure raw_rand_b "raw file, fio randread 4k buffered, cold (IOPS)" raw_fio 0
    measure mnt_rand_d "mount, fio randread 4k O_DIRECT, cold chunk cache (IOPS)" mnt_fio 1
    measure mnt_rand_b "mount, fio randread 4k buffered, cold (IOPS)" mnt_fio 0
    measure mnt_rand_w "mount --cache-mb 4096, randread 4k O_DIRECT, warm cache (IOPS)" mnt_fio_warm
    measure mnt_rand_w1 "  same, --threads 1 (IOPS)" mnt_fio_warm --threads 1
done
unmount

echo
printf '| %-64s | %8s | %13s |\n' "read" "median" "range"
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..66})" "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..15})"
for k in "${ORDER[@]}"; do
    IFS='|' read -r med range <<<"$(median_range "${R[$k]}")"
    printf '| %-64s | %8s | %13s |\n' "${R[label_$k]}" "${med// /}" "${range// /}"
    eval "MED_$k=${med// /}"
done
echo
python3 - "$MED_mnt_dd" "$MED_raw_dd" "$MED_export" "$MED_mnt_rand_d" "$MED_mnt_rand_w" "$MED_raw_rand_d" "$MED_mnt_rand_b" "$MED_raw_rand_b" <<'PY'
import sys
md, rd, ex, mrd, mrw, rrd, mrb, rrb = map(float, sys.argv[1:])
print(f"ratios: sequential mount/raw {md/rd:.2f}x, mount/export {md/ex:.2f}x; "
      f"random 4k O_DIRECT mount/raw {mrd/rrd:.2f}x cold cache, {mrw/rrd:.2f}x warm cache; "
      f"buffered cold mount/raw {mrb/rrb:.2f}x")
PY
echo "load average at end: $(cut -d" " -f1-3 /proc/loadavg)"
