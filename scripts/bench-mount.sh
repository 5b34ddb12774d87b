#!/usr/bin/env bash
# Mount benchmark: `backtree mount` vs `restic mount` vs `borg mount` on real data, one run.
#
# Datasets (each ingested by every tool into its own fresh repository; ingest is not timed)
#   tree   system files (BENCH_TREE, default /usr/share and /usr/lib/x86_64-linux-gnu)
#   image  one large file: a sparse ext4 disk image (BENCH_IMAGE_GB GiB) filled to ~70% with
#          files copied from /usr (or a copy of BENCH_IMAGE_REUSE if that exists)
#
# Per tool, each measurement gets a fresh mount whose daemon is started with the page cache
# dropped (sync; echo 3 > /proc/sys/vm/drop_caches):
#   answer  seconds from starting the mount command until `ls` of the directory holding the
#           dataset's root succeeds (polled every 10 ms); one sample per mount
#   find    tree: cold `find ROOT -printf '%s %m\n'` (stats everything; output to a log file)
#   rsync   tree: cold `rsync -a ROOT/ DEST/` into a freshly made ext4 filesystem (no final
#           sync); BENCH_RSYNC_ROUNDS rounds, each restoring with every tool and the local
#           baseline in a rotated order; the median of the rounds is the result
#   read    image: cold `dd if=FILE of=/dev/null bs=1M`, then a warm re-read on the same mount
#   rss     the daemon's VmHWM (/proc/PID/status) at the end of each mount
# Baselines without FUSE: the same cold find and rsync straight from the local disk, and a cold
# read of the backtree image repository's files (what the disk delivers), and the decode ceiling:
# the image repository's blobs decompressed and verified from memory, one thread per core
# (crates/core/examples/decode_ceiling.rs), which a cold read must do besides FUSE's work.
# Afterwards (untimed) every restore and the image read through each mount are compared with
# the source (rsync -c dry run, cmp). Optionally (BENCH_CEILING=1) a minimal fuser in-memory
# file server is built in /tmp/fuse-ceiling and read the same way: what FUSE itself delivers.
#
# Before every heavy step the script waits (up to BENCH_QUIET_WAIT s) until no
# `scripts/bench.sh` is running; before every timed step it also waits (up to BENCH_IDLE_WAIT s)
# until the machine is idle (other processes below 15% of one core over 2 s), and it repeats a
# session during which other processes used more than BENCH_NOISE CPU seconds. It records the
# load average and the CPU time other processes used during each timed step. The results are
# printed as markdown and spliced into BENCH_DOC between `<!-- bench-mount:begin -->` and `<!-- bench-mount:end -->`.
#
# Needs root (drop_caches, loop mount, /proc/PID/status of the daemons). Usage:
#   scripts/bench-mount.sh
# Environment (defaults in brackets):
#   BENCH_DIR           work directory, wiped at start            [/tmp/backtree-bench-mount]
#   BENCH_TARGET        cargo target dir for the release build    [/tmp/backtree-bench-target]
#   BENCH_BACKTREE      use this backtree binary, skip the build  []
#   BENCH_TREE          paths of the tree dataset                 [/usr/share /usr/lib/x86_64-linux-gnu]
#   BENCH_IMAGE_GB      image size, GiB                           [2]
#   BENCH_IMAGE_FILL    percent of the image filesystem to fill   [70]
#   BENCH_IMAGE_SRC     where the image's files are copied from   [/usr]
#   BENCH_IMAGE_REUSE   copy this image instead of making one, if it exists and has the
#                       right size (cp --sparse=always)           [/tmp/backtree-bench/image/disk.img]
#   BENCH_TOOLS         tools to run                              [backtree restic borg]
#   BENCH_CACHE_SIZE    backtree mount --cache-size, '' = default []
#   BENCH_TIMEOUT       seconds before one find/rsync/read is killed [900]
#   BENCH_MOUNT_TIMEOUT seconds a mount may take to answer        [600]
#   BENCH_QUIET_WAIT    seconds to wait for scripts/bench.sh to finish [1200]
#   BENCH_IDLE_WAIT     seconds to wait for an idle machine before each timed step [300]
#   BENCH_NOISE         a session is repeated when other processes used more than this many
#                       CPU seconds during one of its timed steps [0.5]
#   BENCH_RETRIES       how often a disturbed session is repeated, at most [2]
#   BENCH_RSYNC_ROUNDS  rounds of rsync restores (every tool and the local baseline each) [3]
#   BENCH_CEILING       1: build and measure the fuser ceiling program [1]
#   BENCH_DOC           markdown file to update, '' for none      [docs/benchmarks-mount.md]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/backtree-bench-mount}
BENCH_TARGET=${BENCH_TARGET:-/tmp/backtree-bench-target}
BENCH_BACKTREE=${BENCH_BACKTREE:-}
BENCH_TREE=${BENCH_TREE:-/usr/share /usr/lib/x86_64-linux-gnu}
BENCH_IMAGE_GB=${BENCH_IMAGE_GB:-2}
BENCH_IMAGE_FILL=${BENCH_IMAGE_FILL:-70}
BENCH_IMAGE_SRC=${BENCH_IMAGE_SRC:-/usr}
BENCH_IMAGE_REUSE=${BENCH_IMAGE_REUSE-/tmp/backtree-bench/image/disk.img}
BENCH_TOOLS=${BENCH_TOOLS:-backtree restic borg}
BENCH_CACHE_SIZE=${BENCH_CACHE_SIZE:-}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-900}
BENCH_MOUNT_TIMEOUT=${BENCH_MOUNT_TIMEOUT:-600}
BENCH_QUIET_WAIT=${BENCH_QUIET_WAIT:-1200}
BENCH_IDLE_WAIT=${BENCH_IDLE_WAIT:-300}
BENCH_NOISE=${BENCH_NOISE:-0.5}
BENCH_RETRIES=${BENCH_RETRIES:-2}
BENCH_RSYNC_ROUNDS=${BENCH_RSYNC_ROUNDS:-3}
# The mount's read_ahead_kb as backtree sets it when run as root (crates/fs/src/mount.rs); the
# FUSE ceiling is measured with the same.
READ_AHEAD_KB=$(sed -n 's/^pub const READ_AHEAD_KB: u32 = \([0-9]*\);/\1/p' "$ROOT/crates/fs/src/mount.rs")
READ_AHEAD_KB=${READ_AHEAD_KB:-4096}
RESTORE_FS="a fresh ext4 for every restore (loop-mounted sparse file, mkfs.ext4 with the journal and inode tables written at mkfs)"
BENCH_CEILING=${BENCH_CEILING:-1}
BENCH_DOC=${BENCH_DOC-$ROOT/docs/benchmarks-mount.md}

