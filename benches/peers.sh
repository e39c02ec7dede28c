#!/usr/bin/env bash
# peers.sh: end-to-end benchmark of imgvault against casync, borg and restic (issue 7),
# in one run, on the same four real disk images, printing one table (docs/PERFORMANCE.md,
# "Peers: imgvault vs casync, borg, restic").
#
# Usage: benches/peers.sh [-h]          (as root, from any directory)
#
# Environment (all optional):
#   BENCH_DIR    work directory [/tmp/imgvault-peers]; images are cached in BENCH_DIR/images
#   IMGVAULT     imgvault binary [REPO/target/debug/imgvault, built if missing]; copied into
#                BENCH_DIR/bin first, so a rebuild during the run does not change what is measured
#   FIO_RUNTIME  seconds of the sustained random-read fio run [15]
#   RAND_IOS     reads per fio job in the cold random-read run [2000]
#   RAND_JOBS_WIDE  fio jobs of the second cold random-read run (many readers at once, as a VM's
#                queue or several servers booting) [8]; together they read 2 x RAND_IOS, as
#                the 2-job run does
#   EXTRACT_RUNS extracts per tool, the best counts [2]
#   SEQ_RUNS     sequential mount reads per tool (fresh mount, caches dropped), the best counts [2]
#   SKIP_EXTRAS  1: skip the imgvault-only rows (cold ingest, 16 GiB sparse image) [0]
#
# What it does: builds the image series (benches/make-series.sh); ingests a, b, c, d in order, each
# tool into its own store, the tools taking turns per image (source in page cache: `cat` first),
# recording seconds, store bytes after each image (du -sb) and peak RSS (/usr/bin/time %M);
# extracts image c to a file and cmp's it (best of EXTRACT_RUNS, each after drop_caches with only
# the tool's store re-read into the page cache; imgvault's export also cold); mounts and reads
# image c sequentially (dd 1M, best of SEQ_RUNS) and randomly (fio 4 KiB, 2 jobs; cold also with
# RAND_JOBS_WIDE jobs and the same total of reads), each on a fresh
# mount after drop_caches (imgvault's sequential read also with its store re-read, to compare
# with its export like for like). Extras: each image ingested cold into a store of its own
# series, against a cold `cat` of it; a 16 GiB sparse image. Then the bound of an ideal
# fixed-block store (64 KiB blocks, dedup across the images, zero blocks free, zstd -3), the table.
# Floors in the same run: `zstd -3 -T2` alone on a and d (all their data is new); c's bytes
# written alone (cp --sparse=always; fio, O_DIRECT).
# Needs: casync, borg (borgbackup + python3-pyfuse3 or llfuse), restic, fio, zstd, python3,
# /usr/bin/time (scripts/install-deps.sh --peers).
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
case ${1:-} in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname -- "$0")/.." && pwd)
W=${BENCH_DIR:-/tmp/imgvault-peers}
FIO_RUNTIME=${FIO_RUNTIME:-15}
RAND_IOS=${RAND_IOS:-2000}
RAND_JOBS_WIDE=${RAND_JOBS_WIDE:-8}
EXTRACT_RUNS=${EXTRACT_RUNS:-2}
SEQ_RUNS=${SEQ_RUNS:-2}
SKIP_EXTRAS=${SKIP_EXTRAS:-0}
IMGS=$W/images
RES=$W/results.txt       # "key value" lines, turned into the table at the end
LOG=$W/run.log           # every tool's output
die() { echo "peers: $*" >&2; exit 1; }
log() { echo "peers: $(date +%T) $*" >&2; }

[ "$(id -u)" -eq 0 ] || die "needs root (mounts, drop_caches)"
for t in casync borg restic fio zstd python3 dd cmp du fusermount3 /usr/bin/time; do
    command -v "$t" >/dev/null 2>&1 || die "missing $t (scripts/install-deps.sh --peers)"
done
mkdir -p "$W/bin"
W=$(cd "$W" && pwd)
SRC_BIN=${IMGVAULT:-$REPO/target/debug/imgvault}
if [ ! -x "$SRC_BIN" ]; then
    log "building imgvault"; (cd "$REPO" && cargo build --bin imgvault)
fi
IV=$W/bin/imgvault
cp -f -- "$SRC_BIN" "$IV.tmp" && mv -f -- "$IV.tmp" "$IV"

# Isolated peer state: nothing from ~/.cache or ~/.config is reused between runs.
export BORG_BASE_DIR=$W/borg-home
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export RESTIC_PASSWORD=imgvault-bench RESTIC_CACHE_DIR=$W/restic-cache

