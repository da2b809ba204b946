#!/bin/bash
# A DR drill on a built-in example, end to end: build the rescue ISO; make a small bootable
# machine (GPT: BIOS boot partition, ESP with GRUB, ext4 root whose fstab names /dev/sda3); take
# its image backup on "Monday" and an incremental after Tuesday's, Wednesday's and Thursday's
# changes; boot the rescue ISO in QEMU from a USB stick under OVMF with a bigger, blank NVMe disk
# and restore Thursday unattended over HTTP (with --grow); then boot the restored disk under
# SeaBIOS, under OVMF with an empty NVRAM, and by its new NVRAM boot entry, and check it came
# up with exactly Thursday's files. Prints a short report (docs/drills.md explains it).
#
#   scripts/demo.sh [drill.sh options]     e.g. --layout mbr --rescue-firmware bios --bus sata
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release --quiet
iso-build/build.sh
if [ $# -eq 0 ]; then
    set -- --layout gpt --rescue-firmware uefi --bus nvme --delivery usb --grow
fi
exec qemu-tests/drill.sh --name demo "$@"
