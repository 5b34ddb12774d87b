#!/usr/bin/env bash
# S3 benchmark: backtree vs restic with both repositories in the same local Garage bucket, one run.
#
# Garage (scripts/garage.sh, a single node on loopback) holds one bucket; every tool and dataset
# gets its own prefix in it: s3://backtree-test/bench-bt-DATASET for backtree and
# s3:ENDPOINT/backtree-test/bench-restic-DATASET for restic (its s3: backend).
#
# Datasets
#   tree   real files (BENCH_TREE, default /usr/share/doc /usr/share/locale): ingest throughput
#   image  one large file: a copy of BENCH_IMAGE_REUSE (the 2 GiB sparse ext4 image that
#          scripts/bench.sh makes) if it exists, else the first BENCH_IMAGE_MB MiB of a tar of
#          /usr/lib: ingest throughput, and the cold sequential read through the mount
#
# Measurements, per round (one round per RTT in BENCH_RTTS, default "0 20" ms):
#   ingest  wall time of `backtree ingest` / `restic backup` into a fresh prefix, page cache
#           dropped first; MB/s = logical bytes (apparent file sizes, 10^6) / wall time
#   answer  seconds from starting the mount command until `ls` of the directory holding the
#           image answers (polled every 10 ms)
#   read    cold `dd if=FILE of=/dev/null bs=1M` of the image on a fresh mount (page cache dropped
#           before the daemon starts and again before dd) -> MB/s; afterwards (untimed) `cmp`
#           of the file through the same mount against the source
#   rss     the mount daemon's VmHWM at the end of the read session
#
# Round 0 talks to a Garage on the host's loopback. A round with RTT > 0 makes a network
# namespace (BENCH_NETNS), brings its `lo` up, adds the latency there and runs a second Garage,
# the ingests and the mount daemons inside it (`nsenter --net`, which keeps the mount namespace,
# so the FUSE mounts are visible to the host; `ip netns exec` would unshare the mount namespace
# and hide them). dd and cmp run outside. The latency is `tc qdisc ... netem delay RTT/2` on the
# namespace's `lo` when the kernel has netem (sch_netem); otherwise a small delaying TCP proxy
# (std-only Rust, built with rustc from the source below) runs inside the namespace in front of
# Garage and holds every byte RTT/2 in each direction, plus one RTT before a new connection's
# first request (the TCP handshake). Nothing leaves loopback; no other interface is touched.
#
# Quiet machine (mirrors scripts/bench-mount.sh): before every heavy step the script waits (up
# to BENCH_QUIET_WAIT s) until no scripts/bench.sh or scripts/bench-mount.sh runs; before every
# timed step it waits (up to BENCH_IDLE_WAIT s) until other processes use under 15% of one core
# over 2 s; it records the load average and the CPU time other processes used during each
# timed step (all busy CPU minus the client, the mount daemon, Garage and the proxy), and it
# repeats a step during which others used more than BENCH_NOISE CPU seconds (at most
# BENCH_RETRIES times; a repeated ingest goes to a fresh prefix). Results are printed as
# markdown and spliced into BENCH_DOC between `<!-- bench-s3:begin -->` and `<!-- bench-s3:end -->`.
#
# Needs root (drop_caches, network namespaces). Usage:
#   scripts/bench-s3.sh
# Environment (defaults in brackets):
#   BENCH_DIR           work directory, wiped at start            [/tmp/backtree-bench-s3]
#   BENCH_TARGET        cargo target dir for the release build    [/tmp/backtree-bench-target]
#   BENCH_BACKTREE      use this backtree binary, skip the build  []
#   BENCH_TREE          paths of the tree dataset                 [/usr/share/doc /usr/share/locale]
#   BENCH_IMAGE_REUSE   copy this file as the image if it exists  [/tmp/backtree-bench/image/disk.img]
#   BENCH_IMAGE_MB      otherwise: MiB of `tar -c /usr/lib` to use [1024]
#   BENCH_TOOLS         tools to run                              [backtree restic]
#   BENCH_RTTS          round trip times to add, ms, one round each [0 20]
#   BENCH_LATENCY       how latency is added: auto (netem if the kernel has it, else the
#                       proxy), netem, proxy                      [auto]
#   BENCH_LATENCY_INGEST 1: time the ingests in latency rounds too; 0: ingest there untimed
#                       before the latency is switched on (proxy mode only; netem rounds always
#                       ingest with latency)                      [1]
#   BENCH_NETNS         name of the network namespace             [btbench]
#   BENCH_CACHE_SIZE    backtree mount --cache-size, '' = default (64M on S3) []
#   BENCH_S3_ATTEMPTS   backtree --s3-attempts, '' = default      []
#   BENCH_TIMEOUT       seconds before one ingest/read/cmp is killed [300]
#   BENCH_MOUNT_TIMEOUT seconds a mount may take to answer        [120]
#   BENCH_QUIET_WAIT    seconds to wait for the other benchmarks  [1200]
#   BENCH_IDLE_WAIT     seconds to wait for an idle machine before each timed step [300]
#   BENCH_NOISE         a step is repeated when other processes used more than this many CPU
#                       seconds during it                         [1.0]
#   BENCH_RETRIES       how often a disturbed step is repeated, at most [2]
#   BENCH_KEEP          1: keep Garage's data and the image copy at the end [0]
#   BENCH_DOC           markdown file to update, '' for none      [docs/benchmarks-s3.md]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/backtree-bench-s3}
BENCH_TARGET=${BENCH_TARGET:-/tmp/backtree-bench-target}
BENCH_BACKTREE=${BENCH_BACKTREE:-}
BENCH_TREE=${BENCH_TREE:-/usr/share/doc /usr/share/locale}
BENCH_IMAGE_REUSE=${BENCH_IMAGE_REUSE-/tmp/backtree-bench/image/disk.img}
BENCH_IMAGE_MB=${BENCH_IMAGE_MB:-1024}
BENCH_TOOLS=${BENCH_TOOLS:-backtree restic}
BENCH_RTTS=${BENCH_RTTS:-0 20}
BENCH_LATENCY=${BENCH_LATENCY:-auto}
BENCH_LATENCY_INGEST=${BENCH_LATENCY_INGEST:-1}
BENCH_NETNS=${BENCH_NETNS:-btbench}
BENCH_CACHE_SIZE=${BENCH_CACHE_SIZE:-}
BENCH_S3_ATTEMPTS=${BENCH_S3_ATTEMPTS:-}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
BENCH_MOUNT_TIMEOUT=${BENCH_MOUNT_TIMEOUT:-120}
BENCH_QUIET_WAIT=${BENCH_QUIET_WAIT:-1200}
BENCH_IDLE_WAIT=${BENCH_IDLE_WAIT:-300}
BENCH_NOISE=${BENCH_NOISE:-1.0}
BENCH_RETRIES=${BENCH_RETRIES:-2}
BENCH_KEEP=${BENCH_KEEP:-0}
BENCH_DOC=${BENCH_DOC-$ROOT/docs/benchmarks-s3.md}

