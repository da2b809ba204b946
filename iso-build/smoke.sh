#!/bin/bash
# Boot smoke test of the rescue build: every boot path in QEMU (TCG), each with a blank virtio
# disk and a network card, taking the shell-before-restore entry and checking over the serial
# console that the shell comes up, bmr runs, the disk is seen, ext4 is loaded and the card has
# its driver; then it powers off.
#
#   iso-build/smoke.sh [NAME...]     all paths, or only these (names: see PATHS)
#
# Reads ${BMR_RESCUE_DIR:-target/rescue} (iso-build/build.sh's output); logs go to its logs/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESCUE=${BMR_RESCUE_DIR:-$ROOT/target/rescue}
LOGS=$RESCUE/logs
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
# A hard limit per boot on top of the driver's per-step limits.
BOOT_TIMEOUT=${BMR_SMOKE_TIMEOUT:-900}
JOBS=${BMR_SMOKE_JOBS:-2}

# name: firmware, medium, how the shell entry is chosen.
PATHS=(cd-bios usb-bios cd-uefi usb-uefi pxe-bios pxe-uefi pxelinux-bios grub-netboot-uefi
       kargs-cd-bios kargs-usb-bios kargs-cd-uefi kargs-usb-uefi)
declare -A SPEC=(
    [cd-bios]="bios cd grub"
    [usb-bios]="bios usb grub"
    [cd-uefi]="uefi cd grub"
    [usb-uefi]="uefi usb grub"
    [pxe-bios]="bios ipxe none"
    [pxe-uefi]="uefi ipxe none"
    [pxelinux-bios]="bios pxelinux pxelinux"
    # grub-netboot.cfg in a GRUB netboot directory made by grub-mknetdir.
    [grub-netboot-uefi]="uefi grubnet grub"
    # The ISO with its kernel arguments replaced by set-kargs.sh (the default entry boots).
    [kargs-cd-bios]="bios kargs-cd none"
    [kargs-usb-bios]="bios kargs-usb none"
    [kargs-cd-uefi]="uefi kargs-cd none"
    [kargs-usb-uefi]="uefi kargs-usb none"
)

die() { printf 'smoke.sh: %s\n' "$*" >&2; exit 2; }

# run_path NAME: one boot; prints the reason for a failure on stderr.
run_path() {
    local name=$1 fw medium menu
    read -r fw medium menu <<<"${SPEC[$name]}"
    local d=$LOGS/$name.d
    rm -rf "$d" && mkdir -p "$d"
    truncate -s 64M "$d/blank.img"
    local args=(-accel tcg -m 1024 -smp 1 -no-reboot -display none -monitor none -serial stdio
                -nodefaults -vga std
                -drive "if=none,id=d0,format=raw,file=$d/blank.img"
                -device "virtio-blk-pci,drive=d0,serial=SMOKEDISK")
    if [ "$fw" = uefi ]; then
        cp "$OVMF_VARS" "$d/vars.fd"
        args+=(-M q35 -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
               -drive "if=pflash,format=raw,unit=1,file=$d/vars.fd")
    fi
    local iso=$RESCUE/bmr-rescue.iso
    case $medium in
    kargs-*)
        "$ROOT/iso-build/set-kargs.sh" "$iso" "$d/kargs.iso" "bmr.break" >/dev/null
        iso=$d/kargs.iso
        medium=${medium#kargs-}
        ;;
    esac
    # A network card whose driver must come from coldplug (modalias), as on real hardware.
    case $medium in
    cd | usb)
        local nic=e1000
        [ "$fw" = bios ] || nic=e1000e
        args+=(-nic "user,model=$nic")
        ;;
    esac
    case $medium in
    cd)
        args+=(-drive "if=none,id=cd,media=cdrom,readonly=on,file=$iso"
               -device "ide-cd,drive=cd,bootindex=0")
        ;;
    usb)
        args+=(-device "qemu-xhci,id=xhci"
               -drive "if=none,id=stick,format=raw,readonly=on,file=$iso"
               -device "usb-storage,bus=xhci.0,drive=stick,bootindex=0")
        ;;
    ipxe | pxelinux | grubnet)
        # The bundle as built, except that the iPXE entry also gets bmr.break.
        mkdir -p "$d/tftp"
        cp -a "$RESCUE/pxe/." "$d/tftp/"
        sed -i '/^kernel /s/$/ bmr.break/' "$d/tftp/boot.ipxe"
        local boot=boot.ipxe
        case $medium in
        pxelinux) boot=pxelinux.0 ;;
        grubnet)
            grub-mknetdir --net-directory="$d/tftp" --subdir=grub -d /usr/lib/grub/x86_64-efi \
                >/dev/null 2>&1 || { echo "grub-mknetdir failed" >&2; return 1; }
            { printf '%s\n' "serial --unit=0 --speed=115200" "terminal_input serial console" \
                "terminal_output serial console" "set timeout=3"
              cat "$RESCUE/pxe/grub-netboot.cfg"; } >"$d/tftp/grub/grub.cfg"
            boot=grub/x86_64-efi/core.efi
            ;;
        esac
        args+=(-netdev "user,id=n0,tftp=$d/tftp,bootfile=$boot"
               -device "virtio-net-pci,netdev=n0,bootindex=0")
        ;;
    esac
    timeout -k 10 "$BOOT_TIMEOUT" python3 "$ROOT/iso-build/smoke_console.py" "$LOGS/$name.log" \
        "$menu" -- qemu-system-x86_64 "${args[@]}" || {
        local rc=$?
        [ $rc != 124 ] || echo "no result within $BOOT_TIMEOUT s" >&2
        return 1
    }
    rm -rf "$d"
}

main() {
    if [ ! -f "$RESCUE/bmr-rescue.iso" ] || [ ! -d "$RESCUE/pxe" ]; then
        die "no rescue build in $RESCUE: run iso-build/build.sh first"
    fi
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (apt-get install qemu-system-x86 ovmf ipxe-qemu)"
    [ -f "$OVMF_CODE" ] || die "$OVMF_CODE missing (apt-get install ovmf)"
    local want=("$@") n
    [ ${#want[@]} -gt 0 ] || want=("${PATHS[@]}")
    for n in "${want[@]}"; do
        [ -n "${SPEC[$n]:-}" ] || die "unknown path $n (paths: ${PATHS[*]})"
    done
    mkdir -p "$LOGS"
    for n in "${want[@]}"; do rm -f "$LOGS/$n".{result,err,log}; done
    for n in "${want[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
        (
            if run_path "$n" 2>"$LOGS/$n.err"; then
                echo "PASS $n" | tee "$LOGS/$n.result"
            else
                echo "FAIL $n ($(tail -n 1 "$LOGS/$n.err"); log at $LOGS/$n.log)" |
                    tee "$LOGS/$n.result"
            fi
        ) &
    done
    wait
    local pass=0 fail=0
    for n in "${want[@]}"; do
        if grep -q '^PASS' "$LOGS/$n.result" 2>/dev/null; then
            pass=$((pass + 1))
        else
            fail=$((fail + 1))
        fi
    done
    echo "$pass passed, $fail failed"
    [ "$fail" = 0 ]
}

main "$@"
