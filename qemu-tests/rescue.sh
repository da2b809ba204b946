#!/bin/bash
# The rescue system in QEMU: the ISO as CD and as USB stick under SeaBIOS and OVMF, and the PXE
# bundle through iPXE, each restoring the sample machine unattended over HTTP from the host onto
# a blank disk that is then checked on the host; the bad paths, each of which must end in one
# clear `BMR-RESULT: failed` line; the TUI driven over the serial console; an incremental
# of a FAT filesystem made and restored in the rescue shell (the host has no vfat); and the XFS
# and btrfs tools (xfs_growfs, xfs_repair, xfs_db, btrfs) run in the rescue shell; restores onto
# failing disks (device-mapper faults in the guest), a guest killed in mid-restore, and md
# RAID1 mirrors imaged and restored onto two disks and onto one; a LUKS2 volume imaged as
# ciphertext, its incremental applied and grown through dm-crypt.
#
#   qemu-tests/rescue.sh            all cases (two at a time)
#   qemu-tests/rescue.sh cd-bios    one case (names: see CASES below)
#
# Needs the rescue build (iso-build/build.sh) and a release bmr (cargo build --release).
# shellcheck source=qemu-tests/lib.sh
source "$(dirname "$0")/lib.sh"

CASES=(cd-bios usb-bios cd-uefi usb-uefi pxe-bios pxe-uefi usb-repo
       tui-serial fat-incremental xfs-btrfs-tools dm-faults killed-restore no-network wrong-host
       unreachable two-disks not-blank raid luks)

# A happy path: unattended restore at the latest snapshot onto a bigger blank disk.
happy() {
    local name=$1 fw=$2 how=$3 bus=${4:-virtio}
    local t=$WORK/$name-target.img
    rm -f "$t" && truncate -s 128M "$t"
    boot "$name" "$fw" "$how" \
        "bmr.repo=$REPO_URL bmr.host=sample bmr.target=auto bmr.verify bmr.report=http://10.0.2.2:$PORT/report" \
        "$bus:$t"
    local r
    r=$(result_of "$name")
    [[ $r == "BMR-RESULT: ok restored host sample"* ]] || { log "$name: result: ${r:-none}"; return 1; }
    check_target "$t"
}

# The first MiB of a disk image is still all zeros.
blank() { [ "$(head -c 1M "$1" | tr -d '\0' | wc -c)" = 0 ]; }

# A bad path: the result line must say `failed` and contain $2; the target must be unchanged.
refused() {
    local name=$1 want=$2
    local r
    r=$(result_of "$name")
    [[ $r == "BMR-RESULT: failed "* && $r == *"$want"* ]] || {
        log "$name: want a failed line with '$want', got: ${r:-none}"
        return 1
    }
}

case_cd-bios() { happy cd-bios bios cd; }
case_usb-bios() { happy usb-bios bios usb sata; }
case_cd-uefi() { happy cd-uefi uefi cd nvme; }
case_usb-uefi() { happy usb-uefi uefi usb; }
case_pxe-bios() { happy pxe-bios bios pxe; }
case_pxe-uefi() { happy pxe-uefi uefi pxe sata; }

# The repository on a USB disk, found by itself; target=auto must pass over that disk.
case_usb-repo() {
    local t=$WORK/usb-repo-target.img m=$WORK/usb-repo-media.img tree=$WORK/usb-repo-tree
    rm -rf "$t" "$m" "$tree" && truncate -s 128M "$t"
    mkdir -p "$tree/backups" && cp -a "$WORK/repo" "$tree/backups/bmr"
    mke2fs -q -t ext4 -L BMRUSB -d "$tree" "$m" 64M
    boot usb-repo bios cd "bmr.repo=auto bmr.target=auto" "virtio:$t" "usb:$m"
    local r
    r=$(result_of usb-repo)
    [[ $r == "BMR-RESULT: ok restored host sample"* ]] || { log "usb-repo: result: ${r:-none}"; return 1; }
    check_target "$t"
}