BUCKET=backtree-test          # the bucket scripts/garage.sh creates
MNT=$BENCH_DIR/mnt
RESULTS=$BENCH_DIR/results.tsv
LOGS=$BENCH_DIR/logs
IMG=$BENCH_DIR/image/disk.img
CLK_TCK=$(getconf CLK_TCK)
NETNS_PATH=/run/netns/$BENCH_NETNS
DAEMON_PID=   # the mount daemon
PROXY_PID=    # the latency proxy of the current round
GARAGES=()    # Garage directories started by this run (stopped at exit)
NETNS_MADE=0
NS=()         # command prefix of the current round: () or (nsenter --net=NETNS_PATH)
RTT=0         # the current round's added RTT, ms
LAT_MODE=none # how the current round adds latency: none, netem, proxy
LAT_NOTE=()   # per latency round: how it was added and what was measured
NOISY=0
BUSY=0
IDLE_WAITED=0
REPEATS=0
DISTURBED=0

# wait_quiet waits until neither scripts/bench.sh nor scripts/bench-mount.sh runs.
OTHER_BENCH_RE='scripts/bench(-mount)?\.sh'
OTHER_BENCH="scripts/bench.sh / bench-mount.sh"

SCRIPT_NAME=bench-s3.sh
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$ROOT/scripts/lib/common.sh"

# ---------------------------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------------------------

prerequisites() {
    need_root "drop_caches and network namespaces"
    install_missing restic:restic fusermount3:fuse3 /usr/bin/time:time tc:iproute2 ip:iproute2 \
        nsenter:util-linux curl:curl
    [ -e /dev/fuse ] || die "/dev/fuse is missing"
    command -v cargo >/dev/null || [ -n "$BENCH_BACKTREE" ] || die "cargo not found"
    GARAGE_BIN=$("$ROOT/scripts/garage.sh" install) || die "scripts/garage.sh install failed"
}

build_backtree() {
    # The target dir is shared with the other benchmarks: run a private copy, stable for this
    # run, of a prebuilt binary too.
    if use_prebuilt; then
        private_copy
        return
    fi
    wait_quiet "build"
    build_release
    BUILT_REV=$(source_rev)
    private_copy
}

# ---------------------------------------------------------------------------------------------
# Work directory, Garage, network namespace, cleanup
# ---------------------------------------------------------------------------------------------

garage_pid() { cat "$1/garage.pid" 2>/dev/null || true; } # DIR

stop_garages() {
    local g
    for g in "${GARAGES[@]+"${GARAGES[@]}"}"; do
        [ -d "$g" ] && "$ROOT/scripts/garage.sh" stop "$g" >>"$LOGS/garage.log" 2>&1 || true
    done
    GARAGES=()
}

delete_netns() {
    if [ -e "$NETNS_PATH" ]; then
        ip netns del "$BENCH_NETNS" 2>/dev/null || info "WARNING: could not delete netns $BENCH_NETNS"
    fi
    NETNS_MADE=0
}

