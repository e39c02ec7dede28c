#!/usr/bin/env bash
# mount-soak.sh: the mount's resident memory while many clients read at once, and after they
# stop. docs/PERFORMANCE.md, "Mount memory under many clients".
#
# Usage: benches/mount-soak.sh STORE [SECONDS]     (as root: /dev/fuse, drop_caches)
#   STORE    a store holding private/{a,b,c,d}.raw (benches/peers.sh leaves one in
#            /tmp/imgvault-peers/imgvault)
#   SECONDS  how long the clients read [180]
# Clients, all at once, each in a loop over the four images: two `dd iflag=direct bs=1M`
# (every request reaches the daemon: decode-ahead windows), one buffered `dd bs=1M` with the
# page cache dropped before each pass, two buffered fio randread 4 KiB runs of 20 s, one
# O_DIRECT fio randread 4 KiB run of 20 s (the chunk cache).
# Prints the serving process's VmRSS: peak (VmHWM), mean over the run, and 10 s after the
# clients stopped, in MiB, and one line per 10 s to stderr. With gdb installed, also glibc's
# own count at mid-run and after the idle 10 s (`malloc_stats`, called in the daemon through
# gdb, which pauses it for about a second): bytes its heaps hold, and of those in use.
# Environment: IMGVAULT [target/release/imgvault], MNT [/tmp/imgvault-mount-soak].
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0
fi
REPO=$(cd "$(dirname -- "$0")/.." && pwd)
IV=${IMGVAULT:-$REPO/target/release/imgvault}
STORE=$1 SECONDS_RUN=${2:-180}
MNT=${MNT:-/tmp/imgvault-mount-soak}
mkdir -p "$MNT"
LOG=$(mktemp)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    pkill -f -- "--filename=$MNT/" 2>/dev/null || true
    wait 2>/dev/null || true
    fusermount3 -u "$MNT" 2>/dev/null || true
    rm -f "$LOG"
}
trap cleanup EXIT
"$IV" --store "$STORE" mount "$MNT" --log-file "$LOG" >/dev/null
for _ in $(seq 100); do [ -f "$MNT/private/d.raw" ] && break; sleep 0.1; done
PID=$(pgrep -f -- "--store $STORE mount $MNT" | head -1)
sync
echo 3 >/proc/sys/vm/drop_caches
END=$(($(date +%s) + SECONDS_RUN))
images=(a b c d)

client() { # NAME COMMAND-TEMPLATE (IMG replaced by the image's path)
    local i=$1; shift
    while [ "$(date +%s)" -lt "$END" ]; do
        local img=$MNT/private/${images[$((i % 4))]}.raw
        eval "${*//IMG/$img}" >/dev/null 2>&1 || true
        i=$((i + 1))
    done
}
client 0 'dd if=IMG of=/dev/null bs=1M iflag=direct' & PIDS+=($!)
client 2 'dd if=IMG of=/dev/null bs=1M iflag=direct' & PIDS+=($!)
client 1 'echo 1 >/proc/sys/vm/drop_caches; dd if=IMG of=/dev/null bs=1M' & PIDS+=($!)
fio_rand='fio --name=r --filename=IMG --rw=randread --bs=4k --ioengine=psync --runtime=20 --time_based'
client 3 "$fio_rand" & PIDS+=($!)
client 1 "$fio_rand" & PIDS+=($!)
client 2 "$fio_rand --direct=1" & PIDS+=($!)

rss() { awk '/VmRSS/ { print int($2 / 1024) }' "/proc/$PID/status"; }
# glibc's totals over all arenas: malloc_stats writes them to the daemon's stderr (the log).
heap() {
    command -v gdb >/dev/null || return 0
    local before; before=$(wc -l <"$LOG")
    gdb -p "$PID" -batch -ex 'call (void)malloc_stats()' >/dev/null 2>&1 || return 0
    tail -n +"$((before + 1))" "$LOG" | awk -v when="$1" '
        /Total \(incl. mmap\)/ { total = 1 }
        total && /system bytes/ { sys = $4 }
        total && /in use bytes/ { use = $5 }
        END { if (sys) printf "heap %s: %d MiB held, %d MiB in use, %d MiB free\n", when, sys / 1048576, use / 1048576, (sys - use) / 1048576 }'
}
sum=0 n=0 HALF=$((END - SECONDS_RUN / 2)) heap_mid=
while [ "$(date +%s)" -lt "$END" ]; do
    sleep 2
    r=$(rss); sum=$((sum + r)); n=$((n + 1))
    if [ $((n % 5)) -eq 0 ]; then echo "soak: $((n * 2)) s: VmRSS $r MiB" >&2; fi
    if [ -z "$heap_mid" ] && [ "$(date +%s)" -ge "$HALF" ]; then heap_mid=$(heap mid-run); fi
done
for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
PIDS=()
sleep 10
hwm=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$PID/status")
echo "peak $hwm MiB, mean $((sum / (n > 0 ? n : 1))) MiB, idle after 10 s $(rss) MiB"
if [ -n "$heap_mid" ]; then echo "$heap_mid"; heap "after 10 s idle"; fi
