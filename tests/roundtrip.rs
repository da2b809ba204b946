//! Round trips of real disks: GPT and MBR with every supported filesystem, restored to a
//! same-size and a bigger target, checked with sgdisk/sfdisk, e2fsck, fsck.fat, cmp and diff.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const GUID: &str = "11111111-2222-3333-4444-555555555555";

/// GPT disk: BIOS boot, FAT32 ESP, ext4 variants (64bit, no flex_bg, 1 KiB blocks, bigalloc,
/// meta_bg), random data in a partition and in gaps; slots 1, 2, 4.. (3 left empty).
fn build_gpt(tmp: &Tmp) -> (PathBuf, Vec<Part>) {
    let disk = tmp.path("gpt.img");
    let mb = |m: u64| m * 2048; // sectors
    struct Spec {
        num: u32,
        gap_before: u64,
        mib: u64,
        typ: &'static str,
        name: &'static str,
        kind: &'static str,
    }
    let specs = [
        Spec {
            num: 1,
            gap_before: 0,
            mib: 1,
            typ: "ef02",
            name: "bios",
            kind: "raw",
        },
        Spec {
            num: 2,
            gap_before: 0,
            mib: 40,
            typ: "ef00",
            name: "esp",
            kind: "fat32",
        },
        Spec {
            num: 4,
            gap_before: 0,
            mib: 48,
            typ: "8300",
            name: "root fs",
            kind: "ext4:-O 64bit",
        },
        Spec {
            num: 5,
            gap_before: 0,
            mib: 32,
            typ: "8300",
            name: "noflex",
            kind: "ext4:-O ^flex_bg",
        },
        Spec {
            num: 6,
            gap_before: 1,
            mib: 24,
            typ: "8300",
            name: "onek",
            kind: "ext4:-b 1024",
        },
        Spec {
            num: 7,
            gap_before: 0,
            mib: 64,
            typ: "8300",
            name: "bigalloc",
            kind: "ext4:-O bigalloc -C 16384",
        },
        Spec {
            num: 8,
            gap_before: 0,
            mib: 32,
            typ: "8300",
            name: "metabg",
            kind: "ext4:-O meta_bg,^resize_inode",
        },
        Spec {
            num: 9,
            gap_before: 0,
            mib: 8,
            typ: "8300",
            name: "random",
            kind: "raw",
        },
    ];
    let total: u64 = 2 + specs.iter().map(|s| s.gap_before + s.mib).sum::<u64>();
    sh(&format!("truncate -s {}M {}", total, disk.display()));
    let mut args = format!("sgdisk -U {GUID}");
    let mut start = mb(1);
    let mut parts = Vec::new();
    for s in &specs {
        start += mb(s.gap_before);
        let end = start + mb(s.mib) - 1;
        args += &format!(
            " -n {n}:{start}:{end} -t {n}:{t} -c {n}:'{name}'",
            n = s.num,
            t = s.typ,
            name = s.name
        );
        parts.push((s, start * 512, s.mib * MIB));
        start = end + 1;
    }
    args += " -A 4:set:2";
    sh(&format!("{args} {}", disk.display()));
    // Boot code, the post-GPT gap and the gap before partition 6 hold data the restore must keep.
    random_at(&disk, 0, 440);
    random_at(&disk, 34 * 512, (2048 - 34) * 512);
    let mut out = Vec::new();
    for (s, off, len) in parts {
        let img = tmp.path(&format!("fs{}.img", s.num));
        let content = match s.kind {
            "raw" => {
                random_at(&disk, off, len);
                Content::Raw
            }
            "fat32" => {
                let dir = tmp.path(&format!("tree{}", s.num));
                populate_fat(&dir);
                make_fat(&img, s.mib, 32, &dir, "-s 1 -i 1234ABCD -n ESP");
                place(&disk, &img, off);
                Content::Fat { dir }
            }
            k => {
                let opts = k.strip_prefix("ext4:").unwrap();
                let dir = tmp.path(&format!("tree{}", s.num));
                populate(&dir, s.num);
                make_ext(&img, s.mib, "ext4", opts, &dir);
                place(&disk, &img, off);
                Content::Ext { dir }
            }
        };
        if s.gap_before > 0 {
            random_at(&disk, off - s.gap_before * MIB, s.gap_before * MIB);
        }
        let _ = std::fs::remove_file(&img);
        out.push(Part {
            number: s.num,
            start: off,
            len,
            content,
        });
    }
    (disk, out)
}

