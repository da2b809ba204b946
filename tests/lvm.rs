//! `--snapshot lvm` on an image file whose partition is an LVM physical volume, reached through
//! a loop device over that stretch of the file (this host has no device-mapper, so the LVs stay
//! inactive and are read from the disk; the snapshot path itself is drilled in QEMU:
//! qemu-tests/run.sh gpt-sata-cd-uefi-lvm).

mod common;
use common::*;

/// lvm scans every block device, and loop devices come and go in the other test: the tests
/// here take turns.
static LVM_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Also, without udev lvm's hints go stale as loop devices come and go: scan instead.
fn lvm(cmd: &str) -> String {
    let (verb, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
    sh(&format!(
        "LVM_SUPPRESS_FD_WARNINGS=1 {verb} --config 'devices/hints=\"none\"' {rest}"
    ))
}

/// Add linear LVs (name, first extent, extents) to `vg` by restoring edited metadata:
/// lvcreate needs device-mapper, vgcfgrestore does not.
fn add_lvs(tmp: &Tmp, vg: &str, lvs: &[(&str, u64, u64)]) {
    let cfg = tmp.path("vg.cfg");
    lvm(&format!("vgcfgbackup -f {} {vg}", cfg.display()));
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut section = String::from("\tlogical_volumes {\n");
    for (i, (name, first, count)) in lvs.iter().enumerate() {
        section.push_str(&format!(
            "\t\t{name} {{\n\t\t\tid = \"bmrtst-{i:04}-aaaa-aaaa-aaaa-aaaa-aaaaaa\"\n\
             \t\t\tstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\t\t\tflags = []\n\
             \t\t\tsegment_count = 1\n\t\t\tsegment1 {{\n\t\t\t\tstart_extent = 0\n\
             \t\t\t\textent_count = {count}\n\t\t\t\ttype = \"striped\"\n\
             \t\t\t\tstripe_count = 1\n\t\t\t\tstripes = [\"pv0\", {first}]\n\t\t\t}}\n\t\t}}\n"
        ));
    }
    section.push_str("\t}\n");
    let end = text.rfind('}').unwrap();
    let edited = format!("{}{section}{}", &text[..end], &text[end..]);
    std::fs::write(&cfg, edited).unwrap();
    lvm(&format!("vgcfgrestore -f {} {vg}", cfg.display()));
}

/// A GPT disk of `mib` MiB, random bytes everywhere first (a free extent or free block that
/// came back would not be zero): partition 1 (8 MiB), then an LVM PV to the end holding `vg`
/// with `lvs` (1 MiB extents). Returns the disk, partition 1's start, the PV's start and
/// length, pe_start, and the PV's loop device: drop it before bmr reads the disk (two PVs with
/// one UUID confuse lvm).
fn pv_disk(
    tmp: &Tmp,
    vg: &str,
    mib: u64,
    lvs: &[(&str, u64, u64)],
) -> (std::path::PathBuf, u64, u64, u64, u64, Loop) {
    let disk = tmp.path("disk.img");
    sh(&format!(
        "head -c {} /dev/urandom > {d} && sgdisk -o -n 1:0:+8M -t 1:8300 -n 2:0:0 -t 2:8e00 {d} >/dev/null",
        mib * MIB,
        d = disk.display()
    ));
    let (_, parts) = sfdisk_parts(&disk);
    let (_, first, _) = parts[0];
    let (_, pv_start, pv_len) = parts[1];
    let pv = Loop::new(&disk, pv_start, pv_len, false);
    lvm(&format!("pvcreate -ff -y {}", pv.0));
    lvm(&format!("vgcreate -s 1M {vg} {}", pv.0));
    add_lvs(tmp, vg, lvs);
    let pe = pe_start(&pv.0);
    (disk, first, pv_start, pv_len, pe, pv)
}

/// The restore plan's line for logical volume `name`.
fn lv_line(plan: &str, name: &str) -> String {
    plan.lines()
        .find(|l| l.trim_start().starts_with(&format!("LV {name} ")))
        .unwrap_or_else(|| panic!("no line for LV {name} in: {plan}"))
        .to_string()
}

fn pe_start(dev: &str) -> u64 {
    lvm(&format!(
        "pvs --noheadings --units b --nosuffix -o pe_start {dev}"
    ))
    .trim()
    .parse()
    .unwrap()
}

fn lv_ranges(vg: &str, dev: &str) -> String {
    lvm(&format!(
        "lvs --noheadings --segments -o lv_name,seg_pe_ranges,lv_size --units b {vg}"
    ))
    .replace(dev, "PV")
}

#[test]
fn lvm_physical_volume_round_trip() {
    let _turn = LVM_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = Tmp::new("lvm");
    let vg = format!("bmrt{}", std::process::id());
    let tree = tmp.path("tree");
    populate(&tree, 7);
    let (disk, _, pv_start, pv_len, pe, pv) =
        pv_disk(&tmp, &vg, 64, &[("data", 2, 12), ("raw", 20, 3)]);
    let data_off = pv_start + pe + 2 * MIB;
    let raw_off = pv_start + pe + 20 * MIB;
    let fs = tmp.path("data.img");
    make_ext(&fs, 12, "ext4", "", &tree);
    place(&disk, &fs, data_off);
    let ranges = lv_ranges(&vg, &pv.0);
    assert!(
        ranges.contains("data") && ranges.contains("raw"),
        "{ranges}"
    );

    let repo = tmp.s("repo");
    let d = disk.display().to_string();
    let out = bmr_ok(&[
        "backup",
        "--snapshot",
        "lvm",
        "--repo",
        &repo,
        "--host",
        "h1",
        &d,
    ]);
    assert!(out.contains("snapshot "), "{out}");
    let m: serde_json::Value =
        serde_json::from_str(&sh(&format!("cat {repo}/hosts/h1/snapshots/*.json"))).unwrap();
    assert_eq!(m["consistency"], "snapshot");
    let area = m["areas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["partition"] == 2)
        .expect("an area for the PV")
        .clone();
    assert_eq!(area["content"], "used-blocks", "{area:#}");
    let vols = area["volumes"].as_array().expect("volumes");
    let names: Vec<&str> = vols.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, [format!("{vg}/data"), format!("{vg}/raw")]);
    assert_eq!(vols[0]["fs"]["fstype"], "ext4", "{area:#}");
    assert_eq!(vols[0]["snapshot"], false);
    // Free extents are skipped: the PV holds 15 MiB of LVs in about 55 MiB.
    let used = area["used_bytes"].as_u64().unwrap();
    assert!(used < 3 * MIB + 12 * MIB, "{used} bytes stored for the PV");
    // Two PVs with one UUID confuse lvm: the source goes before the copy appears.
    drop(pv);

    let target = tmp.path("target.img");
    let t = target.display().to_string();
    let out = bmr_ok(&[
        "restore", "--repo", &repo, "--host", "h1", "--target", &t, "--verify", "-q",
    ]);
    // The plan shows the stack: the PV, and each LV with what is stored of it.
    assert!(out.contains(&format!("LVM PV of {vg}, ")), "{out}");
    let data = lv_line(&out, &format!("{vg}/data"));
    assert!(
        data.contains("ext4 ") && data.contains(", file list"),
        "{data}"
    );
    let raw = lv_line(&out, &format!("{vg}/raw"));
    assert!(
        raw.contains("3.0 MiB  no filesystem bmr maps, stored whole"),
        "{raw}"
    );
    // The PV label and metadata, the raw LV exactly, the ext4 LV by its used blocks and files.
    assert!(
        read_range(&disk, pv_start, pe) == read_range(&target, pv_start, pe),
        "PV label and metadata differ"
    );
    assert!(
        read_range(&disk, raw_off, 3 * MIB) == read_range(&target, raw_off, 3 * MIB),
        "LV raw differs"
    );
    let lv = Part {
        number: 2,
        start: data_off,
        len: 12 * MIB,
        content: Content::Ext { dir: tree },
    };
    check_part(&tmp, &disk, &target, &lv);
    let back = Loop::new(&target, pv_start, pv_len, false);
    assert_eq!(lv_ranges(&vg, &back.0), ranges);
}

#[test]
fn lvm_refusals() {
    let _turn = LVM_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = Tmp::new("lvm-refusals");
    let tree = tmp.path("tree");
    populate(&tree, 1);
    let repo = tmp.s("repo");

    // No PV on the disk: say so rather than take a backup that is not what was asked for.
    let plain = ext_disk(&tmp, 24, 16, "", &tree);
    let e = bmr_fails(&[
        "backup",
        "--snapshot",
        "lvm",
        "--repo",
        &repo,
        "--host",
        "h1",
        &plain.display().to_string(),
    ]);
    assert!(e.contains("no LVM physical volume"), "{e}");

    // A volume group that spans another disk cannot be imaged from this one.
    let vg = format!("bmru{}", std::process::id());
    let disk = tmp.path("disk.img");
    let other = tmp.path("other.img");
    sh(&format!(
        "truncate -s 32M {d} {o} && sgdisk -o -n 1:0:0 -t 1:8e00 {d} >/dev/null",
        d = disk.display(),
        o = other.display()
    ));
    let (_, parts) = sfdisk_parts(&disk);
    let here = Loop::new(&disk, parts[0].1, parts[0].2, false);
    let there = Loop::new(&other, 0, 32 * MIB, false);
    lvm(&format!("pvcreate -ff -y {} {}", here.0, there.0));
    lvm(&format!("vgcreate {vg} {} {}", here.0, there.0));
    let e = bmr_fails(&[
        "backup",
        "--snapshot",
        "lvm",
        "--repo",
        &repo,
        "--host",
        "h1",
        &disk.display().to_string(),
    ]);
    assert!(e.contains("physical volumes on other disks"), "{e}");
    // Nothing was stored.
    let (_, snaps) = sh_status(&format!("ls {repo}/hosts/h1/snapshots/ 2>&1"));
    assert!(!snaps.contains(".json"), "{snaps}");
    // Offline, such a PV is stored whole, and the warning names where the rest of the VG is.
    let out = bmr(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h2",
        &disk.display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "volume group {vg} also has physical volumes on other disks ({})",
            there.0
        )) && err.contains("stored whole"),
        "{err}"
    );
}