IV_STORE=$W/imgvault CA_DIR=$W/casync BORG_REPO_DIR=$W/borg RESTIC_REPO=$W/restic
MNT=$W/mnt OUT=$W/out
RESTIC_PID="" SAMPLER_PID="" MOUNTED=""

# ---- helpers -------------------------------------------------------------------------------
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
put() { echo "$1 $2" >>"$RES"; }
# put_best KEY: KEY.s = the least of the KEY.<run>.s results so far (FAIL when none); a key
# put again (a run whose output proved wrong becomes FAIL) counts with its last value.
put_best() {
    put "$1.s" "$(awk -v k="$1" '$1 ~ "^" k "\\.[0-9]+\\.s$" { v[$1] = $2 }
        END { for (r in v) if (v[r] != "FAIL" && (b == "" || v[r] + 0 < b + 0)) b = v[r]
              print (b == "" ? "FAIL" : b) }' "$RES")"
}
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
load1() { cut -d' ' -f1 /proc/loadavg; }
warm() { find "$@" -type f -exec cat {} + >/dev/null; }   # page-cache a file or a whole store

# timed KEY CMD...: wall seconds -> KEY.s, peak RSS KiB -> KEY.rss; returns CMD's status.
timed() {
    local key=$1; shift
    local t0 t1 rc=0
    echo "== $key: $*" >>"$LOG"
    t0=$(now)
    /usr/bin/time -f %M -o "$W/rss.tmp" "$@" >>"$LOG" 2>&1 || rc=$?
    t1=$(now)
    if [ "$rc" -eq 0 ]; then
        put "$key.s" "$(sub "$t1" "$t0")"
        put "$key.rss" "$(tail -n1 "$W/rss.tmp")"
    else
        put "$key.s" FAIL
        log "FAILED ($rc): $key: $* (see $LOG)"
    fi
    return "$rc"
}

