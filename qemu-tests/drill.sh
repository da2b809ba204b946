#!/bin/bash
# One DR drill, end to end: build the small bootable source machine (qemu-tests/machine.sh),
# take an image backup on Monday and an incremental after each of Tuesday's, Wednesday's and
# Thursday's changes, boot the rescue system in QEMU and restore Thursday unattended over HTTP
# onto a blank, bigger disk on another bus, then boot the restored disk (SeaBIOS, and OVMF with
# an empty NVRAM for GPT) and check from its serial console that it came up with exactly
# Thursday's files. Prints a short report; exit status 0 when the drill passed.
#
#   qemu-tests/drill.sh [--layout gpt|mbr] [--rootfs ext4|xfs|btrfs] [--rescue-firmware bios|uefi]
#                       [--bus virtio|sata|nvme] [--delivery cd|usb|pxe] [--grow] [--tui]
#                       [--reinstall-bootloader] [--lvm]
#                       [--machine busybox|debian-lvm|debian-xfs|debian-raid]
#                       [--name NAME]
#
# --rootfs xfs|btrfs gives the machine an XFS root, or a btrfs root in subvolume @ with /home in
# subvolume @home (machine.sh). Each day's incremental names both mount points of the btrfs,
# Wednesday's through --snapshot btrfs (read-only snapshots, removed after); the days change
# /home too. The restored root is checked with xfs_repair -n or btrfs check, and with --grow the
# filesystem itself must fill the grown partition (xfs_growfs, btrfs filesystem resize).
#
# --reinstall-bootloader drills a machine whose BIOS boot code is gone: a Debian root with GRUB's
# tools, restored with bmr.bootloader=reinstall, must boot by the GRUB its own grub-install wrote.
#
# --lvm (GPT) gives the machine a fourth partition holding an LVM volume group, and takes
# Monday's image inside a guest (the host kernel has no device-mapper): the rescue system
# makes an ext4 logical volume, keeps it mounted and written to, and runs
# `bmr backup --snapshot lvm`. After the restore it activates the restored volume group and
# checks the LV's files are exactly those of the snapshot's moment (qemu-tests/lvm-*.guest).
#
# --machine debian-lvm (GPT, ext4) drills a real distribution's LVM install instead of the busybox
# machine: qemu-tests/debian.sh's Debian bookworm (BIOS boot, ESP, /boot, a PV with vg0/root and
# vg0/swap; Debian's initramfs activates the root LV, systemd mounts fstab, whose /boot/efi is
# /dev/sda2). Monday's image is taken offline on the host; Tuesday's to Thursday's incrementals
# in the running guest (booted on SATA, the one bus its fstab suits), by its own bmr onto a
# repository disk, from /etc/bmr-drill-step. The restored volume group is checked in the rescue
# system (qemu-tests/debian-lvm-check.guest), and the restored disk must boot with Thursday's
# files, its fstab rewritten and both LVs up.
#
# --machine debian-xfs: the same Debian laid out like RHEL's install, /boot and vg0/root XFS
# (qemu-tests/debian.sh make_debian_xfs_machine). The same week and checks, with xfs_repair -n
# of the restored root LV (and of /boot) and, with --grow, the root's XFS grown by xfs_growfs
# to fill its extended LV.
#
# --machine debian-raid: the same Debian with its root on an md RAID1 over partition 4 of two
# disks (qemu-tests/debian.sh make_debian_raid_machine; the array made by mdadm in the rescue
# system). Monday's image is of the first disk; the days boot with both; the restore goes onto
# two NVMe disks (bmr.target, bmr.mirror-disk), the mirror is checked in the rescue system
# (qemu-tests/debian-raid-check.guest), and the restored disks boot with both disks and from
# the first alone, the array then degraded.
#
# Needs the rescue build (iso-build/build.sh) and a release bmr (cargo build --release).
# shellcheck source=qemu-tests/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=qemu-tests/machine.sh
source "$(dirname "$0")/machine.sh"

LAYOUT=gpt ROOTFS=ext4 FW=bios BUS=virtio DELIVERY=cd GROW='' TUI='' NAME='' REINSTALL='' LVM='' MACHINE=busybox
while [ $# -gt 0 ]; do
    case $1 in
    --layout) LAYOUT=$2; shift ;;
    --rootfs) ROOTFS=$2; shift ;;
    --rescue-firmware) FW=$2; shift ;;
    --bus) BUS=$2; shift ;;
    --delivery) DELIVERY=$2; shift ;;
    --grow) GROW=1 ;;
    --tui) TUI=1 ;;
    --reinstall-bootloader) REINSTALL=1 ;;
    --lvm) LVM=1 ;;
    --machine) MACHINE=$2; shift ;;
    --name) NAME=$2; shift ;;
    *) log "drill.sh: unknown option $1 (see the comment at the top)"; exit 2 ;;
    esac
    shift
done
case $LAYOUT/$FW in
gpt/bios | gpt/uefi | mbr/bios) ;;
mbr/uefi) log "drill.sh: an MBR disk boots by BIOS only: use --rescue-firmware bios"; exit 2 ;;
*) log "drill.sh: bad --layout or --rescue-firmware"; exit 2 ;;
esac
if [ -n "$LVM" ] && { [ "$LAYOUT" != gpt ] || [ -n "$TUI$GROW$REINSTALL" ]; }; then
    log "drill.sh: --lvm drills a GPT disk, without --tui, --grow or --reinstall-bootloader"
    exit 2
fi
case $MACHINE in
busybox) ;;
debian-lvm | debian-xfs | debian-raid)
    if [ "$LAYOUT/$ROOTFS" != gpt/ext4 ] || [ -n "$TUI$REINSTALL$LVM" ]; then
        log "drill.sh: --machine $MACHINE is a GPT disk with its own root filesystem: not with --layout mbr, --rootfs, --tui, --reinstall-bootloader or --lvm"
        exit 2
    fi
    # shellcheck source=qemu-tests/debian.sh
    source "$(dirname "$0")/debian.sh"
    ;;
*) log "drill.sh: --machine busybox, debian-lvm, debian-xfs or debian-raid, not $MACHINE"; exit 2 ;;
esac
case $ROOTFS in
ext4) ;;
xfs | btrfs)
    # The LVM drill's guest scripts and the Debian root's grub-install know an ext4 root only.
    if [ -n "$LVM$REINSTALL" ]; then
        log "drill.sh: --rootfs $ROOTFS drills the busybox machine: not with --lvm or --reinstall-bootloader"
        exit 2
    fi
    ;;
