//! `--grow`: on a bigger disk, the last partition is extended to the end and its ext2/3/4
//! filesystem grown with the restored system's own tool set (e2fsck, resize2fs).

use std::io::{Seek, SeekFrom};

use anyhow::{Context, Result, bail};

use crate::device::Disk;
use crate::layout::{DiskLayout, Table};

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
                    .saturating_sub(crate::layout::gpt_array_sectors(
                        g.num_entries,
                        g.entry_size,
                        ss,
                    ));
            let Some(p) = g.partitions.iter_mut().max_by_key(|p| p.last_lba) else {
                return Ok(None);
            };
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
            let end = total.min(u64::from(u32::MAX));
            let start = u64::from(p.starting_lba);
            if start + u64::from(p.sectors) >= end {
                return Ok(None);
            }
            let g = Grown {
                slot: i as u32,
                start: start * ss,
                old_len: u64::from(p.sectors) * ss,
                new_len: (end - start) * ss,
            };
            h[i].sectors = (end - start) as u32;
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
