#!/usr/bin/env bash
# Scale benchmark (issue 13): what the index costs the mount and the ingest as a repository grows,
# on synthetic repositories built by the scale simulator (crates/core/examples/scale_sim.rs), on a
# local store and on a local Garage (S3), with restic side by side. docs/benchmarks-scale.md.
#
# Axes (each point is one repository, built once per store and measured once; a repository on
# two axes is built and measured once):
#   chunks  chunk count BENCH_SCALE_SIZES (default 10^4 … 10^BENCH_SCALE_MAX) at the shape
#           BENCH_SCALE_SHAPE (hosts x generations, default 1x5: one host with many chunks)
#   hosts   host count BENCH_SCALE_HOSTS at BENCH_SCALE_HOST_CHUNKS chunks, BENCH_SCALE_HOST_GENS
#           generations each
#   gens    one host with BENCH_SCALE_GENS generations at BENCH_SCALE_GENS_CHUNKS chunks
#
# Per repository and store, after `backtree maintain index` when the command has that
# subcommand (its time is reported; the simulator never compacts):
#   mount_start  seconds from launching `backtree mount` until `ls MNT` shows host0 (polled)
#   ls_gen       first `ls` of a cold generation directory (host H/3, the newest generation)
#   first_read   first `cat` of one file of another cold generation (host 2H/3, generation G/2)
#   reads        BENCH_SCALE_READS reads of random files across hosts and generations (paths
#                through `latest`, `xargs cat`): wall seconds, and the daemon's VmHWM after them
#   mount_index  index bytes the mount fetched, from its stderr line `index: fetched N bytes in K
#                objects (C from the local cache)` at unmount (n/a when the build prints none)
#   ingest       `backtree ingest` of one new 5 kB file into host0 (a new generation of an
#                existing host: the time until an ingest starts reading its source, plus a
#                little): wall, max RSS (/usr/bin/time -v), index bytes fetched (stderr line, as
#                above). Run twice: `ingest` with an empty cache directory, `ingest2` right after
#                with the cache the first one left.
# XDG_CACHE_HOME points to a directory per repository, emptied before the mount and before the
# first ingest, so that no local index cache makes a measurement warm by accident.
#
# restic (BENCH_SCALE_RESTIC=1): BENCH_SCALE_RESTIC_FILES files of 16–64 random bytes (one blob
# each) in one `restic backup --host host0`, then BENCH_SCALE_RESTIC_HOSTS-1 more hosts (`--host
# hostN --parent` host0's snapshot, one changed file each); the same measurements through
# `restic mount` (mount start: until MNT/hosts lists host0; files through hosts/HOST/latest) and
# `restic backup` of one new 5 kB file (with an emptied cache directory, then warm). Local only.
#
# Output in BENCH_DIR: results.tsv (one row per repository and store), results.md (the markdown
# table, also printed at the end), scale-chunks.png and scale-hosts.png (scripts/lib/plot-scale.py,
# matplotlib; python3-matplotlib is installed with apt-get if missing), logs/.
#
# Needs root (FUSE mounts, apt-get; drop_caches with BENCH_SCALE_DROP_CACHES=1). Usage:
#   scripts/bench-scale.sh            (or scripts/bench.sh --scale)
# Environment (defaults in brackets):
#   BENCH_DIR                 work directory, wiped at start             [/tmp/backtree-bench-scale]
#   BENCH_TARGET              cargo target dir for the release build     [/tmp/backtree-bench-target]
#   BENCH_BACKTREE            use this backtree binary, skip its build (the simulator is still
#                             built)                                     []
#   BENCH_SCALE_MAX           largest power of ten of the chunk axis (7 = 10^7: hours and GBs;
#                             run it on an idle machine)                 [6]
#   BENCH_SCALE_SIZES         chunk counts of the chunk axis, overriding BENCH_SCALE_MAX
#                             (e.g. "10000 100000")                      [10^4 … 10^MAX]
#   BENCH_SCALE_SHAPE         HOSTSxGENS of the chunk axis               [1x5]
#   BENCH_SCALE_HOSTS         host counts of the host axis, '' = none    [1 100 1000]
#   BENCH_SCALE_HOST_CHUNKS   chunks of the host axis                    [10^min(6, MAX)]
#   BENCH_SCALE_HOST_GENS     generations per host of the host axis      [5]
#   BENCH_SCALE_GENS          generations of the gens axis (1 host), '' = none [365]
#   BENCH_SCALE_GENS_CHUNKS   chunks of the gens axis                    [BENCH_SCALE_HOST_CHUNKS]
#   BENCH_SCALE_S3            1: Garage too (scripts/garage.sh, one bucket, a prefix per
#                             repository); 0: local store only           [1]
#   BENCH_SCALE_RESTIC        1: restic side by side; 0: skip            [1]
#   BENCH_SCALE_RESTIC_FILES  files (= blobs) of the restic repository   [100000]
#   BENCH_SCALE_RESTIC_HOSTS  hosts of the restic repository             [3]
#   BENCH_SCALE_READS         random reads through a mount               [1000]
#   BENCH_SCALE_DROP_CACHES   1: drop the page cache before each mount and ingest (slows down
#                             everything else on the machine)            [0]
#   BENCH_SCALE_TIMEOUT       seconds before one step is abandoned       [3600]
#   BENCH_SCALE_KEEP          1: keep the repositories (and stop Garage with its data) at exit [0]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The `index: fetched …` lines are backtree's info-level logs; the cache location comes from
# XDG_CACHE_HOME per repository (below), never from the caller's BACKTREE_CACHE_DIR.
export BACKTREE_LOG="error,backtree=info"
unset BACKTREE_CACHE_DIR
BENCH_DIR=${BENCH_DIR:-/tmp/backtree-bench-scale}
BENCH_TARGET=${BENCH_TARGET:-/tmp/backtree-bench-target}
BENCH_BACKTREE=${BENCH_BACKTREE:-}
BENCH_SCALE_MAX=${BENCH_SCALE_MAX:-6}
if [ -z "${BENCH_SCALE_SIZES:-}" ]; then
    BENCH_SCALE_SIZES=
    for ((e = 4; e <= BENCH_SCALE_MAX; e++)); do BENCH_SCALE_SIZES+="$((10 ** e)) "; done
