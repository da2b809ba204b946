# shellcheck shell=bash disable=SC2034 # variables are for the scripts that source this
# Shared by the QEMU tests: paths, the sample machine, the HTTP server, booting the rescue
# system (CD, USB stick or PXE; SeaBIOS or OVMF) and checking a restored disk on the host.
# Everything runs under TCG; timeouts are generous and nothing asserts on time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESCUE=${BMR_RESCUE_DIR:-$ROOT/target/rescue}
WORK=${BMR_QEMU_WORK:-$ROOT/target/qemu-tests}
BMR=$ROOT/target/release/bmr
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
BOOT_TIMEOUT=${BMR_BOOT_TIMEOUT:-600}
# BASE_KARGS (what the rescue kernel always gets) and die.
# shellcheck source=iso-build/lib.sh
source "$ROOT/iso-build/lib.sh"

log() { printf '%s\n' "$*" >&2; }

# The sample machine: a GPT disk with an ESP (FAT) and an ext4 root, backed up as host "sample".
make_sample() {
    local s=$WORK/sample
    [ -f "$s/done" ] && return 0
    rm -rf "$s" && mkdir -p "$s/tree/etc" "$s/tree/data" "$s/esp"
    echo "sample" > "$s/tree/etc/hostname"
    for i in $(seq 1 40); do head -c $((i * 3000)) /dev/urandom > "$s/tree/data/file$i"; done
    ln -s ../etc/hostname "$s/tree/data/link"
    truncate -s 96M "$s/disk.img"
    sgdisk -n 1:2048:+32M -t 1:ef00 -c 1:ESP -n 2:0:0 -t 2:8300 -c 2:root "$s/disk.img" >/dev/null
    local esp_off=$((2048 * 512)) root_start root_off root_len
    root_start=$(sgdisk -i 2 "$s/disk.img" | awk '/First sector/ {print $3}')
    root_off=$((root_start * 512))
    root_len=$(( ($(stat -c %s "$s/disk.img") - root_off - 34 * 512) / 1024 ))
    # The host kernel has no vfat: build the ESP as its own image with mtools, then place it.
    rm -f "$s/esp.img"
    mkfs.fat -F 16 -n ESP -C "$s/esp.img" $((32 * 1024)) >/dev/null
    echo "hello from the ESP" > "$s/esp/hello.txt"
    mmd -i "$s/esp.img" ::/EFI
    mcopy -i "$s/esp.img" "$s/esp/hello.txt" ::/EFI/hello.txt
    dd if="$s/esp.img" of="$s/disk.img" bs=1M seek=1 conv=notrunc status=none
    rm -f "$s/esp.img"
    mke2fs -q -t ext4 -L root -d "$s/tree" -E offset=$root_off "$s/disk.img" "${root_len}k"
    rm -rf "$WORK/repo"
    "$BMR" backup --repo "$WORK/repo" --host sample "$s/disk.img" >/dev/null
    echo "$root_off $root_len $esp_off" > "$s/offsets"
    touch "$s/done"
}

# Serve a repository (default: the sample's) on the host's loopback; the guest reaches it at
# 10.0.2.2. Uploaded reports land in DIR.posts/.
SERVER_PID=
start_server() {
    local dir=${1:-$WORK/repo}
    local pf=$dir.port
    rm -f "$pf"
    mkdir -p "$dir.posts"
    python3 "$ROOT/tests/flaky_http.py" --dir "$dir" --port-file "$pf" --posts "$dir.posts" &
    SERVER_PID=$!
    for _ in $(seq 100); do [ -s "$pf" ] && break; sleep 0.1; done
    [ -s "$pf" ] || { log "the test HTTP server did not start"; return 1; }
    PORT=$(cat "$pf")
    REPO_URL="http://10.0.2.2:$PORT"
}
stop_server() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi; }