# mount_pid: the pid of the mounted tool's serving process (imgvault and borg detach).
mount_pid() {
    case $MOUNTED in
        imgvault) pgrep -n -f -- "--store $IV_STORE mount $MNT" ;;
        borg) pgrep -n -f -- "borg mount $BORG_REPO_DIR" ;;
        restic) echo "$RESTIC_PID" ;;
    esac
}
MOUNTS=0
unmount_all() {
    # The serving process's peak RSS over this mount's life, before it ends (keys
    # mountrss.TOOL.N; the table shows the largest).
    local pid
    if [ -n "$MOUNTED" ] && pid=$(mount_pid) && [ -n "$pid" ] && [ -r "/proc/$pid/status" ]; then
        MOUNTS=$((MOUNTS + 1))
        put "mountrss.$MOUNTED.$MOUNTS" "$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")"
    fi
    if [ -n "$RESTIC_PID" ] && kill -0 "$RESTIC_PID" 2>/dev/null; then
        kill -INT "$RESTIC_PID" 2>/dev/null || true      # restic unmounts itself on SIGINT
        for _ in $(seq 50); do kill -0 "$RESTIC_PID" 2>/dev/null || break; sleep 0.2; done
    fi
    RESTIC_PID=""
    if mountpoint -q "$MNT" 2>/dev/null; then
        case $MOUNTED in
            imgvault) "$IV" umount "$MNT" >>"$LOG" 2>&1 || true ;;
            borg) borg umount "$MNT" >>"$LOG" 2>&1 || true ;;
        esac
        mountpoint -q "$MNT" 2>/dev/null && { fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true; }
        sleep 0.3
    fi
    MOUNTED=""
}
cleanup() {
    unmount_all
    [ -z "$SAMPLER_PID" ] || kill "$SAMPLER_PID" 2>/dev/null || true
    rm -rf -- "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

T_START=$(now)
rm -f -- "$RES" "$LOG"
# Load average every 5 s for the whole run (the machine is shared: report it next to the table).
( while :; do echo "$(date +%s) $(load1)"; sleep 5; done ) >"$W/load.txt" &
SAMPLER_PID=$!

# ---- 1. the image series ---------------------------------------------------------------------
log "image series (cached in $IMGS)"
bash "$REPO/benches/make-series.sh" "$IMGS"
SERIES=(a b c d)
for i in "${SERIES[@]}"; do
    put "img.$i.size" "$(stat -c %s "$IMGS/$i.img")"
    put "img.$i.alloc" "$(( $(stat -c %b "$IMGS/$i.img") * 512 ))"
done

put cond.date "$(date -u +%FT%TZ)"
put cond.host "$(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
# The binary names the commit its library was built from (build.rs): that, not this checkout's
# HEAD, is what is measured; say so when they differ (a stale or foreign build).
IV_BUILT=$("$IV" --version 2>/dev/null | sed -n 's/.*(commit \(.*\))$/\1/p')
HEAD_NOW=$(cd "$REPO" && git rev-parse --short=7 HEAD 2>/dev/null || echo '?')
put cond.imgvault "${IV_BUILT:-unknown}, binary of $(date -r "$SRC_BIN" +%FT%T)$([ "$IV_BUILT" = "$HEAD_NOW" ] || echo " (checkout at $HEAD_NOW)")"
put cond.casync "$(casync --version 2>&1 | head -n1)"
put cond.borg "$(borg --version 2>&1 | head -n1)"
put cond.restic "$(restic version 2>&1 | head -n1 | cut -d' ' -f1-2)"
put cond.fio "$(fio --version 2>&1)"
put cond.fio_runtime "$FIO_RUNTIME"
put cond.rand_ios "$RAND_IOS"
put cond.rand_jobs_wide "$RAND_JOBS_WIDE"
put cond.load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
put cond.extract_runs "$EXTRACT_RUNS"
put cond.seq_runs "$SEQ_RUNS"

# ---- 2. ingest -------------------------------------------------------------------------------
# ingest TOOL CMD-PREFIX: the image path is appended; per image: warm, time, du.
# Tools take turns per image (a: imgvault casync borg restic, then b: ...), so a change in the
# machine's load during the run falls on every tool alike.
TOOLS=(imgvault casync borg restic)
rm -rf -- "$IV_STORE" "$CA_DIR" "$BORG_REPO_DIR" "$BORG_BASE_DIR" "$RESTIC_REPO" "$RESTIC_CACHE_DIR"
"$IV" --store "$IV_STORE" init >>"$LOG" 2>&1
mkdir -p "$CA_DIR"
borg init --encryption=none "$BORG_REPO_DIR" >>"$LOG" 2>&1
# Repository format 2 (compression, default mode auto); restic always encrypts (AES-256 + Poly1305).
restic init --repository-version 2 -r "$RESTIC_REPO" >>"$LOG" 2>&1

ingest_one() {   # TOOL IMAGE-LETTER
    local tool=$1 i=$2
    warm "$IMGS/$i.img"
    sync    # the previous tool's dirty pages are written back now, not during this ingest
    put "load.ingest.$tool.$i" "$(load1)"
    case $tool in
        imgvault)
            timed "ingest.imgvault.$i" "$IV" --store "$IV_STORE" -q import "$IMGS/$i.img" --name "$i" || true
            put "store.imgvault.$i" "$(du -sb "$IV_STORE" | cut -f1)"
            put "nonzero.$i" "$("$IV" --store "$IV_STORE" --json show "$i" 2>/dev/null |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["nonzero_bytes"])' 2>/dev/null || echo NA)" ;;
        casync)
            timed "ingest.casync.$i" casync make --compression=zstd --store="$CA_DIR/store.castr" \
                "$CA_DIR/$i.caibx" "$IMGS/$i.img" || true
            put "store.casync.$i" "$(du -sb "$CA_DIR" | cut -f1)" ;;  # chunk store + the .caibx indexes
        borg)
            timed "ingest.borg.$i" env -C "$IMGS" borg create --compression zstd,3 \
                "$BORG_REPO_DIR::$i" "$i.img" || true
            put "store.borg.$i" "$(du -sb "$BORG_REPO_DIR" | cut -f1)" ;;
        restic)
            timed "ingest.restic.$i" env -C "$IMGS" restic -r "$RESTIC_REPO" backup -q --tag "$i" "$i.img" || true
            put "store.restic.$i" "$(du -sb "$RESTIC_REPO" | cut -f1)" ;;
    esac
}
# The codec's own time on an image whose data is all new (a: the first; d: unrelated), in the
# same turn and conditions: an importer that compresses that data with zstd -3 on these cores
# cannot be faster (the table's notes set it against the ingest target).
zstd_floor() {   # IMAGE-LETTER
    warm "$IMGS/$1.img"; sync
    timed "floor.zstd.$1" sh -c 'exec zstd -3 -T2 -q -c -- "$1" >/dev/null' sh "$IMGS/$1.img" || true
}
for i in "${SERIES[@]}"; do
    log "ingest $i.img: ${TOOLS[*]}"
    for tool in "${TOOLS[@]}"; do ingest_one "$tool" "$i"; done
    case $i in a|d) zstd_floor "$i" ;; esac
done
restic_id() {   # short snapshot id of the image tagged $1
    restic -r "$RESTIC_REPO" snapshots --json --tag "$1" 2>>"$LOG" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["short_id"])'
}

