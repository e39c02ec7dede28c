#!/usr/bin/env bash
# store-knobs.sh: what the store-level knobs (`init --zstd-level`, `--chunk-avg`) buy and cost on
# the peer series (benches/make-series.sh): store bytes after images a..d, ingest seconds, and the
# export time of c, one store per setting, in one run (docs/PERFORMANCE.md, "Store size").
#
# Usage: benches/store-knobs.sh [SETTING...]     (as root: the series reads /root/.rustup)
#   SETTING  LEVEL/AVG_KIB, e.g. 3/64 (the defaults) 6/64 9/64 3/256 6/256 [default: those five]
# Environment: BENCH_DIR [/tmp/imgvault-peers] (images cached in BENCH_DIR/images),
#   IMGVAULT [REPO/target/debug/imgvault].
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0
fi
REPO=$(cd "$(dirname -- "$0")/.." && pwd)
W=${BENCH_DIR:-/tmp/imgvault-peers}
IV=${IMGVAULT:-$REPO/target/debug/imgvault}
[ -x "$IV" ] || (cd "$REPO" && cargo build --bin imgvault)
SETTINGS=("$@")
[ ${#SETTINGS[@]} -gt 0 ] || SETTINGS=(3/64 6/64 9/64 3/256 6/256)
bash "$REPO/benches/make-series.sh" "$W/images" >&2
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

echo "| zstd level | chunk avg / min / max KiB | ingest a b c d, s | store after d, MB | export c, s |"
echo "|---:|---|---|---:|---:|"
for setting in "${SETTINGS[@]}"; do
    level=${setting%/*} avg=$(( ${setting#*/} * 1024 ))
    S=$W/knobs-store
    rm -rf -- "$S"
    "$IV" --store "$S" init --zstd-level "$level" --chunk-avg "$avg" \
        --chunk-min $(( avg / 4 )) --chunk-max $(( avg * 4 )) >/dev/null
    times=()
    for i in a b c d; do
        cat "$W/images/$i.img" >/dev/null; sync
        t0=$(now)
        "$IV" --store "$S" -q import "$W/images/$i.img" --name "$i" >/dev/null
        times+=("$(secs "$t0" "$(now)")")
    done
    size=$(du -sb "$S" | cut -f1)
    rm -f -- "$W/knobs-c.img"; sync
    t0=$(now)
    "$IV" --store "$S" -q export --force c "$W/knobs-c.img" >/dev/null
    ex=$(secs "$t0" "$(now)")
    cmp -s "$W/knobs-c.img" "$W/images/c.img" || { echo "store-knobs: export of c differs ($setting)" >&2; exit 1; }
    rm -f -- "$W/knobs-c.img"
    echo "| $level | $(( avg / 1024 )) / $(( avg / 4096 )) / $(( avg * 4 / 1024 )) | ${times[*]} | $(( size / 1000000 )) | $ex |"
    rm -rf -- "$S"
done
echo
echo "$(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), imgvault $(cd "$REPO" && git rev-parse --short HEAD)"
