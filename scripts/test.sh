#!/usr/bin/env bash
# test.sh: what CI runs (.ci/run execs this): install deps, build all targets, run the tests,
# compile the benches. Usage: sudo bash scripts/test.sh   (from any directory)
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: sudo bash scripts/test.sh"; exit 0
fi

ROOT=$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH=$PATH:/usr/sbin:/sbin        # mkfs.ext4, sfdisk, debugfs for the disk-image tests
# A fresh clone builds once: incremental caches only cost time and disk there.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
# CI builds in a fresh clone: keep the build (RocksDB's C++ is ~95% of it) in a cache outside
# the clone, so a machine that built it before reuses it; a new machine builds it once.
if [ "${CI:-}" = true ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
    export CARGO_TARGET_DIR=/var/cache/imgvault/target
    mkdir -p "$CARGO_TARGET_DIR"
fi

T0=$SECONDS
CURRENT=""
report() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ -n "$CURRENT" ]; then
        echo "test.sh: FAILED at step '$CURRENT' (exit $rc) after $((SECONDS - T0)) s" >&2
    fi
}
trap report EXIT
# Run one step and print how long it took.
step() {
    CURRENT=$1; shift
    local t=$SECONDS
    echo "==== $CURRENT: $*"
    "$@"
    echo "==== $CURRENT: done in $((SECONDS - t)) s"
    CURRENT=""
}

step install-deps bash scripts/install-deps.sh
# install-deps ran in a child shell: put rustup's cargo on this shell's PATH too.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "test.sh: cargo not found" >&2; exit 1; }

# The suite needs ~2.5 GB of scratch at its peak (converted disk images, stores, exports).
# A full disk shows up as ENOSPC deep inside one test, so say it up front.
free_mb=$(df -Pm "${TMPDIR:-/tmp}" | awk 'NR == 2 { print $4 }')
echo "test.sh: ${free_mb} MB free under ${TMPDIR:-/tmp}"
if [ "${free_mb:-0}" -lt 4096 ]; then
    echo "test.sh: WARNING: under 4 GB free under ${TMPDIR:-/tmp}; tests that write disk images may fail with 'No space left on device'" >&2
fi

step shell-syntax bash -c 'for f in scripts/*.sh benches/*.sh tests/fixtures/*.sh .ci/run; do bash -n "$f" || exit 1; done'
step build cargo build --all-targets
step test cargo test -- --test-threads=2
if compgen -G "benches/*.rs" >/dev/null; then
    step bench-build cargo bench --no-run --profile dev
else
    echo "==== bench-build: skipped (no benches/*.rs)"
fi
echo "test.sh: all steps passed in $((SECONDS - T0)) s"
