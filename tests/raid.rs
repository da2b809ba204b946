//! md RAID members on image files. This host has no md driver, so the member's superblock is
//! written here from the kernel's layout and checked by the real `mdadm --examine` before bmr
//! sees it; arrays made by mdadm itself, assembled, mirrored and grown are drilled in QEMU
//! (qemu-tests/rescue.sh raid).

mod common;
use common::*;

const MAGIC: u32 = 0xa92b_4efc;
const MD_FS_UUID: &str = "5e1d0c2b-3a49-4f58-8e67-d0c1b2a39485";

/// A metadata 1.2 superblock (4 KiB in) for a member of `len` bytes whose data starts at
/// `data_offset`: array `name`, `level`, two slots, this member in slot 0.
fn superblock_12(len: u64, data_offset: u64, level: u32, name: &str) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let put32 = |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, 1);
    b[0x10..0x20].copy_from_slice(&[
        0x6b, 0x1a, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7, 0xe8,
        0xf9,
    ]);
    b[0x20..0x20 + name.len()].copy_from_slice(name.as_bytes());
    put64(&mut b, 0x40, 1_700_000_000);
    put32(&mut b, 0x48, level);
    let data = (len - data_offset) / 512;
    put64(&mut b, 0x50, data);
    put32(&mut b, 0x58, 1024);
    put32(&mut b, 0x5c, 2);
    put64(&mut b, 0x80, data_offset / 512);
    put64(&mut b, 0x88, data);
    put64(&mut b, 0x90, 8);
    b[0xa8..0xb8].copy_from_slice(&[7u8; 16]);
    put64(&mut b, 0xc0, 1_700_000_100);
    put64(&mut b, 0xc8, 20);
    put64(&mut b, 0xd0, u64::MAX);
    put32(&mut b, 0xdc, 2);
    b[256..258].copy_from_slice(&0u16.to_le_bytes());
    b[258..260].copy_from_slice(&1u16.to_le_bytes());
    let mut sum: u64 = 0;
    for (i, w) in b[..260].chunks(4).enumerate() {
        if i != 0xd8 / 4 {
            sum += u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
    }
    put32(&mut b, 0xd8, ((sum & 0xffff_ffff) + (sum >> 32)) as u32);
    b
}

/// A GPT disk of `mib` MiB, random bytes first: partition 1 an 8 MiB ext4, partition 2 to the
/// end an md member (type FD00) of `level` whose data (from 1 MiB in) is an ext4 holding
/// `tree`. Returns the disk and partition 2's start and length.
fn member_disk(
    tmp: &Tmp,
    mib: u64,
    level: u32,
    tree: &std::path::Path,
) -> (std::path::PathBuf, u64, u64) {
    let disk = tmp.path("disk.img");
    sh(&format!(
        "head -c {} /dev/urandom > {d} && sgdisk -o -n 1:0:+8M -t 1:8300 -n 2:0:0 -t 2:fd00 {d} >/dev/null",
        mib * MIB,
        d = disk.display()
    ));
    let (_, parts) = sfdisk_parts(&disk);
    let (_, p1, p1_len) = parts[0];
    let (_, start, len) = parts[1];
    let boot = tmp.path("boot.img");
    let empty = tmp.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    make_ext(&boot, p1_len / MIB, "ext4", "", &empty);
    place(&disk, &boot, p1);
    let data_len = (len - MIB) / MIB * MIB;
    let fs = tmp.path("md-data.img");
    make_ext(
        &fs,
        data_len / MIB,
        "ext4",
        &format!("-L mdroot -U {MD_FS_UUID}"),
        tree,
    );
    place(&disk, &fs, start + MIB);
    let sb = superblock_12(len, MIB, level, "web1:r1");
    std::fs::write(tmp.path("sb"), &sb).unwrap();
    place(&disk, &tmp.path("sb"), start + 4096);
    (disk, start, len)
}

