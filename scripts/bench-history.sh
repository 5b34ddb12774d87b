#!/usr/bin/env bash
# History view benchmark: what `/<host>/.history/…` costs on a host with a year of generations,
# on a local repository and on Garage (S3) on loopback (docs/mount.md, "History").
#
# The repository is made by the scale simulator (crates/core/examples/scale_sim.rs): one host,
# BENCH_HIST_GENS nightly generations of BENCH_HIST_CHUNKS chunks in all, whose root directory
# changes every night (a new directory d<g> and a rewritten file `log`); then `backtree
# maintain index`. For each store a fresh `backtree mount` (page cache dropped) answers, in
# order and timed one by one:
#   ls .history/d<G/4>/f00000/  a file that never changed (the first path asked: every manifest
#                               and every root tree is read)
#   ls -l .history/log/         a file with one version per generation
#   ls .history/                the root's names across all its versions
#   ls .history/d<G/2>/         a directory's names across its versions
#   cat of one version of log
# each of the first two twice (the second answer comes from what the mount keeps), then the
# daemon's peak RSS (VmHWM). Prints a markdown table.
#
# Needs root (drop_caches, FUSE). Usage: scripts/bench.sh --history
# Environment (defaults in brackets):
#   BENCH_DIR          work directory, wiped at start            [/tmp/backtree-bench-history]
#   BENCH_TARGET       cargo target dir for the release build    [/tmp/backtree-bench-target]
#   BENCH_HIST_GENS    generations of the host                   [365]
#   BENCH_HIST_CHUNKS  chunks in all                             [365000]
#   BENCH_HIST_S3      1: Garage too (scripts/garage.sh)         [1]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/backtree-bench-history}
BENCH_TARGET=${BENCH_TARGET:-/tmp/backtree-bench-target}
# shellcheck disable=SC2034 # read by scripts/lib/common.sh
BENCH_BACKTREE='' BENCH_DOC='' BENCH_IMAGE_SRC=''
BENCH_HIST_GENS=${BENCH_HIST_GENS:-365}
BENCH_HIST_CHUNKS=${BENCH_HIST_CHUNKS:-365000}
BENCH_HIST_S3=${BENCH_HIST_S3:-1}
# shellcheck disable=SC2034 # read by scripts/lib/common.sh
SCRIPT_NAME=bench-history.sh CLK_TCK=$(getconf CLK_TCK)
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"

need_root "drop_caches and FUSE"
check_workdir
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
touch "$BENCH_DIR/$WORKDIR_MARK"
RESULTS=$BENCH_DIR/results.tsv
: >"$RESULTS"

say "building backtree and the scale simulator (release) into $BENCH_TARGET"
(cd "$ROOT" && CARGO_TARGET_DIR=$BENCH_TARGET cargo build --release -p backtree \
    -p backtree-core --example scale_sim) || die "cargo build failed"
BT=$BENCH_DIR/backtree
SIM=$BENCH_DIR/scale_sim
cp "$BENCH_TARGET/release/backtree" "$BT"
cp "$BENCH_TARGET/release/examples/scale_sim" "$SIM"

# A directory of an early generation (its files never change) and one of the middle.
OLD=$(printf 'd%04d' $((BENCH_HIST_GENS / 4)))
MID=$(printf 'd%04d' $((BENCH_HIST_GENS / 2)))
GARAGE_DIR=$BENCH_DIR/garage
cleanup() {
    unmount_dir "$BENCH_DIR/mnt"
    [ "$BENCH_HIST_S3" = 1 ] && "$ROOT/scripts/garage.sh" stop "$GARAGE_DIR" >/dev/null 2>&1
    return 0
}
trap cleanup EXIT

# timed STORE WHAT CMD...: runs CMD (output discarded), records its wall time.
timed() {
    local store=$1 what=$2 t0 t1
    shift 2
    t0=$(now)
    "$@" >/dev/null || die "$what failed on $store"
    t1=$(now)
    printf '%s\t%s\t%s\n' "$store" "$what" "$(elapsed "$t0" "$t1")" >>"$RESULTS"
}

