#!/usr/bin/env bash
# Ingest benchmark: backtree vs restic vs borg on real data, side by side in one run.
#
# Datasets
#   usr    system files from /usr, backed up where they are (no copy), then backed up again
#          unchanged (incremental "next night" with no changes: metadata-only pass).
#   image  an ext4 disk image file (sparse, BENCH_IMAGE_GB GiB) filled to ~70% with files
#          copied from /usr, backed up as one big file; then the image is mounted, changed a
#          little (new files, in-place edits, appends, deletions) and backed up again.
#   stdin  (not run by default) a multi-GB stream of real data, a tar archive of
#          BENCH_STDIN_PATHS written once to a file, piped (`cat FILE |`) into
#          `backtree ingest --stdin`, `restic backup --stdin` and `borg create ... -`; then "next
#          night" the same stream slightly changed (32 edits spread over it: 16 inserts of 64 KiB
#          of new text, 16 overwrites of 4 KiB, and BENCH_CHANGE_MB MiB appended at the end).
#   mixed  (not run by default) small real files (BENCH_MIXED_SMALL copied, a few hundred MB)
#          and the image dataset's disk image side by side in one directory; next night the
#          image is changed as in `image` and the small files a little (appends, deletions,
#          new files).
#
# For every dataset and tool: a fresh repository, the page cache dropped before every ingest
# (cold reads; BENCH_CACHE=warm instead reads the data into the cache first), wall time
# (including a final `sync`), CPU time, peak RSS, repository size (du -sb). A "read" row gives
# the time of `tar -cf - PATHS | cat >/dev/null` on the same data: a single-threaded read
# floor. Results are printed as markdown and spliced into docs/benchmarks.md between the
# markers `<!-- bench:MODE:begin -->` and `<!-- bench:MODE:end -->` (MODE = cold or warm; the
# prose around them is kept).
#
# Needs root (drop_caches, loop mount). Usage: scripts/bench.sh
# Environment (defaults in brackets):
#   BENCH_DIR        work directory, wiped at start          [/tmp/backtree-bench]
#   BENCH_TARGET     cargo target dir for the release build  [/tmp/backtree-bench-target]
#   BENCH_BACKTREE   use this backtree binary, skip the build []
#   BENCH_USR        paths of the usr dataset                [/usr/share /usr/bin /usr/sbin /usr/include /usr/lib/x86_64-linux-gnu]
#   BENCH_IMAGE_GB   image size, GiB                         [2]
#   BENCH_IMAGE_FILL percent of the image filesystem to fill [70]
#   BENCH_IMAGE_SRC  where the image's files are copied from [/usr]
#   BENCH_CHANGE_MB  approximate MiB changed for next night  [8]
#   BENCH_DATASETS   datasets to run (usr image stdin mixed)  [usr image]
#   BENCH_STDIN_PATHS what the stdin dataset's tar stream holds [BENCH_USR + /usr/lib/jvm /usr/lib/llvm-14 /usr/lib/gcc]
#   BENCH_MIXED_SMALL the mixed dataset's small files        [/usr/share/doc /etc /usr/include]
#   BENCH_TOOLS      tools to run ("read" is the baseline)   [read backtree restic borg]
#   BENCH_REPEAT     repeat every dataset this many times (fresh repositories, same data);
#                    the report shows medians                [1]
#   BENCH_CACHE      cold: drop the page cache before each ingest; warm: read the data
#                    into the page cache before each ingest  [cold]
#   BENCH_TIMEOUT    seconds before one ingest is killed     [1800]
#   BENCH_NICE       run every timed command (and the cat feeding a stream) at this nice
#                    value, e.g. -10 on a machine others keep busy: the tools then get most of
#                    the CPU, the same share each, and their ratios mean more. With the
#                    kernel's autogroups (sched_autogroup_enabled) nice only ranks processes of
#                    one session, so the script also sets its session's autogroup nice to this
#                    value for the run (and restores it at exit); '' = as is  []
#   BENCH_DOC        markdown file to update, '' for none    [docs/benchmarks.md]
#   BENCH_SECTION    the section of BENCH_DOC to rewrite     [BENCH_CACHE for the default
#                    datasets, else BENCH_CACHE-DATASETS, e.g. warm-stdin-mixed]
# `scripts/bench.sh --mount` runs the mount benchmark instead (scripts/bench-mount.sh).
if [ "${1:-}" = "--mount" ]; then shift; exec "$(dirname "$0")/bench-mount.sh" "$@"; fi
# `scripts/bench.sh --stream-rss` runs the stream memory benchmark (scripts/bench-stream.sh).
if [ "${1:-}" = "--stream-rss" ]; then shift; exec "$(dirname "$0")/bench-stream.sh" "$@"; fi
# `scripts/bench.sh --gzip` runs the thirty-nights gzip benchmark (scripts/bench-gzip.sh).
if [ "${1:-}" = "--gzip" ]; then shift; exec "$(dirname "$0")/bench-gzip.sh" "$@"; fi
# `scripts/bench.sh --s3` runs the S3 benchmark against a local Garage (scripts/bench-s3.sh).
if [ "${1:-}" = "--s3" ]; then shift; exec "$(dirname "$0")/bench-s3.sh" "$@"; fi
# `scripts/bench.sh --scale` runs the index scale benchmark: simulated repositories of 10^4-10^7
# chunks, 1-1000 hosts, local and Garage, restic side by side (scripts/bench-scale.sh).
if [ "${1:-}" = "--scale" ]; then shift; exec "$(dirname "$0")/bench-scale.sh" "$@"; fi
# `scripts/bench.sh --prune` runs the prune benchmark: backtree prune vs restic prune on 10^5 small
# files, backtree on simulated repositories of 10^5-10^6 chunks over 1 and 100 hosts, an ingest
# during a prune (scripts/bench-prune.sh).
if [ "${1:-}" = "--prune" ]; then shift; exec "$(dirname "$0")/bench-prune.sh" "$@"; fi
# `scripts/bench.sh --history` runs the history view benchmark: a host with a year of generations,
# local and Garage (scripts/bench-history.sh).
if [ "${1:-}" = "--history" ]; then shift; exec "$(dirname "$0")/bench-history.sh" "$@"; fi
# `scripts/bench.sh --restore` runs the restore benchmark: backtree restore vs restic restore and
# borg extract of a tree and a disk image, and restores over a copy with 1% changed vs rsync from
# the mount (scripts/bench-restore.sh).
if [ "${1:-}" = "--restore" ]; then shift; exec "$(dirname "$0")/bench-restore.sh" "$@"; fi
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/backtree-bench}
BENCH_TARGET=${BENCH_TARGET:-/tmp/backtree-bench-target}
BENCH_BACKTREE=${BENCH_BACKTREE:-}
BENCH_USR=${BENCH_USR:-/usr/share /usr/bin /usr/sbin /usr/include /usr/lib/x86_64-linux-gnu}
BENCH_IMAGE_GB=${BENCH_IMAGE_GB:-2}
BENCH_IMAGE_FILL=${BENCH_IMAGE_FILL:-70}
BENCH_IMAGE_SRC=${BENCH_IMAGE_SRC:-/usr}
BENCH_CHANGE_MB=${BENCH_CHANGE_MB:-8}
BENCH_DATASETS=${BENCH_DATASETS:-usr image}
BENCH_STDIN_PATHS=${BENCH_STDIN_PATHS:-$BENCH_USR /usr/lib/jvm /usr/lib/llvm-14 /usr/lib/gcc}
BENCH_MIXED_SMALL=${BENCH_MIXED_SMALL:-/usr/share/doc /etc /usr/include}
BENCH_TOOLS=${BENCH_TOOLS:-read backtree restic borg}
BENCH_CACHE=${BENCH_CACHE:-cold}
BENCH_REPEAT=${BENCH_REPEAT:-1}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-1800}
BENCH_NICE=${BENCH_NICE:-}
BENCH_DOC=${BENCH_DOC-$ROOT/docs/benchmarks.md}
if [ "$BENCH_DATASETS" = "usr image" ]; then
    BENCH_SECTION=${BENCH_SECTION:-$BENCH_CACHE}
