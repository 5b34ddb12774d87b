#!/usr/bin/env bash
# Installs what backtree needs on a fresh Debian machine. Idempotent: packages already present
# are not fetched again. Run as root (or with sudo available).
#
#   scripts/setup.sh          what the build and the tests need (scripts/test.sh, .ci/run); the
#                             S3 tests' Garage is built by scripts/test.sh itself, when it needs it
#   scripts/setup.sh --demo   only what scripts/demo.sh needs to build and mount: fuse3
set -euo pipefail

demo=0
case "${1:-}" in
  "") ;;
  --demo) demo=1 ;;
  *) echo "usage: scripts/setup.sh [--demo]" >&2; exit 2 ;;
esac

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
if [ "$demo" = 0 ]; then
  command -v rsync >/dev/null 2>&1 || need+=(rsync)
  command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
  command -v setfacl >/dev/null 2>&1 || need+=(acl)
  command -v pigz >/dev/null 2>&1 || need+=(pigz)
  command -v getfattr >/dev/null 2>&1 || need+=(attr)
  # bsdtar: the --tar tests check archives written by libarchive too.
  command -v bsdtar >/dev/null 2>&1 || need+=(libarchive-tools)
  # xz: `tar -J` in the --tar tests (backtree itself decodes xz with liblzma built from source).
  command -v xz >/dev/null 2>&1 || need+=(xz-utils)
  # restic: `forget` is checked against restic's forget on the same generation times.
  command -v restic >/dev/null 2>&1 || need+=(restic)
  [ -e /usr/include/fuse3/fuse.h ] || need+=(libfuse3-dev)
  command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
fi

if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
echo "setup: ok"
