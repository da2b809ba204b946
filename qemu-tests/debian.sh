#!/bin/bash
# A real Debian bookworm machine with its root on LVM, laid out like Ubuntu Server's guided
# install (or, the xfs layout, like RHEL's: /boot and the root LV XFS): the DR drill's source
# machine when the drill must prove a distribution's own boot (GRUB reading a separate /boot,
# Debian's initramfs-tools + lvm2 hook activating the root LV, systemd mounting fstab). Built on
# the host without device-mapper or vfat: LVM metadata by vgcfgrestore on a loop device, the
# LVs' ext4 and swap written at their byte offsets (XFS: mkfs.xfs on a loop device there,
# filled through a host mount), the ESP with mtools. Sourced by qemu-tests/drill.sh (after or
# instead of machine.sh, whose helpers it uses); run alone:
#
#   qemu-tests/debian.sh selftest      build, fsck, boot 5 ways, check the reports (~10 min, TCG)
#   qemu-tests/debian.sh build [DIR]   just build (default $WORK/debian-lvm)
#   qemu-tests/debian.sh build-xfs [DIR] / build-raid [DIR]   the other layouts
#
#   make_debian_machine DIR [lvm]   DIR/disk.img, DIR/tree (the root LV's files; /boot empty),
#       DIR/boot-tree (/boot's), DIR/grubx64.efi, DIR/info (see the comment above the function)
#   debian_info DIR VAR             one variable of DIR/info
#   boot_disk NAME bios|uefi BUS:FILE   (machine.sh) boots it; log $WORK/NAME.log
#   machine_report LOG              (machine.sh) the BMR-MACHINE/BMR-FILE lines it printed
#   debian_expected_report DIR [STEP_EXIT [TREE]]   what a clean boot prints
#   make_debian_xfs_machine DIR     the same with /boot and vg0/root XFS (host debian-xfs)
#   make_debian_raid_machine DIR    the root on an md RAID1 of two disks (host debian-raid)
#   debian_put DIR SRC DEST [MODE [IMG]]   a host file into the root LV (e.g. /etc/bmr-drill-step)
#   debian_usage DIR                sizes: disk, allocated, used by the root LV and /boot
#
# At boot, instead of a login prompt, bmr-report.service (after local-fs.target and
# swap.target) runs /etc/bmr-drill-step if it is executable, then prints on ttyS0 what the
# busybox machine's init prints, plus the LVM stack's lines, and powers off:
#   BMR-MACHINE: up debian-lvm
#   BMR-MACHINE: fstab ok                   (or: fstab failed NAME...)
#   BMR-MACHINE: step exit N                (only when /etc/bmr-drill-step ran)
#   BMR-MACHINE: root /dev/mapper/vg0-root  (findmnt -no SOURCE /)
#   BMR-MACHINE: lv vg0 root -wi-ao----     (lvs: one line per LV)
#   BMR-MACHINE: lv vg0 swap -wi-ao----
#   BMR-MACHINE: swap /dev/mapper/vg0-swap  (one line per active swap)
#   BMR-FILE: SHA256 PATH                   (each file under /data, then /home/PATH)
#   BMR-MACHINE: end N files
# When an fstab device never shows up systemd gives up after DefaultDeviceTimeoutSec (60 s
# here, not the stock 90 s) and enters emergency mode; bmr-report-emergency.service then prints
# the same report with `BMR-MACHINE: emergency mode` after `up` and `fstab failed ...` (the step
# does not run), and powers off, so a drill sees the failure without waiting for its timeout.
# fstab names /boot/efi /dev/sda2 as old installs do: only a SATA disk comes up cleanly;
# on virtio or NVMe the root LV is found (root/lv lines) but fstab fails until bmr rewrites it.
# shellcheck source=qemu-tests/machine.sh
declare -F make_machine >/dev/null || source "$(dirname "${BASH_SOURCE[0]}")/machine.sh"

DEBIAN_HOST=debian-lvm
# The Debian system: minbase plus what a small server with its root on LVM boots by (the pinned
# kernel, from iso-build/debs.sh, is installed on top: the rescue system's own).
DEBIAN_LVM_PKGS=systemd-sysv,udev,initramfs-tools,lvm2,kmod,linux-base,zstd,e2fsprogs,grub-pc-bin,grub-efi-amd64-bin,grub2-common
# Kernel modules no server drill needs (graphics, sound, media, radios, InfiniBand): dropped to
# keep the tree, and so every backup and restore of it, small under TCG.
DEBIAN_PRUNE="drivers/gpu drivers/media drivers/infiniband drivers/net/wireless drivers/staging drivers/isdn drivers/bluetooth drivers/iio drivers/hid sound net/wireless net/mac80211 net/bluetooth"
# Bumped when debian_lvm_root makes a different tree from the same inputs.
DEBIAN_RECIPE=1

# rm -rf DIR, unless something is mounted below it (a bind-mounted /dev left by an
# interrupted chroot would be emptied too).
safe_rm() {
    local d
    d=$(realpath -m "$1")
    local under
    under=$(findmnt -rn -o TARGET | awk -v d="$d" '$0 == d || index($0, d "/") == 1')
    [ -z "$under" ] || die "still mounted under $d: $under"
    rm -rf "${d:?}"
}