# boot NAME FIRMWARE DELIVERY "KARGS" [DISK_SPEC...]
#   FIRMWARE: bios | uefi.  DELIVERY: cd | usb | pxe (iPXE from QEMU's TFTP).
#   DISK_SPEC: BUS:FILE with BUS virtio | sata | nvme | usb.
#   NET=none boots without a network card; SERIAL=unix makes the serial console a socket
#   ($WORK/NAME.sock) for a driver instead of a log file.
boot() {
    local name=$1 fw=$2 how=$3 kargs=$4
    shift 4
    local d=$WORK/$name log=$WORK/$name.log
    rm -rf "$d" && mkdir -p "$d"
    local args=(-accel tcg -m 1024 -smp 1 -no-reboot -display none -monitor none)
    if [ "${SERIAL:-file}" = unix ]; then
        args+=(-serial "unix:$WORK/$name.sock,server=on,wait=on")
    else
        args+=(-serial "file:$log")
    fi
    [ "$fw" != uefi ] || firmware_args args "$d"
    case $how in
    cd|usb)
        "$ROOT/iso-build/set-kargs.sh" "$RESCUE/bmr-rescue.iso" "$d/rescue.iso" "$kargs" >/dev/null
        if [ "$how" = cd ]; then
            args+=(-drive "if=none,id=cd,media=cdrom,readonly=on,file=$d/rescue.iso"
                   -device "ide-cd,drive=cd,bootindex=0")
        else
            args+=(-device "qemu-xhci,id=xhci"
                   -drive "if=none,id=stick,format=raw,readonly=on,file=$d/rescue.iso"
                   -device "usb-storage,bus=xhci.0,drive=stick,bootindex=0")
        fi
        if [ "${NET:-}" = none ]; then
            args+=(-nic none)  # QEMU adds a NIC by default
        else
            args+=(-netdev "user,id=n0" -device "virtio-net-pci,netdev=n0")
        fi
        ;;
    pxe)
        mkdir -p "$d/tftp"
        cp "$RESCUE/pxe/vmlinuz" "$RESCUE/pxe/initramfs.img" "$d/tftp/"
        printf '#!ipxe\nkernel vmlinuz initrd=initramfs.img %s %s\ninitrd initramfs.img\nboot\n' \
            "$BASE_KARGS" "$kargs" > "$d/tftp/boot.ipxe"
        args+=(-netdev "user,id=n0,tftp=$d/tftp,bootfile=boot.ipxe"
               -device "virtio-net-pci,netdev=n0,bootindex=0")
        ;;
    esac
    disk_args args "$@"
    timeout "$BOOT_TIMEOUT" qemu-system-x86_64 "${args[@]}" </dev/null >"$d/qemu.out" 2>&1 || true
}

# firmware_args ARRAY DIR [VARS]: OVMF with a fresh NVRAM (a new machine's), or a copy of
# VARS (the same machine again), in DIR/vars.fd.
firmware_args() {
    local -n _argv=$1
    cp "${3:-$OVMF_VARS}" "$2/vars.fd"
    _argv+=(-M q35 -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
           -drive "if=pflash,format=raw,unit=1,file=$2/vars.fd")
}

# disk_args ARRAY BUS:FILE...: the disks, BUS virtio | sata | nvme | usb.
disk_args() {
    # shellcheck disable=SC2178 # a nameref to the caller's array
    local -n _argv=$1
    shift
    local i=0 spec bus file
    for spec in "$@"; do
        bus=${spec%%:*} file=${spec#*:}
        _argv+=(-drive "if=none,id=d$i,format=raw,file=$file")
        case $bus in
        virtio) _argv+=(-device "virtio-blk-pci,drive=d$i,serial=BMRDISK$i") ;;
        sata) _argv+=(-device "ahci,id=ahci$i" -device "ide-hd,drive=d$i,bus=ahci$i.0") ;;
        nvme) _argv+=(-device "nvme,serial=BMRNVME$i,drive=d$i") ;;
        usb) _argv+=(-device "qemu-xhci,id=xhci$i" -device "usb-storage,bus=xhci$i.0,drive=d$i") ;;
        *) log "unknown disk bus $bus"; return 2 ;;
        esac
        i=$((i + 1))
    done
}

# The result line the rescue system printed on the serial console.
# Never fails: no result line prints nothing (under pipefail a grep without a match would end a
# caller under set -e before it could report).
result_of() { { grep -a -o 'BMR-RESULT: .*' "$WORK/$1.log" || true; } | tr -d '\r' | tail -n 1; }

# Check a restored target against the sample: table, filesystems, every file.
check_target() {
    local t=$1 s=$WORK/sample root_off root_len esp_off
    read -r root_off root_len esp_off < "$s/offsets"
    sgdisk -v "$t" | grep -q "No problems found" || { log "sgdisk -v: problems on $t"; return 1; }
    local part=$t.root
    dd if="$t" of="$part" bs=1K skip=$((root_off / 1024)) count="$root_len" status=none
    e2fsck -fn "$part" >/dev/null 2>&1 || { log "e2fsck found problems"; return 1; }
    local mnt
    mnt=$(mktemp -d)
    mount -o ro,loop "$part" "$mnt"
    local rc=0
    diff -r --no-dereference -x lost+found "$s/tree" "$mnt" >/dev/null || { log "files differ"; rc=1; }
    umount "$mnt" && rmdir "$mnt"
    rm -f "$part"
    mtype -i "$t@@$esp_off" ::/EFI/hello.txt | cmp -s - "$s/esp/hello.txt" \
        || { log "ESP file differs"; rc=1; }
    return $rc
}
