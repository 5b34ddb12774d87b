# shellcheck shell=bash disable=SC2153 # BENCH_DIR and the others are set by the sourcing script
# Helpers shared by the benchmark scripts (scripts/bench.sh, bench-mount.sh, bench-s3.sh), which
# source this file after setting their configuration. Not meant to be run by itself.
#
# Expects from the sourcing script:
#   SCRIPT_NAME   the script's file name, prefixed to die()'s message ("bench.sh")
#   ROOT          the repository's top directory
#   BENCH_DIR, BENCH_TARGET, BENCH_BACKTREE, BENCH_DOC, BENCH_IMAGE_SRC, CLK_TCK
# and, for wait_quiet / wait_idle: BENCH_QUIET_WAIT, BENCH_IDLE_WAIT, the counters NOISY, BUSY
# and IDLE_WAITED, and OTHER_BENCH_RE / OTHER_BENCH (a pgrep -f pattern of the benchmarks to
# wait for, and how to name them in messages).

# ---------------------------------------------------------------------------------------------
# Messages and time
# ---------------------------------------------------------------------------------------------

say() { printf '\n==> %s\n' "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; } # START END -> seconds

# ---------------------------------------------------------------------------------------------
# Prerequisites and the build
# ---------------------------------------------------------------------------------------------

need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (needs $1)"; } # WHAT_FOR

apt_install() {
    [ $# -gt 0 ] || return 0
    command -v apt-get >/dev/null || die "missing $*, and apt-get is not available"
    say "installing Debian packages: $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"; then
        info "apt-get install failed; running apt-get update and retrying"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
    fi
}

# install_missing COMMAND:PACKAGE...: installs the package of every command not found (once).
install_missing() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    # shellcheck disable=SC2046 # package names have no spaces
    apt_install $(printf '%s\n' "${missing[@]+"${missing[@]}"}" | sort -u)
}

# use_prebuilt: true, with BT set, when BENCH_BACKTREE names a binary to use instead of a build.
use_prebuilt() {
    [ -n "$BENCH_BACKTREE" ] || return 1
    BT=$BENCH_BACKTREE
    say "using prebuilt backtree: $BENCH_BACKTREE"
}

# build_release: builds backtree (release) into BENCH_TARGET and sets BT to the binary.
build_release() {
    say "building backtree (release) into $BENCH_TARGET"
    (cd "$ROOT" && CARGO_TARGET_DIR=$BENCH_TARGET cargo build --release -p backtree) ||
        die "cargo build failed"
    BT=$BENCH_TARGET/release/backtree
    [ -x "$BT" ] || die "build produced no $BT"
}

# source_rev: the commit the sources are at, "+ uncommitted changes" when they differ from it.
source_rev() {
    local rev
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ -n "$(git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null)" ]; then
        rev="$rev + uncommitted changes"
    fi
    echo "$rev"
}

# private_copy: the target dir may be shared with other builds and benchmarks: run a private
# copy of BT, stable for this run.
private_copy() {
    cp "$BT" "$BENCH_DIR/backtree"
    BT=$BENCH_DIR/backtree
}

# ---------------------------------------------------------------------------------------------
# Work directory
# ---------------------------------------------------------------------------------------------

# The file that marks BENCH_DIR as made by this script (.backtree-bench, .backtree-bench-mount…).
WORKDIR_MARK=.backtree-${SCRIPT_NAME%.sh}

# check_workdir: refuses a BENCH_DIR that is a system or home directory, or a non-empty one that
# this script did not make (no WORKDIR_MARK in it): it is about to be wiped.
check_workdir() {
    case "$BENCH_DIR" in
        "" | / | /tmp | /root | /home | /usr | "$ROOT" | "${HOME:-/root}") die "refusing BENCH_DIR=$BENCH_DIR" ;;
    esac
    if [ -e "$BENCH_DIR" ] && [ ! -e "$BENCH_DIR/$WORKDIR_MARK" ] &&
        [ -n "$(ls -A "$BENCH_DIR" 2>/dev/null)" ]; then
        die "$BENCH_DIR exists, is not empty and was not made by $SCRIPT_NAME; choose another BENCH_DIR"
    fi
}

