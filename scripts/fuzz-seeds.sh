#!/bin/bash
# Seed corpora for the fuzz targets, made with real tools: a small GPT disk with FAT and ext4
# backed up by bmr (manifest, host index, chunk index, file lists, chunks), sgdisk/sfdisk
# tables, mke2fs/mkfs.fat/mkfs.xfs/mkfs.btrfs images in the sparse form the filesystem targets
# read (src/fuzz.rs: only the non-zero 4 KiB blocks, so a 300 MiB XFS is a few hundred KiB),
# and kernel command lines. Run as root (mount, loop devices).
#
#   scripts/fuzz-seeds.sh [OUT]     OUT defaults to fuzz/seeds; one folder per target.
#   BMR=path/to/bmr                 the binary to back up with (default: the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$(realpath -m "${1:-fuzz/seeds}")
bmr=${BMR:-${CARGO_TARGET_DIR:-$root/target}/release/bmr}
[ -x "$bmr" ] || { echo "fuzz-seeds: no bmr binary at $bmr: run cargo build --release" >&2; exit 1; }
work=$(mktemp -d /tmp/bmr-fuzz-seeds.XXXXXX)
mnt=$work/mnt
cleanup() {
    mountpoint -q "$mnt" && umount "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$mnt"
# .complete marks a finished set (scripts/fuzz.sh and tests/fuzz_corpus.rs look for it).
rm -f "$out/.complete"
for t in manifest host_index chunk chunk_index toc layout ext fat xfs btrfs cmdline; do
    rm -rf "${out:?}/$t"
    mkdir -p "$out/$t"
done

# The sparse form: size, then (offset, length, bytes) runs of the non-zero 4 KiB blocks;
# at most 2 MiB of blocks (the filesystems' metadata comes first on every format used here).
sparse() {
    python3 - "$1" "$2" <<'EOF'
import struct, sys
src, dst = sys.argv[1], sys.argv[2]
B, budget = 4096, 2 << 20
runs, cur = [], None
with open(src, 'rb') as f:
    f.seek(0, 2); size = f.tell(); f.seek(0)
    off = 0
    while budget > 0:
        b = f.read(B)
        if not b:
            break
        if b.count(0) != len(b):
            if cur and cur[0] + len(cur[1]) == off:
                cur[1] += b
            else:
                cur = [off, bytearray(b)]; runs.append(cur)
            budget -= len(b)
        off += len(b)
with open(dst, 'wb') as o:
    o.write(struct.pack('<Q', size))
    for off, b in runs:
        o.write(struct.pack('<QI', off, len(b))); o.write(b)
EOF
}

# A small tree with every kind of entry the readers know.
tree() {
    local d=$1
    mkdir -p "$d/dir/sub" "$d/empty_dir"
    echo hello >"$d/hello.txt"
    for i in $(seq 12); do echo "file $i" >"$d/dir/file_with_a_long_name_$i.txt"; done
    head -c 20000 /dev/zero | tr '\0' x >"$d/dir/sub/twenty_k"
    [ "${2:-}" = fat ] && return
    ln -s hello.txt "$d/link"
    ln -s "$(printf 'long%.0s' $(seq 40))" "$d/longlink"
    ln "$d/hello.txt" "$d/hardlink"
    mkfifo "$d/fifo"
    mknod "$d/chr" c 1 3
    truncate -s 1M "$d/sparse"
    printf end | dd of="$d/sparse" bs=1 seek=900000 conv=notrunc status=none
    setfattr -n user.k -v value "$d/hello.txt"
    chown 123:456 "$d/dir"
}

# --- repository files: a GPT disk with an ESP (FAT16) and ext4, backed up by bmr.
tree "$work/ext_tree"
tree "$work/fat_tree" fat
disk=$work/disk.img
truncate -s 48M "$disk"
sgdisk -n 1:1M:+12M -t 1:ef00 -n 2:0:0 -t 2:8300 "$disk" >/dev/null
mkfs.fat -F 16 -C "$work/esp" $((12 * 1024)) >/dev/null
mcopy -s -i "$work/esp" "$work/fat_tree"/* ::/
mke2fs -q -F -t ext4 -E nodiscard -d "$work/ext_tree" "$work/root" 34M >/dev/null
dd if="$work/esp" of="$disk" bs=1M seek=1 conv=notrunc status=none
dd if="$work/root" of="$disk" bs=1M seek=13 conv=notrunc status=none
"$bmr" backup --repo "$work/repo" --host fuzz "$disk" >/dev/null 2>&1
snaps=$work/repo/hosts/fuzz/snapshots
cp "$snaps"/*.json "$out/manifest/"
cp "$work/repo/hosts/fuzz/snapshots.json" "$out/host_index/"
cp "$work/repo/hosts.json" "$out/host_index/"
cp "$snaps"/*.idx "$out/chunk_index/"
cp "$snaps"/*.toc* "$out/toc/"
# The smallest chunks, each behind the plain length a reader expects.
find "$work/repo/chunks" -type f -printf '%s %p\n' | sort -n | head -8 | while read -r _ c; do
    n=$(zstd -dc "$c" | wc -c)
    { python3 -c "import struct,sys; sys.stdout.buffer.write(struct.pack('<I', $n))"; cat "$c"; } \
        >"$out/chunk/$(basename "$c" | head -c 16)"
done

# --- partition tables, as whole small disks.
lay=$out/layout
truncate -s 256K "$lay/gpt"
sgdisk -a 1 -n 1:40:+64K -t 1:ef00 -c 1:EFI -n 2:0:+32K -t 2:8300 -n 3:0:0 "$lay/gpt" >/dev/null
cp "$lay/gpt" "$lay/gpt-no-backup"
truncate -s 255K "$lay/gpt-no-backup"
truncate -s 1M "$lay/mbr"
printf 'label: dos\nstart=1, size=100, type=83, bootable\nstart=101, size=1000, type=5\nstart=200, size=100, type=83\nstart=400, size=100, type=82\nstart=1200, size=200, type=7\n' |
    sfdisk -q "$lay/mbr" >/dev/null
truncate -s 64K "$lay/mbr-one"
printf 'label: dos\nstart=8, size=100, type=c\n' | sfdisk -q "$lay/mbr-one" >/dev/null

# --- filesystem images (sparse form).
ext=$out/ext
mke2fs -q -F -t ext4 -b 1024 -I 256 -E nodiscard -d "$work/ext_tree" "$work/e1" 4M >/dev/null
sparse "$work/e1" "$ext/ext4-1k"
mke2fs -q -F -t ext2 -E nodiscard -d "$work/ext_tree" "$work/e2" 4M >/dev/null
sparse "$work/e2" "$ext/ext2"
mke2fs -q -F -t ext4 -O inline_data -E nodiscard -d "$work/ext_tree" "$work/e3" 4M >/dev/null
sparse "$work/e3" "$ext/ext4-inline"
mke2fs -q -F -t ext4 -O bigalloc -C 16384 -E nodiscard -d "$work/ext_tree" "$work/e4" 8M >/dev/null 2>&1 &&
    sparse "$work/e4" "$ext/ext4-bigalloc"

fat=$out/fat
for f in "12 2" "16 16" "32 40"; do
    set -- $f
    mkfs.fat -F "$1" -C "$work/f$1" $(($2 * 1024)) >/dev/null
    mcopy -s -i "$work/f$1" "$work/fat_tree"/* ::/
    sparse "$work/f$1" "$fat/fat$1"
done

xfs=$out/xfs
truncate -s 300M "$work/x"
mkfs.xfs -f -q -K "$work/x"
mount -o loop "$work/x" "$mnt"
cp -a "$work/ext_tree/." "$mnt/"
mkdir "$mnt/many"
for i in $(seq 300); do : >"$mnt/many/entry_number_$i"; done
for i in $(seq 30); do setfattr -n "user.k$i" -v "value $i" "$mnt/hello.txt"; done
umount "$mnt"
sparse "$work/x" "$xfs/xfs-v5"
# v4 (no CRCs, so mutations reach deeper) cannot be mounted by current kernels: a protofile.
{
    printf '/dev/null\n0 0\nd--755 0 0\n'
    printf 'hello ---644 0 0 %s\n' "$work/ext_tree/hello.txt"
    printf 'link l--777 0 0 hello\n'
    printf 'dir d--755 12 34\n'
    for i in $(seq 40); do printf ' file_%s ---600 0 0 %s\n' "$i" "$work/ext_tree/hello.txt"; done
    printf ' big ---644 0 0 %s\n' "$work/ext_tree/dir/sub/twenty_k"
    printf ' $\n$\n'
} >"$work/proto"
truncate -s 300M "$work/x4"
mkfs.xfs -f -q -K -m crc=0 -p "$work/proto" "$work/x4" 2>/dev/null
sparse "$work/x4" "$xfs/xfs-v4"
rm -f "$work/x" "$work/x4"

btrfs=$out/btrfs
truncate -s 128M "$work/b"
mkfs.btrfs -q -f --rootdir "$work/ext_tree" "$work/b" >/dev/null
sparse "$work/b" "$btrfs/btrfs"
mount -o loop "$work/b" "$mnt"
btrfs -q subvolume create "$mnt/sub" >/dev/null
mount -o remount,compress=zstd "$mnt"
head -c 30000 /dev/zero | tr '\0' z >"$mnt/sub/zstd"
mount -o remount,compress=zlib "$mnt"
head -c 30000 /dev/zero | tr '\0' y >"$mnt/sub/zlib"
mount -o remount,compress=lzo "$mnt"
head -c 30000 /dev/zero | tr '\0' w >"$mnt/sub/lzo"
sync
umount "$mnt"
sparse "$work/b" "$btrfs/btrfs-compressed"

# --- kernel command lines.
cl=$out/cmdline
printf '%s' 'BOOT_IMAGE=/vmlinuz console=ttyS0 bmr.repo=https://10.0.2.2:8443/repo bmr.host=web1 bmr.at="2026-11-20 18:00" bmr.target=auto bmr.yes bmr.verify=1 bmr.after=reboot bmr.report=http://h/r bmr.ip=10.0.0.5/24:10.0.0.1 bmr.ca=corp.pem bmr.wait=5 bmr.grow bmr.bootloader=reinstall quiet' >"$cl/full"
printf '%s' 'console=tty0 bmr.break' >"$cl/break"
printf '%s' 'bmr.tagret=/dev/sda bmr.after=halt bmr.yes=maybe bmr.repo= bmr.wait=x' >"$cl/typos"

for t in "$out"/*/; do
    printf '%-12s %3d seeds %8d bytes\n' "$(basename "$t")" "$(find "$t" -type f | wc -l)" \
        "$(find "$t" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')"
done
touch "$out/.complete"
