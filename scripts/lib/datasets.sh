# shellcheck shell=bash disable=SC2153 # BENCH_DIR and the others are set by the sourcing script
# The datasets and tools shared by the mount and restore benchmarks (scripts/bench-mount.sh,
# scripts/bench-restore.sh), which source this file after lib/common.sh. Not meant to be run by
# itself.
#
# Expects from the sourcing script: BENCH_DIR, LOGS, BT, IMG (the image file), LOOP (where the
# image is loop-mounted while it is filled), BENCH_IMAGE_GB, BENCH_IMAGE_FILL, BENCH_IMAGE_REUSE,
# TREE_PATHS and TREE_BYTES (the tree dataset), RESTORE_FS_SIZE (optional), RESTORE_FS (how restores are stored; changed
# when no loop mount is possible). Sets IMAGE_MODE and IMAGE_FILL (make_image) and RESTORE_DIR
# (fresh_restore_fs).

# ---------------------------------------------------------------------------------------------
# Tools: repositories and ingest
# ---------------------------------------------------------------------------------------------

export RESTIC_PASSWORD=bench
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export BORG_BASE_DIR=$BENCH_DIR/borg-home # borg's cache and security dirs, wiped with the rest
RESTIC_CACHE=$BENCH_DIR/restic-cache

# ingest DATASET TOOL PATHS...: fresh repository, one snapshot named after the dataset.
ingest() {
    local ds=$1 tool=$2 repo rc=0 t0
    shift 2
    repo=$(repo_of "$ds" "$tool")
    t0=$(now)
    info "$tool: ingesting $ds into $repo"
    case $tool in
        backtree)
            "$BT" init --repo "$repo" >"$LOGS/ingest-$ds-$tool.out" 2>&1
            "$BT" ingest --repo "$repo" --host "$ds" --time 2026-01-01T01:00:00Z "$@" \
                >>"$LOGS/ingest-$ds-$tool.out" 2>&1 || rc=$?
            [ "$rc" -eq 3 ] && { info "backtree skipped some paths (exit 3)"; rc=0; }
            ;;
        restic)
            restic --repo "$repo" --cache-dir "$RESTIC_CACHE" init --quiet >"$LOGS/ingest-$ds-$tool.out" 2>&1
            restic --repo "$repo" --cache-dir "$RESTIC_CACHE" backup --quiet --compression auto \
                --host "$ds" --time '2026-01-01 01:00:00' "$@" >>"$LOGS/ingest-$ds-$tool.out" 2>&1 || rc=$?
            # restic exits 3 when some files could not be read; the snapshot exists.
            [ "$rc" -eq 3 ] && { info "restic skipped some paths (exit 3)"; rc=0; }
            ;;
        borg)
            borg init --encryption=none "$repo" >"$LOGS/ingest-$ds-$tool.out" 2>&1
            borg create --compression zstd,3 --timestamp 2026-01-01T01:00:00 "$repo::$ds" "$@" \
                >>"$LOGS/ingest-$ds-$tool.out" 2>&1 || rc=$?
            # borg exits 1 on warnings (e.g. unreadable files); the archive exists.
            [ "$rc" -eq 1 ] && { info "borg finished with warnings (exit 1)"; rc=0; }
            ;;
        *) die "unknown tool $tool" ;;
    esac
    [ "$rc" -eq 0 ] || die "$tool ingest of $ds failed (exit $rc), see $LOGS/ingest-$ds-$tool.out"
    info "$tool: $ds ingested in $(elapsed "$t0" "$(now)")s, repository $(du -sh "$repo" | cut -f1)"
}

# Where a source path ends up below that root.
path_in_root() { # TOOL SOURCE_PATH
    case $1 in
        backtree) # one directory becomes the root itself; several paths (or a file): entries of the root
            if [ -d "$2" ] && [ "${#TREE_PATHS[@]}" -eq 1 ]; then echo .; else basename "$2"; fi ;;
        *) echo "${2#/}" ;;        # restic and borg keep the absolute path
    esac
}

# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

