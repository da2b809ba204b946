# shellcheck shell=bash disable=SC2034 # the pins are for the scripts that source this
# Debian packages for the rescue system and the drills' sample machine: the pinned versions, and
# download-once into the cache ${BMR_CACHE:-/var/cache/bmr-build}. Sourced by iso-build/build.sh
# and qemu-tests/machine.sh; the caller defines log, warn and die and sets CACHE.

# Pinned packages. When the mirror no longer has a pinned version the build warns and takes the
# newest one available of the same series: then update these.
KERNEL_PKG=linux-image-6.1.0-56-amd64
KERNEL_VERSION=6.1.192-2
KERNEL_FALLBACK='^linux-image-6\.1\.[0-9]+-[0-9]+-amd64$'
BUSYBOX_PKG=busybox-static
BUSYBOX_VERSION=1:1.35.0-4+deb12u1+b1
SYSLINUX_VERSION=3:6.04~git20190206.bf6db5b4+dfsg1-3 # pxelinux and syslinux-common
# The rescue system's tools besides busybox (e2fsck, resize2fs and mke2fs for the fix-ups, mtools
# for the ESP, lvm and dmsetup, cryptsetup, xfs_repair/xfs_growfs/xfs_db and btrfs for XFS and btrfs) and every library
# they load, glibc included: the initramfs takes them from
# these packages, never from the build host.
TOOL_DEBS=(
    e2fsprogs=1.47.0-2+b2
    libext2fs2=1.47.0-2+b2
    libcom-err2=1.47.0-2+b2
    libblkid1=2.38.1-5+deb12u3
    libuuid1=2.38.1-5+deb12u3
    mtools=4.0.33-1+really4.0.32-1
    lvm2=2.03.16-2
    mdadm=4.2-5
    cryptsetup-bin=2:2.6.1-4~deb12u2
    libcryptsetup12=2:2.6.1-4~deb12u2
    libargon2-1=0~20171227-0.3+deb12u1
    libjson-c5=0.16-2
    libssl3=3.0.22-1~deb12u2
    libpopt0=1.19+dfsg-1
    dmsetup=2:1.02.185-2
    xfsprogs=6.1.0-1
    liburcu8=0.13.2-1
    btrfs-progs=6.2-1+deb12u2
    liblzo2-2=2.10-2
    zlib1g=1:1.2.13.dfsg-1
    libdevmapper1.02.1=2:1.02.185-2
    libdevmapper-event1.02.1=2:1.02.185-2
    libaio1=0.3.113-4
    libedit2=3.1-20221030-2
    libbsd0=0.11.7-2
    libmd0=1.0.4-2
    libtinfo6=6.4-4
    libselinux1=3.4-1+b6
    libpcre2-8-0=10.42-1+deb12u2
    libudev1=252.39-1~deb12u2
    libsystemd0=252.39-1~deb12u2
    libcap2=1:2.66-4+deb12u3+b1
    libgcrypt20=1.10.1-3+deb12u1
    libgpg-error0=1.46-1
    liblz4-1=1.9.4-1
    liblzma5=5.4.1-1+deb12u2
    libzstd1=1.5.4+dfsg2-5
    libc6=2.36-9+deb12u14
)

APT_OPTS=(-qq)
[ "$(id -u)" != 0 ] || APT_OPTS+=(-o APT::Sandbox::User=root) # _apt cannot write the cache
APT_UPDATED=

