#!/usr/bin/env bash
# Prune benchmark (issue 14): `backtree prune` against `restic prune` on the same data in the same
# run (time, CPU, peak RSS, bytes read), then backtree alone on simulated repositories of 10^5 and
# 10^6 chunks over 1 and 100 hosts (peak RSS per chunk), and whether an ingest waits for a prune.
# docs/benchmarks-maintenance.md.
#
# Parts (BENCH_PRUNE_PARTS):
#   real  both tools. N files of ~1 KiB random bytes (BENCH_PRUNE_FILE_SIZE ± 25%; one chunk in
#         backtree, one blob in restic), 1 000 per directory, for every N in BENCH_PRUNE_SIZES.
#         BENCH_PRUNE_GENS generations: the first backs up all files, each later one first
#         replaces BENCH_PRUNE_CHANGE % of them (new random content; a different slice each
#         time), one generation a day: `backtree ingest --host h --time T` and `restic backup
#         --host h --time T`. Then both forget all but the newest BENCH_PRUNE_KEEP (`forget
#         --keep-last K`, restic without --prune) and prune, page cache dropped first:
#           backtree prune --repack-threshold 50   (BACKTREE_PRUNE_GRACE=0; the index settle time stays at its default)
#           restic prune --max-unused 0
#         Afterwards (not timed) `backtree cat` and `restic dump` of a kept file are compared
#         with the source.
#   sim   backtree only: the scale simulator (crates/core/examples/scale_sim.rs) builds C chunks
#         over H hosts x BENCH_PRUNE_SIM_GENS generations, each generation's root holding only
#         its own new directory (`--window 1`: a host's files are replaced every day, so old
#         generations own their chunks), for every C in BENCH_PRUNE_SIM_SIZES and H in
#         BENCH_PRUNE_SIM_HOSTS; `backtree forget --keep-last BENCH_PRUNE_KEEP` (every host), then
#         the prune as above. Same chunk count over 1 and 100 hosts: the peak RSS must not grow
#         with the hosts.
#   conc  does an ingest wait for a prune? On a copy of the largest real backtree repository
#         (after the forget, before the prune): a probe ingest (BENCH_PRUNE_PROBE new 1 KiB
#         files, host `probe`) without any prune (3 times, the median counts); then
#           lease: an ingest on --stdin from a FIFO holds a writer lease, the prune runs up to
#                  its wait for that lease ("waiting for 1 running ingests"), the probe ingest
#                  runs then, then the FIFO is closed (the held ingest commits, the prune ends);
#           mark:  on a second copy the probe ingest starts as soon as the prune prints
#                  "marking N generations" (both compete for the 2 cores).
#         The probe ingest's wall time in each case, and the prune's own time.
#
# Measured per prune: wall seconds (including a final sync), CPU seconds, peak RSS
# (/usr/bin/time %M), and three byte counts of reads: "own" (backtree's `bytes_read` from
# `--json`: manifests, trees, index and repacked packs fetched from the store; n/a for restic),
# "rchar" and "disk" (the process tree's /proc/PID/io rchar and read_bytes, collected by a
# wrapper shell after the tool exited: every read() call, including restic's and backtree's
# local caches, and what reached the disk after the page cache was dropped). Repository size
# (du -sb) before and after.
#
# Output in BENCH_DIR: results.tsv, sim.tsv, conc.tsv, results.md (also printed), logs/. With
# BENCH_DOC set, results.md replaces the section between `<!-- bench:prune:begin -->` and
# `<!-- bench:prune:end -->` of BENCH_DOC (BENCH_SECTION names another section).
#
# Needs root (drop_caches, apt-get). Usage: scripts/bench-prune.sh (or scripts/bench.sh --prune)
# Environment (defaults in brackets):
#   BENCH_DIR              work directory, wiped at start           [/tmp/backtree-bench-prune]
#   BENCH_TARGET           cargo target dir for the release build   [/tmp/backtree-bench-target]
#   BENCH_BACKTREE         use this backtree binary, skip its build (the simulator is still
#                          built)                                   []
#   BENCH_PRUNE_PARTS      parts to run                             [real sim conc]
#   BENCH_PRUNE_SIZES      file counts of the real part             [100000]
#   BENCH_PRUNE_FILE_SIZE  mean file size, bytes                    [1024]
#   BENCH_PRUNE_GENS       generations of the real part             [5]
#   BENCH_PRUNE_CHANGE     percent of the files replaced per generation [20]
#   BENCH_PRUNE_KEEP       generations kept (forget --keep-last)    [2]
#   BENCH_PRUNE_TOOLS      tools of the real part                   [backtree restic]
#   BENCH_PRUNE_SIM_SIZES  chunk counts of the simulated part       [100000 1000000]
#   BENCH_PRUNE_SIM_HOSTS  host counts of the simulated part        [1 100]
#   BENCH_PRUNE_SIM_GENS   generations per host, simulated          [5]
#   BENCH_PRUNE_PROBE      files of the probe ingest (conc)         [2000]
#   BENCH_PRUNE_REPACK     backtree --repack-threshold              [50]
#   BENCH_PRUNE_DROP_CACHES 1: drop the page cache before each prune [1]
#   BENCH_PRUNE_TIMEOUT    seconds before one step is abandoned     [3600]
#   BENCH_DOC              markdown file to update, '' for none     [docs/benchmarks-maintenance.md]
#   BENCH_SECTION          the section of BENCH_DOC to rewrite (markers `<!-- bench:SECTION:begin
#                          -->` and `…:end -->`)                    [prune]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
unset BACKTREE_CACHE_DIR
BENCH_DIR=${BENCH_DIR:-/tmp/backtree-bench-prune}
BENCH_TARGET=${BENCH_TARGET:-/tmp/backtree-bench-target}
BENCH_BACKTREE=${BENCH_BACKTREE:-}
BENCH_PRUNE_PARTS=${BENCH_PRUNE_PARTS:-real sim conc}
BENCH_PRUNE_SIZES=${BENCH_PRUNE_SIZES:-100000}
BENCH_PRUNE_FILE_SIZE=${BENCH_PRUNE_FILE_SIZE:-1024}
BENCH_PRUNE_GENS=${BENCH_PRUNE_GENS:-5}
BENCH_PRUNE_CHANGE=${BENCH_PRUNE_CHANGE:-20}
BENCH_PRUNE_KEEP=${BENCH_PRUNE_KEEP:-2}
BENCH_PRUNE_TOOLS=${BENCH_PRUNE_TOOLS:-backtree restic}
BENCH_PRUNE_SIM_SIZES=${BENCH_PRUNE_SIM_SIZES:-100000 1000000}
BENCH_PRUNE_SIM_HOSTS=${BENCH_PRUNE_SIM_HOSTS:-1 100}
BENCH_PRUNE_SIM_GENS=${BENCH_PRUNE_SIM_GENS:-5}
BENCH_PRUNE_PROBE=${BENCH_PRUNE_PROBE:-2000}
BENCH_PRUNE_REPACK=${BENCH_PRUNE_REPACK:-50}
BENCH_PRUNE_DROP_CACHES=${BENCH_PRUNE_DROP_CACHES:-1}
BENCH_PRUNE_TIMEOUT=${BENCH_PRUNE_TIMEOUT:-3600}
BENCH_DOC=${BENCH_DOC-$ROOT/docs/benchmarks-maintenance.md}
BENCH_SECTION=${BENCH_SECTION:-prune}

