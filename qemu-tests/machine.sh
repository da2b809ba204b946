#!/bin/bash
# The drills' source machine: a small Linux that really boots, built from Debian packages (the
# rescue system's pinned kernel and busybox) without mounting anything, so a drill can prove a
# restored disk boots with the right files. Sourced by qemu-tests/drill.sh; run alone for a
# self-test:
#
#   qemu-tests/machine.sh selftest [ext4|xfs|btrfs]   (xfs, btrfs: the GPT machine only)
#
#   make_machine DIR gpt|mbr [busybox|grub] [ext4|xfs|btrfs]
#       DIR/disk.img + DIR/tree (its root) + DIR/info
#       busybox (256 MiB): kernel, busybox, the reporting init. grub (640 MiB): the same on a
#       Debian minbase root with GRUB's tools (grub-install, grub-mkconfig), for
#       --reinstall-bootloader.
#       gpt: 1 BIOS boot partition, 2 ESP (FAT32, GRUB at EFI/debian/grubx64.efi only: a new
#            machine's empty NVRAM finds nothing until bmr's fix-ups add EFI/BOOT/BOOTX64.EFI),
#            3 root. mbr: 1 root, GRUB's core.img in the gap after the MBR.
#       The root is ext4 (the default, built without mounting), xfs (the busybox disk grows to
#       400 MiB: mkfs.xfs refuses less than 300 MiB) or btrfs with the system in subvolume @
#       (rootflags=subvol=@; GRUB reads the top level, so its paths start with /@) and /home in
#       subvolume @home, mounted through fstab. xfs and btrfs are made on a loop device over the
#       partition, mounted on the host to be filled, and cleanly unmounted.
#       Like an old install, /etc/fstab and the kernel's root= name /dev/sdaN: on any other bus
#       the disk only boots once bmr has rewritten them to UUID=.
#   boot_disk NAME bios|uefi BUS:FILE...   boot it (uefi: a fresh copy of OVMF_VARS, or of
#       $VARS: the NVRAM of a machine that ran before)
#   machine_report LOG / expected_report TREE   what it printed / what it must print
#
# Its init prints `BMR-MACHINE: up HOST`, `BMR-MACHINE: fstab ok` (every fstab entry mounted)
# or `fstab failed ...`, one `BMR-FILE: SHA256 PATH` per file under /data (PATH relative to it),
# then one `BMR-FILE: SHA256 /home/PATH` per file under /home (btrfs: subvolume @home), `BMR-MACHINE:
# end N files`, and powers off.
# shellcheck source=qemu-tests/lib.sh
[ -n "${ROOT:-}" ] || source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=iso-build/debs.sh
source "$ROOT/iso-build/debs.sh"
warn() { log "WARNING: $*"; }
CACHE=${BMR_CACHE:-/var/cache/bmr-build}
mkdir -p "$CACHE/debs" "$CACHE/tree"