# warm_tool TOOL: runs the tool once, untimed, so that its program files are in the page cache.
warm_tool() {
    case $1 in
        imgvault) "$IV" --version ;;
        casync) casync --version ;;
        borg) borg --version ;;
        restic) restic version; [ -n "${RESTIC_CACHE_DIR:-}" ] && warm "$RESTIC_CACHE_DIR" ;;
    esac >/dev/null 2>&1 || true
}

# ---- 3. extract image c to a file (store in page cache, output to a fresh directory) ---------
E=c
ORIG=$IMGS/$E.img
# extract TOOL STOREPATH OUTFILE CMD...: best of EXTRACT_RUNS, each into a fresh directory
# with the tool's store (only) in the page cache; every output is cmp'd.
extract() {
    local tool=$1 store=$2 file=$3 run; shift 3
    local verdict=ok
    for run in $(seq "$EXTRACT_RUNS"); do
        rm -rf -- "$OUT"; mkdir -p "$OUT"
        drop; warm "$store"
        # The tool's own program back in the page cache too (borg's Python, restic's binary):
        # only the extract is timed, not loading the tool from a cold disk.
        warm_tool "$tool"
        if timed "extract.$tool.$run" "$@"; then
            if ! cmp -- "$ORIG" "$file" >>"$LOG" 2>&1; then
                # A wrong output counts as a failed run, and the verdict stays DIFFERENT.
                verdict=DIFFERENT; put "extract.$tool.$run.s" FAIL
                log "extract.$tool: output differs from $ORIG"
            fi
        else verdict=FAILED; fi
        rm -rf -- "$OUT"
    done
    put "cmp.$tool" "$verdict"
    put_best "extract.$tool"
}
log "extract $E.img"
put load.extract "$(load1)"
extract imgvault "$IV_STORE" "$OUT/$E.img" "$IV" --store "$IV_STORE" -q export --force "$E" "$OUT/$E.img" || true
# imgvault's export also cold (store not re-read), to compare with its cold mount read like for like.
for run in $(seq "$EXTRACT_RUNS"); do
    rm -rf -- "$OUT"; mkdir -p "$OUT"; drop
    timed "extractcold.imgvault.$run" "$IV" --store "$IV_STORE" -q export --force "$E" "$OUT/$E.img" || true
    rm -rf -- "$OUT"
done
put_best extractcold.imgvault
extract casync "$CA_DIR" "$OUT/$E.img" casync extract --store="$CA_DIR/store.castr" "$CA_DIR/$E.caibx" "$OUT/$E.img" || true
extract borg "$BORG_REPO_DIR" "$OUT/$E.img" env -C "$OUT" borg extract --sparse "$BORG_REPO_DIR::$E" "$E.img" || true
RID_E=$(restic_id "$E")
extract restic "$RESTIC_REPO" "$OUT/$E.img" restic -r "$RESTIC_REPO" restore "$RID_E" --target "$OUT" -q || true
# The write side alone, nothing decoded, same conditions (caches dropped): c's bytes written
# through the page cache as the peers write them (`cp --sparse=always` of c.img, read back into
# memory first), and as many bytes as c holds written with O_DIRECT in 8 MiB writes, one at a
# time, as imgvault's export writes them (fio). The table's notes set them against the line.
C_DATA=$(awk '$1 == "nonzero.c" { print int($2 / 8388608) * 8388608 }' "$RES")
for run in $(seq "$EXTRACT_RUNS"); do
    rm -rf -- "$OUT"; mkdir -p "$OUT"; drop; warm "$ORIG"
    timed "floor.writecache.$run" cp --sparse=always -- "$ORIG" "$OUT/floor.raw" || true
    rm -rf -- "$OUT"; mkdir -p "$OUT"; drop
    if [ "${C_DATA:-0}" -gt 0 ]; then
        timed "floor.writedirect.$run" fio --name=floor --filename="$OUT/floor.raw" --rw=write \
            --bs=8M --direct=1 --ioengine=psync --fallocate=none --size="$C_DATA" || true
    fi
    rm -rf -- "$OUT"
done
put_best floor.writecache
put_best floor.writedirect