LOGS=$BENCH_DIR/logs
RESULTS=$BENCH_DIR/results.tsv
SIMRES=$BENCH_DIR/sim.tsv
CONCRES=$BENCH_DIR/conc.tsv
export RESTIC_PASSWORD=backtree-bench-prune # a fixed test password: the repositories are throwaway
export BACKTREE_PRUNE_GRACE=0
unset BACKTREE_INDEX_SETTLE
# The prune's phase lines ("prune: marking …") are info-level logs when stderr is no terminal.
export BACKTREE_LOG="error,backtree=info"

SCRIPT_NAME=bench-prune.sh
BENCH_IMAGE_SRC='' CLK_TCK=$(getconf CLK_TCK)
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$ROOT/scripts/lib/common.sh"

HOLD_PID='' PRUNE_PID='' LOAD_START=''

# ---------------------------------------------------------------------------------------------
# Prerequisites, build, work directory
# ---------------------------------------------------------------------------------------------

prerequisites() {
    need_root "drop_caches and apt-get"
    install_missing restic:restic /usr/bin/time:time jq:jq python3:python3
    command -v cargo >/dev/null || die "cargo not found (needed for the simulator)"
}

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
    "$BT" prune --help >/dev/null 2>&1 || die "$BT has no prune command"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$PRUNE_PID"
    stop_pid "$HOLD_PID"
    exec 7>&- 2>/dev/null || true
    exit "$rc"
}