fn examine(disk: &std::path::Path, start: u64, len: u64) -> String {
    let l = Loop::new(disk, start, len, true);
    sh(&format!("mdadm --examine {}", l.0))
}

#[test]
fn raid1_member_files_and_round_trip() {
    let tmp = Tmp::new("raid1");
    let tree = tmp.path("tree");
    populate(&tree, 11);
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(
        tree.join("etc/fstab"),
        format!("UUID={MD_FS_UUID} / ext4 defaults 0 1\n"),
    )
    .unwrap();
    let (disk, start, len) = member_disk(&tmp, 64, 1, &tree);
    // The fixture is a member as mdadm sees one.
    let ex = examine(&disk, start, len);
    for want in [
        "Raid Level : raid1",
        "Array UUID : 6b1a2c3d:4e5f6071:8293a4b5:c6d7e8f9",
        "Data Offset : 2048 sectors",
        "Name : web1:r1",
        "correct",
    ] {
        assert!(ex.contains(want), "mdadm --examine lacks {want:?}: {ex}");
    }

    let repo = tmp.s("repo");
    let d = disk.display().to_string();
    bmr_ok(&["backup", "--repo", &repo, "--host", "web1", &d]);
    let m: serde_json::Value =
        serde_json::from_str(&sh(&format!("cat {repo}/hosts/web1/snapshots/*.json"))).unwrap();
    let area = m["areas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["raid"].is_object())
        .expect("no md area in the manifest")
        .clone();
    assert_eq!(area["raid"]["level"], "raid1");
    assert_eq!(area["raid"]["uuid"], "6b1a2c3d:4e5f6071:8293a4b5:c6d7e8f9");
    assert_eq!(area["raid"]["data_offset"], MIB);
    assert_eq!(area["volumes"][0]["name"], "md/r1");
    assert_eq!(area["volumes"][0]["fs"]["fstype"], "ext4");
    // Free space inside the array is not stored: the populated tree is small.
    let used = area["used_bytes"].as_u64().unwrap();
    assert!(used < len / 2, "the member stored {used} of {len} bytes");

    // Files inside the array, by its name.
    let ls = bmr_ok(&[
        "ls", "--repo", &repo, "--host", "web1", "--part", "md/r1", "/",
    ]);
    assert!(ls.contains("etc"), "{ls}");
    let out = tmp.path("rf");
    bmr_ok(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "web1",
        "--part",
        "md/r1",
        "--to",
        &out.display().to_string(),
        "etc/fstab",
    ]);
    assert_eq!(
        std::fs::read(out.join("etc/fstab")).unwrap(),
        std::fs::read(tree.join("etc/fstab")).unwrap()
    );
    // Without --part, the system filesystem (the one with /etc/fstab) is the array's.
    let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "web1", "/etc"]);
    assert!(ls.contains("fstab"), "{ls}");

    // The plan shows the member and says the mirror comes back degraded.
    let target = tmp.s("target.img");
    let plan = bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "web1",
        "--target",
        &target,
        "--dry-run",
    ]);
    assert!(
        plan.contains("md raid1 member 0 of md/r1 (metadata 1.2, 2 of 2 active)"),
        "{plan}"
    );
    assert!(plan.contains("array md/r1"), "{plan}");
    assert!(
        plan.contains("md/r1 comes back degraded: 1 of its 2 disks"),
        "{plan}"
    );

    // The mirror disk cannot be the target.
    let e = bmr_fails(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "web1",
        "--target",
        &d,
        "--mirror-disk",
        &d,
        "--yes",
    ]);
    assert!(e.contains("is the target itself"), "{e}");

    bmr_ok(&[
        "restore", "--repo", &repo, "--host", "web1", "--target", &target, "--yes",
    ]);
    let t = std::path::Path::new(&target);
    // The member's superblock region comes back byte for byte, and the filesystem inside.
    assert_eq!(read_range(t, start, MIB), read_range(&disk, start, MIB));
    let ex = examine(t, start, len);
    assert!(
        ex.contains("Array UUID : 6b1a2c3d:4e5f6071:8293a4b5:c6d7e8f9") && ex.contains("correct"),
        "{ex}"
    );
    let fs = tmp.path("restored-md.img");
    extract(t, start + MIB, (len - MIB) / MIB * MIB, &fs);
    sh(&format!("e2fsck -fn {} >/dev/null", fs.display()));
    let mnt = Mount::ext(t, start + MIB, (len - MIB) / MIB * MIB, &tmp.path("mnt"));
    // The tree is there (mke2fs -d keeps whole-second times in small inodes: contents only).
    for f in names(&state(&tree)) {
        let (a, b) = (tree.join(&f), mnt.0.join(&f));
        if a.is_file() && !a.is_symlink() {
            assert_eq!(sha_file(&a), sha_file(&b), "{f}");
        } else {
            assert!(b.symlink_metadata().is_ok(), "{f} is missing");
        }
    }
    drop(mnt);

    // Tuesday: the array's filesystem mounted (here a loop device over the member's data, as
    // the running system has /dev/md127), changed, and backed up file by file.
    let data_len = (len - MIB) / MIB * MIB;
    let live = tmp.path("live");
    std::fs::create_dir_all(&live).unwrap();
    sh(&format!(
        "mount -o loop,offset={},sizelimit={data_len} {d} {}",
        start + MIB,
        live.display()
    ));
    let first = names(&state(&tree))
        .into_iter()
        .find(|n| tree.join(n).is_file() && n != "etc/fstab")
        .unwrap();
    sh(&format!(
        "cd {m} && rm {first} && echo Tuesday > tuesday.txt",
        m = live.display()
    ));
    let inc = bmr(&[
        "backup",
        "--incremental",
        "--repo",
        &repo,
        "--host",
        "web1",
        &live.display().to_string(),
    ]);
    let expected = state(&live);
    sh(&format!("umount {}", live.display()));
    assert!(
        inc.status.success(),
        "{}",
        String::from_utf8_lossy(&inc.stderr)
    );
    let l = bmr_ok(&["list", "--repo", &repo, "--host", "web1", "--at", "latest"]);
    assert!(l.contains("incremental: md/r1 ("), "{l}");

    // Restored at Tuesday: the incremental is applied inside the array, the deletion too.
    let t2 = tmp.s("target2.img");
    let out = bmr_ok(&[
        "restore", "--repo", &repo, "--host", "web1", "--target", &t2, "--yes",
    ]);
    assert!(
        out.contains("applied incremental ") && out.contains("to md array md/r1: 1 removed"),
        "{out}"
    );
    let t2 = std::path::Path::new(&t2);
    let mnt = Mount::ext(t2, start + MIB, data_len, &tmp.path("mnt2"));
    let got = state(&mnt.0);
    assert!(!got.contains_key(first.as_bytes()), "{first} came back");
    assert_eq!(names(&got), names(&expected));
    assert_eq!(
        std::fs::read_to_string(mnt.0.join("tuesday.txt")).unwrap(),
        "Tuesday\n"
    );
    drop(mnt);
    assert!(examine(t2, start, len).contains("Array UUID : 6b1a2c3d:4e5f6071:8293a4b5:c6d7e8f9"));
}

