#!/usr/bin/env bash
# gzip benchmark ("thirty nights", issue 12 item 4): a database dump of BENCH_GZIP_MB MB that
# changes ~1% a night, compressed with gzip as a nightly job leaves it (db.sql.gz, same path
# every night), backed up BENCH_GZIP_NIGHTS nights in a row by backtree (`ingest --gunzip`:
# stored decompressed, with a recipe for the exact original), restic and borg (which see the
# .gz as it is). Every night backtree's `cat --original` must give back the .gz byte for byte.
# Prints, per tool, the repository size (and its ratio to one night's .gz: the target is
# backtree < 2x) and the total ingest time (and backtree's ratio to the others), as markdown.
#
# The dumps come from scripts/lib/gen-dump.py (an orders table: half of each night's changes
# are updates of recent rows, half new rows). Usage: scripts/bench-gzip.sh
# Environment (defaults in brackets):
#   BENCH_DIR          work directory, wiped at start          [/tmp/backtree-bench-gzip]
#   BENCH_TARGET       cargo target dir for the release build  [/tmp/backtree-bench-target]
#   BENCH_BACKTREE     use this backtree binary, skip the build []
#   BENCH_GZIP_MB      size of one dump, MB                     [200]
#   BENCH_GZIP_NIGHTS  nights                                   [30]
#   BENCH_GZIP_LEVEL   gzip level                               [6]
#   BENCH_GZIP_LAYOUT  where the changes are (gen-dump.py's GEN_DUMP_LAYOUT): middle = a hot
#                      table first, a static one after it, so the .gz differs from a fifth of
#                      the way in; tail = one table changing near its end, so the .gz keeps
#                      most of its prefix                        [middle]
#   BENCH_TOOLS        tools to run                             [backtree restic borg]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/backtree-bench-gzip}
BENCH_TARGET=${BENCH_TARGET:-/tmp/backtree-bench-target}
BENCH_BACKTREE=${BENCH_BACKTREE:-}
BENCH_GZIP_MB=${BENCH_GZIP_MB:-200}
BENCH_GZIP_NIGHTS=${BENCH_GZIP_NIGHTS:-30}
BENCH_GZIP_LEVEL=${BENCH_GZIP_LEVEL:-6}
BENCH_GZIP_LAYOUT=${BENCH_GZIP_LAYOUT:-middle}
BENCH_TOOLS=${BENCH_TOOLS:-backtree restic borg}

SCRIPT_NAME=bench-gzip.sh
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$ROOT/scripts/lib/common.sh"

check_workdir
for t in $BENCH_TOOLS; do
    case $t in
        backtree) ;;
        restic) install_missing restic:restic ;;
        borg) install_missing borg:borgbackup ;;
        *) die "unknown tool $t" ;;
    esac
done
command -v python3 >/dev/null || die "python3 is needed to generate the dumps"
use_prebuilt || build_release
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR/src" "$BENCH_DIR/repos"
touch "$BENCH_DIR/$WORKDIR_MARK"
private_copy

say "generating $BENCH_GZIP_NIGHTS dumps of $BENCH_GZIP_MB MB"
GEN_DUMP_LAYOUT=$BENCH_GZIP_LAYOUT python3 "$ROOT/scripts/lib/gen-dump.py" "$BENCH_DIR/dumps" "$BENCH_GZIP_NIGHTS" "$BENCH_GZIP_MB"

export RESTIC_PASSWORD=bench
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export BORG_BASE_DIR=$BENCH_DIR/borg-home

for t in $BENCH_TOOLS; do
    repo=$BENCH_DIR/repos/$t
    case $t in
        backtree) "$BT" init --repo "$repo" >/dev/null ;;
        restic) restic --repo "$repo" --cache-dir "$BENCH_DIR/restic-cache" init --quiet ;;
        borg) borg init --encryption=none "$repo" ;;
    esac
    echo 0 >"$BENCH_DIR/time-$t"
done
echo 0 >"$BENCH_DIR/time-cat"

add_time() { # FILE SECONDS
    awk -v a="$(cat "$1")" -v b="$2" 'BEGIN { printf "%.3f\n", a + b }' >"$1.new" && mv "$1.new" "$1"
}

