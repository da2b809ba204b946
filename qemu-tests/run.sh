#!/bin/bash
# The DR drill matrix (qemu-tests/drill.sh), two drills at a time. Together they cover: GPT
# disks restored onto virtio, SATA and NVMe and booted under SeaBIOS and under OVMF with an
# empty NVRAM; MBR disks on all three buses under SeaBIOS; the rescue system delivered as CD,
# USB stick and PXE under both firmwares; one drill through the TUI over the serial console;
# one with --grow; one whose BIOS boot code is lost, restored with --reinstall-bootloader (a
# Debian root with GRUB's tools, from debootstrap); one whose image is taken inside a guest
# through an LVM snapshot of a mounted, busy logical volume; one with a btrfs root in subvolume
# @ (and /home in @home, Wednesday's incremental through --snapshot btrfs), grown with --grow
# (btrfs filesystem resize); and one of a real Debian install with its root on LVM (GPT,
# separate /boot, vg0/root and vg0/swap), whose incrementals are taken in the running guest by
# its own bmr, restored onto NVMe with the PV, the root LV and its ext4 grown, and booted under
# both firmwares; the same Debian laid out like RHEL's install (/boot and vg0/root XFS),
# restored onto virtio with the root's XFS grown by xfs_growfs (it replaced the busybox
# machine's XFS drill, drill.sh --rootfs xfs, which it covers); and the same Debian with its
# root on an md RAID1 of two disks, restored onto two NVMe disks (the second by
# bmr.mirror-disk), grown, and booted with both disks and from the first alone (degraded).
#
#   qemu-tests/run.sh              the whole matrix; ends with "N passed, N failed"
#   qemu-tests/run.sh NAME...      only these drills (names: see DRILLS)
# shellcheck source=qemu-tests/lib.sh
source "$(dirname "$0")/lib.sh"

# name: drill.sh options
declare -A DRILLS=(
    [gpt-virtio-cd]="--layout gpt --rescue-firmware bios --bus virtio --delivery cd"
    [gpt-nvme-usb-uefi-grow]="--layout gpt --rescue-firmware uefi --bus nvme --delivery usb --grow"
    [gpt-sata-pxe]="--layout gpt --rescue-firmware bios --bus sata --delivery pxe"
    [gpt-virtio-tui-uefi]="--layout gpt --rescue-firmware uefi --bus virtio --delivery cd --tui"
    [mbr-virtio-usb]="--layout mbr --rescue-firmware bios --bus virtio --delivery usb"
    [mbr-nvme-pxe]="--layout mbr --rescue-firmware bios --bus nvme --delivery pxe"
    [mbr-sata-cd]="--layout mbr --rescue-firmware bios --bus sata --delivery cd"
    [gpt-sata-cd-reinstall]="--layout gpt --rescue-firmware bios --bus sata --delivery cd --reinstall-bootloader"
    [gpt-sata-cd-uefi-lvm]="--layout gpt --rescue-firmware uefi --bus sata --delivery cd --lvm"
    # The source machine names /dev/sda3: its target is on virtio, so it boots only once bmr
    # has rewritten the names in fstab and grub.cfg (inside @ on btrfs).
    [gpt-btrfs-virtio-usb-uefi-grow]="--layout gpt --rootfs btrfs --rescue-firmware uefi --bus virtio --delivery usb --grow"
    # A Debian install laid out like Ubuntu Server's (qemu-tests/debian.sh): its fstab names
    # /boot/efi /dev/sda2, so the restored NVMe disk boots only once bmr rewrote it in the root LV.
    [gpt-lvm-debian-nvme-usb-uefi-grow]="--machine debian-lvm --layout gpt --rescue-firmware uefi --bus nvme --delivery usb --grow"
    # The same Debian laid out like RHEL's install, /boot and vg0/root XFS: restored onto
    # virtio, where /dev/sda2 is nothing until bmr rewrote it inside the root LV's XFS; the root
    # grown by xfs_growfs in its extended LV.
    [gpt-lvm-xfs-debian-virtio-cd-grow]="--machine debian-xfs --layout gpt --rescue-firmware bios --bus virtio --delivery cd --grow"
    # The same Debian with its root on an md RAID1 of two disks (Debian's initramfs assembles
    # it from mdadm.conf): imaged through one member, restored onto two bigger NVMe disks
    # (bmr.mirror-disk), grown, booted with both and from the first alone (degraded).
    [gpt-raid-debian-nvme-cd-grow]="--machine debian-raid --layout gpt --rescue-firmware bios --bus nvme --delivery cd --grow"
)
ORDER=(gpt-lvm-debian-nvme-usb-uefi-grow gpt-raid-debian-nvme-cd-grow gpt-lvm-xfs-debian-virtio-cd-grow gpt-sata-cd-reinstall gpt-sata-cd-uefi-lvm
       gpt-btrfs-virtio-usb-uefi-grow gpt-nvme-usb-uefi-grow gpt-virtio-tui-uefi gpt-virtio-cd gpt-sata-pxe mbr-virtio-usb mbr-nvme-pxe
       mbr-sata-cd)

running() {
    local n=0 p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done
    echo "$n"
}

main() {
    local want=("$@") name pids=()
    [ ${#want[@]} -gt 0 ] || want=("${ORDER[@]}")
    for name in "${want[@]}"; do
        [ -n "${DRILLS[$name]:-}" ] || { log "unknown drill $name (drills: ${ORDER[*]})"; exit 2; }
    done
    [ -f "$RESCUE/bmr-rescue.iso" ] || { log "no rescue build: run iso-build/build.sh first"; exit 2; }
    (cd "$ROOT" && cargo build --release -q)
    mkdir -p "$WORK"
    rm -f "$WORK"/drill-*.result
    for name in "${want[@]}"; do
        while [ "$(running "${pids[@]}")" -ge "${BMR_QEMU_JOBS:-2}" ]; do sleep 1; done
        (
            # shellcheck disable=SC2086 # the options are words
            if "$ROOT/qemu-tests/drill.sh" --name "drill-$name" ${DRILLS[$name]} \
                >"$WORK/drill-$name.report" 2>"$WORK/drill-$name.err"; then
                echo "PASS $name" | tee "$WORK/drill-$name.result"
            else
                echo "FAIL $name" | tee "$WORK/drill-$name.result"
            fi
            cat "$WORK/drill-$name.report"
        ) &
        pids+=($!)
    done
    wait "${pids[@]}"
    local pass fail
    pass=$(cat "$WORK"/drill-*.result | grep -c '^PASS' || true)
    fail=$(cat "$WORK"/drill-*.result | grep -c '^FAIL' || true)
    echo "$pass passed, $fail failed"
    [ "$fail" = 0 ]
}

main "$@"
