//! Linux software RAID (mdadm) member superblocks, read from the member itself: metadata 1.0,
//! 1.1, 1.2 and 0.90 (the layouts of the kernel's `md_p.h`). A backup needs them to know where
//! the array's content lies in a member partition, and a restore to recreate the array.
//!
//! Only what a member says about itself is trusted: the superblock must sit where its version
//! puts it, carry a valid checksum, and place the data inside the partition.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::fs::map::{le16, le32, le64};

const MAGIC: u32 = 0xa92b_4efc;
/// Metadata 0.90 reserves the last 64 KiB (aligned) of a member.
const RESERVED_090: u64 = 64 * 1024;
/// A 1.x superblock with its role table must fit in the 4 KiB bmr reads.
const SB1_MAX: usize = 4096;

/// One member's superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdSuper {
    /// "1.0", "1.1", "1.2" or "0.90".
    pub metadata: String,
    /// As mdadm prints it (`--detail`, mdadm.conf): four groups of 8 hex digits.
    pub uuid: String,
    /// The array's name as stored (1.x: `homehost:name`; 0.90 has none: `md<minor>`).
    pub name: String,
    /// RAID level: -1 linear, 0, 1, 4, 5, 6, 10 (-4 multipath).
    pub level: i32,
    pub raid_disks: u32,
    /// Chunk size in bytes (striped levels).
    pub chunk: u64,
    /// This member's role (slot) in the array; `None` for a spare or faulty member.
    pub role: Option<u32>,
    /// How many slots the superblock records as held by an active member.
    pub active: u32,
    /// Byte offsets in the member: the superblock, and where the array's data starts.
    pub super_offset: u64,
    pub data_offset: u64,
    /// Bytes of data each member holds (for RAID1: the array's size).
    pub size: u64,
    /// An internal write-intent bitmap is present.
    pub bitmap: bool,
}

impl MdSuper {
    pub fn level_name(&self) -> String {
        match self.level {
            -1 => "linear".into(),
            -4 => "multipath".into(),
            l => format!("raid{l}"),
        }
    }
}

/// The md superblock of the member at `[start, start+len)` of `dev`, if there is one.
pub fn probe(dev: &File, start: u64, len: u64) -> Result<Option<MdSuper>> {
    if len < 2 * RESERVED_090 {
        return Ok(None);
    }
    let sectors = len / 512;
    // 1.1 at the start, 1.2 4 KiB in, 1.0 at the end (8 KiB from it, 4 KiB aligned).
    let v1_end = ((sectors - 16) & !7) * 512;
    for (minor, off) in [("1.2", 4096u64), ("1.1", 0), ("1.0", v1_end)] {
        let mut b = vec![0u8; SB1_MAX];
        read_at(dev, &mut b, start + off)?;
        if let Some(sb) = parse_v1(&b, minor, off, len)? {
            return Ok(Some(sb));
        }
    }
    let off = (len & !(RESERVED_090 - 1)) - RESERVED_090;
    let mut b = vec![0u8; 4096];
    read_at(dev, &mut b, start + off)?;
    parse_v090(&b, off)
}

fn read_at(dev: &File, b: &mut [u8], off: u64) -> Result<()> {
    dev.read_exact_at(b, off)
        .with_context(|| format!("cannot read a possible md superblock at offset {off}"))
}