*) log "drill.sh: --rootfs ext4, xfs or btrfs, not $ROOTFS"; exit 2 ;;
esac
# The ext4 drills keep their names and hosts; the others carry their root's type.
FS_TAG=${ROOTFS#ext4}
# The Debian machine's drill carries it in its name and host.
[ "$MACHINE" = busybox ] || FS_TAG=${MACHINE#debian-}-debian
NAME=${NAME:-drill-$LAYOUT${FS_TAG:+-$FS_TAG}-$FW-$BUS-$DELIVERY${GROW:+-grow}${TUI:+-tui}${REINSTALL:+-reinstall}${LVM:+-lvm}}
D=$WORK/$NAME
HOST=drill-$LAYOUT${FS_TAG:+-$FS_TAG}${LVM:+-lvm}
[ "$MACHINE" = busybox ] || HOST=drill-$MACHINE
STEPS=()
step() { STEPS+=("$*"); log "[$NAME] $*"; }
fail() {
    step "FAILED: $*"
    report
    exit 1
}
report() {
    if [ "$MACHINE" = debian-raid ]; then
        echo "== drill $NAME: Debian bookworm on md RAID1 (two GPT disks: BIOS boot, ESP, /boot, and an md member each; the root ext4 on /dev/md/root), incrementals taken in the running guest, rescue by $FW from $DELIVERY, restored onto two disks on $BUS${GROW:+, grown}, then booted with both disks and from the first alone (degraded)"
        printf '   %s\n' "${STEPS[@]}"
        return
    fi
    if [ "$MACHINE" = debian-xfs ]; then
        echo "== drill $NAME: Debian bookworm on LVM with XFS, laid out like RHEL ($LAYOUT disk: BIOS boot, ESP, /boot XFS, PV with vg0/root XFS and vg0/swap), incrementals taken in the running guest, rescue by $FW from $DELIVERY, target on $BUS${GROW:+, grown}"
        printf '   %s\n' "${STEPS[@]}"
        return
    fi
    if [ "$MACHINE" = debian-lvm ]; then
        echo "== drill $NAME: Debian bookworm on LVM ($LAYOUT disk: BIOS boot, ESP, /boot, PV with vg0/root ext4 and vg0/swap), incrementals taken in the running guest, rescue by $FW from $DELIVERY, target on $BUS${GROW:+, grown}"
        printf '   %s\n' "${STEPS[@]}"
        return
    fi
    echo "== drill $NAME: $LAYOUT disk, $ROOTFS root${HOME_MNT:+ (subvolumes @ and @home)}, rescue by $FW from $DELIVERY, target on $BUS${GROW:+, grown}${TUI:+, through the TUI}${REINSTALL:+, boot code lost and reinstalled}${LVM:+, LVM volume imaged through a snapshot}"
    printf '   %s\n' "${STEPS[@]}"
}

# The root partition of the source disk, mounted read-write on the host for a day's changes:
# ext4 and xfs as a loop mount at the partition's offset; btrfs as the machine mounts it,
# subvolume @ at ROOT_MNT and @home at ROOT_MNT/home, both through one loop device (two would
# show the kernel the same filesystem UUID twice).
ROOT_MNT=
LOOPDEV=
# The btrfs machine's /home: a mount point of its own, which each incremental names too.
HOME_MNT=
[ "$ROOTFS" != btrfs ] || HOME_MNT=home
# shellcheck disable=SC2153 # ROOT_OFFSET, ROOT_SIZE, ROOT_PART come from machine.sh's info file
mount_root() {
    # shellcheck source=/dev/null
    . "$D/src/info"
    ROOT_MNT=$D/root-mnt
    mkdir -p "$ROOT_MNT"
    if [ "$ROOTFS" = btrfs ]; then
        LOOPDEV=$(losetup -f --show -o "$ROOT_OFFSET" --sizelimit "$ROOT_SIZE" "$D/src/disk.img")
        mount -t btrfs -o subvol=@ "$LOOPDEV" "$ROOT_MNT"
        mount -t btrfs -o "subvol=$HOME_SUBVOL" "$LOOPDEV" "$ROOT_MNT/$HOME_MNT"
    else
        mount -t "$ROOTFS" -o "loop,offset=$ROOT_OFFSET,sizelimit=$ROOT_SIZE" "$D/src/disk.img" "$ROOT_MNT"
    fi
}
umount_root() {
    [ -z "$HOME_MNT" ] || umount "$ROOT_MNT/$HOME_MNT"
    umount "$ROOT_MNT"
    if [ -n "$LOOPDEV" ]; then
        # Forget it, or the host's btrfs keeps a stale device of this UUID after the detach.
        btrfs device scan --forget "$LOOPDEV" 2>/dev/null || true
        losetup -d "$LOOPDEV"
        LOOPDEV=
    fi
}
# The day's incremental names every mount point of the root filesystem.
incremental_dirs() { echo "$ROOT_MNT"; [ -z "$HOME_MNT" ] || echo "$ROOT_MNT/$HOME_MNT"; }

# The TSM scenario's days (docs/incrementals.md): Thursday leaves file3 (Wednesday's content) and
# file4; file1 and file2 are gone. With a /home subvolume: a file added on Tuesday and changed on
# Wednesday, and the machine's profile deleted on Thursday.
day() {
    local d=$ROOT_MNT/data
    if [ -n "$HOME_MNT" ]; then
        local h=$ROOT_MNT/$HOME_MNT/drill
        case $1 in
        tuesday) echo "notes, Tuesday" >"$h/notes" ;;
        wednesday) echo "notes, changed on Wednesday" >"$h/notes" ;;
        thursday) rm "$h/profile" ;;
        esac
    fi
    case $1 in
    monday)
        rm -rf "${d:?}"/* && mkdir -p "$d"
        echo "file 1, Monday" >"$d/file1"
        echo "file 2, Monday" >"$d/file2"
        echo "file 3, Monday" >"$d/file3"
        ;;
    tuesday) echo "file 4, Tuesday" >"$d/file4" ;;
    wednesday) rm "$d/file2" && echo "file 3, changed on Wednesday" >"$d/file3" ;;
    thursday) rm "$d/file1" ;;
    esac
}

backup_week() {
    local repo=$D/repo
    rm -rf "$repo"
    mount_root
    day monday
    cp -a "$ROOT_MNT/data" "$D/monday-data"
    umount_root
    if [ -n "$LVM" ]; then
        image_backup_in_guest "$repo"
    else
        "$BMR" backup --repo "$repo" --host "$HOST" "$D/src/disk.img" >"$D/backup.log" 2>&1 ||
            fail "image backup (log: $D/backup.log)"
        step "Monday: image backup of the $LAYOUT disk"
    fi
    local today snap dirs
    for today in tuesday wednesday thursday; do
        mount_root
        day "$today"
        mapfile -t dirs < <(incremental_dirs)
        # Wednesday's btrfs incremental reads read-only snapshots of the mounted subvolumes.
        snap=
        [ "$ROOTFS/$today" != btrfs/wednesday ] || snap=btrfs
        "$BMR" backup --incremental ${snap:+--snapshot "$snap"} --repo "$repo" --host "$HOST" "${dirs[@]}" \
            >>"$D/backup.log" 2>&1 || { umount_root; fail "$today incremental (log: $D/backup.log)"; }
        if [ -n "$snap" ]; then
            # bmr removes its snapshots: only the machine's two subvolumes are left.
            local subvols
            subvols=$(btrfs subvolume list "$ROOT_MNT" | awk '{print $NF}' | LC_ALL=C sort | xargs)
            [ "$subvols" = "@ $HOME_SUBVOL" ] ||
                { umount_root; fail "$today: after --snapshot btrfs the subvolumes are '$subvols', not '@ $HOME_SUBVOL'"; }
        fi
        if [ "$today" = thursday ]; then
            rm -rf "$D/expected-tree" && mkdir -p "$D/expected-tree"
            cp -a "$ROOT_MNT/data" "$D/expected-tree/data"
            [ -z "$HOME_MNT" ] || cp -a "$ROOT_MNT/$HOME_MNT" "$D/expected-tree/$HOME_MNT"
        fi
        umount_root
        step "${today^}: changes made, incremental backup${HOME_MNT:+ of / and /$HOME_MNT}${snap:+ through --snapshot $snap (snapshots removed after)}"
    done
    THURSDAY=$("$BMR" list --repo "$repo" --host "$HOST" --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["snapshots"][-1]["id"])')
}

# A fourth partition for LVM: the guest makes the volume group (the host cannot).
add_lvm_partition() {
    local disk=$D/src/disk.img
    truncate -s +64M "$disk"
    sgdisk -e -n 4:0:0 -t 4:8e00 -c 4:lvm -u 4:1B1A1B1A-0000-4000-8000-000000000004 "$disk" >/dev/null
}

# Monday's image, taken in the rescue system (bmr.break shell) through an LVM snapshot onto a
# repository disk, which the host then reads.
image_backup_in_guest() {
    local repo=$1 rdisk=$D/repo-disk.img mnt=$D/repo-mnt
    rm -f "$rdisk" && truncate -s 256M "$rdisk"
    mke2fs -q -t ext4 -L repo "$rdisk"
    rm -f "$WORK/$NAME-backup.sock"
    python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/$NAME-backup.sock" "$WORK/$NAME-backup.log" \
        "$ROOT/qemu-tests/lvm-backup.guest" 2>"$D/backup-driver.err" &
    local driver=$!
    SERIAL=unix boot "$NAME-backup" bios cd "bmr.break" "virtio:$D/src/disk.img" "virtio:$rdisk"
    wait "$driver" || fail "image backup in the guest: $(tail -n 1 "$D/backup-driver.err") (log: $WORK/$NAME-backup.log)"
    tr -d '\r' <"$WORK/$NAME-backup.log" | grep -a -E '^[0-9a-f]{64}  ' | sort -k 2 >"$D/lv-expected.sums"
    [ -s "$D/lv-expected.sums" ] || fail "the guest printed no checksums (log: $WORK/$NAME-backup.log)"
    mkdir -p "$mnt"
    mount -o ro,loop "$rdisk" "$mnt"
    cp -a "$mnt/repo" "$repo"
    umount "$mnt"
    local consistency
    consistency=$(python3 -c 'import json,sys,glob; print(json.load(open(glob.glob(sys.argv[1] + "/hosts/*/snapshots/*.json")[0]))["consistency"])' "$repo")
    [ "$consistency" = snapshot ] || fail "the guest's image says consistency=$consistency, not snapshot"
    # The disk's names in the guest (sysfs, no udev there), for the device-name fix-up.
    local names
    names=$(python3 -c 'import json,sys,glob; print(" ".join(json.load(open(glob.glob(sys.argv[1] + "/hosts/*/snapshots/*.json")[0])).get("source_names", [])))' "$repo")
    [[ " $names " == *" /dev/vda "* && " $names " == *" /dev/disk/by-id/virtio-BMRDISK"* ]] ||
        fail "the guest's image records the source disk's names as '$names', not /dev/vda and its by-id name"
    step "Monday: image backup in a guest through an LVM snapshot, the LV mounted and written to ($(wc -l <"$D/lv-expected.sums") files; refused without --snapshot)"
}

restore_in_rescue() {
    # Bigger than the source disk by half, as a replacement disk usually is.
    local t=$D/target.img size
    size=$(( $(stat -c %s "$D/src/disk.img") * 3 / 2 ))
    rm -f "$t" && truncate -s "$size" "$t"
    local kargs="bmr.repo=$REPO_URL bmr.host=$HOST bmr.at=$THURSDAY bmr.target=auto bmr.verify"
    kargs+="${GROW:+ bmr.grow}${REINSTALL:+ bmr.bootloader=reinstall} bmr.report=http://10.0.2.2:$PORT/report"
    if [ -n "$LVM" ]; then
        rm -f "$WORK/$NAME-rescue.sock"
        python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/$NAME-rescue.sock" "$WORK/$NAME-rescue.log" \
            "$ROOT/qemu-tests/lvm-check.guest" --after-result 2>"$D/check-driver.err" &
        local driver=$!
        SERIAL=unix boot "$NAME-rescue" "$FW" "$DELIVERY" "$kargs bmr.after=shell" "$BUS:$t"
        local r
        r=$(result_of "$NAME-rescue")
        [[ $r == "BMR-RESULT: ok "* ]] || fail "rescue: ${r:-no result line} (log: $WORK/$NAME-rescue.log)"
        step "rescue ($FW, $DELIVERY): ${r#BMR-RESULT: }"
        wait "$driver" || fail "the restored volume group: $(tail -n 1 "$D/check-driver.err") (log: $WORK/$NAME-rescue.log)"
        tr -d '\r' <"$WORK/$NAME-rescue.log" | grep -a -E '^[0-9a-f]{64}  ' | sort -k 2 >"$D/lv-restored.sums"
        diff -u "$D/lv-expected.sums" "$D/lv-restored.sums" >"$D/lv.diff" ||
            fail "the restored LV's files differ from the snapshot's: $(head -c 600 "$D/lv.diff")"
        step "restored volume group activates in the rescue system: vg0/data e2fsck clean, no snapshot left, exactly the $(wc -l <"$D/lv-expected.sums") files of the snapshot's moment"
    elif [ -n "$TUI" ]; then
        rm -f "$WORK/$NAME-rescue.sock"
        python3 "$ROOT/qemu-tests/serial_tui.py" "$WORK/$NAME-rescue.sock" "$REPO_URL" \
            "$WORK/$NAME-rescue.log" --host "$HOST" --target "$BUS_NAME" ${GROW:+--grow} &
        local driver=$!
        SERIAL=unix boot "$NAME-rescue" "$FW" "$DELIVERY" "" "$BUS:$t"
        wait "$driver" || fail "the TUI driver (log: $WORK/$NAME-rescue.log)"
        step "rescue ($FW, $DELIVERY): restored Thursday through the TUI over the serial console"
    else
        boot "$NAME-rescue" "$FW" "$DELIVERY" "$kargs" "$BUS:$t"
        local r
        r=$(result_of "$NAME-rescue")
        [[ $r == "BMR-RESULT: ok "* ]] || fail "rescue: ${r:-no result line} (log: $WORK/$NAME-rescue.log)"
        step "rescue ($FW, $DELIVERY): ${r#BMR-RESULT: }"
    fi
    local line
    while IFS= read -r line; do
        STEPS+=("  $line")
    done < <(tr -d '\r' <"$WORK/$NAME-rescue.log" | grep -a -E '^(applied incremental|fix-up [^ ])' || true)
}

# Boot the restored disk (or DISK) and compare what it reports with Thursday's files.
boot_restored() {
    local fw=$1 what=${2:-} disk=${3:-$D/target.img} log
    boot_disk "$NAME-$fw" "$fw" "$BUS:$disk"
    log=$WORK/$NAME-$fw.log
    expected_report "$D/expected-tree" >"$D/expected.txt"
    machine_report "$log" >"$D/got-$fw.txt"
    if diff -u "$D/expected.txt" "$D/got-$fw.txt" >"$D/diff-$fw.txt"; then
        step "restored disk booted under $fw${what:+ $what} on $BUS: up, fstab ok, exactly Thursday's $(grep -c '^BMR-FILE' "$D/expected.txt") files"
    else
        fail "restored disk under $fw: $(head -c 600 "$D/diff-$fw.txt") (serial log: $log)"
    fi
}

# The size in bytes of the XFS or btrfs on DEV, as its superblock says.
fs_bytes() {
    case $ROOTFS in
    xfs) xfs_db -r -c 'sb 0' -c 'p dblocks' -c 'p blocksize' "$1" |
        awk '$1 == "dblocks" {n = $3} $1 == "blocksize" {b = $3} END {print n * b}' ;;
    btrfs) btrfs inspect-internal dump-super "$1" | awk '$1 == "total_bytes" {print $2}' ;;
    esac
}

# The btrfs subvolumes of the restored root, on a read-only host mount of its top level: the
# machine's two, none of the snapshots --snapshot btrfs took.
restored_subvols() {
    local mnt=$D/target-mnt rc=0
    mkdir -p "$mnt"
    mount -t btrfs -o ro,subvolid=5 "$1" "$mnt" || return 1
    btrfs subvolume list "$mnt" | awk '{print $NF}' | LC_ALL=C sort | xargs || rc=1
    umount "$mnt" || rc=1
    return $rc
}

# The restored root filesystem on the host: clean (e2fsck -fn, xfs_repair -n, btrfs check), and
# with --grow filling the disk (xfs, btrfs: the filesystem too, not only its partition).
# shellcheck disable=SC2153 # ROOT_PART comes from machine.sh's info file
check_root_fs() {
    # shellcheck source=/dev/null
    . "$D/src/info"
    local start size total loopdev fsck
    read -r start size < <(sfdisk -J "$D/target.img" | python3 -c "import json,sys; p=json.load(sys.stdin)['partitiontable']['partitions'][$ROOT_PART - 1]; print(p['start'], p['size'])")
    loopdev=$(losetup -f --show -r -o $((start * 512)) --sizelimit $((size * 512)) "$D/target.img")
    local ok=1 fsbytes='' subvols=''
    case $ROOTFS in
    ext4) fsck=e2fsck; e2fsck -fn "$loopdev" >"$D/fsck.log" 2>&1 || ok= ;;
    xfs) fsck="xfs_repair -n"; xfs_repair -n "$loopdev" >"$D/fsck.log" 2>&1 || ok= ;;
    btrfs) fsck="btrfs check"; btrfs check --readonly "$loopdev" >"$D/fsck.log" 2>&1 || ok= ;;
    esac
    [ "$ROOTFS" = ext4 ] || fsbytes=$(fs_bytes "$loopdev")
    if [ "$ROOTFS" = btrfs ] && [ -n "$ok" ]; then
        # The mount is read-only, its loop device writable: btrfs refuses a read-only device
        # whenever it has a log tree to replay.
        losetup -d "$loopdev"
        loopdev=$(losetup -f --show -o $((start * 512)) --sizelimit $((size * 512)) "$D/target.img")
        subvols=$(restored_subvols "$loopdev") || subvols="(cannot mount it)"
        btrfs device scan --forget "$loopdev" 2>/dev/null || true
    fi
    losetup -d "$loopdev"
    [ -n "$ok" ] || fail "$fsck of the restored root found problems (log: $D/fsck.log)"
    if [ "$ROOTFS" = btrfs ]; then
        [ "$subvols" = "@ $HOME_SUBVOL" ] ||
            fail "the restored btrfs has the subvolumes '$subvols', not '@ $HOME_SUBVOL'"
        fsck+=" clean, subvolumes @ and $HOME_SUBVOL only"
    else
        fsck+=" clean"
    fi
    if [ -n "$GROW" ]; then
        total=$(( $(stat -c %s "$D/target.img") / 512 ))
        # GPT keeps 33 sectors for its backup at the end; MBR needs nothing; a grown partition
        # ends on a whole 4 KiB (up to 7 sectors more).
        [ $((start + size)) -ge $((total - 40)) ] ||
            fail "--grow: the root partition ends at sector $((start + size)) of $total"
        local fs=''
        if [ -n "$fsbytes" ]; then
            # xfs_growfs may leave off a last allocation group too small to be one: 1% slack.
            [ "$fsbytes" -ge $((size * 512 * 99 / 100)) ] ||
                fail "--grow: the $ROOTFS is $(numfmt --to=iec-i --suffix=B "$fsbytes") in a partition of $(numfmt --to=iec-i --suffix=B $((size * 512)))"
            fs=", the $ROOTFS $(numfmt --to=iec-i --suffix=B "$fsbytes")"
        fi
        step "restored root: $fsck, grown to $(numfmt --to=iec-i --suffix=B $((size * 512))) (the disk's end)$fs"
    else
        step "restored root: $fsck"
    fi
}

# ---- --machine debian-lvm: qemu-tests/debian.sh's Debian bookworm with its root on LVM ----

# The /data changes of a day as shell commands on $DATA: day()'s TSM scenario, run by the host
# on Monday and for the expected trees, and by the guest's /etc/bmr-drill-step on the other days.
# shellcheck disable=SC2016 # expanded where they run
day_sh() {
    case $1 in
    monday) echo 'rm -rf "${DATA:?}"/* && echo "file 1, Monday" >"$DATA/file1" && echo "file 2, Monday" >"$DATA/file2" && echo "file 3, Monday" >"$DATA/file3"' ;;
    tuesday) echo 'echo "file 4, Tuesday" >"$DATA/file4"' ;;
    wednesday) echo 'rm "$DATA/file2" && echo "file 3, changed on Wednesday" >"$DATA/file3"' ;;
    thursday) echo 'rm "$DATA/file1"' ;;
    esac
}

REPO_LABEL=bmrrepo
# The guest's /etc/bmr-drill-step for a day: the day's changes, then `bmr backup --incremental /`
# onto the repository disk (found by its label), which it unmounts; exits with bmr's status. It
# makes itself non-executable first, so the incremental, and the system restored from it, keep
# it disarmed (the restored machine must boot without a repository disk).
debian_step() {
    cat <<STEP
#!/bin/sh
# drill $NAME, ${1^}: written by qemu-tests/drill.sh.
chmod -x /etc/bmr-drill-step
DATA=/data
$(day_sh "$1") || exit 90
i=0
until dev=\$(blkid -L $REPO_LABEL); do
    i=\$((i + 1))
    [ \$i -le 60 ] || { echo "drill step: no disk labelled $REPO_LABEL"; exit 91; }
    sleep 1
done
mkdir -p /mnt/repo && mount "\$dev" /mnt/repo || exit 92
bmr backup --incremental --repo /mnt/repo/R --host $HOST /
rc=\$?
umount /mnt/repo || rc=93
exit \$rc
STEP
}

# The root LV of the source disk, mounted on the host (a loop device at its offset).
debian_mount_root() {
    ROOT_MNT=$D/root-mnt
    mkdir -p "$ROOT_MNT"
    mount -t "$(debian_info "$D/src" ROOT_FS)" -o "loop,offset=$(debian_info "$D/src" ROOT_LV_OFFSET),sizelimit=$(debian_info "$D/src" ROOT_LV_SIZE)" \
        "$D/src/disk.img" "$ROOT_MNT"
}

mib() { echo "$(( ($1 + 524288) >> 20 )) MiB"; }

# Monday: the machine gets bmr and Monday's files, and is imaged offline on the host. The
# manifest must map the PV: a file list of vg0/root (the system), vg0/swap as a header, and no
# byte of free extents or free ext4 blocks.
debian_monday() {
    local t0=$SECONDS src=$D/src
    # The guest runs the host's release bmr: it must load with the guest's own libraries.
    debian_put "$src" "$BMR" /usr/local/bin/bmr 0755 || fail "copying bmr into the guest"
    cp "$BMR" "$src/tree/usr/local/bin/bmr"
    local v
    v=$(chroot "$src/tree" /usr/local/bin/bmr --version 2>&1) ||
        fail "the release bmr does not run with the Debian guest's libraries: $v ($(ldd "$BMR" | xargs))"
    debian_mount_root || fail "mounting the root LV on the host"
    DATA=$ROOT_MNT/data sh -c "$(day_sh monday)" || { umount "$ROOT_MNT"; fail "Monday's changes"; }
    umount "$ROOT_MNT"
    debian_sync_mirror "$src"
    # The expected trees, day by day, by the same commands.
    rm -rf "$D/week" && mkdir -p "$D/week/data"
    local today
    for today in monday tuesday wednesday thursday; do
        DATA=$D/week/data sh -c "$(day_sh "$today")"
        rm -rf "$D/expected-$today" && cp -a "$D/week" "$D/expected-$today"
    done
    local repo=$D/repo-top/R
    rm -rf "$D/repo-top" && mkdir -p "$D/repo-top"
    "$BMR" backup --repo "$repo" --host "$HOST" "$src/disk.img" >"$D/backup.log" 2>&1 ||
        fail "Monday's image backup (log: $D/backup.log)"
    if [ "$MACHINE" = debian-raid ]; then
        raid_monday_check "$repo" "$src" "$t0"
        return
    fi
    local root_used pv fs
    fs=$(debian_info "$src" ROOT_FS)
    root_used=$(fs_used "$src/disk.img" "$(debian_info "$src" ROOT_LV_OFFSET)" "$(debian_info "$src" ROOT_LV_SIZE)" "$fs")
    pv=$(python3 - "$repo" "$(debian_info "$src" PART4_START)" "$(debian_info "$src" SWAP_UUID)" "$fs" <<'PY'
import glob, json, sys
repo, pv_start, swap_uuid, fs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
m = json.load(open(glob.glob(repo + "/hosts/*/snapshots/*.json")[0]))
def bad(why):
    print(why)
    sys.exit(1)
area = [i for i, a in enumerate(m["areas"]) if a["start"] == pv_start]
if not area:
    bad("no area at the PV's offset")
a = m["areas"][area[0]]
vols = {v["name"]: v for v in a.get("volumes", [])}
if sorted(vols) != ["vg0/root", "vg0/swap"]:
    bad("the PV area's volumes are %s, not vg0/root and vg0/swap" % sorted(vols))
if vols["vg0/swap"]["fs"]["fstype"] != "swap" or vols["vg0/swap"]["fs"]["uuid"] != swap_uuid:
    bad("vg0/swap is %s" % vols["vg0/swap"]["fs"])
if vols["vg0/root"]["fs"]["fstype"] != fs:
    bad("vg0/root is %s" % vols["vg0/root"]["fs"])
tocs = [t for t in m.get("tocs", []) if t.get("volume") == "vg0/root"]
if len(tocs) != 1 or not tocs[0].get("system") or tocs[0]["area"] != area[0]:
    bad("the file lists of vg0/root: %s" % tocs)
print(a["len"], a["used_bytes"], vols["vg0/root"]["size"], vols["vg0/swap"]["size"], tocs[0]["entries"],
      m["stats"]["stored_bytes"])
PY
) || fail "Monday's manifest: $pv"
    local len used root_size swap_size entries stored pe_start
    read -r len used root_size swap_size entries stored <<<"$pv"
    pe_start=$(debian_info "$src" PE_START)
    # What the PV holds besides the root's used blocks: the label and metadata (pe_start) and
    # the swap's header page; a MiB of slack (XFS: its free-space btrees and free lists, which
    # its counters call free), but neither the 64 MiB swap nor the free space.
    [ "$used" -le $((root_used + pe_start + 1048576)) ] ||
        fail "Monday: the PV area stores $used bytes, more than the root LV's used $root_used + $pe_start of metadata"
    local names
    names=$("$BMR" ls --repo "$repo" --host "$HOST" --part vg0/root /data 2>/dev/null | grep -o 'file[0-9]' | sort | xargs) || true
    [ "$names" = "file1 file2 file3" ] || fail "Monday: bmr ls --part vg0/root /data lists '$names', not file1 file2 file3"
    MONDAY_REPO=$(du -sb "$repo" | cut -f1)
    step "Monday: image backup of disk.img on the host, offline, in $((SECONDS - t0)) s: vg0/root has a file list ($entries entries, the system's; bmr ls --part vg0/root /data: file1 file2 file3), vg0/swap stored as its header"
    step "  PV $(mib "$len") (root LV $(mib "$root_size"), swap LV $(mib "$swap_size"), free extents $(mib $((len - pe_start - root_size - swap_size)))): stored $(mib "$used") = the root's used $fs blocks $(mib "$root_used") + $((pe_start >> 10)) KiB PV label and metadata + $((used - root_used - pe_start)) bytes (the swap header$([ "$fs" != xfs ] || echo ", XFS's free-space btrees and free lists")); repository $(mib "$MONDAY_REPO") (zstd; $(mib "$stored") of chunks)"
}

# Monday's manifest of the raid machine: partition 4 an md RAID1 member of md/root with the
# array's UUID, its ext4 a file list (the system's), and no byte of free ext4 blocks stored.
raid_monday_check() {
    local repo=$1 src=$2 t0=$3 root_used out
    root_used=$(fs_used "$src/disk.img" "$(debian_info "$src" ROOT_LV_OFFSET)" "$(debian_info "$src" ROOT_LV_SIZE)")
    out=$(python3 - "$repo" "$(debian_info "$src" PART4_START)" "$(debian_info "$src" MD_UUID)" <<'PY'
import glob, json, sys
repo, start, uuid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = json.load(open(glob.glob(repo + "/hosts/*/snapshots/*.json")[0]))
def bad(why):
    print(why)
    sys.exit(1)
area = [i for i, a in enumerate(m["areas"]) if a["start"] == start]
if not area:
    bad("no area at partition 4's offset")
a = m["areas"][area[0]]
r = a.get("raid") or bad("partition 4 is not recorded as an md member: %s" % a.get("note"))
if (r["level"], r["uuid"], r["name"], r["raid_disks"], r["metadata"]) != ("raid1", uuid, "debian-raid:root", 2, "1.2"):
    bad("partition 4's md record: %s" % r)
vols = [v["name"] for v in a.get("volumes", [])]
if vols != ["md/root"] or a["volumes"][0]["fs"]["fstype"] != "ext4":
    bad("partition 4's volumes: %s" % a.get("volumes"))
tocs = [t for t in m.get("tocs", []) if t.get("volume") == "md/root"]
if len(tocs) != 1 or not tocs[0].get("system"):
    bad("the file lists of md/root: %s" % tocs)
print(a["len"], a["used_bytes"], r["data_offset"], r["size"], tocs[0]["entries"], m["stats"]["stored_bytes"])
PY
) || fail "Monday's manifest: $out"
    local len used data_offset size entries stored names
    read -r len used data_offset size entries stored <<<"$out"
    # Besides the root's used blocks: the superblock MiB and the member's tail md keeps.
    [ "$used" -le $((root_used + data_offset + len - data_offset - size + 1048576)) ] ||
        fail "Monday: the md member stores $used bytes, more than the root's used $root_used + the superblock and tail"
    names=$("$BMR" ls --repo "$repo" --host "$HOST" --part md/root /data 2>/dev/null | grep -o 'file[0-9]' | sort | xargs) || true
    [ "$names" = "file1 file2 file3" ] || fail "Monday: bmr ls --part md/root /data lists '$names', not file1 file2 file3"
    MONDAY_REPO=$(du -sb "$repo" | cut -f1)
    step "Monday: image backup of the first disk on the host, offline, in $((SECONDS - t0)) s: partition 4 an md raid1 member of md/root (UUID $(debian_info "$src" MD_UUID)), md/root a file list ($entries entries, the system's; bmr ls --part md/root /data: file1 file2 file3)"
    step "  member $(mib "$len") (array $(mib "$size") from offset $((data_offset >> 10)) KiB): stored $(mib "$used") = the root's used ext4 blocks $(mib "$root_used") + the superblock MiB and the member's tail; repository $(mib "$MONDAY_REPO") (zstd; $(mib "$stored") of chunks)"
}

# Tuesday to Thursday: the machine boots on SATA under SeaBIOS with the repository disk on
# virtio; its drill step makes the day's changes and takes the incremental; its report must be
# the day's files exactly.
debian_days() {
    local rdisk=$D/repo-disk.img today t0 log r
    # Room for the image and the week's incrementals.
    rm -f "$rdisk"
    mke2fs -q -t ext4 -L "$REPO_LABEL" -d "$D/repo-top" "$rdisk" 1G >/dev/null || fail "making the repository disk"
    for today in tuesday wednesday thursday; do
        t0=$SECONDS
        debian_step "$today" | debian_put "$D/src" - /etc/bmr-drill-step 0755 || fail "$today: writing the drill step"
        # shellcheck disable=SC2046 # the mirror's second disk, one word or none
        MACHINE_TIMEOUT=${BMR_DEBIAN_TIMEOUT:-1200} timed_boot "$NAME-$today" bios "sata:$D/src/disk.img" \
            $([ ! -f "$D/src/disk-b.img" ] || echo "sata:$D/src/disk-b.img") "virtio:$rdisk"
        log=$WORK/$NAME-$today.log
        r=$(machine_report "$log")
        grep -qx 'BMR-MACHINE: step exit 0' <<<"$r" ||
            fail "$today: the drill step: $(grep 'step exit\|emergency\|fstab failed' <<<"$r" | xargs) $(tr -d '\r' <"$log" | grep -a -i 'error' | tail -n 3 | xargs) (serial log: $log)"
        debian_expected_report "$D/src" 0 "$D/expected-$today" >"$D/expected-$today.txt"
        printf '%s\n' "$r" >"$D/got-$today.txt"
        diff -u "$D/expected-$today.txt" "$D/got-$today.txt" >"$D/diff-$today.txt" ||
            fail "$today: the machine's report: $(head -c 600 "$D/diff-$today.txt") (serial log: $log)"
        local summary
        summary=$(tr -d '\r' <"$log" | grep -a -E '^incremental [0-9]+T[0-9]+Z-[0-9a-f]+: ' | tail -n 1 || true)
        step "${today^}: booted on sata under bios (report after ${BOOT_SECONDS:-?} s), the drill step made the day's changes and bmr backup --incremental / in the guest: ${summary:-(no summary line)}; $((SECONDS - t0)) s; report: $(grep -c '^BMR-FILE' "$D/got-$today.txt") files, exactly the day's"
    done
    # Thursday's report after its step, less that line: what the restored machine must print.
    grep -vx 'BMR-MACHINE: step exit 0' "$D/got-thursday.txt" >"$D/expected.txt"
    local mnt=$D/repo-mnt
    rm -rf "$D/repo" && mkdir -p "$mnt"
    mount -o ro,loop "$rdisk" "$mnt" || fail "mounting the repository disk on the host"
    cp -a "$mnt/R" "$D/repo"
    umount "$mnt"
    local kinds
    kinds=$("$BMR" list --repo "$D/repo" --host "$HOST" --json |
        python3 -c 'import json,sys; print(" ".join(s["kind"] for s in json.load(sys.stdin)[0]["snapshots"]))')
    [ "$kinds" = "image incremental incremental incremental" ] ||
        fail "the repository holds '$kinds', not an image and three incrementals"
    THURSDAY=$("$BMR" list --repo "$D/repo" --host "$HOST" --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["snapshots"][-1]["id"])')
    step "  repository after Thursday: $(mib "$(du -sb "$D/repo" | cut -f1)") (Monday's image $(mib "$MONDAY_REPO"))"
}

# The restore: Thursday, unattended, from the rescue system onto a blank disk half as big again;
# then the restored volume group in the rescue system's shell (qemu-tests/debian-lvm-check.guest)
# and the restored /boot on the host.
debian_restore() {
    local t=$D/target.img size t0=$SECONDS
    size=$(( $(stat -c %s "$D/src/disk.img") * 3 / 2 ))
    rm -f "$t" && truncate -s "$size" "$t"
    local kargs="bmr.repo=$REPO_URL bmr.host=$HOST bmr.at=$THURSDAY bmr.target=auto bmr.verify"
    kargs+="${GROW:+ bmr.grow} bmr.report=http://10.0.2.2:$PORT/report bmr.after=shell"
    local root_size fs fsck
    root_size=$(debian_info "$D/src" ROOT_LV_SIZE) fs=$(debian_info "$D/src" ROOT_FS)
    case $fs in ext4) fsck="e2fsck -fn" ;; xfs) fsck="xfs_repair -n" ;; esac
    # Grown: the root LV must be bigger than it was; else the same size.
    local cmp=-eq
    [ -z "$GROW" ] || cmp=-gt
    # The lines tagged with the root's filesystem type stay (untagged), the other tagged go.
    sed -E -e "s/@ROOT_LV_SIZE@/$root_size/g" -e "s/@SIZE_TEST@/$cmp/g" \
        -e "s/@SWAP_LV_SIZE@/$(debian_info "$D/src" SWAP_LV_SIZE)/g" \
        -e "s/@SWAP_HEX@/$(debian_info "$D/src" SWAP_UUID | tr -d -)/g" \
        -e "s/^@$fs@ //" -e '/^@[a-z0-9]+@ /d' \
        "$ROOT/qemu-tests/debian-lvm-check.guest" >"$D/check.guest"
    rm -f "$WORK/$NAME-rescue.sock"
    python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/$NAME-rescue.sock" "$WORK/$NAME-rescue.log" \
        "$D/check.guest" --after-result 2>"$D/check-driver.err" &
    local driver=$!
    SERIAL=unix BOOT_TIMEOUT=${BMR_BOOT_TIMEOUT:-1800} boot "$NAME-rescue" "$FW" "$DELIVERY" "$kargs" "$BUS:$t"
    local r rlog=$WORK/$NAME-rescue.log
    r=$(result_of "$NAME-rescue")
    [[ $r == "BMR-RESULT: ok "* ]] || fail "rescue: ${r:-no result line} (log: $rlog)"
    step "rescue ($FW, $DELIVERY), $((SECONDS - t0)) s in all: ${r#BMR-RESULT: }"
    local line
    while IFS= read -r line; do
        STEPS+=("  $line")
    done < <(tr -d '\r' <"$rlog" | grep -a -E '^(applied incremental|fix-up [^ ])' || true)
    local esp
    esp=$(debian_info "$D/src" ESP_ID)
    local want=(
        "^applied incremental $THURSDAY to logical volume vg0/root: "
        '^fix-up device names: vg0/root /etc/fstab: /dev/sdaN -> UUID='
        "^ +-/dev/sda2 /boot/efi vfat "
        "^ +\\+UUID=${esp:0:4}-${esp:4} /boot/efi vfat "
        '^fix-up boot check: vg0/root /etc/fstab: every filesystem it mounts is on the restored disk$'
    )
    # resize2fs: "... is now N (4k) blocks long"; xfs_growfs: "data blocks changed from N to M".
    local grew='^fix-up grow: vg0/root: .*(resize2fs|is now|blocks long)'
    [ "$fs" != xfs ] || grew='^fix-up grow: vg0/root: xfs: data blocks changed from [0-9]+ to [0-9]+'
    [ -z "$GROW" ] || want+=(
        '^fix-up grow: partition 4 grown from '
        '^fix-up grow: physical volume on partition 4 resized: '
        '^fix-up grow: vg0/root extended to '
        "$grew"
    )
    local w
    for w in "${want[@]}"; do
        tr -d '\r' <"$rlog" | grep -a -q -E -- "$w" || fail "rescue: no line like '$w' in $rlog"
    done
    wait "$driver" || fail "the restored volume group: $(tail -n 1 "$D/check-driver.err") (log: $rlog)"
    local grown fs_size
    grown=$(tr -d '\r' <"$rlog" | sed -n -E 's/^BMR-ROOT-LV ([0-9]+)$/\1/p' | tail -n 1)
    fs_size=$(tr -d '\r' <"$rlog" | sed -n -E 's/^BMR-ROOT-FS ([0-9]+)$/\1/p' | tail -n 1)
    step "restored volume group in the rescue system: vgchange -ay vg0, LVs root and swap (swap $(mib "$(debian_info "$D/src" SWAP_LV_SIZE)") as recorded), root $(mib "$root_size") -> $(mib "${grown:-0}")${fs_size:+, its $fs $(mib "$fs_size")}, $fsck /dev/vg0/root clean, /dev/vg0/swap a swap header with its UUID $(debian_info "$D/src" SWAP_UUID), vgchange -an vg0"
    # /boot (partition 3, not grown) on the host: clean, still the filesystem fstab names.
    local bfs bstart bsize loopdev bok=1 buuid
    bfs=$(debian_info "$D/src" BOOT_FS) bfs=${bfs:-ext4}
    read -r bstart bsize < <(sfdisk -J "$t" | python3 -c "import json,sys; p=json.load(sys.stdin)['partitiontable']['partitions'][2]; print(p['start'] * 512, p['size'] * 512)")
    loopdev=$(losetup -f --show -r -o "$bstart" --sizelimit "$bsize" "$t") || fail "no loop device over the restored /boot"
    case $bfs in
    xfs) fsck="xfs_repair -n"; xfs_repair -n "$loopdev" >"$D/boot-fsck.log" 2>&1 || bok= ;;
    *) fsck="e2fsck -fn"; e2fsck -fn "$loopdev" >"$D/boot-fsck.log" 2>&1 || bok= ;;
    esac
    buuid=$(blkid -p -o value -s UUID "$loopdev" || true)
    losetup -d "$loopdev"
    [ -n "$bok" ] || fail "$fsck of the restored /boot found problems (log: $D/boot-fsck.log)"
    [ "$buuid" = "$(debian_info "$D/src" BOOT_UUID)" ] || fail "the restored /boot's UUID is '$buuid', not $(debian_info "$D/src" BOOT_UUID)"
    step "restored /boot on the host: $bfs, $fsck clean, UUID $buuid as fstab names it"
    if [ -n "$GROW" ]; then
        local end total
        end=$(sfdisk -J "$t" | python3 -c "import json,sys; p=json.load(sys.stdin)['partitiontable']['partitions'][3]; print(p['start'] + p['size'])")
        total=$(( $(stat -c %s "$t") / 512 ))
        # The backup GPT's 33 sectors, and up to 7 to end on a whole 4 KiB.
        [ "$end" -ge $((total - 40)) ] || fail "--grow: partition 4 ends at sector $end of $total"
        step "restored disk: partition 4 (the PV) ends at the disk's end ($(mib "$(stat -c %s "$t")") disk)"
    fi
}

# The raid machine's restore: Thursday, unattended, onto two blank disks half as big again
# (bmr.target and bmr.mirror-disk), then both restored members assembled in the rescue shell
# (qemu-tests/debian-raid-check.guest).
raid_restore() {
    local t=$D/target.img t2=$D/target-b.img size t0=$SECONDS
    size=$(( $(stat -c %s "$D/src/disk.img") * 3 / 2 ))
    rm -f "$t" "$t2" && truncate -s "$size" "$t" "$t2"
    local kargs="bmr.repo=$REPO_URL bmr.host=$HOST bmr.at=$THURSDAY bmr.target=/dev/nvme0n1"
    kargs+=" bmr.mirror-disk=/dev/nvme1n1 bmr.verify${GROW:+ bmr.grow}"
    kargs+=" bmr.report=http://10.0.2.2:$PORT/report bmr.after=shell"
    local md_size cmp=-eq
    md_size=$(debian_info "$D/src" ROOT_LV_SIZE)
    [ -z "$GROW" ] || cmp=-gt
    sed -e "s/@MD_SIZE@/$md_size/g" -e "s/@SIZE_TEST@/$cmp/g" -e "s/@MD_UUID@/$(debian_info "$D/src" MD_UUID)/g" \
        "$ROOT/qemu-tests/debian-raid-check.guest" >"$D/check.guest"
    rm -f "$WORK/$NAME-rescue.sock"
    python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/$NAME-rescue.sock" "$WORK/$NAME-rescue.log" \
        "$D/check.guest" --after-result 2>"$D/check-driver.err" &
    local driver=$!
    SERIAL=unix BOOT_TIMEOUT=${BMR_BOOT_TIMEOUT:-1800} boot "$NAME-rescue" "$FW" "$DELIVERY" "$kargs" "nvme:$t" "nvme:$t2"
    local r rlog=$WORK/$NAME-rescue.log
    r=$(result_of "$NAME-rescue")
    [[ $r == "BMR-RESULT: ok "* && $r == *"md/root mirrored onto /dev/nvme1n1"* ]] ||
        fail "rescue: ${r:-no result line} (log: $rlog)"
    step "rescue ($FW, $DELIVERY), $((SECONDS - t0)) s in all: ${r#BMR-RESULT: }"
    local line
    while IFS= read -r line; do
        STEPS+=("  $line")
    done < <(tr -d '\r' <"$rlog" | grep -a -E '^(applied incremental|fix-up [^ ]|mirror )' || true)
    local esp
    esp=$(debian_info "$D/src" ESP_ID)
    local want=(
        "^applied incremental $THURSDAY to md array md/root: "
        '^fix-up device names: md/root /etc/fstab: /dev/sdaN -> UUID='
        "^ +\\+UUID=${esp:0:4}-${esp:4} /boot/efi vfat "
        '^fix-up boot check: md/root /etc/fstab: every filesystem it mounts is on the restored disk$'
        '^mirror /dev/nvme1n1: partition 1 copied from the target \(BIOS boot partition\)'
        '^mirror /dev/nvme1n1: partition 2 copied from the target \(EFI system partition\)'
        '^mirror /dev/nvme1n1: partition 4 added to md/root'
    )
    [ -z "$GROW" ] || want+=(
        '^fix-up grow: partition 4 grown from '
        '^fix-up grow: md/root grown from '
        '^fix-up grow: md/root: .*(resize2fs|is now|blocks long)'
    )
    local w
    for w in "${want[@]}"; do
        tr -d '\r' <"$rlog" | grep -a -q -E -- "$w" || fail "rescue: no line like '$w' in $rlog"
    done
    wait "$driver" || fail "the restored mirror: $(tail -n 1 "$D/check-driver.err") (log: $rlog)"
    local grown
    grown=$(tr -d '\r' <"$rlog" | sed -n -E 's/^BMR-MD-SIZE ([0-9]+)$/\1/p' | tail -n 1)
    step "restored mirror in the rescue system: both partitions 4 assembled, UUID $(debian_info "$D/src" MD_UUID), 2 active devices and clean once md had copied the mirror, array $(mib "$md_size") -> $(mib "${grown:-0}"), e2fsck -fn clean"
}

# The restored mirror boots: with both disks its report must be Thursday's (as the source
# machine printed it after Thursday's step, that line aside); from the first disk alone, the
# same with the array degraded.
raid_boot_restored() {
    local fw=$1 what=$2 log=$WORK/$NAME-$1$3.log disks=("nvme:$D/target.img")
    [ "$3" = -alone ] || disks+=("nvme:$D/target-b.img")
    MACHINE_TIMEOUT=${BMR_DEBIAN_TIMEOUT:-1200} timed_boot "$NAME-$fw$3" "$fw" "${disks[@]}"
    machine_report "$log" >"$D/got-$fw$3.txt"
    local degraded=0
    [ "$3" != -alone ] || degraded=1
    DEBIAN_DEGRADED=$degraded debian_expected_report "$D/src" "" "$D/expected-thursday" >"$D/want-$fw$3.txt"
    diff -u "$D/want-$fw$3.txt" "$D/got-$fw$3.txt" >"$D/diff-$fw$3.txt" ||
        fail "restored mirror under $fw ($what): $(head -c 600 "$D/diff-$fw$3.txt") (serial log: $log)"
    step "restored mirror booted under $fw $what (report after ${BOOT_SECONDS:-?} s): up, fstab ok (/boot/efi's /dev/sda2 rewritten), root /dev/md127, md127 raid1 of 2 disks, $degraded missing, exactly Thursday's $(grep -c '^BMR-FILE' "$D/want-$fw$3.txt") files"
}

# The restored disk boots by itself: its report must be Thursday's (as the source machine
# printed it after Thursday's step, that line aside), not emergency mode.
debian_boot_restored() {
    local fw=$1 what=${2:-} log=$WORK/$NAME-$1.log
    MACHINE_TIMEOUT=${BMR_DEBIAN_TIMEOUT:-1200} timed_boot "$NAME-$fw" "$fw" "$BUS:$D/target.img"
    machine_report "$log" >"$D/got-$fw.txt"
    diff -u "$D/expected.txt" "$D/got-$fw.txt" >"$D/diff-$fw.txt" ||
        fail "restored disk under $fw: $(head -c 600 "$D/diff-$fw.txt") (serial log: $log)"
    diff -u <(debian_expected_report "$D/src" "" "$D/expected-thursday") "$D/got-$fw.txt" >"$D/diff-$fw.txt" ||
        fail "restored disk under $fw: not the expected tree: $(head -c 600 "$D/diff-$fw.txt") (serial log: $log)"
    step "restored disk booted under $fw${what:+ $what} on $BUS (report after ${BOOT_SECONDS:-?} s): up, fstab ok (/boot/efi's /dev/sda2 rewritten), root /dev/mapper/vg0-root, LVs root and swap active, swap on vg0-swap, exactly Thursday's $(grep -c '^BMR-FILE' "$D/expected.txt") files"
}

debian_main() {
    local t0=$SECONDS
    rm -rf "$D" && mkdir -p "$D"
    if [ "$MACHINE" = debian-raid ]; then
        make_debian_raid_machine "$D/src" >"$D/machine.log" 2>&1 ||
            fail "building the Debian machine (log: $D/machine.log)"
        step "source machine built in $((SECONDS - t0)) s: Debian bookworm on an md RAID1 of two disks, made by mdadm in the rescue system; fstab names / by UUID and /boot/efi /dev/sda2"
    elif [ "$MACHINE" = debian-xfs ]; then
        make_debian_xfs_machine "$D/src" >"$D/machine.log" 2>&1 ||
            fail "building the Debian machine (log: $D/machine.log)"
        step "source machine built in $((SECONDS - t0)) s: Debian bookworm laid out like RHEL, $(debian_usage "$D/src"); fstab names /boot/efi /dev/sda2"
    else
        make_debian_machine "$D/src" lvm >"$D/machine.log" 2>&1 ||
            fail "building the Debian machine (log: $D/machine.log)"
        step "source machine built in $((SECONDS - t0)) s: Debian bookworm, $(debian_usage "$D/src"); fstab names /boot/efi /dev/sda2"
    fi
    debian_monday
    debian_days
    start_server "$D/repo"
    trap stop_server EXIT
    if [ "$MACHINE" = debian-raid ]; then
        raid_restore
        raid_boot_restored bios "with both disks" ""
        raid_boot_restored uefi "with both disks and an empty NVRAM" ""
        raid_boot_restored bios "from the first disk alone" -alone
        step "PASSED in $((SECONDS - t0)) s"
        report
        return
    fi
    debian_restore
    debian_boot_restored bios
    [ "$LAYOUT" != gpt ] || debian_boot_restored uefi "with an empty NVRAM"
    step "PASSED in $((SECONDS - t0)) s"
    report
}

main() {
    [ -f "$RESCUE/bmr-rescue.iso" ] || { log "no rescue build: run iso-build/build.sh first"; exit 2; }
    [ -x "$BMR" ] || (cd "$ROOT" && cargo build --release -q)
    if [ "$MACHINE" != busybox ]; then
        debian_main
        return
    fi
    rm -rf "$D" && mkdir -p "$D"
    make_machine "$D/src" "$LAYOUT" "${REINSTALL:+grub}" "$ROOTFS" >"$D/machine.log" 2>&1 ||
        fail "building the source machine (log: $D/machine.log)"
    [ -z "$LVM" ] || add_lvm_partition
    step "source machine built: $LAYOUT, $(du -h --apparent-size "$D/src/disk.img" | cut -f1) disk, $ROOTFS root${HOME_MNT:+ in @, /$HOME_MNT in $HOME_SUBVOL}${REINSTALL:+, Debian root with GRUB}${LVM:+, partition 4 for LVM}"
    if [ -n "$REINSTALL" ]; then
        # The MBR's boot code and GRUB's core image in the BIOS boot partition (or the gap after
        # the MBR) are gone: by BIOS this disk no longer boots until GRUB is reinstalled.
        dd if=/dev/zero of="$D/src/disk.img" bs=440 count=1 conv=notrunc status=none
        dd if=/dev/zero of="$D/src/disk.img" bs=512 seek="$([ "$LAYOUT" = gpt ] && echo 2048 || echo 1)" \
            count="$([ "$LAYOUT" = gpt ] && echo 2048 || echo 2047)" conv=notrunc status=none
        step "its BIOS boot code wiped (MBR code and GRUB's core image)"
    fi
    backup_week
    start_server "$D/repo"
    trap stop_server EXIT
    case $BUS in virtio) BUS_NAME=vda ;; sata) BUS_NAME=sda ;; nvme) BUS_NAME=nvme0n1 ;; esac
    restore_in_rescue
    check_root_fs
    boot_restored bios
    if [ "$LAYOUT" = gpt ]; then
        boot_restored uefi "with an empty NVRAM"
    fi
    if [ "$FW" = uefi ]; then
        # The same machine again, its NVRAM as the rescue system left it; without the fallback
        # loader only the new boot entry can start it.
        cp "$D/target.img" "$D/no-fallback.img"
        MTOOLS_SKIP_CHECK=1 mdel -i "$D/no-fallback.img@@$((2 * 1048576))" ::/EFI/BOOT/BOOTX64.EFI
        VARS=$WORK/$NAME-rescue/vars.fd boot_restored uefi "by its new NVRAM boot entry" "$D/no-fallback.img"
        rm -f "$D/no-fallback.img"
    fi
    step "PASSED"
    report
}

main
