//! Fix-ups after the blocks are written: what keeps a restored system from booting on new
//! hardware. Each step prints what it did; a step that fails fails the restore.

pub mod bootloader;
pub mod devnames;
pub mod efiboot;
pub mod grow;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::device::Disk;
use crate::device::layout::{DiskLayout, Partition, Table};
use crate::device::mount::{PartDev, mount_range, partition_node};
use crate::repo::manifest::Manifest;
use crate::util::progress::human_bytes;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct FixupOptions {
    /// On a bigger target, grow the last partition and its filesystem (ext2/3/4, XFS, btrfs)
    /// to the end.
    #[arg(long)]
    pub grow: bool,
    /// Create a UEFI boot entry for the restored system in this machine's NVRAM and put it
    /// first (always done in the rescue system, never elsewhere unless asked: it changes how
    /// the machine running bmr boots).
    #[arg(long)]
    pub efi_boot_entry: bool,
    /// Run the restored system's own grub-install and grub-mkconfig in a chroot (for what
    /// the other steps cannot fix). Needs the target disk itself, not an image file.
    #[arg(long)]
    pub reinstall_bootloader: bool,
    /// Leave the restored system exactly as backed up: no device-name rewrite, no UEFI
    /// fallback loader or boot entry.
    #[arg(long, conflicts_with_all = ["grow", "reinstall_bootloader", "efi_boot_entry"])]
    pub no_fixups: bool,
}

fn is_ext(fstype: &str) -> bool {
    matches!(fstype, "ext2" | "ext3" | "ext4")
}

/// Filesystems a Linux root or /boot lives on.
fn holds_system_files(fstype: &str) -> bool {
    is_ext(fstype) || matches!(fstype, "xfs" | "btrfs")
}

/// The directories of a mounted filesystem that hold a system's files: its root, and on
/// btrfs (mounted at the top level) each subvolume up to two levels down that holds an
/// /etc/fstab or a GRUB configuration (`@`, `root`, `@rootfs`). Snapshots inside a system
/// (snapper's `@/.snapshots/N/snapshot`) are left as they were taken.
fn system_dirs(mnt: &Path, btrfs: bool) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let holds = |d: &Path| {
        devnames::FILES
            .iter()
            .any(|rel| mnt.join(d).join(rel).is_file())
    };
    let mut out = vec![PathBuf::new()];
    let mut level = vec![PathBuf::new()];
    for _ in 0..if btrfs { 2 } else { 0 } {
        let mut next = Vec::new();
        for d in &level {
            // A system's own directories hold no subvolume layout.
            if !d.as_os_str().is_empty() && holds(d) {
                continue;
            }
            let Ok(rd) = std::fs::read_dir(mnt.join(d)) else {
                continue;
            };
            for e in rd.flatten() {
                let sub = d.join(e.file_name());
                let Ok(md) = std::fs::symlink_metadata(mnt.join(&sub)) else {
                    continue;
                };
                if !md.is_dir() {
                    continue;
                }
                // Inode 256: the root directory of a subvolume.
                if md.ino() == 256 {
                    out.push(sub.clone());
                }
                next.push(sub);
            }
        }
        level = next;
    }
    out.retain(|d| holds(d));
    out
}

/// Refuse, before anything is written, what the fix-ups cannot do on this target.
pub fn preflight(o: &FixupOptions, target: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let is_block = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    if o.reinstall_bootloader && !is_block {
        bail!(
            "--reinstall-bootloader runs grub-install on the target disk: give a disk (/dev/...), not an image file"
        );
    }
    Ok(())
}

/// What the fix-ups will do, for the restore plan.
pub fn plan_lines(m: &Manifest, o: &FixupOptions) -> Vec<String> {
    if o.no_fixups {
        return vec!["fix-ups   none (--no-fixups)".into()];
    }
    let mut v = Vec::new();
    if o.grow {
        v.push(
            "fix-up    grow the last partition and its filesystem (ext, XFS, btrfs) to the end of the disk"
                .into(),
        );
    }
    v.push("fix-up    device paths (/dev/sdXN) in fstab, crypttab and GRUB files -> UUID=".into());
    let esp = match &m.disk.table {
        Table::Gpt(g) => g
            .partitions
            .iter()
            .any(|p| p.type_guid.eq_ignore_ascii_case(efiboot::ESP_TYPE)),
        _ => false,
    };
    if esp {
        v.push(if o.efi_boot_entry {
            "fix-up    UEFI: fallback loader EFI/BOOT/BOOTX64.EFI, boot entry first in BootOrder"
                .into()
        } else {
            "fix-up    UEFI: fallback loader EFI/BOOT/BOOTX64.EFI (no NVRAM entry without --efi-boot-entry)"
                .into()
        });
    }
    if o.reinstall_bootloader {
        v.push(
            "fix-up    reinstall GRUB with the restored system's grub-install and grub-mkconfig"
                .into(),
        );
    }
    v
}

