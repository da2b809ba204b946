//! Filesystem identification: type, label and UUID of every block device, read from the
//! superblocks the way blkid reports them. The rescue system's busybox has no blkid, and a
//! restore must not depend on which one is installed.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::fs::map::{le16, le32};

/// One identified filesystem (or volume: swap, LUKS, LVM) on a block device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fs {
    pub dev: String,
    pub fstype: String,
    pub label: String,
    pub uuid: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A 16-byte UUID in its usual 8-4-4-4-12 form.
fn uuid(b: &[u8]) -> String {
    let h = hex(b);
    if h.len() != 32 {
        return String::new();
    }
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A fixed-size, NUL- or space-padded label field.
fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim_end().to_string()
}

fn at(head: &[u8], off: usize, len: usize) -> &[u8] {
    head.get(off..off + len).unwrap_or(&[])
}

/// Identify the filesystem whose first 68 KiB are `head` (btrfs keeps its superblock at
/// 64 KiB). None: nothing this knows.
pub fn identify_bytes(head: &[u8]) -> Option<(String, String, String)> {
    let r = |t: &str, l: String, u: String| Some((t.to_string(), l, u));
    // ext2/3/4
    let sb = at(head, 1024, 1024);
    if le16(sb, 56) == 0xef53 {
        let t = crate::fs::map::ext::raw_fstype(sb);
        return r(t, text(at(sb, 120, 16)), uuid(at(sb, 104, 16)));
    }
    if at(head, 0, 4) == b"XFSB" {
        return r("xfs", text(at(head, 108, 12)), uuid(at(head, 32, 16)));
    }
    if at(head, 0, 6) == b"LUKS\xba\xbe" {
        return r("crypto_LUKS", String::new(), text(at(head, 168, 40)));
    }
    if at(head, 512, 8) == b"LABELONE" && at(head, 512 + 24, 8) == b"LVM2 001" {
        let raw = text(at(head, 512 + 32, 32));
        // LVM prints its 32-character id in groups 6-4-4-4-4-4-6.
        let mut u = String::new();
        for (i, c) in raw.chars().enumerate() {
            if [6, 10, 14, 18, 22, 26].contains(&i) {
                u.push('-');
            }
            u.push(c);
        }
        return r("LVM2_member", String::new(), u);
    }
    // md RAID members with the superblock at the start (1.1) or 4 KiB in (1.2).
    for off in [0, 4096] {
        if le32(head, off) == 0xa92b_4efc && le32(head, off + 4) == 1 {
            return r(
                "linux_raid_member",
                text(at(head, off + 32, 32)),
                uuid(at(head, off + 16, 16)),
            );
        }
    }
    if at(head, 65536 + 64, 8) == b"_BHRfS_M" {
        let sb = at(head, 65536, 4096);
        return r("btrfs", text(at(sb, 299, 256)), uuid(at(sb, 32, 16)));
    }
    if at(head, 32769, 5) == b"CD001" {
        let pvd = at(head, 32768, 2048);
        // blkid's ISO "UUID" is the creation time, 2026-11-23-03-54-00-00.
        let t = at(pvd, 813, 16);
        let u = if t.iter().all(u8::is_ascii_digit) {
            let s = String::from_utf8_lossy(t);
            format!(
                "{}-{}-{}-{}-{}-{}-{}",
                &s[0..4],
                &s[4..6],
                &s[6..8],
                &s[8..10],
                &s[10..12],
                &s[12..14],
                &s[14..16]
            )
        } else {
            String::new()
        };
        return r("iso9660", text(at(pvd, 40, 32)), u);
    }
    if at(head, 4086, 10) == b"SWAPSPACE2" {
        return r(
            "swap",
            text(at(head, 1024 + 28, 16)),
            uuid(at(head, 1024 + 12, 16)),
        );
    }
    if at(head, 3, 8) == b"NTFS    " {
        let v = at(head, 72, 8);
        let s: String = v.iter().rev().map(|x| format!("{x:02X}")).collect();
        return r("ntfs", String::new(), s);
    }
    if at(head, 3, 8) == b"EXFAT   " {
        let v = le32(head, 100);
        return r(
            "exfat",
            String::new(),
            format!("{:04X}-{:04X}", v >> 16, v & 0xffff),
        );
    }
    if le16(head, 510) == 0xaa55 {
        let fat32 = le16(head, 22) == 0 && at(head, 82, 5) == b"FAT32";
        let fat16 = at(head, 54, 3) == b"FAT";
        if fat32 || fat16 {
            let (sig, id, label) = if fat32 { (66, 67, 71) } else { (38, 39, 43) };
            if head.get(sig) == Some(&0x29) {
                let v = le32(head, id);
                let mut l = text(at(head, label, 11));
                if l == "NO NAME" {
                    l.clear();
                }
                return r("vfat", l, format!("{:04X}-{:04X}", v >> 16, v & 0xffff));
            }
            return r("vfat", String::new(), String::new());
        }
    }
    None
}