case_no-network() {
    local t=$WORK/no-network-target.img
    rm -f "$t" && truncate -s 128M "$t"
    NET=none boot no-network bios cd "bmr.repo=$REPO_URL bmr.target=auto bmr.wait=10" "virtio:$t"
    refused no-network "no network" && blank "$t"
}

case_wrong-host() {
    local t=$WORK/wrong-host-target.img
    rm -f "$t" && truncate -s 128M "$t"
    boot wrong-host bios cd "bmr.repo=$REPO_URL bmr.host=nosuchhost bmr.target=auto" "virtio:$t"
    refused wrong-host 'no backups of host "nosuchhost"' && blank "$t"
}

case_unreachable() {
    local t=$WORK/unreachable-target.img
    rm -f "$t" && truncate -s 128M "$t"
    boot unreachable bios cd "bmr.repo=http://10.0.2.2:9/repo bmr.target=auto" "virtio:$t"
    refused unreachable "cannot fetch http://10.0.2.2:9/repo/bmr-repo.json" && blank "$t"
}

case_two-disks() {
    local a=$WORK/two-disks-a.img b=$WORK/two-disks-b.img
    rm -f "$a" "$b" && truncate -s 128M "$a" "$b"
    boot two-disks bios cd "bmr.repo=$REPO_URL bmr.target=auto bmr.yes" "virtio:$a" "sata:$b"
    refused two-disks "bmr.target=auto: 2 disks fit" && blank "$a" && blank "$b"
}

case_not-blank() {
    local t=$WORK/not-blank-target.img before
    rm -f "$t" && truncate -s 128M "$t" && mkfs.ext4 -q -F -L keepme "$t"
    before=$(sha256sum < "$t")
    boot not-blank bios cd "bmr.repo=$REPO_URL bmr.target=/dev/vda" "virtio:$t"
    refused not-blank "add bmr.yes" && [ "$(sha256sum < "$t")" = "$before" ]
}

case_tui-serial() {
    local t=$WORK/tui-serial-target.img
    rm -f "$t" && truncate -s 128M "$t"
    rm -f "$WORK/tui-serial.sock"
    python3 "$ROOT/qemu-tests/serial_tui.py" "$WORK/tui-serial.sock" "$REPO_URL" "$WORK/tui-serial.log" &
    local driver=$!
    SERIAL=unix boot tui-serial uefi cd "" "virtio:$t"
    wait "$driver" || { log "tui-serial: the serial driver failed (log: $WORK/tui-serial.log)"; return 1; }
    check_target "$t"
}

# FAT incrementals under the real vfat driver (the host has none): a script in the rescue shell
# (qemu-tests/fat-incremental.guest) changes the sample's ESP, backs it up and restores it.
case_fat-incremental() {
    local src=$WORK/fat-incremental-source.img t=$WORK/fat-incremental-target.img
    rm -f "$t" "$WORK/fat-incremental.sock" && truncate -s 128M "$t"
    cp "$WORK/sample/disk.img" "$src"
    python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/fat-incremental.sock" \
        "$WORK/fat-incremental.log" "$ROOT/qemu-tests/fat-incremental.guest" &
    local driver=$!
    SERIAL=unix boot fat-incremental bios cd "bmr.break" "virtio:$src" "virtio:$t"
    wait "$driver"  # its last line on stderr says which step failed
}

# The rescue system's XFS and btrfs drivers and tools (qemu-tests/xfs-btrfs-tools.guest): an
# XFS and a btrfs made on the host smaller than their disks, grown in the rescue shell the way
# bmr's --grow does it, and checked.
case_xfs-btrfs-tools() {
    local x=$WORK/xfs-btrfs-tools-xfs.img b=$WORK/xfs-btrfs-tools-btrfs.img mnt
    rm -f "$x" "$b" "$WORK/xfs-btrfs-tools.sock" && truncate -s 512M "$x" && truncate -s 256M "$b"
    mkfs.xfs -q -d size=320m "$x" && mkfs.btrfs -q -b 128M "$b" >/dev/null || return 1
    mnt=$(mktemp -d)
    for f in "$x" "$b"; do
        if ! { mount -o loop "$f" "$mnt" && echo "made on the host" >"$mnt/hello.txt" && umount "$mnt"; }; then
            rmdir "$mnt"
            return 1
        fi
    done
    rmdir "$mnt"
    python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/xfs-btrfs-tools.sock" \
        "$WORK/xfs-btrfs-tools.log" "$ROOT/qemu-tests/xfs-btrfs-tools.guest" &
    local driver=$!
    SERIAL=unix NET=none boot xfs-btrfs-tools bios cd "bmr.break" "virtio:$x" "virtio:$b"
    wait "$driver"  # its last line on stderr says which step failed
}