else
    BENCH_SECTION=${BENCH_SECTION:-$BENCH_CACHE-${BENCH_DATASETS// /-}}
fi

MNT=$BENCH_DIR/mnt
RESULTS=$BENCH_DIR/results.tsv
LOGS=$BENCH_DIR/logs
CLK_TCK=$(getconf CLK_TCK)

SCRIPT_NAME=bench.sh
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$ROOT/scripts/lib/common.sh"

# ---------------------------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------------------------

prerequisites() {
    need_root "drop_caches and loop mounts"
    install_missing restic:restic borg:borgbackup jq:jq /usr/bin/time:time mkfs.ext4:e2fsprogs \
        truncate:coreutils du:coreutils
    command -v cargo >/dev/null || [ -n "$BENCH_BACKTREE" ] || die "cargo not found"
}

build_backtree() {
    use_prebuilt || build_release
}

# ---------------------------------------------------------------------------------------------
# Work directory (idempotent: everything from a previous run is removed)
# ---------------------------------------------------------------------------------------------

unmount_leftovers() {
    if mountpoint -q "$MNT" 2>/dev/null; then
        info "unmounting $MNT"
        umount "$MNT" || umount -l "$MNT"
    fi
}

prepare_workdir() {
    check_workdir
    say "cleaning work directory $BENCH_DIR"
    unmount_leftovers
    rm -rf "$BENCH_DIR"
    mkdir -p "$BENCH_DIR" "$LOGS" "$MNT"
    touch "$BENCH_DIR/$WORKDIR_MARK"
    printf 'dataset\trun\ttool\tlogical\twall\tcpu\trss_kib\trepo_bytes\tadded_bytes\tother_cpu\trc\n' >"$RESULTS"
}

cleanup() {
    unmount_leftovers
    restore_autogroup_nice
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

# Before each ingest: cold = drop the page cache; warm = read the data ($WARM) into it.
set_cache() {
    sync
    case $BENCH_CACHE in
        cold)
            if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
                info "WARNING: cannot drop the page cache; this run is not cold"
                BENCH_CACHE=not-cold
            fi
            ;;
        warm) read_all "${WARM[@]}" ;;
    esac
}

# The read baseline: every byte of PATHS through a pipe (GNU tar skips reading when writing
# straight to /dev/null).
read_all() {
    tar -C / --atime-preserve=system -cf - "$@" 2>/dev/null | cat >/dev/null
}

# measure DATASET RUN TOOL LOGICAL_BYTES REPO_DIR -- COMMAND...
# Runs COMMAND cold, then `sync`; appends one row to $RESULTS. The command's stdout goes to
# $LOGS/DATASET-RUN-TOOL.out, stderr to .err. With STDIN_FILE set, the command reads that file
# through a pipe (`cat FILE | COMMAND`), as from a dump program; cat's CPU time is not the
# tool's (it shows in "other CPU s").
measure() {
    local ds=$1 run=$2 tool=$3 logical=$4 repo=$5
    shift 6
    local base=$LOGS/$ds-$run-$tool.$REP before after t0 t1 b0 b1 rc=0 user sys rss wall cpu other
    before=$(du -sb "$repo" | cut -f1)
    set_cache
    info "$tool: $*"
    b0=$(busy_ticks)
    t0=$(now)
    local nice=()
    [ -z "$BENCH_NICE" ] || nice=(nice -n "$BENCH_NICE")
    if [ -n "${STDIN_FILE:-}" ]; then
        "${nice[@]}" cat "$STDIN_FILE" |
            "${nice[@]}" /usr/bin/time -o "$base.time" -f '%U %S %M' timeout "$BENCH_TIMEOUT" "$@" \
                >"$base.out" 2>"$base.err" || rc=$?
    else
        "${nice[@]}" /usr/bin/time -o "$base.time" -f '%U %S %M' timeout "$BENCH_TIMEOUT" "$@" \
            >"$base.out" 2>"$base.err" || rc=$?
    fi
    sync
    t1=$(now)
    b1=$(busy_ticks)
    after=$(du -sb "$repo" | cut -f1)
    read -r user sys rss < <(tail -n1 "$base.time")
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    # CPU seconds used by everything else on the machine while this ingest ran: a noise gauge.
    other=$(awk -v b0="$b0" -v b1="$b1" -v hz="$CLK_TCK" -v c="$cpu" \
        'BEGIN { o = (b1 - b0) / hz - c; if (o < 0) o = 0; printf "%.1f", o }')
    if [ "$rc" -ne 0 ]; then
        # backtree exits 3 when the generation was committed with skipped paths.
        if [ "$tool" = backtree ] && [ "$rc" -eq 3 ]; then
            info "$tool skipped some paths (exit $rc), see $base.err"
            rc=0
        else
            info "FAILED (exit $rc): $(tail -n3 "$base.err" | tr '\n' ' ')"
        fi
    fi
    info "$(printf '%s %s %s: %ss wall, %ss CPU, %s MiB RSS, repo %s -> %s bytes, others used %s CPU s' \
        "$ds" "$run" "$tool" "$wall" "$cpu" "$((rss / 1024))" "$before" "$after" "$other")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ds" "$run" "$tool" "$logical" \
        "$wall" "$cpu" "$rss" "$after" "$((after - before))" "$other" "$rc" >>"$RESULTS"
}

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------

export RESTIC_PASSWORD=bench
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export BORG_BASE_DIR=$BENCH_DIR/borg-home # borg's cache and security dirs, wiped with the rest

init_repo() { # DATASET TOOL
    local repo
    repo=$(repo_of "$1" "$2")
    rm -rf "$repo" # from the previous repetition
    mkdir -p "$BENCH_DIR/repos"
    case $2 in
        read) mkdir -p "$repo" ;;
        backtree) "$BT" init --repo "$repo" >/dev/null ;;
        restic) restic --repo "$repo" --cache-dir "$BENCH_DIR/restic-cache" init --quiet ;;
        borg) borg init --encryption=none "$repo" ;;
        *) die "unknown tool $2" ;;
    esac
}

