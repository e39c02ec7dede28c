#!/usr/bin/env bash
# Backup and restore throughput of imgvault on a real GPT+ext4 disk image, next to `dd bs=4M`
# and `cp --sparse=always` of the same image in the same run (ratios are what to compare: the
# machines are shared and noisy). Every write is made durable (restore fdatasyncs; dd runs
# with conv=fsync; cp is followed by `sync FILE`), so the rows compare like with like.
#
# usage: benches/backup-restore-bench.sh [DISK.img]
#   DISK.img  default: $BENCH_DIR/disk2g.img, built like benches/ingest-bench.sh does
#             (2 GiB GPT disk, ext4 from 1.3 GB of /usr)
# environment: BENCH_DIR (default /tmp/imgvault-bench-br), IMGVAULT (the binary)
# As root, a second table restores onto loop devices (block-device targets) and backs up
# from one; without root that table is skipped (said so on stderr).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${IMGVAULT:-$repo/target/debug/imgvault}
work=${BENCH_DIR:-/tmp/imgvault-bench-br}
mkdir -p "$work"
disk=${1:-$work/disk2g.img}
if [ ! -s "$disk" ]; then
    MAKE_DISK_MAX_MIB=1300 bash "$repo/tests/fixtures/make-disk.sh" base "$disk" 2048 \
        /usr/lib /usr/share /usr/bin >/dev/null
fi
[ -x "$bin" ] || (cd "$repo" && cargo build --bin imgvault)
size=$(stat -c %s "$disk")
alloc=$(($(stat -c %b "$disk") * 512))
store=$work/store
loops=()
cleanup() {
    local l
    for l in "${loops[@]+"${loops[@]}"}"; do losetup -d "$l" 2>/dev/null || true; done
    rm -rf -- "$store" "$work"/t-*.img
}
trap cleanup EXIT

# secs CMD...: "WALL CPU" seconds of CMD, CPU = user + system of it and its children (the
# machine is shared: CPU seconds say what a step costs when wall time is inflated by load).
# Its output is discarded; a failure aborts the bench.
secs() {
    /usr/bin/time -f '%e %U %S' -o "$work/time" "$@" >/dev/null 2>"$work/err" \
        || { cat "$work/err" >&2; exit 1; }
    awk '{ printf "%s %.2f\n", $1, $2 + $3 }' "$work/time"
}
IV=("$bin" --store "$store")
fresh() { rm -f -- "$1"; truncate -s "$size" -- "$1"; }   # a new, all-zero (sparse) file
mb() { echo "scale=0; $1 / 1000000" | bc; }
rate() { echo "scale=0; $size / $1 / 1000000" | bc; }
ratio() { printf '%.2f' "$(echo "scale=4; $1 / $2" | bc)"; }
# row LABEL "WALL CPU" "DD_WALL DD_CPU"
row() {
    local w c dw
    read -r w c <<<"$2"
    read -r dw _ <<<"$3"
    printf '| %-62s | %7.2f | %7.2f | %6s | %7sx |\n' "$1" "$w" "$c" "$(rate "$w")" "$(ratio "$dw" "$w")"
}
header() {
    printf '| %-62s | %7s | %7s | %6s | %8s |\n' step "wall s" "CPU s" "MB/s" "vs dd"
    printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..64})" --------- --------- -------- ----------
}

cat "$disk" >/dev/null   # the source is in the page cache: every row reads it from memory
rm -rf -- "$store"
"${IV[@]}" init >/dev/null

echo "disk: $disk, $(mb "$size") MB virtual, $(mb "$alloc") MB allocated; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "file targets (MB/s of virtual size per wall second; vs dd = dd wall seconds / row wall seconds)"
header

t=$work/t-file.img
rm -f -- "$t"
t_dd=$(secs dd if="$disk" of="$t" bs=4M conv=fsync status=none)
rm -f -- "$t"
t_cp=$(secs bash -c "cp --sparse=always '$disk' '$t' && sync '$t'")
cmp "$disk" "$t"
t_b1=$(secs "${IV[@]}" backup "$disk" --name b1)
t_b2=$(secs "${IV[@]}" backup "$disk" --name b2 --parent b1)
rm -f -- "$t"
t_r1=$(secs "${IV[@]}" restore b1 "$t")
cmp "$disk" "$t"
t_r2=$(secs "${IV[@]}" restore b1 "$t")
t_r3=$(secs "${IV[@]}" restore b1 "$t" --verify)
t_dd2=$(secs dd if="$disk" of="$t" bs=4M conv=fsync,notrunc status=none)
row '`dd bs=4M conv=fsync` to a new file' "$t_dd" "$t_dd"
row '`cp --sparse=always` + `sync FILE` to a new file' "$t_cp" "$t_dd"
row '`dd bs=4M conv=fsync,notrunc` over an identical file' "$t_dd2" "$t_dd"
row '`imgvault backup` FILE (new store)' "$t_b1" "$t_dd"
row '`imgvault backup` FILE again (unchanged)' "$t_b2" "$t_dd"
row '`imgvault restore` to a new file (full)' "$t_r1" "$t_dd"
row '`imgvault restore` onto an identical file (skip-unchanged)' "$t_r2" "$t_dd"
row '`imgvault restore --verify` onto an identical file' "$t_r3" "$t_dd"

if [ "$(id -u)" -ne 0 ]; then
    echo "SKIP block-device table: needs root for loop devices" >&2
    exit 0
fi
echo
echo "block-device targets: loop devices over sparse files on the same filesystem"
header
fresh "$work/t-dev.img"
dev=$(losetup -f --show "$work/t-dev.img")
loops+=("$dev")
src=$(losetup -r -f --show "$disk")
loops+=("$src")
t_ddd=$(secs dd if="$disk" of="$dev" bs=4M conv=fsync status=none)
blockdev --flushbufs "$dev"
fallocate -p -o 0 -l "$size" "$work/t-dev.img"   # zero it again, same inode
blockdev --flushbufs "$dev"
t_rd1=$(secs "${IV[@]}" restore b1 "$dev")
cmp "$disk" "$dev"
t_rd2=$(secs "${IV[@]}" restore b1 "$dev")
t_rd3=$(secs "${IV[@]}" restore b1 "$dev" --verify)
t_ddd2=$(secs dd if="$disk" of="$dev" bs=4M conv=fsync status=none)
t_bd1=$(secs "${IV[@]}" backup "$src" --name d1)
t_bd2=$(secs "${IV[@]}" backup "$src" --name d2 --parent d1)
t_ddr=$(secs dd if="$src" of=/dev/null bs=4M status=none)
row '`dd bs=4M conv=fsync` to a zeroed device' "$t_ddd" "$t_ddd"
row '`dd bs=4M conv=fsync` over an identical device' "$t_ddd2" "$t_ddd"
row '`imgvault restore` to a zeroed device (full)' "$t_rd1" "$t_ddd"
row '`imgvault restore` onto an identical device (skip-unchanged)' "$t_rd2" "$t_ddd"
row '`imgvault restore --verify` onto an identical device' "$t_rd3" "$t_ddd"
row '`dd bs=4M of=/dev/null` from the source device' "$t_ddr" "$t_ddd"
row '`imgvault backup` DEVICE (b1'"'"'s chunks known)' "$t_bd1" "$t_ddd"
row '`imgvault backup` DEVICE again (unchanged)' "$t_bd2" "$t_ddd"
echo
echo "store after four backups of the same disk: $(mb "$("${IV[@]}" --json stats | sed -n 's/.*"stored_bytes": \([0-9]*\).*/\1/p')") MB of chunks"