/// MBR disk: bootable FAT16, ext2, an extended partition with ext3 and FAT12 logicals, boot code
/// and data in the post-MBR gap.
fn build_mbr(tmp: &Tmp) -> (PathBuf, Vec<Part>) {
    let disk = tmp.path("mbr.img");
    sh(&format!("truncate -s 128M {}", disk.display()));
    sh(&format!(
        "printf 'label: dos\\nlabel-id: 0x1234abcd\\nstart=2048, size=65536, type=6, bootable\\n\
         size=65536, type=83\\ntype=5\\nsize=65536, type=83\\nsize=8192, type=1\\n' | sfdisk -q {}",
        disk.display()
    ));
    random_at(&disk, 0, 440);
    random_at(&disk, 512, 2047 * 512);
    let (_, found) = sfdisk_parts(&disk);
    let mut out = Vec::new();
    for (num, start, len) in found {
        if num == 3 {
            continue; // the extended container
        }
        let img = tmp.path(&format!("fs{num}.img"));
        let dir = tmp.path(&format!("tree{num}"));
        let content = match num {
            1 | 6 => {
                populate_fat(&dir);
                let bits = if num == 1 { 16 } else { 12 };
                make_fat(&img, len / MIB, bits, &dir, "");
                Content::Fat { dir }
            }
            _ => {
                populate(&dir, num);
                let t = if num == 2 { "ext2" } else { "ext3" };
                make_ext(&img, len / MIB, t, "", &dir);
                Content::Ext { dir }
            }
        };
        place(&disk, &img, start);
        let _ = std::fs::remove_file(&img);
        out.push(Part {
            number: num,
            start,
            len,
            content,
        });
    }
    (disk, out)
}

fn table_without_nodes(mut pt: serde_json::Value, same_size: bool) -> serde_json::Value {
    if let Some(parts) = pt["partitions"].as_array_mut() {
        for p in parts {
            p.as_object_mut().unwrap().remove("node");
        }
    }
    let o = pt.as_object_mut().unwrap();
    o.remove("device");
    if !same_size {
        o.remove("lastlba");
    }
    pt
}

fn check_disk(tmp: &Tmp, src: &Path, dst: &Path, parts: &[Part], gpt: bool) {
    let src_size = std::fs::metadata(src).unwrap().len();
    let dst_size = std::fs::metadata(dst).unwrap().len();
    let same = src_size == dst_size;
    let (spt, _) = sfdisk_parts(src);
    let (dpt, _) = sfdisk_parts(dst);
    assert_eq!(
        table_without_nodes(spt, same),
        table_without_nodes(dpt, same),
        "partition tables differ"
    );
    if gpt {
        let v = sh(&format!("sgdisk -v {}", dst.display()));
        assert!(v.contains("No problems found"), "sgdisk -v: {v}");
        let info = sh(&format!("sgdisk -i 4 {}", dst.display()));
        assert!(info.contains("'root fs'"), "{info}");
        assert!(info.contains("Attribute flags: 0000000000000004"), "{info}");
        let p = sh(&format!("sgdisk -p {}", dst.display()));
        assert!(p.contains(&GUID.to_uppercase()), "{p}");
        let nums: Vec<&str> = p
            .lines()
            .skip_while(|l| !l.starts_with("Number"))
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(nums, ["1", "2", "4", "5", "6", "7", "8", "9"]);
    }
    // Boot areas and gaps are byte-equal (on a bigger GPT disk the primary header and the
    // protective MBR's size field legitimately change).
    let spans: Vec<(u64, u64)> = parts.iter().map(|p| (p.start, p.len)).collect();
    for (off, len) in gaps(&spans, src_size) {
        let mut pieces = vec![(off, len)];
        if off == 0 && gpt && !same {
            pieces = vec![(0, 440), (1024, len - 1024)];
        }
        if off + len == src_size && gpt && !same {
            continue; // the backup GPT moved
        }
        for (o, l) in pieces {
            assert!(
                read_range(src, o, l) == read_range(dst, o, l),
                "boot area/gap at {o}+{l} differs"
            );
        }
    }
    for p in parts {
        check_part(tmp, src, dst, p);
    }
}

