#!/usr/bin/env bash
# Restore benchmark (issue 15): `backtree restore` against `restic restore` and `borg extract` of
# the same data in the same run, and restores onto an existing copy with ~1% changed against
# `rsync` from `backtree mount`. docs/benchmarks-restore.md.
#
# Datasets (each ingested by every tool into its own fresh repository; ingest is not timed;
# lib/datasets.sh, as the mount benchmark)
#   tree   system files (BENCH_TREE, default /usr/share and /usr/lib/x86_64-linux-gnu)
#   image  one large file: a sparse ext4 disk image (BENCH_IMAGE_GB GiB) filled to ~70% with
#          files copied from /usr (or a copy of BENCH_IMAGE_REUSE if that exists)
#
# Parts (BENCH_RESTORE_PARTS):
#   full  every dataset restored by every tool into a fresh, empty ext4 (a loop-mounted sparse
#         file made for each restore):
#           backtree  backtree restore --json [--jobs BENCH_JOBS] DATASET/latest DEST
#           restic    restic restore latest --target DEST
#           borg      (cd DEST && borg extract REPO::DATASET)   image: with --sparse
#           mount     reference: rsync -a MOUNT/DATASET/latest/ DEST/ from a `backtree mount`
#                     (image: rsync -a --sparse); the mount is started before the timed step
#         (restic 0.14 has no sparse restore: it writes the image's holes as zeros.)
#   incr  an existing copy with ~BENCH_CHANGE_PCT % changed, then restored over. For each
#         variant the copy is made afresh (fresh ext4, an untimed `backtree restore`, then the
#         same deterministic changes):
#           tree:  of the regular files, every (100/BENCH_CHANGE_PCT)-th in name order is
#                  changed, in turn: 4 KiB overwritten in the middle (new mtime), mtime only
#                  touched, deleted, 4 KiB appended; plus one extra 16 KiB file per four
#                  changed. Variants: `backtree restore`, `backtree restore --delete`, and
#                  `rsync -a --delete` from the backtree mount.
#           image: BENCH_CHANGE_PCT % of the image's bytes overwritten with random data, in
#                  runs of BENCH_IMAGE_RUN_KB KiB spread evenly over the file (new mtime). Variants: `backtree
#                  restore`, `backtree restore --checksum`, and `rsync -a --inplace
#                  --no-whole-file` from the backtree mount (what an admin would run to update
#                  a big file in place: only differing blocks written, no second copy).
#
# Every measurement is repeated BENCH_ROUNDS times, round r running the tools (or variants) in
# an order rotated by r, so none always goes first; the report shows the median round and the
# range. Measured per timed step, after waiting for an idle machine and dropping the page cache: wall
# seconds (including a final sync: the data is on disk), CPU seconds (user + system; for the
# mount rows rsync's plus the mount daemon's), peak RSS (/usr/bin/time %M; mount rows: the
# higher of rsync's and the daemon's VmHWM), bytes read from the disk (/proc/PID/io read_bytes
# of the process tree; the mount rows add the daemon's), and for backtree its `--json` summary:
# bytes fetched from the store (decompressed), files written, unchanged, removed. The CPU time
# other processes used during the step is recorded as a noise gauge, with the load average.
# Afterwards (untimed) every restore is compared with the source: the tree with `rsync -anci`
# (content checksums, types, modes, times, owners; `--delete` too unless extras are expected),
# the image with cmp.
#
# Output in BENCH_DIR: results.tsv, results.md (also printed), logs/. With BENCH_DOC set,
# results.md replaces the section between `<!-- bench-restore:begin -->` and
# `<!-- bench-restore:end -->` of BENCH_DOC.
#
# Needs root (drop_caches, loop mounts, FUSE). Usage: scripts/bench-restore.sh (or
# scripts/bench.sh --restore)
# Environment (defaults in brackets):
#   BENCH_DIR           work directory, wiped at start            [/tmp/backtree-bench-restore]
#   BENCH_TARGET        cargo target dir for the release build    [/tmp/backtree-bench-target]
#   BENCH_BACKTREE      use this backtree binary, skip the build  []
#   BENCH_TREE          paths of the tree dataset                 [/usr/share /usr/lib/x86_64-linux-gnu]
#   BENCH_IMAGE_GB      image size, GiB (whole number)            [2]
#   BENCH_IMAGE_FILL    percent of the image filesystem to fill   [70]
#   BENCH_IMAGE_SRC     where the image's files are copied from   [/usr]
#   BENCH_IMAGE_REUSE   copy this image instead of making one, if it exists and has the
#                       right size (cp --sparse=always)           [/tmp/backtree-bench/image/disk.img]
#   BENCH_DATASETS      datasets to run                           [tree image]
#   BENCH_RESTORE_PARTS parts to run                              [full incr]
#   BENCH_TOOLS         tools of the full part ("mount" is the rsync reference; "floor" copies
#                       the dataset from a tmpfs copy with `cp -a`: what writing it alone costs)
#                                                                 [backtree restic borg mount floor]
#   BENCH_JOBS          backtree restore --jobs, '' = its default []
#   BENCH_CHANGE_PCT    percent changed for the incremental part  [1]
#   BENCH_IMAGE_RUN_KB  size of one changed run in the image, KiB [256]
#   BENCH_ROUNDS        rounds of every measurement; the median counts [3]
#   BENCH_TIMEOUT       seconds before one restore is killed      [1800]
#   BENCH_QUIET_WAIT    seconds to wait for another scripts/bench*.sh to finish [1200]
#   BENCH_IDLE_WAIT     seconds to wait for an idle machine before each timed step [300]
#   BENCH_DOC           markdown file to update, '' for none      [docs/benchmarks-restore.md]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
unset BACKTREE_CACHE_DIR
BENCH_DIR=${BENCH_DIR:-/tmp/backtree-bench-restore}
BENCH_TARGET=${BENCH_TARGET:-/tmp/backtree-bench-target}
BENCH_BACKTREE=${BENCH_BACKTREE:-}
BENCH_TREE=${BENCH_TREE:-/usr/share /usr/lib/x86_64-linux-gnu}
BENCH_IMAGE_GB=${BENCH_IMAGE_GB:-2}
BENCH_IMAGE_FILL=${BENCH_IMAGE_FILL:-70}
BENCH_IMAGE_SRC=${BENCH_IMAGE_SRC:-/usr}
BENCH_IMAGE_REUSE=${BENCH_IMAGE_REUSE-/tmp/backtree-bench/image/disk.img}
BENCH_DATASETS=${BENCH_DATASETS:-tree image}
BENCH_RESTORE_PARTS=${BENCH_RESTORE_PARTS:-full incr}
BENCH_TOOLS=${BENCH_TOOLS:-backtree restic borg mount floor}
BENCH_JOBS=${BENCH_JOBS:-}
BENCH_CHANGE_PCT=${BENCH_CHANGE_PCT:-1}
BENCH_IMAGE_RUN_KB=${BENCH_IMAGE_RUN_KB:-256}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-1800}
BENCH_QUIET_WAIT=${BENCH_QUIET_WAIT:-1200}
BENCH_IDLE_WAIT=${BENCH_IDLE_WAIT:-300}
BENCH_DOC=${BENCH_DOC-$ROOT/docs/benchmarks-restore.md}
RESTORE_FS="a fresh ext4 for every restore (loop-mounted sparse file, mkfs.ext4 with the journal and inode tables written at mkfs)"

