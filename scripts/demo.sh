#!/bin/bash
# DR drill on a built-in example: build a sample GPT disk (BIOS boot partition, FAT32 ESP,
# ext4 root with files), take an image backup, change files and take an incremental, "lose"
# the disk, restore the latest point onto a bigger blank disk, and prove the result: partition
# table, filesystem checks, every file compared, deletions kept. Prints a report.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release --quiet
BMR=$PWD/target/release/bmr
W=${BMR_DEMO_DIR:-/var/tmp/bmr-demo}
rm -rf "$W"; mkdir -p "$W"
trap 'umount "$W/mnt" "$W/live" 2>/dev/null || true' EXIT
step() { printf '\n== %s\n' "$*"; }

step "1. Build the sample machine's disk (GPT: BIOS boot, ESP, ext4 root)"
truncate -s 512M "$W/server.img"
sgdisk -n 1:2048:+1M -t 1:ef02 -c 1:bios -n 2:0:+64M -t 2:ef00 -c 2:esp \
       -n 3:0:0 -t 3:8300 -c 3:root "$W/server.img" >/dev/null
mkdir -p "$W/root/etc" "$W/root/data" "$W/esp/EFI/BOOT"
echo "demo-server" > "$W/root/etc/hostname"
cp -r /usr/share/doc/e2fsprogs "$W/root/data/" 2>/dev/null || true
for i in $(seq 1 50); do head -c $((i * 4096)) /dev/urandom > "$W/root/data/file$i"; done
head -c 500000 /dev/urandom > "$W/esp/EFI/BOOT/BOOTX64.EFI"
read -r P2 P3 < <(sfdisk -J "$W/server.img" | python3 -c \
  'import json,sys; p=json.load(sys.stdin)["partitiontable"]["partitions"]; print(p[1]["start"]*512, p[2]["start"]*512)')
SIZE3=$(( $(stat -c %s "$W/server.img") - P3 - 1024*1024 ))
mkfs.fat -F 32 -n ESP -C "$W/esp.img" $((64 * 1024)) >/dev/null
mcopy -s -i "$W/esp.img" "$W/esp/EFI" ::/
mke2fs -q -F -t ext4 -L root -d "$W/root" "$W/root.img" $((SIZE3 / 1024))k
head -c 1048576 /dev/urandom | dd of="$W/server.img" seek=2048 conv=notrunc status=none
dd if="$W/esp.img" of="$W/server.img" bs=1M seek="$P2" oflag=seek_bytes conv=notrunc status=none
dd if="$W/root.img" of="$W/server.img" bs=1M seek="$P3" oflag=seek_bytes conv=notrunc status=none
rm -f "$W/esp.img" "$W/root.img"
sgdisk -p "$W/server.img" | sed -n '/^Number/,$p'

step "2. Image backup into a repository"
"$BMR" backup --repo "$W/repo" --host demo-server "$W/server.img"
"$BMR" list --repo "$W/repo"

step "2b. The server lives on: a file is deleted, one is added; incremental backup"
mkdir -p "$W/live"
mount -o loop,offset="$P3",sizelimit="$SIZE3" "$W/server.img" "$W/live"
rm "$W/live/data/file1" "$W/root/data/file1"
echo "written after the image" | tee "$W/live/data/new.txt" > "$W/root/data/new.txt"
"$BMR" backup --incremental --repo "$W/repo" --host demo-server "$W/live"
umount "$W/live"
"$BMR" list --repo "$W/repo"

step "3. Disaster: restore the latest point onto a new, bigger blank disk"
truncate -s 768M "$W/new-disk.img"
"$BMR" restore --repo "$W/repo" --host demo-server --at latest --target "$W/new-disk.img" --verify

step "4. Prove it"
fail=0
check() { if "$@" >/dev/null 2>&1; then echo "  ok    $*" | cut -c1-100; else echo "  FAIL  $*"; fail=1; fi; }
check sgdisk -v "$W/new-disk.img"
check cmp -n 440 "$W/server.img" "$W/new-disk.img"
check cmp -i 1048576:1048576 -n 1048576 "$W/server.img" "$W/new-disk.img"
dd if="$W/new-disk.img" of="$W/esp-r.img" bs=1M skip="$P2" count=64 iflag=skip_bytes status=none
check fsck.fat -n "$W/esp-r.img"
mkdir -p "$W/esp-r"; mcopy -s -n -i "$W/esp-r.img" ::/EFI "$W/esp-r/"
check diff -r "$W/esp/EFI" "$W/esp-r/EFI"
dd if="$W/new-disk.img" of="$W/root-r.img" bs=1M skip="$P3" count=$((SIZE3 / 1048576)) iflag=skip_bytes status=none
check e2fsck -fn "$W/root-r.img"
mkdir -p "$W/mnt"; mount -o ro,loop "$W/root-r.img" "$W/mnt"
check diff -r -x lost+found "$W/root" "$W/mnt"
check test ! -e "$W/mnt/data/file1"   # deleted after the image: stays deleted
umount "$W/mnt"
"$BMR" verify --repo "$W/repo" -q

step "Report"
echo "  source disk   $(du -h --apparent-size "$W/server.img" | cut -f1), repository $(du -sh "$W/repo" | cut -f1)"
if [ $fail = 0 ]; then echo "  DRILL PASSED: the restored disk matches the source"; else echo "  DRILL FAILED"; exit 1; fi
rm -rf "$W"