prepare_workdir() {
    check_workdir
    say "cleaning work directory $BENCH_DIR"
    unmount_dir "$MNT"
    # Garages and a proxy a previous (killed) run may have left behind.
    local g pid
    for g in "$BENCH_DIR"/garage*; do
        [ -f "$g/garage.pid" ] && "$ROOT/scripts/garage.sh" stop "$g" >&2 || true
    done
    for pid in "$BENCH_DIR"/proxy-*.pid; do
        [ -f "$pid" ] && stop_pid "$(cat "$pid")"
    done
    # The namespace only if it is ours: made by this script (the marker below) or empty.
    if [ -e "$NETNS_PATH" ]; then
        if [ -e "$BENCH_DIR/.netns-$BENCH_NETNS" ] || [ -z "$(ip netns pids "$BENCH_NETNS" 2>/dev/null)" ]; then
            delete_netns
        else
            die "network namespace $BENCH_NETNS exists and has processes; choose another BENCH_NETNS"
        fi
    fi
    rm -rf "$BENCH_DIR"
    mkdir -p "$BENCH_DIR" "$LOGS" "$MNT" "$BENCH_DIR/image"
    touch "$BENCH_DIR/$WORKDIR_MARK"
    printf 'rtt\tdataset\ttool\tstep\tvalue\tunit\tload1\tother_cpu\ttool_cpu\tserver_cpu\twall\trc\treqs\n' >"$RESULTS"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_daemon
    unmount_dir "$MNT"
    stop_pid "$PROXY_PID"
    stop_garages
    delete_netns
    if [ "$BENCH_KEEP" != 1 ] && [ -d "$BENCH_DIR" ]; then
        rm -rf "$BENCH_DIR"/garage*/data "$BENCH_DIR"/garage*/meta "$IMG" "$BENCH_DIR/restic-cache"*
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_garage DIR: starts a Garage node (inside the current round's namespace) and exports
# its credentials and endpoint (AWS_*), which both backtree and restic read.
start_garage() {
    local dir=$1
    GARAGES+=("$dir")
    "${NS[@]+"${NS[@]}"}" timeout 120 "$ROOT/scripts/garage.sh" start "$dir" >>"$LOGS/garage.log" 2>&1 ||
        die "Garage did not start in $dir; see $LOGS/garage.log and $dir/garage.log"
    # shellcheck disable=SC1091
    . "$dir/env"
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION AWS_ENDPOINT_URL
    GARAGE_ENDPOINT=$AWS_ENDPOINT_URL
    GARAGE_DIR=$dir
    info "Garage $dir: $GARAGE_ENDPOINT (pid $(garage_pid "$dir"))${NS[*]:+ inside netns $BENCH_NETNS}"
}

# ---------------------------------------------------------------------------------------------
# Latency: netem in the namespace, or a delaying proxy
# ---------------------------------------------------------------------------------------------

make_netns() {
    delete_netns
    ip netns add "$BENCH_NETNS" || die "cannot create network namespace $BENCH_NETNS"
    NETNS_MADE=1
    touch "$BENCH_DIR/.netns-$BENCH_NETNS"
    ip -n "$BENCH_NETNS" link set lo up
    NS=(nsenter "--net=$NETNS_PATH")
}

# Tries netem on the namespace's lo (delay: half the RTT, applied once per packet on loopback).
add_netem() { # RTT_MS
    local half
    half=$(awk -v r="$1" 'BEGIN { printf "%g", r / 2 }')
    ip netns exec "$BENCH_NETNS" tc qdisc add dev lo root netem delay "${half}ms" limit 100000 \
        2>"$LOGS/netem-$1.err"
}

PROXY_SRC='// Delaying TCP proxy (bench-s3.sh): every byte is forwarded DELAY_MS after it arrived, in both
// directions, so a request/response pair costs 2 * DELAY_MS more (one RTT); the first bytes of
// a connection wait one RTT longer (the TCP handshake a real link would cost). Up to 64 reads
// (256 KiB each at most) are in flight per direction. std only.
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::sync_channel;
use std::thread;
use std::time::{Duration, Instant};

fn pump(mut src: TcpStream, mut dst: TcpStream, delay: Duration, gate: Instant) {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(64);
    let src2 = src.try_clone().expect("clone");
    let writer = thread::spawn(move || {
        for (due, buf) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if buf.is_empty() {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            if dst.write_all(&buf).is_err() {
                let _ = dst.shutdown(Shutdown::Both);
                let _ = src2.shutdown(Shutdown::Both);
                return;
            }
        }
    });
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = src.read(&mut buf).unwrap_or(0);
        let due = Instant::now().max(gate) + delay;
        if tx.send((due, buf[..n].to_vec())).is_err() || n == 0 {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: latency-proxy LISTEN_ADDR UPSTREAM_ADDR ONE_WAY_DELAY_MS");
        std::process::exit(2);
    }
    let delay = Duration::from_micros((args[3].parse::<f64>().expect("delay") * 1000.0) as u64);
    let listener = TcpListener::bind(&args[1]).expect("bind");
    eprintln!("latency-proxy: {} -> {}, {} ms each way", args[1], args[2], args[3]);
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let upstream = args[2].clone();
        thread::spawn(move || {
            let accepted = Instant::now();
            let Ok(server) = TcpStream::connect(&upstream) else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let gate = accepted + 2 * delay;
            let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            let up = thread::spawn(move || pump(client, server, delay, gate));
            pump(s2, c2, delay, accepted);
            let _ = up.join();
        });
    }
}
'

build_proxy() {
    PROXY_BIN=$BENCH_DIR/proxy/latency-proxy
    [ -x "$PROXY_BIN" ] && return 0
    mkdir -p "$BENCH_DIR/proxy"
    printf '%s' "$PROXY_SRC" >"$BENCH_DIR/proxy/latency-proxy.rs"
    info "building the latency proxy with rustc"
    rustc -O --edition 2021 -o "$PROXY_BIN" "$BENCH_DIR/proxy/latency-proxy.rs" \
        >"$LOGS/proxy-build.log" 2>&1 || die "building the latency proxy failed; see $LOGS/proxy-build.log"
}

port_open() { "${NS[@]+"${NS[@]}"}" bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# start_proxy RTT_MS: a proxy in the namespace in front of Garage; AWS_ENDPOINT_URL points at it.
start_proxy() {
    local rtt=$1 half port upstream=${GARAGE_ENDPOINT#http://} i
    half=$(awk -v r="$rtt" 'BEGIN { printf "%g", r / 2 }')
    build_proxy
    for i in $(seq 1 50); do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        port_open "$port" || break
    done
    "${NS[@]}" setsid "$PROXY_BIN" "127.0.0.1:$port" "$upstream" "$half" >"$LOGS/proxy-$rtt.log" 2>&1 </dev/null &
    PROXY_PID=$!
    echo "$PROXY_PID" >"$BENCH_DIR/proxy-$rtt.pid"
    for i in $(seq 1 100); do port_open "$port" && break; sleep 0.05; done
    port_open "$port" || die "the latency proxy did not listen on 127.0.0.1:$port; see $LOGS/proxy-$rtt.log"
    export AWS_ENDPOINT_URL=http://127.0.0.1:$port
    info "latency proxy (pid $PROXY_PID): $AWS_ENDPOINT_URL -> $upstream, ${half} ms each way"
}

# Time to first byte of an unauthenticated GET on a new connection (the server answers 403):
# a connection setup and one request, i.e. about 2 RTTs.
probe_ttfb() { # URL -> ms
    "${NS[@]+"${NS[@]}"}" curl -s -o /dev/null -m 10 -w '%{time_starttransfer}' "$1/" |
        awk '{ printf "%.1f", $1 * 1000 }'
}

# ---------------------------------------------------------------------------------------------
# Measuring (timed mirrors bench-mount.sh; the servers are subtracted too)
# ---------------------------------------------------------------------------------------------

server_pids() { echo "$(garage_pid "$GARAGE_DIR") $PROXY_PID"; }

# S3 requests Garage has served so far, from its admin API's metrics: "GETS PUTS" (GetObject;
# PutObject and multipart parts), "- -" when the metrics cannot be read.
garage_requests() {
    local admin token
    admin=$(awk '{ print $3 }' "$GARAGE_DIR/ports" 2>/dev/null) || true
    token=$(awk -F'"' '/^admin_token/ { print $2 }' "$GARAGE_DIR/garage.toml" 2>/dev/null) || true
    { [ -n "$admin" ] && [ -n "$token" ] &&
        "${NS[@]+"${NS[@]}"}" curl -sf -m 5 -H "Authorization: Bearer $token" "http://127.0.0.1:$admin/metrics"; } |
        awk '/^api_s3_request_counter\{/ {
                if ($1 ~ /"GetObject"/) g += $2
                else if ($1 ~ /"(PutObject|UploadPart|CompleteMultipartUpload|CreateMultipartUpload)"/) p += $2
                seen = 1 }
             END { if (seen) print g + 0, p + 0; else print "- -" }' || echo "- -"
}

record() { # DATASET TOOL STEP VALUE UNIT [LOAD OTHER TOOLCPU SERVERCPU WALL RC REQS]
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$RTT" "$1" "$2" "$3" "$4" "$5" \
        "${6:--}" "${7:--}" "${8:--}" "${9:--}" "${10:--}" "${11:-0}" "${12:--}" >>"$RESULTS"
}

unrecord() { # DATASET TOOL STEP_REGEX: drop the current round's rows of a repeated step
    awk -F'\t' -v r="$RTT" -v d="$1" -v t="$2" -v re="$3" '!($1 == r && $2 == d && $3 == t && $4 ~ re)' \
        "$RESULTS" >"$RESULTS.tmp"
    mv "$RESULTS.tmp" "$RESULTS"
}

# timed NAME -- COMMAND...: runs COMMAND (bounded by BENCH_TIMEOUT), sets T_WALL, T_RC, T_LOAD,
# T_OTHER (CPU s of processes other than COMMAND, the mount daemon, Garage and the proxy),
# T_TOOL (COMMAND + mount daemon CPU s) and T_SERVER (Garage + proxy CPU s).
timed() {
    local name=$1 base t0 t1 b0 b1 d0 d1 s0 s1 q0 q1 p0 p1 user sys
    shift 2
    base=$LOGS/rtt$RTT-$name
    T_LOAD=$(cut -d' ' -f1 /proc/loadavg)
    info "$name: $*"
    T_RC=0
    b0=$(busy_ticks)
    d0=$(proc_ticks "$DAEMON_PID")
    read -r q0 p0 < <(garage_requests)
    # shellcheck disable=SC2046
    s0=$(proc_ticks $(server_pids))
    t0=$(now)
    /usr/bin/time -o "$base.time" -f '%U %S' timeout -k 10 "$BENCH_TIMEOUT" "$@" >"$base.out" 2>"$base.err" || T_RC=$?
    t1=$(now)
    # shellcheck disable=SC2046
    s1=$(proc_ticks $(server_pids))
    d1=$(proc_ticks "$DAEMON_PID")
    b1=$(busy_ticks)
    read -r q1 p1 < <(garage_requests)
    if [ "$q0" = - ] || [ "$q1" = - ]; then T_REQS=-; else T_REQS="$((q1 - q0))/$((p1 - p0))"; fi
    read -r user sys < <(tail -n1 "$base.time" | grep -E '^[0-9.]+ [0-9.]+$' || echo "0 0")
    T_WALL=$(elapsed "$t0" "$t1")
    read -r T_OTHER T_TOOL T_SERVER < <(awk -v b="$((b1 - b0))" -v d="$((d1 - d0))" -v s="$((s1 - s0))" \
        -v hz="$CLK_TCK" -v u="$user" -v y="$sys" \
        'BEGIN { o = (b - d - s) / hz - u - y; if (o < 0) o = 0
                 printf "%.1f %.1f %.1f\n", o, u + y + d / hz, s / hz }')
    if [ "$T_RC" -ne 0 ]; then
        info "FAILED (exit $T_RC): $(tail -n3 "$base.err" | tr '\n' ' ')"
    fi
    info "$(printf '%s: %ss (load %s, others %s CPU s, tool %s CPU s, Garage+proxy %s CPU s, S3 GETs/PUTs %s)' \
        "$name" "$T_WALL" "$T_LOAD" "$T_OTHER" "$T_TOOL" "$T_SERVER" "$T_REQS")"
}

disturbed() { awk -v n="$T_OTHER" -v max="$BENCH_NOISE" 'BEGIN { exit !(n > max) }'; }

# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

make_datasets() {
    read -r -a TREE_PATHS <<<"$BENCH_TREE"
    TREE_BYTES=$(logical_size "${TREE_PATHS[@]}")
    printf 'tree\t%s files and directories, %s MiB in regular files, in %s\n' \
        "$(find "${TREE_PATHS[@]}" -xdev | wc -l)" "$((TREE_BYTES / 1048576))" "${TREE_PATHS[*]}" \
        >>"$BENCH_DIR/datasets.txt"
    wait_quiet "making the image"
    if [ -n "$BENCH_IMAGE_REUSE" ] && [ -f "$BENCH_IMAGE_REUSE" ]; then
        say "image: copying $BENCH_IMAGE_REUSE (cp --sparse=always)"
        timeout 600 cp --sparse=always "$BENCH_IMAGE_REUSE" "$IMG"
        IMAGE_DESC="copy of $BENCH_IMAGE_REUSE (sparse ext4 image made by scripts/bench.sh)"
    else
        say "image: the first $BENCH_IMAGE_MB MiB of a tar of /usr/lib"
        (tar -C / -cf - usr/lib 2>/dev/null || true) | head -c "$((BENCH_IMAGE_MB << 20))" >"$IMG"
        IMAGE_DESC="first $BENCH_IMAGE_MB MiB of \`tar -c /usr/lib\`"
    fi
    IMAGE_BYTES=$(stat -c %s "$IMG")
    printf 'image\tone file of %s MiB (%s MiB allocated): %s\n' "$((IMAGE_BYTES / 1048576))" \
        "$(($(du -B1 "$IMG" | cut -f1) / 1048576))" "$IMAGE_DESC" >>"$BENCH_DIR/datasets.txt"
    info "tree: $TREE_BYTES bytes; image: $IMAGE_BYTES bytes"
}

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------

export RESTIC_PASSWORD=bench
bt_s3_args() { BT_S3=(${BENCH_S3_ATTEMPTS:+--s3-attempts "$BENCH_S3_ATTEMPTS"}); }

prefix_of() { # DATASET TOOL ATTEMPT
    local p
    case $2 in backtree) p=bench-bt-$1 ;; restic) p=bench-restic-$1 ;; *) die "unknown tool $2" ;; esac
    [ "$3" -gt 0 ] && p=$p-r$3
    echo "$p"
}
repo_url() { # DATASET TOOL ATTEMPT
    case $2 in
        backtree) echo "s3://$BUCKET/$(prefix_of "$@")" ;;
        restic) echo "s3:$AWS_ENDPOINT_URL/$BUCKET/$(prefix_of "$@")" ;;
    esac
}

