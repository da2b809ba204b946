//! Filesystem allocation maps: which blocks of a partition are in use, read from the
//! filesystem's own structures (no mount, no external tools), so a backup skips free space.

pub mod ext;
pub mod fat;
mod usedmap;

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};

pub use usedmap::UsedMap;

#[derive(Debug, Clone)]
pub struct FsInfo {
    /// "ext2", "ext3", "ext4" or "vfat".
    pub fstype: String,
    /// "fat12", "fat16", "fat32" for vfat.
    pub variant: Option<String>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    /// Allocation unit in bytes (ext block or bigalloc cluster, FAT cluster).
    pub block_size: u64,
    pub used: UsedMap,
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

/// Detect ext2/3/4 or FAT in [offset, offset+len) of `dev`. Ok(None): not a filesystem we map
/// (the caller stores the partition whole). Err: it is one, but damaged or not cleanly unmounted.
pub fn probe(dev: &File, offset: u64, len: u64) -> Result<Option<FsInfo>> {
    if len < 2048 {
        return Ok(None);
    }
    let mut head = vec![0u8; 2048];
    dev.read_exact_at(&mut head, offset)
        .with_context(|| format!("cannot read the partition at offset {offset}"))?;
    if let Some(info) = ext::probe(dev, offset, len, &head[1024..])? {
        return Ok(Some(info));
    }
    fat::probe(dev, offset, len, &head[..512])
}

#[cfg(test)]
mod tests;