# Restores onto a target behind device-mapper faults, in the rescue shell
# (qemu-tests/dm-faults.guest): dm-error on a range, dm-flakey dropping and failing writes, a
# disk whose table vanishes mid-restore.
case_dm-faults() {
    local src=$WORK/dm-faults-source.img t=$WORK/dm-faults-target.img
    rm -f "$t" "$WORK/dm-faults.sock" && truncate -s 128M "$t"
    cp "$WORK/sample/disk.img" "$src"
    python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/dm-faults.sock" \
        "$WORK/dm-faults.log" "$ROOT/qemu-tests/dm-faults.guest" &
    local driver=$!
    SERIAL=unix NET=none boot dm-faults bios cd "bmr.break" "virtio:$src" "virtio:$t"
    wait "$driver"  # its last line on stderr says which step failed
}

# md RAID1 in the rescue shell (qemu-tests/raid.guest): a mirror made by mdadm over two disks,
# imaged from one member, restored onto two bigger disks (grown, then checked by md itself)
# and onto one (degraded).
case_raid() {
    local d f
    rm -f "$WORK/raid.sock"
    for d in a b; do
        f=$WORK/raid-$d.img
        rm -f "$f" && truncate -s 160M "$f"
        sgdisk -o -n 1:0:+1M -t 1:ef02 -n 2:0:0 -t 2:fd00 "$f" >/dev/null || return 1
    done
    # Partition 1 stands for GRUB's core image in a BIOS boot partition: bytes to copy.
    head -c 1M /dev/urandom | dd of="$WORK/raid-a.img" bs=1M seek=1 conv=notrunc status=none
    mke2fs -q -F -t ext4 "$WORK/raid-repo.img" 256M || return 1
    for d in d e; do rm -f "$WORK/raid-$d.img" && truncate -s 256M "$WORK/raid-$d.img"; done
    rm -f "$WORK/raid-f.img" && truncate -s 192M "$WORK/raid-f.img"
    python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/raid.sock" \
        "$WORK/raid.log" "$ROOT/qemu-tests/raid.guest" &
    local driver=$!
    SERIAL=unix NET=none boot raid bios cd "bmr.break" "virtio:$WORK/raid-a.img" \
        "virtio:$WORK/raid-b.img" "virtio:$WORK/raid-repo.img" "virtio:$WORK/raid-d.img" \
        "virtio:$WORK/raid-e.img" "virtio:$WORK/raid-f.img"
    wait "$driver"  # its last line on stderr says which step failed
}

# LUKS2 in the rescue shell (qemu-tests/luks.guest): made by cryptsetup, imaged as ciphertext
# of its used blocks, an incremental taken in the open volume, restored grown with the key.
case_luks() {
    local f=$WORK/luks-a.img
    rm -f "$WORK/luks.sock" "$f" && truncate -s 160M "$f"
    sgdisk -o -n 1:0:+1M -t 1:ef02 -n 2:0:+150M -t 2:8309 "$f" >/dev/null || return 1
    head -c 1M /dev/urandom | dd of="$f" bs=1M seek=1 conv=notrunc status=none
    mke2fs -q -F -t ext4 "$WORK/luks-repo.img" 256M || return 1
    rm -f "$WORK/luks-c.img" && truncate -s 256M "$WORK/luks-c.img"
    python3 "$ROOT/qemu-tests/serial_shell.py" "$WORK/luks.sock" \
        "$WORK/luks.log" "$ROOT/qemu-tests/luks.guest" &
    local driver=$!
    SERIAL=unix NET=none boot luks bios cd "bmr.break" "virtio:$f" \
        "virtio:$WORK/luks-repo.img" "virtio:$WORK/luks-c.img"
    wait "$driver"  # its last line on stderr says which step failed
}

