#!/usr/bin/env bash
# cold-ingest.sh: import of each image of the peer series from a cold page cache against a cold
# `cat` of the same file (issue 7: "<= 1.15x the time cat needs ... the disk is the limit"), with
# the disk unthrottled and limited to given read rates (a cgroup's blkio/io.max limit on the disk
# holding the images), so the row can be taken where the disk, not the CPU, is the limit.
# This VM's virtual disk is cached by its host (a cold `cat` runs at 1-3 GB/s), faster than any
# image pipeline on 2 cores; a limit of 200-350 MB/s is a SATA SSD or a cloud volume.
#
# Usage: benches/cold-ingest.sh [-h]        (as root: drop_caches, cgroups)
#
# Environment (all optional):
#   BENCH_DIR  work directory [/tmp/imgvault-peers]; images cached in BENCH_DIR/images
#   IMGVAULT   imgvault binary [REPO/target/release/imgvault]
#   RATES      read limits in MB/s, 0 = none ["0 200 350"]
#   ROUNDS     rounds per rate [2]; each round: per image, cold cat, cold import, cold cat
#
# Per rate and round the four images are imported into one new store in order (a, then b on a,
# ...), each after `drop_caches`, between two cold `cat`s of it (the faster cat counts). Prints
# one line per rate, round and image: cat s, import s, import / cat, and with a limit also the
# disk's own time for the file's allocated bytes at that rate and import / that time (`cat`'s
# 128 KiB reads do not reach a cgroup's limit: it is the weaker baseline there).
set -euo pipefail

usage() { sed -n '2,20s/^# \{0,1\}//p' "$0"; }
case ${1:-} in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "cold-ingest: needs root (drop_caches, cgroups)" >&2; exit 1; }

REPO=$(cd "$(dirname -- "$0")/.." && pwd)
W=${BENCH_DIR:-/tmp/imgvault-peers}
IMGS=$W/images
RATES=${RATES:-0 200 350}
ROUNDS=${ROUNDS:-2}
IV=${IMGVAULT:-$REPO/target/release/imgvault}
[ -x "$IV" ] || { echo "cold-ingest: no binary $IV (cargo build --release, or set IMGVAULT)" >&2; exit 1; }
bash "$REPO/benches/make-series.sh" "$IMGS" >&2
STORE=$W/cold-store

# The whole disk under the images (throttling applies to whole disks, not partitions).
dev=$(findmnt -no SOURCE --target "$IMGS")
parent=$(lsblk -no PKNAME "$dev" 2>/dev/null | head -1 || true)
[ -n "$parent" ] && dev=/dev/$parent
DISK=$(lsblk -dno MAJ:MIN "$dev" | tr -d ' ')
[ -n "$DISK" ] || { echo "cold-ingest: cannot find the disk under $IMGS" >&2; exit 1; }

# A cgroup of our own, v2 (io.max) or v1 (blkio throttle), that this shell joins; removed at exit.
CG=""
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    CG=/sys/fs/cgroup/imgvault-cold-$$
    echo +io > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    mkdir "$CG"
    limit() { if [ "$1" = 0 ]; then echo "$DISK rbps=max" > "$CG/io.max"; else echo "$DISK rbps=$(($1 * 1000000))" > "$CG/io.max"; fi; }
elif [ -d /sys/fs/cgroup/blkio ]; then
    CG=/sys/fs/cgroup/blkio/imgvault-cold-$$
    mkdir "$CG"
    limit() { echo "$DISK $(($1 * 1000000))" > "$CG/blkio.throttle.read_bps_device"; }   # 0 removes it
else
    echo "cold-ingest: no cgroup blkio/io controller: only the unthrottled rate is measured" >&2
    RATES=0
    limit() { :; }
fi
cleanup() {
    rm -rf -- "$STORE"
    if [ -n "$CG" ]; then
        limit 0 2>/dev/null || true
        echo $$ > "$(dirname "$CG")/cgroup.procs" 2>/dev/null || true
        rmdir "$CG" 2>/dev/null || true
    fi
}
trap cleanup EXIT
[ -n "$CG" ] && echo $$ > "$CG/cgroup.procs"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); awk "BEGIN { print $t1 - $t0 }"; }
printf '%-6s %-5s %-5s %8s %8s %8s %8s %8s\n' "MB/s" round image "cat s" "import s" "/ cat" "disk s" "/ disk"
for rate in $RATES; do
    limit "$rate"
    for r in $(seq "$ROUNDS"); do
        rm -rf -- "$STORE"; "$IV" --store "$STORE" init >/dev/null
        for i in a b c d; do
            drop; c1=$(secs cat "$IMGS/$i.img")
            drop; t=$(secs "$IV" --store "$STORE" -q import "$IMGS/$i.img" --name "$i")
            drop; c2=$(secs cat "$IMGS/$i.img")
            alloc=$(du -B1 "$IMGS/$i.img" | cut -f1)
            awk -v rate="$rate" -v r="$r" -v i="$i" -v c1="$c1" -v c2="$c2" -v t="$t" -v alloc="$alloc" 'BEGIN {
                c = c1 < c2 ? c1 : c2
                printf "%-6s %-5s %-5s %8.2f %8.2f %7.2fx", rate == 0 ? "none" : rate, r, i, c, t, t / c
                if (rate > 0) printf " %8.2f %7.2fx", alloc / rate / 1e6, t * rate * 1e6 / alloc
                printf "\n" }'
        done
    done
done