MACHINE_HOST=drill-source
MACHINE_KARGS="console=tty0 console=ttyS0,115200n8 panic=-1 loglevel=4"
# The grub flavour's Debian root: minbase plus GRUB's tools, made once by debootstrap and kept
# in the download cache.
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${BMR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_PKGS=grub-pc-bin,grub-efi-amd64-bin,grub2-common
# Fixed identities: the same inputs give the same disk.
ROOT_UUID=6d1f5a2e-0c3b-4d8e-9a71-2b5c8e4f3a10
ESP_ID=B3E1A7C2
DISK_GUID=8B3C2F10-5E4D-4A7B-9C6E-1F2A3B4C5D6E
# crc32c is only a soft dependency of ext4: name it.
MODULES="virtio_pci virtio_blk ahci sd_mod nvme crc32c_generic ext4 vfat nls_cp437 nls_ascii"
# The btrfs machine's second subvolume, mounted at /home through fstab.
HOME_SUBVOL=@home
GRUB_COMMON="part_gpt part_msdos ext2 search search_fs_uuid normal linux configfile echo test serial terminal"

# grub_defaults FILE KARGS: a Debian /etc/default/grub for a machine on the serial console.
grub_defaults() {
    cat >"$1" <<EOF
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="$2"
GRUB_DISABLE_RECOVERY=true
GRUB_DISABLE_OS_PROBER=true
EOF
}

# debian_root: the cached Debian tree (debootstrap on first use); prints its path.
debian_root() {
    local key dir
    key=$(echo "$DEBIAN_SUITE $DEBIAN_MIRROR $DEBIAN_PKGS" | sha256sum | cut -c1-12)
    dir=$CACHE/debian-$key
    if [ ! -f "$dir/.done" ]; then
        command -v debootstrap >/dev/null ||
            die "the grub machine needs debootstrap: apt-get install debootstrap"
        rm -rf "${dir:?}"
        log "debootstrap $DEBIAN_SUITE (minbase + $DEBIAN_PKGS) into $dir"
        debootstrap --variant=minbase --include="$DEBIAN_PKGS" "$DEBIAN_SUITE" "$dir" \
            "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
            die "debootstrap failed (log: $CACHE/debootstrap.log)"
        rm -f "$dir"/var/cache/apt/archives/*.deb
        touch "$dir/.done"
    fi
    echo "$dir"
}

# The machine's initramfs: find root= (a device path or UUID=), mount it with rootfstype= (ext4
# when not given) and rootflags= as the kernel would, switch to it. ROOTFS: the root's driver
# (with its dependencies) goes in besides the always-loaded MODULES.
machine_initrd() {
    local out=$1 r=$2/initrd rootfs=$3
    rm -rf "${r:?}" && mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,newroot,etc,lib/modules}
    install -m 0755 "$BUSYBOX" "$r/bin/busybox"
    local m kind path rel modules=$MODULES
    [ "$rootfs" = ext4 ] || modules="$modules $rootfs"
    for m in $modules; do
        while read -r kind path _; do
            [ "$kind" = insmod ] || continue
            rel=${path#"$KROOT"/}
            mkdir -p "$r/$(dirname "$rel")"
            cp -n "$KROOT/$rel" "$r/$rel"
        done < <(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m")
    done
    cp "$KROOT/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$r/lib/modules/$KVER/"
    depmod -b "$r" "$KVER"
    echo "$modules" >"$r/etc/modules"
    cat >"$r/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe -a $(cat /etc/modules)
fstype=ext4 flags=
for a in $(cat /proc/cmdline); do
    case $a in
    root=*) root=${a#root=} ;;
    rootfstype=*) fstype=${a#rootfstype=} ;;
    rootflags=*) flags=,${a#rootflags=} ;;
    esac
done
dev=
for _ in $(seq 30); do
    case $root in
    UUID=* | LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
    *) [ -b "$root" ] && dev=$root ;;
    esac
    [ -n "$dev" ] && break
    sleep 1
done
if [ -z "$dev" ] || ! mount -o "ro$flags" -t "$fstype" "$dev" /newroot; then
    echo "BMR-MACHINE: root $root not found"
    poweroff -f
fi
exec switch_root /newroot /sbin/init
EOF
    chmod 0755 "$r/init"
    (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) |
        gzip -n -9 >"$out"
}

# What the kernel needs besides root= to mount a root of type ROOTFS (the ext4 default needs
# nothing, and its machine's menu stays as it always was).
root_kargs() {
    case $1 in
    ext4) ;;
    xfs) printf ' rootfstype=xfs' ;;
    btrfs) printf ' rootfstype=btrfs rootflags=subvol=@' ;;
    esac
}

# Where GRUB finds /boot on a root of type ROOTFS: GRUB reads a btrfs at its top level, where
# the system is the directory @.
grub_boot_dir() { if [ "$1" = btrfs ]; then echo /@/boot; else echo /boot; fi; }

# The root filesystem's tree: busybox, the reporting init, fstab, GRUB's menu, kernel, /data
# (btrfs: and /home, which goes into subvolume @home).
machine_tree() {
    local t=$1 layout=$2 rootdev=$3 flavour=$4 rootfs=$5
    local boot kargs
    boot=$(grub_boot_dir "$rootfs")
    kargs="$(root_kargs "$rootfs") ro $MACHINE_KARGS"
    rm -rf "${t:?}" && mkdir -p "$t"
    # The grub flavour is a Debian system (minbase with GRUB's tools), so that bmr's
    # --reinstall-bootloader has a real grub-install and grub-mkconfig to run.
    [ "$flavour" = busybox ] || cp -a "$(debian_root)/." "$t/"
    mkdir -p "$t"/{bin,sbin,etc/default,proc,sys,dev,run,boot/grub,boot/efi,data/sub,tmp,usr/local/bb}
    # The init's tools: busybox's applets, kept apart from the distribution's own.
    install -m 0755 "$BUSYBOX" "$t/bin/busybox"
    local applet
    while IFS= read -r applet; do
        ln -sf /bin/busybox "$t/usr/local/bb/${applet##*/}"
    done < <("$BUSYBOX" --list-full)
    rm -f "$t/sbin/init"
    cat >"$t/sbin/init" <<'EOF'
#!/bin/busybox sh
export PATH=/usr/local/bb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "BMR-MACHINE: up $(cat /etc/hostname)"
bad=
while read -r dev mnt type opts _; do
    case $dev in '' | '#'*) continue ;; esac
    case $dev in
    UUID=* | LABEL=*) d=$(findfs "$dev" 2>/dev/null) ;;
    *) d=$dev ;;
    esac
    if [ -z "$d" ] || [ ! -b "$d" ]; then
        bad="$bad $dev"
    elif [ "$mnt" != / ] && ! mount -o "ro${opts:+,$opts}" -t "$type" "$d" "$mnt"; then
        bad="$bad $dev"
    fi
