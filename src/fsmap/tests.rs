//! Allocation maps checked against real filesystems made by mke2fs and mkfs.fat: zero every
//! byte the map calls free, and the filesystem must still check clean with the same files.

use super::*;
use std::path::PathBuf;
use std::process::Command;

fn tmpdir(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("bmr-fsmap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn sh(cmd: &str) -> (bool, String) {
    let o = Command::new("bash").arg("-ec").arg(cmd).output().unwrap();
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.success(), s)
}

fn zero_unused(img: &std::path::Path, info: &FsInfo) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let len = info.used.len();
    let mut pos = 0;
    for (o, l) in info.used.used_ranges(0, len) {
        f.write_all_at(&vec![0u8; (o - pos) as usize], pos).unwrap();
        pos = o + l;
    }
    f.write_all_at(&vec![0u8; (len - pos) as usize], pos)
        .unwrap();
}

fn ext_case(name: &str, mib: u64, opts: &str) {
    let d = tmpdir(name);
    let img = d.join("fs.img");
    let (ok, out) = sh(&format!(
        "cd {d} && mkdir -p tree/a && head -c 3000000 /dev/urandom > tree/a/big && echo hi > tree/small && \
         head -c {bytes} /dev/urandom > fs.img && mke2fs -q -F -E nodiscard -L lbl {opts} -U 0a0b0c0d-0000-1111-2222-333344445555 -d tree fs.img",
        d = d.display(),
        bytes = mib << 20
    ));
    assert!(ok, "{out}");
    let f = std::fs::File::open(&img).unwrap();
    let info = probe(&f, 0, mib << 20).unwrap().expect("ext detected");
    assert!(info.fstype.starts_with("ext"));
    assert_eq!(
        info.uuid.as_deref(),
        Some("0a0b0c0d-0000-1111-2222-333344445555")
    );
    assert_eq!(info.label.as_deref(), Some("lbl"));
    let used = info.used.used_bytes();
    assert!(
        used >= 3_000_000 && used < (mib << 20) / 2,
        "{name}: used {used}"
    );
    zero_unused(&img, &info);
    let (ok, out) = sh(&format!("e2fsck -fn {}", img.display()));
    assert!(ok, "{name}: e2fsck after zeroing free space:\n{out}");
    let (ok, out) = sh(&format!(
        "cd {} && debugfs -R 'dump /a/big big.out' fs.img 2>/dev/null && cmp big.out tree/a/big",
        d.display()
    ));
    assert!(ok, "{name}: {out}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn ext4_64k_blocks() {
    ext_case("64k", 256, "-t ext4 -b 65536");
}

#[test]
fn ext4_uninit_groups_and_sparse_super2() {
    ext_case("ss2", 96, "-t ext4 -O sparse_super2 -E num_backup_sb=2");
}

#[test]
fn ext2_and_ext3_types() {
    ext_case("ext2", 16, "-t ext2");
    ext_case("ext3", 16, "-t ext3");
}

#[test]
fn fat_uuid_label_and_zeroing() {
    let d = tmpdir("fat");
    let img = d.join("fat.img");
    let (ok, out) = sh(&format!(
        "cd {} && head -c 300000 /dev/urandom > data && head -c $((16<<20)) /dev/urandom > fat.img && \
         mkfs.fat -F 16 -i 1234ABCD -n MYLABEL fat.img >/dev/null && mcopy -i fat.img data ::/data",
        d.display()
    ));
    assert!(ok, "{out}");
    let f = std::fs::File::open(&img).unwrap();
    let info = probe(&f, 0, 16 << 20).unwrap().expect("fat detected");
    assert_eq!(info.variant.as_deref(), Some("fat16"));
    assert_eq!(info.uuid.as_deref(), Some("1234-ABCD"));
    assert_eq!(info.label.as_deref(), Some("MYLABEL"));
    zero_unused(&img, &info);
    let (ok, out) = sh(&format!(
        "cd {} && fsck.fat -n fat.img && mcopy -i fat.img ::/data out && cmp out data",
        d.display()
    ));
    assert!(ok, "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn random_data_is_not_a_filesystem_and_damage_never_panics() {
    let d = tmpdir("fuzz");
    let img = d.join("x.img");
    let (ok, out) = sh(&format!(
        "head -c $((8<<20)) /dev/urandom > {0} && mke2fs -q -F -t ext4 {0}",
        img.display()
    ));
    assert!(ok, "{out}");
    let pristine = std::fs::read(&img).unwrap();
    let rnd = d.join("r.img");
    std::fs::write(&rnd, &pristine[4 << 20..]).unwrap();
    let f = std::fs::File::open(&rnd).unwrap();
    assert!(probe(&f, 0, 4 << 20).unwrap().is_none());
    // Flip bytes in the superblock and descriptors: errors are fine, panics are not.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300 {
        let mut data = pristine.clone();
        for _ in 0..4 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let pos = 1024 + (seed % 8192) as usize;
            data[pos] ^= (seed >> 32) as u8 | 1;
        }
        std::fs::write(&img, &data).unwrap();
        let f = std::fs::File::open(&img).unwrap();
        let _ = probe(&f, 0, 8 << 20);
    }
    // A filesystem bigger than its partition is an error naming both sizes.
    std::fs::write(&img, &pristine).unwrap();
    let f = std::fs::File::open(&img).unwrap();
    let e = probe(&f, 0, 4 << 20).unwrap_err().to_string();
    assert!(e.contains("larger than its partition"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
