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
list="$disk"
for k in ${ONLY:-disk.qcow2 disk-zlib.qcow2 disk.vmdk disk-stream.vmdk disk.vhd disk.vhdx}; do list="$list $f/$k"; done
# best-of-N wall seconds (and CPU seconds, user + sys: steadier on a shared machine) of:
# import FILE into a new store, then again into the same store (dedup).
declare -A first dup cpu_first cpu_dup
best() { # best ARRAY KEY VALUE
  local -n a=$1
  if [ -z "${a[$2]:-}" ] || [ "$(echo "$3 < ${a[$2]}" | bc)" = 1 ]; then a[$2]=$3; fi
}
timed() { # timed NAME FILE -> "wall cpu"
  /usr/bin/time -f "%e %U %S" -o "$work/time.txt" "$bin" -q --store "$work/fstore" import "$2" --name "$1" >/dev/null
  awk '{printf "%s %.2f\n", $1, $2 + $3}' "$work/time.txt"
}
for i in $(seq 1 "$runs"); do
  for img in $list; do
    cat "$img" >/dev/null   # page cache warm: this measures CPU work, not the disk
    rm -rf "$work/fstore"; "$bin" --store "$work/fstore" init >/dev/null
    k=$(basename "$img")
    read -r w c < <(timed a "$img"); best first "$k" "$w"; best cpu_first "$k" "$c"
    read -r w c < <(timed b "$img"); best dup "$k" "$w"; best cpu_dup "$k" "$c"
  done
done
size=$(stat -c %s "$disk")
raw=$(basename "$disk")
echo "disk: $disk, $((size / 1000000)) MB virtual; best of $runs; new store = first import (chunks compressed and written), dedup = same file again"
printf '%-20s %8s | %7s %7s %7s %7s | %7s %7s %7s %7s\n' file "file MB" "new s" "vs raw" "cpu s" "vs raw" "dedup s" "vs raw" "cpu s" "vs raw"
ratio() { echo "scale=2; $1 / $2" | bc; }
for img in $list; do
  k=$(basename "$img")
  printf '%-20s %8s | %7.2f %6.2fx %7.2f %6.2fx | %7.2f %6.2fx %7.2f %6.2fx\n' "$k" "$(( $(stat -c %s "$img") / 1000000 ))" \
    "${first[$k]}" "$(ratio "${first[$k]}" "${first[$raw]}")" "${cpu_first[$k]}" "$(ratio "${cpu_first[$k]}" "${cpu_first[$raw]}")" \
    "${dup[$k]}" "$(ratio "${dup[$k]}" "${dup[$raw]}")" "${cpu_dup[$k]}" "$(ratio "${cpu_dup[$k]}" "${cpu_dup[$raw]}")"
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