# The machine dies in mid-restore (QEMU killed while chunks arrive over a slow link); booted
# again with the same parameters, the rescue system resumes and completes a verified restore.
case_killed-restore() {
    local t=$WORK/killed-restore-target.img pf=$WORK/killed-restore.port
    local served=$WORK/killed-restore.served srv port boot_pid
    rm -f "$t" "$pf" "$served" && truncate -s 128M "$t"
    python3 "$ROOT/tests/flaky_http.py" --dir "$WORK/repo" --port-file "$pf" --chunk-delay 1 \
        --served "$served" &
    srv=$!
    for _ in $(seq 100); do [ -s "$pf" ] && break; sleep 0.1; done
    port=$(cat "$pf" 2>/dev/null) || { kill "$srv"; log "killed-restore: no HTTP server"; return 1; }
    local kargs="bmr.repo=http://10.0.2.2:$port bmr.host=sample bmr.target=/dev/vda bmr.verify"
    boot killed-restore-1 bios cd "$kargs" "virtio:$t" &
    boot_pid=$!
    local n=0
    while [ "$n" -lt 2 ] && kill -0 "$boot_pid" 2>/dev/null; do
        sleep 1
        n=$(wc -l <"$served" 2>/dev/null || echo 0)
    done
    pkill -KILL -f "file=$WORK/killed-restore-1/rescue.iso" || true
    wait "$boot_pid"
    local r
    r=$(result_of killed-restore-1)
    if [ -n "$r" ] || blank "$t"; then
        kill "$srv"
        log "killed-restore: the first boot was not killed in mid-restore (result: ${r:-none})"
        return 1
    fi
    boot killed-restore-2 bios cd "$kargs" "virtio:$t"
    kill "$srv"
    r=$(result_of killed-restore-2)
    [[ $r == "BMR-RESULT: ok restored host sample"* ]] || { log "killed-restore: result: ${r:-none}"; return 1; }
    grep -aq "resuming an interrupted restore" "$WORK/killed-restore-2.log" \
        || { log "killed-restore: the second boot did not resume"; return 1; }
    check_target "$t"
}

# How many of the given processes are still running.
running() {
    local n=0 p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done
    echo "$n"
}

main() {
    [ -f "$RESCUE/bmr-rescue.iso" ] || { log "no rescue build: run iso-build/build.sh first"; exit 2; }
    [ -x "$BMR" ] || (cd "$ROOT" && cargo build --release -q)
    mkdir -p "$WORK"
    make_sample
    start_server "$WORK/repo"
    trap stop_server EXIT
    local want=("$@")
    [ ${#want[@]} -gt 0 ] || want=("${CASES[@]}")
    local jobs=${BMR_QEMU_JOBS:-2} c pids=()
    rm -f "$WORK"/*.result
    for c in "${want[@]}"; do
        declare -F "case_$c" >/dev/null || { log "unknown case $c (cases: ${CASES[*]})"; exit 2; }
    done
    for c in "${want[@]}"; do
        # The HTTP server is a child too: count only the running cases.
        while [ "$(running "${pids[@]}")" -ge "$jobs" ]; do sleep 1; done
        (
            if "case_$c" 2>"$WORK/$c.err"; then
                echo "PASS $c" | tee "$WORK/$c.result"
            else
                echo "FAIL $c ($(tail -n 1 "$WORK/$c.err"); log at $WORK/$c.log)" | tee "$WORK/$c.result"
            fi
        ) &
        pids+=($!)
    done
    wait "${pids[@]}"
    local pass fail
    pass=$(cat "$WORK"/*.result | grep -c '^PASS' || true)
    fail=$(cat "$WORK"/*.result | grep -c '^FAIL' || true)
    echo "$pass passed, $fail failed"
    [ "$fail" = 0 ]
}

main "$@"