# debian_lvm_root: the cached Debian tree (debootstrap + the pinned kernel, no docs, pruned
# modules, no initramfs yet); prints its path.
debian_lvm_root() {
    kernel_tree
    local kdeb=$DEB key dir pkgs=$DEBIAN_LVM_PKGS${DEBIAN_EXTRA_PKGS:+,$DEBIAN_EXTRA_PKGS}
    key=$(echo "$DEBIAN_SUITE $DEBIAN_MIRROR $pkgs $(basename "$kdeb") $DEBIAN_PRUNE $DEBIAN_RECIPE" |
        sha256sum | cut -c1-12)
    dir=$CACHE/debian-lvm-$key
    if [ ! -f "$dir/.done" ]; then
        command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install debootstrap"
        safe_rm "$dir"
        log "debootstrap $DEBIAN_SUITE (minbase + $pkgs) into $dir"
        debootstrap --variant=minbase --include="$pkgs" "$DEBIAN_SUITE" "$dir" \
            "$DEBIAN_MIRROR" >"$CACHE/debootstrap-lvm.log" 2>&1 ||
            die "debootstrap failed (log: $CACHE/debootstrap-lvm.log)"
        # No docs, man pages or translations, now and for anything installed later.
        cat >"$dir/etc/dpkg/dpkg.cfg.d/01-nodoc" <<'NODOC'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
NODOC
        cp "$kdeb" "$dir/tmp/kernel.deb"
        # INITRD=No: the kernel's postinst makes no initramfs here (make_debian_machine does,
        # once the machine's configuration is in place).
        chroot "$dir" env INITRD=No DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/kernel.deb \
            >>"$CACHE/debootstrap-lvm.log" 2>&1 || die "installing $kdeb failed (log: $CACHE/debootstrap-lvm.log)"
        rm -f "$dir/tmp/kernel.deb" "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*_Packages
        find "$dir/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
        find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete
        rm -rf "$dir"/usr/share/{man,info,lintian}/* "$dir"/var/cache/debconf/*-old
        find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
        local p m=$dir/lib/modules/$KVER/kernel
        for p in $DEBIAN_PRUNE; do rm -rf "${m:?}/$p"; done
        depmod -b "$dir" "$KVER" || die "depmod failed in $dir"
        touch "$dir/.done"
    fi
    echo "$dir"
}

# Fixed identities: the same inputs give the same disk.
DEBIAN_DISK_GUID=D3B1A000-0000-4000-8000-0000000000D0
DEBIAN_BOOT_UUID=3b0f7c1e-5d2a-4e6b-8c9d-0a1b2c3d4e5f
DEBIAN_ROOT_UUID=7a2e9c4d-1f3b-4a5c-9e8d-6b7c8d9e0f1a
DEBIAN_SWAP_UUID=c4e5f6a7-b8c9-4d0e-8f1a-2b3c4d5e6f70
DEBIAN_ESP_ID=D3B1A0E5
DEBIAN_PV_UUID=bmrPV0-0000-0000-0000-0000-0000-000001
DEBIAN_VG_UUID=bmrVG0-0000-0000-0000-0000-0000-000001
DEBIAN_ROOTLV_UUID=bmrLV0-0000-0000-0000-0000-0000-000001
DEBIAN_SWAPLV_UUID=bmrLV0-0000-0000-0000-0000-0000-000002
DEBIAN_VG=vg0
DEBIAN_MD_UUID=d3b1a0a1:5e1d0c2b:3a494f58:8e67d0c1
DEBIAN_EXTENT_MIB=4
DEBIAN_SWAP_MIB=64
DEBIAN_KARGS="ro console=tty0 console=ttyS0,115200n8 panic=-1"
# How long systemd waits for a device named in fstab: the stock 90 s makes every failing drill
# boot wait for nothing; 20 s was too short under TCG (udev's coldplug can end 20 s after
# systemd starts, and then even vg0-swap and /boot time out). Everything else is as installed.
DEBIAN_DEVICE_TIMEOUT=${BMR_DEBIAN_DEVICE_TIMEOUT:-60s}

# lvm on the host, restricted to one device: no other VG the host sees (another test's, or one
# also called vg0) takes part, no udev (there is no device-mapper anyway), no backups in /etc/lvm.
host_lvm() {
    local dev=$1 verb=$2
    shift 2
    DM_DISABLE_UDEV=1 LVM_SUPPRESS_FD_WARNINGS=1 lvm "$verb" --devices "$dev" \
        --config 'devices { hints="none" } activation { udev_sync=0 udev_rules=0 } backup { backup=0 archive=0 }' "$@"
}

# The volume group's metadata, as vgcfgbackup writes it: one PV, two linear LVs (root, then swap).
debian_vg_cfg() {
    local dev=$1 dev_sectors=$2 pe_count=$3 root_ext=$4 swap_ext=$5
    cat <<CFG
contents = "Text Format Volume Group"
version = 1
description = "qemu-tests/debian.sh"
creation_host = "$DEBIAN_HOST"
creation_time = 1700000000

$DEBIAN_VG {
	id = "$DEBIAN_VG_UUID"
	seqno = 1
	format = "lvm2"
	status = ["RESIZEABLE", "READ", "WRITE"]
	flags = []
	extent_size = $((DEBIAN_EXTENT_MIB * 2048))
	max_lv = 0
	max_pv = 0
	metadata_copies = 0

	physical_volumes {
		pv0 {
			id = "$DEBIAN_PV_UUID"
			device = "$dev"
			status = ["ALLOCATABLE"]
			flags = []
			dev_size = $dev_sectors
			pe_start = 2048
			pe_count = $pe_count
		}
	}

	logical_volumes {
		root {
			id = "$DEBIAN_ROOTLV_UUID"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			creation_time = 1700000000
			creation_host = "$DEBIAN_HOST"
			segment_count = 1
			segment1 {
				start_extent = 0
				extent_count = $root_ext
				type = "striped"
				stripe_count = 1
				stripes = ["pv0", 0]
			}
		}
		swap {
			id = "$DEBIAN_SWAPLV_UUID"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			creation_time = 1700000000
			creation_host = "$DEBIAN_HOST"
			segment_count = 1
			segment1 {
				start_extent = 0
				extent_count = $swap_ext
				type = "striped"
				stripe_count = 1
				stripes = ["pv0", $root_ext]
			}
		}
	}
}
CFG
}

# The machine's configuration, on a copy of the cached tree: hostname, fstab, initramfs-tools
# (every storage driver, the lvm2 hook), the report units, GRUB's defaults, /data.
debian_configure() {
    local t=$1 kind=${2:-lvm} unit=$1/etc/systemd/system
    echo "$DEBIAN_HOST" >"$t/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$DEBIAN_HOST" >"$t/etc/hosts"
    # As the installer writes it, with the ESP by its old kernel name, as real machines have it.
    local fs=ext4 root_opts="errors=remount-ro 0 1" boot_opts="defaults 0 2"
    # RHEL's installer writes XFS with no fsck pass (fsck.xfs does nothing).
    [ "$kind" != xfs ] || fs=xfs root_opts="defaults 0 0" boot_opts="defaults 0 0"
    if [ "$kind" = raid ]; then
        # As Debian's installer writes a root on md: by the filesystem's UUID.
        cat >"$t/etc/fstab" <<FSTAB
# /etc/fstab: static file system information.
# <file system> <mount point> <type> <options> <dump> <pass>
# / was on /dev/md0 during installation
UUID=$DEBIAN_ROOT_UUID / ext4 errors=remount-ro 0 1
# /boot was on /dev/sda3 during installation
UUID=$DEBIAN_BOOT_UUID /boot ext4 defaults 0 2
/dev/sda2 /boot/efi vfat umask=0077 0 1
FSTAB
        mkdir -p "$t/etc/mdadm"
        printf 'HOMEHOST <system>\nARRAY /dev/md/root metadata=1.2 UUID=%s name=%s:root\n' \
            "$DEBIAN_MD_UUID" "$DEBIAN_HOST" >"$t/etc/mdadm/mdadm.conf"
    else
        cat >"$t/etc/fstab" <<FSTAB
# /etc/fstab: static file system information.
# <file system> <mount point> <type> <options> <dump> <pass>
/dev/mapper/$DEBIAN_VG-root / $fs $root_opts
# /boot was on /dev/sda3 during installation
UUID=$DEBIAN_BOOT_UUID /boot $fs $boot_opts
/dev/sda2 /boot/efi vfat umask=0077 0 1
/dev/mapper/$DEBIAN_VG-swap none swap sw 0 0
FSTAB
    fi
    mkdir -p "$t/boot/efi" "$t/data/sub" "$t/etc/initramfs-tools/conf.d" "$t/etc/systemd/system.conf.d"
    # MODULES=most (Debian's default) takes every storage driver: the root must be found on
    # virtio, SATA and NVMe alike. Name the ones the drill's buses need anyway.
    # FSTYPE: the fsck hook cannot probe the root from a chroot (an installer's can), and
    # without it the initramfs has no e2fsck for the root (nor fsck.xfs and the xfs driver).
    printf 'MODULES=most\nCOMPRESS=zstd\nFSTYPE=%s\n' "$fs" >"$t/etc/initramfs-tools/conf.d/bmr.conf"
    printf '%s\n' dm_mod virtio_pci virtio_blk virtio_scsi ahci sd_mod nvme "$fs" crc32c_generic \
        >>"$t/etc/initramfs-tools/modules"
    [ "$kind" != raid ] || printf '%s\n' md_mod raid1 >>"$t/etc/initramfs-tools/modules"
    printf 'RESUME=none\n' >"$t/etc/initramfs-tools/conf.d/resume"
    printf '[Manager]\nDefaultDeviceTimeoutSec=%s\n' "$DEBIAN_DEVICE_TIMEOUT" \
        >"$t/etc/systemd/system.conf.d/bmr-drill.conf"
    install -m 0755 "$ROOT/qemu-tests/debian-report" "$t/usr/local/sbin/bmr-report"
    cat >"$unit/bmr-report.service" <<'UNIT'
[Unit]
Description=bmr drill: report on the serial console, then power off
After=local-fs.target swap.target systemd-user-sessions.service

[Service]
Type=oneshot
TimeoutStartSec=infinity
ExecStart=/usr/local/sbin/bmr-report

[Install]
WantedBy=multi-user.target
UNIT
    cat >"$unit/bmr-report-emergency.service" <<'UNIT'
[Unit]
Description=bmr drill: report from emergency mode, then power off
DefaultDependencies=no
# Before sulogin takes the console (it flushes what is still queued for it).
Before=emergency.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/bmr-report emergency

[Install]
WantedBy=emergency.target
UNIT
    # A DHCP client for a drill step that needs the network (nothing waits for it).
    printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' >"$t/etc/systemd/network/50-dhcp.network"
    systemctl --root="$t" --quiet enable bmr-report.service bmr-report-emergency.service \
        systemd-networkd.service 2>/dev/null || die "systemctl enable in $t failed"
    # The report stands in for a login prompt.
    ln -sf /dev/null "$unit/getty.target"
    ln -sf /lib/systemd/system/multi-user.target "$unit/default.target"
    grub_defaults "$t/etc/default/grub" "${DEBIAN_KARGS#ro }"
    echo "created with the Debian machine" >"$t/data/readme.txt"
    echo "one level down" >"$t/data/sub/nested.txt"
    head -c 300000 /dev/zero | tr '\0' 'x' >"$t/data/sub/bigger.txt"
}

# debian_initramfs TREE: update-initramfs -c in a chroot, with /proc, /sys and /dev mounted
# for it (and unmounted on every path).
debian_initramfs() {
    local t=$1
    (
        mounted=()
        # shellcheck disable=SC2317 # run by the traps
        cleanup() { local m; for m in "${mounted[@]}"; do umount "$m" || umount -l "$m"; done; }
        trap cleanup EXIT
        trap 'exit 130' INT TERM
        mount -t proc proc "$t/proc" && mounted=("$t/proc")
        mount -t sysfs sysfs "$t/sys" && mounted=("$t/sys" "${mounted[@]}")
        mount --bind /dev "$t/dev" && mounted=("$t/dev" "${mounted[@]}")
        chroot "$t" update-initramfs -c -k "$KVER" >"$t.initramfs.log" 2>&1
    ) || { log "update-initramfs failed: $(tail -n 5 "$t.initramfs.log")"; return 1; }
}

# with_loop IMG OFFSET SIZE CMD...: CMD with the loop device over that stretch of IMG as its
# last argument; the device is detached on every path.
with_loop() {
    local img=$1 off=$2 len=$3
    shift 3
    (
        dev=$(losetup -f --show -o "$off" --sizelimit "$len" "$img") || exit 1
        # shellcheck disable=SC2064 # the device is known now
        trap "losetup -d $dev" EXIT
        trap 'exit 130' INT TERM
        "$@" "$dev"
    )
}

# The PV and VG on DEV (lvm writes metadata and activates nothing): prints pe_start, keeps
# what lvs says in DIR/lvs.txt.
debian_lvm_metadata() {
    local dir=$1 size=$2 root_ext=$3 swap_ext=$4 dev=$5 ext=$((DEBIAN_EXTENT_MIB * 1048576))
    debian_vg_cfg "$dev" $((size / 512)) $(( (size - 1048576) / ext )) "$root_ext" "$swap_ext" >"$dir/vg0.cfg" &&
        host_lvm "$dev" pvcreate -q -ff -y --uuid "$DEBIAN_PV_UUID" --norestorefile \
            --dataalignment 1m "$dev" >"$dir/lvm.log" 2>&1 &&
        host_lvm "$dev" vgcfgrestore -q -f "$dir/vg0.cfg" "$DEBIAN_VG" >>"$dir/lvm.log" 2>&1 &&
        host_lvm "$dev" lvs --noheadings --segments --units b -o lv_name,seg_pe_ranges,lv_size \
            "$DEBIAN_VG" >"$dir/lvs.txt" 2>>"$dir/lvm.log" &&
        host_lvm "$dev" pvs --noheadings --units b --nosuffix -o pe_start "$dev" 2>>"$dir/lvm.log" | tr -d ' '
}

# debian_raid_disks DIR TREE START SIZE LEN: the md mirror of the raid machine: DIR/disk-b.img
# with disk.img's table (new GUIDs), the root's ext4 of LEN bytes made from TREE, and the array
# over both partitions 4 (at START, SIZE bytes) made by the real mdadm in the rescue system
# (the host has no md driver): metadata 1.2, data 1 MiB in, then the ext4 written through md
# onto both members.
debian_raid_disks() {
    local dir=$1 t=$2 len=$5 disk=$1/disk.img b=$1/disk-b.img img=$1/root.img
    rm -f "$b" "$img" && truncate -s "$(stat -c %s "$disk")" "$b"
    sgdisk -R "$b" "$disk" >/dev/null && sgdisk -G "$b" >/dev/null || return 1
    E2FSPROGS_FAKE_TIME=${SOURCE_DATE_EPOCH:-1700000000} mke2fs -q -t ext4 -L root -U "$DEBIAN_ROOT_UUID" \
        -E root_owner=0:0 -d "$t" "$img" "$((len / 1024))k" || return 1
    cat >"$dir/make-md.guest" <<GUEST
mdadm --create /dev/md/root --run --level=1 --raid-devices=2 --metadata=1.2 --homehost=$DEBIAN_HOST --name=root --uuid=$DEBIAN_MD_UUID --data-offset=1M --assume-clean /dev/vda4 /dev/vdb4
[ "\$(blockdev --getsize64 /dev/md/root)" -ge $len ]
dd if=/dev/vdc of=/dev/md/root bs=1M conv=fsync
mdadm --detail /dev/md/root
mdadm --stop /dev/md/root
GUEST
    rm -f "$WORK/$DEBIAN_HOST-md.sock"
    python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/$DEBIAN_HOST-md.sock" "$WORK/$DEBIAN_HOST-md.log" \
        "$dir/make-md.guest" &
    local driver=$!
    SERIAL=unix NET=none boot "$DEBIAN_HOST-md" bios cd "bmr.break" "virtio:$disk" "virtio:$b" "virtio:$img"
    wait "$driver" || { log "making the md mirror: see $WORK/$DEBIAN_HOST-md.log"; return 1; }
    rm -f "$img"
}

# make_debian_raid_machine DIR: make_debian_machine's layout with partition 4 an md RAID1
# member (type FD00) of /dev/md/root, the root's ext4 (by UUID in fstab and root=), its twin
# partition 4 on DIR/disk-b.img; no swap. Its own host, debian-raid, with mdadm and an
# mdadm.conf naming the array (Debian's initramfs assembles it).
make_debian_raid_machine() {
    DEBIAN_HOST=debian-raid DEBIAN_EXTRA_PKGS=mdadm make_debian_machine "$1" raid
}

# make_debian_xfs_machine DIR: make_debian_machine's layout as RHEL's installer lays it out,
# /boot (320 MiB: mkfs.xfs refuses less than 300) and vg0/root XFS, GRUB with its xfs driver.
# Its own host, debian-xfs, with xfsprogs (the initramfs's fsck.xfs; xfs_repair by hand).
make_debian_xfs_machine() {
    DEBIAN_HOST=debian-xfs DEBIAN_EXTRA_PKGS=xfsprogs make_debian_machine "$1" xfs
}

# debian_xfs TREE UUID LABEL DEV: machine.sh's root_fs for one of the xfs machine's filesystems
# (DEV a loop device over the root LV or /boot): mkfs.xfs, TREE copied in, cleanly unmounted.
debian_xfs() { ROOT_UUID=$2 root_fs xfs "$4" "$1" "$3"; }

# make_debian_machine DIR [lvm|xfs|raid] (xfs and raid: use their make_debian_*_machine)
#   DIR/disk.img: GPT, 1 BIOS boot (1 MiB), 2 ESP (FAT32, 64 MiB: EFI/debian/grubx64.efi only,
#   no EFI/BOOT fallback), 3 /boot (ext4, 256 MiB, GRUB's grub.cfg in /grub), 4 LVM PV holding
#   VG vg0: LV root (ext4: the system and /data, ~25% free) then LV swap (64 MiB). xfs: /boot
#   and the root LV XFS, /boot 320 MiB.
#   DIR/tree: the root filesystem's files (/boot empty: its files are in DIR/boot-tree).
#   DIR/info: shell variables (DISK_SIZE, PART{1..4}_{START,SIZE} in bytes, BOOT_UUID, ROOT_UUID,
#   SWAP_UUID, ESP_ID, ESP_OFFSET, VG, PV_UUID, PE_START, EXTENT_SIZE, ROOT_LV_OFFSET,
#   ROOT_LV_SIZE, SWAP_LV_OFFSET, SWAP_LV_SIZE, KVER, HOST, TREE_KIB, KIND, ROOT_FS, BOOT_FS).
#   The kernel boots with root=/dev/mapper/vg0-root and Debian's own initramfs (initramfs-tools
#   + the lvm2 hook, MODULES=most) finds it on any bus. fstab: vg0-root, /boot by UUID,
#   /boot/efi as /dev/sda2 (only SATA disks come up cleanly until bmr rewrites it), vg0-swap.
make_debian_machine() {
    local dir=$1 kind=${2:-lvm}
    case $kind in
    lvm) ;;
    # The raid machine is another host, with mdadm in its tree (make_debian_raid_machine).
    raid) [ "$DEBIAN_HOST" = debian-raid ] || die "make_debian_machine raid: use make_debian_raid_machine" ;;
    xfs) [ "$DEBIAN_HOST" = debian-xfs ] || die "make_debian_machine xfs: use make_debian_xfs_machine" ;;
    *) die "make_debian_machine: the layouts are lvm, xfs and raid, not $kind" ;;
    esac
    # The root's and /boot's filesystem.
    local fs=ext4 boot_mib=256
    [ "$kind" != xfs ] || fs=xfs boot_mib=320
    local need
    for need in debootstrap:debootstrap grub-mkimage:grub-common /usr/lib/grub/i386-pc/boot.img:grub-pc-bin \
        /usr/lib/grub/x86_64-efi/linux.mod:grub-efi-amd64-bin mcopy:mtools mkfs.fat:dosfstools \
        mke2fs:e2fsprogs sgdisk:gdisk lvm:lvm2 mkswap:util-linux losetup:mount mkfs.xfs:xfsprogs xfs_db:xfsprogs; do
        command -v "${need%%:*}" >/dev/null || [ -e "${need%%:*}" ] ||
            die "make_debian_machine needs ${need%%:*}: apt-get install ${need#*:}"
    done
    local base
    base=$(debian_lvm_root) || die "no Debian tree"
    kernel_tree
    safe_rm "$dir" && mkdir -p "$dir"
    local t=$dir/tree b=$dir/boot-tree
    log "copying the Debian tree"
    cp -a "$base/." "$t/"
    rm -f "$t/.done"
    debian_configure "$t" "$kind"
    log "update-initramfs -c -k $KVER (chroot)"
    debian_initramfs "$t" || die "no initramfs for $dir"
    # What the drill checks: the lvm2 hook and device-mapper are in.
    local listing
    listing=$(chroot "$t" lsinitramfs "/boot/initrd.img-$KVER") || die "lsinitramfs failed"
    local in_initrd="sbin/lvm dm-mod.ko nvme.ko ahci.ko virtio_blk.ko"
    [ "$kind" != raid ] || in_initrd+=" sbin/mdadm etc/mdadm/mdadm.conf raid1.ko"
    [ "$kind" != xfs ] || in_initrd+=" xfs.ko"
    for need in $in_initrd; do
        grep -q "$need" <<<"$listing" || die "the initramfs lacks $need"
    done
    # GRUB's menu, by hand (grub-mkconfig probes through device-mapper, which this host lacks).
    mkdir -p "$t/boot/grub"
    cat >"$t/boot/grub/grub.cfg" <<GRUBCFG
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
search --no-floppy --fs-uuid --set=root $DEBIAN_BOOT_UUID
menuentry 'Debian GNU/Linux' {
	linux /vmlinuz-$KVER root=$([ "$kind" = raid ] && echo "UUID=$DEBIAN_ROOT_UUID" || echo "/dev/mapper/$DEBIAN_VG-root") $DEBIAN_KARGS
	initrd /initrd.img-$KVER
}
GRUBCFG
    # /boot is its own filesystem: its files leave the root tree.
    mkdir -p "$b"
    (shopt -s dotglob nullglob; mv "$t"/boot/* "$b/")
    rm -f "$t"/{vmlinuz,initrd.img}{,.old}
    ln -s "boot/vmlinuz-$KVER" "$t/vmlinuz"
    ln -s "boot/initrd.img-$KVER" "$t/initrd.img"

    # Sizes: the root LV holds the tree with ~25% free (ext4's own overhead on top).
    local tree_kib root_mib pe root_ext swap_ext ext=$((DEBIAN_EXTENT_MIB * 1048576))
    tree_kib=$(du -sk "$t" | cut -f1)
    root_mib=$(( (tree_kib * 5 / 4 + tree_kib / 20) / 1024 + 64 ))
    root_ext=$(( (root_mib + DEBIAN_EXTENT_MIB - 1) / DEBIAN_EXTENT_MIB ))
    swap_ext=$(( DEBIAN_SWAP_MIB / DEBIAN_EXTENT_MIB ))
    pe=$((root_ext + swap_ext + 1)) # one free extent, as an installer leaves a little
    # MiB: 1 (alignment) + 1 + 64 + /boot + the PV (1 MiB of metadata + extents) + 1 (backup GPT).
    local pv_mib=$((1 + pe * DEBIAN_EXTENT_MIB)) disk=$dir/disk.img p4_type=8e00 p4_name=lvm
    # RAID: the md member holds 1 MiB of superblock (the data offset), then the root's ext4
    # (its size rounded to 4 MiB), and 1 MiB that md may keep.
    [ "$kind" != raid ] || pv_mib=$((1 + root_ext * DEBIAN_EXTENT_MIB + 1)) p4_type=fd00 p4_name=raid
    local disk_mib=$((1 + 1 + 64 + boot_mib + pv_mib + 1))
    truncate -s "${disk_mib}M" "$disk"
    sgdisk -U "$DEBIAN_DISK_GUID" \
        -n 1:2048:+1M -t 1:ef02 -c 1:bios -u 1:D3B1A000-0000-4000-8000-000000000001 \
        -n 2:0:+64M -t 2:ef00 -c 2:esp -u 2:D3B1A000-0000-4000-8000-000000000002 \
        -n 3:0:+"${boot_mib}M" -t 3:8300 -c 3:boot -u 3:D3B1A000-0000-4000-8000-000000000003 \
        -n 4:0:+"${pv_mib}M" -t 4:$p4_type -c 4:$p4_name -u 4:D3B1A000-0000-4000-8000-000000000004 \
        "$disk" >/dev/null || die "sgdisk failed on $disk"
    local i start size
    local -a pstart psize
    for i in 1 2 3 4; do
        read -r start size < <(sgdisk -i "$i" "$disk" | awk '/First sector/ {f=$3} /Last sector/ {l=$3} END {print f, l - f + 1}')
        pstart[i]=$((start * 512)) psize[i]=$((size * 512))
    done

    [ "$kind" != raid ] || { debian_raid_disks "$dir" "$t" "${pstart[4]}" "${psize[4]}" $((root_ext * ext)) || die "making the md mirror failed"; }
    # The PV and VG, on a loop device over partition 4.
    local pe_start
    [ "$kind" = raid ] || pe_start=$(with_loop "$disk" "${pstart[4]}" "${psize[4]}" debian_lvm_metadata "$dir" "${psize[4]}" \
        "$root_ext" "$swap_ext") || die "writing the LVM metadata failed: $(cat "$dir/lvm.log")"
    [ "$kind" = raid ] || [ "$pe_start" = 1048576 ] || die "pe_start is $pe_start, not 1 MiB"
    # md's data offset stands where the PV's first extent would.
    [ "$kind" != raid ] || pe_start=1048576
    local root_off=$((pstart[4] + pe_start)) root_len=$((root_ext * ext))
    local swap_off=$((root_off + root_len)) swap_len=$((swap_ext * ext))

    if [ "$fs" = xfs ]; then
        log "mkfs.xfs: root ($((root_len >> 20)) MiB, tree $((tree_kib >> 10)) MiB) and /boot, filled through host mounts"
        with_loop "$disk" "$root_off" "$root_len" debian_xfs "$t" "$DEBIAN_ROOT_UUID" root ||
            die "mkfs.xfs of the root LV failed"
        with_loop "$disk" "${pstart[3]}" "${psize[3]}" debian_xfs "$b" "$DEBIAN_BOOT_UUID" boot ||
            die "mkfs.xfs of /boot failed"
    else
        log "mke2fs: root ($((root_len >> 20)) MiB, tree $((tree_kib >> 10)) MiB) and /boot"
        [ "$kind" = raid ] || E2FSPROGS_FAKE_TIME=${SOURCE_DATE_EPOCH:-1700000000} mke2fs -q -t ext4 -L root -U "$DEBIAN_ROOT_UUID" \
            -E "offset=$root_off,root_owner=0:0" -d "$t" "$disk" "$((root_len / 1024))k" ||
            die "mke2fs of the root LV failed"
        E2FSPROGS_FAKE_TIME=${SOURCE_DATE_EPOCH:-1700000000} mke2fs -q -t ext4 -L boot -U "$DEBIAN_BOOT_UUID" \
            -E "offset=${pstart[3]},root_owner=0:0" -d "$b" "$disk" "$((psize[3] / 1024))k" ||
            die "mke2fs of /boot failed"
    fi
    [ "$kind" = raid ] || with_loop "$disk" "$swap_off" "$swap_len" mkswap -q -U "$DEBIAN_SWAP_UUID" -L swap || die "mkswap failed"

    # GRUB: BIOS core.img in partition 1 (boot.img in the MBR), grubx64.efi in the ESP; both
    # find /boot by its UUID and read /grub/grub.cfg there.
    local grubfs=
    [ "$fs" = ext4 ] || grubfs=$fs
    ROOT_UUID=$DEBIAN_BOOT_UUID grub_image i386-pc "$dir/core.img" "$dir" "" biosdisk ${grubfs:+"$grubfs"} ||
        die "grub-mkimage i386-pc failed"
    install_grub_bios "$disk" "$dir/core.img" $((pstart[1] / 512))
    ROOT_UUID=$DEBIAN_BOOT_UUID grub_image x86_64-efi "$dir/grubx64.efi" "$dir" "" fat all_video ${grubfs:+"$grubfs"} ||
        die "grub-mkimage x86_64-efi failed"
    local esp=$dir/esp.img
    rm -f "$esp"
    mkfs.fat -F 32 -n ESP -i "$DEBIAN_ESP_ID" -C "$esp" $((psize[2] / 1024)) >/dev/null
    mmd -i "$esp" ::/EFI ::/EFI/debian
    mcopy -i "$esp" "$dir/grubx64.efi" ::/EFI/debian/grubx64.efi
    dd if="$esp" of="$disk" bs=1M seek=$((pstart[2] / 1048576)) conv=notrunc status=none
    rm -f "$esp"

    {
        echo "HOST=$DEBIAN_HOST"
        echo "KVER=$KVER"
        echo "DISK_SIZE=$(stat -c %s "$disk")"
        for i in 1 2 3 4; do echo "PART${i}_START=${pstart[i]}"; echo "PART${i}_SIZE=${psize[i]}"; done
        echo "ESP_OFFSET=${pstart[2]}"
        echo "ESP_ID=$DEBIAN_ESP_ID"
        echo "BOOT_UUID=$DEBIAN_BOOT_UUID"
        echo "ROOT_UUID=$DEBIAN_ROOT_UUID"
        echo "SWAP_UUID=$DEBIAN_SWAP_UUID"
        echo "VG=$DEBIAN_VG"
        echo "PV_UUID=$DEBIAN_PV_UUID"
        echo "PE_START=$pe_start"
        echo "EXTENT_SIZE=$ext"
        echo "ROOT_LV_OFFSET=$root_off"
        echo "ROOT_LV_SIZE=$root_len"
        echo "SWAP_LV_OFFSET=$swap_off"
        echo "SWAP_LV_SIZE=$swap_len"
        echo "TREE_KIB=$tree_kib"
        echo "KIND=$kind"
        echo "ROOT_FS=$fs"
        echo "BOOT_FS=$fs"
        echo "MD_UUID=$DEBIAN_MD_UUID"
    } >"$dir/info"
    # The mirror's second disk: the same table, new GUIDs, the md member and nothing else.
    [ "$kind" != raid ] || [ -f "$dir/disk-b.img" ] || die "no second disk"
}

# debian_info DIR VAR: one variable of DIR/info.
debian_info() { sed -n "s/^$2=//p" "$1/info"; }

# debian_expected_report DIR [STEP_EXIT [TREE]]: what a clean boot of the machine in DIR prints
# (machine_report's lines): expected_report's for DIR/tree (or TREE: /data and /home are what
# count), with the LVM stack's lines after `fstab ok` (and `step exit N` first when the drill
# step ran).
debian_expected_report() {
    local dir=$1 step=${2:-} tree=${3:-$1/tree} vg
    if [ "$(debian_info "$dir" KIND)" = raid ]; then
        MACHINE_HOST=$(debian_info "$dir" HOST) expected_report "$tree" | awk -v step="$step" -v degraded="${DEBIAN_DEGRADED:-0}" '
            { print }
            $0 == "BMR-MACHINE: fstab ok" {
                if (step != "") print "BMR-MACHINE: step exit " step
                print "BMR-MACHINE: root /dev/md127"
                print "BMR-MACHINE: md md127 raid1 disks 2 degraded " degraded
            }'
        return
    fi
    vg=$(debian_info "$dir" VG)
    MACHINE_HOST=$(debian_info "$dir" HOST) expected_report "$tree" | awk -v vg="$vg" -v step="$step" '
        { print }
        $0 == "BMR-MACHINE: fstab ok" {
            if (step != "") print "BMR-MACHINE: step exit " step
            print "BMR-MACHINE: root /dev/mapper/" vg "-root"
            print "BMR-MACHINE: lv " vg " root -wi-ao----"
            print "BMR-MACHINE: lv " vg " swap -wi-ao----"
            print "BMR-MACHINE: swap /dev/mapper/" vg "-swap"
        }'
}

# debian_put DIR SRC DEST [MODE [IMG]]: copy the host's file SRC (- : standard input) to DEST
# in the machine's root LV (in DIR/disk.img, or IMG: a copy of it), through a host mount of
# the LV's ext4 or XFS (a loop device at ROOT_LV_OFFSET). E.g. the drill's /etc/bmr-drill-step.
debian_put() {
    local dir=$1 src=$2 dest=$3 mode=${4:-0755} img=${5:-$1/disk.img} off len fs
    off=$(debian_info "$dir" ROOT_LV_OFFSET) len=$(debian_info "$dir" ROOT_LV_SIZE) fs=$(debian_info "$dir" ROOT_FS)
    (
        mnt=$(mktemp -d)
        # shellcheck disable=SC2064 # the directory is known now
        trap "umount '$mnt' 2>/dev/null || true; rmdir '$mnt'" EXIT
        trap 'exit 130' INT TERM
        mount -t "${fs:-ext4}" -o "loop,offset=$off,sizelimit=$len" "$img" "$mnt" || exit 1
        mkdir -p "$mnt/$(dirname "$dest")"
        if [ "$src" = - ]; then cat >"$mnt/$dest"; else cat "$src" >"$mnt/$dest"; fi
        chmod "$mode" "$mnt/$dest"
    ) || return 1
    [ "$img" != "$dir/disk.img" ] || debian_sync_mirror "$dir"
}

# debian_sync_mirror DIR: after the host wrote into the raid machine's root on the first disk,
# the second disk gets the same data (the members of a mirror must not differ; their
# superblocks, before the data, stay as they are). Nothing for the LVM machine.
debian_sync_mirror() {
    local dir=$1 off len
    [ -f "$dir/disk-b.img" ] || return 0
    off=$(debian_info "$dir" ROOT_LV_OFFSET) len=$(debian_info "$dir" ROOT_LV_SIZE)
    dd if="$dir/disk.img" of="$dir/disk-b.img" bs=1M skip="$off" seek="$off" count="$len" \
        iflag=skip_bytes,count_bytes oflag=seek_bytes conv=notrunc status=none
}

# fs_used IMG OFFSET SIZE [FSTYPE]: the bytes an ext4 (or XFS) inside IMG uses (through a
# loop device), as its superblock counts them (XFS's counters are exact once cleanly unmounted).
fs_used() {
    if [ "${4:-ext4}" = xfs ]; then
        with_loop "$1" "$2" "$3" xfs_db -r -c 'sb 0' -c 'p dblocks' -c 'p fdblocks' -c 'p blocksize' |
            awk '$1 == "dblocks" {c=$3} $1 == "fdblocks" {f=$3} $1 == "blocksize" {b=$3} END {print (c - f) * b}'
        return
    fi
    with_loop "$1" "$2" "$3" dumpe2fs -h 2>/dev/null |
        awk -F: '/^Block count/ {c=$2} /^Free blocks/ {f=$2} /^Block size/ {b=$2} END {print (c - f) * b}'
}

# debian_usage DIR: the disk's size, the bytes its filesystems use and the file's allocation.
debian_usage() {
    local dir=$1 disk=$1/disk.img root boot
    root=$(fs_used "$disk" "$(debian_info "$dir" ROOT_LV_OFFSET)" "$(debian_info "$dir" ROOT_LV_SIZE)" "$(debian_info "$dir" ROOT_FS)")
    boot=$(fs_used "$disk" "$(debian_info "$dir" PART3_START)" "$(debian_info "$dir" PART3_SIZE)" "$(debian_info "$dir" BOOT_FS)")
    echo "disk $(( $(debian_info "$dir" DISK_SIZE) >> 20 )) MiB (file allocates $(( $(du -k "$disk" | cut -f1) >> 10 )) MiB);" \
        "root LV $(( $(debian_info "$dir" ROOT_LV_SIZE) >> 20 )) MiB $(debian_info "$dir" ROOT_FS), $((root >> 20)) MiB used;" \
        "/boot $(debian_info "$dir" BOOT_FS) $((boot >> 20)) MiB used; swap LV $(( $(debian_info "$dir" SWAP_LV_SIZE) >> 20 )) MiB"
}

# timed_boot NAME FIRMWARE BUS:FILE: boot_disk, and how many seconds until the report's end
# line (or the timeout) in BOOT_SECONDS.
timed_boot() {
    local name=$1 log=$WORK/$1.log t0=$SECONDS pid
    rm -f "$log"
    boot_disk "$@" &
    pid=$!
    BOOT_SECONDS=
    while kill -0 "$pid" 2>/dev/null; do
        if [ -z "$BOOT_SECONDS" ] && [ -f "$log" ] && grep -aq 'BMR-MACHINE: end ' "$log"; then
            BOOT_SECONDS=$((SECONDS - t0))
        fi
        sleep 1
    done
    wait "$pid" || true
    [ -n "$BOOT_SECONDS" ] || ! grep -aq 'BMR-MACHINE: end ' "$log" || BOOT_SECONDS=$((SECONDS - t0))
    log "$name: report after ${BOOT_SECONDS:-(none)} s, QEMU ran $((SECONDS - t0)) s"
}

debian_selftest() {
    local pass=0 failed=0 dir=$WORK/debian-lvm log
    check() {
        if "$@"; then pass=$((pass + 1)); echo "PASS $CASE"; else failed=$((failed + 1)); echo "FAIL $CASE"; fi
    }
    same() { diff <(debian_expected_report "$dir") <(machine_report "$WORK/$1.log") >&2; }
    # A boot that stopped at an fstab entry: emergency mode, reported by its hook, with the
    # root LV found by the initramfs all the same.
    emergency() {
        local r
        r=$(machine_report "$WORK/$1.log")
        grep -qx "BMR-MACHINE: emergency mode" <<<"$r" &&
            grep -qx "BMR-MACHINE: fstab failed /dev/sda2" <<<"$r" &&
            grep -qx "BMR-MACHINE: root /dev/mapper/vg0-root" <<<"$r" &&
            tr -d '\r' <"$WORK/$1.log" | grep -aq 'Timed out waiting for device.*sda2' && return 0
        log "$1: not the expected emergency boot:"
        printf '%s\n' "$r" >&2
        return 1
    }
    mkdir -p "$WORK"
    local t0=$SECONDS
    make_debian_machine "$dir" lvm
    log "built $dir in $((SECONDS - t0)) s: $(debian_usage "$dir")"
    fsck_clean() { e2fsck -fn "$dir/disk.img?offset=$1" >&2 || { log "e2fsck: problems at offset $1"; return 1; }; }
    CASE=debian-fsck-root; check fsck_clean "$(debian_info "$dir" ROOT_LV_OFFSET)" 2>/dev/null
    CASE=debian-fsck-boot; check fsck_clean "$(debian_info "$dir" PART3_START)" 2>/dev/null
    CASE=debian-bios-sata; timed_boot "$CASE" bios "sata:$dir/disk.img"
    check same "$CASE"
    # Under OVMF with an empty NVRAM only the removable path boots: add it to a copy.
    local fb=$dir/fallback.img
    cp --sparse=always "$dir/disk.img" "$fb"
    local esp_off
    esp_off=$(debian_info "$dir" ESP_OFFSET)
    mmd -i "$fb@@$esp_off" ::/EFI/BOOT
    mcopy -i "$fb@@$esp_off" "$dir/grubx64.efi" ::/EFI/BOOT/BOOTX64.EFI
    # The drill's hook, on the copy: a step that adds a file to /data before the report.
    debian_put "$dir" - /etc/bmr-drill-step 0755 "$fb" <<'STEP'
#!/bin/sh
echo "written by the drill step" >/data/step.txt
STEP
    local st=$dir/step-tree
    rm -rf "$st" && mkdir -p "$st" && cp -a "$dir/tree/data" "$st/"
    echo "written by the drill step" >"$st/data/step.txt"
    CASE=debian-uefi-fallback-sata-step; timed_boot "$CASE" uefi "sata:$fb"
    check diff <(debian_expected_report "$dir" 0 "$st") <(machine_report "$WORK/$CASE.log")
    rm -rf "$fb" "$st"
    # The original under OVMF with an empty NVRAM: no loader it knows of, nothing boots.
    CASE=debian-uefi-no-fallback; MACHINE_TIMEOUT=60 timed_boot "$CASE" uefi "sata:$dir/disk.img"
    check [ -z "$(machine_report "$WORK/$CASE.log")" ]
    # The disk moved to NVMe and virtio: the initramfs finds vg0-root, systemd gives up on
    # /dev/sda2 (after DefaultDeviceTimeoutSec) and goes to emergency mode. bmr's fix-ups must
    # cure this.
    for log in nvme virtio; do
        CASE=debian-bios-$log; timed_boot "$CASE" bios "$log:$dir/disk.img"
        check emergency "$CASE"
    done
    echo "$pass passed, $failed failed"
    [ "$failed" = 0 ]
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case ${1:-} in
    build) make_debian_machine "${2:-$WORK/debian-lvm}" lvm ;;
    build-raid) make_debian_raid_machine "${2:-$WORK/debian-raid}" ;;
    build-xfs) make_debian_xfs_machine "${2:-$WORK/debian-xfs}" ;;
    selftest) debian_selftest ;;
    *) echo "usage: $0 selftest | build [DIR] | build-xfs [DIR] | build-raid [DIR] (or source it)"; exit 2 ;;
    esac
fi
