//! FAT12/16/32 allocation maps, read from the first allocation table.

use crate::fs::read::ReadAt;

use anyhow::{Context, Result, bail};

use super::{FsInfo, UsedMap, le16, le32};

/// Sector 0 is a FAT boot sector: a jump, then a BPB whose fields all hold values FAT allows
/// (as libblkid checks before it believes one). A partition table's boot code does not pass.
pub fn is_boot_sector(bs: &[u8]) -> bool {
    let media = bs.get(21).copied().unwrap_or(0);
    let fatsz = if le16(bs, 22) != 0 {
        u32::from(le16(bs, 22))
    } else {
        le32(bs, 36)
    };
    bs.len() >= 512
        && bs[510] == 0x55
        && bs[511] == 0xaa
        && matches!(bs[0], 0xeb | 0xe9)
        && matches!(le16(bs, 11), 512 | 1024 | 2048 | 4096)
        && bs[13].is_power_of_two()
        && bs[13] <= 128
        && le16(bs, 14) >= 1
        && (1..=4).contains(&bs[16])
        && (le16(bs, 19) != 0 || le32(bs, 32) != 0)
        && (media == 0xf0 || media >= 0xf8)
        && fatsz != 0
}

pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64, bs: &[u8]) -> Result<Option<FsInfo>> {
    if bs.len() < 512 || bs[510] != 0x55 || bs[511] != 0xaa || !matches!(bs[0], 0xeb | 0xe9) {
        return Ok(None);
    }
    let bps = u64::from(le16(bs, 11));
    let spc = u64::from(bs[13]);
    let rsvd = u64::from(le16(bs, 14));
    let nfats = u64::from(bs[16]);
    let root_ents = u64::from(le16(bs, 17));
    let tot16 = u64::from(le16(bs, 19));
    let fatsz16 = u64::from(le16(bs, 22));
    let tot32 = u64::from(le32(bs, 32));
    let fatsz32 = u64::from(le32(bs, 36));
    let sane = matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && spc <= 128
        && rsvd >= 1
        && (1..=4).contains(&nfats)
        && (tot16 != 0 || tot32 != 0);
    if !sane {
        return Ok(None);
    }
    let fatsz = if fatsz16 != 0 { fatsz16 } else { fatsz32 };
    let totsec = if tot16 != 0 { tot16 } else { tot32 };
    let root_secs = (root_ents * 32).div_ceil(bps);
    let first_data = rsvd + nfats * fatsz + root_secs;
    if fatsz == 0 {
        return Ok(None);
    }
    if first_data >= totsec {
        bail!(
            "vfat at offset {offset}: the FATs and root directory do not fit in the volume (damaged): run fsck.fat"
        );
    }
    if totsec * bps > len {
        bail!(
            "vfat at offset {offset}: the filesystem is {} bytes, larger than its partition ({len} bytes): the partition table or filesystem is damaged",
            totsec * bps
        );
    }
    let clusters = (totsec - first_data) / spc;
    let (variant, bits) = if clusters < 4085 {
        ("fat12", 12)
    } else if clusters < 65525 {
        ("fat16", 16)
    } else {
        ("fat32", 32)
    };
    if bits == 32 && (fatsz16 != 0 || root_ents != 0) {
        bail!("vfat at offset {offset}: FAT32 cluster count with a FAT12/16 layout (damaged)");
    }
    if fatsz * bps * 8 < (clusters + 2) * bits {
        bail!(
            "vfat at offset {offset}: the allocation table is too small for its clusters (damaged)"
        );
    }
    let cluster = spc * bps;
    let mut used = UsedMap::new(bps, len);
    used.mark_range(0, first_data * bps);
    let data_start = first_data * bps;
    let fat_off = offset + rsvd * bps;
    let mut mark = |n: u64| used.mark_range(data_start + (n - 2) * cluster, cluster);
    let ctx = || format!("vfat at offset {offset}: cannot read the FAT");
    if bits == 12 {
        let mut fat = vec![0u8; (fatsz * bps) as usize];
        dev.read_at(&mut fat, fat_off).with_context(ctx)?;
        for n in 2..clusters + 2 {
            let i = (n + n / 2) as usize;
            let v = u16::from_le_bytes([fat[i], fat.get(i + 1).copied().unwrap_or(0)]);
            let e = if n % 2 == 1 { v >> 4 } else { v & 0xfff };
            if e != 0 {
                mark(n);
            }
        }
    } else {
        let esize = bits / 8;
        let mut buf = vec![0u8; 1 << 20];
        let total = (clusters + 2) * esize;
        let mut pos = 0;
        while pos < total {
            let n = (total - pos).min(buf.len() as u64) as usize;
            dev.read_at(&mut buf[..n], fat_off + pos)
                .with_context(ctx)?;
            for (k, e) in buf[..n].chunks_exact(esize as usize).enumerate() {
                let idx = pos / esize + k as u64;
                let v = if esize == 2 {
                    u32::from(le16(e, 0))
                } else {
                    le32(e, 0) & 0x0fff_ffff
                };
                if idx >= 2 && v != 0 {
                    mark(idx);
                }
            }
            pos += n as u64;
        }
    }
    used.coarsen_to(32 << 20);
    let (id_off, label_off, sig_off) = if bits == 32 {
        (67, 71, 66)
    } else {
        (39, 43, 38)
    };
    let (uuid, label) = if bs[sig_off] == 0x29 {
        let id = le32(bs, id_off);
        let label = String::from_utf8_lossy(&bs[label_off..label_off + 11])
            .trim()
            .to_string();
        (
            Some(format!("{:04X}-{:04X}", id >> 16, id & 0xffff)),
            (!label.is_empty() && label != "NO NAME").then_some(label),
        )
    } else {
        (None, None)
    };
    Ok(Some(FsInfo {
        fstype: "vfat".into(),
        variant: Some(variant.into()),
        uuid,
        label,
        block_size: cluster,
        used,
        warnings: Vec::new(),
    }))
}