# ingest DATASET RUN TOOL HOST TIME LOGICAL PATHS...
ingest() {
    local ds=$1 run=$2 tool=$3 host=$4 time=$5 logical=$6 repo
    shift 6
    repo=$(repo_of "$ds" "$tool")
    WARM=("$@")
    case $tool in
        read)
            measure "$ds" "$run" "$tool" "$logical" "$repo" -- \
                bash -c 'tar -C / --atime-preserve=system -cf - "$@" | cat >/dev/null' read-baseline "$@" ;;
        backtree)
            measure "$ds" "$run" "$tool" "$logical" "$repo" -- \
                "$BT" ingest --repo "$repo" --host "$host" --time "$time" --json "$@" ;;
        restic)
            measure "$ds" "$run" "$tool" "$logical" "$repo" -- \
                restic --repo "$repo" --cache-dir "$BENCH_DIR/restic-cache" backup --json --quiet \
                --compression auto --host "$host" --time "$(date -u -d "$time" '+%Y-%m-%d %H:%M:%S')" "$@" ;;
        borg)
            measure "$ds" "$run" "$tool" "$logical" "$repo" -- \
                borg create --compression zstd,3 --json --timestamp "${time%Z}" "$repo::$host-$run" "$@" ;;
    esac
}

# ingest_stream DATASET RUN TOOL HOST TIME LOGICAL FILE: FILE piped into the tool's stdin mode,
# stored under the name "stream".
ingest_stream() {
    local ds=$1 run=$2 tool=$3 host=$4 time=$5 logical=$6 repo
    STDIN_FILE=$7
    repo=$(repo_of "$ds" "$tool")
    WARM=("$STDIN_FILE")
    case $tool in
        read)
            measure "$ds" "$run" "$tool" "$logical" "$repo" -- bash -c 'cat >/dev/null' ;;
        backtree)
            measure "$ds" "$run" "$tool" "$logical" "$repo" -- \
                "$BT" ingest --repo "$repo" --host "$host" --time "$time" --json --stdin stream ;;
        restic)
            measure "$ds" "$run" "$tool" "$logical" "$repo" -- \
                restic --repo "$repo" --cache-dir "$BENCH_DIR/restic-cache" backup --json --quiet \
                --compression auto --host "$host" --time "$(date -u -d "$time" '+%Y-%m-%d %H:%M:%S')" \
                --stdin --stdin-filename stream ;;
        borg)
            measure "$ds" "$run" "$tool" "$logical" "$repo" -- \
                borg create --compression zstd,3 --json --timestamp "${time%Z}" --stdin-name stream \
                "$repo::$host-$run" - ;;
    esac
    STDIN_FILE=
}

