#!/usr/bin/env bash
# Memory of a long stream ingest: `backtree ingest --stdin` of streams of growing size (up to
# 100 GiB), to show that its peak RSS does not grow with the stream.
#
# The stream is made on the fly from real data that deduplicates, so the repository stays small
# on disk: a tar archive of BENCH_STREAM_SRC (written once, ~1.7 GB, read from the page cache)
# repeated until the size is reached, every repetition with BENCH_STREAM_INSERTS inserts of
# 4 KiB of random bytes at offsets that differ from one repetition to the next (each insert
# makes a chunk or two new, as edits to a dump do). The generator is `dd` and `head` in a shell
# loop, fast enough not to be the bottleneck; its CPU time shows in "others CPU s".
#
# Per size: a fresh repository, the ingest's peak RSS (`/usr/bin/time`), wall time, CPU time,
# throughput, repository size, and RSS sampled every second against the bytes read so far
# (/proc/PID/status VmRSS and /proc/PID/io rchar), from which the report gives the largest RSS
# seen in each quarter of the stream: flat quarters mean nothing grows with the stream. Results
# are spliced into BENCH_DOC between `<!-- bench:stream:begin -->` and `<!-- bench:stream:end -->`.
#
# Needs no root: drops no caches (the base archive is read from the page cache).
# Usage: scripts/bench-stream.sh, or scripts/bench.sh --stream-rss
# Environment (defaults in brackets):
#   BENCH_DIR             work directory, wiped at start          [/tmp/backtree-bench-stream]
#   BENCH_TARGET          cargo target dir for the release build  [/tmp/backtree-bench-target]
#   BENCH_BACKTREE        use this backtree binary, skip the build []
#   BENCH_STREAM_GB       stream sizes to ingest, GiB, one fresh repository each [1 10 100]
#   BENCH_STREAM_SRC      what the repeated tar archive holds     [/usr/share /usr/bin /usr/sbin /usr/include /usr/lib/x86_64-linux-gnu]
#   BENCH_STREAM_INSERTS  4 KiB inserts per repetition            [8]
#   BENCH_TIMEOUT         seconds before one ingest is killed     [3600]
#   BENCH_NICE            this session's autogroup nice during the run, e.g. -10 on a machine
#                         others keep busy (restored at exit); '' = as is  []
#   BENCH_DOC             markdown file to update, '' for none    [docs/benchmarks.md]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/backtree-bench-stream}
BENCH_TARGET=${BENCH_TARGET:-/tmp/backtree-bench-target}
BENCH_BACKTREE=${BENCH_BACKTREE:-}
BENCH_STREAM_GB=${BENCH_STREAM_GB:-1 10 100}
BENCH_STREAM_SRC=${BENCH_STREAM_SRC:-/usr/share /usr/bin /usr/sbin /usr/include /usr/lib/x86_64-linux-gnu}
BENCH_STREAM_INSERTS=${BENCH_STREAM_INSERTS:-8}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-3600}
BENCH_NICE=${BENCH_NICE:-}
BENCH_DOC=${BENCH_DOC-$ROOT/docs/benchmarks.md}
BENCH_IMAGE_SRC=/usr # unused here; common.sh expects it
CLK_TCK=$(getconf CLK_TCK)

SCRIPT_NAME=bench-stream.sh
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$ROOT/scripts/lib/common.sh"

BASE=$BENCH_DIR/base.tar
RESULTS=$BENCH_DIR/results.tsv
LOGS=$BENCH_DIR/logs

# gen_stream BYTES: BASE repeated with inserts until at least BYTES are written.
gen_stream() {
    local want=$1 size r=0 k off prev seg written=0
    size=$(stat -c %s "$BASE")
    seg=$((size / BENCH_STREAM_INSERTS))
    while [ "$written" -lt "$want" ]; do
        prev=0
        for ((k = 0; k < BENCH_STREAM_INSERTS; k++)); do
            # One insert per segment of the base, at an offset that moves with the repetition.
            off=$(((k * seg + (r * 2654435761 + k * 97531) % seg) / 512 * 512))
            dd if="$BASE" iflag=skip_bytes,count_bytes skip="$prev" count=$((off - prev)) bs=1M status=none
            head -c 4096 /dev/urandom
            prev=$off
        done
        dd if="$BASE" iflag=skip_bytes skip="$prev" bs=1M status=none
        written=$((written + size + BENCH_STREAM_INSERTS * 4096))
        r=$((r + 1))
    done
}

