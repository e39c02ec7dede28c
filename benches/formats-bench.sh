#!/usr/bin/env bash
# Import throughput by image format: the same real GPT+ext4 disk imported as raw and as
# qcow2 (plain and zlib-compressed), vmdk, vhd and vhdx made from it with qemu-img, all in
# the same run (alternating, best of N) so the ratios compare like with like.
# usage: benches/formats-bench.sh [DISK.img] [N]   (default: the 2 GiB disk of ingest-bench.sh, N=3)
#        ONLY="disk.qcow2" benches/formats-bench.sh ...   (raw against these conversions only)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${IMGVAULT:-$repo/target/debug/imgvault}
work=${BENCH_DIR:-/tmp/imgvault-bench}
mkdir -p "$work"
disk=${1:-$work/disk2g.img}
runs=${2:-3}
if [ ! -s "$disk" ]; then
  MAKE_DISK_MAX_MIB=1300 bash "$repo/tests/fixtures/make-disk.sh" base "$disk" 2048 /usr/lib /usr/share /usr/bin >/dev/null
fi
[ -x "$bin" ] || (cd "$repo" && cargo build --bin imgvault)
f="$work/fmt"
mkdir -p "$f"
conv() { [ -s "$f/$1" ] || qemu-img convert -q -f raw "${@:2}" "$disk" "$f/$1"; }
conv disk.qcow2 -O qcow2
conv disk-zlib.qcow2 -O qcow2 -c
conv disk.vmdk -O vmdk
conv disk-stream.vmdk -O vmdk -o subformat=streamOptimized
conv disk.vhd -O vpc
conv disk.vhdx -O vhdx
now() { date +%s.%N; }
list="$disk"
for k in ${ONLY:-disk.qcow2 disk-zlib.qcow2 disk.vmdk disk-stream.vmdk disk.vhd disk.vhdx}; do list="$list $f/$k"; done
# best-of-N seconds of: import FILE into a new store, then again into the same store (dedup).
declare -A first dup
for i in $(seq 1 "$runs"); do
  for img in $list; do
    cat "$img" >/dev/null   # page cache warm: this measures CPU work, not the disk
    rm -rf "$work/fstore"; "$bin" --store "$work/fstore" init >/dev/null
    s=$(now); "$bin" -q --store "$work/fstore" import "$img" --name a >/dev/null; e=$(now)
    t=$(echo "$e - $s" | bc); k=$(basename "$img")
    if [ -z "${first[$k]:-}" ] || [ "$(echo "$t < ${first[$k]}" | bc)" = 1 ]; then first[$k]=$t; fi
    s=$(now); "$bin" -q --store "$work/fstore" import "$img" --name b >/dev/null; e=$(now)
    t=$(echo "$e - $s" | bc)
    if [ -z "${dup[$k]:-}" ] || [ "$(echo "$t < ${dup[$k]}" | bc)" = 1 ]; then dup[$k]=$t; fi
  done
done
size=$(stat -c %s "$disk")
raw=$(basename "$disk")
echo "disk: $disk, $((size / 1000000)) MB virtual; best of $runs; new store = first import (chunks compressed and written), dedup = same file again"
printf '%-22s %10s %10s %9s %10s %9s %9s\n' file "file MB" "new s" "vs raw" "dedup s" "vs raw" "MB/s new"
for img in $list; do
  k=$(basename "$img")
  printf '%-22s %10s %10.2f %8.2fx %10.2f %8.2fx %9s\n' "$k" "$(( $(stat -c %s "$img") / 1000000 ))" "${first[$k]}" \
    "$(echo "scale=3; ${first[$k]} / ${first[$raw]}" | bc)" "${dup[$k]}" "$(echo "scale=3; ${dup[$k]} / ${dup[$raw]}" | bc)" \
    "$(echo "scale=0; $size / ${first[$k]} / 1000000" | bc)"
done
