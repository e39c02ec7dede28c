#!/usr/bin/env bash
# restore-latest.sh: restore a server's disk from its newest backup.
#
# Usage: restore-latest.sh [--no-verify] [--force] [--discard] [--hw-model MODEL] SERVER TARGET
#   SERVER   the server name used by backup-nightly.sh (backups SERVER-YYYYmmddTHHMMSSZ)
#   TARGET   the disk to restore onto: a block device, or a file (created if missing)
#   --no-verify   skip re-reading the target and checking the image's BLAKE3 afterwards
#   --force       restore even onto a mounted/held target or another hardware model
#   --discard     discard zero ranges of a device instead of writing zeros
#   --hw-model MODEL  the target server's hardware model, checked against the backup's
#
# Only the extents that differ are written, so restoring onto the server's own disk (or
# re-running after an interruption) is quick. Refusals (target too small, mounted, wrong
# hardware model) leave the target untouched and exit 4.
# Prints one JSON summary line on stdout; exits 3 when SERVER has no backup, else with
# imgvault's exit code.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '4,11s/^# \{0,1\}//p' "$0" >&2; exit 2; }

VERIFY=(--verify)
OPTS=()
while [ $# -gt 0 ]; do
    case $1 in
        --no-verify) VERIFY=(); shift ;;
        --force|--discard) OPTS+=("$1"); shift ;;
        --hw-model) [ $# -ge 2 ] || usage; OPTS+=(--hw-model "$2"); shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) log "unknown option $1"; usage ;;
        *) break ;;
    esac
done
[ $# -eq 2 ] || usage
SERVER=$1 TARGET=$2
OPTS+=("${VERIFY[@]+"${VERIFY[@]}"}")

LATEST=$(latest_backup "$SERVER") || exit $?
[ -n "$LATEST" ] || die 3 "no backup of server '$SERVER' for tenant '$TENANT'"
ID=${LATEST%% *} NAME=${LATEST#* }
log "restoring $NAME onto $TARGET"

iv_or_die "restore of $NAME onto $TARGET" restore "$ID" "$TARGET" "${OPTS[@]+"${OPTS[@]}"}"
printf '%s' "$IV_OUT" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(json.dumps({"server": sys.argv[1], "image": sys.argv[2], "id": sys.argv[3],
                  "target": r["target"], "bytes_compared": r["bytes_compared"],
                  "bytes_written": r["bytes_written"], "bytes_skipped": r["bytes_skipped"],
                  "zero_bytes_written": r["zero_bytes_written"],
                  "verified": r["verified"], "seconds": round(r["seconds"], 2)}))
' "$SERVER" "$NAME" "$ID"
log "done: $(printf '%s' "$IV_OUT" | json '"wrote %d of %d compared bytes%s" % (d["bytes_written"], d["bytes_compared"], ", verified" if d["verified"] else "")')"
