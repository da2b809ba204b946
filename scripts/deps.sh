#!/bin/bash
# Install what bmr's build, tests, demo and benchmarks need on Debian/Ubuntu (run as root).
# Idempotent: does nothing when everything is already there.
set -euo pipefail

PKGS=(gdisk fdisk dosfstools mtools e2fsprogs xfsprogs btrfs-progs zstd partclone bmap-tools util-linux
      time file udev kmod xxd attr acl python3 openssl tmux xorriso g++
      qemu-system-x86 ovmf ipxe-qemu grub-common grub-pc-bin grub-efi-amd64-bin cpio debootstrap lvm2 mdadm nginx-light cryptsetup-bin qemu-utils)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "deps: run as root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Packages with services (nginx) must not start them: the tests start their own, on
    # loopback only. policy-rc.d answers "not now" to the package scripts.
    policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -z "$policy" ] || rm -f "$policy"
fi
if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
    echo "deps: cargo not found: install Rust 1.85 or newer (https://rustup.rs)" >&2
    exit 1
fi
