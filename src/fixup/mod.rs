//! Fix-ups after the blocks are written: what keeps a restored system from booting on new
//! hardware. Each step prints what it did; a step that fails fails the restore.

pub mod bootcheck;
pub mod bootloader;
pub mod devnames;
pub mod efiboot;
pub mod grow;
pub mod volumes;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::device::Disk;
use crate::device::layout::{DiskLayout, Partition, Table};
use crate::device::mount::{PartDev, mount_range, partition_node};
use crate::repo::manifest::{LvMeta, Manifest};
use crate::util::progress::human_bytes;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct FixupOptions {
    /// On a bigger target, grow the last partition and its filesystem (ext2/3/4, XFS, btrfs)
    /// to the end.
    #[arg(long)]
    pub grow: bool,
    /// With --grow, when the last partition is an LVM physical volume: the logical volume to
    /// extend over the new space (and its filesystem) [default: the one holding the root].
    #[arg(long, value_name = "VG/LV")]
    pub grow_lv: Option<String>,
    /// Create a UEFI boot entry for the restored system in this machine's NVRAM and put it
    /// first (always done in the rescue system, never elsewhere unless asked: it changes how
    /// the machine running bmr boots).
    #[arg(long)]
    pub efi_boot_entry: bool,
    /// Run the restored system's own grub-install and grub-mkconfig in a chroot (for what
    /// the other steps cannot fix). Needs the target disk itself, not an image file.
    #[arg(long)]
    pub reinstall_bootloader: bool,
    /// Key file (or a file holding the passphrase) of the LUKS volumes in the snapshot: the
    /// image is written back as ciphertext without it, but the steps inside a volume (its
    /// incrementals, growing its filesystem, device names in a root inside it) need it.
    #[arg(long, value_name = "FILE")]
    pub luks_keyfile: Option<PathBuf>,
    /// Leave the restored system exactly as backed up: no device-name rewrite, no UEFI
    /// fallback loader or boot entry.
    #[arg(long, conflicts_with_all = ["grow", "grow_lv", "reinstall_bootloader", "efi_boot_entry"])]
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
pub fn preflight(m: &Manifest, o: &FixupOptions, target: &std::path::Path) -> Result<()> {
    if let Some(name) = &o.grow_lv {
        grown_lv(m, name)?;
    }
    use std::os::unix::fs::FileTypeExt;
    let is_block = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    if o.reinstall_bootloader
        && let Some(t) = m.tocs.iter().find(|t| t.system && t.volume.is_some())
        && m.areas
            .get(t.area as usize)
            .is_some_and(|a| a.raid.is_some() || a.luks.is_some())
    {
        bail!(
            "--reinstall-bootloader: the root is on {}: bmr reinstalls GRUB for roots on partitions and LVM only; nothing was written (restore without it, then run grub-install on each disk in the restored system)",
            m.fs_name(t)
        );
    }
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
    if o.grow || o.grow_lv.is_some() {
        let last = m
            .areas
            .iter()
            .filter(|a| a.partition.is_some())
            .max_by_key(|a| a.start);
        v.push(match last {
            Some(a) if a.raid.as_ref().is_some_and(|r| r.level == "raid1") => {
                let name = a.raid.as_ref().map(|r| r.volume_name()).unwrap_or_default();
                format!(
                    "fix-up    grow the last partition (an md RAID1 member) to the end of the disk, then {name} (mdadm --grow --size=max) and its filesystem"
                )
            }
            Some(a) if a.luks.is_some() => {
                let inside = match (a.volumes.first(), &o.luks_keyfile) {
                    (Some(v), Some(_)) => format!(", then the filesystem in {}", v.name),
                    (Some(_), None) => {
                        ": its filesystem keeps its size without the key (--luks-keyfile)".into()
                    }
                    (None, _) => String::new(),
                };
                format!(
                    "fix-up    grow the last partition (a LUKS volume, which reaches to its end) to the end of the disk{inside}"
                )
            }
            Some(a) if !a.volumes.is_empty() => {
                let lv = o
                    .grow_lv
                    .clone()
                    .or_else(|| root_lv(m))
                    .unwrap_or_else(|| "no logical volume (none holds a root)".into());
                format!(
                    "fix-up    grow the last partition (an LVM physical volume) to the end of the disk, pvresize, extend {lv} and its filesystem"
                )
            }
            _ => "fix-up    grow the last partition and its filesystem (ext, XFS, btrfs) to the end of the disk"
                .into(),
        });
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
    // What the steps after grow see: a grown logical volume where it lies now.
    let mut now = m.clone();
    if o.grow || o.grow_lv.is_some() {
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
                let md = crate::device::md::probe(&disk.file, p.start, p.len)
                    .ok()
                    .flatten();
                match fstype.as_deref() {
                    _ if let Some(sb) = &md => {
                        if let Some(v) = grow_md(disk, &p, sb)? {
                            for a in now.areas.iter_mut().filter(|a| a.start == p.start) {
                                if let Some(r) = a.raid.as_mut() {
                                    r.size = v.size;
                                }
                                for lv in a.volumes.iter_mut() {
                                    lv.size = v.size;
                                    lv.extents = vec![(v.data_offset, v.size, 0)];
                                }
                            }
                        }
                    }
                    Some("crypto_LUKS") => {
                        // Opened after the partition grew: a LUKS2 "dynamic" or LUKS1 volume
                        // then reaches to its new end.
                        let u = volumes::unlock(m, disk, o.luks_keyfile.as_deref())?;
                        let lv = m
                            .areas
                            .iter()
                            .find(|a| a.start == p.start && a.luks.is_some())
                            .and_then(|a| a.volumes.first());
                        match lv {
                            Some(lv) if o.luks_keyfile.is_some() => {
                                let v = volumes::in_area(true, p.start, lv);
                                let dev = v.open(disk, false)?;
                                grow_fs_on(&v.name, dev.path())?;
                            }
                            _ => step(
                                "grow",
                                "the LUKS volume reaches to the partition's new end; its filesystem keeps its size without the key (--luks-keyfile): grow it after boot",
                            ),
                        }
                        drop(u);
                    }
                    Some("LVM2_member") => {
                        if let Some(lv) = grow_lvm(m, disk, &p, o)? {
                            for v in now.areas.iter_mut().flat_map(|a| a.volumes.iter_mut()) {
                                if v.name == lv.name {
                                    *v = lv.clone();
                                }
                            }
                        }
                    }
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
                            "its {} keeps its size (bmr grows ext2/3/4, XFS and btrfs): grow it after boot",
                            other.map_or("content".to_string(), |t| format!("{t} filesystem"))
                        ),
                    ),
                }
            }
        }
    }
    let layout = DiskLayout::read(&disk.file, disk.size, disk.sector_size)
        .context("cannot read the restored partition table")?;
    let parts = layout.data_partitions();
    // The steps below look inside the LUKS volumes they can open.
    let _unlocked = volumes::unlock(&now, disk, o.luks_keyfile.as_deref())?;
    if o.luks_keyfile.is_none() {
        for a in now.areas.iter().filter(|a| a.luks.is_some()) {
            if let Some(v) = a.volumes.first() {
                step(
                    "luks",
                    &format!(
                        "{} stays closed (no --luks-keyfile): device names and the boot check do not look inside it",
                        v.name
                    ),
                );
            }
        }
    }
    device_names(&now, disk, &parts)?;
    if let Some(esp) = parts.iter().find(|p| p.type_desc == efiboot::ESP_TYPE) {
        uefi(&now, disk, esp, &layout, o)?;
    }
    if o.reinstall_bootloader {
        reinstall_bootloader(&now, disk, &parts)?;
    }
    boot_check(&now, disk, &layout)
}