fi
BENCH_SCALE_SHAPE=${BENCH_SCALE_SHAPE:-1x5}
BENCH_SCALE_HOSTS=${BENCH_SCALE_HOSTS-1 100 1000}
BENCH_SCALE_HOST_CHUNKS=${BENCH_SCALE_HOST_CHUNKS:-$((10 ** (BENCH_SCALE_MAX < 6 ? BENCH_SCALE_MAX : 6)))}
BENCH_SCALE_HOST_GENS=${BENCH_SCALE_HOST_GENS:-5}
BENCH_SCALE_GENS=${BENCH_SCALE_GENS-365}
BENCH_SCALE_GENS_CHUNKS=${BENCH_SCALE_GENS_CHUNKS:-$BENCH_SCALE_HOST_CHUNKS}
BENCH_SCALE_S3=${BENCH_SCALE_S3:-1}
BENCH_SCALE_RESTIC=${BENCH_SCALE_RESTIC:-1}
BENCH_SCALE_RESTIC_FILES=${BENCH_SCALE_RESTIC_FILES:-100000}
BENCH_SCALE_RESTIC_HOSTS=${BENCH_SCALE_RESTIC_HOSTS:-3}
BENCH_SCALE_READS=${BENCH_SCALE_READS:-1000}
BENCH_SCALE_DROP_CACHES=${BENCH_SCALE_DROP_CACHES:-0}
BENCH_SCALE_TIMEOUT=${BENCH_SCALE_TIMEOUT:-3600}
BENCH_SCALE_KEEP=${BENCH_SCALE_KEEP:-0}

