#!/bin/bash
# Copies a rescue ISO with other extra kernel arguments, without rebuilding: only the bytes of
# /boot/grub/grub.cfg change (BIOS and UEFI, CD and USB stick all read it). build.sh gives that
# file a fixed size, so it is rewritten in place and the boot records, the EFI image and the
# hybrid partition tables stay exactly as grub-mkrescue made them. (xorriso's
# `-boot_image any replay` cannot rebuild this layout: "GPT partitions 1 and 2 overlap".)
#
#   iso-build/set-kargs.sh IN.iso OUT.iso "KERNEL ARGS"
#
# The arguments replace those given to build.sh --append (the base console/panic ones stay).
set -euo pipefail

PROG=set-kargs.sh
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=iso-build/lib.sh
source "$DIR/lib.sh"

[ $# = 3 ] || { echo "usage: $(sed -n '8s/^#  *//p' "${BASH_SOURCE[0]}")" >&2; exit 2; }
in=$1 out=$2 args=$3
[ -f "$in" ] || die "$in: no such file"
check_kargs "$args"
[ "$(realpath -m "$in")" != "$(realpath -m "$out")" ] || die "OUT must differ from IN"
command -v xorriso >/dev/null || die "xorriso missing (apt-get install xorriso)"

# Where grub.cfg's data lies: "File data lba:  0 , LBA , BLOCKS , SIZE , '/boot/grub/grub.cfg'".
read -r lba size < <(xorriso -indev "$in" -report_about SORRY \
    -find /boot/grub/grub.cfg -exec report_lba -- 2>/dev/null |
    awk -F' *, *' '/^File data lba:/ {print $2, $4}') || true
[ -n "${lba:-}" ] || die "$in: no /boot/grub/grub.cfg (not a bmr rescue ISO?)"
[ "$size" = "$GRUB_CFG_SIZE" ] ||
    die "$in: grub.cfg is $size bytes, not $GRUB_CFG_SIZE: an ISO from an older build.sh? rebuild it"
dd if="$in" bs=2048 skip="$lba" count=1 status=none | grep -q '^# bmr rescue boot menu' ||
    die "$in: grub.cfg is not one build.sh wrote"

tmp=$(mktemp "${TMPDIR:-/tmp}/set-kargs.XXXXXX")
trap 'rm -f "$tmp"' EXIT
grub_cfg_padded "$args" >"$tmp"
cp --reflink=auto "$in" "$out.tmp"
dd if="$tmp" of="$out.tmp" bs=2048 seek="$lba" conv=notrunc status=none
mv "$out.tmp" "$out"
echo "$out"