/// Would the restored system find every filesystem its fstab mounts? One that is missing (and
/// not `nofail`) keeps it from booting: the restore fails, saying which and what to do.
fn boot_check(m: &Manifest, disk: &Disk, layout: &DiskLayout) -> Result<()> {
    let parts = layout.data_partitions();
    let vols = volumes::list(m, &parts);
    let mut k = bootcheck::Known {
        complete: true,
        devices: disk.is_block,
        ..Default::default()
    };
    for p in &parts {
        if !p.unique_guid.is_empty() {
            k.partuuids.insert(p.unique_guid.to_ascii_lowercase());
        }
    }
    for v in &vols {
        if let volumes::Place::Lv { lv, .. } = &v.place {
            k.lvs.insert(lv.name.clone());
        }
        match v.identify(disk) {
            Some(f)
                if matches!(
                    f.fstype.as_str(),
                    "crypto_LUKS" | "linux_raid_member" | "LVM2_member"
                ) =>
            {
                k.complete = false
            }
            Some(f) => {
                if !f.uuid.is_empty() {
                    k.uuids.insert(f.uuid.to_ascii_lowercase());
                }
                if !f.label.is_empty() {
                    k.labels.insert(f.label.clone());
                }
            }
            None => k.complete = false,
        }
    }
    let ours = crate::device::safety::disk_devnums(&disk.path);
    let is_ours = |spec: &str| {
        use std::os::unix::fs::MetadataExt;
        Some(std::fs::metadata(spec).is_ok_and(|md| ours.contains(&md.rdev())))
    };
    let mut fatal = Vec::new();
    for v in &vols {
        let Some(f) = v.identify(disk) else { continue };
        if !holds_system_files(&f.fstype) {
            continue;
        }
        let Ok(mnt) = v.mount(disk, &volumes::tag("check", &v.name), true) else {
            continue;
        };
        for dir in system_dirs(&mnt.dir, f.fstype == "btrfs") {
            let Ok(text) = std::fs::read_to_string(mnt.dir.join(&dir).join("etc/fstab")) else {
                continue;
            };
            let at = format!("{} /{}", v.name, dir.join("etc/fstab").display());
            let missing = bootcheck::check_fstab(&text, &k, &is_ours);
            if missing.is_empty() {
                step(
                    "boot check",
                    &format!("{at}: every filesystem it mounts is on the restored disk"),
                );
            }
            for x in missing {
                let what = format!("{} for {}", x.spec, x.mountpoint);
                if x.soft {
                    step(
                        "boot check",
                        &format!(
                            "{at}: {what} is not on the restored disk; the system boots without it"
                        ),
                    );
                } else if !x.certain {
                    step(
                        "boot check",
                        &format!(
                            "{at}: {what} is not on the restored disk, unless it is inside an encrypted or RAID volume there: check it"
                        ),
                    );
                } else {
                    step(
                        "boot check",
                        &format!(
                            "{at}: {what} is not on the restored disk: the system would stop at boot (emergency mode)"
                        ),
                    );
                    fatal.push(format!("{at} mounts {what}"));
                }
            }
        }
    }
    if !fatal.is_empty() {
        bail!(
            "the restored system would not boot: {}, which the restored disk does not have; the blocks are restored: restore that disk too, correct the entry (UUID=...), or mark it nofail",
            fatal.join("; ")
        );
    }
    Ok(())
}