MNT=$BENCH_DIR/mnt            # where the tools' mounts go
LOOP=$BENCH_DIR/loop          # where the image is loop-mounted while it is filled
RESULTS=$BENCH_DIR/results.tsv
LOGS=$BENCH_DIR/logs
IMG=$BENCH_DIR/image/disk.img
CEIL_DIR=${BENCH_CEILING_DIR:-/tmp/fuse-ceiling}
CLK_TCK=$(getconf CLK_TCK)
DAEMON_PID=
NOISY=0      # steps started while scripts/bench.sh still ran
BUSY=0       # timed steps started while the machine was still busy
IDLE_WAITED=0
SESSION_NOISE=0 # the most CPU seconds other processes used during one timed step of a session
REPEATS=0       # sessions repeated because they were disturbed
DISTURBED=0     # sessions still disturbed after the last repeat

# wait_quiet waits for scripts/bench.sh (the ingest benchmark), so the two do not disturb each
# other.
OTHER_BENCH_RE='scripts/bench\.sh'
OTHER_BENCH=scripts/bench.sh

SCRIPT_NAME=bench-mount.sh
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$ROOT/scripts/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/datasets.sh
. "$ROOT/scripts/lib/datasets.sh"

# ---------------------------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------------------------

prerequisites() {
    need_root "drop_caches, loop mounts, /proc/PID/status"
    install_missing restic:restic borg:borgbackup fusermount3:fuse3 rsync:rsync /usr/bin/time:time \
        mkfs.ext4:e2fsprogs
    # borg mount needs one of its FUSE bindings, importable by borg's own interpreter.
    [ -n "$(borg_fuse)" ] || apt_install python3-pyfuse3
    [ -e /dev/fuse ] || die "/dev/fuse is missing"
    command -v cargo >/dev/null || [ -n "$BENCH_BACKTREE" ] || die "cargo not found"
}

# Which FUSE binding borg mount uses ("pyfuse3 3.2.1", "llfuse 1.4.1"), empty if none.
borg_fuse() {
    local py
    py=$(head -n1 "$(command -v borg)" | sed -n 's/^#! *//p' | awk '{ print $1 }')
    [ -x "${py:-}" ] || py=python3
    "$py" -c 'from borg import fuse_impl as f
if f.has_pyfuse3:
    import pyfuse3; print("pyfuse3", getattr(pyfuse3, "__version__", ""))
elif f.has_llfuse:
    import llfuse; print("llfuse", getattr(llfuse, "__version__", ""))' 2>/dev/null || true
}

build_backtree() {
    use_prebuilt && return
    wait_quiet "build"
    build_release
    # What was built: the commit, and whether the sources differed from it at build time.
    BUILT_REV=$(source_rev)
    private_copy
}

# ---------------------------------------------------------------------------------------------
# Work directory (idempotent: everything from a previous run is unmounted and removed)
# ---------------------------------------------------------------------------------------------

prepare_workdir() {
    check_workdir
    say "cleaning work directory $BENCH_DIR"
    unmount_dir "$MNT"
    unmount_dir "$LOOP"
    unmount_dir "$BENCH_DIR/restore"
    rm -rf "$BENCH_DIR"
    mkdir -p "$BENCH_DIR" "$LOGS" "$MNT" "$LOOP" "$BENCH_DIR/image" "$BENCH_DIR/repos"
    touch "$BENCH_DIR/$WORKDIR_MARK"
    printf 'dataset\ttool\tstep\tvalue\tunit\tload1\tother_cpu\trc\n' >"$RESULTS"
}

cleanup() {
    local rc=$?
    stop_daemon
    unmount_dir "$MNT"
    unmount_dir "$LOOP"
    [ -n "${CEIL_MNT:-}" ] && unmount_dir "$CEIL_MNT"
    drop_restore_fs
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

record() { # DATASET TOOL STEP VALUE UNIT LOAD1 OTHER_CPU RC
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"
}

unrecord() { # DATASET TOOL STEP_REGEX: drop the rows of a session that is repeated
    awk -F'\t' -v d="$1" -v t="$2" -v re="$3" '!($1 == d && $2 == t && $3 ~ re)' "$RESULTS" >"$RESULTS.tmp"
    mv "$RESULTS.tmp" "$RESULTS"
}

# run_session NAME DATASET STEP_REGEX TOOL: runs session_NAME TOOL; if other processes used more
# than BENCH_NOISE CPU seconds during one of its timed steps, drops its rows and repeats it (at
# most BENCH_RETRIES times).
run_session() {
    local name=$1 ds=$2 re=$3 tool=$4 attempt
    for ((attempt = 0; attempt <= BENCH_RETRIES; attempt++)); do
        SESSION_NOISE=0
        "session_$name" "$tool"
        if awk -v n="$SESSION_NOISE" -v max="$BENCH_NOISE" 'BEGIN { exit !(n <= max) }'; then
            return 0
        fi
        if [ "$attempt" -lt "$BENCH_RETRIES" ]; then
            info "disturbed: other processes used $SESSION_NOISE CPU s during a timed step; repeating the $tool $name session"
            unrecord "$ds" "$tool" "$re"
            REPEATS=$((REPEATS + 1))
        fi
    done
    info "WARNING: the $tool $name session was still disturbed after $BENCH_RETRIES repeats; keeping it"
    DISTURBED=$((DISTURBED + 1))
}

# timed DATASET TOOL STEP -- COMMAND...: runs COMMAND (bounded by BENCH_TIMEOUT), sets
# T_WALL (seconds) and T_RC; records the load average and the CPU used by processes other than
# COMMAND and the daemon (a noise gauge).
timed() {
    local ds=$1 tool=$2 step=$3 base t0 t1 b0 b1 d0 d1 k0 k1 user sys load other kernel
    shift 4
    base=$LOGS/$ds-$tool-$step
    load=$(cut -d' ' -f1 /proc/loadavg)
    info "$tool $step: $*"
    T_RC=0
    k0=$(kthread_ticks)
    b0=$(busy_ticks)
    d0=$(proc_ticks "$DAEMON_PID")
    t0=$(now)
    /usr/bin/time -o "$base.time" -f '%U %S' timeout "$BENCH_TIMEOUT" "$@" >"$base.out" 2>"$base.err" || T_RC=$?
    t1=$(now)
    d1=$(proc_ticks "$DAEMON_PID")
    b1=$(busy_ticks)
    k1=$(kthread_ticks)
    read -r user sys < <(tail -n1 "$base.time" | grep -E '^[0-9.]+ [0-9.]+$' || echo "0 0")
    T_WALL=$(elapsed "$t0" "$t1")
    kernel=$(awk -v k="$((k1 - k0))" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", k / hz }')
    other=$(awk -v b="$((b1 - b0))" -v d="$((d1 - d0))" -v k="$((k1 - k0))" -v hz="$CLK_TCK" -v u="$user" -v s="$sys" \
        'BEGIN { o = (b - d - k) / hz - u - s; if (o < 0) o = 0; printf "%.1f", o }')
    T_LOAD=$load
    T_OTHER=$other
    SESSION_NOISE=$(awk -v a="$SESSION_NOISE" -v b="$other" 'BEGIN { print (b > a) ? b : a }')
    if [ "$T_RC" -ne 0 ]; then
        info "FAILED (exit $T_RC): $(tail -n3 "$base.err" | tr '\n' ' ')"
    fi
    info "$(printf '%s %s %s: %ss (load %s, others used %s CPU s, kernel threads %s CPU s, daemon %s CPU s, client %s CPU s)' \
        "$ds" "$tool" "$step" "$T_WALL" "$load" "$other" "$kernel" \
        "$(awk -v d="$((d1 - d0))" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", d / hz }')" \
        "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.1f", u + s }')")"
}

# ---------------------------------------------------------------------------------------------
# Tools: mount (repositories and ingest: lib/datasets.sh)
# ---------------------------------------------------------------------------------------------

# The directory that holds the dataset's root, inside the mount (what `answer` polls).
root_in_mount() { # DATASET TOOL
    case $2 in
        backtree) echo "$MNT/$1/latest" ;;       # /<host>/latest -> the generation's root
        restic) echo "$MNT/snapshots/latest" ;;  # the snapshot's root
        borg) echo "$MNT/$1" ;;                  # /<archive>
    esac
}