/// Parse a 1.x superblock read from byte `off` of a member of `len` bytes. Ok(None): no
/// superblock of this version there; Err: one that is damaged or places data outside.
pub fn parse_v1(b: &[u8], minor: &str, off: u64, len: u64) -> Result<Option<MdSuper>> {
    if le32(b, 0) != MAGIC || le32(b, 4) != 1 {
        return Ok(None);
    }
    let max_dev = le32(b, 0xdc) as usize;
    let sb_len = 256 + 2 * max_dev;
    if sb_len > b.len().min(SB1_MAX) {
        bail!("md superblock {minor}: it records {max_dev} devices, more than its 4 KiB hold");
    }
    if le64(b, 0x90) != off / 512 {
        // A 1.x superblock records where it is; one elsewhere is another version's.
        return Ok(None);
    }
    if csum_v1(&b[..sb_len]) != le32(b, 0xd8) {
        bail!("md superblock {minor}: its checksum does not match (damaged or stale)");
    }
    let level = le32(b, 0x48) as i32;
    let raid_disks = le32(b, 0x5c);
    let data_offset = le64(b, 0x80).saturating_mul(512);
    let data_size = le64(b, 0x88).saturating_mul(512);
    let size = le64(b, 0x50).saturating_mul(512);
    let size = if size == 0 { data_size } else { size };
    if data_offset.checked_add(size).is_none_or(|e| e > len) || size == 0 {
        bail!(
            "md superblock {minor}: its data ({size} bytes at offset {data_offset}) does not fit in the {len}-byte member"
        );
    }
    let dev_number = le32(b, 0xa0) as usize;
    let role_at = |i: usize| le16(b, 256 + 2 * i);
    let role = (dev_number < max_dev)
        .then(|| role_at(dev_number))
        .filter(|&r| r < 0xfffd)
        .map(u32::from);
    let active = (0..max_dev)
        .filter(|&i| (role_at(i) as u32) < raid_disks)
        .count() as u32;
    let uuid = b[0x10..0x20]
        .chunks(4)
        .map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(":");
    let name_raw = &b[0x20..0x40];
    let end = name_raw.iter().position(|&c| c == 0).unwrap_or(32);
    Ok(Some(MdSuper {
        metadata: minor.into(),
        uuid,
        name: String::from_utf8_lossy(&name_raw[..end]).into_owned(),
        level,
        raid_disks,
        chunk: u64::from(le32(b, 0x58)) * 512,
        role,
        active,
        super_offset: off,
        data_offset,
        size,
        bitmap: le32(b, 0x08) & 1 != 0,
    }))
}