# ---- 4. mounts: one fresh mount per measurement ------------------------------------------------
mkdir -p "$MNT"
# mount_tool TOOL: mounts, sets MFILE to image c on the mount.
mount_tool() {
    unmount_all
    MOUNTED=$1
    case $1 in
        imgvault)
            "$IV" --store "$IV_STORE" mount "$MNT" >>"$LOG" 2>&1
            MFILE=$MNT/private/$E.raw ;;
        borg)
            borg mount "$BORG_REPO_DIR::$E" "$MNT" >>"$LOG" 2>&1
            MFILE=$MNT/$E.img ;;
        restic)
            restic -r "$RESTIC_REPO" mount "$MNT" >>"$LOG" 2>&1 &
            RESTIC_PID=$!
            MFILE=$MNT/ids/$RID_E/$E.img ;;
    esac
    local n
    for n in $(seq 300); do [ -f "$MFILE" ] && return 0; sleep 0.2; done
    log "mount $1: $MFILE did not appear"; return 1
}
# mount_seq TOOL [STORE]: best of SEQ_RUNS dd reads of image c, each on a fresh mount after
# drop_caches; with STORE, that store is re-read into the page cache first (key mountseqwarm).
mount_seq() {
    local tool=$1 store=${2:-} key=mountseq t0 t1 run
    [ -n "$store" ] && key=mountseqwarm
    log "mount $tool: sequential read${store:+ (store in page cache)}"
    put "load.$key.$tool" "$(load1)"
    for run in $(seq "$SEQ_RUNS"); do
        if mount_tool "$tool"; then
            drop
            [ -n "$store" ] && warm "$store"
            t0=$(now)
            if dd if="$MFILE" of=/dev/null bs=1M status=none 2>>"$LOG"; then
                t1=$(now); put "$key.$tool.$run.s" "$(sub "$t1" "$t0")"
            fi
            # What the mount serves must be the image (untimed, once per tool).
            if [ "$run" = 1 ] && [ -z "$store" ]; then
                if cmp -- "$ORIG" "$MFILE" >>"$LOG" 2>&1; then put "mountcmp.$tool" ok
                else put "mountcmp.$tool" DIFFERENT; log "mount $tool: $MFILE differs from $ORIG"; fi
            fi
        fi
        unmount_all
    done
    put_best "$key.$tool"
}
# fio_iops ARGS...: random 4 KiB reads of MFILE by 2 jobs (unless ARGS say otherwise); prints
# the IOPS (FAIL on error).
fio_iops() {
    fio --name=rr --filename="$MFILE" --rw=randread --bs=4k --ioengine=psync --numjobs=2 \
        --group_reporting --output-format=json "$@" 2>>"$LOG" |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))' \
        2>>"$LOG" || echo FAIL
}
# mount_rand TOOL: on a fresh mount after drop_caches, first RAND_IOS reads per job (cold: far
# fewer than the image's chunks, so nearly every read misses every cache; key mountrand), then
# on another fresh mount FIO_RUNTIME seconds of reads (key mountrandlong: a fast mount soon
# serves most of them from the page cache it filled, a slow one never gets there).
mount_rand() {
    local tool=$1
    log "mount $tool: random 4 KiB reads"
    put "load.mountrand.$tool" "$(load1)"
    if mount_tool "$tool"; then
        drop
        put "mountrand.$tool.iops" "$(fio_iops --number_ios="$RAND_IOS" --runtime=300)"
    else put "mountrand.$tool.iops" FAIL; fi
    if mount_tool "$tool"; then
        drop
        put "mountrandwide.$tool.iops" "$(fio_iops --numjobs="$RAND_JOBS_WIDE" \
            --number_ios=$((2 * RAND_IOS / RAND_JOBS_WIDE)) --runtime=300)"
    else put "mountrandwide.$tool.iops" FAIL; fi
    if mount_tool "$tool"; then
        drop
        put "mountrandlong.$tool.iops" "$(fio_iops --runtime="$FIO_RUNTIME" --time_based)"
    else put "mountrandlong.$tool.iops" FAIL; fi
    unmount_all
}
for tool in imgvault borg restic; do mount_seq "$tool"; done
mount_seq imgvault "$IV_STORE"   # like for like with the export row (store in page cache)
for tool in imgvault borg restic; do mount_rand "$tool"; done

