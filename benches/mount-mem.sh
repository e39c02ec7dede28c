#!/usr/bin/env bash
# mount-mem.sh: time and peak RSS of the mount's serving process for one read of an image
# through a fresh mount, and (with IMGVAULT_LOG=imgvault::fuse::stream=debug) how many bytes
# its sequential windows decoded. docs/PERFORMANCE.md, "Mount memory".
#
# Usage: benches/mount-mem.sh STORE IMAGE MODE      (as root: /dev/fuse, drop_caches)
#   STORE  store directory; IMAGE the file under the mount, e.g. private/c.raw
#   MODE   seq        dd bs=1M of the whole image after drop_caches
#          seq-warm   the same with the store's files read back into the page cache
#          rand15     fio randread 4 KiB, 2 jobs, 15 s (the peers.sh row) after drop_caches
# Prints "MODE SECONDS|IOPS VmHWM-MiB [window-MiB]".
# Environment: IMGVAULT [target/release/imgvault], MNT [/tmp/imgvault-mount-mem].
set -euo pipefail
if [ $# -lt 3 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,12s/^# \{0,1\}//p' "$0"; exit 0
fi
REPO=$(cd "$(dirname -- "$0")/.." && pwd)
IV=${IMGVAULT:-$REPO/target/release/imgvault}
STORE=$1 IMAGE=$2 MODE=$3
MNT=${MNT:-/tmp/imgvault-mount-mem}
LOG=$(mktemp)
mkdir -p "$MNT"
trap 'fusermount3 -u "$MNT" 2>/dev/null || true; rm -f "$LOG"' EXIT
"$IV" --store "$STORE" mount --log-file "$LOG" "$MNT" >/dev/null
for _ in $(seq 100); do [ -f "$MNT/$IMAGE" ] && break; sleep 0.1; done
PID=$(pgrep -f -- "--store $STORE mount .*$MNT" | head -1)
sync
echo 3 >/proc/sys/vm/drop_caches
case $MODE in
    seq|seq-warm)
        if [ "$MODE" = seq-warm ]; then cat "$STORE"/db/* >/dev/null; fi
        s=$(date +%s.%N)
        dd if="$MNT/$IMAGE" of=/dev/null bs=1M status=none
        e=$(date +%s.%N)
        result=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.2f", b - a }') ;;
    rand15)
        result=$(fio --name=rr --filename="$MNT/$IMAGE" --rw=randread --bs=4k --ioengine=psync \
            --numjobs=2 --runtime=15 --time_based --group_reporting --output-format=json |
            python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))') ;;
    *) echo "mount-mem.sh: unknown mode $MODE" >&2; exit 2 ;;
esac
hwm=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$PID/status")
fusermount3 -u "$MNT"
sleep 0.3
windows=$(awk '/window of [0-9]+ bytes/ { for (i = 1; i <= NF; i++) if ($i == "of") s += $(i + 1) } END { if (NR) printf " %.0f", s / 1048576 }' "$LOG")
echo "$MODE $result $hwm$windows"