MNT=$BENCH_DIR/mnt   # where the backtree mount goes
LOOP=$BENCH_DIR/loop # where the image is loop-mounted while it is filled
RESULTS=$BENCH_DIR/results.tsv
SHM=/dev/shm/backtree-bench-restore # the floor's source: the datasets copied into memory
LOGS=$BENCH_DIR/logs
IMG=$BENCH_DIR/image/disk.img
CLK_TCK=$(getconf CLK_TCK)
# backtree's index cache, wiped with the rest (restic's is RESTIC_CACHE, borg's BORG_BASE_DIR).
export XDG_CACHE_HOME=$BENCH_DIR/cache
DAEMON_PID=
NOISY=0 BUSY=0 IDLE_WAITED=0

# wait_quiet waits for the other benchmarks, so they do not disturb each other (not for this one
# started as `scripts/bench.sh --restore`, which a wrapper's command line may still show).
OTHER_BENCH_RE='scripts/bench(-(mount|prune|s3|scale|stream|gzip)\.sh|\.sh$|\.sh +--(mount|stream-rss|gzip|s3|scale|prune))'
OTHER_BENCH="another scripts/bench*.sh"

SCRIPT_NAME=bench-restore.sh
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$ROOT/scripts/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/datasets.sh
. "$ROOT/scripts/lib/datasets.sh"

# ---------------------------------------------------------------------------------------------
# Prerequisites, build, work directory
# ---------------------------------------------------------------------------------------------