fn round_trip(tmp: &Tmp, disk: &Path, parts: &[Part], gpt: bool) {
    let repo = tmp.s("repo");
    let out = bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "web1",
        "-q",
        &disk.display().to_string(),
    ]);
    assert!(out.contains("snapshot "), "{out}");
    // Every filesystem was mapped (not silently stored whole) and has a file list.
    let m: serde_json::Value =
        serde_json::from_str(&sh(&format!("cat {repo}/hosts/web1/snapshots/*.json"))).unwrap();
    let mapped = parts
        .iter()
        .filter(|p| !matches!(p.content, Content::Raw))
        .count();
    let areas = m["areas"].as_array().unwrap();
    let used_blocks = areas
        .iter()
        .filter(|a| a["content"] == "used-blocks" && a.get("note").is_none())
        .count();
    assert_eq!(used_blocks, mapped, "{areas:#?}");
    assert_eq!(m["tocs"].as_array().unwrap().len(), mapped);

    // Same size, new image file (created by the restore).
    let same = tmp.path("same.img");
    bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "web1",
        "--target",
        &same.display().to_string(),
        "--verify",
        "-q",
    ]);
    check_disk(tmp, disk, &same, parts, gpt);
    // Free space was skipped: the restored image is sparse.
    let alloc = |p: &Path| {
        sh(&format!("du -k {} | cut -f1", p.display()))
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    assert!(
        alloc(&same) * 2 < alloc(disk),
        "restored image is not sparse"
    );
    let _ = std::fs::remove_file(&same);

    // Bigger, existing blank disk.
    let big = tmp.path("big.img");
    let size = std::fs::metadata(disk).unwrap().len() + 64 * MIB;
    sh(&format!("truncate -s {size} {}", big.display()));
    bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "web1",
        "--at",
        "latest",
        "--target",
        &big.display().to_string(),
        "--verify",
        "-q",
    ]);
    check_disk(tmp, disk, &big, parts, gpt);
    let _ = std::fs::remove_file(&big);

    // A second backup of the unchanged disk stores (almost) nothing new.
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "web1",
        "-q",
        &disk.display().to_string(),
    ]);
    let list: serde_json::Value =
        serde_json::from_str(&bmr_ok(&["list", "--repo", &repo, "--json"])).unwrap();
    let snaps = list[0]["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    let used = snaps[0]["used_bytes"].as_u64().unwrap();
    let new2 = snaps[1]["new_bytes"].as_u64().unwrap();
    assert!(
        used > 0 && new2 * 100 < used,
        "second backup stored {new2} new bytes of {used}"
    );
    bmr_ok(&["verify", "--repo", &repo, "-q"]);

    // Single files straight from the image, from every filesystem with a file list.
    for p in parts {
        let (Content::Ext { dir } | Content::Fat { dir }) = &p.content else {
            continue;
        };
        let out = tmp.path(&format!("files{}", p.number));
        let part = p.number.to_string();
        let o = out.display().to_string();
        let (file, tree) = if matches!(p.content, Content::Fat { .. }) {
            ("/EFI/BOOT/BOOTX64.EFI", "docs")
        } else {
            ("/big.bin", "sub")
        };
        bmr_ok(&[
            "restore-files",
            "--repo",
            &repo,
            "--host",
            "web1",
            "--part",
            &part,
            "--to",
            &o,
            file,
            tree,
        ]);
        sh(&format!(
            "cmp {}{file} {o}{file} && diff -r {}/{tree} {o}/{tree}",
            dir.display(),
            dir.display()
        ));
        let ls = bmr_ok(&[
            "ls", "--repo", &repo, "--host", "web1", "--part", &part, "--json",
        ]);
        assert!(ls.contains(&format!("\"/{tree}\"")), "{ls}");
    }
}

#[test]
fn gpt_round_trip() {
    let tmp = Tmp::new("gpt");
    let (disk, parts) = build_gpt(&tmp);
    round_trip(&tmp, &disk, &parts, true);
}

#[test]
fn mbr_round_trip() {
    let tmp = Tmp::new("mbr");
    let (disk, parts) = build_mbr(&tmp);
    round_trip(&tmp, &disk, &parts, false);
}

#[test]
fn unpartitioned_filesystem_round_trip() {
    let tmp = Tmp::new("bare");
    let dir = tmp.path("tree");
    populate(&dir, 7);
    let disk = tmp.path("bare.img");
    make_ext(&disk, 32, "ext4", "", &dir);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "bare",
        "-q",
        &disk.display().to_string(),
    ]);
    let dst = tmp.path("dst.img");
    bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "bare",
        "--target",
        &dst.display().to_string(),
        "-q",
    ]);
    let part = Part {
        number: 0,
        start: 0,
        len: 32 * MIB,
        content: Content::Ext { dir },
    };
    check_part(&tmp, &disk, &dst, &part);
}