done </etc/fstab
if [ -z "$bad" ]; then echo "BMR-MACHINE: fstab ok"; else echo "BMR-MACHINE: fstab failed$bad"; fi
cd /data && find . -type f | LC_ALL=C sort | while read -r f; do
    echo "BMR-FILE: $(sha256sum <"$f" | cut -d' ' -f1) ${f#./}"
done
if [ -d /home ]; then
    cd /home && find . -type f | LC_ALL=C sort | while read -r f; do
        echo "BMR-FILE: $(sha256sum <"$f" | cut -d' ' -f1) /home/${f#./}"
    done
fi
echo "BMR-MACHINE: end $(find /data /home -type f 2>/dev/null | wc -l) files"
poweroff -f
EOF
    chmod 0755 "$t/sbin/init"
    echo "$MACHINE_HOST" >"$t/etc/hostname"
    {
        printf '# <file system> <mount point> <type> <options> <dump> <pass>\n'
        case $rootfs in
        ext4) printf '%s / ext4 errors=remount-ro 0 1\n' "$rootdev" ;;
        xfs) printf '%s / xfs defaults 0 0\n' "$rootdev" ;;
        btrfs) printf '%s / btrfs subvol=@ 0 0\n%s /home btrfs subvol=%s 0 0\n' \
            "$rootdev" "$rootdev" "$HOME_SUBVOL" ;;
        esac
        [ "$layout" != gpt ] || printf '/dev/sda2 /boot/efi vfat umask=0077 0 1\n'
    } >"$t/etc/fstab"
    cat >"$t/boot/grub/grub.cfg" <<EOF
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry '$MACHINE_HOST' {
	linux $boot/vmlinuz-$KVER root=$rootdev$kargs
	initrd $boot/initrd.img-$KVER
}
EOF
    # What grub-mkconfig reads (the kernel and initrd carry Debian's names, which it looks for).
    grub_defaults "$t/etc/default/grub" "$MACHINE_KARGS$(root_kargs "$rootfs")"
    cp "$VMLINUZ" "$t/boot/vmlinuz-$KVER"
    echo "created with the machine" >"$t/data/readme.txt"
    echo "one level down" >"$t/data/sub/nested.txt"
    if [ "$rootfs" = btrfs ]; then
        mkdir -p "$t/home/drill"
        echo "the drill user's profile, created with the machine" >"$t/home/drill/profile"
    fi
}

# grub-mkimage for FORMAT with an early config that finds the root filesystem by UUID and
# reads its menu from BOOT/grub (BOOT: /boot, or /@/boot on btrfs). MODULES: the root
# filesystem's driver and the firmware's extras.
grub_image() {
    local format=$1 out=$2 dir=$3 boot=$4
    shift 4
    # shellcheck disable=SC2016 # $root and $prefix are GRUB's
    printf 'search --no-floppy --fs-uuid --set=root %s\nset prefix=($root)%s/grub\nconfigfile $prefix/grub.cfg\n' \
        "$ROOT_UUID" "$boot" >"$dir/early.cfg"
    # shellcheck disable=SC2086 # one module per word
    grub-mkimage -O "$format" -p "$boot/grub" -c "$dir/early.cfg" -o "$out" $GRUB_COMMON "$@"
}