prerequisites() {
    need_root "drop_caches, loop mounts, FUSE"
    install_missing restic:restic borg:borgbackup fusermount3:fuse3 rsync:rsync /usr/bin/time:time \
        mkfs.ext4:e2fsprogs jq:jq python3:python3 cmp:diffutils
    [ -e /dev/fuse ] || die "/dev/fuse is missing"
    command -v cargo >/dev/null || [ -n "$BENCH_BACKTREE" ] || die "cargo not found"
}

build_backtree() {
    if ! use_prebuilt; then
        wait_quiet "build"
        build_release
        BUILT_REV=$(source_rev)
    fi
    private_copy
    "$BT" restore --help 2>/dev/null | grep -q -- '--json' || die "$BT has no restore --json"
}

prepare_workdir() {
    check_workdir
    say "cleaning work directory $BENCH_DIR"
    unmount_dir "$MNT"
    unmount_dir "$LOOP"
    drop_restore_fs
    rm -rf "$BENCH_DIR"
    mkdir -p "$BENCH_DIR" "$LOGS" "$MNT" "$LOOP" "$BENCH_DIR/image" "$BENCH_DIR/repos"
    touch "$BENCH_DIR/$WORKDIR_MARK"
    printf 'part\tdataset\ttool\tround\twall\tcpu\trss_kb\tfetched\tdisk_read\twritten\tunchanged\tremoved\tverify\tload\tothers\trc\n' >"$RESULTS"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_daemon
    rm -rf "$SHM"
    unmount_dir "$MNT"
    unmount_dir "$LOOP"
    drop_restore_fs
    exit "$rc"
}

# ---------------------------------------------------------------------------------------------
# The backtree mount (the rsync reference)
# ---------------------------------------------------------------------------------------------

# mount_backtree DATASET: starts `backtree mount` of the dataset's repository on MNT and waits
# until the generation answers; sets DAEMON_PID.
mount_backtree() {
    local ds=$1 log=$LOGS/mount-$1.log i
    unmount_dir "$MNT"
    "$BT" mount --repo "$(repo_of "$ds" backtree)" "$MNT" >"$log" 2>&1 &
    DAEMON_PID=$!
    for ((i = 0; i < 6000; i++)); do
        ls "$MNT/$ds/latest" >/dev/null 2>&1 && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || die "backtree mount exited; see $log"
        sleep 0.01
    done
    die "backtree mount did not answer within 60 s; see $log"
}

unmount_backtree() {
    local i
    fusermount3 -u "$MNT" 2>>"$LOGS/unmount.err" || umount "$MNT" 2>>"$LOGS/unmount.err" || true
    for ((i = 0; i < 300; i++)); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    stop_daemon
    unmount_dir "$MNT"
}

# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