#[test]
fn other_levels_and_damaged_superblocks_are_stored_whole() {
    let tmp = Tmp::new("raid5");
    let tree = tmp.path("tree");
    populate(&tree, 3);
    let (disk, start, len) = member_disk(&tmp, 48, 5, &tree);
    let repo = tmp.s("repo");
    let d = disk.display().to_string();
    let out = bmr(&["backup", "--repo", &repo, "--host", "r5", &d]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a member of md array md/r1 (raid5)") && err.contains("stored whole"),
        "{err}"
    );

    // A mirror disk for a snapshot without a RAID1 member: refused before anything is written.
    let (t, m2) = (tmp.s("t.img"), tmp.path("m2.img"));
    sh(&format!("truncate -s 64M {}", m2.display()));
    let e = bmr_fails(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "r5",
        "--target",
        &t,
        "--mirror-disk",
        &m2.display().to_string(),
        "--yes",
    ]);
    assert!(
        e.contains("holds no md RAID1 member; nothing was written"),
        "{e}"
    );
    assert!(!std::path::Path::new(&t).exists());
    assert_eq!(
        std::fs::read(&m2)
            .unwrap()
            .iter()
            .filter(|&&b| b != 0)
            .count(),
        0
    );

    // One bit off in the superblock: not trusted as md, nor read as the filesystem under it.
    sh(&format!(
        "printf '\\001' | dd of={d} bs=1 seek={} conv=notrunc status=none",
        start + 4096 + 0x30
    ));
    let out = bmr(&["backup", "--repo", &repo, "--host", "bad", &d]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checksum does not match") && err.contains("stored whole"),
        "{err}"
    );
    let m = sh(&format!("cat {repo}/hosts/bad/snapshots/*.json"));
    let m: serde_json::Value = serde_json::from_str(&m).unwrap();
    let a = m["areas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["start"] == start)
        .unwrap()
        .clone();
    assert_eq!(a["content"], "whole");
    assert_eq!(a["used_bytes"], len);
}