/// Identify what is on `dev` (a block device or an image file).
pub fn identify(dev: &Path) -> Option<Fs> {
    let f = File::open(dev).ok()?;
    let mut fs = identify_at(&f, 0)?;
    fs.dev = dev.display().to_string();
    Some(fs)
}

/// Identify the filesystem starting at `offset` of `f` (a partition inside a disk).
pub fn identify_at(f: &File, offset: u64) -> Option<Fs> {
    let mut head = vec![0u8; 65536 + 4096];
    // Short devices (a 1 MiB partition) read what there is; the rest stays zero.
    let mut got = 0;
    while got < head.len() {
        match f.read_at(&mut head[got..], offset + got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    if got < 2048 {
        return None;
    }
    let (fstype, label, uuid) = identify_bytes(&head)?;
    Some(Fs {
        dev: String::new(),
        fstype,
        label,
        uuid,
    })
}

/// Every identified block device, disks and partitions, like `blkid` with no arguments.
pub fn scan() -> Vec<Fs> {
    let Ok(rd) = fs::read_dir("/sys/class/block") else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with("ram") && !n.starts_with("zram"))
        .filter(|n| {
            fs::read_to_string(format!("/sys/class/block/{n}/size"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|s| s > 0)
        })
        .collect();
    names.sort();
    names
        .iter()
        .filter_map(|n| identify(&Path::new("/dev").join(n)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(cmd: &str) -> String {
        let o = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Each kind the real mkfs tools make reads back as util-linux blkid reports it.
    #[test]
    fn agrees_with_blkid() {
        let dir = std::env::temp_dir().join(format!("bmr-fsid-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("tmp");
        let cases: &[(&str, &str)] = &[
            ("ext4", "mke2fs -q -t ext4 -L root4 IMG 8M"),
            ("ext3", "mke2fs -q -t ext3 -L root3 IMG 8M"),
            ("ext2", "mke2fs -q -t ext2 IMG 8M"),
            ("fat16", "truncate -s 32M IMG && mkfs.fat -F 16 -n ESP IMG"),
            (
                "fat32",
                "truncate -s 64M IMG && mkfs.fat -F 32 -n BIGESP IMG",
            ),
            ("fat-nolabel", "truncate -s 8M IMG && mkfs.fat IMG"),
            ("swap", "truncate -s 8M IMG && mkswap -L swp IMG"),
            ("xfs", "truncate -s 320M IMG && mkfs.xfs -q -L xfslbl IMG"),
            (
                "xfs-v4",
                "truncate -s 320M IMG && mkfs.xfs -q -m crc=0 -L v4lbl IMG",
            ),
            (
                "iso",
                "mkdir -p IMG.d && xorriso -as mkisofs -quiet -V BMR_TEST -o IMG IMG.d",
            ),
        ];
        for (name, mk) in cases {
            let img = dir.join(name);
            let _ = fs::remove_file(&img);
            sh(&format!(
                "{} >/dev/null",
                mk.replace("IMG", &img.to_string_lossy())
            ));
            let got = identify(&img).unwrap_or_else(|| panic!("{name}: not identified"));
            let q = |tag: &str| {
                Command::new("blkid")
                    .args(["-o", "value", "-s", tag])
                    .arg(&img)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_default()
            };
            assert_eq!(got.fstype, q("TYPE"), "{name}: type");
            assert_eq!(got.label, q("LABEL"), "{name}: label");
            assert_eq!(got.uuid, q("UUID"), "{name}: uuid");
        }
        let zero = dir.join("zero");
        sh(&format!("truncate -s 1M {}", zero.display()));
        assert_eq!(identify(&zero), None);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
