//! The names a disk and its partitions go by: kernel names, /dev/disk/by-id and by-path
//! links, and the by-id names udev would make where no udev runs.

use std::collections::BTreeSet;
use std::path::Path;

/// A partition of some disk named by a device path: `/dev/sda3` is ("sda", 3),
/// `/dev/nvme0n1p2` ("nvme0n1", 2), `/dev/disk/by-id/ata-X-part1` ("disk/by-id/ata-X", 1),
/// and by-path names alike.
pub fn parse_partition(path: &str) -> Option<(String, u32)> {
    let name = path.strip_prefix("/dev/")?;
    for dir in ["disk/by-id/", "disk/by-path/"] {
        if let Some(id) = name.strip_prefix(dir) {
            let (disk, n) = id.rsplit_once("-part")?;
            if disk.is_empty() || disk.contains('/') {
                return None;
            }
            return Some((format!("{dir}{disk}"), n.parse().ok()?));
        }
    }
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 || digits == name.len() {
        return None;
    }
    let (disk, n) = name.split_at(name.len() - digits);
    let n: u32 = n.parse().ok()?;
    // nvme0n1p2, mmcblk0p1, loop0p1: the disk name ends in a digit, then `p`.
    if let Some(d) = disk.strip_suffix('p')
        && d.ends_with(|c: char| c.is_ascii_digit())
        && ["nvme", "mmcblk", "loop", "nbd", "md"]
            .iter()
            .any(|p| d.starts_with(p))
    {
        return Some((d.to_string(), n));
    }
    let letters = ["sd", "vd", "hd", "xvd"].iter().any(|p| {
        disk.strip_prefix(p)
            .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_lowercase()))
    });
    letters.then(|| (disk.to_string(), n))
}

/// The key [`parse_partition`] gives partitions of a whole disk named by `path`
/// (`/dev/sda` -> "sda", `/dev/disk/by-id/X` -> "disk/by-id/X"); None for anything else.
pub fn disk_key(path: &str) -> Option<String> {
    let key = path.strip_prefix("/dev/")?;
    if parse_partition(path).is_some() {
        return None;
    }
    // A whole disk: appending a partition number, in the one form its kind uses, names a
    // partition of it.
    [
        format!("{path}-part1"),
        format!("{path}p1"),
        format!("{path}1"),
    ]
    .iter()
    .filter_map(|p| parse_partition(p))
    .any(|(d, n)| d == key && n == 1)
    .then(|| key.to_string())
}

/// How the log shows a disk's partitions: `/dev/sdaN`, `/dev/nvme0n1pN`, `/dev/disk/by-id/X-partN`.
pub fn partition_pattern(key: &str) -> String {
    if key.starts_with("disk/") {
        format!("/dev/{key}-partN")
    } else if key.ends_with(|c: char| c.is_ascii_digit()) {
        format!("/dev/{key}pN")
    } else {
        format!("/dev/{key}N")
    }
}

/// Every name the disk at `path` goes by on this machine: its kernel name, the links udev made
/// under /dev/disk/by-id and by-path, and the by-id names udev would make (the rescue system runs
/// no udev). Recorded at backup time, so that a restore knows which device paths in the
/// restored system's files meant this disk. Empty for an image file.
pub fn names_of_disk(path: &Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(real) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    if !std::fs::metadata(&real).is_ok_and(|m| m.file_type().is_block_device()) {
        return Vec::new();
    }
    let mut names = BTreeSet::new();
    if let Some(kernel) = real.file_name().map(|n| n.to_string_lossy().to_string()) {
        names.insert(format!("/dev/{kernel}"));
        for id in crate::device::disks::udev_ids(&kernel) {
            names.insert(format!("/dev/disk/by-id/{id}"));
        }
    }
    for dir in ["/dev/disk/by-id", "/dev/disk/by-path"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if std::fs::canonicalize(e.path()).is_ok_and(|t| t == real) {
                names.insert(e.path().display().to_string());
            }
        }
    }
    names
        .into_iter()
        .filter(|n| disk_key(n).is_some())
        .collect()
}
