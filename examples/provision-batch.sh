#!/usr/bin/env bash
# provision-batch.sh: write one image onto many disks (batch provisioning of servers).
#
# Usage: provision-batch.sh [-j JOBS] [--hw-model MODEL] [--force] [--no-verify] IMAGE TARGET...
#   IMAGE    the image (name, OWNER/NAME or id) every target gets
#   TARGET   block devices or files (files are created if missing)
#   -j JOBS  restores running at once (default 2); restores only read the store, so they
#            run side by side and share the host's page cache of the store
#   --hw-model MODEL, --force  passed to every restore
#   --no-verify  skip the BLAKE3 check of each target afterwards
#
# Each disk is restored with skip-unchanged, so re-provisioning disks that already hold the
# image writes almost nothing. Prints one JSON summary on stdout (one entry per target, with
# its exit code and error); exits 0 when every target succeeded, 1 otherwise.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '4,12s/^# \{0,1\}//p' "$0" >&2; exit 2; }

JOBS=2
OPTS=(--verify)
while [ $# -gt 0 ]; do
    case $1 in
        -j) [ $# -ge 2 ] || usage; JOBS=$2; shift 2 ;;
        --hw-model) [ $# -ge 2 ] || usage; OPTS+=(--hw-model "$2"); shift 2 ;;
        --force) OPTS+=(--force); shift ;;
        --no-verify) OPTS=("${OPTS[@]:1}"); shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) log "unknown option $1"; usage ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || usage
case $JOBS in ''|*[!0-9]*|0) die 2 "-j needs a positive number, got '$JOBS'" ;; esac
IMAGE=$1
shift

# Resolve once, so every target gets the same image even if names change meanwhile.
iv_or_die "looking up image $IMAGE" show "$IMAGE"
ID=$(printf '%s' "$IV_OUT" | json 'd["id"]')

WORK=$(mktemp -d)
trap 'rm -rf -- "$WORK"' EXIT

# One restore; its report, stderr and exit code land in $WORK/N.{json,err,rc}.
provision() {
    local n=$1 target=$2 rc=0
    "$IMGVAULT" --json restore "$ID" "$target" "${OPTS[@]+"${OPTS[@]}"}" \
        >"$WORK/$n.json" 2>"$WORK/$n.err" || rc=$?
    echo "$rc" >"$WORK/$n.rc"
}

N=0
for target in "$@"; do
    N=$((N + 1))
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    log "provisioning $target"
    provision "$N" "$target" &
done
wait

python3 - "$WORK" "$IMAGE" "$ID" "$@" <<'PY'
import json, sys
work, image, image_id, targets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
out, failed = [], 0
for n, target in enumerate(targets, 1):
    rc = int(open(f"{work}/{n}.rc").read().strip() or 1)
    entry = {"target": target, "ok": rc == 0, "exit_code": rc}
    if rc == 0:
        r = json.load(open(f"{work}/{n}.json"))
        entry.update({k: r[k] for k in ("bytes_written", "bytes_skipped", "zero_bytes_written",
                                        "verified")})
        entry["seconds"] = round(r["seconds"], 3)  # as the other scripts' summaries
    else:
        failed += 1
        entry["error"] = open(f"{work}/{n}.err").read().strip()
        print(f"provision-batch.sh: {target}: {entry['error']}", file=sys.stderr)
    out.append(entry)
print(json.dumps({"image": image, "id": image_id, "targets": out,
                  "ok": len(targets) - failed, "failed": failed}))
sys.exit(1 if failed else 0)
PY
