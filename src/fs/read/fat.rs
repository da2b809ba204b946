//! FAT12/16/32 file tree reader: directories with long file names, cluster chains as extents.

use std::collections::HashSet;

use anyhow::{Context, Result, bail};

use super::{Entry, Extent, Kind, ReadAt};
use crate::fs::map::{le16, le32};

struct Fat<'a> {
    dev: &'a dyn ReadAt,
    bits: u32,
    fat_off: u64,
    data_off: u64,
    cluster: u64,
    clusters: u64,
    root_off: u64,
    root_len: u64,
    root_clus: u32,
}

impl Fat<'_> {
    fn next(&self, c: u32) -> Result<u32> {
        let n = u64::from(c);
        let mut b = [0u8; 4];
        let (off, len) = match self.bits {
            12 => (n + n / 2, 2),
            16 => (n * 2, 2),
            _ => (n * 4, 4),
        };
        self.dev
            .read_at(&mut b[..len], self.fat_off + off)
            .context("cannot read the FAT")?;
        Ok(match self.bits {
            12 => {
                let v = u32::from(le16(&b, 0));
                if c % 2 == 1 { v >> 4 } else { v & 0xfff }
            }
            16 => u32::from(le16(&b, 0)),
            _ => le32(&b, 0) & 0x0fff_ffff,
        })
    }

    fn chain(&self, first: u32) -> Result<Vec<u32>> {
        let eoc = match self.bits {
            12 => 0xff8,
            16 => 0xfff8,
            _ => 0x0fff_fff8,
        };
        let mut out = Vec::new();
        let mut c = first;
        while c >= 2 && c < eoc {
            if u64::from(c) >= self.clusters + 2 || out.len() as u64 > self.clusters {
                bail!("damaged cluster chain starting at cluster {first}: run fsck.fat");
            }
            out.push(c);
            c = self.next(c)?;
        }
        Ok(out)
    }

    fn extents(&self, first: u32, size: u64) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut file_off = 0;
        for c in self.chain(first)? {
            if file_off >= size {
                break;
            }
            let disk_off = self.data_off + (u64::from(c) - 2) * self.cluster;
            let len = self.cluster.min(size - file_off);
            match out.last_mut() {
                Some(l) if l.disk_off + l.len == disk_off => l.len += len,
                _ => out.push(Extent {
                    file_off,
                    disk_off,
                    len,
                }),
            }
            file_off += len;
        }
        Ok(out)
    }

    fn dir_bytes(&self, first: Option<u32>) -> Result<Vec<u8>> {
        match first {
            None if self.bits != 32 => {
                let mut b = vec![0u8; self.root_len as usize];
                self.dev
                    .read_at(&mut b, self.root_off)
                    .context("cannot read the root directory")?;
                Ok(b)
            }
            _ => {
                let start = first.unwrap_or(self.root_clus);
                let mut b = Vec::new();
                for c in self.chain(start)? {
                    let mut buf = vec![0u8; self.cluster as usize];
                    self.dev
                        .read_at(&mut buf, self.data_off + (u64::from(c) - 2) * self.cluster)
                        .context("cannot read a directory")?;
                    b.extend_from_slice(&buf);
                    if b.len() > 64 << 20 {
                        bail!("directory too large (damaged)");
                    }
                }
                Ok(b)
            }
        }
    }
}

/// FAT timestamps are local time without a zone: taken as UTC.
fn fat_time(date: u16, time: u16, tenths: u8) -> (i64, u32) {
    let (y, m, d) = (
        1980 + i16::from((date >> 9) as u8),
        ((date >> 5) & 0xf) as i8,
        (date & 0x1f) as i8,
    );
    let (h, mi, s) = (
        (time >> 11) as i8,
        ((time >> 5) & 0x3f) as i8,
        ((time & 0x1f) * 2) as i8,
    );
    let extra = u32::from(tenths) * 10;
    let secs =
        jiff::civil::DateTime::new(y, m.max(1), d.max(1), h.min(23), mi.min(59), s.min(59), 0)
            .ok()
            .and_then(|dt| dt.to_zoned(jiff::tz::TimeZone::UTC).ok())
            .map_or(0, |z| z.timestamp().as_second());
    (secs + i64::from(extra / 1000), (extra % 1000) * 1_000_000)
}

fn short_name(e: &[u8]) -> Vec<u8> {
    let lower = |s: &[u8], on: bool| -> Vec<u8> {
        let t: Vec<u8> = s
            .iter()
            .copied()
            .rev()
            .skip_while(|&b| b == b' ')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if on { t.to_ascii_lowercase() } else { t }
    };
    let mut n = lower(&e[0..8], e[12] & 0x08 != 0);
    if n.first() == Some(&0x05) {
        n[0] = 0xe5;
    }
    let ext = lower(&e[8..11], e[12] & 0x10 != 0);
    if !ext.is_empty() {
        n.push(b'.');
        n.extend_from_slice(&ext);
    }
    n
}

fn lfn_checksum(e: &[u8]) -> u8 {
    e[..11]
        .iter()
        .fold(0u8, |s, &b| s.rotate_right(1).wrapping_add(b))
}