# log_text BYTES SEED: log-like text (compressible, never seen before), at least BYTES.
log_text() {
    awk -v n="$1" -v seed="$2" 'BEGIN {
        srand(seed)
        for (b = 0; b < n; ) {
            l = sprintf("2026-01-02T01:%02d:%02d host app[%d]: request id=%d status=%d took=%dms\n",
                int(rand() * 60), int(rand() * 60), int(rand() * 9000), int(rand() * 1e9),
                (rand() < 0.9 ? 200 : 500), int(rand() * 2000))
            printf "%s", l; b += length(l)
        }
    }'
}

# ---------------------------------------------------------------------------------------------
# Dataset: usr
# ---------------------------------------------------------------------------------------------

run_usr() {
    local paths logical files tool
    read -r -a paths <<<"$BENCH_USR"
    say "dataset usr: ${paths[*]}"
    logical=$(logical_size "${paths[@]}")
    files=$(find "${paths[@]}" -xdev -type f | wc -l)
    info "$files files, $logical bytes ($(du -sh -c "${paths[@]}" 2>/dev/null | tail -n1 | cut -f1) on disk)"
    [ "$REP" -gt 1 ] ||
        printf 'usr\t%s files, %s MiB in %s\n' "$files" "$((logical / 1048576))" "${paths[*]}" >>"$BENCH_DIR/datasets.txt"
    for tool in $BENCH_TOOLS; do init_repo usr "$tool"; done
    say "usr: first ingest"
    for tool in $BENCH_TOOLS; do
        ingest usr first "$tool" usr 2026-01-01T01:00:00Z "$logical" "${paths[@]}"
    done
    say "usr: next night (nothing changed)"
    for tool in $BENCH_TOOLS; do
        ingest usr next "$tool" usr 2026-01-02T01:00:00Z "$logical" "${paths[@]}"
    done
}

# ---------------------------------------------------------------------------------------------
# Dataset: image
# ---------------------------------------------------------------------------------------------

IMG=$BENCH_DIR/image/disk.img
IMAGE_MODE=

make_image() {
    local size used budget list=$BENCH_DIR/image/files.txt
    mkdir -p "$BENCH_DIR/image"
    say "image: creating a ${BENCH_IMAGE_GB} GiB ext4 image, filling ~${BENCH_IMAGE_FILL}% from $BENCH_IMAGE_SRC"
    truncate -s "${BENCH_IMAGE_GB}G" "$IMG"
    mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$IMG"
    if mount -o loop "$IMG" "$MNT" 2>"$LOGS/mount.err"; then
        IMAGE_MODE=loop
        read -r size used < <(df -B1 --output=size,used "$MNT" | tail -n1)
        budget=$((size * BENCH_IMAGE_FILL / 100 - used))
        pick_files "$budget" >"$list"
        info "copying $(wc -l <"$list") files into the mounted image"
        copy_files "$list" "$MNT"
        sync
        df -h "$MNT" | tail -n1 | awk '{ printf "    image filesystem: %s used of %s (%s)\n", $3, $2, $5 }' >&2
        IMAGE_FILL=$(df --output=pcent "$MNT" | tail -n1 | tr -d ' ')
        umount "$MNT"
    else
        IMAGE_MODE=mkfs-d
        info "loop mount failed ($(tr '\n' ' ' <"$LOGS/mount.err")); populating with mkfs.ext4 -d"
        # ext4 metadata takes ~5% of a small filesystem.
        budget=$((BENCH_IMAGE_GB * 1073741824 * 95 / 100 * BENCH_IMAGE_FILL / 100))
        pick_files "$budget" >"$list"
        mkdir -p "$BENCH_DIR/image/stage"
        copy_files "$list" "$BENCH_DIR/image/stage"
        mkfs.ext4 -F -q -d "$BENCH_DIR/image/stage" "$IMG"
        rm -rf "$BENCH_DIR/image/stage"
        IMAGE_FILL="~${BENCH_IMAGE_FILL}%"
    fi
    info "image: $(du -b "$IMG" | cut -f1) bytes apparent, $(du -B1 "$IMG" | cut -f1) bytes allocated"
}

