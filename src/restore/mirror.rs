//! `--mirror-disk`: the second disk of a restored md RAID1. The image holds one member (every
//! byte of a mirror is on each member); the restore writes it to the target, and this step
//! makes the mirror disk a twin of the target: the same partition table with new GUIDs, the
//! boot code and the ESP and BIOS boot partitions copied, and each RAID1 member partition
//! added to its array (`mdadm --add`), which md then copies from the restored member. The
//! copy goes on in the background after boot if the restore ends first (`/proc/mdstat`).

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::device::Disk;
use crate::device::layout::{DiskLayout, Table};
use crate::device::md::{Array, mdadm};
use crate::device::mount::PartDev;
use crate::fixup::efiboot::ESP_TYPE as ESP;
use crate::repo::manifest::Manifest;

/// GRUB's BIOS boot partition (GPT type): copied with the ESP.
const BIOS_BOOT: &str = "21686148-6449-6e6f-744e-656564454649";

/// What `run` did, one line each, for the restore's output.
pub fn run(m: &Manifest, target: &Disk, mirror: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut disk = Disk::open_write(mirror)?;
    let mut layout = DiskLayout::read(&target.file, target.size, target.sector_size)
        .context("--mirror-disk: cannot read the restored partition table")?;
    if disk.size < layout.min_target_size() {
        bail!(
            "--mirror-disk {}: it is smaller than the restored disk's partitions need",
            mirror.display()
        );
    }
    match &mut layout.table {
        Table::Gpt(g) => {
            g.disk_guid = random_guid()?;
            for p in &mut g.partitions {
                p.unique_guid = random_guid()?;
            }
        }
        Table::Mbr(t) => {
            let mut b = [0u8; 4];
            random(&mut b)?;
            t.disk_signature = format!("0x{:08x}", u32::from_le_bytes(b));
        }
        Table::None => bail!("--mirror-disk: the restored disk has no partition table"),
    }
    let parts = layout.data_partitions();
    // The bytes outside the partitions up to the last one's end: boot code, the MBR and its
    // extended boot records (the partition table of an MBR disk is in them), GRUB's core in the
    // gap of an MBR disk. A GPT is written afresh below; the target's tail (its backup GPT)
    // is no use on another disk.
    let end = parts.iter().map(|p| p.start + p.len).max().unwrap_or(0);
    for r in layout.raw_areas().iter().filter(|r| r.start < end) {
        copy(target, &disk, r.start, r.len.min(end - r.start))?;
    }
    if let Table::Mbr(t) = &layout.table {
        let sig = u32::from_str_radix(t.disk_signature.trim_start_matches("0x"), 16)
            .context("internal error: a disk signature that is not hex")?;
        disk.file
            .write_all_at(&sig.to_le_bytes(), 440)
            .map_err(|e| disk.io_error("write", 440, 4, e))?;
    }
    let mut members = Vec::new();
    for p in &parts {
        let area = m
            .areas
            .iter()
            .find(|a| a.start == p.start && a.partition == Some(p.number));
        if let Some(md) = area
            .and_then(|a| a.raid.as_ref())
            .filter(|r| r.level == "raid1")
        {
            members.push((p.clone(), md.volume_name()));
        } else if [ESP, BIOS_BOOT].contains(&p.type_desc.as_str()) {
            copy(target, &disk, p.start, p.len)?;
            out.push(format!(
                "mirror {}: partition {} copied from the target ({})",
                mirror.display(),
                p.number,
                if p.type_desc == ESP {
                    "EFI system partition"
                } else {
                    "BIOS boot partition"
                }
            ));
        }
    }
    if members.is_empty() {
        bail!("--mirror-disk: the restored disk has no md RAID1 member");
    }
    layout
        .write_table(&disk.file, disk.size)
        .with_context(|| format!("cannot write the partition table to {}", mirror.display()))?;
    disk.flush()?;
    // The kernel reads the new table only once nobody holds the disk exclusively, and mdadm
    // claims the member partition for itself.
    disk.release_exclusive()?;
    disk.reread_partitions();
    for (p, name) in members {
        let src = PartDev::open(target, &p)?;
        let dst = PartDev::open(&disk, &p)?;
        wait_for(&dst.path)?;
        let arr = Array::assemble(&[&src.path])?;
        let a = arr.path.display().to_string();
        let d = dst.path.display().to_string();
        // A superblock left on the new member from an earlier life would make it a stale
        // member of some array; none is the usual case.
        let _ = mdadm(&["--zero-superblock", &d]);
        mdadm(&[&a, "--add", &d]).with_context(|| format!("cannot add {d} to {name}"))?;
        out.push(format!(
            "mirror {}: partition {} added to {name}; md copies the mirror's data to it (it goes on after boot if not done: /proc/mdstat)",
            mirror.display(),
            p.number
        ));
        drop(arr);
    }
    Ok(out)
}

fn copy(from: &Disk, to: &Disk, at: u64, len: u64) -> Result<()> {
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        from.file
            .read_exact_at(&mut buf[..n], at + pos)
            .map_err(|e| from.io_error("read", at + pos, n as u64, e))?;
        to.file
            .write_all_at(&buf[..n], at + pos)
            .map_err(|e| to.io_error("write", at + pos, n as u64, e))?;
        pos += n as u64;
    }
    Ok(())
}

/// Partition nodes of a freshly written table appear once the kernel has read it.
fn wait_for(dev: &Path) -> Result<()> {
    for _ in 0..50 {
        if dev.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!(
        "{} did not appear after the partition table was written",
        dev.display()
    )
}

fn random(b: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(b))
        .context("cannot read /dev/urandom for new disk and partition GUIDs")
}

fn random_guid() -> Result<String> {
    let mut b = [0u8; 16];
    random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(crate::device::layout::guid_to_string(&b))
}

/// Refuse a mirror disk before anything is written: the snapshot must hold a RAID1 member,
/// and the mirror must not be the target.
pub fn preflight(m: &Manifest, target: &Path, mirror: &Path) -> Result<()> {
    if !m
        .areas
        .iter()
        .any(|a| a.raid.as_ref().is_some_and(|r| r.level == "raid1") && !a.volumes.is_empty())
    {
        bail!(
            "--mirror-disk {}: snapshot {} holds no md RAID1 member; nothing was written",
            mirror.display(),
            m.id
        );
    }
    let same = |a: &Path, b: &Path| {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => (x.dev(), x.ino(), x.rdev()) == (y.dev(), y.ino(), y.rdev()),
            _ => a == b,
        }
    };
    if same(target, mirror) {
        bail!(
            "--mirror-disk {} is the target itself: give the second disk; nothing was written",
            mirror.display()
        );
    }
    Ok(())
}

/// The partitions of the mirror disk, for the plan.
pub fn plan_line(m: &Manifest, mirror: &Path, size: u64, holds: Option<&str>) -> Vec<String> {
    let arrays: Vec<String> = m
        .areas
        .iter()
        .filter_map(|a| a.raid.as_ref().filter(|r| r.level == "raid1"))
        .map(|r| r.volume_name())
        .collect();
    let mut v = vec![format!(
        "  mirror    {} ({}): the target's partition table (new GUIDs), its boot code, ESP and BIOS boot partitions; added to {} (md copies the data)",
        mirror.display(),
        crate::util::progress::human_bytes(size),
        arrays.join(", ")
    )];
    if let Some(h) = holds {
        v.push(format!("            holds {h}: it will be overwritten"));
    }
    v
}
