#!/bin/bash
# The test suite: formatting, lints, unit and integration tests (real loop devices, mke2fs,
# sgdisk, mtools: run as root), the fuzzers for 20 s per target, then the rescue system built and booted in QEMU, and the DR
# drill matrix (restored machines booted in QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
# tests/fuzz_corpus.rs replays the fuzz seeds and regressions through every parser of untrusted
# bytes, then fuzzes each for a bounded number of mutations. The coverage-guided fuzzers
# (scripts/fuzz.sh, docs/testing.md) need their own instrumented build, longer than CI can spare.
BMR_FUZZ_MUTATIONS=${BMR_FUZZ_MUTATIONS:-2000} cargo test --release -- --test-threads=2
iso-build/build.sh
# The boot paths the restore cases below do not take: pxelinux, GRUB netboot, the shell entry.
iso-build/smoke.sh pxelinux-bios grub-netboot-uefi cd-uefi
qemu-tests/rescue.sh
qemu-tests/run.sh