# Next night, mounted: new files, in-place edits, appends, deletions; about BENCH_CHANGE_MB MiB.
change_image_mounted() {
    local half=$((BENCH_CHANGE_MB / 2)) i n f size list=$BENCH_DIR/image/victims.txt
    mount -o loop "$IMG" "$MNT"
    mkdir -p "$MNT/nextnight"
    # New incompressible files (half the budget), 1 MiB each.
    for ((i = 0; i < half; i++)); do
        head -c 1048576 /dev/urandom >"$MNT/nextnight/blob-$i.bin"
    done
    # New compressible log-like text (the other half).
    log_text $(((BENCH_CHANGE_MB - half) * 1048576)) 42 >"$MNT/nextnight/app.log"
    # Existing files between 64 KiB and 16 MiB, every 97th: 4 KiB overwritten in the middle.
    (cd "$MNT" && find . -xdev -type f -size +64k -size -16M ! -path './nextnight/*' -printf '%s %p\n') |
        LC_ALL=C sort -k2 | awk 'NR % 97 == 0' >"$list"
    n=0
    while read -r size f; do
        dd if=/dev/urandom of="$MNT/$f" bs=4096 count=1 seek=$((size / 8192)) conv=notrunc status=none
        n=$((n + 1))
    done <"$list"
    # Appends to 32 files and 16 deletions, spread over the tree.
    (cd "$MNT" && find . -xdev -type f ! -path './nextnight/*' -printf '%p\n') | LC_ALL=C sort >"$list.all"
    awk 'NR % 211 == 5 && ++n <= 32' "$list.all" | while read -r f; do
        printf 'appended next night\n' >>"$MNT/$f"
    done
    awk 'NR % 307 == 7 && ++n <= 16' "$list.all" | while read -r f; do rm -f "$MNT/$f"; done
    sync
    umount "$MNT"
    IMAGE_CHANGE="mounted: +${half} MiB random files, +$((BENCH_CHANGE_MB - half)) MiB new log text, 4 KiB overwritten in $n files, 32 appends, 16 deletions"
}

# Next night without mounting: random 4 KiB blocks overwritten in place.
change_image_dd() {
    local blocks i nblocks
    nblocks=$(($(stat -c %s "$IMG") / 4096))
    blocks=$((BENCH_CHANGE_MB * 256))
    RANDOM=42
    for ((i = 0; i < blocks; i++)); do
        dd if=/dev/urandom of="$IMG" bs=4096 count=1 seek=$(((RANDOM * 32768 + RANDOM) % nblocks)) \
            conv=notrunc status=none
    done
    IMAGE_CHANGE="dd conv=notrunc: $blocks random 4 KiB blocks overwritten"
}

# pristine_image: makes the image once ($IMG.orig, kept for later repetitions and the mixed
# dataset); true if it made it now.
pristine_image() {
    [ ! -e "$IMG.orig" ] || return 1
    make_image
    cp --sparse=always "$IMG" "$IMG.orig"
}

run_image() {
    local tool logical
    if ! pristine_image; then
        say "image: restoring the image of the first repetition"
        cp --sparse=always "$IMG.orig" "$IMG"
    fi
    logical=$(stat -c %s "$IMG")
    [ "$REP" -gt 1 ] || printf 'image\t%s GiB sparse ext4 image (%s), filesystem %s full, %s MiB allocated\n' "$BENCH_IMAGE_GB" \
        "$IMAGE_MODE" "$IMAGE_FILL" "$(($(du -B1 "$IMG" | cut -f1) / 1048576))" >>"$BENCH_DIR/datasets.txt"
    for tool in $BENCH_TOOLS; do init_repo image "$tool"; done
    say "image: first ingest"
    for tool in $BENCH_TOOLS; do
        ingest image first "$tool" img 2026-01-01T01:00:00Z "$logical" "$IMG"
    done
    say "image: next night (changing about $BENCH_CHANGE_MB MiB)"
    if [ "$IMAGE_MODE" = loop ]; then change_image_mounted; else change_image_dd; fi
    info "$IMAGE_CHANGE"
    [ "$REP" -gt 1 ] || printf 'image-next\t%s\n' "$IMAGE_CHANGE" >>"$BENCH_DIR/datasets.txt"
    for tool in $BENCH_TOOLS; do
        ingest image next "$tool" img 2026-01-02T01:00:00Z "$logical" "$IMG"
    done
}

