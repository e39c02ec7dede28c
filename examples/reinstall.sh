#!/usr/bin/env bash
# reinstall.sh: reinstall a server from a public image (its disk becomes the image).
#
# Usage: reinstall.sh [--backup-first SERVER] [--hw-model MODEL] [--force] IMAGE TARGET
#   IMAGE    a public image (name, OWNER/NAME or id), e.g. debian-12
#   TARGET   the server's disk: a block device, or a file
#   --backup-first SERVER  back up the current disk first (as SERVER-<time>, linked to
#            SERVER's previous backup), so the reinstall can be undone with restore-latest.sh
#   --hw-model MODEL  the server's hardware model, checked against the image's
#   --force  reinstall even onto a mounted/held target or another hardware model
#
# The image must be public: reinstalling from a backup is restore-latest.sh. Blocks that
# already hold the image's bytes are not rewritten; the result is verified (BLAKE3).
# Prints one JSON summary line on stdout; exits 4 if IMAGE is not public, else with
# imgvault's exit code of the failing step.
set -euo pipefail
HERE=$(dirname -- "${BASH_SOURCE[0]}")
. "$HERE/lib.sh"

usage() { sed -n '4,11s/^# \{0,1\}//p' "$0" >&2; exit 2; }

BACKUP_SERVER=""
OPTS=()
HW=()
while [ $# -gt 0 ]; do
    case $1 in
        --backup-first) [ $# -ge 2 ] || usage; BACKUP_SERVER=$2; shift 2 ;;
        --hw-model) [ $# -ge 2 ] || usage; OPTS+=(--hw-model "$2"); HW=(--hw-model "$2"); shift 2 ;;
        --force) OPTS+=(--force); shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) log "unknown option $1"; usage ;;
        *) break ;;
    esac
done
[ $# -eq 2 ] || usage
IMAGE=$1 TARGET=$2

iv_or_die "looking up image $IMAGE" show "$IMAGE"
VIS=$(printf '%s' "$IV_OUT" | json 'd["visibility"]')
ID=$(printf '%s' "$IV_OUT" | json 'd["id"]')
LABEL=$(printf '%s' "$IV_OUT" | json 'd["owner"] + "/" + d["name"]')
[ "$VIS" = public ] || die 4 "$LABEL is $VIS, not public: reinstall uses public images (restore a backup with restore-latest.sh)"

BACKUP=null
if [ -n "$BACKUP_SERVER" ]; then
    [ -e "$TARGET" ] || die 3 "--backup-first: no disk at $TARGET to back up"
    log "backing up the current disk of $BACKUP_SERVER first"
    OUT=$("$HERE/backup-nightly.sh" --keep 0 "${HW[@]+"${HW[@]}"}" "$BACKUP_SERVER" "$TARGET") || exit $?
    BACKUP=$(printf '%s' "$OUT" | json 'json.dumps(d["image"])')
fi

log "reinstalling $TARGET from $LABEL"
iv_or_die "reinstall of $TARGET from $LABEL" restore "$ID" "$TARGET" --verify "${OPTS[@]+"${OPTS[@]}"}"
printf '%s' "$IV_OUT" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(json.dumps({"image": sys.argv[1], "id": sys.argv[2], "target": r["target"],
                  "backup_first": json.loads(sys.argv[3]),
                  "bytes_written": r["bytes_written"], "bytes_skipped": r["bytes_skipped"],
                  "zero_bytes_written": r["zero_bytes_written"],
                  "verified": r["verified"], "seconds": round(r["seconds"], 2)}))
' "$LABEL" "$ID" "$BACKUP"