# The mount command of a tool, in MOUNT_CMD (run directly with `&`, so $! is the daemon itself).
mount_cmd() { # DATASET TOOL
    local repo
    repo=$(repo_of "$1" "$2")
    case $2 in
        backtree) MOUNT_CMD=("$BT" mount --repo "$repo" ${BENCH_CACHE_SIZE:+--cache-size "$BENCH_CACHE_SIZE"} "$MNT") ;;
        restic) MOUNT_CMD=(restic --repo "$repo" --cache-dir "$RESTIC_CACHE" mount "$MNT") ;;
        borg) MOUNT_CMD=(borg mount -f "$repo" "$MNT") ;; # -f: foreground, so the PID is borg's
    esac
}

# mount_tool DATASET TOOL SESSION: cold cache, start the daemon, poll until the dataset's root
# answers `ls`; records the time. Sets DAEMON_PID.
mount_tool() {
    local ds=$1 tool=$2 session=$3 dir t0 t1 log
    dir=$(root_in_mount "$ds" "$tool")
    log=$LOGS/mount-$ds-$tool-$session.log
    unmount_dir "$MNT"
    wait_idle "mounting $tool ($ds, $session)"
    drop_caches
    local load
    load=$(cut -d' ' -f1 /proc/loadavg)
    mount_cmd "$ds" "$tool"
    t0=$(now)
    "${MOUNT_CMD[@]}" >"$log" 2>&1 &
    DAEMON_PID=$!
    local t0us=${t0/./} limit=$((BENCH_MOUNT_TIMEOUT * 1000000))
    until ls "$dir" >/dev/null 2>&1; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            DAEMON_PID=
            die "$tool mount exited before answering; log $log: $(tail -n5 "$log" | tr '\n' ' ')"
        fi
        if (( ${EPOCHREALTIME/./} - t0us > limit )); then
            die "$tool mount did not answer within ${BENCH_MOUNT_TIMEOUT}s; log $log"
        fi
        sleep 0.01
    done
    t1=$(now)
    info "$tool mount ($ds, $session; pid $DAEMON_PID, $(cat "/proc/$DAEMON_PID/comm")) answered after $(elapsed "$t0" "$t1")s: ls $dir"
    record "$ds" "$tool" "answer-$session" "$(elapsed "$t0" "$t1")" s "$load" - 0
}

# unmount_tool DATASET TOOL SESSION: records the daemon's peak RSS, unmounts, waits for it.
unmount_tool() {
    local ds=$1 tool=$2 session=$3 hwm i
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$DAEMON_PID/status" 2>/dev/null || echo 0)
    record "$ds" "$tool" "rss-$session" "$hwm" KiB - - 0
    info "$tool daemon (pid $DAEMON_PID) peak RSS $((hwm / 1024)) MiB; unmounting"
    fusermount3 -u "$MNT" 2>>"$LOGS/unmount.err" || umount "$MNT" 2>>"$LOGS/unmount.err" || true
    for ((i = 0; i < 300; i++)); do
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
        info "WARNING: $tool daemon still running 30 s after unmount; killing it"
        stop_daemon
    fi
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=
    unmount_dir "$MNT"
}

# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------

session_find() { # TOOL
    local tool=$1 dir
    wait_quiet "$tool find"
    mount_tool tree "$tool" find
    dir=$(root_in_mount tree "$tool")
    drop_caches
    timed tree "$tool" find -- find "$dir"/ -printf '%s %m\n'
    record tree "$tool" find "$T_WALL" s "$T_LOAD" "$T_OTHER" "$T_RC"
    info "find saw $(wc -l <"$LOGS/tree-$tool-find.out") entries"
    unmount_tool tree "$tool" find
}


session_rsync() { # TOOL (round ROUND)
    local tool=$1 dir dest
    wait_quiet "$tool rsync"
    fresh_restore_fs
    dest=$RESTORE_DIR/$tool
    mkdir -p "$dest"
    mount_tool tree "$tool" "rsync-$ROUND"
    dir=$(root_in_mount tree "$tool")
    drop_caches
    timed tree "$tool" "rsync-$ROUND" -- rsync -a "$dir"/ "$dest"/
    record tree "$tool" "rsync-$ROUND" "$T_WALL" s "$T_LOAD" "$T_OTHER" "$T_RC"
    unmount_tool tree "$tool" "rsync-$ROUND"
    verify_restore "$tool" "$dest" "verify-$ROUND"
    drop_restore_fs
}