# Init commands run untimed; the ingest itself is timed (TIMED_CMD).
init_repo() { # DATASET TOOL URL
    local log=$LOGS/rtt$RTT-init-$1-$2.log
    case $2 in
        backtree) "${NS[@]+"${NS[@]}"}" timeout 120 "$BT" init --repo "$3" "${BT_S3[@]+"${BT_S3[@]}"}" >>"$log" 2>&1 ;;
        restic) "${NS[@]+"${NS[@]}"}" timeout 120 restic -r "$3" --cache-dir "$RESTIC_CACHE" init >>"$log" 2>&1 ;;
    esac || die "$2 init of $3 failed; see $log: $(tail -n3 "$log" | tr '\n' ' ')"
}

ingest_cmd() { # DATASET TOOL URL PATHS...
    local ds=$1 tool=$2 url=$3
    shift 3
    case $tool in
        backtree) INGEST_CMD=("${NS[@]+"${NS[@]}"}" "$BT" ingest --repo "$url" "${BT_S3[@]+"${BT_S3[@]}"}" --host bench "$@") ;;
        restic) INGEST_CMD=("${NS[@]+"${NS[@]}"}" restic -r "$url" --cache-dir "$RESTIC_CACHE" backup
            ${RESTIC_COMPRESSION:+--compression "$RESTIC_COMPRESSION"} --host bench "$@") ;;
    esac
}

