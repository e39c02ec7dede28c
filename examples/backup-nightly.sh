#!/usr/bin/env bash
# backup-nightly.sh: back up a server's disk into imgvault, keep the newest N backups, gc.
#
# Usage: backup-nightly.sh [--keep N] [--hw-model MODEL] SERVER SOURCE
#   SERVER   a name for the server (backups are named SERVER-YYYYmmddTHHMMSSZ)
#   SOURCE   its disk: a block device (/dev/sdX, /dev/nvme0n1, an LVM snapshot, a loop
#            device) or a raw file; only read
#   --keep N keep the newest N backups of SERVER and delete older ones, then gc
#            (default 7; 0 keeps everything). Protected backups are never deleted. The
#            new backup is taken first; when the tenant's quota refuses it, the oldest
#            backups beyond N-1 are deleted first and the backup is tried once more (never
#            the newest: with --keep 1 the quota must leave room for 2).
#   --hw-model MODEL  record the server's hardware model (default: imgvault reads DMI)
#
# Each backup is linked to the previous one (--parent), so `imgvault lineage` shows the chain;
# each costs only the chunks the store does not have yet.
# Environment: IMGVAULT, IMGVAULT_STORE, IMGVAULT_TENANT (see lib.sh); BACKUP_TIME overrides
# the timestamp in the name (YYYYmmddTHHMMSSZ, UTC).
# Prints one JSON summary line on stdout; exits with imgvault's code of the step that failed.
#
# Cron, every night at 02:30 (the store's writer lock makes concurrent runs wait):
#   30 2 * * * root IMGVAULT=/usr/local/bin/imgvault IMGVAULT_STORE=/srv/imgvault /usr/local/lib/imgvault/backup-nightly.sh --keep 14 web-01 /dev/vg0/web-01-snap
# (cron's PATH is /usr/bin:/bin: name the binary, or set PATH.)
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '4,15s/^# \{0,1\}//p' "$0" >&2; exit 2; }

KEEP=7
HW=()
while [ $# -gt 0 ]; do
    case $1 in
        --keep) [ $# -ge 2 ] || usage; KEEP=$2; shift 2 ;;
        --hw-model) [ $# -ge 2 ] || usage; HW=(--hw-model "$2"); shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) log "unknown option $1"; usage ;;
        *) break ;;
    esac