# root_fs ROOTFS DEV TREE [LABEL]: make an xfs or btrfs on DEV (a loop device over the root
# partition; its UUID is $ROOT_UUID, its label LABEL, default root) and copy TREE in, on a host mount that is cleanly unmounted, so the image holds a clean log
# (xfs) or a committed transaction (btrfs). btrfs: TREE minus /home into subvolume @, TREE/home
# into @home (the top level holds nothing else, as an installer leaves it).
root_fs() {
    local rootfs=$1 dev=$2 tree=$3 label=${4:-root} mnt rc=0
    mnt=$(mktemp -d)
    case $rootfs in
    xfs)
        mkfs.xfs -q -m uuid="$ROOT_UUID" -L "$label" "$dev" &&
            mount -t xfs "$dev" "$mnt" &&
            { cp -a "$tree/." "$mnt/" || rc=1; umount "$mnt" || rc=1; [ $rc = 0 ]; }
        ;;
    btrfs)
        mkfs.btrfs -q -U "$ROOT_UUID" -L "$label" "$dev" &&
            mount -t btrfs -o subvolid=5 "$dev" "$mnt" &&
            {
                { btrfs -q subvolume create "$mnt/@" && btrfs -q subvolume create "$mnt/$HOME_SUBVOL" &&
                    tar -C "$tree" --exclude=./home -cf - . | tar -C "$mnt/@" -xpf - &&
                    mkdir -m 0755 "$mnt/@/home" && cp -a "$tree/home/." "$mnt/$HOME_SUBVOL/"; } || rc=1
                umount "$mnt" || rc=1
                # The host's btrfs keeps a registered device per filesystem UUID; a stale one
                # (its loop device gone) would stand in the way of the drill's next mounts.
                btrfs device scan --forget "$dev" 2>/dev/null || true
                [ $rc = 0 ]
            }
        ;;
    esac || rc=1
    rmdir "$mnt"
    return $rc
}

# What grub-bios-setup does, for a disk image: boot.img's code into the MBR (the table stays)
# pointing at core.img, written at SECTOR, whose own block list then points one further.
install_grub_bios() {
    local disk=$1 core=$2 sector=$3
    dd if=/usr/lib/grub/i386-pc/boot.img of="$disk" bs=440 count=1 conv=notrunc status=none
    le64() { printf "%016x" "$1" | sed 's/../& /g' | awk '{for (i = 8; i >= 1; i--) printf "\\x%s", $i}'; }
    # shellcheck disable=SC2059 # the format is the escaped bytes
    printf "$(le64 "$sector")" | dd of="$disk" bs=1 seek=$((0x5c)) conv=notrunc status=none
    dd if="$core" of="$disk" bs=512 seek="$sector" conv=notrunc status=none
    # shellcheck disable=SC2059
    printf "$(le64 $((sector + 1)))" |
        dd of="$disk" bs=1 seek=$((sector * 512 + 0x1f4)) conv=notrunc status=none
    local sectors
    sectors=$(( ($(stat -c %s "$core") + 511) / 512 ))
    [ "$sectors" -le 2047 ] || die "core.img has $sectors sectors: too big for the gap"
}

make_machine() {
    local dir=$1 layout=$2 flavour=${3:-busybox} rootfs=${4:-ext4}
    [ -n "$flavour" ] || flavour=busybox
    case $layout in gpt | mbr) ;; *) die "make_machine: layout gpt or mbr, not $layout" ;; esac
    case $flavour in busybox | grub) ;; *) die "make_machine: flavour busybox or grub, not $flavour" ;; esac
    case $rootfs in ext4 | xfs | btrfs) ;; *) die "make_machine: root ext4, xfs or btrfs, not $rootfs" ;; esac
    local need needs=(grub-mkimage:grub-common /usr/lib/grub/i386-pc/boot.img:grub-pc-bin
        /usr/lib/grub/x86_64-efi/linux.mod:grub-efi-amd64-bin mcopy:mtools mkfs.fat:dosfstools
        mke2fs:e2fsprogs sgdisk:gdisk sfdisk:fdisk cpio:cpio depmod:kmod)
    case $rootfs in
    xfs) needs+=(mkfs.xfs:xfsprogs losetup:mount) ;;
    btrfs) needs+=(mkfs.btrfs:btrfs-progs losetup:mount) ;;
    esac
    for need in "${needs[@]}"; do
        command -v "${need%%:*}" >/dev/null || [ -e "${need%%:*}" ] ||
            die "make_machine needs ${need%%:*}: apt-get install ${need#*:}"
    done
    kernel_tree
    busybox_bin
    rm -rf "${dir:?}" && mkdir -p "$dir"
    local disk=$dir/disk.img rootdev root_off root_part size=256M
    [ "$flavour" != grub ] || size=640M
    # mkfs.xfs 6.1 refuses a filesystem under 300 MiB: the busybox disk's root would be 190.
    [ "$rootfs" != xfs ] || [ "$flavour" = grub ] || size=400M
    truncate -s "$size" "$disk"
    if [ "$layout" = gpt ]; then
        sgdisk -U "$DISK_GUID" \
            -n 1:2048:+1M -t 1:ef02 -c 1:bios -u 1:1B1A1B1A-0000-4000-8000-000000000001 \
            -n 2:0:+64M -t 2:ef00 -c 2:esp -u 2:1B1A1B1A-0000-4000-8000-000000000002 \
            -n 3:0:0 -t 3:8300 -c 3:root -u 3:1B1A1B1A-0000-4000-8000-000000000003 "$disk" >/dev/null
        rootdev=/dev/sda3 root_part=3
    else
        echo 'label: dos