# ---- 5. imgvault-only rows: cold-cache ingest vs cat, RSS flat in image size -----------------
if [ "$SKIP_EXTRAS" != 1 ]; then
    log "imgvault extras: cold ingest of the series, 16 GiB sparse image"
    # Each image cold into one store (a, then b on a, ...), between two cold cats of it; the
    # faster cat counts (the VM's disk may be cached by its host, so "cold" varies run to run).
    rm -rf -- "$W/iv-cold"; "$IV" --store "$W/iv-cold" init >>"$LOG" 2>&1
    cold_cat() { drop; t0=$(now); cat "$IMGS/$1.img" >/dev/null; t1=$(now); put "cold.cat.$1.$2.s" "$(sub "$t1" "$t0")"; }
    for i in "${SERIES[@]}"; do
        cold_cat "$i" 1
        drop; timed "cold.imgvault.$i" "$IV" --store "$W/iv-cold" -q import "$IMGS/$i.img" --name "$i" || true
        cold_cat "$i" 2
        put_best "cold.cat.$i"
    done
    rm -rf -- "$W/iv-cold"
    # 16 GiB virtual: a.img at 0, d.img at 14 GiB, holes between (cached).
    BIG=$IMGS/big16.img
    if [ ! -s "$BIG" ]; then
        cp --sparse=always -- "$IMGS/a.img" "$BIG.tmp"
        dd if="$IMGS/d.img" of="$BIG.tmp" bs=1M seek=14336 conv=sparse,notrunc status=none
        truncate -s 16G -- "$BIG.tmp"; mv -- "$BIG.tmp" "$BIG"
    fi
    rm -rf -- "$W/iv-16g"; "$IV" --store "$W/iv-16g" init >>"$LOG" 2>&1
    warm "$BIG"
    timed big16.imgvault "$IV" --store "$W/iv-16g" -q import "$BIG" --name big || true
    rm -rf -- "$W/iv-16g"
fi

# ---- 6. bound: ideal fixed-block store with one-stream zstd -3 ----------------------------------
log "ideal fixed-block bound"
python3 - "$IMGS" "${SERIES[@]}" >>"$RES" 2>>"$LOG" <<'PY'
# 64 KiB fixed blocks at fixed offsets, dedup by hash across the images in order, all-zero blocks
# free (holes); the unique blocks of each image compressed as one zstd -3 stream. Metadata (the
# block index) is not counted: this is a lower bound for that design, not a store.
import hashlib, os, subprocess, sys
d, names = sys.argv[1], sys.argv[2:]
B = 65536
zero = bytes(B)
seen = set()
uniq = comp = 0
for n in names:
    path = os.path.join(d, n + ".img")
    tmp = os.path.join(d, ".ideal.zst")
    with open(tmp, "wb") as zf:
        z = subprocess.Popen(["zstd", "-3", "-T2", "-q", "-c"], stdin=subprocess.PIPE, stdout=zf)
        with open(path, "rb", buffering=0) as f:
            while True:
                b = f.read(B)
                if not b:
                    break
                if b == zero[:len(b)]:
                    continue
                h = hashlib.blake2b(b, digest_size=20).digest()
                if h in seen:
                    continue
                seen.add(h)
                uniq += len(b)
                z.stdin.write(b)
        z.stdin.close()
        if z.wait() != 0:
            sys.exit("zstd failed")
    comp += os.path.getsize(tmp)
    os.unlink(tmp)
    print(f"ideal.{n}.unique {uniq}")
    print(f"ideal.{n}.zstd {comp}")
PY

put cond.load_end "$(cut -d' ' -f1-3 /proc/loadavg)"
put cond.runtime_s "$(sub "$(now)" "$T_START")"
kill "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""
put cond.load_run "$(awk '{ s += $2; n++; if (n == 1 || $2 < lo) lo = $2; if ($2 > hi) hi = $2 }
    END { if (n) printf "min %.2f / mean %.2f / max %.2f (%d samples)", lo, s / n, hi, n }' "$W/load.txt")"

# ---- 7. the table ----------------------------------------------------------------------------
python3 - "$RES" <<'PY' | tee "$W/table.md"
import sys
R = {}
for line in open(sys.argv[1]):
    k, _, v = line.rstrip("\n").partition(" ")
    R[k] = v
def num(k):
    try: return float(R[k])
    except (KeyError, ValueError): return None
PEERS = ["casync", "borg", "restic"]
TOOLS = ["imgvault"] + PEERS
MB = 1e6
def fmt(v, kind):
    if v is None: return "-"
    if kind == "s": return f"{v:.2f}"
    if kind == "mb": return f"{v / MB:,.0f}"
    if kind == "iops": return f"{v:,.0f}"
    if kind == "mib": return f"{v / 1024:.0f}"
    if kind == "gbs": return f"{v:.2f}"
    if kind == "x": return f"{v:.2f}x"
    return str(v)
rows = []
# row(label, {tool: value}, kind, better, target text, predicate(iv, best, ratio) or None, bound)
def row(label, vals, kind, better="low", target="", ok=None, bound=None, peers=PEERS):
    iv = vals.get("imgvault")
    pv = {p: vals.get(p) for p in peers if vals.get(p) is not None}
    best = bname = None
    if pv:
        bname = (min if better == "low" else max)(pv, key=pv.get)
        best = pv[bname]
    ratio = iv / best if (iv is not None and best) else None
    met = "-"
    if ok is not None:
        met = "n/a" if iv is None else ("**met**" if ok(iv, best, ratio) else "not met")
    cells = [label] + [fmt(vals.get(t), kind) for t in TOOLS]
    cells += [f"{fmt(best, kind)} ({bname})" if best is not None else "-",
              fmt(ratio, "x") if ratio is not None else "-",
              fmt(bound, kind) if bound is not None else "-", target or "-", met]
    rows.append(cells)