# ingest DATASET TOOL BYTES PATHS...: fresh prefix, cold page cache, timed; repeated (to a new
# prefix) when disturbed. Sets REPO_URL[DATASET-TOOL] to the prefix that was kept.
declare -A REPO_URL
ingest() {
    local ds=$1 tool=$2 bytes=$3 attempt url mbs rc timed_run=${TIME_INGEST:-1}
    shift 3
    for ((attempt = 0; attempt <= BENCH_RETRIES; attempt++)); do
        url=$(repo_url "$ds" "$tool" "$attempt")
        wait_quiet "$tool ingest of $ds"
        init_repo "$ds" "$tool" "$url"
        ingest_cmd "$ds" "$tool" "$url" "$@"
        wait_idle "$tool ingest of $ds"
        drop_caches
        timed "ingest-$ds-$tool" -- "${INGEST_CMD[@]}"
        rc=$T_RC
        # backtree exits 3 and restic 3 when some paths could not be read; the generation exists.
        if [ "$rc" -eq 3 ]; then info "$tool skipped some paths (exit 3)"; rc=0; fi
        [ "$rc" -eq 0 ] || die "$tool ingest of $ds failed (exit $T_RC); see $LOGS/rtt$RTT-ingest-$ds-$tool.err: $(tail -n3 "$LOGS/rtt$RTT-ingest-$ds-$tool.err" | tr '\n' ' ')"
        REPO_URL[$ds-$tool]=$url
        [ "$timed_run" = 1 ] || return 0
        mbs=$(awk -v s="$bytes" -v t="$T_WALL" 'BEGIN { printf "%.1f", s / 1e6 / t }')
        info "$tool ingest of $ds: $mbs MB/s"
        unrecord "$ds" "$tool" '^ingest$'
        record "$ds" "$tool" ingest "$mbs" MB/s "$T_LOAD" "$T_OTHER" "$T_TOOL" "$T_SERVER" "$T_WALL" "$rc" "$T_REQS"
        disturbed || return 0
        if [ "$attempt" -lt "$BENCH_RETRIES" ]; then
            info "disturbed: others used $T_OTHER CPU s; repeating the $tool ingest of $ds into a fresh prefix"
            REPEATS=$((REPEATS + 1))
        fi
    done
    info "WARNING: the $tool ingest of $ds was still disturbed after $BENCH_RETRIES repeats; keeping it"
    DISTURBED=$((DISTURBED + 1))
}

