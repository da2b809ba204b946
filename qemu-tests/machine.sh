#!/bin/bash
# The drills' source machine: a small Linux that really boots, built from Debian packages (the
# rescue system's pinned kernel and busybox) without mounting anything, so a drill can prove a
# restored disk boots with the right files. Sourced by qemu-tests/drill.sh; run alone for a
# self-test:
#
#   qemu-tests/machine.sh selftest
#
#   make_machine DIR gpt|mbr [busybox|grub]   DIR/disk.img + DIR/tree (its root) + DIR/info
#       busybox (256 MiB): kernel, busybox, the reporting init. grub (640 MiB): the same on a
#       Debian minbase root with GRUB's tools (grub-install, grub-mkconfig), for
#       --reinstall-bootloader.
#       gpt: 1 BIOS boot partition, 2 ESP (FAT32, GRUB at EFI/debian/grubx64.efi only: a new
#            machine's empty NVRAM finds nothing until bmr's fix-ups add EFI/BOOT/BOOTX64.EFI),
#            3 ext4 root. mbr: 1 ext4 root, GRUB's core.img in the gap after the MBR.
#       Like an old install, /etc/fstab and the kernel's root= name /dev/sdaN: on any other bus
#       the disk only boots once bmr has rewritten them to UUID=.
#   boot_disk NAME bios|uefi BUS:FILE...   boot it (uefi: a fresh copy of OVMF_VARS, or of
#       $VARS: the NVRAM of a machine that ran before)
#   machine_report LOG / expected_report TREE   what it printed / what it must print
#
# Its init prints `BMR-MACHINE: up HOST`, `BMR-MACHINE: fstab ok` (every fstab entry mounted)
# or `fstab failed ...`, one `BMR-FILE: SHA256 PATH` per file under /data, `BMR-MACHINE: end N
# files`, and powers off.
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
GRUB_COMMON="part_gpt part_msdos ext2 search search_fs_uuid normal linux configfile echo test serial terminal"

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

# The machine's initramfs: find root= (a device path or UUID=), mount it, switch to it.
machine_initrd() {
    local out=$1 r=$2/initrd
    rm -rf "${r:?}" && mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,newroot,etc,lib/modules}
    install -m 0755 "$BUSYBOX" "$r/bin/busybox"
    local m kind path rel
    for m in $MODULES; do
        while read -r kind path _; do
            [ "$kind" = insmod ] || continue
            rel=${path#"$KROOT"/}
            mkdir -p "$r/$(dirname "$rel")"
            cp -n "$KROOT/$rel" "$r/$rel"
        done < <(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m")
    done
    cp "$KROOT/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$r/lib/modules/$KVER/"
    depmod -b "$r" "$KVER"
    echo "$MODULES" >"$r/etc/modules"
    cat >"$r/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe -a $(cat /etc/modules)
for a in $(cat /proc/cmdline); do case $a in root=*) root=${a#root=} ;; esac; done
dev=
for _ in $(seq 30); do
    case $root in
    UUID=* | LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
    *) [ -b "$root" ] && dev=$root ;;
    esac
    [ -n "$dev" ] && break
    sleep 1
done
if [ -z "$dev" ] || ! mount -o ro -t ext4 "$dev" /newroot; then
    echo "BMR-MACHINE: root $root not found"
    poweroff -f
fi
exec switch_root /newroot /sbin/init
EOF
    chmod 0755 "$r/init"
    (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) |
        gzip -n -9 >"$out"
}

# The root filesystem's tree: busybox, the reporting init, fstab, GRUB's menu, kernel, /data.
machine_tree() {
    local t=$1 layout=$2 rootdev=$3 flavour=$4
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
while read -r dev mnt type _; do
    case $dev in '' | '#'*) continue ;; esac
    case $dev in
    UUID=* | LABEL=*) d=$(findfs "$dev" 2>/dev/null) ;;
    *) d=$dev ;;
    esac
    if [ -z "$d" ] || [ ! -b "$d" ]; then
        bad="$bad $dev"
    elif [ "$mnt" != / ] && ! mount -o ro -t "$type" "$d" "$mnt"; then
        bad="$bad $dev"
    fi
done </etc/fstab
if [ -z "$bad" ]; then echo "BMR-MACHINE: fstab ok"; else echo "BMR-MACHINE: fstab failed$bad"; fi
cd /data && find . -type f | LC_ALL=C sort | while read -r f; do
    echo "BMR-FILE: $(sha256sum <"$f" | cut -d' ' -f1) ${f#./}"
done
echo "BMR-MACHINE: end $(find /data -type f | wc -l) files"
poweroff -f
EOF
    chmod 0755 "$t/sbin/init"
    echo "$MACHINE_HOST" >"$t/etc/hostname"
    if [ "$layout" = gpt ]; then
        printf '# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/sda3 / ext4 errors=remount-ro 0 1\n/dev/sda2 /boot/efi vfat umask=0077 0 1\n' >"$t/etc/fstab"
    else
        printf '# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/sda1 / ext4 errors=remount-ro 0 1\n' >"$t/etc/fstab"
    fi
    cat >"$t/boot/grub/grub.cfg" <<EOF
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry '$MACHINE_HOST' {
	linux /boot/vmlinuz-$KVER root=$rootdev ro $MACHINE_KARGS
	initrd /boot/initrd.img-$KVER
}
EOF
    # What grub-mkconfig reads (the kernel and initrd carry Debian's names, which it looks for).
    cat >"$t/etc/default/grub" <<EOF
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="$MACHINE_KARGS"
GRUB_DISABLE_RECOVERY=true
GRUB_DISABLE_OS_PROBER=true
EOF
    cp "$VMLINUZ" "$t/boot/vmlinuz-$KVER"
    echo "created with the machine" >"$t/data/readme.txt"
    echo "one level down" >"$t/data/sub/nested.txt"
}

