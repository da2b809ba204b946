#!/bin/bash
# Builds the bmr rescue system from Debian packages: a hybrid BIOS+UEFI ISO (CD and USB stick)
# and a PXE bundle, both carrying Debian's kernel and one initramfs (busybox + a static bmr).
#
#   iso-build/build.sh [--out DIR] [--append "KERNEL ARGS"] [--ca FILE]... [--bmr PATH]
#
# Downloads are cached in ${BMR_CACHE:-/var/cache/bmr-build}, never in the repository; the only
# thing written inside the repository is the output (default target/rescue/) and cargo's build.
set -euo pipefail

# Host tools: Debian package -> what must exist once it is installed.
TOOLS=(
    grub-common:/usr/bin/grub-mkrescue
    grub-pc-bin:/usr/lib/grub/i386-pc/boot_hybrid.img
    grub-efi-amd64-bin:/usr/lib/grub/x86_64-efi/linux.mod
    xorriso:/usr/bin/xorriso
    mtools:/usr/bin/mformat
    kmod:/usr/sbin/depmod
    cpio:/usr/bin/cpio
    zstd:/usr/bin/zstd
    xz-utils:/usr/bin/xz # grub-mkrescue --compress=xz
    file:/usr/bin/file
    binutils:/usr/bin/readelf # the libraries the rescue system's tools need
)
# GRUB modules the ISO's menu needs (plus their dependencies); the rest stay out to keep it small.
GRUB_MODULES="linux normal configfile echo test serial terminal search search_fs_uuid search_label iso9660 part_msdos part_gpt fat all_video gfxterm"
ISO_MAX_MB=40

PROG=build.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=iso-build/lib.sh
source "$ROOT/iso-build/lib.sh"
# shellcheck source=iso-build/debs.sh
source "$ROOT/iso-build/debs.sh"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
WARNINGS=()
warn() {
    printf '\n%s: WARNING: %s\n\n' "$PROG" "$*" >&2
    WARNINGS+=("$*")
}
usage() {
    echo "usage: $(sed -n '5s/^#  *//p' "${BASH_SOURCE[0]}")"
    exit "${1:-2}"
}

OUT=$ROOT/target/rescue
APPEND=""
CAS=()
BMR_BIN=""
while [ $# -gt 0 ]; do
    case $1 in
    --out) [ $# -ge 2 ] || usage >&2; OUT=$2; shift 2 ;;
    --append) [ $# -ge 2 ] || usage >&2; APPEND=$2; shift 2 ;;
    --ca) [ $# -ge 2 ] || usage >&2; CAS+=("$2"); shift 2 ;;
    --bmr) [ $# -ge 2 ] || usage >&2; BMR_BIN=$2; shift 2 ;;
    -h | --help) usage 0 ;;
    *) log "unknown argument: $1"; usage >&2 ;;
    esac
done
check_kargs "$APPEND"
for ca in "${CAS[@]}"; do
    if [ ! -f "$ca" ] || [ ! -r "$ca" ]; then die "--ca $ca: no such readable file"; fi
done
[ -z "$BMR_BIN" ] || [ -f "$BMR_BIN" ] || die "--bmr $BMR_BIN: no such file"
mkdir -p "$OUT" || die "cannot create the output directory $OUT"
OUT=$(cd "$OUT" && pwd)

CACHE=${BMR_CACHE:-/var/cache/bmr-build}
if ! mkdir -p "$CACHE/debs" "$CACHE/tree" 2>/dev/null || [ ! -w "$CACHE" ]; then
    die "cannot write the download cache $CACHE: run as root or set BMR_CACHE to a writable directory"
fi

