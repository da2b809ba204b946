//! `--grow`: on a bigger disk, the last partition is extended to the end and its filesystem
//! grown: ext2/3/4 offline (e2fsck, resize2fs), XFS and btrfs mounted (xfs_growfs,
//! `btrfs filesystem resize max`), as their tools require.

use std::io::{Seek, SeekFrom};

use anyhow::{Context, Result, bail};

use crate::device::Disk;
use crate::device::layout::{DiskLayout, Table};

/// The partition that grew.
pub struct Grown {
    pub slot: u32,
    pub start: u64,
    pub old_len: u64,
    pub new_len: u64,
}

const EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];

/// Extend the last partition of the target's table to the end of the disk. None: it already
/// ends there (or the disk has no table).
pub fn grow_table(disk: &Disk) -> Result<Option<Grown>> {
    let ss = disk.sector_size;
    let mut layout = DiskLayout::read(&disk.file, disk.size, ss)
        .context("--grow: cannot read the restored partition table")?;
    let total = disk.size / ss;
    let grown = match &mut layout.table {
        Table::Gpt(g) => {
            let last_usable =
                total
                    .saturating_sub(2)
                    .saturating_sub(crate::device::layout::gpt_array_sectors(
                        g.num_entries,
                        g.entry_size,
                        ss,
                    ));
            let Some(p) = g.partitions.iter_mut().max_by_key(|p| p.last_lba) else {
                return Ok(None);
            };
            // Whole 4 KiB: a LUKS volume with 4 KiB sectors refuses any other size.
            let per = (4096 / ss).max(1);
            let last_usable = (p.first_lba
                + (last_usable + 1).saturating_sub(p.first_lba) / per * per)
                .saturating_sub(1);
            if p.last_lba >= last_usable {
                return Ok(None);
            }
            let g = Grown {
                slot: p.slot,
                start: p.first_lba * ss,
                old_len: (p.last_lba + 1 - p.first_lba) * ss,
                new_len: (last_usable + 1 - p.first_lba) * ss,
            };
            p.last_lba = last_usable;
            layout
                .write_table(&disk.file, disk.size)
                .context("--grow: cannot write the grown partition table")?;
            g
        }
        Table::Mbr(_) => {
            let mut f = &disk.file;
            f.seek(SeekFrom::Start(0))?;
            let mut h = mbrman::MBRHeader::read_from(&mut f)
                .context("--grow: cannot read the restored MBR")?;
            let Some((i, p)) = h
                .iter()
                .filter(|(_, p)| p.is_used())
                .max_by_key(|(_, p)| u64::from(p.starting_lba) + u64::from(p.sectors))
            else {
                return Ok(None);
            };
            if EXTENDED.contains(&p.sys) {
                bail!(
                    "--grow: the last partition is a logical one inside an extended partition; --grow extends primary partitions only: grow it with parted after the restore"
                );
            }
            let start = u64::from(p.starting_lba);
            let per = (4096 / ss).max(1);
            let end = start + total.min(u64::from(u32::MAX)).saturating_sub(start) / per * per;
            if start + u64::from(p.sectors) >= end {
                return Ok(None);
            }
            let g = Grown {
                slot: i as u32,
                start: start * ss,
                old_len: u64::from(p.sectors) * ss,
                new_len: (end - start) * ss,
            };
            let geometry = chs_geometry(&h);
            h[i].sectors = (end - start) as u32;
            // Old BIOSes and some boot loaders still read the CHS end address.
            if !h[i].last_chs.is_empty() {
                h[i].last_chs = end_chs(end - 1, geometry);
            }
            f.seek(SeekFrom::Start(0))?;
            h.write_into(&mut f)
                .context("--grow: cannot write the grown MBR")?;
            g
        }
        Table::None => return Ok(None),
    };
    disk.file
        .sync_all()
        .context("--grow: cannot flush the target")?;
    disk.reread_partitions();
    Ok(Some(grown))
}

/// The CHS geometry (heads, sectors per track) the table's addresses were written with, so the
/// grown entry's end address agrees with them; 255/63, what fdisk and sgdisk assume, when no
/// address tells.
fn chs_geometry(h: &mbrman::MBRHeader) -> (u8, u8) {
    const CANDIDATES: [(u8, u8); 6] =
        [(255, 63), (240, 63), (128, 63), (64, 32), (16, 63), (4, 32)];
    let samples: Vec<(mbrman::CHS, u64)> = h
        .iter()
        .filter(|(_, p)| p.is_used() && p.sectors > 0)
        .flat_map(|(_, p)| {
            let start = u64::from(p.starting_lba);
            [
                (p.first_chs, start),
                (p.last_chs, start + u64::from(p.sectors) - 1),
            ]
        })
        // Empty and "beyond cylinder 1023" addresses say nothing about the geometry.
        .filter(|(c, _)| c.sector > 0 && c.cylinder < 1023)
        .collect();
    CANDIDATES
        .into_iter()
        .find(|&(heads, sectors)| {
            !samples.is_empty()
                && samples.iter().all(|(c, lba)| {
                    c.head < heads
                        && c.sector <= sectors
                        && (u64::from(c.cylinder) * u64::from(heads) + u64::from(c.head))
                            * u64::from(sectors)
                            + u64::from(c.sector)
                            - 1
                            == *lba
                })
        })
        .unwrap_or((255, 63))
}