# measure LOG DIR -- COMMAND...: waits for a quiet, idle machine, drops the page cache, runs
# COMMAND in DIR (stdout to LOG.out, stderr to LOG.err) under /usr/bin/time inside a wrapper
# shell that saves its own /proc/PID/io afterwards (a reaped child's I/O counts are added to its
# parent's), then syncs. The mount daemon (DAEMON_PID), if any, counts as part of the command.
# Sets M_WALL M_CPU M_RSS (KiB) M_DISK (bytes read from the disk) M_LOAD M_OTHERS M_RC.
measure() {
    local log=$1 dir=$2 t0 t1 b0 b1 k0 k1 d0 d1 user sys rss dio0=0 dio1=0 dhwm=0
    shift 3
    wait_quiet "$(basename "$log")"
    wait_idle "$(basename "$log")"
    drop_caches
    M_LOAD=$(cut -d' ' -f1 /proc/loadavg)
    info "$(basename "$log"): $*"
    [ -z "$DAEMON_PID" ] || dio0=$(awk '/^read_bytes:/ { print $2 }' "/proc/$DAEMON_PID/io")
    M_RC=0
    k0=$(kthread_ticks)
    b0=$(busy_ticks)
    d0=$(proc_ticks "$DAEMON_PID")
    t0=$(now)
    # shellcheck disable=SC2016 # expanded by the wrapper shell
    timeout "$BENCH_TIMEOUT" bash -c 'cd "$2" || exit 125
        /usr/bin/time -o "$1.time" -f "%U %S %M" "${@:3}"; rc=$?
        cat /proc/$$/io >"$1.io"; exit $rc' measure "$log" "$dir" "$@" >"$log.out" 2>"$log.err" || M_RC=$?
    sync
    t1=$(now)
    d1=$(proc_ticks "$DAEMON_PID")
    b1=$(busy_ticks)
    k1=$(kthread_ticks)
    if [ -n "$DAEMON_PID" ]; then
        dio1=$(awk '/^read_bytes:/ { print $2 }' "/proc/$DAEMON_PID/io")
        dhwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$DAEMON_PID/status")
    fi
    read -r user sys rss < <(grep -E '^[0-9.]+ [0-9.]+ [0-9]+$' "$log.time" | tail -n1 || echo "0 0 0")
    M_WALL=$(elapsed "$t0" "$t1")
    M_CPU=$(awk -v u="$user" -v s="$sys" -v d="$((d1 - d0))" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", u + s + d / hz }')
    M_RSS=$((rss > dhwm ? rss : dhwm))
    M_DISK=$(($(awk '/^read_bytes:/ { print $2 }' "$log.io" 2>/dev/null || echo 0) + dio1 - dio0))
    M_OTHERS=$(awk -v b="$((b1 - b0))" -v k="$((k1 - k0))" -v hz="$CLK_TCK" -v c="$M_CPU" \
        'BEGIN { o = (b - k) / hz - c; if (o < 0) o = 0; printf "%.1f", o }')
    [ "$M_RC" -eq 0 ] || info "exit $M_RC: $(tail -n3 "$log.err" | tr '\n' ' ')"
    info "${M_WALL}s wall, ${M_CPU}s CPU, $((M_RSS / 1024)) MiB RSS, disk read $((M_DISK / 1048576)) MiB (load $M_LOAD, others used $M_OTHERS CPU s)"
}

# record PART DATASET TOOL ROUND VERIFY JSON: one results row from the last measure (and, for backtree,
# its --json summary in LOG.out).
record() {
    local part=$1 ds=$2 tool=$3 round=$4 verify=$5 json=$6 f=n/a w=n/a u=n/a r=n/a
    if [ -n "$json" ] && jq -e . "$json" >/dev/null 2>&1; then
        read -r f w u r < <(jq -r '"\(.bytes_fetched) \(.files_written) \(.files_unchanged) \(.removed)"' "$json")
        [ "$(jq '.failures | length' "$json")" -eq 0 ] || info "WARNING: $(jq '.failures | length' "$json") entries not restored, see $json"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$part" "$ds" "$tool" "$round" "$M_WALL" "$M_CPU" \
        "$M_RSS" "$f" "$M_DISK" "$w" "$u" "$r" "$verify" "$M_LOAD" "$M_OTHERS" "$M_RC" >>"$RESULTS"
}

# ---------------------------------------------------------------------------------------------
# Restores and their checks
# ---------------------------------------------------------------------------------------------

# restore_cmd DATASET TOOL DEST [OPTION...]: the timed command of a tool, in CMD, and the
# directory to run it in, in CMD_DIR.
restore_cmd() {
    local ds=$1 tool=$2 dest=$3 repo
    shift 3
    repo=$(repo_of "$ds" "${tool%%-*}")
    CMD_DIR=$BENCH_DIR
    case $tool in
        backtree*) CMD=("$BT" restore --repo "$repo" --json ${BENCH_JOBS:+--jobs "$BENCH_JOBS"} "$@" "$ds/latest" "$dest") ;;
        restic) CMD=(restic --repo "$repo" --cache-dir "$RESTIC_CACHE" restore latest --target "$dest" "$@") ;;
        borg) CMD=(borg extract "$@" "$repo::$ds"); CMD_DIR=$dest ;;
        mount) CMD=(rsync -a "$@" "$MNT/$ds/latest/" "$dest/") ;;
        floor) CMD=(cp -a --sparse=always "$SHM/$ds/." "$dest/") ;;
        *) die "unknown tool $tool" ;;
    esac
}

# The tree as the tool lays it out below DEST.
layout_of() { case $1 in backtree* | mount) echo backtree ;; *) echo "$1" ;; esac; } # TOOL