label-id: 0x0b3c2f10
start=2048, type=83, bootable' | sfdisk -q "$disk"
        rootdev=/dev/sda1 root_part=1
    fi
    local start size
    read -r start size < <(sfdisk -J "$disk" | python3 -c "import json,sys; p=json.load(sys.stdin)['partitiontable']['partitions'][$root_part - 1]; print(p['start'], p['size'])")
    root_off=$((start * 512))
    local root_size=$((size * 512))

    machine_tree "$dir/tree" "$layout" "$rootdev" "$flavour" "$rootfs"
    machine_initrd "$dir/tree/boot/initrd.img-$KVER" "$dir" "$rootfs"
    if [ "$rootfs" = ext4 ]; then
        E2FSPROGS_FAKE_TIME=${SOURCE_DATE_EPOCH:-1700000000} mke2fs -q -t ext4 -L root -U "$ROOT_UUID" \
            -E "offset=$root_off,root_owner=0:0" -d "$dir/tree" "$disk" "$((root_size / 1024))k"
    else
        local loopdev rc=0
        loopdev=$(losetup -f --show -o "$root_off" --sizelimit "$root_size" "$disk") ||
            die "cannot set up a loop device over the root partition of $disk"
        root_fs "$rootfs" "$loopdev" "$dir/tree" || rc=1
        losetup -d "$loopdev"
        [ $rc = 0 ] || die "cannot make the $rootfs root of $disk"
    fi

    # GRUB's driver for the root filesystem (ext2, in GRUB_COMMON, reads ext4).
    local boot grubfs=
    boot=$(grub_boot_dir "$rootfs")
    [ "$rootfs" = ext4 ] || grubfs=$rootfs
    grub_image i386-pc "$dir/core.img" "$dir" "$boot" biosdisk ${grubfs:+"$grubfs"}
    if [ "$layout" = gpt ]; then
        install_grub_bios "$disk" "$dir/core.img" 2048
        local esp=$dir/esp.img
        rm -f "$esp"
        mkfs.fat -F 32 -n ESP -i "$ESP_ID" -C "$esp" $((64 * 1024)) >/dev/null
        grub_image x86_64-efi "$dir/grubx64.efi" "$dir" "$boot" fat all_video ${grubfs:+"$grubfs"}
        echo "ESP of $MACHINE_HOST" >"$dir/marker.txt"
        mmd -i "$esp" ::/EFI ::/EFI/debian
        mcopy -i "$esp" "$dir/grubx64.efi" ::/EFI/debian/grubx64.efi
        mcopy -i "$esp" "$dir/marker.txt" ::/EFI/debian/marker.txt
        dd if="$esp" of="$disk" bs=1M seek=2 conv=notrunc status=none
        rm -f "$esp"
    else
        install_grub_bios "$disk" "$dir/core.img" 1
    fi
    cat >"$dir/info" <<EOF
LAYOUT=$layout
ROOT_PART=$root_part
ROOT_OFFSET=$root_off
ROOT_SIZE=$root_size
ROOT_UUID=$ROOT_UUID
ROOT_FS=$rootfs
EOF
}