prepare_workdir() {
    check_workdir
    rm -rf "$BENCH_DIR"
    mkdir -p "$BENCH_DIR" "$LOGS" "$BENCH_DIR/repos"
    touch "$BENCH_DIR/$WORKDIR_MARK"
    printf 'files\tchunks\ttool\twall\tcpu\trss_kb\town_read\trchar\tdisk_read\trepo_before\trepo_after\trc\n' >"$RESULTS"
    printf 'chunks\thosts\tgens\tbuild_s\tgenerations_left\treferenced\tindex_entries\tdeleted_packs\trepacked\tfreed\tbytes_before\twall\tcpu\trss_kb\town_read\tmemory_est\trc\n' >"$SIMRES"
    printf 'case\tprobe_s\tprune_s\twaited_s\n' >"$CONCRES"
}

# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

maybe_drop_caches() { [ "$BENCH_PRUNE_DROP_CACHES" != 1 ] || drop_caches; }

# measure LOG -- COMMAND...: runs COMMAND (stdout to LOG.out, stderr to LOG.err) under
# /usr/bin/time inside a wrapper shell that saves its own /proc/PID/io afterwards (a reaped
# child's I/O counts are added to its parent's); then sync. Sets M_WALL M_CPU M_RSS M_RCHAR
# M_DISK M_RC.
measure() {
    local log=$1 t0 t1 user sys
    shift 2
    maybe_drop_caches
    # The program itself back into the page cache: disk reads are then the repository's.
    cat "$(command -v "$1")" >/dev/null
    t0=$(now)
    M_RC=0
    timeout "$BENCH_PRUNE_TIMEOUT" bash -c '/usr/bin/time -o "$1.time" -f "%U %S %M" "${@:2}"; rc=$?
        cat /proc/$$/io >"$1.io"; exit $rc' measure "$log" "$@" >"$log.out" 2>"$log.err" || M_RC=$?
    sync
    t1=$(now)
    M_WALL=$(elapsed "$t0" "$t1")
    read -r user sys M_RSS < <(grep -E '^[0-9.]+ [0-9.]+ [0-9]+$' "$log.time" | tail -n1)
    M_CPU=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    M_RCHAR=$(awk '/^rchar:/ { print $2 }' "$log.io")
    M_DISK=$(awk '/^read_bytes:/ { print $2 }' "$log.io")
    [ "$M_RC" -eq 0 ] || info "FAILED (exit $M_RC): $(tail -n3 "$log.err" | tr '\n' ' ')"
    info "${M_WALL}s wall, ${M_CPU}s CPU, $((M_RSS / 1024)) MiB RSS, rchar $M_RCHAR, disk $M_DISK"
}

# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------