# One build at a time per cache: the unpacked trees are shared.
exec 9>"$CACHE/.lock"
flock -n 9 || { log "waiting for another build using $CACHE"; flock 9; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bmr-rescue.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- host tools -----------------------------------------------------------------------------
missing=()
for t in "${TOOLS[@]}"; do
    [ -e "${t#*:}" ] || missing+=("${t%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]}: run as root or apt-get install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; die "cannot install ${missing[*]}: check the apt mirror"; }
fi

# --- Debian packages ------------------------------------------------------------------------
log "Debian packages (cache: $CACHE)"
kernel_tree
busybox_bin
tools_tree

fetch_pinned pxelinux "$SYSLINUX_VERSION" "SYSLINUX_VERSION" '^pxelinux$'
unpack "$DEB"
PXELINUX=$TREE/usr/lib/PXELINUX/pxelinux.0
fetch_pinned syslinux-common "$SYSLINUX_VERSION" "SYSLINUX_VERSION" '^syslinux-common$'
unpack "$DEB"
LDLINUX=$TREE/usr/lib/syslinux/modules/bios/ldlinux.c32
[ -f "$PXELINUX" ] || die "$PXELINUX missing from the pxelinux package"
[ -f "$LDLINUX" ] || die "$LDLINUX missing from the syslinux-common package"

# --- bmr ------------------------------------------------------------------------------------
if [ -z "$BMR_BIN" ]; then
    log "building a static bmr (cargo build --profile rescue)"
    [ ! -d "${HOME:-/root}/.cargo/bin" ] || PATH=${HOME:-/root}/.cargo/bin:$PATH
    command -v cargo >/dev/null || die "cargo not found: install Rust or pass --bmr PATH"
    # crt-static gives a static-pie that runs without any library; getrandom must not probe
    # for glibc's getrandom wrapper.
    (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"' \
        cargo build --profile rescue --target x86_64-unknown-linux-gnu --bin bmr) ||
        die "cargo build of bmr failed"
    BMR_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/x86_64-unknown-linux-gnu/rescue/bmr
fi
file -L "$BMR_BIN" | grep -Eq 'statically linked|static-pie linked' ||
    die "$BMR_BIN is not statically linked (file says: $(file -bL "$BMR_BIN" | cut -c1-80))"
BMR_VERSION=$("$BMR_BIN" --version 2>/dev/null | head -n 1) || BMR_VERSION="bmr (unknown version)"

# --- initramfs ------------------------------------------------------------------------------
log "initramfs: $BMR_VERSION, busybox, kernel $KVER modules"
R=$WORK/initramfs
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/share/udhcpc,etc/bmr/ca,etc/udhcpc,root,mnt} \
    "$R"/{proc,sys,dev,run,tmp,var,lib/modules/"$KVER"}
ln -s ../run "$R/var/run"
install -m 0755 "$BUSYBOX" "$R/bin/busybox"
while IFS= read -r applet; do
    case $applet in */*) ;; *) continue ;; esac
    [ -e "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done < <("$BUSYBOX" --list-full)
install -m 0755 "$BMR_BIN" "$R/bin/bmr"
# What bmr's fix-ups run (e2fsck and resize2fs for --grow, mtools for the ESP, xfs_growfs and
# btrfs for --grow, xfs_repair and btrfs check by hand), LVM (imaging a disk with volume groups,
# activating them after a restore) and mke2fs: from the pinned packages
# (TOOL_DEBS), with the libraries they need, found as the dynamic loader would.
T=$TOOLS_ROOT
# in_tree PATH: PATH inside the tools tree with its symlinks followed there (the packages' own
# links are absolute, and must not resolve on the build host); sets IN_TREE.
in_tree() {
    local p=$1 l n=0
    while [ -L "$T$p" ]; do
        l=$(readlink "$T$p")
        case $l in /*) p=$l ;; *) p=$(dirname "$p")/$l ;; esac
        n=$((n + 1))
        [ "$n" -lt 20 ] || die "$p: a symlink loop in the tools tree"
    done
    [ -f "$T$p" ] || return 1
    IN_TREE=$p
}
# with_libs FILE: every library FILE (in the initramfs) needs, and the dynamic loader, copied
# from the tools tree to the same place in the initramfs.
with_libs() {
    local f=$1 lib dir interp
    interp=$(readelf -l "$f" | sed -n 's/.*Requesting program interpreter: \(.*\)]$/\1/p')
    if [ -n "$interp" ] && [ ! -e "$R$interp" ]; then
        in_tree "$interp" || die "$f: its loader $interp is in none of TOOL_DEBS (iso-build/debs.sh)"
        # 0755: the kernel runs the dynamic loader itself, and only if it is executable.
        install -D -m 0755 "$T$IN_TREE" "$R$interp"
    fi
    for lib in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
        for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
            [ ! -e "$R$dir/$lib" ] || continue 2
        done
        for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
            in_tree "$dir/$lib" || continue
            install -D -m 0755 "$T$IN_TREE" "$R$dir/$lib"
            with_libs "$R$dir/$lib"
            continue 2
        done
        die "$f needs $lib, which none of TOOL_DEBS (iso-build/debs.sh) has: add its package"
    done
}
for t in /usr/sbin/e2fsck /usr/sbin/resize2fs /usr/sbin/mke2fs /usr/bin/mtools /usr/sbin/lvm /usr/sbin/dmsetup \
    /usr/sbin/xfs_repair /usr/sbin/xfs_growfs /usr/sbin/xfs_db /usr/bin/btrfs /usr/sbin/mdadm \
    /usr/sbin/cryptsetup; do
    found=
    for d in /sbin /usr/sbin /bin /usr/bin; do
        ! in_tree "$d/${t##*/}" || { found=$IN_TREE && break; }
    done
    [ -n "$found" ] || die "${t##*/} is in none of TOOL_DEBS (iso-build/debs.sh)"
    install -D -m 0755 "$T$found" "$R$t"
    with_libs "$R$t"
done
for t in mcopy mmd mdir mtype; do ln -s mtools "$R/usr/bin/$t"; done
for t in mkfs.ext4 mkfs.ext3 mkfs.ext2; do ln -s mke2fs "$R/usr/sbin/$t"; done
for t in pvs pvscan pvcreate pvdisplay pvresize vgs vgscan vgchange vgcreate vgdisplay \
    vgcfgrestore vgcfgbackup lvs lvscan lvcreate lvremove lvchange lvdisplay lvextend lvresize; do
    ln -s lvm "$R/usr/sbin/$t"
done
install -m 0644 "$T/etc/mke2fs.conf" "$R/etc/mke2fs.conf"
# What went in, for `cat /etc/bmr/packages` on a rescue system in front of you.
printf '%s\n' "${KROOT##*/}" "$(basename "$(dirname "$(dirname "$BUSYBOX")")")" "${TOOLS_PINS[@]}" |
    sed 's/%3a/:/g' >"$R/etc/bmr/packages"
install -D -m 0644 "$ROOT/initramfs/lvm.conf" "$R/etc/lvm/lvm.conf"
# Busybox's cut-down applets of the same names (mke2fs, mkfs.ext2, ...) must not shadow the real
# tools: drop their links, and, as this busybox's shell runs its own applets before searching
# PATH, alias the names in the login shell's profile (written below).
SHADOWED=
for t in "$R"/usr/sbin/* "$R"/usr/bin/*; do
    [ "$(readlink "$t")" != /bin/busybox ] || continue
    n=${t##*/}
    for d in bin sbin usr/bin usr/sbin; do
        [ "$R/$d/$n" = "$t" ] || [ "$(readlink "$R/$d/$n" 2>/dev/null)" != /bin/busybox ] || rm -f "$R/$d/$n"
    done
    ! "$BUSYBOX" --list | grep -qx "$n" || SHADOWED="$SHADOWED