MNT=$BENCH_DIR/mnt
LOGS=$BENCH_DIR/logs
RESULTS=$BENCH_DIR/results.tsv
BUCKET=backtree-test # the bucket scripts/garage.sh creates
export RESTIC_PASSWORD=backtree-bench-scale # a fixed test password: the repositories are throwaway
COLUMNS_TSV="axes store chunks hosts gens build_s objects bytes index_files index_bytes compact_s mount_start_s ls_gen_s first_read_s reads_s daemon_rss_kb mount_index_bytes ingest_s ingest_rss_kb ingest_index_bytes ingest2_s ingest2_rss_kb ingest2_index_bytes"

SCRIPT_NAME=bench-scale.sh
# Read by common.sh (unused there by this script but expected set).
BENCH_DOC='' BENCH_IMAGE_SRC='' CLK_TCK=$(getconf CLK_TCK)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$ROOT/scripts/lib/common.sh"

DAEMON_PID=
GARAGE_DIR=
HAVE_MAINTAIN=0

# ---------------------------------------------------------------------------------------------
# Prerequisites, build, work directory, cleanup
# ---------------------------------------------------------------------------------------------

prerequisites() {
    need_root "FUSE mounts and apt-get"
    install_missing fusermount3:fuse3 /usr/bin/time:time
    [ "$BENCH_SCALE_RESTIC" = 0 ] || install_missing restic:restic
    # The plots' python: the first with matplotlib (python3 may be another one than Debian's).
    local py
    for py in python3 /usr/bin/python3 ""; do
        [ -n "$py" ] || apt_install python3-matplotlib
        PY=${py:-/usr/bin/python3}
        "$PY" -c 'import matplotlib' 2>/dev/null && break
    done
    "$PY" -c 'import matplotlib' 2>/dev/null || die "no python3 with matplotlib, even after apt-get"
    command -v cargo >/dev/null || die "cargo not found (needed for the simulator)"
}

# build: backtree and the simulator (release, one cargo run so that both share one feature
# resolution and one build of their dependencies), or only the simulator with BENCH_BACKTREE.
build() {
    local pkgs=(-p backtree -p backtree-core --bin backtree)
    if use_prebuilt; then pkgs=(-p backtree-core); fi
    say "building ${pkgs[*]} and the scale simulator (release) into $BENCH_TARGET"
    (cd "$ROOT" && CARGO_TARGET_DIR=$BENCH_TARGET cargo build --release "${pkgs[@]}" --example scale_sim) ||
        die "cargo build failed"
    [ -n "$BENCH_BACKTREE" ] || BT=$BENCH_TARGET/release/backtree
    [ -x "$BT" ] || die "no backtree binary at $BT"
    private_copy
    cp "$BENCH_TARGET/release/examples/scale_sim" "$BENCH_DIR/scale_sim"
    SIM=$BENCH_DIR/scale_sim
    if "$BT" maintain index --help >/dev/null 2>&1; then
        HAVE_MAINTAIN=1
        info "this backtree has \`maintain index\`: every repository is compacted after it is built"
    else
        info "this backtree has no \`maintain index\`: repositories are measured as built"
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_dir "$MNT"
    stop_daemon
    if [ -n "$GARAGE_DIR" ] && [ -f "$GARAGE_DIR/garage.pid" ]; then
        "$ROOT/scripts/garage.sh" stop "$GARAGE_DIR" >>"$LOGS/garage.log" 2>&1 || true
    fi
    if [ "$BENCH_SCALE_KEEP" != 1 ] && [ -d "$BENCH_DIR" ]; then
        rm -rf "$BENCH_DIR/repos" "$BENCH_DIR/restic" "$BENCH_DIR/cache" \
            "$BENCH_DIR"/garage/data "$BENCH_DIR"/garage/meta
    fi
    exit "$rc"
}