/// The TUI asks for the mirror's second disk: chosen, the plan names it (and nothing is
/// written when the typed name is wrong); declined, the plan says the array comes back
/// degraded and the restore runs on the target alone.
#[test]
fn tui_offers_the_mirror_disk() {
    let tmp = Tmp::new("raid-tui");
    let tree = tmp.path("tree");
    populate(&tree, 5);
    let (disk, start, _) = member_disk(&tmp, 48, 1, &tree);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "web1",
        &disk.display().to_string(),
    ]);
    let target = tmp.path("t.img");
    let mirror = tmp.path("m.img");
    sh(&format!("truncate -s 48M {}", mirror.display()));
    let name = format!("bmr-tui-raid-{}", std::process::id());
    let t = Tmux::start(
        &name,
        &format!(
            "{} rescue --cmdline 'console=tty0'; echo EXIT=$?; sleep 600",
            env!("CARGO_BIN_EXE_bmr")
        ),
    );
    for pass in 0..2 {
        tui_to_target(&t, &repo, "web1", &target);
        t.wait("Restore its mirror onto a second disk too?");
        if pass == 0 {
            t.keys("Enter");
            t.wait("Mirror disk");
            t.keys("Up Up Enter");
            t.wait("Device path");
            t.text(&mirror.display().to_string());
            t.keys("Enter");
            let s = t.wait("Read everything back");
            assert!(
                s.contains(&format!("mirror    {} (48.0 MiB)", mirror.display())),
                "{s}"
            );
            t.keys("Enter");
            let s = t.wait("Type t.img to start");
            assert!(
                s.contains(&format!("and {} will be replaced", mirror.display())),
                "{s}"
            );
            t.text("m.img");
            t.keys("Enter");
            t.wait("Not confirmed: nothing was written");
            assert!(!target.exists());
            assert_eq!(
                std::fs::read(&mirror)
                    .unwrap()
                    .iter()
                    .filter(|&&b| b != 0)
                    .count(),
                0
            );
            t.wait("Next");
            t.keys("Up Enter");
        } else {
            t.keys("Down Enter");
            let s = t.wait("Read everything back");
            assert!(
                s.contains("md/r1 comes back degraded: 1 of its 2 disks"),
                "{s}"
            );
            t.keys("Enter");
            t.wait("Type t.img to start");
            t.text("t.img");
            t.keys("Enter");
        }
    }
    let s = t.wait("Done:");
    assert!(s.contains("BMR-RESULT: ok"), "{s}");
    assert_eq!(
        read_range(&target, start, MIB),
        read_range(&disk, start, MIB)
    );
}