first_gz=
for n in $(seq 1 "$BENCH_GZIP_NIGHTS"); do
    night=$(printf '%02d' "$n")
    # -n: no name and time in the header, as `pg_dump | gzip` writes it.
    gzip -"$BENCH_GZIP_LEVEL" -n -c "$BENCH_DIR/dumps/night-$night.sql" >"$BENCH_DIR/src/db.sql.gz"
    rm "$BENCH_DIR/dumps/night-$night.sql"
    gz_size=$(stat -c %s "$BENCH_DIR/src/db.sql.gz")
    [ -n "$first_gz" ] || first_gz=$gz_size
    time="2026-11-$night""T01:00:00Z"
    for t in $BENCH_TOOLS; do
        repo=$BENCH_DIR/repos/$t
        start=$(now)
        case $t in
            backtree) "$BT" ingest --repo "$repo" --host db --gunzip --time "$time" "$BENCH_DIR/src" >/dev/null ;;
            restic) restic --repo "$repo" --cache-dir "$BENCH_DIR/restic-cache" backup --quiet \
                --host db --time "$(date -u -d "$time" '+%Y-%m-%d %H:%M:%S')" "$BENCH_DIR/src" ;;
            borg) borg create --compression zstd,3 --timestamp "${time%Z}" "$repo::night-$night" "$BENCH_DIR/src" ;;
        esac
        add_time "$BENCH_DIR/time-$t" "$(elapsed "$start" "$(now)")"
    done
    if [[ " $BENCH_TOOLS " == *" backtree "* ]]; then
        start=$(now)
        want=$(sha256sum <"$BENCH_DIR/src/db.sql.gz" | cut -d' ' -f1)
        # One directory is the generation's root: its db.sql.gz is db/latest/db.sql.
        got=$("$BT" cat --repo "$BENCH_DIR/repos/backtree" --original db/latest/db.sql | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || die "night $night: cat --original differs from the .gz"
        add_time "$BENCH_DIR/time-cat" "$(elapsed "$start" "$(now)")"
    fi
    info "night $night: db.sql.gz $gz_size bytes$([[ " $BENCH_TOOLS " == *" backtree "* ]] && echo ", original recovered exactly")"
done

say "results"
printf '%s nights of a %s MB dump (layout %s, gzip -%s: %s bytes the first night), backtree %s\n\n' \
    "$BENCH_GZIP_NIGHTS" "$BENCH_GZIP_MB" "$BENCH_GZIP_LAYOUT" "$BENCH_GZIP_LEVEL" "$first_gz" "$(source_rev)"
printf '| tool | repository bytes | x one .gz | ingest s (all nights) |\n|---|---:|---:|---:|\n'
for t in $BENCH_TOOLS; do
    size=$(du -sb "$BENCH_DIR/repos/$t" | cut -f1)
    echo "$size" >"$BENCH_DIR/size-$t"
    printf '| %s | %s | %.2f | %s |\n' "$t" "$size" "$(awk -v a="$size" -v b="$first_gz" 'BEGIN { print a / b }')" "$(cat "$BENCH_DIR/time-$t")"
done
if [[ " $BENCH_TOOLS " == *" backtree "* ]]; then
    printf '\nbacktree cat --original, all nights: %s s\n' "$(cat "$BENCH_DIR/time-cat")"
    for o in restic borg; do
        [[ " $BENCH_TOOLS " == *" $o "* ]] || continue
        printf 'backtree vs %s: size %.2fx, time %.2fx\n' "$o" \
            "$(awk -v a="$(cat "$BENCH_DIR/size-backtree")" -v b="$(cat "$BENCH_DIR/size-$o")" 'BEGIN { print a / b }')" \
            "$(awk -v a="$(cat "$BENCH_DIR/time-backtree")" -v b="$(cat "$BENCH_DIR/time-$o")" 'BEGIN { print a / b }')"
    done
    size=$(cat "$BENCH_DIR/size-backtree")
    printf 'target backtree < 2x one .gz: %s\n' "$([ "$size" -lt $((2 * first_gz)) ] && echo PASS || echo FAIL)"
fi
