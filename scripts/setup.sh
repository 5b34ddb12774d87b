#!/usr/bin/env bash
# Installs what backtree's build and tests need on a fresh Debian machine. Idempotent: packages
# already present are not fetched again. Run as root (or with sudo available).
set -euo pipefail

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v setfacl >/dev/null 2>&1 || need+=(acl)
command -v getfattr >/dev/null 2>&1 || need+=(attr)
[ -e /usr/include/fuse3/fuse.h ] || need+=(libfuse3-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)

if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
# Garage, the S3 server the S3 tests run against: built once into a cache (slow the first time).
"$(dirname "$0")/garage.sh" install >/dev/null
echo "setup: ok"