# verify DATASET TOOL DEST [--delete]: compares the restore with the source; prints "ok" or
# "N-differences".
verify() {
    local ds=$1 tool=$2 dest=$3 del=${4:-} src n=0 out=$LOGS/verify-$1-$2.txt rc=0
    : >"$out"
    if [ "$tool" = floor ]; then
        echo ok # a plain copy of the source, laid out as in SHM
        return 0
    fi
    if [ "$ds" = image ]; then
        cmp "$IMG" "$dest/$(path_in_root "$(layout_of "$tool")" "$IMG")" >"$out" 2>&1 || rc=1
        [ "$rc" -eq 0 ] && echo ok || echo differs
        return 0
    fi
    for src in "${TREE_PATHS[@]}"; do
        rsync -anci ${del:+"$del"} "$src"/ "$dest/$(path_in_root "$(layout_of "$tool")" "$src")"/ >>"$out" 2>&1 || rc=1
    done
    n=$(grep -cv '^$' "$out" || true)
    if [ "$n" -eq 0 ] && [ "$rc" -eq 0 ]; then echo ok; else echo "$n-differences"; fi
}

# Size of the fresh filesystem for a dataset's restores.
fs_size() { # DATASET
    if [ "$1" = image ]; then echo "$((BENCH_IMAGE_GB * 2 + 2))G"; else echo "$((TREE_BYTES * 3 / 1073741824 + 4))G"; fi
}

# full DATASET TOOL ROUND: an empty fresh filesystem, one timed restore, its check.
full() {
    local ds=$1 tool=$2 round=$3 dest opts=() v log=$LOGS/full-$1-$2-$3
    say "full restore: $ds, $tool (round $round of $BENCH_ROUNDS)"
    RESTORE_FS_SIZE=$(fs_size "$ds") fresh_restore_fs
    dest=$RESTORE_DIR/dest
    mkdir -p "$dest"
    if [ "$ds" = image ]; then
        case $tool in borg | mount) opts=(--sparse) ;; esac
    fi
    restore_cmd "$ds" "$tool" "$dest" "${opts[@]+"${opts[@]}"}"
    [ "$tool" != mount ] || mount_backtree "$ds"
    measure "$log" "$CMD_DIR" -- "${CMD[@]}"
    [ "$tool" != mount ] || unmount_backtree
    # borg exits 1 on warnings; the check below says whether the restore is complete.
    [ "$tool" != borg ] || [ "$M_RC" -ne 1 ] || M_RC=0
    v=$(verify "$ds" "$tool" "$dest")
    info "verify: $v"
    record full "$ds" "$tool" "$round" "$v" "$([ "$tool" = backtree ] && echo "$log.out")"
    drop_restore_fs
}

# change_tree DIR: changes ~BENCH_CHANGE_PCT % of the regular files below DIR (deterministic).
change_tree() {
    python3 - "$1" "$BENCH_CHANGE_PCT" >"$LOGS/change-tree.log" <<'EOF'
import os, random, sys
root, pct = sys.argv[1], float(sys.argv[2])
files = []
for d, dirs, names in os.walk(root):
    dirs.sort()
    for n in sorted(names):
        p = os.path.join(d, n)
        if os.path.isfile(p) and not os.path.islink(p):
            files.append(p)
step = max(1, round(100 / pct))
rnd = random.Random(15)
picked = files[step // 2::step]
counts = {"overwritten": 0, "touched": 0, "deleted": 0, "appended": 0, "extra": 0}
for j, p in enumerate(picked):
    kind = j % 4
    if kind == 0:
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            n = min(4096, size)
            f.seek(max(0, size // 2 - n // 2))
            f.write(rnd.randbytes(n))
        counts["overwritten"] += 1
    elif kind == 1:
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        counts["touched"] += 1
    elif kind == 2:
        os.unlink(p)
        counts["deleted"] += 1
    else:
        with open(p, "ab") as f:
            f.write(rnd.randbytes(4096))
        counts["appended"] += 1
    if j % 4 == 0:
        with open(p + ".bench-extra", "wb") as f:
            f.write(rnd.randbytes(16384))
        counts["extra"] += 1
print(len(files), " ".join("%s=%d" % kv for kv in counts.items()))
EOF
}

# change_image FILE: overwrites BENCH_CHANGE_PCT % of FILE with random data, in runs
# (BENCH_IMAGE_RUN_KB) spread evenly (deterministic).
change_image() {
    python3 - "$1" "$BENCH_CHANGE_PCT" "$BENCH_IMAGE_RUN_KB" >"$LOGS/change-image.log" <<'EOF'
import os, random, sys
path, pct, run = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) << 10
size = os.path.getsize(path)
runs = max(1, int(size * pct / 100) // run)
rnd = random.Random(15)
with open(path, "r+b") as f:
    for i in range(runs):
        off = (i * size // runs + (size // runs - run) // 2) // 4096 * 4096
        f.seek(off)
        f.write(rnd.randbytes(run))
print(runs, runs * run)
EOF
}

# incr DATASET VARIANT ROUND: a fresh copy (untimed backtree restore), changed, then the variant's
# restore over it, timed, and its check.
incr() {
    local ds=$1 var=$2 round=$3 dest opts=() tool del=--delete v base log=$LOGS/incr-$1-$2-$3
    say "incremental restore: $ds, $var (round $round of $BENCH_ROUNDS)"
    RESTORE_FS_SIZE=$(fs_size "$ds") fresh_restore_fs
    dest=$RESTORE_DIR/dest
    "$BT" restore --repo "$(repo_of "$ds" backtree)" "$ds/latest" "$dest" >"$log.base.log" 2>&1 ||
        die "the base restore failed; see $log.base.log"
    if [ "$ds" = image ]; then
        change_image "$dest/$(path_in_root backtree "$IMG")"
        base="$(cat "$LOGS/change-image.log") (runs, bytes)"
    else
        change_tree "$dest"
        base="$(cat "$LOGS/change-tree.log") (files, changes)"
    fi
    info "changed: $base"
    case $var in
        backtree) tool=backtree; del= ;;
        backtree-delete) tool=backtree; opts=(--delete) ;;
        backtree-checksum) tool=backtree; opts=(--checksum) ;;
        mount) tool=mount
            if [ "$ds" = image ]; then opts=(--inplace --no-whole-file); else opts=(--delete); fi ;;
        *) die "unknown variant $var" ;;
    esac
    [ "$ds" != image ] || del=
    restore_cmd "$ds" "$tool" "$dest" "${opts[@]+"${opts[@]}"}"
    [ "$tool" != mount ] || mount_backtree "$ds"
    measure "$log" "$CMD_DIR" -- "${CMD[@]}"
    [ "$tool" != mount ] || unmount_backtree
    v=$(verify "$ds" "$tool" "$dest" ${del:+"$del"})
    info "verify: $v"
    record incr "$ds" "$var" "$round" "$v" "$([ "$tool" = backtree ] && echo "$log.out")"
    drop_restore_fs
}