prepare_workdir() {
    check_workdir
    unmount_dir "$MNT"
    if [ -f "$BENCH_DIR/garage/garage.pid" ]; then
        "$ROOT/scripts/garage.sh" stop "$BENCH_DIR/garage" >&2 || true
    fi
    rm -rf "$BENCH_DIR"
    mkdir -p "$BENCH_DIR" "$LOGS" "$MNT" "$BENCH_DIR/repos" "$BENCH_DIR/cache"
    touch "$BENCH_DIR/$WORKDIR_MARK"
    echo "$COLUMNS_TSV" | tr ' ' '\t' >"$RESULTS"
}

start_garage() {
    local bin
    bin=$("$ROOT/scripts/garage.sh" install) || die "scripts/garage.sh install failed"
    GARAGE_VERSION=$("$bin" --version 2>/dev/null | head -n1 | awk '{ sub(/^[a-z]*:/, "", $2); print $2 }')
    GARAGE_DIR=$BENCH_DIR/garage
    timeout 120 "$ROOT/scripts/garage.sh" start "$GARAGE_DIR" >>"$LOGS/garage.log" 2>&1 ||
        die "Garage did not start; see $LOGS/garage.log and $GARAGE_DIR/garage.log"
    # shellcheck disable=SC1091 # written by garage.sh
    . "$GARAGE_DIR/env"
    info "Garage $GARAGE_VERSION at $AWS_ENDPOINT_URL (pid $(cat "$GARAGE_DIR/garage.pid"))"
}

# ---------------------------------------------------------------------------------------------
# Measuring helpers
# ---------------------------------------------------------------------------------------------

maybe_drop_caches() { [ "$BENCH_SCALE_DROP_CACHES" != 1 ] || drop_caches; }

# index_bytes LOG: N of the last "index: fetched N bytes" line in LOG, else n/a.
index_bytes() {
    local n
    n=$(grep -oE 'index: fetched [0-9]+ bytes' "$1" 2>/dev/null | tail -n1 | awk '{ print $3 }') || true
    echo "${n:-n/a}"
}

# gen_name G H: the simulator's name of generation G of host H (one a day from 2026-01-01
# 02:00 UTC, hosts 7 s apart).
gen_name() { date -u -d "2026-01-01 02:00:00 UTC + $1 days + $((7 * $2)) seconds" +%Y-%m-%dT%H%M%SZ; }

# wait_listing DIR NAME PID: polls `ls DIR` every 10 ms until it lists NAME; fails if PID exits
# or after BENCH_SCALE_TIMEOUT seconds.
wait_listing() {
    local out deadline=$((SECONDS + BENCH_SCALE_TIMEOUT))
    while :; do
        out=$(ls "$1" 2>/dev/null) || true
        [[ $'\n'$out$'\n' != *$'\n'$2$'\n'* ]] || return 0
        kill -0 "$3" 2>/dev/null || return 1
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.01
    done
}

# timed CMD...: runs CMD (output to /dev/null), prints its wall seconds; fails as CMD fails.
timed() {
    local t0 t1
    t0=$(now)
    "$@" >/dev/null
    t1=$(now)
    elapsed "$t0" "$t1"
}

# random_paths N HOSTS GENS FILES PATH_FORMAT: N paths, PATH_FORMAT (printf) filled with a host,
# a generation and a file index, uniformly at random (fixed seed: the same paths every run).
random_paths() {
    awk -v n="$1" -v h="$2" -v g="$3" -v f="$4" -v fmt="$5" 'BEGIN {
        srand(13)
        for (k = 0; k < n; k++) printf fmt "\n", int(rand() * h), int(rand() * g), int(rand() * f)
    }'
}