# The same restore straight from the local disk, no FUSE (round ROUND).
session_local_rsync() {
    local dest
    wait_quiet "local rsync"
    fresh_restore_fs
    dest=$RESTORE_DIR/local
    mkdir -p "$dest"
    wait_idle "local rsync"
    drop_caches
    timed tree local "rsync-$ROUND" -- rsync -a "${TREE_PATHS[@]}" "$dest"/
    record tree local "rsync-$ROUND" "$T_WALL" s "$T_LOAD" "$T_OTHER" "$T_RC"
    drop_restore_fs
}

# BENCH_RSYNC_ROUNDS rounds of restores; round r starts with the r-th of (tools, local), so no
# tool always goes first or last. Then the median of each tool's rounds is recorded as its
# `rsync` result, and the highest mount time and peak RSS of its rsync sessions as theirs.
rsync_rounds() {
    local order=($BENCH_TOOLS local) n r i tool
    n=${#order[@]}
    for ((r = 1; r <= BENCH_RSYNC_ROUNDS; r++)); do
        ROUND=$r
        say "rsync round $r of $BENCH_RSYNC_ROUNDS"
        for ((i = 0; i < n; i++)); do
            tool=${order[$(((r - 1 + i) % n))]}
            if [ "$tool" = local ]; then
                session_local_rsync
            else
                run_session rsync tree "^(answer-rsync|rsync|rss-rsync|verify)-$r\$" "$tool"
            fi
        done
    done
    awk -F'\t' -v OFS='\t' '
        NR > 1 && $1 == "tree" && match($3, /^(answer-rsync|rsync|rss-rsync|verify)-[0-9]+$/) {
            step = $3; sub(/-[0-9]+$/, "", step); k = $2 SUBSEP step
            n[k]++; v[k, n[k]] = $4; if ($8 != 0) bad[k] = 1
        }
        END {
            for (k in n) {
                split(k, p, SUBSEP); t = p[1]; step = p[2]; c = n[k]
                if (step == "verify") {
                    ok = 1; for (i = 1; i <= c; i++) if (v[k, i] != "ok") { ok = 0; d = v[k, i] }
                    print "tree", t, "verify", ok ? "ok" : d, "-", "-", "-", ok ? 0 : 1
                    continue
                }
                for (i = 1; i <= c; i++) a[i] = v[k, i] + 0
                for (i = 2; i <= c; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
                if (step == "rsync") {
                    med = (c % 2) ? a[(c + 1) / 2] : (a[c / 2] + a[c / 2 + 1]) / 2
                    print "tree", t, "rsync", med, "s", "-", "-", (k in bad) ? 1 : 0
                    print "tree", t, "rsync-range", sprintf("%.2f-%.2f", a[1], a[c]), "s", "-", "-", 0
                } else
                    print "tree", t, step, a[c], (step == "rss-rsync") ? "KiB" : "s", "-", "-", 0
            }
        }' "$RESULTS" >>"$RESULTS"
}

# Compare a restore with the source: content (checksums), type, mode, times, owners, links.
verify_restore() { # TOOL DEST STEP
    local tool=$1 dest=$2 step=$3 src diffs=0 n
    : >"$LOGS/verify-tree-$tool.txt"
    for src in "${TREE_PATHS[@]}"; do
        rsync -anci --delete "$src"/ "$dest/$(path_in_root "$tool" "$src")"/ >>"$LOGS/verify-tree-$tool.txt" 2>&1 || diffs=1
    done
    n=$(grep -cv '^$' "$LOGS/verify-tree-$tool.txt" || true)
    if [ "$n" -eq 0 ] && [ "$diffs" -eq 0 ]; then
        info "verify: $tool restore equals the source"
        record tree "$tool" "$step" ok - - - 0
    else
        info "verify: $tool restore DIFFERS from the source in $n entries, see $LOGS/verify-tree-$tool.txt"
        record tree "$tool" "$step" "$n-differences" - - - 1
    fi
}

session_read() { # TOOL
    local tool=$1 file size mbs
    wait_quiet "$tool read"
    mount_tool image "$tool" read
    file=$(root_in_mount image "$tool")/$(path_in_root "$tool" "$IMG")
    size=$(stat -c %s "$file")
    [ "$size" -eq "$(stat -c %s "$IMG")" ] || info "WARNING: $file has $size bytes, the image $(stat -c %s "$IMG")"
    drop_caches
    timed image "$tool" read-cold -- dd if="$file" of=/dev/null bs=1M
    mbs=$(awk -v s="$size" -v t="$T_WALL" 'BEGIN { printf "%.0f", s / 1e6 / t }')
    info "cold read: $mbs MB/s"
    record image "$tool" read-cold "$mbs" MB/s "$T_LOAD" "$T_OTHER" "$T_RC"
    timed image "$tool" read-warm -- dd if="$file" of=/dev/null bs=1M
    mbs=$(awk -v s="$size" -v t="$T_WALL" 'BEGIN { printf "%.0f", s / 1e6 / t }')
    info "warm re-read: $mbs MB/s"
    record image "$tool" read-warm "$mbs" MB/s "$T_LOAD" "$T_OTHER" "$T_RC"
    if timeout "$BENCH_TIMEOUT" cmp "$IMG" "$file" >"$LOGS/verify-image-$tool.txt" 2>&1; then
        info "verify: $tool serves the image byte for byte"
        record image "$tool" verify ok - - - 0
    else
        info "verify: $tool's image DIFFERS: $(head -c 300 "$LOGS/verify-image-$tool.txt")"
        record image "$tool" verify differs - - - 1
    fi
    unmount_tool image "$tool" read
}

# The same find straight from the local disk (cold): what the client side costs without any
# FUSE daemon. (The local rsync baseline runs in every rsync round, rsync_rounds.)
local_baselines() {
    wait_quiet "local baselines"
    wait_idle "local find"
    drop_caches
    timed tree local find -- find "${TREE_PATHS[@]}" -printf '%s %m\n'
    record tree local find "$T_WALL" s "$T_LOAD" "$T_OTHER" "$T_RC"
}

# Cold read of the backtree image repository's files straight from the disk: what the disk
# delivers (compressed bytes) when nothing is cached.
disk_baseline() {
    local repo bytes
    repo=$(repo_of image backtree)
    [ -d "$repo" ] || return 0
    wait_quiet "disk baseline"
    bytes=$(du -sb "$repo" | cut -f1)
    wait_idle "disk baseline"
    drop_caches
    timed image disk read-repo -- sh -c 'tar -C "$1" -cf - . | cat >/dev/null' disk "$repo"
    record image disk read-repo "$(awk -v s="$bytes" -v t="$T_WALL" 'BEGIN { printf "%.0f", s / 1e6 / t }')" \
        MB/s "$T_LOAD" "$T_OTHER" "$T_RC"
}

# Decode ceiling: every data blob of the backtree image repository decompressed and verified
# from memory by crates/core/examples/decode_ceiling.rs with one thread per core, no FUSE and
# no I/O. A cold read through the mount must do this for every byte as well as what the FUSE
# ceiling measures, so the two together bound it. Best of 3.
decode_ceiling() {
    local repo bin log=$LOGS/decode-ceiling.log size out runs=() r
    repo=$(repo_of image backtree)
    [ -d "$repo" ] || return 0
    wait_quiet "decode ceiling build"
    say "decode ceiling: building crates/core/examples/decode_ceiling.rs"
    if ! (cd "$ROOT" && CARGO_TARGET_DIR=$BENCH_TARGET cargo build --release -q -p backtree-core \
        --example decode_ceiling) >"$log" 2>&1; then
        info "WARNING: decode_ceiling did not build, see $log; skipping"
        return 0
    fi
    bin=$BENCH_TARGET/release/examples/decode_ceiling
    size=$(stat -c %s "$IMG")
    for r in 1 2 3; do
        wait_idle "decode ceiling (run $r)"
        out=$("$bin" "$repo" "$(nproc)" 2>>"$log") || { info "WARNING: decode_ceiling failed, see $log"; return 0; }
        runs+=("$(awk -v s="$size" -v o="$out" 'BEGIN { split(o, f, " "); printf "%.0f %.0f", s / 1e6 / f[2], f[1] / 1e6 / f[2] }')")
        info "decode ceiling (run $r): ${runs[-1]% *} MB/s of the image, ${runs[-1]#* } MB/s decoded"
    done
    r=$(printf '%s\n' "${runs[@]}" | sort -n | tail -n1)
    record image decode read "${r% *}" MB/s - - 0
    record image decode read-raw "${r#* }" MB/s - - 0
}

# ---------------------------------------------------------------------------------------------
# FUSE ceiling: a minimal fuser (0.18) server with one 4 GiB file of a repeated pattern
# generated in memory, read with dd like the image; once with default settings, once with the
# mount's read_ahead_kb raised to READ_AHEAD_KB (as backtree does when run as root).
# ---------------------------------------------------------------------------------------------

write_ceiling_project() {
    mkdir -p "$CEIL_DIR/src"
    cat >"$CEIL_DIR/Cargo.toml" <<'EOF'
[package]
name = "fuse-ceiling"
version = "0.1.0"
edition = "2021"

[dependencies]
fuser = { version = "0.18", default-features = false }

[profile.release]
opt-level = 3
EOF
    cat >"$CEIL_DIR/src/main.rs" <<'EOF'
// One read-only file, 4 GiB of a repeated pattern held in memory: what FUSE delivers when the
// filesystem answers from memory. Structure copied from fuser 0.18's examples/hello.rs.
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEntry, Request,
};
use std::ffi::OsStr;
use std::time::{Duration, UNIX_EPOCH};

const TTL: Duration = Duration::from_secs(3600);
const SIZE: u64 = 4 << 30;
const PAT: usize = 1 << 20;

fn attr(ino: u64) -> FileAttr {
    let (kind, perm, size, nlink) = if ino == 1 {
        (FileType::Directory, 0o755, 0, 2)
    } else {
        (FileType::RegularFile, 0o444, SIZE, 1)
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size / 512,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

struct Ceiling {
    pattern: Vec<u8>, // 2 MiB, so any read of at most 1 MiB is one slice
}

impl Filesystem for Ceiling {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The same kernel settings as backtree's FUSE adapter (crates/fs/src/fuse.rs).
        let _ = config
            .set_max_readahead(1 << 20)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(64);
        for cap in [InitFlags::FUSE_ASYNC_READ, InitFlags::FUSE_MAX_PAGES] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if u64::from(parent) == 1 && name.to_str() == Some("data.bin") {
            reply.entry(&TTL, &attr(2), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match u64::from(ino) {
            1 | 2 => reply.attr(&TTL, &attr(u64::from(ino))),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if u64::from(ino) != 2 {
            return reply.error(Errno::ENOENT);
        }
        if offset >= SIZE {
            return reply.data(&[]);
        }
        let n = (size as u64).min(SIZE - offset).min(PAT as u64) as usize;
        let start = (offset % PAT as u64) as usize;
        reply.data(&self.pattern[start..start + n]);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if u64::from(ino) != 1 {
            return reply.error(Errno::ENOENT);
        }
        let entries = [
            (1, FileType::Directory, "."),
            (1, FileType::Directory, ".."),
            (2, FileType::RegularFile, "data.bin"),
        ];
        for (i, e) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.0), (i + 1) as u64, e.1, e.2) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() {
    let mountpoint = std::env::args_os().nth(1).expect("usage: fuse-ceiling MOUNTPOINT");
    let pattern: Vec<u8> = (0..2 * PAT).map(|i| (i % PAT % 251) as u8).collect();
    let mut cfg = Config::default();
    cfg.mount_options.extend([
        MountOption::RO,
        MountOption::NoAtime,
        MountOption::FSName("fuse-ceiling".to_string()),
    ]);
    cfg.n_threads = Some(2); // as backtree

    fuser::mount(Ceiling { pattern }, mountpoint, &cfg).unwrap();
}
EOF
}

ceiling() {
    [ "$BENCH_CEILING" = 1 ] || return 0
    local bin log=$LOGS/ceiling-build.log bdi mbs i
    wait_quiet "fuse ceiling build"
    say "FUSE ceiling: building a minimal fuser in-memory file server in $CEIL_DIR"
    write_ceiling_project
    if ! (cd "$CEIL_DIR" && CARGO_TARGET_DIR=$CEIL_DIR/target timeout "$BENCH_TIMEOUT" cargo build --release --offline -q) >"$log" 2>&1 &&
        ! (cd "$CEIL_DIR" && CARGO_TARGET_DIR=$CEIL_DIR/target timeout "$BENCH_TIMEOUT" cargo build --release -q) >>"$log" 2>&1; then
        info "WARNING: the ceiling program did not build, see $log; skipping"
        return 0
    fi
    bin=$CEIL_DIR/target/release/fuse-ceiling
    CEIL_MNT=$BENCH_DIR/ceiling-mnt
    mkdir -p "$CEIL_MNT"
    for mode in default ra; do
        wait_quiet "fuse ceiling $mode"
        unmount_dir "$CEIL_MNT"
        "$bin" "$CEIL_MNT" >"$LOGS/ceiling-$mode.log" 2>&1 &
        DAEMON_PID=$!
        for ((i = 0; i < 500; i++)); do [ -e "$CEIL_MNT/data.bin" ] && break; sleep 0.01; done
        [ -e "$CEIL_MNT/data.bin" ] || { info "WARNING: ceiling mount did not answer"; stop_daemon; return 0; }
        if [ "$mode" = ra ]; then
            bdi=/sys/class/bdi/$(mountpoint -d "$CEIL_MNT")/read_ahead_kb
            echo "$READ_AHEAD_KB" >"$bdi" || info "WARNING: cannot write $bdi"
        fi
        local runs=()
        for r in 1 2 3; do
            wait_idle "FUSE ceiling read ($mode, run $r)"
            drop_caches # the pattern is in memory; this only makes sure the kernel caches nothing
            timed ceiling fuse "read-$mode-$r" -- dd if="$CEIL_MNT/data.bin" of=/dev/null bs=1M
            mbs=$(awk -v s=$((4 << 30)) -v t="$T_WALL" 'BEGIN { printf "%.0f", s / 1e6 / t }')
            info "FUSE ceiling ($mode, run $r): $mbs MB/s"
            record ceiling fuse "read-$mode-$r" "$mbs" MB/s "$T_LOAD" "$T_OTHER" "$T_RC"
            runs+=("$mbs")
        done
        # The best of the three runs: disturbances only ever lower a ceiling.
        record ceiling fuse "read-$mode" "$(printf '%s\n' "${runs[@]}" | sort -n | tail -n1)" MB/s - - 0
        record ceiling fuse "range-$mode" "$(printf '%s\n' "${runs[@]}" | sort -n | sed -n '1p;3p' | paste -sd-)" MB/s - - 0
        fusermount3 -u "$CEIL_MNT" || true
        wait "$DAEMON_PID" 2>/dev/null || true
        DAEMON_PID=
    done
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

machine_info() {
    machine_lines
    echo "- Tools: backtree $("$BT" --version | awk '{ print $2 }') (git ${BUILT_REV:-unknown, prebuilt binary}, release build," \
        "mount with ${BENCH_CACHE_SIZE:-the default} --cache-size); $(restic version | awk '{ print $1, $2 }');" \
        "$(borg --version) (FUSE binding: $(borg_fuse | sed 's/ $//'));" \
        "$(fusermount3 --version 2>&1 | head -n1); $(rsync --version | head -n1 | awk '{ print $1, $3 }')"
    echo "- Restores (d): $BENCH_RSYNC_ROUNDS rounds, each with every tool and the local baseline in a rotated order, into $RESTORE_FS; the median of the rounds is reported"
    echo "- Load average (1/5/15 min) at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg);" \
        "each timed step below also shows the 1-minute load when it started and the CPU seconds" \
        "other processes used during it"
    if [ "$NOISY" -gt 0 ]; then
        echo "- **Noise warning:** scripts/bench.sh was still running at $NOISY step(s) after waiting ${BENCH_QUIET_WAIT}s"
    else
        echo "- No scripts/bench.sh was running during any step (the script waits for it)"
    fi
    echo "- Before each timed step the script waited for other processes to use under 15% of a core" \
        "(${IDLE_WAITED}s of waiting in all, including the 2 s checks);" \
        "$([ "$BUSY" -gt 0 ] && echo "**$BUSY step(s) started while the machine was still busy**" || echo "every step started on an idle machine")." \
        "A session during which other processes used more than $BENCH_NOISE CPU s in a timed step is" \
        "repeated (up to $BENCH_RETRIES times): $REPEATS repeat(s) in this run$([ "$DISTURBED" -gt 0 ] && echo ", **$DISTURBED session(s) still disturbed after the last repeat**")"
}

report() {
    awk -F'\t' -v tools="$BENCH_TOOLS" -v cs="$BENCH_CACHE_SIZE" -v rounds="$BENCH_RSYNC_ROUNDS" -v ra="$READ_AHEAD_KB" '
    function v(ds, t, s) { return ((ds SUBSEP t SUBSEP s) in val) ? val[ds, t, s] : "" }
    function num(x) { return x != "" && x != "-" }
    function fmt(x, f) { return num(x) ? sprintf(f, x) : "n/a" }
    # Ratio "how much better is backtree": times and memory: other / backtree; speeds: backtree / other.
    function adv(b, o, speed) {
        if (!num(b) || !num(o) || b <= 0 || o <= 0) return "n/a"
        return sprintf("%.2f", speed ? b / o : o / b)
    }
    function maxof(ds, t, prefix,    k, m, p) {
        m = ""
        for (k in val) { split(k, p, SUBSEP)
            if (p[1] == ds && p[2] == t && index(p[3], prefix) == 1 && (m == "" || val[k] + 0 > m + 0)) m = val[k] }
        return m
    }
    function rssmax(t,    a, b) { a = maxof("tree", t, "rss-"); b = maxof("image", t, "rss-")
        if (a == "") return b; if (b == "") return a; return (a + 0 > b + 0) ? a : b }
    function failed(ds, t, s) { return ((ds SUBSEP t SUBSEP s) in rc) && rc[ds, t, s] != 0 }
    function cell(ds, t, s, f,   x) { x = fmt(v(ds, t, s), f); return failed(ds, t, s) ? x " (FAILED)" : x }
    NR == 1 { next }
    { val[$1, $2, $3] = $4; load[$1, $2, $3] = $6; other[$1, $2, $3] = $7; rc[$1, $2, $3] = $8 }
    END {
        n = split(tools, T, " ")
        printf "| measurement | unit |"; for (i = 1; i <= n; i++) printf " %s |", T[i]
        printf " backtree vs restic | backtree vs borg |\n"
        printf "|---|---|"; for (i = 1; i <= n; i++) printf "---:|"; printf "---:|---:|\n"
        rows = split("tree|answer-find|s|%.3f|0;tree|answer-rsync|s|%.3f|0;image|answer-read|s|%.3f|0;" \
            "tree|find|s|%.2f|0;tree|rsync|s|%.2f|0;image|read-cold|MB/s|%d|1;image|read-warm|MB/s|%d|1;" \
            "tree|rss-find|MiB|%.1f|0;tree|rss-rsync|MiB|%.1f|0;image|rss-read|MiB|%.1f|0", R, ";")
        split("(a) mount answers, tree repo (find session);(a) mount answers, tree repo (rsync sessions, slowest);" \
            "(a) mount answers, image repo;(b) cold find over the tree;(d) cold rsync -a restore of the tree, median of the rounds;" \
            "(c) cold sequential read of the image;(c) warm re-read of the image (same mount);" \
            "(e) daemon peak RSS, find session;(e) daemon peak RSS, rsync session;(e) daemon peak RSS, image read session", L, ";")
        for (r = 1; r <= rows; r++) {
            split(R[r], f, "|")
            printf "| %s | %s |", L[r], f[3]
            for (i = 1; i <= n; i++) {
                x = v(f[1], T[i], f[2])
                if (f[3] == "MiB" && num(x)) x = x / 1024
                printf " %s%s |", fmt(x, f[4]), failed(f[1], T[i], f[2]) ? " (FAILED)" : ""
            }
            b = v(f[1], "backtree", f[2])
            printf " %s | %s |\n", adv(b, v(f[1], "restic", f[2]), f[5]), adv(b, v(f[1], "borg", f[2]), f[5])
        }
        print ""
        print "Ratios: how many times better backtree is (other ÷ backtree for times and memory," \
              " backtree ÷ other for MB/s); above 1 means backtree is faster or smaller. MB/s is" \
              " the image file'"'"'s apparent size (10^6 bytes) over wall time."
        print ""
        # Noise per timed step.
        print "| timed step | " tools_hdr(T, n) " |"
        printf "|---|"; for (i = 1; i <= n; i++) printf "---|"; print ""
        split("tree|find;image|read-cold;image|read-warm", S, ";")
        for (s = 1; s <= 3; s++) {
            split(S[s], f, "|")
            printf "| %s |", f[2]
            for (i = 1; i <= n; i++) {
                k = f[1] SUBSEP T[i] SUBSEP f[2]
                printf " %s |", (k in load) ? "load " load[k] ", others " other[k] " CPU s" : "n/a"
            }
            print ""
        }
        print ""
        nz = ""
        for (r = 1; r <= 3; r++) { k = "ceiling" SUBSEP "fuse" SUBSEP "read-default-" r; if (k in other) nz = nz (nz == "" ? "" : ", ") other[k] }
        for (r = 1; r <= 3; r++) { k = "ceiling" SUBSEP "fuse" SUBSEP "read-ra-" r; if (k in other) nz = nz (r == 1 ? " / " : ", ") other[k] }
        k = "image" SUBSEP "disk" SUBSEP "read-repo"
        print "(\"load\": 1-minute load average when the step started, which still counts this script'"'"'s own" \
              " previous steps; \"others\": CPU seconds used by processes other than the daemon, the" \
              " client and kernel threads during the step. FUSE ceiling reads, default / read_ahead_kb " ra ": others " \
              (nz == "" ? "n/a" : nz) " CPU s; disk baseline: others " ((k in other) ? other[k] : "n/a") " CPU s.)"
        print ""
        # The restore rounds.
        printf "Restore rounds (d), `rsync -a` of the tree into a fresh ext4, seconds (others: CPU seconds used by other processes during it):\n\n"
        printf "| round |"; for (i = 1; i <= n; i++) printf " %s |", T[i]; printf " local, no FUSE | backtree ÷ borg |\n"
        printf "|---|"; for (i = 1; i <= n + 2; i++) printf "---:|"; print ""
        met = 0; counted = 0
        for (r = 1; r <= rounds; r++) {
            printf "| %d |", r
            for (i = 1; i <= n + 1; i++) {
                t = (i <= n) ? T[i] : "local"; k = "tree" SUBSEP t SUBSEP "rsync-" r
                printf " %s |", (k in val) ? sprintf("%.2f (others %s)", val[k], other[k]) (failed("tree", t, "rsync-" r) ? " FAILED" : "") : "n/a"
            }
            b = v("tree", "backtree", "rsync-" r); o = v("tree", "borg", "rsync-" r)
            if (num(b) && num(o)) { counted++; if (b <= o / 2) met++; printf " %.2f |\n", b / o } else print " n/a |"
        }
        printf "| median |"
        for (i = 1; i <= n + 1; i++) { t = (i <= n) ? T[i] : "local"; printf " %s (%s) |", fmt(v("tree", t, "rsync"), "%.2f"), v("tree", t, "rsync-range") }
        b = v("tree", "backtree", "rsync"); o = v("tree", "borg", "rsync")
        printf " %s |\n\n", (num(b) && num(o)) ? sprintf("%.2f", b / o) : "n/a"
        disk = v("image", "disk", "read-repo")
        c1 = v("ceiling", "fuse", "read-default"); c2 = v("ceiling", "fuse", "read-ra")
        lf = v("tree", "local", "find"); lr = v("tree", "local", "rsync")
        if (num(lf) || num(lr)) printf "- Local baseline, no FUSE: the same cold `find` straight from the local disk takes %s s (others used %s CPU s), the same cold `rsync -a` into a fresh ext4 %s s (median of the rounds, range %s).\n", fmt(lf, "%.2f"), other["tree", "local", "find"], fmt(lr, "%.2f"), v("tree", "local", "rsync-range")
        if (num(disk)) printf "- Disk: a cold `tar | cat` of the backtree image repository reads %d MB/s (compressed bytes).\n", disk
        if (num(c1) || num(c2)) printf "- FUSE ceiling (a minimal fuser 0.18 server with backtree'"'"'s kernel settings and 2 threads, one 4 GiB file served from memory, `dd bs=1M`, best of 3 reads): %s MB/s (range %s) with the default `read_ahead_kb`, %s MB/s (range %s) with `read_ahead_kb` %d (what backtree sets as root).\n", fmt(c1, "%d"), v("ceiling", "fuse", "range-default"), fmt(c2, "%d"), v("ceiling", "fuse", "range-ra"), ra
        else print "- FUSE ceiling: not measured in this run; the documented figure (docs field notes, same machine type) is 1–2 GB/s with default settings and 1.2–3.9 GB/s with `read_ahead_kb` 1024."
        dc = v("image", "decode", "read")
        if (num(dc)) printf "- Decode ceiling (no FUSE, no I/O: every data blob of the backtree image repository decompressed and BLAKE3-verified from memory, one thread per core, `crates/core/examples/decode_ceiling.rs`, best of 3): %d MB/s of the image (%d MB/s of decoded data).\n", dc, v("image", "decode", "read-raw")
        if (num(dc) && num(c2)) printf "- Both at once: a cold read must decode every byte and pass it through FUSE on the same 2 cores, so it can take no less than the sum of the two times, at most %d MB/s (1 / (1/%d + 1/%d)).\n", 1 / (1 / dc + 1 / c2), dc, c2
        vt = ""
        for (i = 1; i <= n; i++) { x = v("tree", T[i], "verify"); y = v("image", T[i], "verify")
            vt = vt sprintf("%s%s: tree restore %s, image %s", (i > 1 ? "; " : ""), T[i], x == "" ? "n/a" : x, y == "" ? "n/a" : y) }
        print "- Correctness (untimed, after each session): " vt "."
        print ""
        # Targets.
        print "Targets:"
        print ""
        bc = v("image", "backtree", "read-cold"); oc = v("image", "borg", "read-cold")
        comb = (num(dc) && num(c2)) ? sprintf(" (and %.0f%% of the decode-plus-FUSE bound, %d MB/s)", 100 * bc * (1 / dc + 1 / c2), 1 / (1 / dc + 1 / c2)) : ""
        if (num(bc) && num(oc) && num(c2))
            printf "- Cold sequential read at least 2× borg'"'"'s and close to the FUSE ceiling (taken as at least half of the measured ceiling with read_ahead_kb %d, %d MB/s): %d MB/s = %.2f× borg, %.0f%% of the ceiling%s: **%s**\n",
                ra, c2, bc, bc / oc, 100 * bc / c2, comb, (bc >= 2 * oc && bc >= c2 / 2) ? "met" : ((bc >= 2 * oc) ? "not met (2× borg met, near the ceiling not)" : "not met")
        else if (num(bc) && num(oc))
            printf "- Cold sequential read at least 2× borg'"'"'s and close to the FUSE ceiling: %d MB/s = %.2f× borg: **%s**; the ceiling was not measured in this run (BENCH_CEILING=0), so closeness to it is not judged\n",
                bc, bc / oc, (bc >= 2 * oc) ? "2× borg met" : "not met"
        bw = v("image", "backtree", "read-warm")
        if (num(bw)) printf "- Warm re-read at least 3 GB/s: %d MB/s: **%s**\n", bw, (bw >= 3000) ? "met" : "not met"
        br = v("tree", "backtree", "rsync"); orr = v("tree", "borg", "rsync")
        if (num(br) && num(orr)) printf "- rsync -a of the tree in at most half borg'"'"'s time: medians of %d rounds %.1f s vs %.1f s (%.2f of borg'"'"'s; met in %d of %d rounds): **%s**\n", rounds, br, orr, br / orr, met, counted, (br <= orr / 2) ? "met" : "not met"
        a1 = v("tree", "backtree", "answer-find"); a2 = v("tree", "backtree", "answer-rsync"); a3 = v("image", "backtree", "answer-read")
        am = a1; if (a2 + 0 > am + 0) am = a2; if (a3 + 0 > am + 0) am = a3
        if (num(am)) printf "- Mount answering in under 0.2 s: slowest of the three cold mounts %.3f s: **%s**\n", am, (am < 0.2) ? "met" : "not met"
        bf = v("tree", "backtree", "find"); rf = v("tree", "restic", "find")
        if (num(bf) && num(rf)) printf "- Cold find at least 3× faster than restic'"'"'s: %.2f s vs %.2f s (%.2f×): **%s**\n", bf, rf, rf / bf, (rf >= 3 * bf) ? "met" : "not met"
        m = rssmax("backtree")
        if (num(m)) printf "- backtree peak RSS under 100 MB with default settings: highest of the three sessions %.1f MB (%.1f MiB): **%s**%s\n", m * 1024 / 1e6, m / 1024, (m * 1024 < 100e6) ? "met" : "not met", (cs != "" ? " (NOTE: run with --cache-size " cs ")" : "")
    }
    function tools_hdr(T, n,   s, i) { s = ""; for (i = 1; i <= n; i++) s = s (i > 1 ? " | " : "") T[i]; return s }
    ' "$RESULTS"
}

write_report() {
    local md=$BENCH_DIR/results.md
    results_md "### Run of $(date -u '+%Y-%m-%d')" >"$md"
    publish_results "$md" "<!-- bench-mount:begin -->" "<!-- bench-mount:end -->" "Mount benchmarks"
}

# ---------------------------------------------------------------------------------------------

main() {
    local start tool
    start=$(now)
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    prerequisites
    prepare_workdir
    build_backtree
    read -r -a TREE_PATHS <<<"$BENCH_TREE"

    say "dataset tree: ${TREE_PATHS[*]}"
    TREE_BYTES=$(logical_size "${TREE_PATHS[@]}")
    printf 'tree\t%s files and directories, %s MiB in regular files, in %s\n' \
        "$(find "${TREE_PATHS[@]}" -xdev | wc -l)" "$((TREE_BYTES / 1048576))" \
        "${TREE_PATHS[*]}" >>"$BENCH_DIR/datasets.txt"
    make_image
    printf 'image\t%s GiB sparse ext4 image (%s), filesystem %s full, %s MiB allocated\n' "$BENCH_IMAGE_GB" \
        "$IMAGE_MODE" "$IMAGE_FILL" "$(($(du -B1 "$IMG" | cut -f1) / 1048576))" >>"$BENCH_DIR/datasets.txt"

    say "ingesting (not timed)"
    for tool in $BENCH_TOOLS; do
        wait_quiet "$tool ingest"
        ingest tree "$tool" "${TREE_PATHS[@]}"
        ingest image "$tool" "$IMG"
    done

    say "measuring"
    for tool in $BENCH_TOOLS; do
        say "$tool"
        run_session find tree '^(answer-find|find|rss-find)$' "$tool"
        run_session read image '^(answer-read|read-cold|read-warm|rss-read|verify)$' "$tool"
    done
    local_baselines
    rsync_rounds
    disk_baseline
    decode_ceiling
    ceiling
    write_report
    say "done in $(elapsed "$start" "$(now)" | cut -d. -f1) s; logs in $LOGS"
}

main "$@"