/// The CHS address of `lba`, or the "beyond cylinder 1023" marker fdisk writes.
fn end_chs(lba: u64, (heads, sectors): (u8, u8)) -> mbrman::CHS {
    u32::try_from(lba)
        .ok()
        .and_then(|l| mbrman::CHS::from_lba_exact(l, 1023, heads, sectors).ok())
        .unwrap_or(mbrman::CHS::new(1023, heads - 1, sectors))
}

/// Check and grow an ext2/3/4 filesystem to fill its (grown) device.
pub fn grow_ext(dev: &std::path::Path) -> Result<String> {
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .arg(dev)
            .output()
            .with_context(|| format!("--grow: cannot run {cmd}: is e2fsprogs installed?"))
    };
    // resize2fs refuses a filesystem not checked since its last mount.
    let fsck = run("e2fsck", &["-f", "-p"])?;
    if fsck.status.code().is_none_or(|c| c > 1) {
        bail!(
            "--grow: e2fsck found problems it cannot fix by itself on {}: {}",
            dev.display(),
            String::from_utf8_lossy(&fsck.stdout).trim()
        );
    }
    let out = run("resize2fs", &[])?;
    if !out.status.success() {
        bail!(
            "--grow: resize2fs failed on {}: {}",
            dev.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.contains("is now"))
        .unwrap_or("filesystem grown")
        .trim()
        .to_string())
}

/// Grow a mounted XFS or btrfs to the size of its partition; the tool's summary.
pub fn grow_mounted(fstype: &str, mountpoint: &std::path::Path) -> Result<String> {
    let (cmd, args, pkg): (&str, &[&str], &str) = match fstype {
        "xfs" => ("xfs_growfs", &["-d"], "xfsprogs"),
        "btrfs" => ("btrfs", &["filesystem", "resize", "max"], "btrfs-progs"),
        other => bail!("--grow: bmr does not grow {other} while mounted"),
    };
    let out = match std::process::Command::new(cmd)
        .args(args)
        .arg(mountpoint)
        .output()
    {
        // The partition is grown and the filesystem intact: it grows after boot as well.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(format!(
                "its {fstype} filesystem keeps its size: {cmd} ({pkg}) is not on this system; grow it after boot"
            ));
        }
        r => r.with_context(|| format!("--grow: cannot run {cmd}"))?,
    };
    if !out.status.success() {
        bail!(
            "--grow: {cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // xfs_growfs: "data blocks changed from 81920 to 176640"; btrfs: "Resize device id 1 ...".
    Ok(text
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .find(|l| l.contains("changed from") || l.starts_with("Resize"))
        .map_or_else(
            || format!("{fstype} filesystem grown"),
            |l| format!("{fstype}: {}", l.trim()),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mbrman::{CHS, MBRHeader, MBRPartitionEntry};

    fn entry(start: u32, sectors: u32, heads: u8, spt: u8) -> MBRPartitionEntry {
        MBRPartitionEntry {
            boot: mbrman::BOOT_INACTIVE,
            first_chs: CHS::from_lba_exact(start, 1023, heads, spt).unwrap(),
            sys: 0x83,
            last_chs: CHS::from_lba_exact(start + sectors - 1, 1023, heads, spt).unwrap(),
            starting_lba: start,
            sectors,
        }
    }

    #[test]
    fn geometry_is_read_from_the_existing_addresses() {
        let mut h = MBRHeader::new([1, 2, 3, 4]);
        h[1] = entry(32, 4000, 4, 32);
        h[2] = entry(4032, 8000, 4, 32);
        assert_eq!(chs_geometry(&h), (4, 32));
        h[2] = entry(4032, 8000, 255, 63);
        assert_eq!(
            chs_geometry(&h),
            (255, 63),
            "inconsistent: the usual default"
        );
        assert_eq!(chs_geometry(&MBRHeader::new([0; 4])), (255, 63));
    }

    #[test]
    fn an_end_beyond_cylinder_1023_gets_the_marker() {
        assert_eq!(end_chs(20 << 21, (255, 63)), CHS::new(1023, 254, 63));
        assert_eq!(end_chs(u64::MAX, (255, 63)), CHS::new(1023, 254, 63));
        assert_eq!(end_chs(163_839, (255, 63)), CHS::new(10, 50, 40));
    }
}