/// An Ubuntu-like disk imaged offline (no --snapshot; bmr makes the loop device lvm needs):
/// `/boot` on a partition, the root and swap in logical volumes. The root LV gets a file list
/// like any partition: `ls` shows it by default (it holds /etc/fstab), `--part VG/LV` names it,
/// single files come back from it, an incremental of it mounted (here by a loop device at its
/// extents) is recorded with its deletions, and `restore --at` applies that incremental inside
/// the restored LV. Swap stores only its header. The boot check finds every fstab device on the
/// restored disk, and fails a restore whose fstab names a filesystem the disk does not have.
#[test]
fn files_inside_logical_volumes() {
    let _turn = LVM_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = Tmp::new("lvm-files");
    let vg = format!("bmrf{}", std::process::id());
    let boot_uuid = "0b0b0b0b-1111-4222-8333-444444444444";
    let swap_uuid = "5a5a5a5a-1111-4222-8333-444444444444";
    let root = tmp.path("root");
    populate(&root, 3);
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let fstab = format!(
        "/dev/mapper/{vg}-root / ext4 errors=remount-ro 0 1\n\
         UUID={boot_uuid} /boot ext4 defaults 0 2\n\
         /dev/mapper/{vg}-swap none swap sw 0 0\n"
    );
    std::fs::write(root.join("etc/fstab"), &fstab).unwrap();
    let boot = tmp.path("boot");
    populate(&boot, 4);

    let (disk, boot_start, pv_start, _, pe, pv) =
        pv_disk(&tmp, &vg, 96, &[("root", 1, 40), ("swap", 45, 8)]);
    drop(pv);
    let root_off = pv_start + pe + MIB;
    let swap_off = pv_start + pe + 45 * MIB;
    let img = tmp.path("root.img");
    make_ext(&img, 40, "ext4", "", &root);
    place(&disk, &img, root_off);
    make_ext(&img, 8, "ext4", &format!("-U {boot_uuid}"), &boot);
    place(&disk, &img, boot_start);
    sh(&format!(
        "head -c {} /dev/urandom > {i} && mkswap -q -U {swap_uuid} -L swp {i} && \
         dd if={i} of={d} bs=1M seek={swap_off} oflag=seek_bytes conv=notrunc status=none",
        8 * MIB,
        i = img.display(),
        d = disk.display()
    ));

    let repo = tmp.s("repo");
    let d = disk.display().to_string();
    bmr_ok(&["backup", "--repo", &repo, "--host", "u1", &d]);
    let m: serde_json::Value =
        serde_json::from_str(&sh(&format!("cat {repo}/hosts/u1/snapshots/*.json"))).unwrap();
    assert_eq!(m["consistency"], "offline");
    let area = m["areas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["partition"] == 2)
        .unwrap()
        .clone();
    let vols = area["volumes"].as_array().expect("the LVs are mapped");
    assert_eq!(vols[0]["fs"]["fstype"], "ext4", "{area:#}");
    assert_eq!(vols[1]["fs"]["fstype"], "swap", "{area:#}");
    assert_eq!(vols[1]["fs"]["uuid"], swap_uuid, "{area:#}");
    // Label and metadata (1 MiB), the root's used blocks, one page of swap: not the free
    // extents, nor the swap's 8 MiB.
    let used = area["used_bytes"].as_u64().unwrap();
    assert!(used < 2 * MIB + 40 * MIB, "{used} bytes stored for the PV");
    let tocs = m["tocs"].as_array().unwrap();
    let lv_toc = tocs
        .iter()
        .find(|t| t["volume"] == format!("{vg}/root"))
        .expect("a file list for the root LV");
    assert_eq!(lv_toc["system"], true, "{lv_toc:#}");

    // ls: the root by default (with the choice on stderr), partitions and LVs by --part.
    let out = bmr(&["ls", "--repo", &repo, "--host", "u1", "/"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("\"etc\"") && stdout.contains("\"big.bin\""),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("{vg}/root (ext4, the root: it holds /etc/fstab)"))
            && stderr.contains("--part 1 (ext4)"),
        "{stderr}"
    );
    let etc = bmr_ok(&[
        "ls",
        "--repo",
        &repo,
        "--host",
        "u1",
        "--part",
        &format!("{vg}/root"),
        "/etc",
    ]);
    assert!(etc.contains("\"fstab\""), "{etc}");
    let b = bmr_ok(&[
        "ls", "--repo", &repo, "--host", "u1", "--part", "1", "/other",
    ]);
    assert!(b.contains("\"hello.txt\""), "{b}");
    let e = bmr_fails(&[
        "ls",
        "--repo",
        &repo,
        "--host",
        "u1",
        "--part",
        &format!("{vg}/swap"),
    ]);
    assert!(
        e.contains("no file list for logical volume") && e.contains(&format!("--part {vg}/root")),
        "{e}"
    );

    let out_dir = tmp.path("out");
    bmr_ok(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "u1",
        "--part",
        &format!("{vg}/root"),
        "--to",
        &out_dir.display().to_string(),
        "etc/fstab",
        "sub",
    ]);
    assert_eq!(
        std::fs::read_to_string(out_dir.join("etc/fstab")).unwrap(),
        fstab
    );
    {
        // Against the filesystem as mke2fs made it (its small inodes keep whole seconds).
        let src = Mount::ext(&disk, root_off, 40 * MIB, &tmp.path("src-mnt"));
        assert_eq!(state(&out_dir.join("sub")), state(&src.0.join("sub")));
    }

    // Tuesday: the root LV mounted (a loop device at its extents) and changed.
    let mnt = tmp.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mount -o loop,offset={root_off},sizelimit={} {d} {}",
        40 * MIB,
        mnt.display()
    ));
    sh(&format!(
        "cd {m} && rm -r sub/deeper && echo Tuesday > other/hello.txt && echo new > added",
        m = mnt.display()
    ));
    let inc = bmr(&[
        "backup",
        "--incremental",
        "--repo",
        &repo,
        "--host",
        "u1",
        &mnt.display().to_string(),
    ]);
    let expected = state(&mnt);
    sh(&format!("umount {}", mnt.display()));
    assert!(
        inc.status.success(),
        "{}",
        String::from_utf8_lossy(&inc.stderr)
    );
    let inc_out = String::from_utf8_lossy(&inc.stdout);
    assert!(inc_out.contains("deleted"), "{inc_out}");
    // verify reads the LV's file lists (image and incremental) like any other.
    let v = bmr_ok(&["verify", "--repo", &repo, "--host", "u1", "-q"]);
    assert!(!v.contains("damaged"), "{v}");
    // bmr list shows the stack of a point: the PV, its LVs, what the incremental covers.
    let l = bmr_ok(&["list", "--repo", &repo, "--host", "u1", "--at", "latest"]);
    assert!(
        l.contains(&format!("LV {vg}/root ")) && l.contains(&format!("incremental: {vg}/root (")),
        "{l}"
    );

    let target = tmp.path("target.img");
    let t = target.display().to_string();
    let out = bmr_ok(&[
        "restore", "--repo", &repo, "--host", "u1", "--target", &t, "--yes",
    ]);
    let rootl = lv_line(&out, &format!("{vg}/root"));
    assert!(
        rootl.contains("ext4 ") && rootl.contains(", file list"),
        "{rootl}"
    );
    let swapl = lv_line(&out, &format!("{vg}/swap"));
    assert!(
        swapl.contains(&format!("swap \"swp\" {swap_uuid}, header only")),
        "{swapl}"
    );
    assert!(
        out.contains("applied incremental ")
            && out.contains(&format!("to logical volume {vg}/root: ")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "fix-up boot check: {vg}/root /etc/fstab: every filesystem it mounts is on the restored disk"
        )),
        "{out}"
    );
    {
        let lv = Loop::new(&target, root_off, 40 * MIB, true);
        sh(&format!("e2fsck -fn {} >/dev/null", lv.0));
    }
    let back = tmp.path("back");
    {
        let _m = Mount::ext(&target, root_off, 40 * MIB, &back);
        assert_eq!(state(&back), expected);
    }
    assert_eq!(
        read_range(&target, swap_off, 4096),
        read_range(&disk, swap_off, 4096)
    );
    let (ok, blk) = sh_status(&format!(
        "losetup -f --show -r -o {swap_off} --sizelimit {} {t} | tee /dev/stderr | xargs -I{{}} sh -c 'blkid -o value -s UUID {{}}; losetup -d {{}}'",
        8 * MIB
    ));
    assert!(ok && blk.contains(swap_uuid), "{blk}");

    // An fstab naming a filesystem the disk does not hold: the restore says it would not boot.
    let broken =
        format!("{fstab}UUID=77777777-1111-4222-8333-444444444444 /srv ext4 defaults 0 2\n");
    std::fs::write(root.join("etc/fstab"), &broken).unwrap();
    make_ext(&img, 40, "ext4", "", &root);
    place(&disk, &img, root_off);
    bmr_ok(&["backup", "--repo", &repo, "--host", "u2", &d]);
    let t2 = tmp.s("target2.img");
    let e = bmr_fails(&[
        "restore", "--repo", &repo, "--host", "u2", "--target", &t2, "--yes",
    ]);
    assert!(
        e.contains("would not boot")
            && e.contains(&format!(
                "{vg}/root /etc/fstab mounts UUID=77777777-1111-4222-8333-444444444444 for /srv"
            )),
        "{e}"
    );
    // --grow-lv naming no LV of the snapshot: refused before the target exists.
    let t3 = tmp.path("target3.img");
    let e = bmr_fails(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "u1",
        "--target",
        &t3.display().to_string(),
        "--yes",
        "--grow-lv",
        &format!("{vg}/nope"),
    ]);
    assert!(
        e.contains(&format!("--grow-lv \"{vg}/nope\"")) && e.contains(&format!("{vg}/root")),
        "{e}"
    );
    assert!(!t3.exists());
}

