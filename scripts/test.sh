#!/usr/bin/env bash
# Runs every test of the workspace, after installing what the tests need (scripts/setup.sh).
# The S3 tests run against a local Garage, built here on first use (scripts/garage.sh install,
# kept in a cache), started in target/garage and stopped on exit; a BACKTREE_TEST_S3 already set
# (with its AWS_* variables) is used instead, and then Garage is not built.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${BACKTREE_TEST_S3:-}" ]; then
  GARAGE_DIR="$PWD/target/garage"
  scripts/garage.sh install >/dev/null
  # A node left running by an interrupted run is stopped first; a scratch node that will not
  # start is recreated once.
  scripts/garage.sh stop "$GARAGE_DIR" 2>/dev/null || true
  trap 'scripts/garage.sh stop "$GARAGE_DIR"' EXIT
  if ! scripts/garage.sh start "$GARAGE_DIR"; then
    echo "test: recreating $GARAGE_DIR" >&2
    scripts/garage.sh stop "$GARAGE_DIR" 2>/dev/null || true
    rm -rf "$GARAGE_DIR"
    scripts/garage.sh start "$GARAGE_DIR"
  fi
  # shellcheck disable=SC1091
  . "$GARAGE_DIR/env"
  export BACKTREE_TEST_S3
  # The outage tests stop and restart this node.
  export BACKTREE_TEST_GARAGE_DIR="$GARAGE_DIR"
fi
cargo test --workspace --all-targets "$@"