# Where the image is inside a tool's mount.
image_in_mount() { # TOOL
    case $1 in
        backtree) echo "$MNT/bench/latest/$(basename "$IMG")" ;; # one file: an entry of the root
        restic) echo "$MNT/snapshots/latest/${IMG#/}" ;;         # restic keeps the absolute path
    esac
}

mount_cmd() { # TOOL URL
    case $1 in
        backtree) MOUNT_CMD=("${NS[@]+"${NS[@]}"}" "$BT" mount --repo "$2" "${BT_S3[@]+"${BT_S3[@]}"}"
            ${BENCH_CACHE_SIZE:+--cache-size "$BENCH_CACHE_SIZE"} "$MNT") ;;
        restic) MOUNT_CMD=("${NS[@]+"${NS[@]}"}" restic -r "$2" --cache-dir "$RESTIC_CACHE" mount "$MNT") ;;
    esac
}

# mount_tool TOOL: fresh mount of the image repository with a cold page cache; polls until the
# image's directory answers; records the time. Sets DAEMON_PID (nsenter execs, so $! is the
# daemon itself).
mount_tool() {
    local tool=$1 dir t0 t1 log load
    dir=$(dirname "$(image_in_mount "$tool")")
    log=$LOGS/rtt$RTT-mount-$tool.log
    unmount_dir "$MNT"
    wait_idle "mounting $tool"
    drop_caches
    load=$(cut -d' ' -f1 /proc/loadavg)
    mount_cmd "$tool" "${REPO_URL[image-$tool]}"
    t0=$(now)
    "${MOUNT_CMD[@]}" >>"$log" 2>&1 &
    DAEMON_PID=$!
    local t0us=${t0/./} limit=$((BENCH_MOUNT_TIMEOUT * 1000000))
    until timeout -k 2 10 ls "$dir" >/dev/null 2>&1; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            DAEMON_PID=
            die "$tool mount exited before answering; log $log: $(tail -n5 "$log" | tr '\n' ' ')"
        fi
        if ((${EPOCHREALTIME/./} - t0us > limit)); then
            die "$tool mount did not answer within ${BENCH_MOUNT_TIMEOUT}s; log $log"
        fi
        sleep 0.01
    done
    t1=$(now)
    MOUNT_ANSWER=$(elapsed "$t0" "$t1")
    MOUNT_LOAD=$load
    info "$tool mount (pid $DAEMON_PID, $(cat "/proc/$DAEMON_PID/comm")) answered after ${MOUNT_ANSWER}s: ls $dir"
}