# measure STORE REPO: a fresh mount of REPO and the steps above.
measure() {
    local store=$1 repo=$2 mnt=$BENCH_DIR/mnt pid h v
    mkdir -p "$mnt"
    drop_caches
    "$BT" mount --repo "$repo" "$mnt" >"$BENCH_DIR/mount-$store.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do [ -d "$mnt/host0" ] && break; sleep 0.05; done
    [ -d "$mnt/host0" ] || die "the mount of $repo did not answer (see $BENCH_DIR/mount-$store.log)"
    h=$mnt/host0/.history
    timed "$store" "\`ls .history/$OLD/f00000/\` (1 version, first path asked)" ls "$h/$OLD/f00000"
    timed "$store" "the same again" ls "$h/$OLD/f00000"
    timed "$store" "\`ls -l .history/log/\` ($BENCH_HIST_GENS versions)" ls -l "$h/log"
    timed "$store" "the same again " ls -l "$h/log"
    timed "$store" "\`ls .history/\` (the root's names, ever)" ls "$h"
    timed "$store" "\`ls .history/$MID/\`" ls "$h/$MID"
    v=$(find "$h/log/" -mindepth 1 -printf '%f\n' | sort | sed -n "$((BENCH_HIST_GENS / 2))p")
    timed "$store" "\`cat\` of one version of log" cat "$h/log/$v"
    [ "$(find "$h/log/" -mindepth 1 | wc -l)" = "$BENCH_HIST_GENS" ] ||
        die "log has not $BENCH_HIST_GENS versions"
    printf '%s\t%s\t%s\n' "$store" "daemon peak RSS" \
        "$(awk '/VmHWM/ { printf "%.0f MB", $2 / 1000 }' "/proc/$pid/status")" >>"$RESULTS"
    fusermount3 -u "$mnt"
    wait "$pid" || true
}

simulate() { # REPO
    "$SIM" --repo "$1" --chunks "$BENCH_HIST_CHUNKS" --hosts 1 --gens "$BENCH_HIST_GENS" \
        >>"$BENCH_DIR/sim.log" 2>&1 || die "scale_sim failed (see $BENCH_DIR/sim.log)"
    "$BT" maintain index --repo "$1" >>"$BENCH_DIR/sim.log" 2>&1 || die "maintain index failed"
}

say "local repository: $BENCH_HIST_GENS generations"
simulate "$BENCH_DIR/repo"
measure local "$BENCH_DIR/repo"
if [ "$BENCH_HIST_S3" = 1 ]; then
    say "Garage: $BENCH_HIST_GENS generations"
    timeout 300 "$ROOT/scripts/garage.sh" start "$GARAGE_DIR" >"$BENCH_DIR/garage.log" 2>&1 ||
        die "Garage did not start (see $BENCH_DIR/garage.log)"
    # shellcheck disable=SC1091 # written by garage.sh
    . "$GARAGE_DIR/env"
    simulate s3://backtree-test/history
    measure garage s3://backtree-test/history
fi

say "results"
machine_lines
echo "- backtree $(source_rev); $BENCH_HIST_GENS generations, $BENCH_HIST_CHUNKS chunks"
echo
stores=$(cut -f1 "$RESULTS" | awk '!seen[$0]++' | tr '\n' ' ')
printf '| step |'
for s in $stores; do printf ' %s |' "$s"; done
printf '\n|---|'
for _ in $stores; do printf -- '---:|'; done
echo
cut -f2 "$RESULTS" | awk '!seen[$0]++' | while IFS= read -r step; do
    printf '| %s |' "$step"
    for s in $stores; do
        printf ' %s |' "$(awk -F'\t' -v s="$s" -v w="$step" '$1 == s && $2 == w { v = $3 } END { print v }' "$RESULTS" |
            sed -E 's/^([0-9]+\.[0-9]+)$/\1 s/')"
    done
    echo
done