/// The logical volume holding the image's root filesystem (its file list holds /etc/fstab).
fn root_lv(m: &Manifest) -> Option<String> {
    m.tocs
        .iter()
        .filter(|t| t.system)
        .find_map(|t| t.volume.clone())
}

/// The logical volume `--grow-lv` names, as the image records it.
fn grown_lv<'a>(m: &'a Manifest, name: &str) -> Result<&'a LvMeta> {
    let lvs: Vec<&LvMeta> = m
        .areas
        .iter()
        .filter(|a| a.raid.is_none())
        .flat_map(|a| &a.volumes)
        .collect();
    lvs.iter()
        .find(|v| v.name == name)
        .copied()
        .with_context(|| {
            format!(
                "--grow-lv {}: the snapshot has no such logical volume (it has: {}); nothing was written",
                crate::util::text::elide_path(name.as_bytes()),
                if lvs.is_empty() {
                    "none".to_string()
                } else {
                    lvs.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
                }
            )
        })
}

/// The grown last partition is an LVM physical volume: give the new space to the PV, then to
/// the logical volume holding the root (or `--grow-lv`), then to its filesystem.
fn grow_lvm(m: &Manifest, disk: &Disk, p: &Partition, o: &FixupOptions) -> Result<Option<LvMeta>> {
    use crate::device::lvm::{field, lvm, num, parse_pe_range, report};
    let Some(name) = o.grow_lv.clone().or_else(|| root_lv(m)) else {
        step(
            "grow",
            "the physical volume's logical volumes keep their sizes (none holds a root; name one with --grow-lv VG/LV or bmr.grow-lv=)",
        );
        return Ok(None);
    };
    let mut meta = grown_lv(m, &name)?.clone();
    let vg = name.split('/').next().unwrap_or_default();
    let dev = PartDev::open(disk, p)?;
    let pv = dev.path.display().to_string();
    let only = ["--devices", pv.as_str()];
    let run = |args: &[&str]| -> Result<String> {
        let mut a = args.to_vec();
        a.extend_from_slice(&only);
        lvm(&a)
    };
    run(&["pvresize", &pv]).with_context(|| {
        format!(
            "grow: cannot resize the physical volume on partition {}",
            p.number
        )
    })?;
    let vgs = report(
        "vgs",
        "vg_name,vg_extent_size,vg_free_count",
        &[&only[..], &[vg]].concat(),
    )
    .with_context(|| format!("grow: volume group {vg} is not on the restored disk"))?;
    let row = vgs.first().context("grow: lvm reported no volume group")?;
    let (ext, free) = (num(row, "vg_extent_size")?, num(row, "vg_free_count")?);
    step(
        "grow",
        &format!(
            "physical volume on partition {} resized: {} free in {vg}",
            p.number,
            human_bytes(ext * free)
        ),
    );
    if free > 0 {
        run(&["lvextend", "-l", "+100%FREE", &name])
            .with_context(|| format!("grow: cannot extend {name}"))?;
    }
    // Where the volume lies now: lvextend may have added a segment.
    let pe_start = num(
        report("pvs", "pe_start", &[&only[..], &[pv.as_str()]].concat())?
            .first()
            .context("grow: lvm reported no physical volume")?,
        "pe_start",
    )?;
    let segs = report(
        "lvs",
        "lv_size,seg_start,seg_pe_ranges",
        &[&only[..], &["--segments", &name]].concat(),
    )?;
    meta.extents.clear();
    for r in &segs {
        meta.size = num(r, "lv_size")?;
        let (_, first, count) = parse_pe_range(field(r, "seg_pe_ranges")?)?;
        meta.extents
            .push((pe_start + first * ext, count * ext, num(r, "seg_start")?));
    }
    step(
        "grow",
        &format!("{name} extended to {}", human_bytes(meta.size)),
    );
    let vol = volumes::Volume {
        name: name.clone(),
        place: volumes::Place::Lv {
            part_start: p.start,
            lv: meta.clone(),
        },
    };
    drop(dev);
    let dev = vol.open(disk, false)?;
    grow_fs_on(&name, dev.path())?;
    Ok(Some(meta))
}