# ---------------------------------------------------------------------------------------------
# Waiting for a quiet machine
# ---------------------------------------------------------------------------------------------

# wait_quiet BEFORE_WHAT: waits until none of the other benchmarks (OTHER_BENCH_RE) runs, so
# they do not disturb each other. Polls every 10 s, up to BENCH_QUIET_WAIT seconds, then goes on
# with a warning (counted in NOISY, for the report).
wait_quiet() {
    local waited=0
    while pgrep -f "$OTHER_BENCH_RE" >/dev/null; do
        if [ "$waited" -eq 0 ]; then info "waiting for $OTHER_BENCH to finish (before: $1)"; fi
        if [ "$waited" -ge "$BENCH_QUIET_WAIT" ]; then
            info "WARNING: $OTHER_BENCH still running after ${waited}s; going on anyway"
            NOISY=$((NOISY + 1))
            return 0
        fi
        sleep 10
        waited=$((waited + 10))
    done
    if [ "$waited" -gt 0 ]; then info "$OTHER_BENCH finished, waited ${waited}s"; fi
}

# wait_idle BEFORE_WHAT: waits until other processes use under 15% of a core (2 s samples), up to
# BENCH_IDLE_WAIT seconds (then goes on, counted in BUSY); adds the wait to IDLE_WAITED.
wait_idle() {
    local start=$SECONDS b0 b1 first=1
    while :; do
        b0=$(busy_ticks)
        sleep 2
        b1=$(busy_ticks)
        if [ $(((b1 - b0) * 100)) -lt $((15 * 2 * CLK_TCK)) ]; then break; fi
        if [ "$first" = 1 ]; then
            info "machine busy ($(awk -v t=$((b1 - b0)) -v hz="$CLK_TCK" 'BEGIN { printf "%.0f%%", t / hz / 2 * 100 }') of a core used by others): waiting before $1"
            first=0
        fi
        if [ $((SECONDS - start)) -ge "$BENCH_IDLE_WAIT" ]; then
            info "WARNING: machine still busy after ${BENCH_IDLE_WAIT}s; going on with $1"
            BUSY=$((BUSY + 1))
            break
        fi
    done
    IDLE_WAITED=$((IDLE_WAITED + SECONDS - start))
}

# set_autogroup_nice: with BENCH_NICE set, gives this session's autogroup that nice value (with
# the kernel's autogroups, sched_autogroup_enabled, plain nice only ranks processes of one
# session against each other); restore_autogroup_nice (call it at exit) puts the old one back.
AUTOGROUP_NICE=
set_autogroup_nice() {
    [ -n "${BENCH_NICE:-}" ] && [ -w "/proc/$$/autogroup" ] || return 0
    AUTOGROUP_NICE=$(sed -n 's/.* nice //p' "/proc/$$/autogroup")
    echo "$BENCH_NICE" >"/proc/$$/autogroup" || AUTOGROUP_NICE=
}

restore_autogroup_nice() {
    [ -z "$AUTOGROUP_NICE" ] || echo "$AUTOGROUP_NICE" >"/proc/$$/autogroup" || true
}

# ---------------------------------------------------------------------------------------------
# Mounts and processes
# ---------------------------------------------------------------------------------------------

unmount_dir() { # DIR: unmount whatever is mounted there (FUSE, loop, or a dead FUSE daemon's)
    if grep -qF " $1 " /proc/mounts; then
        info "unmounting $1"
        fusermount3 -u "$1" 2>/dev/null || umount "$1" 2>/dev/null || fusermount3 -uz "$1" 2>/dev/null ||
            umount -l "$1" || true
    fi
}

stop_pid() { # PID: TERM, then KILL after 2 s
    [ -n "$1" ] || return 0
    if kill -0 "$1" 2>/dev/null; then
        kill -TERM "$1" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done
        kill -KILL "$1" 2>/dev/null || true
    fi
}

stop_daemon() { stop_pid "$DAEMON_PID"; DAEMON_PID=; } # the mount daemon, if any

# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# Busy CPU ticks of the whole machine (all cores).
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# CPU ticks used so far by kernel threads (PF_KTHREAD, 0x200000 in the flags field): work the
# kernel does for what runs, such as the loop device's and the journal's writes of a restore into
# the fresh ext4, which is the restore's own work and not noise.
# (A process that exits between the glob and cat's read makes cat fail: not an error here.)
kthread_ticks() {
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk '{
        n = split($0, f, ") "); split(f[n], g, " ")
        if (int(g[7] / 2097152) % 2 == 1) s += g[12] + g[13]
    } END { printf "%d\n", s }'
}

proc_ticks() { # PID...: user + system ticks of these processes (threads included)
    local pid t=0 x
    for pid in "$@"; do
        if [ -z "$pid" ] || [ ! -r "/proc/$pid/stat" ]; then continue; fi
        # Fields after the parenthesised command name: utime and stime are the 12th and 13th.
        x=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }') || x=0
        t=$((t + ${x:-0}))
    done
    echo "$t"
}

# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

repo_of() { echo "$BENCH_DIR/repos/$1-$2"; } # DATASET TOOL

# Bytes in the regular files below PATHS (one filesystem each).
logical_size() { find "$@" -xdev -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d", s }'; }

# pick_files BUDGET_BYTES > list: files under BENCH_IMAGE_SRC in name order that fit (counted in
# 4 KiB blocks), paths relative to /.
pick_files() {
    (cd / && find "${BENCH_IMAGE_SRC#/}" -xdev -type f -readable ! -name $'*\n*' -printf '%s %p\n') |
        LC_ALL=C sort -k2 |
        awk -v budget="$1" '{
            s = int(($1 + 4095) / 4096) * 4096
            if (used + s > budget) next  # skip what does not fit, keep filling with smaller files
            used += s
            print substr($0, length($1) + 2)
        }'
}

copy_files() { # LIST DEST
    tar -C / --atime-preserve=system --no-recursion --verbatim-files-from -T "$1" -cf - |
        tar -C "$2" -xpf -
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

# The machine: date, CPU and memory, kernel and the work directory's filesystem.
machine_lines() {
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- CPU: $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo);" \
        "RAM $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "- Kernel: $(uname -r); work dir on $(df --output=source,fstype "$BENCH_DIR" | tail -n1 | tr -s ' ')"
}

# results_md HEADING [NOTES_FUNCTION]: the results in markdown: HEADING, machine_info, the
# datasets (BENCH_DIR/datasets.txt, "NAME<tab>DESCRIPTION" lines), what NOTES_FUNCTION prints,
# then report's tables.
results_md() {
    echo "$1"
    echo
    machine_info
    echo
    echo "Datasets:"
    echo
    awk -F'\t' '{ printf "- %s: %s\n", $1, $2 }' "$BENCH_DIR/datasets.txt"
    echo
    if [ -n "${2:-}" ]; then
        "$2"
        echo
    fi
    report
}

# publish_results MD BEGIN END TITLE: prints the results file MD, and unless BENCH_DOC is empty
# puts it into BENCH_DOC between the marker lines BEGIN and END (the prose around them is kept;
# markers missing from the file are added at its end, a missing file starts with "# TITLE").
publish_results() {
    local md=$1 begin=$2 end=$3 title=$4
    say "results"
    cat "$md"
    [ -n "$BENCH_DOC" ] || return 0
    if [ ! -f "$BENCH_DOC" ] || ! grep -qF "$begin" "$BENCH_DOC"; then
        mkdir -p "$(dirname "$BENCH_DOC")"
        {
            if [ -f "$BENCH_DOC" ]; then cat "$BENCH_DOC"; else echo "# $title"; fi
            printf '\n%s\n%s\n' "$begin" "$end"
        } >"$BENCH_DOC.tmp"
        mv "$BENCH_DOC.tmp" "$BENCH_DOC"
    fi
    awk -v md="$md" -v begin="$begin" -v end="$end" '
        $0 == begin { print; while ((getline l < md) > 0) print l; skip = 1; next }
        $0 == end { skip = 0 }
        !skip { print }' "$BENCH_DOC" >"$BENCH_DOC.tmp"
    mv "$BENCH_DOC.tmp" "$BENCH_DOC"
    say "updated $BENCH_DOC"
}
