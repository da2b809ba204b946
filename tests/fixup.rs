//! Fix-ups after a restore, on image files: device paths in fstab/crypttab/GRUB rewritten to
//! UUID=, the UEFI fallback loader created on the ESP, `--grow` on GPT and MBR, and
//! `--no-fixups` leaving the system exactly as backed up. Checked with debugfs, mtools,
//! sgdisk, sfdisk, dumpe2fs and e2fsck.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const ESP_TYPE: &str = "ef00";

/// A GPT disk like an old Debian install: ESP (partition 1, FAT16 with EFI/debian/grubx64.efi
/// and grub.cfg) and an ext4 root (partition 2) whose fstab and grub.cfg name /dev/sda1 and
/// /dev/sda2. Backed up as host old1 from the image file (so its device name is unknown).
fn old_install(tmp: &Tmp) -> String {
    let esp = tmp.path("esp");
    std::fs::create_dir_all(esp.join("EFI/debian")).unwrap();
    std::fs::write(esp.join("EFI/debian/grubx64.efi"), b"MZ pretend loader").unwrap();
    std::fs::write(
        esp.join("EFI/debian/grub.cfg"),
        "search.fs_uuid x root\nconfigfile ($root)/boot/grub/grub.cfg\n",
    )
    .unwrap();
    let root = tmp.path("root");
    populate(&root, 3);
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("boot/grub")).unwrap();
    std::fs::write(
        root.join("etc/fstab"),
        "# <file system> <mount point> <type> <options> <dump> <pass>\n\
         /dev/sda2 / ext4 errors=remount-ro 0 1\n/dev/sda1 /boot/efi vfat umask=0077 0 1\n",
    )
    .unwrap();
    std::fs::write(
        root.join("boot/grub/grub.cfg"),
        "menuentry 'Debian' {\n\tlinux /boot/vmlinuz root=/dev/sda2 ro quiet\n}\n",
    )
    .unwrap();
    let disk = tmp.path("src.img");
    sh(&format!(
        "truncate -s 64M {d} && sgdisk -n 1:2048:+16M -t 1:{ESP_TYPE} -n 2:0:+40M -t 2:8300 {d} >/dev/null",
        d = disk.display()
    ));
    let fat = tmp.path("esp.img");
    make_fat(&fat, 16, 16, &esp, "-n ESP");
    place(&disk, &fat, MIB);
    let ext = tmp.path("root.img");
    make_ext(&ext, 40, "ext4", "-L root", &root);
    place(&disk, &ext, 17 * MIB);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "old1",
        &disk.display().to_string(),
    ]);
    repo
}

fn debugfs_cat(disk: &Path, offset: u64, len: u64, tmp: &Tmp, file: &str) -> String {
    let part = tmp.path("part.img");
    extract(disk, offset, len, &part);
    sh(&format!(
        "debugfs -R 'cat {file}' {} 2>/dev/null",
        part.display()
    ))
}

fn ext_uuid(disk: &Path, offset: u64, len: u64, tmp: &Tmp) -> String {
    let part = tmp.path("part.img");
    extract(disk, offset, len, &part);
    sh(&format!("blkid -o value -s UUID {}", part.display()))
        .trim()
        .to_string()
}

/// Partition `n`'s (first, last) sector from sgdisk.
fn gpt_range(disk: &Path, n: u32) -> (u64, u64) {
    let out = sh(&format!("sgdisk -i {n} {}", disk.display()));
    let num = |key: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {out}"))
    };
    (num("First sector"), num("Last sector"))
}