# grub-mkimage for FORMAT with an early config that finds the root filesystem by UUID.
grub_image() {
    local format=$1 out=$2 dir=$3
    shift 3
    # shellcheck disable=SC2016 # $root and $prefix are GRUB's
    printf 'search --no-floppy --fs-uuid --set=root %s\nset prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n' \
        "$ROOT_UUID" >"$dir/early.cfg"
    # shellcheck disable=SC2086 # one module per word
    grub-mkimage -O "$format" -p /boot/grub -c "$dir/early.cfg" -o "$out" $GRUB_COMMON "$@"
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
    local dir=$1 layout=$2 flavour=${3:-busybox}
    [ -n "$flavour" ] || flavour=busybox
    case $layout in gpt | mbr) ;; *) die "make_machine: layout gpt or mbr, not $layout" ;; esac
    case $flavour in busybox | grub) ;; *) die "make_machine: flavour busybox or grub, not $flavour" ;; esac
    local need
    for need in grub-mkimage:grub-common /usr/lib/grub/i386-pc/boot.img:grub-pc-bin \
        /usr/lib/grub/x86_64-efi/linux.mod:grub-efi-amd64-bin mcopy:mtools mkfs.fat:dosfstools \
        mke2fs:e2fsprogs sgdisk:gdisk sfdisk:fdisk cpio:cpio depmod:kmod; do
        command -v "${need%%:*}" >/dev/null || [ -e "${need%%:*}" ] ||
            die "make_machine needs ${need%%:*}: apt-get install ${need#*:}"
    done
    kernel_tree
    busybox_bin
    rm -rf "${dir:?}" && mkdir -p "$dir"
    local disk=$dir/disk.img rootdev root_off root_part
    truncate -s "$([ "$flavour" = grub ] && echo 640M || echo 256M)" "$disk"
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

    machine_tree "$dir/tree" "$layout" "$rootdev" "$flavour"
    machine_initrd "$dir/tree/boot/initrd.img-$KVER" "$dir"
    E2FSPROGS_FAKE_TIME=${SOURCE_DATE_EPOCH:-1700000000} mke2fs -q -t ext4 -L root -U "$ROOT_UUID" \
        -E "offset=$root_off,root_owner=0:0" -d "$dir/tree" "$disk" "$((root_size / 1024))k"

    grub_image i386-pc "$dir/core.img" "$dir" biosdisk
    if [ "$layout" = gpt ]; then
        install_grub_bios "$disk" "$dir/core.img" 2048
        local esp=$dir/esp.img
        rm -f "$esp"
        mkfs.fat -F 32 -n ESP -i "$ESP_ID" -C "$esp" $((64 * 1024)) >/dev/null
        grub_image x86_64-efi "$dir/grubx64.efi" "$dir" fat all_video
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
    echo "BMR-MACHINE: end $n files"
}

selftest() {
    local pass=0 failed=0 dir
    check() {
        if "$@"; then pass=$((pass + 1)); echo "PASS ${CASE}"; else failed=$((failed + 1)); echo "FAIL ${CASE}"; fi
    }
    same() { diff <(expected_report "$1") <(machine_report "$WORK/$2.log") >&2; }
    mkdir -p "$WORK"
    for l in gpt mbr; do
        dir=$WORK/machine-$l
        local t0=$SECONDS
        make_machine "$dir" "$l"
        log "built $l in $((SECONDS - t0)) s"
    done
    CASE=gpt-bios-sata; boot_disk machine-$CASE bios "sata:$WORK/machine-gpt/disk.img"
    check same "$WORK/machine-gpt/tree" "machine-$CASE"
    CASE=mbr-bios-sata; boot_disk machine-$CASE bios "sata:$WORK/machine-mbr/disk.img"
    check same "$WORK/machine-mbr/tree" "machine-$CASE"
    # Under OVMF with an empty NVRAM only the removable path boots: add it to a copy.
    cp "$WORK/machine-gpt/disk.img" "$WORK/machine-gpt/fallback.img"
    mmd -i "$WORK/machine-gpt/fallback.img@@$((2 * 1048576))" ::/EFI/BOOT
    mcopy -i "$WORK/machine-gpt/fallback.img@@$((2 * 1048576))" "$WORK/machine-gpt/grubx64.efi" ::/EFI/BOOT/BOOTX64.EFI
    CASE=gpt-uefi-fallback; boot_disk machine-$CASE uefi "sata:$WORK/machine-gpt/fallback.img"
    check same "$WORK/machine-gpt/tree" "machine-$CASE"
    # The failures bmr's fix-ups repair.
    CASE=gpt-uefi-no-fallback; MACHINE_TIMEOUT=90 boot_disk machine-$CASE uefi "sata:$WORK/machine-gpt/disk.img"
    check [ -z "$(machine_report "$WORK/machine-$CASE.log")" ]
    CASE=gpt-bios-virtio; boot_disk machine-$CASE bios "virtio:$WORK/machine-gpt/disk.img"
    check grep -q "BMR-MACHINE: root /dev/sda3 not found" "$WORK/machine-$CASE.log"
    echo "$pass passed, $failed failed"
    [ "$failed" = 0 ]
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case ${1:-} in
    selftest) selftest ;;
    *) echo "usage: $0 selftest (or source it)"; exit 2 ;;
    esac
fi