done
[ $# -eq 2 ] || usage
SERVER=$1 SOURCE=$2
case $KEEP in ''|*[!0-9]*) die 2 "--keep needs a number, got '$KEEP'" ;; esac
# Backups are found again (parent, retention) by the name SERVER-<time>: keep both parts plain.
case $SERVER in ''|-*|*/*|*[[:space:]]*) die 2 "SERVER must be a plain name (no spaces or '/', not starting with '-'), got '$SERVER'" ;; esac
[ -e "$SOURCE" ] || die 3 "no such disk: $SOURCE"

STAMP=${BACKUP_TIME:-$(date -u +%Y%m%dT%H%M%SZ)}
[[ $STAMP =~ ^[0-9]{8}T[0-9]{6}Z$ ]] || die 2 "BACKUP_TIME must look like 20250103T023000Z, got '$STAMP'"
NAME="$SERVER-$STAMP"

# 1. The previous backup becomes the parent.
PARENT=()
LATEST=$(latest_backup "$SERVER") || exit $?
if [ -n "$LATEST" ]; then
    PARENT=(--parent "${LATEST%% *}")
    log "previous backup: ${LATEST#* }"
fi

DELETED=()
KEPT=()
# prune LIMIT: delete all but the newest LIMIT backups of SERVER (never protected ones), oldest
# first; records them in DELETED and the others in KEPT.
prune() {
    local limit=$1 all count i=0 id name protected
    KEPT=()
    all=$(backups "$SERVER") || exit $?
    count=$(printf '%s\n' "$all" | awk 'NF' | wc -l)
    while read -r id name protected; do
        [ -n "$id" ] || continue
        i=$((i + 1))
        if [ $((count - i)) -lt "$limit" ]; then
            KEPT+=("$name")
        elif [ "$protected" = yes ]; then
            log "keeping protected backup $name"
            KEPT+=("$name")
        else
            iv_or_die "deleting old backup $name" --wait delete "$id"
            log "deleted old backup $name"
            DELETED+=("$name")
        fi
    done <<<"$all"
}

# 2. The backup. --wait: queue behind another writer instead of failing. Taken before the
# retention, so that a failed backup never leaves fewer than KEEP; when the tenant's quota has
# no room for KEEP + 1 backups, make room down to KEEP - 1 and try once more. The newest
# backup (the parent) is never deleted for room: with --keep 1 that would leave no backup at
# all if the new one then failed.
backup_once() {
    iv --wait backup "$SOURCE" --name "$NAME" "${PARENT[@]}" "${HW[@]}"
}
log "backing up $SOURCE as $NAME"
RC=0
backup_once || RC=$?
QUOTA_FULL=0
if [ "$RC" -eq 4 ] && [[ $IV_ERR == *"quota exceeded"* ]]; then QUOTA_FULL=1; fi
if [ "$QUOTA_FULL" -eq 1 ] && [ "$KEEP" -gt 1 ]; then
    log "the quota has no room for a new backup beside $KEEP: deleting down to $((KEEP - 1)) first"
    prune $((KEEP - 1))
    RC=0
    backup_once || RC=$?
    QUOTA_FULL=0
    if [ "$RC" -eq 4 ] && [[ $IV_ERR == *"quota exceeded"* ]]; then QUOTA_FULL=1; fi
fi
if [ "$RC" -ne 0 ]; then
    if [ -n "$IV_ERR" ]; then printf '%s\n' "$IV_ERR" >&2; fi
    if [ "$QUOTA_FULL" -eq 1 ]; then
        case $KEEP in
            0) why="--keep 0 deletes no backup" ;;
            1) why="the only backup of $SERVER is not deleted before a new one is stored" ;;
            *) why="the newest $((KEEP - 1)) backups of $SERVER are kept" ;;
        esac
        log "the tenant's quota has no room for a new backup ($why): raise it" \
            "(imgvault --tenant admin quota TENANT --max-private N) or delete other private images"
    fi
    die "$RC" "backup of $SOURCE failed (imgvault exit code $RC)"
fi
REPORT=$IV_OUT
ID=$(printf '%s' "$REPORT" | json 'd["image"]["id"]')
NEW=$(printf '%s' "$REPORT" | json 'd["new_stored_bytes"]')
SECS=$(printf '%s' "$REPORT" | json 'round(d["seconds"], 3)')
printf '%s' "$REPORT" | json '"\n".join(d["warnings"])' | while IFS= read -r w; do
    if [ -n "$w" ]; then log "warning: $w"; fi
done
log "stored $NEW new bytes in $SECS s (image $ID)"

# 3. Retention: delete all but the newest KEEP backups (never protected ones).
if [ "$KEEP" -gt 0 ]; then
    prune "$KEEP"
else
    prune 1000000000
fi

# 4. gc frees the chunks only the deleted backups used. gc is the store operator's (admin),
# whichever tenant owns the backups; this script runs as the operator (root's cron).
GC_REMOVED=0
if [ "${#DELETED[@]}" -gt 0 ]; then
    iv_or_die "gc" --tenant admin --wait gc
    GC_REMOVED=$(printf '%s' "$IV_OUT" | json 'd["removed_bytes"]')
    log "gc removed $GC_REMOVED bytes"
fi

python3 -c '
import json, sys
a = sys.argv
print(json.dumps({"server": a[1], "image": a[2], "id": a[3], "parent": a[4] or None,
                  "new_stored_bytes": int(a[5]), "seconds": float(a[6]),
                  "kept": [x for x in a[7].split("\n") if x],
                  "deleted": [x for x in a[8].split("\n") if x],
                  "gc_removed_bytes": int(a[9])}))
' "$SERVER" "$NAME" "$ID" "${LATEST#* }" "$NEW" "$SECS" \
  "$(printf '%s\n' "${KEPT[@]+"${KEPT[@]}"}")" "$(printf '%s\n' "${DELETED[@]+"${DELETED[@]}"}")" "$GC_REMOVED"