#[test]
fn device_names_uefi_fallback_and_grow_on_gpt() {
    let tmp = Tmp::new("fixup-gpt");
    let repo = old_install(&tmp);
    let target = tmp.path("t.img");
    let t = target.display().to_string();
    let out = bmr_ok(&[
        "restore", "--repo", &repo, "--host", "old1", "--target", &t, "--grow", "--verify",
    ]);
    for want in [
        "fix-up    grow the last partition",
        "fix-up grow: partition 2 grown from 40.0 MiB to",
        "fix-up device names: partition 2 /etc/fstab",
        "-/dev/sda2 / ext4 errors=remount-ro 0 1",
        "fix-up device names: partition 2 /boot/grub/grub.cfg",
        "fix-up UEFI: copied EFI/debian/grubx64.efi to EFI/BOOT/BOOTX64.EFI, EFI/BOOT/grub.cfg",
        "no boot entry for an image file",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // The restored target is 64 MiB (the source's size): grow needs a bigger disk. Restore
    // again onto 96 MiB.
    let big = tmp.path("big.img");
    sh(&format!("truncate -s 96M {}", big.display()));
    let out = bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "old1",
        "--target",
        &big.display().to_string(),
        "--grow",
        "--yes",
    ]);
    assert!(
        out.contains("fix-up grow: partition 2 grown from 40.0 MiB to 79.0 MiB"),
        "{out}"
    );
    assert!(sh(&format!("sgdisk -v {}", big.display())).contains("No problems found"));
    let (first, last) = gpt_range(&big, 2);
    let total = 96 * MIB / 512;
    // The last usable sector, or the one before it that ends a whole 4 KiB (a LUKS volume with
    // 4 KiB sectors refuses any other size).
    let usable = total - 34;
    assert_eq!(
        last,
        first + (usable + 1 - first) / 8 * 8 - 1,
        "partition 2 must end at the last usable sector that ends a whole 4 KiB"
    );
    assert!(usable - last < 8);
    let (off, len) = (first * 512, (last + 1 - first) * 512);
    let part = tmp.path("grown.img");
    extract(&big, off, len, &part);
    sh(&format!("e2fsck -fn {}", part.display()));
    let blocks = sh(&format!("dumpe2fs -h {} 2>/dev/null", part.display()));
    let count: u64 = blocks
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("block count");
    let bsize: u64 = blocks
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("block size");
    // resize2fs may leave the last few blocks that cannot form a group.
    assert!(
        count * bsize <= len && len - count * bsize < 64 * 1024,
        "the filesystem fills the partition: {} of {len} bytes",
        count * bsize
    );

    let root_uuid = ext_uuid(&big, off, len, &tmp);
    let esp_img = tmp.path("esp-check.img");
    extract(&big, MIB, 16 * MIB, &esp_img);
    let fat_id = sh(&format!("blkid -o value -s UUID {}", esp_img.display()))
        .trim()
        .to_string();
    let fstab = debugfs_cat(&big, off, len, &tmp, "/etc/fstab");
    assert!(
        fstab.contains(&format!("UUID={root_uuid} / ext4 errors=remount-ro 0 1"))
            && fstab.contains(&format!("UUID={fat_id} /boot/efi vfat")),
        "{fstab}"
    );
    assert!(fstab.contains("# <file system>"), "comments stay: {fstab}");
    let grub = debugfs_cat(&big, off, len, &tmp, "/boot/grub/grub.cfg");
    assert!(
        grub.contains(&format!("root=UUID={root_uuid} ro quiet")),
        "{grub}"
    );
    // The fallback loader is the system's loader, and its grub.cfg came along.
    let esp = format!("{}@@{}", big.display(), MIB);
    assert_eq!(
        sh(&format!("mtype -i {esp} ::/EFI/BOOT/BOOTX64.EFI")),
        "MZ pretend loader"
    );
    assert!(sh(&format!("mtype -i {esp} ::/EFI/BOOT/grub.cfg")).contains("configfile"));
    sh(&format!("fsck.fat -n {}", esp_img.display()));
}