# ingest_size GIB: one stream of GIB GiB into a fresh repository; appends a row to RESULTS.
ingest_size() {
    local gib=$1 repo=$BENCH_DIR/repo-$1 log=$LOGS/stream-$1 t0 t1 b0 b1 tpid pid s0 rc=0
    local wall user sys rss cpu other bytes quarters
    rm -rf "$repo"
    "$BT" init --repo "$repo" >/dev/null
    say "stream of $gib GiB"
    : >"$log.samples"
    b0=$(busy_ticks)
    t0=$(now)
    gen_stream $((gib * 1073741824)) |
        /usr/bin/time -o "$log.time" -f '%U %S %M' timeout "$BENCH_TIMEOUT" \
            "$BT" ingest --repo "$repo" --host stream --stdin stream --json >"$log.out" 2>"$log.err" &
    tpid=$!
    # Sample the ingest's RSS and bytes read once a second.
    s0=$SECONDS
    pid=
    while kill -0 "$tpid" 2>/dev/null; do
        [ -n "$pid" ] || pid=$(pgrep -f -n "^$BT ingest --repo $repo " || true)
        if [ -n "$pid" ] && [ -r "/proc/$pid/io" ]; then
            awk -v t=$((SECONDS - s0)) '/^rchar:/ { r = $2 } /^VmRSS:/ { m = $2 }
                END { if (r != "" && m != "") print t, r, m }' "/proc/$pid/io" "/proc/$pid/status" \
                2>/dev/null >>"$log.samples" || true
        fi
        sleep 1
    done
    wait "$tpid" || rc=$?
    sync
    t1=$(now)
    b1=$(busy_ticks)
    [ "$rc" -eq 0 ] || die "ingest of $gib GiB failed (exit $rc): $(tail -n3 "$log.err" | tr '\n' ' ')"
    read -r user sys rss < <(tail -n1 "$log.time")
    wall=$(elapsed "$t0" "$t1")
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.1f", u + s }')
    other=$(awk -v b0="$b0" -v b1="$b1" -v hz="$CLK_TCK" -v c="$cpu" \
        'BEGIN { o = (b1 - b0) / hz - c; if (o < 0) o = 0; printf "%.1f", o }')
    bytes=$(jq -r '.generation.stats.logical_bytes' "$log.out")
    # The largest RSS sampled in each quarter of the stream (by bytes read), KiB.
    quarters=$(awk -v total="$bytes" '{ q = int($2 / total * 4); if (q > 3) q = 3; if ($3 > m[q]) m[q] = $3 }
        END { printf "%d %d %d %d", m[0], m[1], m[2], m[3] }' "$log.samples")
    info "$gib GiB: $bytes bytes, ${wall}s wall, ${cpu}s CPU, peak RSS $((rss / 1024)) MiB, quarters (KiB) $quarters, others used $other CPU s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$gib" "$bytes" "$wall" "$cpu" "$rss" \
        "$(du -sb "$repo" | cut -f1)" "$other" "$quarters" >>"$RESULTS"
    rm -rf "$repo"
}

report() {
    echo "| GiB asked | bytes read (whole repetitions) | wall s | MB/s | CPU s | peak RSS MiB | RSS max per quarter of the stream, MiB | repo MiB | others CPU s |"
    echo "|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    awk -F'\t' '{
        split($8, q, " ")
        printf "| %s | %s | %.1f | %.0f | %.1f | %.0f | %.0f / %.0f / %.0f / %.0f | %.1f | %s |\n",
            $1, $2, $3, $2 / 1e6 / $3, $4, $5 / 1024, q[1] / 1024, q[2] / 1024, q[3] / 1024, q[4] / 1024,
            $6 / 1048576, $7
    }' "$RESULTS"
}

main() {
    local gib md=$BENCH_DIR/results.md src
    install_missing jq:jq /usr/bin/time:time
    check_workdir
    rm -rf "$BENCH_DIR"
    mkdir -p "$BENCH_DIR" "$LOGS"
    touch "$BENCH_DIR/$WORKDIR_MARK"
    : >"$RESULTS"
    use_prebuilt || build_release
    private_copy
    trap restore_autogroup_nice EXIT
    set_autogroup_nice
    read -r -a src <<<"$BENCH_STREAM_SRC"
    say "writing the base stream: a tar archive of ${src[*]}"
    tar -C / --atime-preserve=system -cf "$BASE" "${src[@]#/}" 2>"$LOGS/base-tar.err" || true
    cat "$BASE" >/dev/null # into the page cache
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    for gib in $BENCH_STREAM_GB; do ingest_size "$gib"; done
    {
        echo "### Stream ingest memory: run of $(date -u '+%Y-%m-%d')"
        echo
        machine_lines
        echo "- backtree: $("$BT" --version | awk '{ print $2 }') (git $(source_rev), release build)"
        echo "- Load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
        [ -z "$BENCH_NICE" ] || echo "- This session's autogroup at nice $BENCH_NICE (BENCH_NICE): the machine was shared"
        echo "- Stream: a $(($(stat -c %s "$BASE") / 1048576)) MiB tar archive of ${src[*]} repeated," \
            "$BENCH_STREAM_INSERTS inserts of 4 KiB random bytes per repetition at offsets that move" \
            "with the repetition, piped into \`backtree ingest --stdin\` (one fresh repository per size)"
        echo
        report
    } >"$md"
    publish_results "$md" "<!-- bench:stream:begin -->" "<!-- bench:stream:end -->" Benchmarks
    rm -f "$BASE"
}

main "$@"