alias $n=${t#"$R"}"
done
# mtools converts FAT names through iconv (code page 850): glibc loads that from gconv.
GCONV=/usr/lib/x86_64-linux-gnu/gconv
mkdir -p "$R$GCONV"
cp -r "$T$GCONV"/gconv-modules "$T$GCONV"/gconv-modules.d "$T$GCONV"/gconv-modules.cache \
    "$T$GCONV"/IBM850.so "$T$GCONV"/IBM437.so "$R$GCONV/" || die "libc6's gconv modules are missing"
ln -sf /usr/sbin/e2fsck "$R/sbin/fsck.ext4"
install -m 0755 "$ROOT/initramfs/init" "$R/init"
install -m 0755 "$ROOT/initramfs/udhcpc.script" "$R/etc/udhcpc/default.script"
ln -s /etc/udhcpc/default.script "$R/usr/share/udhcpc/default.script"
for ca in "${CAS[@]}"; do install -m 0644 "$ca" "$R/etc/bmr/ca/"; done
# The kernel opens /dev/console before init runs; mknod needs root (init copes without it).
[ "$(id -u)" != 0 ] || mknod -m 0600 "$R/dev/console" c 5 1

# Modules: the list plus everything they depend on, laid out as in the kernel package.
MODDIR=lib/modules/$KVER
: >"$R/etc/bmr/modules"
while read -r m flag _; do
    case $m in '' | '#'*) continue ;; esac
    case ${flag:-} in '' | hw | optional) ;; *) die "initramfs/modules.list: $m: unknown word '$flag'" ;; esac
    if ! deps=$(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>/dev/null); then
        [ "${flag:-}" = optional ] || die "module $m (initramfs/modules.list) is not in kernel $KVER"
        log "optional module $m is not in kernel $KVER: left out"
        continue
    fi
    [ "${flag:-}" = hw ] || echo "$m" >>"$R/etc/bmr/modules"
    while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        rel=${path#"$KROOT"/}
        rel=${rel#./}
        [ -f "$R/$rel" ] && continue
        mkdir -p "$R/$(dirname "$rel")"
        cp "$KROOT/$rel" "$R/$rel"
    done <<<"$deps"
done <"$ROOT/initramfs/modules.list"
cp "$KROOT/$MODDIR"/modules.{order,builtin,builtin.modinfo} "$R/$MODDIR/"
depmod -b "$R" "$KVER" || die "depmod failed in the initramfs tree"

cat >"$R/etc/mdev.conf" <<'EOF'
# Device nodes come from devtmpfs; mdev only loads drivers for devices that appear later.
-$MODALIAS=.* 0:0 0660 ! @modprobe -q "$MODALIAS"
.* 0:0 0660 !
EOF
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\ntty:x:5:\ndisk:x:6:\n' >"$R/etc/group"
printf '127.0.0.1\tlocalhost bmr-rescue\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
printf 'hosts: files dns\n' >"$R/etc/nsswitch.conf"
printf 'bmr-rescue\n' >"$R/etc/hostname"
cat >"$R/etc/os-release" <<EOF
NAME="bmr rescue"
ID=bmr-rescue
PRETTY_NAME="bmr rescue ($BMR_VERSION, Linux $KVER)"
VERSION="$BMR_VERSION"
EOF
cat >"$R/etc/profile" <<'EOF'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
PS1='bmr-rescue:\w# '
EOF
echo "$SHADOWED" >>"$R/etc/profile"

# newc cpio, zstd -19: the kernel unpacks it fast and it keeps the PXE download and the ISO
# small. With fixed timestamps the archive depends only on its contents, so an unchanged one is
# taken from the cache instead of being compressed again (most of a re-build's time).
find "$R" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} +
(cd "$R" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc -R 0:0 --reproducible --quiet) >"$WORK/initramfs.cpio" ||
    die "cannot pack the initramfs"
mkdir -p "$CACHE/initramfs"
INITRD=$CACHE/initramfs/$(sha256sum <"$WORK/initramfs.cpio" | cut -c1-16).img
if [ ! -s "$INITRD" ]; then
    zstd -q -19 -T0 <"$WORK/initramfs.cpio" >"$INITRD.tmp" || die "cannot compress the initramfs"
    mv "$INITRD.tmp" "$INITRD"
    # Keep only the newest few.
    find "$CACHE/initramfs" -name '*.img' -printf '%T@ %p\n' | sort -rn | tail -n +4 |
        cut -d' ' -f2- | xargs -r rm -f
fi

# --- ISO ------------------------------------------------------------------------------------
log "ISO: grub-mkrescue (BIOS + UEFI, CD + USB)"
I=$WORK/iso
mkdir -p "$I/boot/grub" "$I/bmr/ca"
cp "$VMLINUZ" "$I/boot/vmlinuz"
cp "$INITRD" "$I/boot/initramfs.img"
grub_cfg_padded "$APPEND" >"$I/boot/grub/grub.cfg"
for ca in "${CAS[@]}"; do install -m 0644 "$ca" "$I/bmr/ca/"; done
grub-mkrescue -o "$WORK/bmr-rescue.iso" --compress=xz --fonts= --locales= --themes= \
    --install-modules="$GRUB_MODULES" "$I" -- -volid "$VOLID" >"$WORK/mkrescue.log" 2>&1 ||
    { cat "$WORK/mkrescue.log" >&2; die "grub-mkrescue failed"; }
iso_mb=$(( ($(stat -c %s "$WORK/bmr-rescue.iso") + 1048575) / 1048576 ))
[ "$iso_mb" -le "$ISO_MAX_MB" ] ||
    die "the ISO is $iso_mb MB, over the $ISO_MAX_MB MB limit (modules.list or GRUB_MODULES grew?)"
mv "$WORK/bmr-rescue.iso" "$OUT/bmr-rescue.iso"

# --- PXE ------------------------------------------------------------------------------------
log "PXE bundle"
P=$WORK/pxe
mkdir -p "$P/pxelinux.cfg"
cp "$VMLINUZ" "$P/vmlinuz"
cp "$INITRD" "$P/initramfs.img"
ipxe_script "$APPEND" >"$P/boot.ipxe"
pxelinux_cfg "$APPEND" >"$P/pxelinux.cfg/default"
grub_netboot_cfg "$APPEND" >"$P/grub-netboot.cfg"
cp "$PXELINUX" "$LDLINUX" "$P/"
rm -rf "$OUT/pxe"
mv "$P" "$OUT/pxe"

(cd "$OUT" && sha256sum bmr-rescue.iso pxe/vmlinuz pxe/initramfs.img pxe/boot.ipxe \
    pxe/pxelinux.0 pxe/ldlinux.c32 pxe/pxelinux.cfg/default pxe/grub-netboot.cfg) >"$OUT/SHA256SUMS"

# Repeated at the end: cargo's output would have scrolled them away.
for w in ${WARNINGS[@]+"${WARNINGS[@]}"}; do printf '%s: WARNING: %s\n' "$PROG" "$w" >&2; done
size() { numfmt --to=iec-i --suffix=B "$(stat -c %s "$1")"; }
log "done: kernel $KVER, $BMR_VERSION${APPEND:+, extra kernel arguments: $APPEND}"
printf '%s\n' \
    "$OUT/bmr-rescue.iso ($(size "$OUT/bmr-rescue.iso"))" \
    "$OUT/pxe/ (vmlinuz $(size "$OUT/pxe/vmlinuz"), initramfs.img $(size "$OUT/pxe/initramfs.img"))" \
    "$OUT/SHA256SUMS"