# make_files DIR N FIRST COUNT SEED: writes files FIRST … FIRST+COUNT-1 (of N, modulo N) of DIR
# (d<i/1000>/f<i%1000>), random bytes, BENCH_PRUNE_FILE_SIZE ± 25%.
make_files() {
    python3 - "$@" "$BENCH_PRUNE_FILE_SIZE" <<'EOF'
import os, random, sys
root, n, first, count, seed, size = sys.argv[1], *map(int, sys.argv[2:])
rnd = random.Random(seed)
lo, hi = size * 3 // 4, size * 5 // 4
for k in range(count):
    i = (first + k) % n
    d = os.path.join(root, "d%04d" % (i // 1000))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%03d" % (i % 1000)), "wb") as f:
        f.write(rnd.randbytes(rnd.randint(lo, hi)))
EOF
}

gen_time() { date -u -d "2026-01-01 02:00:00 UTC + $1 days" +%Y-%m-%dT%H:%M:%SZ; } # G

run_real() { # N
    local n=$1 src=$BENCH_DIR/src-$1 g t change tool bt rs chunks
    bt=$BENCH_DIR/repos/real-$n-backtree
    rs=$BENCH_DIR/repos/real-$n-restic
    change=$((n * BENCH_PRUNE_CHANGE / 100))
    say "real data: $n files of ~$BENCH_PRUNE_FILE_SIZE B, $BENCH_PRUNE_GENS generations, $BENCH_PRUNE_CHANGE% replaced each"
    rm -rf "$src"
    export XDG_CACHE_HOME=$BENCH_DIR/cache/real-$n RESTIC_CACHE_DIR=$BENCH_DIR/cache/real-$n/restic
    "$BT" init --repo "$bt" >/dev/null
    restic init -r "$rs" >"$LOGS/real-$n-restic.init.log" 2>&1 || die "restic init failed"
    for ((g = 0; g < BENCH_PRUNE_GENS; g++)); do
        local t0 t1
        t0=$(now)
        if [ "$g" -eq 0 ]; then make_files "$src" "$n" 0 "$n" 1; else make_files "$src" "$n" $(((g - 1) * change)) "$change" $((g + 1)); fi
        t1=$(now)
        t=$(gen_time "$g")
        info "generation $g ($t): files written in $(elapsed "$t0" "$t1")s"
        for tool in $BENCH_PRUNE_TOOLS; do
            t0=$(now)
            case $tool in
                backtree)
                    timeout "$BENCH_PRUNE_TIMEOUT" "$BT" ingest --repo "$bt" --host h --time "$t" "$src" \
                        >>"$LOGS/real-$n-backtree.ingest.log" 2>&1 || die "backtree ingest failed; see $LOGS/real-$n-backtree.ingest.log" ;;
                restic)
                    timeout "$BENCH_PRUNE_TIMEOUT" restic -r "$rs" backup --quiet --host h \
                        --time "$(date -u -d "$t" '+%Y-%m-%d %H:%M:%S')" "$src" \
                        >>"$LOGS/real-$n-restic.backup.log" 2>&1 || die "restic backup failed; see $LOGS/real-$n-restic.backup.log" ;;
            esac
            t1=$(now)
            info "  $tool: $(elapsed "$t0" "$t1")s"
        done
    done
    for tool in $BENCH_PRUNE_TOOLS; do
        case $tool in
            backtree) "$BT" forget --repo "$bt" --keep-last "$BENCH_PRUNE_KEEP" >"$LOGS/real-$n-backtree.forget.log" 2>&1 ;;
            restic) restic -r "$rs" forget --host h --keep-last "$BENCH_PRUNE_KEEP" >"$LOGS/real-$n-restic.forget.log" 2>&1 ;;
        esac || die "$tool forget failed"
    done
    if [[ " $BENCH_PRUNE_PARTS " == *" conc "* ]] && [[ " $BENCH_PRUNE_TOOLS " == *" backtree "* ]]; then
        rm -rf "$BENCH_DIR/repos/conc-lease" "$BENCH_DIR/repos/conc-mark"
        cp -a "$bt" "$BENCH_DIR/repos/conc-lease"
        cp -a "$bt" "$BENCH_DIR/repos/conc-mark"
        CONC_N=$n
    fi
    for tool in $BENCH_PRUNE_TOOLS; do
        local repo before after own=n/a
        if [ "$tool" = backtree ]; then repo=$bt; else repo=$rs; fi
        before=$(du -sb "$repo" | cut -f1)
        say "$n files: $tool prune"
        if [ "$tool" = backtree ]; then
            measure "$LOGS/real-$n-backtree.prune" -- "$BT" prune --repo "$bt" --json --repack-threshold "$BENCH_PRUNE_REPACK"
            own=$(jq -r .bytes_read "$LOGS/real-$n-backtree.prune.out" 2>/dev/null || echo n/a)
            chunks=$(jq -r .index_entries "$LOGS/real-$n-backtree.prune.out" 2>/dev/null || echo n/a)
        else
            measure "$LOGS/real-$n-restic.prune" -- restic -r "$rs" prune --max-unused 0
        fi
        after=$(du -sb "$repo" | cut -f1)
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "${chunks:-n/a}" "$tool" "$M_WALL" "$M_CPU" \
            "$M_RSS" "$own" "$M_RCHAR" "$M_DISK" "$before" "$after" "$M_RC" >>"$RESULTS"
    done
    # Sanity (not timed): a file of the newest generation, changed in it, read back after the prune.
    local f rel
    rel=$(printf 'd%04d/f%03d' $((((BENCH_PRUNE_GENS - 2) * change % n) / 1000)) $((((BENCH_PRUNE_GENS - 2) * change % n) % 1000)))
    f=$src/$rel
    for tool in $BENCH_PRUNE_TOOLS; do
        case $tool in
            backtree) "$BT" cat --repo "$bt" "h/latest/$rel" >"$BENCH_DIR/check" 2>>"$LOGS/check.log" ;;
            restic) restic -r "$rs" dump latest "$src/$rel" >"$BENCH_DIR/check" 2>>"$LOGS/check.log" ;;
        esac || die "$tool could not read $rel back after the prune; see $LOGS/check.log"
        cmp -s "$f" "$BENCH_DIR/check" || die "$tool: $rel differs from the source after the prune"
        info "$tool: $rel read back after the prune, identical"
    done
    unset XDG_CACHE_HOME RESTIC_CACHE_DIR
    rm -rf "$src"
}