# fetch PKG VERSION: the .deb in the cache (downloaded once); sets DEB.
fetch() {
    local pkg=$1 ver=$2
    DEB=$CACHE/debs/${pkg}_${ver/:/%3a}_amd64.deb
    [ -s "$DEB" ] && return 0
    local tmp
    tmp=$(mktemp -d "$CACHE/debs/.download.XXXXXX")
    if (cd "$tmp" && apt-get download "${APT_OPTS[@]}" "$pkg=$ver") >"$tmp/log" 2>&1; then
        mv "$tmp"/*.deb "$DEB"
        rm -rf "$tmp"
        return 0
    fi
    rm -rf "$tmp"
    return 1
}

# fetch_pinned PKG VERSION VARIABLES FALLBACK_REGEX: the pinned version, else (loudly) the
# newest package matching the regex. Sets DEB.
fetch_pinned() {
    local pkg=$1 ver=$2 vars=$3 regex=$4
    fetch "$pkg" "$ver" && return 0
    if [ -z "$APT_UPDATED" ] && [ "$(id -u)" = 0 ]; then
        APT_UPDATED=1
        log "cannot download $pkg=$ver: running apt-get update"
        apt-get update -qq >&2 || true
        fetch "$pkg" "$ver" && return 0
    fi
    local new newver
    new=$(apt-cache search --names-only "$regex" | awk '{print $1}' | grep -E "$regex" |
        sort -V | tail -n 1) || true
    newver=$([ -n "$new" ] && apt-cache policy "$new" | awk '/Candidate:/ {print $2}') || true
    if [ -z "$new" ] || [ -z "$newver" ] || [ "$newver" = "(none)" ]; then
        die "cannot download $pkg=$ver and found no replacement: check the apt mirror or set $vars"
    fi
    warn "$pkg=$ver is no longer on the mirror; using $new=$newver instead.
    Update $vars at the top of iso-build/debs.sh to pin it."
    fetch "$new" "$newver" ||
        die "cannot download $new=$newver: check the apt mirror or set $vars"
}

# unpack DEB: its contents, extracted once into the cache; sets TREE.
unpack() {
    TREE=$CACHE/tree/$(basename "$1" .deb)
    [ -f "$TREE/.unpacked" ] && return 0
    rm -rf "$TREE"
    mkdir -p "$TREE"
    dpkg-deb -x "$1" "$TREE" || die "cannot unpack $1 (a damaged download? delete it)"
    touch "$TREE/.unpacked"
}

# kernel_tree: the pinned kernel, unpacked, with modules.dep; sets KROOT, KVER, VMLINUZ.
kernel_tree() {
    fetch_pinned "$KERNEL_PKG" "$KERNEL_VERSION" "KERNEL_PKG and KERNEL_VERSION" "$KERNEL_FALLBACK"
    unpack "$DEB"
    KROOT=$TREE
    local kvers=("$KROOT"/lib/modules/*)
    [ ${#kvers[@]} = 1 ] || die "$DEB: expected one /lib/modules/VERSION"
    [ -d "${kvers[0]}" ] || die "$DEB: no /lib/modules/VERSION"
    KVER=${kvers[0]##*/}
    VMLINUZ=$KROOT/boot/vmlinuz-$KVER
    [ -f "$VMLINUZ" ] || die "$DEB: no /boot/vmlinuz-$KVER"
    # Debian's package leaves modules.dep to the postinst; resolve dependencies against our copy.
    if [ ! -f "$KROOT/.depmod" ]; then
        depmod -b "$KROOT" "$KVER" || die "depmod failed on $KROOT"
        touch "$KROOT/.depmod"
    fi
}

# busybox_bin: the pinned static busybox; sets BUSYBOX.
busybox_bin() {
    fetch_pinned "$BUSYBOX_PKG" "$BUSYBOX_VERSION" "BUSYBOX_VERSION" '^busybox-static$'
    unpack "$DEB"
    BUSYBOX=$TREE/bin/busybox
    [ -x "$BUSYBOX" ] || die "$DEB: no /bin/busybox"
}

# tools_tree: TOOL_DEBS unpacked into one tree (kept in the cache per pin list); sets TOOLS_ROOT
# and TOOLS_PINS (what went in: the pins, or the replacements of pins gone from the mirror).
tools_tree() {
    local pin pkg ver debs=()
    TOOLS_PINS=()
    for pin in "${TOOL_DEBS[@]}"; do
        pkg=${pin%%=*} ver=${pin#*=}
        fetch_pinned "$pkg" "$ver" "TOOL_DEBS" "^${pkg//./\\.}\$"
        debs+=("$DEB")
        TOOLS_PINS+=("$(basename "$DEB" .deb)")
    done
    TOOLS_ROOT=$CACHE/tree/tools-$(printf '%s\n' "${TOOLS_PINS[@]}" | sha256sum | cut -c1-16)
    [ -f "$TOOLS_ROOT/.unpacked" ] && return 0
    rm -rf "$TOOLS_ROOT"
    mkdir -p "$TOOLS_ROOT"
    for pin in "${debs[@]}"; do
        dpkg-deb -x "$pin" "$TOOLS_ROOT" || die "cannot unpack $pin (a damaged download? delete it)"
    done
    touch "$TOOLS_ROOT/.unpacked"
}