# mount_session KIND REPO LOGNAME HOSTS GENS FILES: mounts (KIND backtree or restic), measures,
# unmounts; sets M_START M_LS M_READ M_READS M_RSS M_INDEX.
mount_session() {
    local kind=$1 repo=$2 log=$LOGS/$3.mount.log hosts=$4 gens=$5 files=$6
    local ha=$((hosts / 3)) hb=$((2 * hosts / 3)) gb=$((gens / 2)) ls_dir read_file fmt t0 t1
    maybe_drop_caches
    t0=$(now)
    if [ "$kind" = backtree ]; then
        "$BT" mount --repo "$repo" "$MNT" >"$log" 2>&1 &
        DAEMON_PID=$!
        wait_listing "$MNT" host0 "$DAEMON_PID" || die "the mount of $repo did not show host0; see $log"
        t1=$(now)
        ls_dir=$MNT/host$ha/$(gen_name $((gens - 1)) "$ha")
        read_file=$MNT/host$hb/$(gen_name "$gb" "$hb")/$(printf 'd%04d/f00000' "$gb")
        fmt="$MNT/host%d/latest/d%04d/f%05d"
    else
        restic -r "$repo" mount --no-default-permissions "$MNT" >"$log" 2>&1 &
        DAEMON_PID=$!
        wait_listing "$MNT" hosts "$DAEMON_PID" || die "restic mount did not come up; see $log"
        wait_listing "$MNT/hosts" host0 "$DAEMON_PID" || die "restic mount shows no host0; see $log"
        t1=$(now)
        ls_dir=$MNT/hosts/host$ha/latest$RESTIC_SRC
        read_file=$MNT/hosts/host$hb/latest$RESTIC_SRC/$(printf 'd%04d/f%05d' "$gb" 0)
        fmt="$MNT/hosts/host%d/latest$RESTIC_SRC/d%04d/f%05d"
    fi
    M_START=$(elapsed "$t0" "$t1")
    M_LS=$(timed ls "$ls_dir") || die "ls $ls_dir failed; see $log"
    M_READ=$(timed cat "$read_file") || die "cat $read_file failed; see $log"
    random_paths "$BENCH_SCALE_READS" "$hosts" "$gens" "$files" "$fmt" >"$BENCH_DIR/paths"
    M_READS=$(timed xargs -d '\n' -n 100 cat <"$BENCH_DIR/paths") || die "random reads failed; see $log"
    M_RSS=$(awk '/^VmHWM/ { print $2 }' "/proc/$DAEMON_PID/status") || die "the mount daemon died; see $log"
    fusermount3 -u "$MNT" || unmount_dir "$MNT"
    local _
    for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    stop_daemon
    wait 2>/dev/null || true
    M_INDEX=$(index_bytes "$log")
    info "mount: start ${M_START}s, ls ${M_LS}s, first read ${M_READ}s," \
        "$BENCH_SCALE_READS reads ${M_READS}s, VmHWM ${M_RSS} kB, index bytes $M_INDEX"
}

# ingest_once KIND REPO LOGNAME: one ingest of a new 5 kB file into host0; sets I_WALL I_RSS
# I_INDEX.
ingest_once() {
    local kind=$1 repo=$2 log=$LOGS/$3 src=$BENCH_DIR/new-src t0 t1
    rm -rf "$src"
    mkdir -p "$src"
    head -c 5000 /dev/urandom >"$src/new.bin"
    maybe_drop_caches
    t0=$(now)
    if [ "$kind" = backtree ]; then
        timeout "$BENCH_SCALE_TIMEOUT" /usr/bin/time -v -o "$log.time" \
            "$BT" ingest --repo "$repo" --host host0 "$src" >"$log.out" 2>"$log.err" ||
            die "backtree ingest into $repo failed; see $log.err"
    else
        timeout "$BENCH_SCALE_TIMEOUT" /usr/bin/time -v -o "$log.time" \
            restic -r "$repo" backup --host host0 "$src" >"$log.out" 2>"$log.err" ||
            die "restic backup into $repo failed; see $log.err"
    fi
    t1=$(now)
    I_WALL=$(elapsed "$t0" "$t1")
    I_RSS=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$log.time")
    I_INDEX=$(index_bytes "$log.err")
    info "ingest: ${I_WALL}s, max RSS ${I_RSS} kB, index bytes $I_INDEX"
}