/// The grown last partition is an md RAID1 member: assemble the array from it, let md take
/// the new space (`mdadm --grow --size=max`), then grow the filesystem inside. The member's
/// superblock as it is now.
fn grow_md(
    disk: &Disk,
    p: &Partition,
    sb: &crate::device::md::MdSuper,
) -> Result<Option<crate::device::md::MdSuper>> {
    use crate::device::md::{Array, mdadm, probe};
    let name = crate::repo::manifest::MdMeta::from_super(sb).volume_name();
    if sb.level != 1 {
        step(
            "grow",
            &format!(
                "{name} ({}) keeps its size: bmr grows RAID1 arrays",
                sb.level_name()
            ),
        );
        return Ok(None);
    }
    let dev = PartDev::open(disk, p)?;
    let arr = Array::assemble(&[&dev.path])?;
    mdadm(&["--grow", &arr.path.display().to_string(), "--size=max"])
        .with_context(|| format!("grow: cannot grow {name} over the grown partition"))?;
    grow_fs_on(&name, &arr.path)?;
    drop(arr);
    drop(dev);
    disk.forget_cached(p.start, p.len);
    let now = probe(&disk.file, p.start, p.len)?
        .context("grow: the md superblock is gone after growing the array")?;
    step(
        "grow",
        &format!(
            "{name} grown from {} to {}",
            human_bytes(sb.size),
            human_bytes(now.size)
        ),
    );
    Ok(Some(now))
}