/// A disk imaged away from its machine (a USB dock, a dd copy): its fstab names it by-id and by
/// its kernel name there, and names a partition of another disk. Only --source-name tells bmr
/// which names were this disk's.
#[test]
fn device_names_given_with_source_name() {
    let tmp = Tmp::new("fixup-names");
    let root = tmp.path("root");
    populate(&root, 4);
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let fstab = "/dev/disk/by-id/ata-OLD_DISK_S1-part2 / ext4 errors=remount-ro 0 1\n\
                 /dev/sda1 /boot ext4 defaults 0 2\n\
                 /dev/disk/by-id/ata-OTHER_DISK_S2-part1 /srv ext4 defaults 0 2\n";
    std::fs::write(root.join("etc/fstab"), fstab).unwrap();
    let boot = tmp.path("boot");
    populate(&boot, 5);
    let disk = tmp.path("src.img");
    sh(&format!(
        "truncate -s 48M {d} && sgdisk -n 1:2048:+12M -n 2:0:+30M {d} >/dev/null",
        d = disk.display()
    ));
    for (img, mib, dir, at) in [("boot.img", 12, &boot, 1), ("root.img", 30, &root, 13)] {
        let img = tmp.path(img);
        make_ext(&img, mib, "ext4", "", dir);
        place(&disk, &img, at * MIB);
    }
    let repo = tmp.s("repo");
    let src = disk.display().to_string();
    let backup = |host: &str, names: &[&str]| {
        let mut args = vec!["backup", "--repo", &repo, "--host", host, &src];
        for n in names {
            args.extend(["--source-name", n]);
        }
        bmr_ok(&args)
    };
    let restore = |host: &str, target: &str| {
        let t = tmp.s(target);
        sh(&format!("truncate -s 48M {t}"));
        let out = bmr_ok(&["restore", "--repo", &repo, "--host", host, "--target", &t]);
        (
            out,
            debugfs_cat(&tmp.path(target), 13 * MIB, 30 * MIB, &tmp, "/etc/fstab"),
        )
    };

    // A partition is no disk: refused before anything is read.
    let err = bmr_fails(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "x",
        "--source-name",
        "/dev/sda1",
        &src,
    ]);
    assert!(
        err.contains("--source-name /dev/sda1: not a whole disk"),
        "{err}"
    );

    backup("named", &["/dev/sda", "/dev/disk/by-id/ata-OLD_DISK_S1"]);
    let manifest: serde_json::Value =
        serde_json::from_str(&sh(&format!("cat {repo}/hosts/named/snapshots/*.json"))).unwrap();
    assert_eq!(
        manifest["source_names"],
        serde_json::json!(["/dev/disk/by-id/ata-OLD_DISK_S1", "/dev/sda"])
    );
    let (out, new) = restore("named", "t1.img");
    assert!(
        out.contains("            also named /dev/disk/by-id/ata-OLD_DISK_S1, /dev/sda\n"),
        "{out}"
    );
    assert!(
        out.contains(
            "fix-up device names: partition 2 /etc/fstab: /dev/disk/by-id/ata-OLD_DISK_S1-partN, /dev/sdaN -> UUID="
        ),
        "{out}"
    );
    let part = tmp.path("p.img");
    extract(&tmp.path("t1.img"), MIB, 12 * MIB, &part);
    let boot_uuid = sh(&format!("blkid -o value -s UUID {}", part.display()));
    let root_uuid = ext_uuid(&tmp.path("t1.img"), 13 * MIB, 30 * MIB, &tmp);
    assert_eq!(
        new,
        format!(
            "UUID={root_uuid} / ext4 errors=remount-ro 0 1\nUUID={} /boot ext4 defaults 0 2\n\
             /dev/disk/by-id/ata-OTHER_DISK_S2-part1 /srv ext4 defaults 0 2\n",
            boot_uuid.trim()
        )
    );

    // Without the names an image file's backup cannot tell which disk is which: nothing changes.
    backup("unnamed", &[]);
    let (out, same) = restore("unnamed", "t2.img");
    assert!(out.contains("name partitions of several disks"), "{out}");
    assert_eq!(same, fstab);

    // A wrong name: nothing changes, and the log says what to do.
    backup("wrong", &["/dev/sdb"]);
    let (out, same) = restore("wrong", "t3.img");
    assert!(
        out.contains("not of the backed-up disk (sdb); left as they are")
            && out.contains("--source-name"),
        "{out}"
    );
    assert_eq!(same, fstab);
}

#[test]
fn no_fixups_leaves_the_system_as_backed_up() {
    let tmp = Tmp::new("fixup-none");
    let repo = old_install(&tmp);
    let target = tmp.path("t.img");
    let out = bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "old1",
        "--target",
        &target.display().to_string(),
        "--no-fixups",
    ]);
    assert!(
        out.contains("fix-ups   none (--no-fixups)") && !out.contains("fix-up "),
        "{out}"
    );
    let fstab = debugfs_cat(&target, 17 * MIB, 40 * MIB, &tmp, "/etc/fstab");
    assert!(fstab.contains("/dev/sda2 / ext4"), "{fstab}");
    let (ok, _) = sh_status(&format!(
        "mtype -i {}@@{} ::/EFI/BOOT/BOOTX64.EFI",
        target.display(),
        MIB
    ));
    assert!(!ok, "no fallback loader without fix-ups");
}

#[test]
fn grow_on_mbr_and_refusal_for_a_logical_last_partition() {
    let tmp = Tmp::new("fixup-mbr");
    let tree = tmp.path("tree");
    populate(&tree, 5);
    let disk = tmp.path("src.img");
    sh(&format!(
        "truncate -s 48M {d} && echo 'start=2048, size=40M, type=83, bootable' | sfdisk -q {d}",
        d = disk.display()
    ));
    let ext = tmp.path("fs.img");
    make_ext(&ext, 40, "ext4", "", &tree);
    place(&disk, &ext, MIB);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "m1",
        &disk.display().to_string(),
    ]);
    let big = tmp.path("big.img");
    sh(&format!("truncate -s 80M {}", big.display()));
    let out = bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "m1",
        "--target",
        &big.display().to_string(),
        "--grow",
    ]);
    assert!(
        out.contains("fix-up grow: partition 1 grown from 40.0 MiB to 79.0 MiB"),
        "{out}"
    );
    let (_, parts) = sfdisk_parts(&big);
    assert_eq!(parts[0].1, MIB);
    assert_eq!(
        parts[0].2,
        79 * MIB,
        "partition 1 ends at the end of the disk"
    );
    let part = tmp.path("p1.img");
    extract(&big, MIB, 79 * MIB, &part);
    sh(&format!("e2fsck -fn {}", part.display()));
    assert!(sh(&format!("sfdisk -d {}", big.display())).contains("bootable"));
    // The entry's CHS end address moved with it: byte for byte what sfdisk writes itself.
    let fresh = tmp.path("fresh.img");
    sh(&format!(
        "truncate -s 80M {d} && echo 'start=2048, type=83, bootable' | sfdisk -q {d}",
        d = fresh.display()
    ));
    let entry = |p: &Path| std::fs::read(p).unwrap()[446..462].to_vec();
    assert_eq!(entry(&big), entry(&fresh), "partition entry 1 vs sfdisk's");

    // Root in a logical partition at the end (Debian's old default layout): refused, clearly.
    let disk2 = tmp.path("src2.img");
    sh(&format!(
        "truncate -s 48M {d} && printf 'start=2048, size=8M, type=83\\nstart=18432, type=5\\nstart=20480, type=83\\n' | sfdisk -q {d}",
        d = disk2.display()
    ));
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "m2",
        &disk2.display().to_string(),
    ]);
    let big2 = tmp.path("big2.img");
    sh(&format!("truncate -s 80M {}", big2.display()));
    let err = bmr_fails(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "m2",
        "--target",
        &big2.display().to_string(),
        "--grow",
    ]);
    assert!(
        err.contains("logical one inside an extended partition"),
        "{err}"
    );
}

