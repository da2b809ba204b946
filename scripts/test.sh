#!/bin/bash
# The test suite: formatting, lints, unit and integration tests (real loop devices, mke2fs,
# sgdisk, mtools: run as root), the fuzzers for 20 s per target, then the rescue system built and booted in QEMU, and the DR
# drill matrix (restored machines booted in QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --release -- --test-threads=2
# Every parser of untrusted bytes, fuzzed for a bounded time (docs/testing.md).
scripts/fuzz.sh "${BMR_FUZZ_SECONDS:-20}"
iso-build/build.sh
# The boot paths the restore cases below do not take: pxelinux, GRUB netboot, the shell entry.
iso-build/smoke.sh pxelinux-bios grub-netboot-uefi cd-uefi
qemu-tests/rescue.sh
qemu-tests/run.sh