/// Grow the filesystem on the block device `dev` (a logical volume, an md array) to its size:
/// ext2/3/4 with resize2fs, XFS and btrfs mounted (the kernel does the work).
fn grow_fs_on(name: &str, dev: &std::path::Path) -> Result<()> {
    match crate::fs::id::identify(dev).map(|f| f.fstype).as_deref() {
        Some(t) if is_ext(t) => step("grow", &format!("{name}: {}", grow::grow_ext(dev)?)),
        Some(t @ ("xfs" | "btrfs")) => {
            let mnt = crate::device::mount::mount_device(
                dev,
                Some(t),
                None,
                &volumes::tag("grow", name),
                false,
            )?;
            step(
                "grow",
                &format!("{name}: {}", grow::grow_mounted(t, &mnt.dir)?),
            );
        }
        other => step(
            "grow",
            &format!(
                "{name}: its {} keeps its size (bmr grows ext2/3/4, XFS and btrfs): grow it after boot",
                other.map_or("content".to_string(), |t| format!("{t} filesystem"))
            ),
        ),
    }
    Ok(())
}

/// A volume group activated by lvm for the chroot (GRUB's tools must see a root LV as LVM);
/// deactivated on drop.
struct ActiveVg {
    vg: String,
    pv: String,
}

impl ActiveVg {
    fn activate(vg: &str, pv: &str) -> Result<ActiveVg> {
        crate::device::lvm::lvm(&["vgchange", "-ay", vg, "--devices", pv])
            .with_context(|| format!("cannot activate the restored volume group {vg}"))?;
        Ok(ActiveVg {
            vg: vg.into(),
            pv: pv.into(),
        })
    }
}

