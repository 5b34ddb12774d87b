#!/usr/bin/env bash
# Runs every test of the workspace, after installing what the tests need (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --all-targets "$@"