for i in "abcd":
    row(f"ingest {i}.img, s (source in page cache)",
        {t: num(f"ingest.{t}.{i}.s") for t in TOOLS}, "s", "low", "<= 0.25x best peer",
        lambda iv, b, r: r is not None and r <= 0.25)
for i in "abcd":
    last = i == "d"
    row(f"store after {i}, MB (du -sb)", {t: num(f"store.{t}.{i}") for t in TOOLS}, "mb", "low",
        "<= 0.85x smallest peer" if last else "",
        (lambda iv, b, r: r is not None and r <= 0.85) if last else None,
        bound=num(f"ideal.{i}.zstd"))
row("extract c.img to a file, s (store in page cache)", {t: num(f"extract.{t}.s") for t in TOOLS}, "s",
    "low", "<= 0.25x best peer", lambda iv, b, r: r is not None and r <= 0.25)
MP = ["borg", "restic"]
row("mount: sequential read of c.img (dd 1M, cold), s", {t: num(f"mountseq.{t}.s") for t in TOOLS}, "s",
    "low", "<= 0.25x best peer mount", lambda iv, b, r: r is not None and r <= 0.25, peers=MP)
row(f"mount: random 4 KiB reads, cold: first {R.get('cond.rand_ios', '?')} per job (fio, 2 jobs), IOPS",
    {t: num(f"mountrand.{t}.iops") for t in TOOLS},
    "iops", "high", ">= 10,000 and >= 15x best peer mount",
    lambda iv, b, r: iv >= 10000 and r is not None and r >= 15, peers=MP)
row(f"mount: random 4 KiB reads, cold: {R.get('cond.rand_jobs_wide', '?')} jobs, same total of reads, IOPS",
    {t: num(f"mountrandwide.{t}.iops") for t in TOOLS}, "iops", "high", peers=MP)
row(f"mount: random 4 KiB reads for {R.get('cond.fio_runtime', '?')} s (page cache filling), IOPS",
    {t: num(f"mountrandlong.{t}.iops") for t in TOOLS}, "iops", "high", peers=MP)
rss = {t: max([v for v in (num(f"ingest.{t}.{i}.rss") for i in "abcd") if v is not None], default=None)
       for t in TOOLS}
row("peak RSS during ingest (max of a..d), MiB", rss, "mib", "low", "<= 128 MiB",
    lambda iv, b, r: iv <= 128 * 1024)
xrss = {t: max([v for v in (num(f"extract.{t}.{r}.rss") for r in range(1, 10)) if v is not None], default=None)
        for t in TOOLS}
row("peak RSS during extract of c, MiB", xrss, "mib", "low")
mrss = {t: max([num(k) for k in R if k.startswith(f"mountrss.{t}.") and num(k) is not None], default=None)
        for t in TOOLS}
row("peak RSS of the mount's serving process (largest over its mounts), MiB", mrss, "mib", "low",
    peers=MP)
# imgvault-only rows
for i in "bc":
    s, nz = num(f"ingest.imgvault.{i}.s"), num(f"nonzero.{i}")
    rate = nz / s / 1e9 if (s and nz) else None
    row(f"imgvault: derived {i}.img ingest, GB/s of non-zero data", {"imgvault": rate}, "gbs", "high",
        ">= 1 GB/s", lambda iv, b, r: iv >= 1.0)
# Like for like: the mount read and the export with the store in the page cache, and both cold.
for label, mk, ek in [("store in page cache", "mountseqwarm", "extract"), ("both cold", "mountseq", "extractcold")]:
    ms, ex = num(f"{mk}.imgvault.s"), num(f"{ek}.imgvault.s")
    row(f"imgvault: mount sequential read / own export, {label}", {"imgvault": ms / ex if (ms and ex) else None},
        "x", "low", "<= 1.3x", lambda iv, b, r: iv <= 1.3)
for i in "abcd":
    cc, ci = num(f"cold.cat.{i}.s"), num(f"cold.imgvault.{i}.s")
    if cc is None and ci is None:
        continue
    row(f"imgvault: cold-cache ingest of {i}.img / cold `cat` of it ({fmt(cc, 's')} s)",
        {"imgvault": ci / cc if (cc and ci) else None}, "x", "low", "<= 1.15x", lambda iv, b, r: iv <= 1.15)