# ---------------------------------------------------------------------------------------------
# Dataset: stdin
# ---------------------------------------------------------------------------------------------

# next_stream FIRST NEXT: FIRST slightly changed: 32 edits at evenly spread 512-byte aligned
# offsets, alternately 64 KiB of new text inserted (the rest shifts, as when a file in a tar
# grows) and 4 KiB overwritten with random bytes; then BENCH_CHANGE_MB MiB appended (half
# random, half text).
next_stream() {
    local first=$1 size prev=0 i off half=$((BENCH_CHANGE_MB / 2))
    size=$(stat -c %s "$first")
    {
        for ((i = 1; i <= 32; i++)); do
            off=$((size * i / 33 / 512 * 512))
            dd if="$first" iflag=skip_bytes,count_bytes skip="$prev" count=$((off - prev)) bs=1M status=none
            if ((i % 2)); then
                log_text 65536 "$i" >"$2.text"
                head -c 65536 "$2.text"
                prev=$off
            else
                head -c 4096 /dev/urandom
                prev=$((off + 4096))
            fi
        done
        dd if="$first" iflag=skip_bytes skip="$prev" bs=1M status=none
        head -c $((half * 1048576)) /dev/urandom
        log_text $(((BENCH_CHANGE_MB - half) * 1048576)) 43
    } >"$2"
    rm -f "$2.text"
}

run_stdin() {
    local dir=$BENCH_DIR/stdin paths tool
    local first=$dir/first.tar next=$dir/next.tar
    read -r -a paths <<<"$BENCH_STDIN_PATHS"
    if [ ! -e "$next" ]; then
        mkdir -p "$dir"
        say "stdin: writing a tar stream of ${paths[*]}"
        tar -C / --atime-preserve=system -cf "$first" "${paths[@]#/}" 2>"$LOGS/stdin-tar.err" || true
        next_stream "$first" "$next"
        info "first stream $(stat -c %s "$first") bytes, next $(stat -c %s "$next") bytes"
        printf 'stdin\ttar of %s: %s MiB piped to stdin; next night: 16 inserts of 64 KiB of text and 16 overwrites of 4 KiB spread over it, %s MiB appended (%s MiB)\n' \
            "${paths[*]}" "$(($(stat -c %s "$first") / 1048576))" "$BENCH_CHANGE_MB" \
            "$(($(stat -c %s "$next") / 1048576))" >>"$BENCH_DIR/datasets.txt"
    fi
    for tool in $BENCH_TOOLS; do init_repo stdin "$tool"; done
    say "stdin: first stream"
    for tool in $BENCH_TOOLS; do
        ingest_stream stdin first "$tool" stdin 2026-01-01T01:00:00Z "$(stat -c %s "$first")" "$first"
    done
    say "stdin: next night's stream"
    for tool in $BENCH_TOOLS; do
        ingest_stream stdin next "$tool" stdin 2026-01-02T01:00:00Z "$(stat -c %s "$next")" "$next"
    done
}

# ---------------------------------------------------------------------------------------------
# Dataset: mixed
# ---------------------------------------------------------------------------------------------

# change_files DIR: next night for a tree of small files: 2 MiB of new text files, a line
# appended to every 211th file, every 307th file deleted.
change_files() {
    local i list=$BENCH_DIR/mixed/files.txt
    (cd "$1" && find . -xdev -type f -printf '%p\n') | LC_ALL=C sort >"$list"
    awk 'NR % 211 == 5' "$list" | while read -r f; do printf 'appended next night\n' >>"$1/$f"; done
    awk 'NR % 307 == 7' "$list" | while read -r f; do rm -f "$1/$f"; done
    mkdir -p "$1/nextnight"
    for ((i = 0; i < 16; i++)); do log_text 131072 $((100 + i)) >"$1/nextnight/log-$i.txt"; done
    FILES_CHANGE="$(awk 'NR % 211 == 5' "$list" | wc -l) appends, $(awk 'NR % 307 == 7' "$list" | wc -l) deletions, 16 new text files of 128 KiB"
}