# ---------------------------------------------------------------------------------------------
# Simulated repositories
# ---------------------------------------------------------------------------------------------

run_sim() { # CHUNKS HOSTS
    local c=$1 h=$2 g=$BENCH_PRUNE_SIM_GENS key repo t0 t1 build before j
    key=sim-c$c-h$h
    repo=$BENCH_DIR/repos/$key
    say "simulated: $c chunks, $h hosts x $g generations (--window 1)"
    t0=$(now)
    timeout "$BENCH_PRUNE_TIMEOUT" "$SIM" --repo "$repo" --chunks "$c" --hosts "$h" --gens "$g" --window 1 \
        >"$LOGS/$key.sim.log" 2>&1 || die "the simulator failed; see $LOGS/$key.sim.log"
    t1=$(now)
    build=$(elapsed "$t0" "$t1")
    info "built in ${build}s: $(grep '^done:' "$LOGS/$key.sim.log")"
    export XDG_CACHE_HOME=$BENCH_DIR/cache/$key
    "$BT" forget --repo "$repo" --keep-last "$BENCH_PRUNE_KEEP" --json >"$LOGS/$key.forget.log" 2>&1 ||
        die "backtree forget failed; see $LOGS/$key.forget.log"
    before=$(du -sb "$repo" | cut -f1)
    measure "$LOGS/$key.prune" -- "$BT" prune --repo "$repo" --json --repack-threshold "$BENCH_PRUNE_REPACK"
    j=$LOGS/$key.prune.out
    printf '%s\n' "$c" "$h" "$g" "$build" "$(jq -r .generations "$j")" "$(jq -r .referenced "$j")" \
        "$(jq -r .index_entries "$j")" "$(jq -r .deleted_packs "$j")" "$(jq -r .plan.totals.repack "$j")" \
        "$(jq -r '.deleted_bytes' "$j")" "$before" "$M_WALL" "$M_CPU" "$M_RSS" "$(jq -r .bytes_read "$j")" \
        "$(jq -r .memory "$j")" "$M_RC" | paste -sd '\t' >>"$SIMRES"
    unset XDG_CACHE_HOME
    rm -rf "$repo" "$BENCH_DIR/cache/$key"
}

# ---------------------------------------------------------------------------------------------
# Does an ingest wait for a prune?
# ---------------------------------------------------------------------------------------------

# probe REPO NAME: ingests BENCH_PRUNE_PROBE new files as host `probe`; prints its wall seconds.
probe() {
    local dir=$BENCH_DIR/probe-$2 t0 t1
    rm -rf "$dir"
    make_files "$dir" "$BENCH_PRUNE_PROBE" 0 "$BENCH_PRUNE_PROBE" "$RANDOM"
    t0=$(now)
    "$BT" ingest --repo "$1" --host probe "$dir" >"$LOGS/probe-$2.log" 2>&1 || die "probe ingest failed; see $LOGS/probe-$2.log"
    t1=$(now)
    rm -rf "$dir"
    elapsed "$t0" "$t1"
}