/// RHEL's layout: an XFS root in a logical volume. Its file list, an incremental of it
/// mounted, and that incremental applied inside the restored LV, which `xfs_repair -n` finds
/// clean.
#[test]
fn xfs_root_in_a_logical_volume() {
    let _turn = LVM_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = Tmp::new("lvm-xfs");
    let vg = format!("bmrx{}", std::process::id());
    let (disk, _, pv_start, _, pe, pv) = pv_disk(&tmp, &vg, 400, &[("root", 0, 320)]);
    drop(pv);
    let root_off = pv_start + pe;
    let root_len = 320 * MIB;
    let mnt = tmp.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let d = disk.display().to_string();
    let m = mnt.display().to_string();
    {
        let lv = Loop::new(&disk, root_off, root_len, false);
        sh(&format!("mkfs.xfs -q -f {}", lv.0));
        sh(&format!("mount {} {m}", lv.0));
        populate(&mnt.join("data"), 9);
        sh(&format!(
            "mkdir -p {m}/etc && echo '/dev/mapper/{vg}-root / xfs defaults 0 0' > {m}/etc/fstab && umount {m}"
        ));
    }
    let repo = tmp.s("repo");
    bmr_ok(&["backup", "--repo", &repo, "--host", "r1", &d]);
    let ls = bmr_ok(&[
        "ls",
        "--repo",
        &repo,
        "--host",
        "r1",
        "--part",
        &format!("{vg}/root"),
        "/data/other",
    ]);
    assert!(ls.contains("\"hello.txt\""), "{ls}");

    sh(&format!(
        "mount -o loop,offset={root_off},sizelimit={root_len} {d} {m}"
    ));
    sh(&format!(
        "cd {m}/data && rm -r sub && echo changed > other/hello.txt"
    ));
    let inc = bmr(&[
        "backup",
        "--incremental",
        "--repo",
        &repo,
        "--host",
        "r1",
        &m,
    ]);
    let expected = state(&mnt);
    sh(&format!("umount {m}"));
    assert!(
        inc.status.success(),
        "{}",
        String::from_utf8_lossy(&inc.stderr)
    );

    let target = tmp.path("target.img");
    let t = target.display().to_string();
    let out = bmr_ok(&[
        "restore", "--repo", &repo, "--host", "r1", "--target", &t, "--yes",
    ]);
    assert!(
        out.contains(&format!("to logical volume {vg}/root: ")),
        "{out}"
    );
    assert!(out.contains("fix-up boot check: "), "{out}");
    let lv = Loop::new(&target, root_off, root_len, false);
    sh(&format!("xfs_repair -n {} >/dev/null 2>&1", lv.0));
    sh(&format!("mount -o ro,nouuid {} {m}", lv.0));
    let got = state(&mnt);
    sh(&format!("umount {m}"));
    assert_eq!(got, expected);
}