if num("big16.imgvault.rss") is not None:
    r2, r16 = num("cold.imgvault.a.rss"), num("big16.imgvault.rss")
    row("imgvault: peak RSS, 16 GiB sparse image (a + d), MiB", {"imgvault": r16}, "mib", "low",
        f"<= 128 MiB and <= 1.25x the 2 GiB import ({fmt(r2, 'mib')} MiB)",
        lambda iv, b, r: iv <= 128 * 1024 and (r2 is None or iv <= 1.25 * r2))
hdr = ["metric"] + TOOLS + ["best peer", "imgvault / best peer", "ideal fixed-64K bound", "target", "met?"]
print("| " + " | ".join(hdr) + " |")
print("|" + "|".join("---" if j == 0 else "---:" for j in range(len(hdr) - 2)) + "|---|---|")
for c in rows:
    print("| " + " | ".join(c) + " |")
print()
for i in "abcd":
    print(f"- {i}.img: {num(f'img.{i}.size') / 2**20:,.0f} MiB virtual, {num(f'img.{i}.alloc') / MB:,.0f} MB allocated"
          + (f", {num(f'nonzero.{i}') / MB:,.0f} MB non-zero (imgvault)" if num(f'nonzero.{i}') else ""))
for i in "ad":
    fz = num(f"floor.zstd.{i}.s")
    pv = [v for v in (num(f"ingest.{p}.{i}.s") for p in PEERS) if v is not None]
    if fz is not None and pv:
        line = 0.25 * min(pv)
        print(f"- floor for new data: `zstd -3 -T2` of {i}.img alone took {fz:.2f} s, "
              f"{fz / min(pv):.2f}x the best peer's ingest; the target's line is {line:.2f} s "
              + ("(below the codec's own time: not reachable at zstd -3 on these cores)" if fz > line
                 else "(above the codec's own time)"))
fc, fd = num("floor.writecache.s"), num("floor.writedirect.s")
xp = [v for v in (num(f"extract.{p}.s") for p in PEERS) if v is not None]
if fc is not None and fd is not None and xp:
    print(f"- floor for extract (c's bytes written, nothing decoded): {fc:.2f} s through the page cache "
          f"(`cp --sparse=always`), {fd:.2f} s with O_DIRECT (fio, 8 MiB writes one at a time, as the export writes); "
          f"the target's line is {0.25 * min(xp):.2f} s")
print(f"- ideal bound after d: {num('ideal.d.unique') / MB:,.0f} MB unique 64 KiB blocks -> "
      f"{num('ideal.d.zstd') / MB:,.0f} MB with zstd -3" if num("ideal.d.zstd") else "- ideal bound: failed")
print(f"- extract: best of {R.get('cond.extract_runs', '?')} runs per tool (caches dropped, the tool's store re-read; "
      f"imgvault's cold export: not re-read); mount sequential read: best of {R.get('cond.seq_runs', '?')} fresh "
      f"mounts per tool, caches dropped (imgvault's row \"store in page cache\": its store re-read)")
print("- extract output compared with cmp: " + ", ".join(f"{t} {R.get('cmp.' + t, 'not run')}" for t in TOOLS))
print("- image c read through each mount compared with cmp: " +
      ", ".join(f"{t} {R.get('mountcmp.' + t, 'not run')}" for t in ["imgvault"] + MP))
print("- casync: no mount row (`casync mount` mounts only directory archives (.caidx), not a blob "
      "index of a disk image; `casync mkdev` needs NBD, absent here)")
def meanload(prefix):
    v = [float(x) for k, x in R.items() if k.startswith(prefix)]
    return f"{sum(v) / len(v):.1f}" if v else "?"
print("- mean 1-min load average at the start of each tool's ingests: " +
      ", ".join(f"{t} {meanload('load.ingest.' + t + '.')}" for t in TOOLS) +
      f"; before the extracts {R.get('load.extract', '?')}; before the mount reads (seq / random): " +
      ", ".join(f"{t} {R.get('load.mountseq.' + t, '?')} / {R.get('load.mountrand.' + t, '?')}"
                for t in ["imgvault"] + MP))
print(f"- load average over the run (5 s samples): {R.get('cond.load_run', '?')}; "
      f"start {R.get('cond.load_start', '?')}, end {R.get('cond.load_end', '?')}")
print(f"- {R.get('cond.date')}, {R.get('cond.host')}, run took {num('cond.runtime_s') or 0:.0f} s")
print(f"- imgvault {R.get('cond.imgvault')}; {R.get('cond.casync')}; {R.get('cond.borg')}; "
      f"{R.get('cond.restic')}; {R.get('cond.fio')}")
PY
log "results: $RES, table: $W/table.md, tool output: $LOG"