make_image() {
    local size used budget list=$BENCH_DIR/image/files.txt want=$((BENCH_IMAGE_GB * 1073741824))
    wait_quiet "making the image"
    if [ -n "$BENCH_IMAGE_REUSE" ] && [ -f "$BENCH_IMAGE_REUSE" ] &&
        [ "$(stat -c %s "$BENCH_IMAGE_REUSE")" -eq "$want" ] &&
        e2fsck -fn "$BENCH_IMAGE_REUSE" >"$LOGS/e2fsck.log" 2>&1; then
        say "image: copying $BENCH_IMAGE_REUSE (cp --sparse=always)"
        cp --sparse=always "$BENCH_IMAGE_REUSE" "$IMG"
        IMAGE_MODE="copy of $BENCH_IMAGE_REUSE"
        IMAGE_FILL=$(dumpe2fs -h "$IMG" 2>/dev/null | awk -F: '
            /^Block count/ { t = $2 } /^Free blocks/ { f = $2 }
            END { printf "%d%%", (t - f) * 100 / t }')
    else
        say "image: creating a ${BENCH_IMAGE_GB} GiB ext4 image, filling ~${BENCH_IMAGE_FILL}% from $BENCH_IMAGE_SRC"
        truncate -s "${BENCH_IMAGE_GB}G" "$IMG"
        mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$IMG"
        if mount -o loop "$IMG" "$LOOP" 2>"$LOGS/loop.err"; then
            IMAGE_MODE="loop-mounted and filled"
            read -r size used < <(df -B1 --output=size,used "$LOOP" | tail -n1)
            budget=$((size * BENCH_IMAGE_FILL / 100 - used))
            pick_files "$budget" >"$list"
            info "copying $(wc -l <"$list") files into the mounted image"
            copy_files "$list" "$LOOP"
            sync
            IMAGE_FILL=$(df --output=pcent "$LOOP" | tail -n1 | tr -d ' ')
            umount "$LOOP"
        else
            IMAGE_MODE="mkfs.ext4 -d"
            info "loop mount failed ($(tr '\n' ' ' <"$LOGS/loop.err")); populating with mkfs.ext4 -d"
            budget=$((want * 95 / 100 * BENCH_IMAGE_FILL / 100))
            pick_files "$budget" >"$list"
            mkdir -p "$BENCH_DIR/image/stage"
            copy_files "$list" "$BENCH_DIR/image/stage"
            mkfs.ext4 -F -q -d "$BENCH_DIR/image/stage" "$IMG"
            rm -rf "$BENCH_DIR/image/stage"
            IMAGE_FILL="~${BENCH_IMAGE_FILL}%"
        fi
    fi
    info "image: $(stat -c %s "$IMG") bytes apparent, $(du -B1 "$IMG" | cut -f1) bytes allocated, $IMAGE_FILL full"
}

# ---------------------------------------------------------------------------------------------
# Restore targets
# ---------------------------------------------------------------------------------------------

# Restores go into a freshly made ext4 filesystem (a loop-mounted sparse file, journal and inode
# tables written at mkfs), so that every restore, whatever tool and round, starts from the same
# empty filesystem. Restoring into a directory of the work filesystem made each restore depend on
# the previous one: on an ext4 without a journal (as on this VM) the kernel skips inodes deleted
# in the last 1-6 minutes when allocating new ones (ialloc.c, recently_deleted()), so a restore
# right after the previous restore was deleted paid 1.5-2 s more here, and without a cache drop
# between them 2-3 times as long. Falls back to a directory (with a warning) if loop mounts fail.
# Its size: RESTORE_FS_SIZE (as truncate's -s) if set, else 3 x TREE_BYTES + 4 GiB.
fresh_restore_fs() { # -> RESTORE_DIR
    local img=$BENCH_DIR/restore.img size
    drop_restore_fs
    RESTORE_DIR=$BENCH_DIR/restore
    mkdir -p "$RESTORE_DIR"
    size=${RESTORE_FS_SIZE:-$(( (TREE_BYTES * 3 / 1073741824 + 4) ))G}
    truncate -s "$size" "$img"
    if mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$img" 2>"$LOGS/restore-fs.err" &&
        mount -o loop "$img" "$RESTORE_DIR" 2>>"$LOGS/restore-fs.err"; then
        return 0
    fi
    info "WARNING: cannot make a fresh filesystem for the restore ($(tr '\n' ' ' <"$LOGS/restore-fs.err")); restoring into a directory"
    RESTORE_FS="a directory of the work filesystem (no loop mount)"
    rm -f "$img"
}

drop_restore_fs() {
    unmount_dir "$BENCH_DIR/restore"
    rm -rf "$BENCH_DIR/restore" "$BENCH_DIR/restore.img"
}