/// The 1.x checksum: the little-endian 32-bit words summed with the checksum field as zero,
/// the carry folded in once.
pub fn csum_v1(sb: &[u8]) -> u32 {
    let mut sum: u64 = 0;
    for (i, w) in sb.chunks(4).enumerate() {
        let v = if i == 0xd8 / 4 {
            0
        } else if w.len() == 4 {
            u32::from_le_bytes([w[0], w[1], w[2], w[3]])
        } else {
            u32::from(u16::from_le_bytes([w[0], w.get(1).copied().unwrap_or(0)]))
        };
        sum += u64::from(v);
    }
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// Parse a 0.90 superblock (host byte order: little-endian on x86) read from byte `off`.
pub fn parse_v090(b: &[u8], off: u64) -> Result<Option<MdSuper>> {
    let w = |i: usize| le32(b, 4 * i);
    if w(0) != MAGIC || w(1) != 0 || w(2) != 90 {
        return Ok(None);
    }
    let mut sum: u64 = 0;
    for i in 0..1024 {
        // Word 38: sb_csum (generic state, word 6).
        if i != 38 {
            sum += u64::from(w(i));
        }
    }
    if ((sum & 0xffff_ffff) + (sum >> 32)) as u32 != w(38) {
        bail!("md superblock 0.90: its checksum does not match (damaged or stale)");
    }
    let size = u64::from(w(8)) * 1024;
    if size == 0 || size > off {
        bail!("md superblock 0.90: its data ({size} bytes) does not fit before the superblock");
    }
    let raid_disks = w(10);
    // The descriptor of this member (word 992): its role is word 3, state word 4.
    let state = w(992 + 4);
    let role = (state & 0b11 == 0b10).then(|| w(992 + 3));
    let active = (0..27)
        .filter(|&d| {
            let s = w(128 + 32 * d + 4);
            s & 0b11 == 0b10 && w(128 + 32 * d + 3) < raid_disks
        })
        .count() as u32;
    let uuid = [5, 13, 14, 15]
        .iter()
        .map(|&i| format!("{:08x}", w(i)))
        .collect::<Vec<_>>()
        .join(":");
    Ok(Some(MdSuper {
        metadata: "0.90".into(),
        uuid,
        name: format!("md{}", w(11)),
        level: w(7) as i32,
        raid_disks,
        chunk: u64::from(w(64 + 1)),
        role,
        active,
        super_offset: off,
        data_offset: 0,
        size,
        bitmap: w(33) & (1 << 8) != 0,
    }))
}

/// Run mdadm (the rescue system and the restored system's tools both have it).
pub fn mdadm(args: &[&str]) -> Result<String> {
    let out = Command::new("mdadm")
        .args(args)
        .output()
        .context("cannot run mdadm: is it installed?")?;
    super::tool_output("mdadm", args, out)
}

/// An array assembled from given members for the time of a restore step (`--run`: a mirror
/// with a member missing starts degraded); stopped on drop.
pub struct Array {
    pub path: std::path::PathBuf,
}

impl Array {
    pub fn assemble(members: &[&std::path::Path]) -> Result<Array> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::path::PathBuf::from(format!("/dev/md/bmr{}-{n}", std::process::id()));
        let p = path.display().to_string();
        let mut args = vec!["--assemble", p.as_str(), "--run"];
        let names: Vec<String> = members.iter().map(|m| m.display().to_string()).collect();
        args.extend(names.iter().map(String::as_str));
        mdadm(&args).context("cannot assemble the restored md array")?;
        let a = Array { path };
        // Without udev, mdadm makes the /dev/md/ link itself; give a slow system a moment.
        for _ in 0..50 {
            if a.path.exists() {
                return Ok(a);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bail!(
            "the assembled md array did not appear as {}",
            a.path.display()
        );
    }
}

impl Drop for Array {
    fn drop(&mut self) {
        if let Err(e) = mdadm(&["--stop", &self.path.display().to_string()]) {
            eprintln!("warning: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1.2 superblock as mdadm writes one: RAID1, 2 devices, this one role 0.
    pub(crate) fn v12(len: u64, data_offset: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 1);
        b[0x10..0x20].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        b[0x20..0x27].copy_from_slice(b"host:r1");
        put32(&mut b, 0x48, 1);
        put32(&mut b, 0x5c, 2);
        let data = (len - data_offset) / 512;
        put64(&mut b, 0x50, data);
        put64(&mut b, 0x80, data_offset / 512);
        put64(&mut b, 0x88, data);
        put64(&mut b, 0x90, 8);
        put32(&mut b, 0xa0, 0);
        put32(&mut b, 0xdc, 2);
        b[256..258].copy_from_slice(&0u16.to_le_bytes());
        b[258..260].copy_from_slice(&1u16.to_le_bytes());
        let c = csum_v1(&b[..260]);
        put32(&mut b, 0xd8, c);
        b
    }

    #[test]
    fn a_12_superblock_places_the_data() {
        let b = v12(64 << 20, 1 << 20);
        let sb = parse_v1(&b, "1.2", 4096, 64 << 20).unwrap().unwrap();
        assert_eq!(sb.uuid, "01020304:05060708:090a0b0c:0d0e0f10");
        assert_eq!(
            (sb.level, sb.raid_disks, sb.role, sb.active),
            (1, 2, Some(0), 2)
        );
        assert_eq!((sb.data_offset, sb.size), (1 << 20, 63 << 20));
        assert_eq!(sb.name, "host:r1");
        // Elsewhere than it says it is: another version's place, not this one.
        assert!(parse_v1(&b, "1.1", 0, 64 << 20).unwrap().is_none());
    }

    /// Any bytes where a superblock may be: an answer, never a panic or a huge allocation.
    #[test]
    fn mutated_superblocks_never_panic() {
        let base = v12(64 << 20, 1 << 20);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..1 + (x % 8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % 512) as usize;
                b[i] = (x >> 32) as u8;
            }
            let _ = parse_v1(&b, "1.2", 4096, 64 << 20);
            let _ = parse_v1(&b[..300], "1.2", 4096, 64 << 20);
            let _ = parse_v090(&b, 60 << 20);
        }
    }

    #[test]
    fn damaged_or_oversized_superblocks_are_errors() {
        let mut b = v12(64 << 20, 1 << 20);
        b[0x30] ^= 1;
        assert!(
            format!("{:#}", parse_v1(&b, "1.2", 4096, 64 << 20).unwrap_err()).contains("checksum")
        );
        let b = v12(64 << 20, 1 << 20);
        // A member smaller than the data the superblock claims.
        assert!(parse_v1(&b, "1.2", 4096, 32 << 20).is_err());
        let mut b = v12(64 << 20, 1 << 20);
        b[0xdc..0xe0].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(parse_v1(&b, "1.2", 4096, 64 << 20).is_err());
    }
}
