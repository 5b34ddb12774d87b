#!/usr/bin/env bash
# The main job on a local repository, from scratch: build backtree, create a repository, ingest a
# sample tree (two generations, the second after a change), mount the repository and show the
# tree through the mount, then unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only what the demo needs (fuse3, for the mount); Garage is for the S3 tests alone.
scripts/setup.sh --demo
cargo build --release -p backtree
bt=target/release/backtree
work=${DEMO_DIR:-/tmp/backtree-demo}
rm -rf "$work"
mkdir -p "$work/sample"
# A small sample: configuration files, a copy of some binaries, a sparse image and a hardlink.
cp -a /etc/ssh /etc/apt "$work/sample/" 2>/dev/null || true
mkdir -p "$work/sample/bin" && cp -a /usr/bin/c* "$work/sample/bin/"
truncate -s 256M "$work/sample/disk.img"
dd if=/dev/urandom of="$work/sample/disk.img" bs=1M count=4 seek=100 conv=notrunc status=none
echo "hello from backtree" > "$work/sample/hello.txt"
ln "$work/sample/hello.txt" "$work/sample/hello-link.txt"

set -x
$bt init --repo "$work/repo"
$bt ingest --repo "$work/repo" --host demo --label first "$work/sample"
echo "a change" >> "$work/sample/hello.txt"
$bt ingest --repo "$work/repo" --host demo --label second "$work/sample"
$bt ls --repo "$work/repo"
$bt ls --repo "$work/repo" demo
$bt ls --repo "$work/repo" demo/latest
du -sh "$work/sample" "$work/repo"

mkdir -p "$work/mnt"
$bt mount --repo "$work/repo" "$work/mnt" &
mount_pid=$!
trap 'kill $mount_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.1; done
ls -l "$work/mnt" "$work/mnt/demo"
ls -la "$work/mnt/demo/latest/"
cat "$work/mnt/demo/latest/hello.txt"
diff -r --no-dereference "$work/sample/" "$work/mnt/demo/latest/" && echo "the mount matches the sample"
kill -TERM $mount_pid
wait $mount_pid
