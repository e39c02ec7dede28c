#!/usr/bin/env bash
# End-to-end ingest/export throughput of imgvault on a real GPT+ext4 disk image, next to
# b3sum and zstd -3 on the same file in the same run (ratios are what to compare: the
# machines are shared and noisy).
# usage: benches/ingest-bench.sh [DISK.img]   (default: builds a 2 GiB disk from /usr)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${IMGVAULT:-$repo/target/debug/imgvault}
work=${BENCH_DIR:-/tmp/imgvault-bench}
mkdir -p "$work"
disk=${1:-$work/disk2g.img}
if [ ! -s "$disk" ]; then
  MAKE_DISK_MAX_MIB=1300 bash "$repo/tests/fixtures/make-disk.sh" base "$disk" 2048 /usr/lib /usr/share /usr/bin >/dev/null
fi
[ -x "$bin" ] || (cd "$repo" && cargo build --bin imgvault)
size=$(stat -c %s "$disk"); alloc=$(( $(stat -c %b "$disk") * 512 ))
secs() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(date +%s.%N) - $s" | bc; }
cat "$disk" >/dev/null   # warm the page cache: this measures CPU work, not the disk
rm -rf "$work/store" "$work/out.img"
"$bin" --store "$work/store" init >/dev/null
t_b3=$(secs b3sum "$disk")
t_z1=$(secs zstd -3 -T1 -c "$disk" -o /dev/null)
t_z2=$(secs zstd -3 -T2 -c "$disk" -o /dev/null)
rss_file=$work/rss.txt
t_imp=$(secs /usr/bin/time -f %M -o "$rss_file" "$bin" --store "$work/store" import "$disk" --name a)
rss_kib=$(cat "$rss_file")
t_dup=$(secs "$bin" --store "$work/store" import "$disk" --name b)
t_exp=$(secs "$bin" --store "$work/store" export --force a "$work/out.img")
cmp "$disk" "$work/out.img"
stored=$("$bin" --store "$work/store" --json stats | sed -n 's/.*"stored_bytes": \([0-9]*\).*/\1/p')
mb() { echo "scale=0; $1 / 1000000" | bc; }
rate() { echo "scale=0; $1 / $2 / 1000000" | bc; }
echo "disk: $disk, $(mb "$size") MB virtual, $(mb "$alloc") MB allocated"
printf '%-34s %8s %10s %12s\n' step seconds "MB/s(virt)" "vs zstd-3 T2"
row() { printf '%-34s %8.2f %10s %12s\n' "$1" "$2" "$(rate "$size" "$2")" "$(echo "scale=2; $t_z2 / $2" | bc)x"; }
row "b3sum (multi-threaded)" "$t_b3"
row "zstd -3 -T1" "$t_z1"
row "zstd -3 -T2" "$t_z2"
row "imgvault import (new store)" "$t_imp"
row "imgvault import (same disk again)" "$t_dup"
row "imgvault export (sparse raw)" "$t_exp"
echo "import peak RSS: $((rss_kib / 1024)) MiB; stored after import: $(mb "$stored") MB"
