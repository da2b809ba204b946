//! Device paths in a restored system's configuration (`/dev/sda3` in fstab, `root=/dev/sda3` on
//! the kernel command line) break when the new disk has another name (vda, nvme0n1). They are
//! rewritten to `UUID=`, which names the filesystem wherever its disk shows up.

use std::collections::{BTreeSet, HashMap};

pub use crate::device::names::{disk_key, names_of_disk, parse_partition, partition_pattern};

/// Files (relative to a filesystem's root) that name devices: a root filesystem's, and a
/// separate /boot's.
pub const FILES: &[&str] = &[
    "etc/fstab",
    "etc/crypttab",
    "etc/default/grub",
    "etc/kernel/cmdline",
    "boot/grub/grub.cfg",
    "boot/grub2/grub.cfg",
    "grub/grub.cfg",
    "grub2/grub.cfg",
];

/// Where a device path may stand in a line of `file`, as byte ranges.
fn device_fields(file: &str, line: &str) -> Vec<(usize, usize)> {
    let t = line.trim_start();
    if t.starts_with('#') || t.is_empty() {
        return Vec::new();
    }
    let fields: Vec<(usize, usize)> = {
        let mut v = Vec::new();
        let mut start = None;
        for (i, c) in line.char_indices() {
            match (c.is_whitespace(), start) {
                (true, Some(s)) => {
                    v.push((s, i));
                    start = None;
                }
                (false, None) => start = Some(i),
                _ => {}
            }
        }
        if let Some(s) = start {
            v.push((s, line.len()));
        }
        v
    };
    if file.ends_with("fstab") {
        return fields.into_iter().take(1).collect();
    }
    if file.ends_with("crypttab") {
        return fields.into_iter().skip(1).take(1).collect();
    }
    // Kernel command lines: root=, resume=, and GRUB_CMDLINE_LINUX="root=... " alike.
    let mut out = Vec::new();
    for key in ["root=", "resume="] {
        let mut from = 0;
        while let Some(i) = line[from..].find(key) {
            let at = from + i;
            let start = at + key.len();
            let before_ok = at == 0
                || line[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_whitespace() || c == '"' || c == '\'');
            if before_ok && line[start..].starts_with("/dev/") {
                let end = line[start..]
                    .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
                    .map_or(line.len(), |e| start + e);
                out.push((start, end));
            }
            from = start;
        }
    }
    out
}

/// Every disk a file names partitions of.
pub fn disks_named(file: &str, text: &str) -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    for line in text.lines() {
        for (a, b) in device_fields(file, line) {
            if let Some((d, _)) = parse_partition(&line[a..b]) {
                s.insert(d);
            }
        }
    }
    s
}