unmount_tool() { # TOOL: records the daemon's peak RSS, unmounts, waits for the daemon
    local tool=$1 i
    DAEMON_HWM=$(awk '/^VmHWM:/ { print $2 }' "/proc/$DAEMON_PID/status" 2>/dev/null || echo 0)
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

# read_session TOOL: fresh mount, cold dd of the image, untimed cmp on the same mount; repeated
# (fresh mount) when disturbed.
read_session() {
    local tool=$1 attempt file mbs verdict
    file=$(image_in_mount "$tool")
    for ((attempt = 0; ; attempt++)); do
        wait_quiet "$tool read"
        mount_tool "$tool"
        wait_idle "$tool cold read"
        drop_caches
        timed "read-$tool" -- dd if="$file" of=/dev/null bs=1M
        mbs=$(awk -v s="$IMAGE_BYTES" -v t="$T_WALL" 'BEGIN { printf "%.1f", s / 1e6 / t }')
        info "$tool cold read: $mbs MB/s"
        unrecord image "$tool" '^(answer|read|rss|verify)$'
        record image "$tool" answer "$MOUNT_ANSWER" s "$MOUNT_LOAD"
        record image "$tool" read "$mbs" MB/s "$T_LOAD" "$T_OTHER" "$T_TOOL" "$T_SERVER" "$T_WALL" "$T_RC" "$T_REQS"
        # A failed read is kept as it is (and shown as FAILED); an undisturbed one is done.
        if [ "$T_RC" -ne 0 ] || ! disturbed; then break; fi
        if [ "$attempt" -ge "$BENCH_RETRIES" ]; then
            info "WARNING: the $tool read was still disturbed after $BENCH_RETRIES repeats; keeping it"
            DISTURBED=$((DISTURBED + 1))
            break
        fi
        info "disturbed: others used $T_OTHER CPU s; repeating the $tool read on a fresh mount"
        REPEATS=$((REPEATS + 1))
        unmount_tool "$tool"
    done
    # Correctness, untimed: the whole file through the same mount against the source.
    local t0=$(now)
    if timeout -k 10 "$BENCH_TIMEOUT" cmp "$file" "$IMG" >"$LOGS/rtt$RTT-cmp-$tool.log" 2>&1; then
        verdict=identical
    else
        verdict="DIFFERS: $(head -c 300 "$LOGS/rtt$RTT-cmp-$tool.log" | tr '\n' ' ')"
    fi
    info "$tool: image through the mount vs source: $verdict ($(elapsed "$t0" "$(now)") s)"
    record image "$tool" verify "$verdict" -
    unmount_tool "$tool"
    record image "$tool" rss "$DAEMON_HWM" KiB
}

# ---------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------

run_round() { # RTT_MS
    RTT=$1
    local gdir=$BENCH_DIR/garage-rtt$RTT tool half
    RESTIC_CACHE=$BENCH_DIR/restic-cache-rtt$RTT
    say "round: ${RTT} ms RTT added"
    NS=()
    PROXY_PID=
    LAT_MODE=none
    TIME_INGEST=1
    if [ "$RTT" != 0 ]; then
        make_netns
        case $BENCH_LATENCY in
            auto | netem)
                if add_netem "$RTT"; then
                    LAT_MODE=netem
                elif [ "$BENCH_LATENCY" = netem ]; then
                    die "tc netem failed: $(cat "$LOGS/netem-$RTT.err")"
                else
                    LAT_MODE=proxy
                    info "netem is not available ($(tr '\n' ' ' <"$LOGS/netem-$RTT.err")); using the delaying proxy"
                fi ;;
            proxy) LAT_MODE=proxy ;;
            *) die "BENCH_LATENCY must be auto, netem or proxy" ;;
        esac
    fi
    start_garage "$gdir"
    local direct
    direct=$(probe_ttfb "$GARAGE_ENDPOINT")
    if [ "$LAT_MODE" = proxy ] && [ "$BENCH_LATENCY_INGEST" != 1 ]; then TIME_INGEST=0; fi
    if [ "$LAT_MODE" = proxy ] && [ "$TIME_INGEST" = 1 ]; then start_proxy "$RTT"; fi

    say "ingesting (${RTT} ms RTT)"
    for tool in $BENCH_TOOLS; do
        ingest tree "$tool" "$TREE_BYTES" "${TREE_PATHS[@]}"
        ingest image "$tool" "$IMAGE_BYTES" "$IMG"
    done
    if [ "$LAT_MODE" = proxy ] && [ -z "$PROXY_PID" ]; then
        start_proxy "$RTT"
        # The restic repositories' URLs name the endpoint: point them at the proxy.
        for tool in $BENCH_TOOLS; do
            [ "$tool" = restic ] && REPO_URL[image-restic]="s3:$AWS_ENDPOINT_URL/$BUCKET/${REPO_URL[image-restic]##*/$BUCKET/}"
        done
    fi
    local via how
    via=$(probe_ttfb "$AWS_ENDPOINT_URL")
    if [ "$LAT_MODE" = none ]; then
        info "time to first byte on a new connection: $via ms"
    else
        info "time to first byte on a new connection: $via ms (Garage directly, inside the namespace: $direct ms)"
        half=$(awk -v r="$RTT" 'BEGIN { printf "%g", r / 2 }')
        case $LAT_MODE in
            netem) how="tc netem, delay $half ms on the namespace's lo" ;;
            proxy) how="the delaying proxy, $half ms each way"
                if [ "$BENCH_LATENCY" = auto ]; then how="$how (netem is not in this kernel)"; fi ;;
        esac
        [ "$TIME_INGEST" = 1 ] || how="$how; the ingests ran before it was added and are not timed"
        LAT_NOTE+=("Round $RTT: Garage, ingests and mount daemons in network namespace $BENCH_NETNS; latency added with $how; time to first byte of a request on a new connection $via ms (without the added latency $direct ms)")
    fi
    [ "$RTT" = 0 ] && TTFB0=$via

    say "cold reads through the mount (${RTT} ms RTT)"
    for tool in $BENCH_TOOLS; do read_session "$tool"; done

    stop_pid "$PROXY_PID"
    PROXY_PID=
    stop_garages
    [ "$RTT" = 0 ] || delete_netns
    NS=()
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

machine_info() {
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); the script ran ${RUN_SECONDS} s"
    echo "- CPU: $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo);" \
        "RAM $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo);" \
        "kernel $(uname -r); work dir and Garage data on $(df --output=source,fstype "$BENCH_DIR" | tail -n1 | tr -s ' ')"
    echo "- Tools: backtree $("$BT" --version | awk '{ print $2 }') (git ${BUILT_REV:-unknown, prebuilt binary}, release build," \
        "mount with ${BENCH_CACHE_SIZE:-the default (64M on S3)} --cache-size); $(restic version | awk '{ print $1, $2 }')" \
        "(s3: backend, default 5 connections${RESTIC_COMPRESSION:+, --compression $RESTIC_COMPRESSION}, local cache in the work dir);" \
        "Garage $("$GARAGE_BIN" --version 2>/dev/null | head -n1 | awk '{ sub(/^[a-z]*:/, "", $2); print $2 }') (scripts/garage.sh, one node, sqlite metadata, on the same machine)"
    [ -z "${TTFB0:-}" ] ||
        echo "- Round 0: Garage on the host's loopback (time to first byte of a request on a new connection: $TTFB0 ms)"
    local n
    for n in "${LAT_NOTE[@]+"${LAT_NOTE[@]}"}"; do echo "- $n"; done
    echo "- Load average (1/5/15 min) at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
    if [ "$NOISY" -gt 0 ]; then
        echo "- **Noise warning:** another benchmark was still running at $NOISY step(s) after waiting ${BENCH_QUIET_WAIT}s"
    else
        echo "- No scripts/bench.sh or scripts/bench-mount.sh was running during any step (the script waits for them)"
    fi
    echo "- Before each timed step the script waited for other processes to use under 15% of a core" \
        "(${IDLE_WAITED}s of waiting in all); $([ "$BUSY" -gt 0 ] && echo "**$BUSY step(s) started while the machine was still busy**" || echo "every step started on an idle machine")." \
        "A step during which other processes used more than $BENCH_NOISE CPU s is repeated (up to $BENCH_RETRIES times):" \
        "$REPEATS repeat(s) in this run$([ "$DISTURBED" -gt 0 ] && echo ", **$DISTURBED step(s) still disturbed after the last repeat**")"
}