# boot_disk NAME bios|uefi BUS:FILE...: boot a disk as a machine would; serial log $WORK/NAME.log.
boot_disk() {
    local name=$1 fw=$2
    shift 2
    local d=$WORK/$name
    rm -rf "$d" && mkdir -p "$d"
    local args=(-accel tcg -m 512 -smp 1 -no-reboot -display none -monitor none -nic none
                -serial "file:$WORK/$name.log")
    [ "$fw" = bios ] || firmware_args args "$d" "${VARS:-}"
    disk_args args "$@"
    timeout "${MACHINE_TIMEOUT:-300}" qemu-system-x86_64 "${args[@]}" </dev/null >"$d/qemu.out" 2>&1 || true
}

machine_report() { tr -d '\r' <"$1" | grep -a -E '^(BMR-MACHINE|BMR-FILE): ' || true; }

expected_report() {
    local tree=$1 f n
    echo "BMR-MACHINE: up $MACHINE_HOST"
    echo "BMR-MACHINE: fstab ok"
    n=0
    while IFS= read -r f; do
        echo "BMR-FILE: $(sha256sum <"$tree/data/$f" | cut -d' ' -f1) $f"
        n=$((n + 1))
    done < <(cd "$tree/data" && find . -type f | LC_ALL=C sort | sed 's|^\./||')
    if [ -d "$tree/home" ]; then
        while IFS= read -r f; do
            echo "BMR-FILE: $(sha256sum <"$tree/home/$f" | cut -d' ' -f1) /home/$f"
            n=$((n + 1))
        done < <(cd "$tree/home" && find . -type f | LC_ALL=C sort | sed 's|^\./||')
    fi
    echo "BMR-MACHINE: end $n files"
}

selftest() {
    local rootfs=${1:-ext4} pass=0 failed=0 dir layouts=(gpt mbr) g
    check() {
        if "$@"; then pass=$((pass + 1)); echo "PASS ${CASE}"; else failed=$((failed + 1)); echo "FAIL ${CASE}"; fi
    }
    same() { diff <(expected_report "$1") <(machine_report "$WORK/$2.log") >&2; }
    mkdir -p "$WORK"
    # The xfs and btrfs roots are drilled on GPT only; their MBR machines differ in nothing else.
    [ "$rootfs" = ext4 ] || layouts=(gpt)
    # The ext4 machines keep their old names (and logs), the others carry their root's.
    local sfx=${rootfs#ext4}
    sfx=${sfx:+-$sfx}
    for l in "${layouts[@]}"; do
        dir=$WORK/machine-$l$sfx
        local t0=$SECONDS
        make_machine "$dir" "$l" busybox "$rootfs"
        log "built $l ($rootfs root) in $((SECONDS - t0)) s"
    done
    g=$WORK/machine-gpt$sfx
    CASE=gpt$sfx-bios-sata; boot_disk "machine-$CASE" bios "sata:$g/disk.img"
    check same "$g/tree" "machine-$CASE"
    if [ "$rootfs" = ext4 ]; then
        CASE=mbr-bios-sata; boot_disk "machine-$CASE" bios "sata:$WORK/machine-mbr/disk.img"
        check same "$WORK/machine-mbr/tree" "machine-$CASE"
    fi
    # Under OVMF with an empty NVRAM only the removable path boots: add it to a copy.
    cp "$g/disk.img" "$g/fallback.img"
    mmd -i "$g/fallback.img@@$((2 * 1048576))" ::/EFI/BOOT
    mcopy -i "$g/fallback.img@@$((2 * 1048576))" "$g/grubx64.efi" ::/EFI/BOOT/BOOTX64.EFI
    CASE=gpt$sfx-uefi-fallback; boot_disk "machine-$CASE" uefi "sata:$g/fallback.img"
    check same "$g/tree" "machine-$CASE"
    # The failures bmr's fix-ups repair (an empty NVRAM without the fallback loader is the same
    # for every root: ext4 only).
    if [ "$rootfs" = ext4 ]; then
        CASE=gpt-uefi-no-fallback; MACHINE_TIMEOUT=90 boot_disk "machine-$CASE" uefi "sata:$g/disk.img"
        check [ -z "$(machine_report "$WORK/machine-$CASE.log")" ]
    fi
    CASE=gpt$sfx-bios-virtio; boot_disk "machine-$CASE" bios "virtio:$g/disk.img"
    check grep -q "BMR-MACHINE: root /dev/sda3 not found" "$WORK/machine-$CASE.log"
    echo "$pass passed, $failed failed"
    [ "$failed" = 0 ]
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case ${1:-} in
    selftest) selftest "${2:-ext4}" ;;
    *) echo "usage: $0 selftest [ext4|xfs|btrfs] (or source it)"; exit 2 ;;
    esac
fi