pub fn read_tree(dev: &dyn ReadAt) -> Result<Vec<Entry>> {
    let mut bs = [0u8; 512];
    dev.read_at(&mut bs, 0)
        .context("cannot read the FAT boot sector")?;
    let bps = u64::from(le16(&bs, 11));
    let spc = u64::from(bs[13]);
    let rsvd = u64::from(le16(&bs, 14));
    let nfats = u64::from(bs[16]);
    let root_ents = u64::from(le16(&bs, 17));
    let tot = if le16(&bs, 19) != 0 {
        u64::from(le16(&bs, 19))
    } else {
        u64::from(le32(&bs, 32))
    };
    let fatsz = if le16(&bs, 22) != 0 {
        u64::from(le16(&bs, 22))
    } else {
        u64::from(le32(&bs, 36))
    };
    if !matches!(bps, 512 | 1024 | 2048 | 4096) || spc == 0 || fatsz == 0 {
        bail!("not a FAT filesystem");
    }
    let root_secs = (root_ents * 32).div_ceil(bps);
    let first_data = rsvd + nfats * fatsz + root_secs;
    let clusters = tot.saturating_sub(first_data) / spc;
    let bits = if clusters < 4085 {
        12
    } else if clusters < 65525 {
        16
    } else {
        32
    };
    let fat = Fat {
        dev,
        bits,
        fat_off: rsvd * bps,
        data_off: first_data * bps,
        cluster: spc * bps,
        clusters,
        root_off: (rsvd + nfats * fatsz) * bps,
        root_len: root_secs * bps,
        root_clus: le32(&bs, 44),
    };
    let dir_entry = |path: Vec<u8>, kind: Kind, inode: u64| Entry {
        path,
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: (0, 0),
        ctime: (0, 0),
        atime: (0, 0),
        inode,
        nlink: 1,
        rdev: (0, 0),
        symlink: None,
        xattrs: Vec::new(),
        extents: Vec::new(),
        encoded: Vec::new(),
        inline: None,
        subvol: None,
        flags: 0,
    };
    let mut out = vec![dir_entry(Vec::new(), Kind::Dir, 1)];
    let mut seen = HashSet::new();
    let mut stack: Vec<(Vec<u8>, Option<u32>, usize)> = vec![(Vec::new(), None, 0)];
    let mut counter = 2u64;
    while let Some((path, first, depth)) = stack.pop() {
        if depth > 256 || first.is_some_and(|c| !seen.insert(c)) {
            bail!("directory loop in the FAT filesystem (damaged): run fsck.fat");
        }
        let data = fat.dir_bytes(first)?;
        let mut lfn: Vec<(u8, Vec<u16>)> = Vec::new();
        let mut children = Vec::new();
        for e in data.chunks_exact(32) {
            match e[0] {
                0 => break,
                0xe5 => {
                    lfn.clear();
                    continue;
                }
                _ => {}
            }
            let attr = e[11];
            if attr == 0x0f {
                let mut chars = Vec::new();
                for r in [1..11, 14..26, 28..32] {
                    for c in e[r].chunks_exact(2) {
                        chars.push(u16::from_le_bytes([c[0], c[1]]));
                    }
                }
                lfn.push((e[13], chars));
                continue;
            }
            let long = std::mem::take(&mut lfn);
            if attr & 0x08 != 0 || e[0] == b'.' {
                continue;
            }
            let sum = lfn_checksum(e);
            let name = if !long.is_empty() && long.iter().all(|(s, _)| *s == sum) {
                let units: Vec<u16> = long
                    .iter()
                    .rev()
                    .flat_map(|(_, c)| c.iter().copied())
                    .take_while(|&u| u != 0 && u != 0xffff)
                    .collect();
                String::from_utf16_lossy(&units).into_bytes()
            } else {
                short_name(e)
            };
            if name.is_empty() || name.contains(&b'/') {
                continue;
            }
            let mut p = path.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(&name);
            let first_clus = (u32::from(le16(e, 20)) << 16) | u32::from(le16(e, 26));
            let is_dir = attr & 0x10 != 0;
            let mut ent = dir_entry(
                p.clone(),
                if is_dir { Kind::Dir } else { Kind::File },
                counter,
            );
            counter += 1;
            ent.mode = if is_dir {
                0o755
            } else if attr & 0x01 != 0 {
                0o444
            } else {
                0o644
            };
            ent.mtime = fat_time(le16(e, 24), le16(e, 22), 0);
            ent.ctime = fat_time(le16(e, 16), le16(e, 14), e[13]);
            ent.atime = fat_time(le16(e, 18), 0, 0);
            if !is_dir {
                ent.size = u64::from(le32(e, 28));
                ent.extents = fat.extents(first_clus, ent.size)?;
            }
            children.push((ent, is_dir.then_some(first_clus)));
        }
        children.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        // Directories are expanded in order, each subtree right after its directory entry.
        let mut dirs = Vec::new();
        for (ent, sub) in children {
            if let Some(c) = sub.filter(|&c| c >= 2) {
                dirs.push((ent.path.clone(), Some(c), depth + 1));
            }
            out.push(ent);
        }
        for d in dirs.into_iter().rev() {
            stack.push(d);
        }
    }
    // Parents before children, depth first: re-sort by path components.
    out.sort_by(|a, b| {
        a.path
            .split(|&c| c == b'/')
            .cmp(b.path.split(|&c| c == b'/'))
    });
    if out.first().is_some_and(|e| !e.path.is_empty()) {
        bail!("internal: FAT root not first");
    }
    Ok(out)
}
