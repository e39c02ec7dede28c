# lib.sh: helpers shared by the imgvault example scripts. Sourced, not run.
#
# Environment:
#   IMGVAULT          the imgvault binary (default: imgvault on PATH)
#   IMGVAULT_STORE    the store (read by imgvault itself)
#   IMGVAULT_TENANT   the tenant (read by imgvault itself; default admin)
#
# Every imgvault call goes through `iv`, which adds --json, keeps stdout (the JSON report) in
# $IV_OUT and stderr in $IV_ERR, and returns imgvault's exit code: 0 ok, 2 usage, 3 not found,
# 4 refused (permissions, quota, unsafe target, incompatible hardware), 5 store busy,
# 6 damaged data, 7 out of space, 130 interrupted. JSON is parsed with python3.

IMGVAULT=${IMGVAULT:-imgvault}
TENANT=${IMGVAULT_TENANT:-admin}
PROG=$(basename -- "$0")

log() { echo "$PROG: $*" >&2; }

# die CODE MESSAGE...: log and exit with CODE.
die() {
    local code=$1
    shift
    log "error: $*"
    exit "$code"
}

# iv ARGS...: imgvault --json ARGS; sets IV_OUT, IV_ERR, returns the exit code.
iv() {
    local errf rc=0
    errf=$(mktemp)
    IV_OUT=$("$IMGVAULT" --json "$@" 2>"$errf") || rc=$?
    IV_ERR=$(cat -- "$errf")
    rm -f -- "$errf"
    return "$rc"
}

# iv_or_die WHAT ARGS...: iv ARGS, and on failure log imgvault's error and exit with its code.
iv_or_die() {
    local what=$1 rc=0
    shift
    iv "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        if [ -n "$IV_ERR" ]; then printf '%s\n' "$IV_ERR" >&2; fi
        die "$rc" "$what failed (imgvault exit code $rc)"
    fi
}

# json EXPR: reads JSON on stdin as `d`, prints the Python expression EXPR (JSON for lists
# and dicts, the plain value otherwise, nothing for None).
json() {
    python3 -c '
import json, sys
d = json.load(sys.stdin)
r = eval(sys.argv[1], {"json": json}, {"d": d})
if isinstance(r, (dict, list)):
    print(json.dumps(r))
elif isinstance(r, bool):
    print("true" if r else "false")
elif r is not None:
    print(r)
' "$1"
}

# backups SERVER: the tenant's backups of SERVER (images named SERVER-YYYYmmddTHHMMSSZ made by
# `imgvault backup`), oldest first, one "ID NAME PROTECTED" line each.
backups() {
    iv_or_die "listing images" list
    printf '%s' "$IV_OUT" | python3 -c '
import json, re, sys
server, tenant = sys.argv[1], sys.argv[2]
pat = re.compile(re.escape(server) + r"-\d{8}T\d{6}Z")
mine = [i for i in json.load(sys.stdin)
        if i["owner"] == tenant and pat.fullmatch(i["name"]) and i["source"]["kind"] == "backup"]
for i in sorted(mine, key=lambda i: (i["created"], i["name"])):
    print(i["id"], i["name"], "yes" if i["protected"] else "no")
' "$1" "$TENANT"
}

# latest_backup SERVER: "ID NAME" of the newest backup of SERVER, or nothing.
latest_backup() {
    local out
    out=$(backups "$1") || exit $?
    printf '%s\n' "$out" | awk 'NF { last = $1 " " $2 } END { if (last != "") print last }'
}