/// Wait until the kernel sees partition `p` of a block device at its new size.
fn wait_for_size(disk: &Disk, p: &Partition) {
    if !disk.is_block {
        return;
    }
    for _ in 0..50 {
        let sectors = partition_node(&disk.path, p.number)
            .ok()
            .and_then(|n| n.file_name().map(|n| n.to_string_lossy().to_string()))
            .and_then(|n| std::fs::read_to_string(format!("/sys/class/block/{n}/size")).ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        if sectors.is_some_and(|s| s * 512 == p.len) {
            return;
        }
        disk.reread_partitions();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn step(name: &str, what: &str) {
    println!("fix-up {name}: {what}");
}

/// Run the fix-ups on a restored target.
pub fn run(m: &Manifest, disk: &Disk, o: &FixupOptions) -> Result<()> {
    if o.no_fixups {
        return Ok(());
    }
    if o.grow {
        match grow::grow_table(disk)? {
            None => step(
                "grow",
                "the last partition already ends at the end of the disk",
            ),
            Some(g) => {
                step(
                    "grow",
                    &format!(
                        "partition {} grown from {} to {}",
                        g.slot,
                        human_bytes(g.old_len),
                        human_bytes(g.new_len)
                    ),
                );
                let p = Partition {
                    number: g.slot,
                    start: g.start,
                    len: g.new_len,
                    ..Default::default()
                };
                wait_for_size(disk, &p);
                let fstype = crate::fs::id::identify_at(&disk.file, p.start).map(|f| f.fstype);
                match fstype.as_deref() {
                    Some(t) if is_ext(t) => {
                        let dev = PartDev::open(disk, &p)?;
                        step("grow", &grow::grow_ext(&dev.path)?);
                    }
                    // Both grow only while mounted: the kernel does the work.
                    Some(t @ ("xfs" | "btrfs")) => {
                        let mnt = mount_range(disk, p.start, p.len, Some(p.number), "grow", false)?;
                        step("grow", &grow::grow_mounted(t, &mnt.dir)?);
                    }
                    other => step(
                        "grow",
                        &format!(
                            "its {} filesystem keeps its size (bmr grows ext2/3/4, XFS and btrfs): grow it after boot",
                            other.unwrap_or("unknown")
                        ),
                    ),
                }
            }
        }
    }
    let layout = DiskLayout::read(&disk.file, disk.size, disk.sector_size)
        .context("cannot read the restored partition table")?;
    let parts = layout.data_partitions();
    device_names(m, disk, &parts)?;
    if let Some(esp) = parts.iter().find(|p| p.type_desc == efiboot::ESP_TYPE) {
        uefi(m, disk, esp, &layout, o)?;
    }
    if o.reinstall_bootloader {
        reinstall_bootloader(disk, &parts)?;
    }
    Ok(())
}

fn reinstall_bootloader(disk: &Disk, parts: &[Partition]) -> Result<()> {
    let root = parts.iter().find_map(|p| {
        let f = crate::fs::id::identify_at(&disk.file, p.start)?;
        // btrfs roots live in subvolumes that a chroot would have to mount as /.
        if !is_ext(&f.fstype) && f.fstype != "xfs" {
            return None;
        }
        let tag = format!("root{}", p.number);
        let is_root = mount_range(disk, p.start, p.len, Some(p.number), &tag, true)
            .ok()?
            .dir
            .join("etc/fstab")
            .is_file();
        is_root
            .then(|| mount_range(disk, p.start, p.len, Some(p.number), &tag, false).ok())
            .flatten()
    });
    let Some(root) = root else {
        bail!(
            "--reinstall-bootloader: no root filesystem (ext2/3/4 or XFS with /etc/fstab) on the restored disk (on btrfs: boot the restored system and run grub-install there)"
        );
    };
    let esp = parts
        .iter()
        .find(|p| p.type_desc == efiboot::ESP_TYPE)
        .map(|p| partition_node(&disk.path, p.number))
        .transpose()?;
    let uefi = efiboot::firmware_is_uefi();
    for line in bootloader::reinstall(&root.dir, &disk.path, esp.as_deref(), uefi)? {
        step("bootloader", &line);
    }
    Ok(())
}

fn device_names(m: &Manifest, disk: &Disk, parts: &[Partition]) -> Result<()> {
    // The names the restored disk had on its machine, and those it has now: a name in both
    // (restored in place) still finds it and stays.
    let source: BTreeSet<String> = std::iter::once(&m.source)
        .chain(&m.source_names)
        .filter_map(|n| devnames::disk_key(n))
        .collect();
    let target: BTreeSet<String> = if disk.is_block {
        devnames::names_of_disk(&disk.path)
            .iter()
            .filter_map(|n| devnames::disk_key(n))
            .collect()
    } else {
        BTreeSet::new()
    };
    let stale: BTreeSet<String> = source.difference(&target).cloned().collect();
    if !source.is_empty() && stale.is_empty() {
        step(
            "device names",
            &format!("the disk is {} as before: nothing to change", m.source),
        );
        return Ok(());
    }
    let uuids: HashMap<u32, String> = parts
        .iter()
        .filter_map(|p| {
            let f = crate::fs::id::identify_at(&disk.file, p.start)?;
            (!f.uuid.is_empty()).then_some((p.number, f.uuid))
        })
        .collect();
    let mut changed = 0;
    for p in parts {
        let Some(f) = crate::fs::id::identify_at(&disk.file, p.start) else {
            continue;
        };
        if !holds_system_files(&f.fstype) {
            continue;
        }
        let tag = format!("fix{}", p.number);
        // Read-only first: a filesystem with nothing to change stays exactly as restored.
        let texts: Vec<(PathBuf, &str, String)> = {
            let mnt = match mount_range(disk, p.start, p.len, Some(p.number), &tag, true) {
                Ok(m) => m,
                // The blocks are restored; only this check is lost, and the log says so.
                Err(e) => {
                    step(
                        "device names",
                        &format!(
                            "partition {} ({}): {e:#}; its fstab and GRUB files were not checked: check them",
                            p.number, f.fstype
                        ),
                    );
                    continue;
                }
            };
            system_dirs(&mnt.dir, f.fstype == "btrfs")
                .into_iter()
                .flat_map(|dir| {
                    let root = mnt.dir.join(&dir);
                    devnames::FILES.iter().filter_map(move |rel| {
                        std::fs::read_to_string(root.join(rel))
                            .ok()
                            .map(|t| (dir.clone(), *rel, t))
                    })
                })
                .collect()
        };
        let named: BTreeSet<String> = texts
            .iter()
            .flat_map(|(_, rel, t)| devnames::disks_named(rel, t))
            .collect();
        let ours: BTreeSet<String> = if source.is_empty() {
            // An image file's backup does not say what the disk was called: one disk named
            // throughout can only be this one.
            match named.len() {
                0 => continue,
                1 => named.clone(),
                _ => {
                    step(
                        "device names",
                        &format!(
                            "partition {}: its files name partitions of several disks ({}) and the backup does not say which one it was; left as they are: check them",
                            p.number,
                            named.into_iter().collect::<Vec<_>>().join(", ")
                        ),
                    );
                    continue;
                }
            }
        } else {
            named.intersection(&stale).cloned().collect()
        };
        if ours.is_empty() {
            // Files that name this disk only by names it still has are right as they are; files
            // that name no name of it at all may know it by one the backup did not record.
            if !named.is_empty() && named.is_disjoint(&source) {
                step(
                    "device names",
                    &format!(
                        "partition {}: its files name partitions of {}, not of the backed-up disk ({}); left as they are. If that was this disk's name on its machine, back it up with --source-name",
                        p.number,
                        named.iter().cloned().collect::<Vec<_>>().join(", "),
                        source.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
            continue;
        }
        let rewrites: Vec<(PathBuf, String, Vec<String>)> = texts
            .iter()
            .filter_map(|(dir, rel, text)| {
                devnames::rewrite(rel, text, &ours, &uuids).map(|(n, d)| (dir.join(rel), n, d))
            })
            .collect();
        if rewrites.is_empty() {
            continue;
        }
        let mnt = mount_range(disk, p.start, p.len, Some(p.number), &tag, false)?;
        for (rel, new, diff) in rewrites {
            let rel = rel.display();
            std::fs::write(mnt.dir.join(rel.to_string()), new).with_context(|| {
                format!("cannot write /{rel} on the restored partition {}", p.number)
            })?;
            step(
                "device names",
                &format!(
                    "partition {} /{rel}: {} -> UUID=",
                    p.number,
                    ours.iter()
                        .map(|d| devnames::partition_pattern(d))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            for d in diff {
                println!("    {d}");
            }
            changed += 1;
        }
    }
    if changed == 0 {
        step("device names", "no device paths to rewrite");
    }
    Ok(())
}

fn uefi(
    m: &Manifest,
    disk: &Disk,
    p: &Partition,
    layout: &DiskLayout,
    o: &FixupOptions,
) -> Result<()> {
    let esp = efiboot::Esp {
        slot: p.number,
        guid: p.unique_guid.clone(),
        first_lba: p.start / layout.sector_size,
        sectors: p.len / layout.sector_size,
        sector_size: layout.sector_size,
    };
    let state = efiboot::inspect(&disk.file, &esp, &m.efi_boot)?;
    let Some(loader) = state.loader else {
        step(
            "UEFI",
            if state.has_fallback {
                "only the fallback loader EFI/BOOT/BOOTX64.EFI is on the ESP: the firmware boots it"
            } else {
                "no loader on the ESP (EFI/<name>/shimx64.efi or grubx64.efi): the system boots by BIOS"
            },
        );
        return Ok(());
    };
    step(
        "UEFI",
        &efiboot::ensure_fallback(&disk.file, &disk.path, &esp, &loader)?,
    );
    let want_entry = o.efi_boot_entry;
    if !disk.is_block {
        step("UEFI", "no boot entry for an image file");
    } else if !want_entry {
        step(
            "UEFI",
            "no boot entry written (not in the rescue system; --efi-boot-entry does it)",
        );
    } else if !efiboot::firmware_is_uefi() {
        step(
            "UEFI",
            "this machine did not boot by UEFI: no NVRAM to write; the fallback loader boots it",
        );
    } else {
        step("UEFI", &efiboot::nvram_entry(&esp, &loader)?);
    }
    Ok(())
}