# rotate R WORD...: the words starting with the R-th (cyclically).
rotate() {
    local r=$1
    shift
    local n=$# i
    for ((i = 0; i < n; i++)); do
        local k=$(((r - 1 + i) % n + 1))
        printf '%s\n' "${!k}"
    done
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

report_md() {
    echo "### Run of $(date -u '+%Y-%m-%d %H:%M UTC') (git ${BUILT_REV:-unknown: prebuilt binary $BENCH_BACKTREE, worktree at $(source_rev)})"
    echo
    machine_lines
    echo "- Tools: backtree $("$BT" --version | awk '{ print $2 }') (release build, restore --jobs ${BENCH_JOBS:-default});" \
        "$(restic version | awk '{ print $1, $2 }'); $(borg --version); $(rsync --version | head -n1 | awk '{ print $1, $3 }')"
    echo "- Restores into $RESTORE_FS; page cache dropped before each timed step; wall time includes a final sync"
    echo "- Load average (1/5/15 min) at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg);" \
        "before each timed step the script waited for other processes to use under 15% of a core" \
        "(${IDLE_WAITED}s of waiting in all); $([ "$BUSY" -gt 0 ] && echo "**$BUSY step(s) started while the machine was still busy**" || echo "every step started on an idle machine")" \
        "$([ "$NOISY" -gt 0 ] && echo "; **another benchmark was still running at $NOISY step(s)**")"
    echo "- Datasets:"
    awk -F'\t' '{ printf "  - %s: %s\n", $1, $2 }' "$BENCH_DIR/datasets.txt"
    echo
    awk -F'\t' -v tree="${TREE_BYTES:-0}" -v img="${IMAGE_BYTES:-0}" -v pct="$BENCH_CHANGE_PCT" -v rounds="$BENCH_ROUNDS" -v run="$BENCH_IMAGE_RUN_KB" '
        function mb(b) { return b ~ /^[0-9]+$/ ? sprintf("%.1f", b / 1e6) : b }
        function mib(k) { return sprintf("%.0f", k / 1024) }
        function num(x) { return x ~ /^[0-9.]+$/ && x > 0 }
        NR == 1 { next }
        { n++; for (i = 1; i <= NF; i++) f[n, i] = $i; k = $1 SUBSEP $2 SUBSEP $3; cnt[k]++; rows[k, cnt[k]] = n
          if ($16 != 0) bad[k] = bad[k] " " $16; if ($13 != "ok") badv[k] = $13 }
        END {
            # The median round of every (part, dataset, tool) by wall time, and the range.
            for (k in cnt) {
                c = cnt[k]; for (i = 1; i <= c; i++) a[i] = rows[k, i]
                for (i = 2; i <= c; i++) { x = a[i]; for (j = i - 1; j >= 1 && f[a[j], 5] + 0 > f[x, 5] + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
                key[k] = a[int((c + 1) / 2)]; range[k] = (c > 1) ? sprintf("%.2f–%.2f", f[a[1], 5], f[a[c], 5]) : "-"
            }
            split("tree image", D, " "); split("backtree restic borg mount floor", T, " ")
            print "#### Full restore into an empty filesystem"
            print ""
            print "Median of " rounds " round(s) by wall time (range: fastest–slowest round); the other columns are the median round'"'"'s."
            print ""
            print "| dataset | tool | wall s | range s | CPU s | peak RSS MiB | disk read MB | verify | wall ÷ backtree | load / others CPU s |"
            print "|---|---|---:|---|---:|---:|---:|---|---:|---|"
            for (d = 1; d <= 2; d++) for (t = 1; t <= 5; t++) {
                k = "full" SUBSEP D[d] SUBSEP T[t]; if (!(k in key)) continue
                r = key[k]; b = g("full", D[d], "backtree", 5)
                printf "| %s | %s | %.2f | %s | %s | %s | %s | %s%s | %s | %s / %s |\n", D[d], (T[t] == "mount" ? "rsync -a from backtree mount" : T[t] == "floor" ? "floor: `cp -a` of a tmpfs copy (writing alone)" : T[t]),
                    f[r, 5], range[k], f[r, 6], mib(f[r, 7]), mb(f[r, 9]), (k in badv) ? badv[k] : "ok", (k in bad) ? " (exit" bad[k] ")" : "",
                    (num(b) ? sprintf("%.2f", f[r, 5] / b) : "n/a"), f[r, 14], f[r, 15]
            }
            print ""
            print "#### Restore over an existing copy with ~" pct "% changed"
            print ""
            print "Median of " rounds " round(s), as above. fetched: backtree'"'"'s `bytes_fetched` (decompressed chunk data read from the store); fetched ÷ data: of the dataset'"'"'s bytes (the tree'"'"'s regular files, the image'"'"'s apparent size). Image changes: runs of " run " KiB."
            print ""
            print "| dataset | variant | wall s | range s | CPU s | peak RSS MiB | fetched MB | fetched ÷ data | disk read MB | written / unchanged / removed | verify | wall ÷ rsync | load / others CPU s |"
            print "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|---:|---|"
            split("backtree backtree-delete backtree-checksum mount", V, " ")
            for (d = 1; d <= 2; d++) for (t = 1; t <= 4; t++) {
                k = "incr" SUBSEP D[d] SUBSEP V[t]; if (!(k in key)) continue
                r = key[k]; m = g("incr", D[d], "mount", 5); size = (D[d] == "image") ? img : tree
                name = V[t]; sub(/^backtree-/, "backtree restore --", name); if (name == "backtree") name = "backtree restore"
                if (V[t] == "mount") name = (D[d] == "image") ? "rsync -a --inplace --no-whole-file from backtree mount" : "rsync -a --delete from backtree mount"
                printf "| %s | %s | %.2f | %s | %s | %s | %s | %s | %s | %s | %s%s | %s | %s / %s |\n", D[d], name, f[r, 5], range[k], f[r, 6], mib(f[r, 7]),
                    mb(f[r, 8]), (f[r, 8] ~ /^[0-9]+$/ && size > 0 ? sprintf("%.2f%%", 100 * f[r, 8] / size) : "n/a"), mb(f[r, 9]),
                    f[r, 10] " / " f[r, 11] " / " f[r, 12], (k in badv) ? badv[k] : "ok", (k in bad) ? " (exit" bad[k] ")" : "",
                    (num(m) ? sprintf("%.2f", f[r, 5] / m) : "n/a"), f[r, 14], f[r, 15]
            }
            print ""
            print "#### Targets"
            print ""
            for (d = 1; d <= 2; d++) {
                b = g("full", D[d], "backtree", 5); best = ""; who = ""
                for (t = 2; t <= 3; t++) { x = g("full", D[d], T[t], 5)
                    if (num(x) && !(("full" SUBSEP D[d] SUBSEP T[t]) in bad) && (best == "" || x + 0 < best + 0)) { best = x; who = T[t] } }
                if (num(b) && best != "")
                    printf "- Full restore of the %s at least 2× as fast as the best of restic and borg: backtree %.2f s, best %s %.2f s, backtree ÷ best = **%.2f** (target ≤ 0.50): **%s**\n",
                        D[d], b, who, best, b / best, (b / best <= 0.5) ? "met" : "not met"
            }
            for (d = 1; d <= 2; d++) for (t = 1; t <= 3; t++) {
                k = "incr" SUBSEP D[d] SUBSEP V[t]; if (!(k in key)) continue
                fe = f[key[k], 8]; size = (D[d] == "image") ? img : tree
                if (fe ~ /^[0-9]+$/ && size > 0)
                    printf "- Incremental restore of the %s (`%s`) reads at most 2%% of the data: %s MB of %s MB fetched = **%.2f%%**: **%s**\n",
                        D[d], V[t], mb(fe), mb(size), 100 * fe / size, (fe <= size * 0.02) ? "met" : "not met"
            }
        }
        function g(p, d, t, c,   k) { k = p SUBSEP d SUBSEP t; return (k in key) ? f[key[k], c] : "" }
    ' "$RESULTS"
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

main() {
    local start ds tool var r
    start=$(now)
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    prerequisites
    prepare_workdir
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    build_backtree
    read -r -a TREE_PATHS <<<"$BENCH_TREE"
    read -r -a TOOLS <<<"$BENCH_TOOLS"
    TREE_BYTES=$(logical_size "${TREE_PATHS[@]}")
    : >"$BENCH_DIR/datasets.txt"
    for ds in $BENCH_DATASETS; do
        case $ds in
            tree)
                say "dataset tree: ${TREE_PATHS[*]}"
                printf 'tree\t%s files and directories, %s MiB in regular files, in %s\n' \
                    "$(find "${TREE_PATHS[@]}" -xdev | wc -l)" "$((TREE_BYTES / 1048576))" \
                    "${TREE_PATHS[*]}" >>"$BENCH_DIR/datasets.txt" ;;
            image)
                make_image
                IMAGE_BYTES=$(stat -c %s "$IMG")
                printf 'image\t%s GiB sparse ext4 image (%s), filesystem %s full, %s MiB allocated\n' "$BENCH_IMAGE_GB" \
                    "$IMAGE_MODE" "$IMAGE_FILL" "$(($(du -B1 "$IMG" | cut -f1) / 1048576))" >>"$BENCH_DIR/datasets.txt" ;;
            *) die "unknown dataset $ds" ;;
        esac
    done

    if [[ " $BENCH_TOOLS " == *" floor "* ]]; then
        say "copying the datasets to $SHM for the floor (not timed)"
        rm -rf "$SHM"
        mkdir -p "$SHM/tree" "$SHM/image"
        for ds in $BENCH_DATASETS; do
            if [ "$ds" = image ]; then cp --sparse=always "$IMG" "$SHM/image/"; else cp -a "${TREE_PATHS[@]}" "$SHM/tree/"; fi
        done
    fi

    say "ingesting (not timed)"
    for tool in backtree restic borg; do
        [[ " $BENCH_TOOLS " == *" $tool "* ]] || [ "$tool" = backtree ] || continue
        wait_quiet "$tool ingest"
        for ds in $BENCH_DATASETS; do
            if [ "$ds" = image ]; then ingest image "$tool" "$IMG"; else ingest tree "$tool" "${TREE_PATHS[@]}"; fi
        done
    done

    for ds in $BENCH_DATASETS; do
        for ((r = 1; r <= BENCH_ROUNDS; r++)); do
            if [[ " $BENCH_RESTORE_PARTS " == *" full "* ]]; then
                for tool in $(rotate "$r" "${TOOLS[@]}"); do full "$ds" "$tool" "$r" </dev/null; done
            fi
            if [[ " $BENCH_RESTORE_PARTS " == *" incr "* ]]; then
                if [ "$ds" = image ]; then set -- backtree backtree-checksum mount; else set -- backtree backtree-delete mount; fi
                for var in $(rotate "$r" "$@"); do incr "$ds" "$var" "$r" </dev/null; done
            fi
        done
    done

    report_md >"$BENCH_DIR/results.md"
    publish_results "$BENCH_DIR/results.md" "<!-- bench-restore:begin -->" "<!-- bench-restore:end -->" \
        "Restore benchmarks"
    say "done in $(elapsed "$start" "$(now)" | cut -d. -f1) s; logs in $LOGS"
}

main "$@"