/// The rewritten text and one `-old` / `+new` pair per changed line; None if nothing changed.
/// `disks` are names of the restored disk (as [`parse_partition`] gives them); `uuids` maps its
/// partition numbers to the UUIDs of what is on them now.
pub fn rewrite(
    file: &str,
    text: &str,
    disks: &BTreeSet<String>,
    uuids: &HashMap<u32, String>,
) -> Option<(String, Vec<String>)> {
    let mut out = String::with_capacity(text.len());
    let mut diff = Vec::new();
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let mut new = String::new();
        let mut last = 0;
        for (a, b) in device_fields(file, body) {
            let Some((d, n)) = parse_partition(&body[a..b]) else {
                continue;
            };
            let Some(uuid) = uuids.get(&n).filter(|_| disks.contains(&d)) else {
                continue;
            };
            new.push_str(&body[last..a]);
            new.push_str("UUID=");
            new.push_str(uuid);
            last = b;
        }
        if last == 0 {
            out.push_str(line);
            continue;
        }
        new.push_str(&body[last..]);
        diff.push(format!("-{body}"));
        diff.push(format!("+{new}"));
        out.push_str(&new);
        if line.ends_with('\n') {
            out.push('\n');
        }
    }
    (!diff.is_empty()).then_some((out, diff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_paths() {
        let p = |s: &str| parse_partition(s);
        assert_eq!(p("/dev/sda3"), Some(("sda".into(), 3)));
        assert_eq!(p("/dev/sdab12"), Some(("sdab".into(), 12)));
        assert_eq!(p("/dev/vdb1"), Some(("vdb".into(), 1)));
        assert_eq!(p("/dev/xvda2"), Some(("xvda".into(), 2)));
        assert_eq!(p("/dev/nvme0n1p2"), Some(("nvme0n1".into(), 2)));
        assert_eq!(p("/dev/mmcblk0p1"), Some(("mmcblk0".into(), 1)));
        assert_eq!(
            p("/dev/disk/by-id/ata-QEMU_HARDDISK_QM00001-part3"),
            Some(("disk/by-id/ata-QEMU_HARDDISK_QM00001".into(), 3))
        );
        assert_eq!(
            p("/dev/disk/by-path/pci-0000:00:1f.2-ata-1-part2"),
            Some(("disk/by-path/pci-0000:00:1f.2-ata-1".into(), 2))
        );
        for not in [
            "/dev/sda",
            "/dev/nvme0n1",
            "/dev/mapper/vg-root",
            "/dev/md0",
            "/dev/dm-1",
            "UUID=1234",
            "/dev/sd3",
            "/dev/tty1",
            "/dev/disk/by-uuid/1234-part1",
            "/dev/disk/by-id/-part1",
        ] {
            assert_eq!(p(not), None, "{not}");
        }
    }

    #[test]
    fn rewrites_fstab_crypttab_and_kernel_lines() {
        let uuids: HashMap<u32, String> =
            [(2, "AB12-CD34".to_string()), (3, "1111-2222".to_string())].into();
        let sda: BTreeSet<String> = ["sda".to_string()].into();
        let fstab = "# /dev/sda3 was / at install\n/dev/sda3 / ext4 errors=remount-ro 0 1\n\
                     /dev/sda2\t/boot/efi vfat umask=0077 0 1\n/dev/sdb1 /srv ext4 defaults 0 2\n\
                     UUID=x /home ext4 defaults 0 2\n/dev/sda3 /dev/sda2 none bind 0 0\n";
        let (new, diff) = rewrite("etc/fstab", fstab, &sda, &uuids).expect("changed");
        assert_eq!(
            new,
            "# /dev/sda3 was / at install\nUUID=1111-2222 / ext4 errors=remount-ro 0 1\n\
             UUID=AB12-CD34\t/boot/efi vfat umask=0077 0 1\n/dev/sdb1 /srv ext4 defaults 0 2\n\
             UUID=x /home ext4 defaults 0 2\nUUID=1111-2222 /dev/sda2 none bind 0 0\n"
        );
        assert_eq!(diff.len(), 6);
        assert_eq!(diff[0], "-/dev/sda3 / ext4 errors=remount-ro 0 1");

        let crypt = "cryptroot /dev/sda3 none luks,discard\n";
        let (new, _) = rewrite("etc/crypttab", crypt, &sda, &uuids).expect("changed");
        assert_eq!(new, "cryptroot UUID=1111-2222 none luks,discard\n");

        let grub = "GRUB_CMDLINE_LINUX=\"root=/dev/sda3 resume=/dev/sda2 quiet\"\n";
        let (new, _) = rewrite("etc/default/grub", grub, &sda, &uuids).expect("changed");
        assert_eq!(
            new,
            "GRUB_CMDLINE_LINUX=\"root=UUID=1111-2222 resume=UUID=AB12-CD34 quiet\"\n"
        );
        let cfg = "\tlinux /boot/vmlinuz root=/dev/sda3 ro console=ttyS0\n\tsearch --set=root x\n";
        let (new, _) = rewrite("boot/grub/grub.cfg", cfg, &sda, &uuids).expect("changed");
        assert!(new.starts_with("\tlinux /boot/vmlinuz root=UUID=1111-2222 ro console=ttyS0\n"));
        // A partition with nothing identifiable stays as it is; so does another disk.
        assert!(rewrite("etc/fstab", "/dev/sda9 /x ext4 d 0 0\n", &sda, &uuids).is_none());
        assert!(rewrite("etc/fstab", "/dev/vda3 / ext4 d 0 0", &sda, &uuids).is_none());
        assert_eq!(
            disks_named("etc/fstab", fstab),
            ["sda".to_string(), "sdb".to_string()].into()
        );
    }

    #[test]
    fn whole_disk_names() {
        for (path, key) in [
            ("/dev/sda", "sda"),
            ("/dev/vdb", "vdb"),
            ("/dev/nvme0n1", "nvme0n1"),
            ("/dev/mmcblk1", "mmcblk1"),
            (
                "/dev/disk/by-id/ata-QEMU_HARDDISK_QM00001",
                "disk/by-id/ata-QEMU_HARDDISK_QM00001",
            ),
            (
                "/dev/disk/by-path/pci-0000:00:04.0",
                "disk/by-path/pci-0000:00:04.0",
            ),
        ] {
            assert_eq!(disk_key(path).as_deref(), Some(key), "{path}");
        }
        for not in [
            "/dev/sda1",
            "/dev/nvme0n1p2",
            "/dev/disk/by-id/ata-X-part1",
            "sda",
            "/tmp/disk.img",
            "/dev/mapper/vg-root",
        ] {
            assert_eq!(disk_key(not), None, "{not}");
        }
    }

    #[test]
    fn several_names_of_one_disk_are_rewritten() {
        let uuids: HashMap<u32, String> = [(1, "AAAA".to_string()), (2, "BBBB".to_string())].into();
        let names: BTreeSet<String> =
            ["sda".to_string(), "disk/by-id/ata-OLD_S1".to_string()].into();
        let fstab = "/dev/disk/by-id/ata-OLD_S1-part2 / ext4 d 0 1\n/dev/sda1 /boot ext4 d 0 2\n\
                     /dev/disk/by-id/ata-OTHER_S2-part1 /srv ext4 d 0 2\n";
        let (new, diff) = rewrite("etc/fstab", fstab, &names, &uuids).expect("changed");
        assert_eq!(
            new,
            "UUID=BBBB / ext4 d 0 1\nUUID=AAAA /boot ext4 d 0 2\n\
             /dev/disk/by-id/ata-OTHER_S2-part1 /srv ext4 d 0 2\n"
        );
        assert_eq!(diff.len(), 4);
    }
}