impl Drop for ActiveVg {
    fn drop(&mut self) {
        if let Err(e) =
            crate::device::lvm::lvm(&["vgchange", "-an", &self.vg, "--devices", &self.pv])
        {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The volume an fstab device names, among the restored disk's (UUID=, LABEL=, a partition's
/// path, /dev/mapper/VG-LV, /dev/VG/LV).
fn volume_named<'a>(
    spec: &str,
    vols: &'a [volumes::Volume],
    disk: &Disk,
) -> Option<&'a volumes::Volume> {
    let id = |v: &volumes::Volume| v.identify(disk);
    if let Some(u) = spec.strip_prefix("UUID=") {
        return vols
            .iter()
            .find(|v| id(v).is_some_and(|f| f.uuid.eq_ignore_ascii_case(u.trim_matches('"'))));
    }
    if let Some(l) = spec.strip_prefix("LABEL=") {
        return vols
            .iter()
            .find(|v| id(v).is_some_and(|f| f.label == l.trim_matches('"')));
    }
    if let Some((_, n)) = devnames::parse_partition(spec) {
        return vols
            .iter()
            .find(|v| v.partition().is_some_and(|p| p.number == n));
    }
    let lv = match spec.strip_prefix("/dev/mapper/") {
        Some(m) => bootcheck::mapper_to_lv(m)?,
        None => spec.strip_prefix("/dev/")?.to_string(),
    };
    vols.iter().find(|v| v.name == lv)
}

fn reinstall_bootloader(m: &Manifest, disk: &Disk, parts: &[Partition]) -> Result<()> {
    let vols = volumes::list(m, parts);
    let root = vols.iter().find_map(|v| {
        let f = v.identify(disk)?;
        // btrfs roots live in subvolumes that a chroot would have to mount as /.
        if !is_ext(&f.fstype) && f.fstype != "xfs" {
            return None;
        }
        let mnt = v.mount(disk, &volumes::tag("root", &v.name), true).ok()?;
        let fstab = std::fs::read_to_string(mnt.dir.join("etc/fstab")).ok()?;
        Some((v, f.fstype, fstab))
    });
    let Some((root, fstype, fstab)) = root else {
        bail!(
            "--reinstall-bootloader: no root filesystem (ext2/3/4 or XFS with /etc/fstab) on the restored disk (on btrfs: boot the restored system and run grub-install there)"
        );
    };
    // A root LV is mounted through LVM itself, so that grub-mkconfig finds it as one.
    let mut _vg = None;
    let root_dev = match &root.place {
        volumes::Place::Partition(p) => partition_node(&disk.path, p.number)?,
        volumes::Place::Luks { lv, .. } => bail!(
            "--reinstall-bootloader: the root is in LUKS volume {}: bmr reinstalls GRUB for roots on partitions and LVM only; restore without it, boot the restored system and run grub-install there",
            lv.name
        ),
        volumes::Place::Lv { part_start, lv }
            if m.areas
                .iter()
                .any(|a| a.start == *part_start && a.raid.is_some()) =>
        {
            bail!(
                "--reinstall-bootloader: the root is on md array {}: bmr reinstalls GRUB for roots on partitions and LVM only; restore without it, boot the restored system and run grub-install on each disk there",
                lv.name
            );
        }
        volumes::Place::Lv { part_start, lv } => {
            let pv = parts
                .iter()
                .find(|p| p.start == *part_start)
                .context("internal error: the root LV's PV vanished")?;
            let pv = partition_node(&disk.path, pv.number)?.display().to_string();
            let vg = lv.name.split('/').next().unwrap_or_default().to_string();
            _vg = Some(ActiveVg::activate(&vg, &pv)?);
            PathBuf::from(format!("/dev/{}", lv.name))
        }
    };
    let mnt = crate::device::mount::mount_device(
        &root_dev,
        Some(&fstype),
        None,
        &volumes::tag("chroot", &root.name),
        false,
    )
    .with_context(|| {
        format!(
            "--reinstall-bootloader: cannot mount the restored root {}",
            root.name
        )
    })?;
    // A separate /boot (Ubuntu's and RHEL's installs), as its fstab names it.
    let boot = fstab
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 2 && !f[0].starts_with('#') && f[1] == "/boot")
        .map(|f| f[0].to_string());
    let boot = match boot {
        None => None,
        Some(spec) => {
            let v = volume_named(&spec, &vols, disk).with_context(|| {
                format!("--reinstall-bootloader: /boot ({spec}) is not on the restored disk")
            })?;
            let t = v
                .identify(disk)
                .map(|f| f.fstype)
                .with_context(|| format!("--reinstall-bootloader: no filesystem on {}", v.name))?;
            let dev = match v.partition() {
                Some(p) => partition_node(&disk.path, p.number)?,
                None => PathBuf::from(format!("/dev/{}", v.name)),
            };
            Some((dev, t))
        }
    };
    let esp = parts
        .iter()
        .find(|p| p.type_desc == efiboot::ESP_TYPE)
        .map(|p| partition_node(&disk.path, p.number))
        .transpose()?;
    let uefi = efiboot::firmware_is_uefi();
    let boot = boot.as_ref().map(|(d, t)| (d.as_path(), t.as_str()));
    for line in bootloader::reinstall(&mnt.dir, &disk.path, boot, esp.as_deref(), uefi)? {
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
    for vol in volumes::list(m, parts) {
        let Some(f) = vol.identify(disk) else {
            continue;
        };
        if !holds_system_files(&f.fstype) {
            continue;
        }
        let tag = volumes::tag("fix", &vol.name);
        let name = &vol.name;
        // Read-only first: a filesystem with nothing to change stays exactly as restored.
        let texts: Vec<(PathBuf, &str, String)> = {
            let mnt = match vol.mount(disk, &tag, true) {
                Ok(m) => m,
                // The blocks are restored; only this check is lost, and the log says so.
                Err(e) => {
                    step(
                        "device names",
                        &format!(
                            "{name} ({}): {e:#}; its fstab and GRUB files were not checked: check them",
                            f.fstype
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
                            "{name}: its files name partitions of several disks ({}) and the backup does not say which one it was; left as they are: check them",
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
                        "{name}: its files name partitions of {}, not of the backed-up disk ({}); left as they are. If that was this disk's name on its machine, back it up with --source-name",
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
        let mnt = vol.mount(disk, &tag, false)?;
        for (rel, new, diff) in rewrites {
            let rel = rel.display();
            std::fs::write(mnt.dir.join(rel.to_string()), new)
                .with_context(|| format!("cannot write /{rel} on the restored {name}"))?;
            step(
                "device names",
                &format!(
                    "{name} /{rel}: {} -> UUID=",
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