/// A GPT disk of `disk_mib` whose one partition (1 MiB on, `part_mib` long) holds a filesystem
/// made by `mkfs` on a loop device, with a few files.
fn one_fs_disk(tmp: &Tmp, name: &str, disk_mib: u64, part_mib: u64, mkfs: &str) -> PathBuf {
    let disk = tmp.path(name);
    sh(&format!(
        "truncate -s {disk_mib}M {d} && sgdisk -n 1:2048:+{part_mib}M {d} >/dev/null && \
         l=$(losetup -f --show -o {MIB} --sizelimit {len} {d}) && {mkfs} $l >/dev/null && \
         m={m} && mkdir -p $m && mount $l $m && cp -a /etc/os-release /etc/services $m/ && \
         mkdir $m/dir && head -c 3M /dev/urandom > $m/dir/blob && umount $m; losetup -d $l",
        d = disk.display(),
        len = part_mib * MIB,
        m = tmp.path(&format!("{name}.mnt")).display(),
    ));
    disk
}

#[test]
fn grow_xfs_and_btrfs_while_mounted() {
    let tmp = Tmp::new("fixup-grow-xfs-btrfs");
    for (fs, part_mib, check) in [
        ("xfs", 320, "xfs_repair -n"),
        ("btrfs", 200, "btrfs check --readonly"),
    ] {
        let mkfs = if fs == "xfs" {
            "mkfs.xfs -f -q"
        } else {
            "mkfs.btrfs -f -q"
        };
        let disk = one_fs_disk(&tmp, &format!("{fs}.img"), part_mib + 2, part_mib, mkfs);
        let repo = tmp.s(&format!("repo-{fs}"));
        bmr_ok(&[
            "backup",
            "--repo",
            &repo,
            "--host",
            fs,
            "-q",
            &disk.display().to_string(),
        ]);
        let big = tmp.path(&format!("{fs}-big.img"));
        let big_mib = part_mib * 2 + 2;
        sh(&format!("truncate -s {big_mib}M {}", big.display()));
        let _ = sh_status("btrfs device scan --forget");
        let out = bmr_ok(&[
            "restore",
            "--repo",
            &repo,
            "--host",
            fs,
            "--target",
            &big.display().to_string(),
            "--grow",
            "--yes",
        ]);
        assert!(out.contains("fix-up grow: partition 1 grown from"), "{out}");
        let grown = if fs == "xfs" {
            "xfs: data blocks changed from"
        } else {
            "btrfs: Resize"
        };
        assert!(out.contains(&format!("fix-up grow: {grown}")), "{out}");
        // The filesystem fills the grown partition, checks clean, and kept its files.
        let (first, last) = gpt_range(&big, 1);
        let len = (last + 1 - first) * 512;
        assert!(len > (big_mib - 2) * MIB, "partition 1 is {len} bytes");
        let size = sh(&format!(
            "l=$(losetup -f --show -o {} --sizelimit {len} {}) && {check} $l >/dev/null 2>&1; rc=$?; \
             m={m} && mkdir -p $m && mount -o ro $l $m && cmp $m/services /etc/services && \
             df -B1 --output=size $m | tail -1; umount $m; losetup -d $l; exit $rc",
            first * 512,
            big.display(),
            m = tmp.path(&format!("{fs}-check")).display(),
        ));
        let size: u64 = size.trim().parse().unwrap_or_else(|_| panic!("df: {size}"));
        assert!(
            size > part_mib * MIB * 3 / 2,
            "{fs} is {size} bytes after --grow on a {len}-byte partition"
        );
    }
}