# ---------------------------------------------------------------------------------------------
# backtree repositories
# ---------------------------------------------------------------------------------------------

# measure_backtree AXES STORE CHUNKS HOSTS GENS: builds the repository with the simulator,
# compacts it when possible, measures, appends a row to RESULTS, then deletes it.
measure_backtree() {
    local axes=$1 store=$2 chunks=$3 hosts=$4 gens=$5 key repo t0 t1 build compact=n/a line
    key=c$chunks-h$hosts-g$gens
    if [ "$store" = s3 ]; then repo=s3://$BUCKET/scale-$key; else repo=$BENCH_DIR/repos/$key; fi
    say "$store: $chunks chunks, $hosts hosts x $gens generations ($axes axis) in $repo"
    [ "$chunks" -ge $((hosts * gens)) ] || die "$chunks chunks are fewer than $hosts x $gens ingests"
    t0=$(now)
    timeout "$BENCH_SCALE_TIMEOUT" "$SIM" --repo "$repo" --chunks "$chunks" --hosts "$hosts" \
        --gens "$gens" >"$LOGS/$store-$key.sim.log" 2>&1 ||
        die "the simulator failed; see $LOGS/$store-$key.sim.log"
    t1=$(now)
    build=$(elapsed "$t0" "$t1")
    # "done: C chunks, I ingests; O objects, B bytes (...); F index files, X index bytes; S s"
    line=$(grep '^done:' "$LOGS/$store-$key.sim.log")
    read -r objects bytes index_files index_bytes < <(echo "$line" |
        sed -E 's/.*; ([0-9]+) objects, ([0-9]+) bytes .*; ([0-9]+) index files, ([0-9]+) index bytes.*/\1 \2 \3 \4/')
    info "built in ${build}s: $objects objects, $bytes bytes, $index_files index files, $index_bytes index bytes"
    if [ "$HAVE_MAINTAIN" = 1 ]; then
        t0=$(now)
        timeout "$BENCH_SCALE_TIMEOUT" "$BT" maintain index --repo "$repo" \
            >"$LOGS/$store-$key.maintain.log" 2>&1 ||
            die "backtree maintain index failed; see $LOGS/$store-$key.maintain.log"
        t1=$(now)
        compact=$(elapsed "$t0" "$t1")
        info "compacted in ${compact}s"
    fi

    local per=$((chunks / (hosts * gens) / 8))
    [ "$per" -ge 1 ] || per=1
    export XDG_CACHE_HOME=$BENCH_DIR/cache/$store-$key
    rm -rf "$XDG_CACHE_HOME"
    mount_session backtree "$repo" "$store-$key" "$hosts" "$gens" "$per"
    rm -rf "$XDG_CACHE_HOME"
    ingest_once backtree "$repo" "$store-$key.ingest1"
    local w1=$I_WALL r1=$I_RSS x1=$I_INDEX
    ingest_once backtree "$repo" "$store-$key.ingest2"
    unset XDG_CACHE_HOME
    printf '%s\n' "$axes" "$store" "$chunks" "$hosts" "$gens" "$build" "$objects" "$bytes" \
        "$index_files" "$index_bytes" "$compact" "$M_START" "$M_LS" "$M_READ" "$M_READS" "$M_RSS" \
        "$M_INDEX" "$w1" "$r1" "$x1" "$I_WALL" "$I_RSS" "$I_INDEX" | paste -sd '\t' >>"$RESULTS"
    if [ "$BENCH_SCALE_KEEP" != 1 ] && [ "$store" = local ]; then rm -rf "$repo"; fi
}

# ---------------------------------------------------------------------------------------------
# restic
# ---------------------------------------------------------------------------------------------