report() {
    awk -F'\t' -v tools="$BENCH_TOOLS" -v rtts="$BENCH_RTTS" '
    function v(r, ds, t, s) { return ((r SUBSEP ds SUBSEP t SUBSEP s) in val) ? val[r, ds, t, s] : "" }
    function num(x) { return x != "" && x != "-" && x ~ /^[0-9.]+$/ }
    function fmt(x, f) { return num(x) ? sprintf(f, x) : "n/a" }
    function failed(r, ds, t, s) { return ((r SUBSEP ds SUBSEP t SUBSEP s) in rc) && rc[r, ds, t, s] != 0 }
    function ratio(b, o, speed) {
        if (!num(b) || !num(o) || b <= 0 || o <= 0) return "n/a"
        return sprintf("%.2f", speed ? b / o : o / b)
    }
    NR == 1 { next }
    { val[$1, $2, $3, $4] = $5; load[$1, $2, $3, $4] = $7; other[$1, $2, $3, $4] = $8
      tcpu[$1, $2, $3, $4] = $9; scpu[$1, $2, $3, $4] = $10; wall[$1, $2, $3, $4] = $11; rc[$1, $2, $3, $4] = $12
      reqs[$1, $2, $3, $4] = $13 }
    END {
        n = split(tools, T, " "); nr = split(rtts, R, " ")
        printf "| measurement | RTT added |"; for (i = 1; i <= n; i++) printf " %s |", T[i]
        printf " backtree ÷ restic |\n|---|---:|"; for (i = 1; i <= n; i++) printf "---:|"; print "---:|"
        rows = split("tree|ingest|MB/s|%.1f|1;image|ingest|MB/s|%.1f|1;image|read|MB/s|%.1f|1;image|answer|s|%.3f|0;image|rss|MiB|%.1f|0", W, ";")
        split("ingest of the tree;ingest of the image;cold sequential read of the image through the mount;mount answers (image repository);mount daemon peak RSS (image read)", L, ";")
        for (w = 1; w <= rows; w++) {
            split(W[w], f, "|")
            for (r = 1; r <= nr; r++) {
                printf "| %s, %s | %s ms |", L[w], f[3], R[r]
                for (i = 1; i <= n; i++) {
                    x = v(R[r], f[1], T[i], f[2]); if (f[3] == "MiB" && num(x)) x = x / 1024
                    printf " %s%s |", fmt(x, f[4]), failed(R[r], f[1], T[i], f[2]) ? " (FAILED)" : ""
                }
                b = v(R[r], f[1], "backtree", f[2]); o = v(R[r], f[1], "restic", f[2])
                if (f[3] == "MiB") { b = b / 1024; o = o / 1024 }
                printf " %s |\n", ratio(b, o, f[5])
            }
        }
        print ""
        print "MB/s: logical bytes (the files'"'"' apparent sizes, 10^6 bytes) over wall time. The ratio is" \
              " backtree ÷ restic for MB/s and restic ÷ backtree for times and memory: above 1, backtree is better."
        print ""
        print "| timed step | RTT added | tool | wall s | S3 GETs / PUTs | load | others CPU s | tool CPU s | Garage+proxy CPU s |"
        print "|---|---:|---|---:|---:|---:|---:|---:|---:|"
        split("tree|ingest;image|ingest;image|read", S, ";")
        for (s = 1; s <= 3; s++) { split(S[s], f, "|")
            for (r = 1; r <= nr; r++) for (i = 1; i <= n; i++) {
                k = R[r] SUBSEP f[1] SUBSEP T[i] SUBSEP f[2]
                if (!(k in val)) continue
                printf "| %s %s | %s ms | %s | %s | %s | %s | %s | %s | %s |\n", f[2], f[1], R[r], T[i], wall[k], reqs[k], load[k], other[k], tcpu[k], scpu[k]
            } }
        print ""
        print "(\"load\": 1-minute load average when the step started, which still counts this script'"'"'s own" \
              " previous steps; \"others\": CPU seconds used by everything but the client, the mount daemon," \
              " Garage and the proxy during the step, including kernel threads; \"tool\": client + mount daemon;" \
              " S3 requests as counted by Garage: GetObject / PutObject and multipart uploads.)"
        print ""
        vt = ""
        for (r = 1; r <= nr; r++) for (i = 1; i <= n; i++) { x = v(R[r], "image", T[i], "verify")
            vt = vt sprintf("%s%s at %s ms: %s", (vt == "" ? "" : "; "), T[i], R[r], x == "" ? "n/a" : x) }
        print "- Correctness (untimed `cmp` of the whole image through the same mount after the timed read): " vt "."
        print ""
        print "Target: cold sequential read through the mount at least 3× restic'"'"'s:"
        print ""
        for (r = 1; r <= nr; r++) {
            b = v(R[r], "image", "backtree", "read"); o = v(R[r], "image", "restic", "read")
            if (num(b) && num(o) && o > 0)
                printf "- %s ms RTT added: %.1f MB/s vs %.1f MB/s = %.2f×: **%s**\n", R[r], b, o, b / o, (b >= 3 * o) ? "met" : "not met"
            else printf "- %s ms RTT added: n/a\n", R[r]
        }
    }' "$RESULTS"
}

write_report() {
    local md=$BENCH_DIR/results.md
    results_md "### Run of $(date -u '+%Y-%m-%d')" >"$md"
    publish_results "$md" "<!-- bench-s3:begin -->" "<!-- bench-s3:end -->" "S3 benchmarks"
}

# ---------------------------------------------------------------------------------------------

main() {
    local start rtt
    start=$(now)
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    prerequisites
    prepare_workdir
    build_backtree
    bt_s3_args
    # restic's --compression exists from repository format 2 (restic 0.14) on.
    RESTIC_COMPRESSION=
    if restic backup --help 2>/dev/null | grep -q -- '--compression'; then RESTIC_COMPRESSION=auto; fi
    make_datasets
    for rtt in $BENCH_RTTS; do run_round "$rtt"; done
    RUN_SECONDS=$(elapsed "$start" "$(now)" | cut -d. -f1)
    write_report
    say "done in $RUN_SECONDS s; logs in $LOGS"
}

main "$@"