# wait_line FILE PATTERN PID: polls FILE every 10 ms until a line matches PATTERN; fails if PID
# exits first.
wait_line() {
    local deadline=$((SECONDS + BENCH_PRUNE_TIMEOUT))
    until grep -qE "$2" "$1" 2>/dev/null; do
        kill -0 "$3" 2>/dev/null || return 1
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.01
    done
}

run_conc() {
    [ -n "${CONC_N:-}" ] || { info "conc: no real backtree repository; skipped"; return 0; }
    local lease=$BENCH_DIR/repos/conc-lease mark=$BENCH_DIR/repos/conc-mark base=() p t0 t1 prune_s
    export XDG_CACHE_HOME=$BENCH_DIR/cache/conc
    say "ingest during a prune ($CONC_N-file repository, probe of $BENCH_PRUNE_PROBE files)"
    for i in 1 2 3; do base+=("$(probe "$mark" base$i)"); done
    p=$(printf '%s\n' "${base[@]}" | sort -n | sed -n 2p)
    info "probe without prune: ${base[*]} s (median $p)"
    printf 'none\t%s\tn/a\tn/a\n' "$p" >>"$CONCRES"

    # lease: a held ingest, the prune waiting for it, the probe meanwhile.
    rm -f "$BENCH_DIR/fifo"
    mkfifo "$BENCH_DIR/fifo"
    "$BT" ingest --repo "$lease" --host holder --stdin held <"$BENCH_DIR/fifo" >"$LOGS/conc-holder.log" 2>&1 &
    HOLD_PID=$!
    exec 7>"$BENCH_DIR/fifo"
    printf 'held\n' >&7
    # The writer lease is stored when the ingest starts.
    local _
    for _ in $(seq 500); do [ -z "$(ls "$lease/leases" 2>/dev/null)" ] || break; sleep 0.01; done
    [ -n "$(ls "$lease/leases" 2>/dev/null)" ] || die "the held ingest stored no lease"
    t0=$(now)
    # (7>&-: no child but this shell may hold the FIFO open, or the held ingest never ends.)
    "$BT" prune --repo "$lease" --json >"$LOGS/conc-lease.prune.out" 2>"$LOGS/conc-lease.prune.err" 7>&- &
    PRUNE_PID=$!
    wait_line "$LOGS/conc-lease.prune.err" 'waiting for [0-9]+ running ingests' "$PRUNE_PID" ||
        die "the prune did not wait for the held ingest; see $LOGS/conc-lease.prune.err"
    p=$(probe "$lease" lease 7>&-)
    info "probe while the prune waits for a lease: ${p}s"
    exec 7>&-
    wait "$HOLD_PID" || die "the held ingest failed; see $LOGS/conc-holder.log"
    HOLD_PID=
    wait "$PRUNE_PID" || die "the prune failed; see $LOGS/conc-lease.prune.err"
    PRUNE_PID=
    t1=$(now)
    prune_s=$(elapsed "$t0" "$t1")
    info "prune ${prune_s}s, waited $(jq -r .waited_secs "$LOGS/conc-lease.prune.out")s, re-checked $(jq -r .new_generations "$LOGS/conc-lease.prune.out") new generations"
    printf 'lease\t%s\t%s\t%s\n' "$p" "$prune_s" "$(jq -r .waited_secs "$LOGS/conc-lease.prune.out")" >>"$CONCRES"
    "$BT" cat --repo "$lease" holder/latest/held | grep -qx held || die "the held ingest's generation is unreadable after the prune"

    # mark: the probe starts as the prune starts marking.
    maybe_drop_caches
    t0=$(now)
    "$BT" prune --repo "$mark" --json >"$LOGS/conc-mark.prune.out" 2>"$LOGS/conc-mark.prune.err" &
    PRUNE_PID=$!
    wait_line "$LOGS/conc-mark.prune.err" 'prune: marking [0-9]+ generations' "$PRUNE_PID" ||
        die "the prune did not start marking; see $LOGS/conc-mark.prune.err"
    p=$(probe "$mark" mark)
    local during=sweep
    kill -0 "$PRUNE_PID" 2>/dev/null || during=after
    wait "$PRUNE_PID" || die "the prune failed; see $LOGS/conc-mark.prune.err"
    PRUNE_PID=
    t1=$(now)
    prune_s=$(elapsed "$t0" "$t1")
    info "probe started as the prune started marking: ${p}s (the prune was still running when it ended: $([ "$during" = after ] && echo no || echo yes)); prune ${prune_s}s"
    printf 'mark\t%s\t%s\t%s\n' "$p" "$prune_s" "$(jq -r .waited_secs "$LOGS/conc-mark.prune.out")" >>"$CONCRES"
    unset XDG_CACHE_HOME
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

report_md() {
    echo "## Prune benchmark ($(source_rev))"
    echo
    machine_lines
    echo "- backtree $("$BT" --version 2>/dev/null | awk '{ print $2 }'); $(restic version | head -n1)"
    echo "- Load average at the start: $LOAD_START; at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- Page cache dropped before every prune: $([ "$BENCH_PRUNE_DROP_CACHES" = 1 ] && echo yes || echo no)"
    echo "- backtree: \`prune --repack-threshold $BENCH_PRUNE_REPACK\`, BACKTREE_PRUNE_GRACE=0 (default index settle time);" \
        "restic: \`prune --max-unused 0\`; both after \`forget --keep-last $BENCH_PRUNE_KEEP\`"
    echo
    if [ "$(wc -l <"$RESULTS")" -gt 1 ]; then
        echo "### Real data: $BENCH_PRUNE_GENS generations of N files of ~$BENCH_PRUNE_FILE_SIZE B, $BENCH_PRUNE_CHANGE% replaced per generation, $BENCH_PRUNE_KEEP kept"
        echo
        echo "Wall and CPU in seconds, RSS = peak RSS in MB (10⁶ B), B/chunk = peak RSS / index entries"
        echo "(backtree's count); reads in MB: own = backtree's \`bytes_read\`, rchar / disk = the"
        echo "process's /proc/PID/io rchar (every read(), caches included) / read_bytes (from the disk);"
        echo "repo = du -sb before → after, MB. Ratios: backtree / restic (below 1: backtree less)."
        echo
        awk -F'\t' '
            function mb(b) { return b ~ /^[0-9]+$/ ? sprintf("%.1f", b / 1e6) : b }
            function ratio(a, b) { return (a > 0 && b > 0) ? sprintf("%.2f", a / b) : "n/a" }
            NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
            { k = $c["files"]; if (!(k in seen)) { seen[k] = 1; order[n++] = k }
              if ($c["tool"] == "backtree") ch[k] = $c["chunks"]
              row[k, $c["tool"]] = $0 }
            END {
              print "| files | tool | wall | CPU | RSS | B/chunk | own read | rchar | disk read | repo before → after | exit |"
              print "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
              for (i = 0; i < n; i++) for (t = 0; t < 2; t++) {
                tool = t ? "restic" : "backtree"; if (!((order[i], tool) in row)) continue
                split(row[order[i], tool], f, "\t")
                bpc = ch[order[i]] > 0 ? sprintf("%.0f", f[c["rss_kb"]] * 1024 / ch[order[i]]) : "n/a"
                printf "| %s | %s | %s | %s | %.1f | %s | %s | %s | %s | %s → %s | %s |\n", order[i], tool,
                  f[c["wall"]], f[c["cpu"]], f[c["rss_kb"]] * 1024 / 1e6, bpc, mb(f[c["own_read"]]), mb(f[c["rchar"]]),
                  mb(f[c["disk_read"]]), mb(f[c["repo_before"]]), mb(f[c["repo_after"]]), f[c["rc"]]
              }
              print ""
              print "| files | index entries (backtree) | wall ratio | CPU ratio | RSS ratio | rchar ratio | disk read ratio | freed: backtree / restic (MB) |"
              print "|---:|---:|---:|---:|---:|---:|---:|---:|"
              for (i = 0; i < n; i++) {
                if (!((order[i], "backtree") in row) || !((order[i], "restic") in row)) continue
                split(row[order[i], "backtree"], b, "\t"); split(row[order[i], "restic"], r, "\t")
                printf "| %s | %s | %s | %s | %s | %s | %s | %s / %s |\n", order[i], ch[order[i]],
                  ratio(b[c["wall"]], r[c["wall"]]), ratio(b[c["cpu"]], r[c["cpu"]]), ratio(b[c["rss_kb"]], r[c["rss_kb"]]),
                  ratio(b[c["rchar"]], r[c["rchar"]]), ratio(b[c["disk_read"]], r[c["disk_read"]]),
                  mb(b[c["repo_before"]] - b[c["repo_after"]]), mb(r[c["repo_before"]] - r[c["repo_after"]])
              }
            }' "$RESULTS"
        echo
    fi
    if [ "$(wc -l <"$SIMRES")" -gt 1 ]; then
        echo "### Simulated (backtree only): C chunks over H hosts × $BENCH_PRUNE_SIM_GENS generations, \`--window 1\`, forget --keep-last $BENCH_PRUNE_KEEP"
        echo
        echo "referenced = blobs the kept generations reference; freed = bytes of deleted packs (share"
        echo "of the repository before the prune); RSS = peak RSS (MB); B/chunk = peak RSS / index"
        echo "entries (the constant part included); est = the prune's own \`memory\` estimate (marks"
        echo "and pack table), MB."
        echo
        awk -F'\t' '
            function pow(n) { return n ~ /^10000+$/ ? "10^" (length(n) - 1) : n }
            NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i
              print "| chunks | hosts | build s | generations left | referenced | index entries | deleted packs | repacked | freed MB (share) | prune wall | CPU | RSS | B/chunk | own read MB | est MB | exit |"
              print "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"; next }
            { printf "| %s | %s | %s | %s | %s | %s | %s | %s | %.1f (%.0f%%) | %s | %s | %.1f | %.0f | %.1f | %.1f | %s |\n",
                pow($c["chunks"]), $c["hosts"], $c["build_s"], $c["generations_left"], $c["referenced"], $c["index_entries"],
                $c["deleted_packs"], $c["repacked"], $c["freed"] / 1e6, 100 * $c["freed"] / $c["bytes_before"],
                $c["wall"], $c["cpu"], $c["rss_kb"] * 1024 / 1e6, $c["rss_kb"] * 1024 / $c["index_entries"],
                $c["own_read"] / 1e6, $c["memory_est"] / 1e6, $c["rc"] }' "$SIMRES"
        echo
    fi
    if [ "$(wc -l <"$CONCRES")" -gt 1 ]; then
        echo "### Ingest during a prune (${CONC_N:-?}-file repository, probe ingest of $BENCH_PRUNE_PROBE new ~$BENCH_PRUNE_FILE_SIZE B files)"
        echo
        echo "| case | probe ingest s | ratio to no prune | prune s (waited s) |"
        echo "|---|---:|---:|---:|"
        awk -F'\t' 'NR == 1 { next } NR == 2 { base = $2 }
            { what = "prune marking (probe started with it)"
              if ($1 == "none") what = "no prune (median of 3)"
              if ($1 == "lease") what = "prune waiting for a held ingest lease"
              printf "| %s | %s | %.2f | %s (%s) |\n", what, $2, (base > 0 ? $2 / base : 0), $3, ($4 ~ /^[0-9.]+$/ ? sprintf("%.1f", $4) : $4) }' "$CONCRES"
        echo
    fi
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

main() {
    prerequisites
    prepare_workdir
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    build
    local n c h
    if [[ " $BENCH_PRUNE_PARTS " == *" real "* ]] || [[ " $BENCH_PRUNE_PARTS " == *" conc "* ]]; then
        for n in $BENCH_PRUNE_SIZES; do run_real "$n" </dev/null; done
    fi
    if [[ " $BENCH_PRUNE_PARTS " == *" sim "* ]]; then
        for c in $BENCH_PRUNE_SIM_SIZES; do
            for h in $BENCH_PRUNE_SIM_HOSTS; do run_sim "$c" "$h" </dev/null; done
        done
    fi
    if [[ " $BENCH_PRUNE_PARTS " == *" conc "* ]]; then run_conc </dev/null; fi
    report_md >"$BENCH_DIR/results.md"
    publish_results "$BENCH_DIR/results.md" "<!-- bench:$BENCH_SECTION:begin -->" "<!-- bench:$BENCH_SECTION:end -->" \
        "Maintenance benchmarks"
}

main "$@"