run_mixed() {
    local base=$BENCH_DIR/mixed small tool logical
    local src=$base/src
    read -r -a small <<<"$BENCH_MIXED_SMALL"
    pristine_image || true
    if [ ! -e "$base/orig" ]; then
        say "mixed: copying ${small[*]} and the disk image into one directory"
        mkdir -p "$base/orig/files"
        { tar -C / --atime-preserve=system -cf - "${small[@]#/}" 2>"$LOGS/mixed-tar.err" || true; } |
            tar -C "$base/orig/files" -xpf -
        cp --sparse=always "$IMG.orig" "$base/orig/disk.img"
        printf 'mixed\t%s files, %s MiB from %s, beside the image (%s MiB allocated)\n' \
            "$(find "$base/orig/files" -type f | wc -l)" "$(($(logical_size "$base/orig/files") / 1048576))" \
            "${small[*]}" "$(($(du -B1 "$base/orig/disk.img" | cut -f1) / 1048576))" >>"$BENCH_DIR/datasets.txt"
    fi
    rm -rf "$src"
    cp -a --sparse=always "$base/orig" "$src"
    logical=$(logical_size "$src")
    for tool in $BENCH_TOOLS; do init_repo mixed "$tool"; done
    say "mixed: first ingest"
    for tool in $BENCH_TOOLS; do
        ingest mixed first "$tool" mixed 2026-01-01T01:00:00Z "$logical" "$src"
    done
    say "mixed: next night"
    if [ "$IMAGE_MODE" = loop ] || [ -z "$IMAGE_MODE" ]; then
        IMG=$src/disk.img change_image_mounted
    else
        IMG=$src/disk.img change_image_dd
    fi
    change_files "$src/files"
    info "$IMAGE_CHANGE; $FILES_CHANGE"
    [ "$REP" -gt 1 ] || printf 'mixed-next\timage %s; small files: %s\n' "$IMAGE_CHANGE" "$FILES_CHANGE" >>"$BENCH_DIR/datasets.txt"
    logical=$(logical_size "$src")
    for tool in $BENCH_TOOLS; do
        ingest mixed next "$tool" mixed 2026-01-02T01:00:00Z "$logical" "$src"
    done
    rm -rf "$src"
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

machine_info() {
    machine_lines
    echo "- backtree: $("$BT" --version | awk '{ print $2 }') (git $(source_rev), release build);" \
        "$(restic version | awk '{ print $1, $2 }'); $(borg --version)"
    case $BENCH_CACHE in
        cold) echo "- Page cache: cold, dropped before every ingest (and every read row)" ;;
        warm) echo "- Page cache: warm, the data read into it before every ingest" ;;
        *) echo "- Page cache: $BENCH_CACHE" ;;
    esac
    echo "- Load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
    [ -z "$BENCH_NICE" ] || echo "- Every timed command ran at nice $BENCH_NICE, and this session's autogroup too (BENCH_NICE): the machine was shared, and others' compilations got less CPU while a tool ran"
}

