#!/bin/bash
# The test suite: formatting, lints, unit and integration tests (real loop devices, mke2fs,
# sgdisk, mtools: run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --release -- --test-threads=2
