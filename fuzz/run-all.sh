#!/usr/bin/env bash
# Runs every fuzz target in turn for SECONDS each (default 600) at the lowest CPU
# priority, with the seeds from make-seeds.sh; logs and final stats in fuzz/target/logs/.
# Needs cargo-fuzz; on a stable toolchain it runs with RUSTC_BOOTSTRAP=1. Built with -O -a:
# optimised, with debug assertions and overflow checks as in the dev profile imgvault ships.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
secs=${1:-600}
shift || true
targets=${*:-qcow2 vmdk vhd vhdx codec probe}
cd "$here"
[ -d corpus/qcow2 ] || ./make-seeds.sh >/dev/null
mkdir -p target/logs
export RUSTC_BOOTSTRAP=1
nice -n 19 cargo fuzz build -O -a >/dev/null 2>&1 || { echo "cargo fuzz build failed"; exit 1; }
for t in $targets; do
  echo "== $t: $secs s" >&2
  nice -n 19 cargo fuzz run -O -a "$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
    >"target/logs/$t.log" 2>&1
  echo "$t exit $?: $(grep -E '^stat::number_of_executed_units' "target/logs/$t.log" | awk '{print $2}') execs, $(grep -E '^stat::average_exec_per_sec' "target/logs/$t.log" | awk '{print $2}')/s, $(grep -cE 'ERROR|crash-|panicked' "target/logs/$t.log") crash lines" | tee -a target/logs/summary.txt
done