measure_restic() {
    local n=$BENCH_SCALE_RESTIC_FILES hosts=$BENCH_SCALE_RESTIC_HOSTS dir=$BENCH_DIR/restic
    local repo=$dir/repo t0 t1 build parent h objects bytes index_files index_bytes
    say "restic: $n files of 16-64 random bytes, $hosts hosts"
    RESTIC_SRC=$dir/src
    export RESTIC_CACHE_DIR=$dir/cache
    mkdir -p "$RESTIC_SRC"
    # Files d<GGGG>/f<NNNNN>, 1 000 per directory, like the simulator's d<gen>/f<i>.
    python3 - "$RESTIC_SRC" "$n" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(13)
for i in range(n):
    d = os.path.join(root, "d%04d" % (i // 1000))
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%05d" % (i % 1000)), "wb") as f:
        f.write(rnd.randbytes(rnd.randint(16, 64)))
EOF
    restic init -r "$repo" >"$LOGS/restic.init.log" 2>&1 || die "restic init failed; see $LOGS/restic.init.log"
    t0=$(now)
    timeout "$BENCH_SCALE_TIMEOUT" restic -r "$repo" backup --host host0 "$RESTIC_SRC" \
        >"$LOGS/restic.build.log" 2>&1 || die "restic backup failed; see $LOGS/restic.build.log"
    parent=$(restic -r "$repo" snapshots --json --host host0 | python3 -c 'import json, sys; print(json.load(sys.stdin)[-1]["id"])')
    for ((h = 1; h < hosts; h++)); do
        echo "host$h" >"$RESTIC_SRC/d0000/f00000"
        timeout "$BENCH_SCALE_TIMEOUT" restic -r "$repo" backup --host "host$h" --parent "$parent" \
            "$RESTIC_SRC" >>"$LOGS/restic.build.log" 2>&1 || die "restic backup failed; see $LOGS/restic.build.log"
    done
    t1=$(now)
    build=$(elapsed "$t0" "$t1")
    objects=$(find "$repo" -type f | wc -l)
    bytes=$(du -sb "$repo" | awk '{ print $1 }')
    index_files=$(find "$repo/index" -type f | wc -l)
    index_bytes=$(du -sb "$repo/index" | awk '{ print $1 }')
    info "built in ${build}s: $objects objects, $bytes bytes, $index_files index files"
    # The read paths: d<G>/f<N> with G < n / 1000 (as "generations") and N < 1000.
    local dirs=$((n >= 1000 ? n / 1000 : 1)) files=$((n < 1000 ? n : 1000))
    mount_session restic "$repo" restic "$hosts" "$dirs" "$files"
    rm -rf "$RESTIC_CACHE_DIR"
    ingest_once restic "$repo" restic.backup1
    local w1=$I_WALL r1=$I_RSS x1=$I_INDEX
    ingest_once restic "$repo" restic.backup2
    unset RESTIC_CACHE_DIR
    printf '%s\n' restic restic "$n" "$hosts" 1 "$build" "$objects" "$bytes" "$index_files" \
        "$index_bytes" n/a "$M_START" "$M_LS" "$M_READ" "$M_READS" "$M_RSS" "$M_INDEX" "$w1" "$r1" \
        "$x1" "$I_WALL" "$I_RSS" "$I_INDEX" | paste -sd '\t' >>"$RESULTS"
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

report_md() {
    echo "## Scale benchmark ($(source_rev))"
    echo
    machine_lines
    echo "- backtree: $BT ($("$BT" --version 2>/dev/null || echo '?'))$([ "$HAVE_MAINTAIN" = 1 ] && echo ", compacted with \`maintain index\`")"
    [ "$BENCH_SCALE_S3" = 0 ] || echo "- Garage ${GARAGE_VERSION:-?} (scripts/garage.sh, one node on loopback, sqlite metadata), a prefix per repository"
    [ "$BENCH_SCALE_RESTIC" = 0 ] || echo "- $(restic version | head -n1)"
    echo "- Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); page cache dropped before each mount and ingest: $([ "$BENCH_SCALE_DROP_CACHES" = 1 ] && echo yes || echo no)"
    echo
    echo "Times in seconds, RSS in MB (1 000 kB), single runs. mount = until \`ls MNT\` shows the"
    echo "hosts; ls = first \`ls\` of a cold generation; read = first read of a file of another cold"
    echo "generation; reads = $BENCH_SCALE_READS random reads (wall); RSS = daemon VmHWM after them;"
    echo "ingest = one new 5 kB file into an existing host, cold cache (ingest 2: right after, warm);"
    echo "index B = index bytes fetched, from the \`index: fetched N bytes\` line (n/a: not printed)."
    echo
    awk -F'\t' '
        function mb(kb) { return kb ~ /^[0-9]+$/ ? sprintf("%.1f", kb / 1000) : kb }
        function pow(n) { return n ~ /^10000+$/ ? "10^" (length(n) - 1) : n }
        NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i
            print "| axes | store | chunks | hosts × gens | build | index files / MB | compact | mount | ls | read | reads | RSS | index B (mount) | ingest | ingest RSS | index B | ingest 2 | ingest 2 RSS | index B 2 |"
            print "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            next }
        { printf "| %s | %s | %s | %s × %s | %s | %s / %.1f | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
            $c["axes"], $c["store"], pow($c["chunks"]), $c["hosts"], $c["gens"], $c["build_s"],
            $c["index_files"], $c["index_bytes"] / 1e6,
            $c["compact_s"], $c["mount_start_s"], $c["ls_gen_s"], $c["first_read_s"], $c["reads_s"],
            mb($c["daemon_rss_kb"]), $c["mount_index_bytes"], $c["ingest_s"], mb($c["ingest_rss_kb"]),
            $c["ingest_index_bytes"], $c["ingest2_s"], mb($c["ingest2_rss_kb"]), $c["ingest2_index_bytes"] }
    ' "$RESULTS"
    echo
    echo "Plots: scale-chunks.png, scale-hosts.png in $BENCH_DIR (scripts/lib/plot-scale.py)."
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

main() {
    prerequisites
    prepare_workdir
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    build
    local stores=local
    if [ "$BENCH_SCALE_S3" != 0 ]; then
        start_garage
        stores="local s3"
    fi

    # The points: "CHUNKS HOSTS GENS AXIS" lines, merged by repository shape.
    local c h g shape_h=${BENCH_SCALE_SHAPE%x*} shape_g=${BENCH_SCALE_SHAPE#*x}
    {
        for c in $BENCH_SCALE_SIZES; do echo "$c $shape_h $shape_g chunks"; done
        for h in $BENCH_SCALE_HOSTS; do echo "$BENCH_SCALE_HOST_CHUNKS $h $BENCH_SCALE_HOST_GENS hosts"; done
        for g in $BENCH_SCALE_GENS; do echo "$BENCH_SCALE_GENS_CHUNKS 1 $g gens"; done
    } | awk '{ k = $1 " " $2 " " $3; if (!(k in a)) o[n++] = k; a[k] = a[k] (a[k] ? "," : "") $4 }
             END { for (i = 0; i < n; i++) print o[i], a[o[i]] }' >"$BENCH_DIR/points"
    info "points (chunks hosts gens axes):"
    sed 's/^/      /' "$BENCH_DIR/points" >&2

    local store axes
    while read -r c h g axes; do
        for store in $stores; do
            measure_backtree "$axes" "$store" "$c" "$h" "$g" </dev/null
        done
    done <"$BENCH_DIR/points"
    if [ "$BENCH_SCALE_RESTIC" != 0 ]; then measure_restic </dev/null; fi

    say "plots"
    "$PY" "$ROOT/scripts/lib/plot-scale.py" "$RESULTS" "$BENCH_DIR" >&2 || die "plotting failed"
    report_md >"$BENCH_DIR/results.md"
    say "results ($RESULTS, $BENCH_DIR/results.md)"
    cat "$BENCH_DIR/results.md"
}

main "$@"