report() {
    awk -F'\t' -v ncpu="$(nproc)" '
    function mib(b) { return sprintf("%.1f", b / 1048576) }
    # Other processes took more than 10% of the machine while this ingest ran.
    function noisy(k) { return other[k] > 0.1 * wall[k] * ncpu }
    function flag(k) { return sprintf("%.1f", other[k]) (noisy(k) ? " (noisy)" : "") }
    function ratio(a, b) { return (b > 0 && a > 0) ? sprintf("%.2f", a / b) : "n/a" }
    # Ratios of a few KiB of metadata mean nothing: only when both sides added at least 1 MiB.
    function aratio(a, b) { return (a >= 1048576 && b >= 1048576) ? ratio(a, b) : "-" }
    # Median of v[k, 1..n].
    function median(v, k, n,    a, i, j, x) {
        for (i = 1; i <= n; i++) {
            x = v[k, i] + 0
            for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]
            a[j + 1] = x
        }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    NR == 1 { next }
    {
        k = $1 SUBSEP $2 SUBSEP $3
        i = ++n[k]
        W[k, i] = $5; C[k, i] = $6; R[k, i] = $7; P[k, i] = $8; A[k, i] = $9; O[k, i] = $10
        if ($11 != 0) rc[k] = $11
        logical[$1] = $4
        if (!(($1 SUBSEP $2) in seen)) { seen[$1 SUBSEP $2] = 1; rows[++nrows] = $1 SUBSEP $2 }
        if (!($3 in tseen)) { tseen[$3] = 1; order[++ntools] = $3 }
    }
    END {
        for (k in n) {
            wall[k] = median(W, k, n[k]); cpu[k] = median(C, k, n[k]); rss[k] = median(R, k, n[k])
            repo[k] = median(P, k, n[k]); added[k] = median(A, k, n[k]); other[k] = median(O, k, n[k])
        }
        print "| dataset | run | tool | wall s | MB/s | CPU s | peak RSS MiB | repo MiB | added MiB | wall / read | other CPU s |"
        print "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        for (r = 1; r <= nrows; r++) {
            split(rows[r], p, SUBSEP)
            for (t = 1; t <= ntools; t++) {
                k = rows[r] SUBSEP order[t]
                if (!(k in wall)) continue
                fail = (rc[k] != 0) ? " (FAILED)" : ""
                rd = rows[r] SUBSEP "read"
                vs = (rd in wall && wall[rd] > 0) ? sprintf("%.2f", wall[k] / wall[rd]) : "n/a"
                if (order[t] == "read")
                    printf "| %s | %s | read (tar) | %.1f | %.0f | %.1f | %.0f | - | - | 1.00 | %s |\n",
                        p[1], p[2], wall[k], logical[p[1]] / 1e6 / wall[k], cpu[k], rss[k] / 1024, flag(k)
                else
                    printf "| %s | %s | %s%s | %.1f | %.0f | %.1f | %.0f | %s | %s | %s | %s |\n",
                        p[1], p[2], order[t], fail, wall[k], logical[p[1]] / 1e6 / wall[k], cpu[k],
                        rss[k] / 1024, mib(repo[k]), mib(added[k]), vs, flag(k)
            }
        }
        print ""
        print "Ratios (backtree / other tool). Throughput: above 1 means backtree is faster." \
              " Stored: the repository size after the run, and the bytes the run added (\"-\" when" \
              " under 1 MiB); below 1 means backtree stores less."
        print ""
        print "| dataset | run | throughput vs restic | throughput vs borg | stored vs restic | stored vs borg | added vs restic | added vs borg |"
        print "|---|---|---:|---:|---:|---:|---:|---:|"
        for (r = 1; r <= nrows; r++) {
            split(rows[r], p, SUBSEP)
            b = rows[r] SUBSEP "backtree"; rs = rows[r] SUBSEP "restic"; bo = rows[r] SUBSEP "borg"
            if (!(b in wall)) continue
            printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", p[1], p[2],
                (rs in wall) ? ratio(wall[rs], wall[b]) : "n/a", (bo in wall) ? ratio(wall[bo], wall[b]) : "n/a",
                (rs in wall) ? ratio(repo[b], repo[rs]) : "n/a", (bo in wall) ? ratio(repo[b], repo[bo]) : "n/a",
                (rs in wall) ? aratio(added[b], added[rs]) : "n/a", (bo in wall) ? aratio(added[b], added[bo]) : "n/a"
        }
        print ""
        print "Targets:"
        print ""
        for (r = 1; r <= nrows; r++) {
            split(rows[r], p, SUBSEP)
            b = rows[r] SUBSEP "backtree"; rs = rows[r] SUBSEP "restic"; bo = rows[r] SUBSEP "borg"
            if (p[2] == "first" && (b in wall) && (rs in wall)) {
                tp = wall[rs] / wall[b]
                ok = (tp >= 2.5 && repo[b] <= repo[rs])
                printf "- %s, first ingest: throughput %.2fx restic (target >= 2.5x), stored size %.2fx restic (target <= 1): **%s**%s\n",
                    p[1], tp, repo[b] / repo[rs], ok ? "met" : "not met",
                    (noisy(b) || noisy(rs)) ? " (noisy: other processes were busy, re-run)" : ""
            }
            if (p[1] == "image" && p[2] == "next" && (b in wall) && (bo in wall)) {
                printf "- image, next night: backtree %.1f s vs borg %.1f s (target: no slower): **%s**%s\n",
                    wall[b], wall[bo], (wall[b] <= wall[bo]) ? "met" : "not met",
                    (noisy(b) || noisy(bo)) ? " (noisy: other processes were busy, re-run)" : ""
            }
        }
    }' "$RESULTS"
}

# What the numbers in the tables mean.
report_notes() {
    [ "$BENCH_REPEAT" -eq 1 ] || echo "Every number is the median of $BENCH_REPEAT repetitions."
    echo "Wall time includes a final \`sync\`; MB/s is logical (apparent) bytes / wall time, 10^6 bytes;" \
        "CPU s is user + system time of the tool; \"wall / read\" compares with the read (tar) row," \
        "a single-threaded \`tar -cf - PATHS | cat >/dev/null\` of the same data; \"other CPU s\" is CPU" \
        "time used by other processes during the ingest, marked (noisy) above 10% of the machine" \
        "($(nproc) cores give $(nproc) CPU s per second)."
}

write_report() {
    local md=$BENCH_DIR/results.md
    local what="Page cache $BENCH_CACHE"
    [ "$BENCH_DATASETS" = "usr image" ] || what="$what, datasets $BENCH_DATASETS"
    results_md "### $what: run of $(date -u '+%Y-%m-%d')" report_notes >"$md"
    publish_results "$md" "<!-- bench:$BENCH_SECTION:begin -->" "<!-- bench:$BENCH_SECTION:end -->" Benchmarks
}

# ---------------------------------------------------------------------------------------------

main() {
    local start ds
    start=$(now)
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    prerequisites
    prepare_workdir
    build_backtree
    set_autogroup_nice
    for ((REP = 1; REP <= BENCH_REPEAT; REP++)); do
        [ "$BENCH_REPEAT" -eq 1 ] || say "repetition $REP of $BENCH_REPEAT"
        for ds in $BENCH_DATASETS; do
            case $ds in
                usr) run_usr ;;
                image) run_image ;;
                stdin) run_stdin ;;
                mixed) run_mixed ;;
                *) die "unknown dataset $ds" ;;
            esac
        done
    done
    write_report
    say "done in $(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s; logs in $LOGS"
}

main "$@"
