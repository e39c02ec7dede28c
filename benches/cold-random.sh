#!/usr/bin/env bash
# cold-random.sh: random 4 KiB reads of one image through a fresh imgvault mount, the way
# benches/peers.sh takes its cold row: mount, drop the page cache, fio randread (psync, 4,000
# reads in all). Prints "IOPS mean-latency-µs". docs/PERFORMANCE.md, "Cold random reads".
#
# Usage: benches/cold-random.sh STORE IMAGE [JOBS] [warm]    (as root: /dev/fuse, drop_caches)
#   STORE  store directory; IMAGE the file under the mount, e.g. private/c.raw
#   JOBS   fio jobs [2]; "warm" reads the store's files back into the page cache instead of
#          leaving them cold (the mount is still fresh: what FUSE and the daemon cost alone).
# Environment: IMGVAULT [target/release/imgvault], MNT [/tmp/imgvault-cold-random].
set -euo pipefail
if [ $# -lt 2 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0
fi
REPO=$(cd "$(dirname -- "$0")/.." && pwd)
IV=${IMGVAULT:-$REPO/target/release/imgvault}
STORE=$1 IMAGE=$2 JOBS=${3:-2} MODE=${4:-cold}
MNT=${MNT:-/tmp/imgvault-cold-random}
mkdir -p "$MNT"
trap 'fusermount3 -u "$MNT" 2>/dev/null || true' EXIT
"$IV" --store "$STORE" mount "$MNT" >/dev/null
for _ in $(seq 100); do [ -f "$MNT/$IMAGE" ] && break; sleep 0.1; done
sync
echo 3 >/proc/sys/vm/drop_caches
if [ "$MODE" = warm ]; then cat "$STORE"/db/* >/dev/null; fi
fio --name=rr --filename="$MNT/$IMAGE" --rw=randread --bs=4k --ioengine=psync \
    --numjobs="$JOBS" --group_reporting --output-format=json \
    --number_ios=$((4000 / JOBS)) --runtime=300 |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; print(round(r["iops"]), round(r["clat_ns"]["mean"]/1000))'
