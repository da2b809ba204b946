//! Filesystem allocation maps: which blocks of a partition are in use, read from the
//! filesystem's own structures (no mount, no external tools), so a backup skips free space.
//!
//! Mapped: ext2/3/4 ([`ext`]: the block bitmaps), FAT12/16/32 ([`fat`]: the first FAT), XFS
//! v4/v5 ([`xfs`]: each allocation group's by-block-number free-space B+tree) and
//! single-device btrfs ([`btrfs`]: chunk and extent trees, every copy of DUP chunks), Linux
//! swap ([`swap`]: its header page). Every
//! other partition is stored whole, and so is a mapped one whose structures are damaged, not
//! cleanly unmounted, or use a layout bmr does not read (ext external journal device; XFS
//! external log or realtime section; multi-device or striped btrfs).

pub mod btrfs;
pub mod ext;
pub mod fat;
pub mod swap;
mod usedmap;
pub mod xfs;

use crate::fs::read::ReadAt;

use anyhow::{Context, Result};

pub use usedmap::UsedMap;

#[derive(Debug, Clone)]
pub struct FsInfo {
    /// "ext2", "ext3", "ext4", "vfat", "xfs" or "btrfs".
    pub fstype: String,
    /// "fat12", "fat16", "fat32" for vfat; "xfs v4" or "xfs v5" for xfs.
    pub variant: Option<String>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    /// Allocation unit in bytes (ext block or bigalloc cluster, FAT cluster, XFS block, btrfs
    /// sector).
    pub block_size: u64,
    pub used: UsedMap,
    /// What the map could not trust and stored whole instead (ext: a block group whose
    /// descriptor contradicts its bitmap), for the backup's warnings.
    pub warnings: Vec<String>,
}

/// Little-endian readers over on-disk structures; out-of-range reads give 0 (the callers
/// validate every value they use).
pub(crate) fn le16(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Big-endian readers (XFS), with the same out-of-range rule.
pub(crate) fn be16(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}

pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8).map_or(0, |s| {
        u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
    })
}

pub(crate) fn le64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8).map_or(0, |s| {
        u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
    })
}

/// A 16-byte UUID as blkid prints it: 8-4-4-4-12 lowercase hex.
pub(crate) fn uuid_text(b: &[u8]) -> String {
    let h = |r: std::ops::Range<usize>| {
        b.get(r)
            .unwrap_or(&[])
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

/// Detect ext2/3/4, XFS, FAT or btrfs in [offset, offset+len) of `dev`. Ok(None): not a
/// filesystem we map (the caller stores the partition whole). Err: it is one, but damaged, not
/// cleanly unmounted or in a form bmr does not map (multi-device btrfs).
pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Result<Option<FsInfo>> {
    if len < 2048 {
        return Ok(None);
    }
    let mut head = vec![0u8; 2048];
    dev.read_at(&mut head, offset)
        .with_context(|| format!("cannot read the partition at offset {offset}"))?;
    if let Some(info) = ext::probe(dev, offset, len, &head[1024..])? {
        return Ok(Some(info));
    }
    if let Some(info) = xfs::probe(dev, offset, len, &head)? {
        return Ok(Some(info));
    }
    if let Some(info) = fat::probe(dev, offset, len, &head[..512])? {
        return Ok(Some(info));
    }
    if let Some(info) = swap::probe(dev, offset, len)? {
        return Ok(Some(info));
    }
    // Last: mkfs.fat on a small disk does not reach the 64 KiB a stale btrfs superblock keeps,
    // while mkfs.btrfs clears the first MiB.
    btrfs::probe(dev, offset, len)
}

/// Just the filesystem UUID (as `probe` reports it), also for a mounted filesystem whose
/// allocation map cannot be trusted.
pub fn probe_uuid(dev: &dyn ReadAt) -> Option<String> {
    let mut head = vec![0u8; 2048];
    dev.read_at(&mut head, 0).ok()?;
    if le16(&head, 1024 + 56) == 0xef53 {
        return Some(uuid_text(&head[1024 + 104..1024 + 120]));
    }
    if head.starts_with(xfs::SB_MAGIC) {
        return Some(uuid_text(&head[32..48]));
    }
    if head[510] == 0x55 && head[511] == 0xaa {
        let fat32 = le16(&head, 22) == 0;
        let (sig, id) = if fat32 { (66, 67) } else { (38, 39) };
        if head[sig] == 0x29 {
            let v = le32(&head, id);
            return Some(format!("{:04X}-{:04X}", v >> 16, v & 0xffff));
        }
    }
    let mut sb = vec![0u8; 4096];
    dev.read_at(&mut sb, btrfs::SB_OFFSET).ok()?;
    if &sb[0x40..0x48] == btrfs::MAGIC {
        return Some(uuid_text(&sb[0x20..0x30]));
    }
    None
}

#[cfg(test)]
mod tests;
