//! The reader against the kernel's view: build real filesystems, then compare every entry
//! with what a read-only mount (ext4) or mtools (FAT) shows.

use super::*;
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sh(cmd: &str) -> String {
    let o = Command::new("bash").arg("-ec").arg(cmd).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("bmr-fsread-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn read_file(fs: &dyn ReadAt, e: &Entry) -> Vec<u8> {
    let mut data = vec![0u8; e.size as usize];
    if let Some(i) = &e.inline {
        data[..i.len()].copy_from_slice(i);
    }
    for x in &e.extents {
        fs.read_at(
            &mut data[x.file_off as usize..(x.file_off + x.len) as usize],
            x.disk_off,
        )
        .unwrap();
    }
    data
}

fn tree(fs: &dyn ReadAt, fstype: &str) -> BTreeMap<Vec<u8>, Entry> {
    read_tree(fs, fstype)
        .unwrap()
        .into_iter()
        .map(|e| (e.path.clone(), e))
        .collect()
}

fn ext_case(name: &str, opts: &str, populate: &str) {
    let d = tmp(name);
    let img = d.join("fs.img");
    let mnt = d.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "truncate -s 64M {i} && mke2fs -q -F {opts} {i} && mount -o loop {i} {m} && cd {m} && {populate}; cd /; umount {m}",
        i = img.display(),
        m = mnt.display()
    ));
    let f = std::fs::File::open(&img).unwrap();
    let range = FileRange {
        file: &f,
        base: 0,
        len: 64 << 20,
    };
    let got = tree(&range, "ext4");
    sh(&format!(
        "mount -o ro,loop {} {}",
        img.display(),
        mnt.display()
    ));
    let res = std::panic::catch_unwind(|| {
        let mut count = 0;
        for w in walkdir(&mnt) {
            let rel = w
                .strip_prefix(&mnt)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let e = got
                .get(&rel)
                .unwrap_or_else(|| panic!("{name}: {:?} missing", String::from_utf8_lossy(&rel)));
            let md = std::fs::symlink_metadata(&w).unwrap();
            let what = String::from_utf8_lossy(&rel).into_owned();
            assert_eq!(e.mode, md.mode() & 0o7777, "{name} {what} mode");
            assert_eq!((e.uid, e.gid), (md.uid(), md.gid()), "{name} {what} owner");
            assert_eq!(
                e.mtime,
                (md.mtime(), md.mtime_nsec() as u32),
                "{name} {what} mtime"
            );
            assert_eq!(
                e.ctime,
                (md.ctime(), md.ctime_nsec() as u32),
                "{name} {what} ctime"
            );
            assert_eq!(
                (e.inode, e.nlink),
                (md.ino(), md.nlink() as u32),
                "{name} {what} inode"
            );
            let ft = md.file_type();
            if ft.is_file() {
                assert_eq!(e.size, md.size(), "{name} {what} size");
                assert!(
                    read_file(&range, e) == std::fs::read(&w).unwrap(),
                    "{name} {what} content"
                );
            }
            if ft.is_symlink() {
                assert_eq!(
                    e.symlink.as_deref(),
                    Some(std::fs::read_link(&w).unwrap().as_os_str().as_bytes()),
                    "{name} {what}"
                );
            }
            use std::os::unix::fs::FileTypeExt;
            if ft.is_char_device() {
                assert_eq!(e.rdev, (libc::major(md.rdev()), libc::minor(md.rdev())));
            }
            let mut want: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(&w)
                .unwrap()
                .map(|n| {
                    (
                        n.as_bytes().to_vec(),
                        xattr::get(&w, &n).unwrap().unwrap_or_default(),
                    )
                })
                .collect();
            want.sort();
            let mut have = e.xattrs.clone();
            have.sort();
            assert_eq!(have, want, "{name} {what} xattrs");
            count += 1;
        }
        assert_eq!(count + 1, got.len(), "{name}: entry count");
    });
    sh(&format!("umount {}", mnt.display()));
    let _ = std::fs::remove_dir_all(&d);
    res.unwrap();
}

fn walkdir(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        out.push(path.clone());
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(walkdir(&path));
        }
    }
    out
}

const RICH: &str = "head -c 20000000 /dev/urandom > big && echo hi > small && : > empty && \
    ln small hard && ln -s small fast && ln -s $(printf 'x%.0s' $(seq 1 100)) slow && mkfifo fifo && mknod chr c 1 3 && \
    truncate -s 9M sparse && echo mid | dd of=sparse bs=1 seek=4000000 conv=notrunc status=none && \
    printf y > \"$(printf 'sp ace\\nnl\\xff')\" && mkdir -p $(seq -s/ 1 30 | tr -d '\\n') && \
    mkdir many && (cd many && seq 1 3000 | xargs touch) && \
    chown 1234:5678 small && chmod 4755 small && chmod 1777 many && \
    setfattr -n user.note -v hello small && setfattr -n security.test -v sec small && \
    setfacl -m u:1234:rwx big && setfacl -d -m g:99:rx many && touch -d '2001-02-03 04:05:06.789' big";

#[test]
fn ext4_matches_the_kernel() {
    ext_case("ext4", "-t ext4", RICH);
}

#[test]
fn ext2_block_maps_and_inline_data() {
    ext_case(
        "ext2",
        "-t ext2 -b 1024",
        "head -c 30000000 /dev/urandom > big && mkdir d && echo a > d/f && ln -s d l",
    );
    ext_case(
        "inline",
        "-t ext4 -O inline_data",
        "echo tiny > t && mkdir sm && echo x > sm/a && head -c 5000 /dev/urandom > notinline",
    );
}

#[test]
fn fat_matches_mtools() {
    let d = tmp("fat");
    let img = d.join("fat.img");
    sh(&format!(
        "cd {} && mkdir -p src/Sub/Deeper && head -c 300000 /dev/urandom > src/Sub/Deeper/data.bin && \
        echo hi > 'src/A long file name.txt' && : > src/empty && head -c 100000 /dev/urandom > src/frag1 && \
        mkfs.fat -C -F 32 -s 1 -S 512 fat.img 40000 >/dev/null && mcopy -s -i fat.img src/* ::/ && \
        mdel -i fat.img ::/frag1 && head -c 200000 /dev/urandom > frag2 && mcopy -i fat.img frag2 ::/frag2 && \
        mcopy -i fat.img src/Sub/Deeper/data.bin ::/after",
        d.display()
    ));
    let f = std::fs::File::open(&img).unwrap();
    let len = f.metadata().unwrap().len();
    let range = FileRange {
        file: &f,
        base: 0,
        len,
    };
    let got = tree(&range, "vfat");
    let names: Vec<String> = got
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "",
            "A long file name.txt",
            "Sub",
            "Sub/Deeper",
            "Sub/Deeper/data.bin",
            "after",
            "empty",
            "frag2"
        ]
    );
    for (p, src) in [
        ("Sub/Deeper/data.bin", "src/Sub/Deeper/data.bin"),
        ("frag2", "frag2"),
        ("after", "src/Sub/Deeper/data.bin"),
        ("A long file name.txt", "src/A long file name.txt"),
    ] {
        let e = &got[p.as_bytes()];
        assert!(
            read_file(&range, e) == std::fs::read(d.join(src)).unwrap(),
            "{p}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn damage_never_panics() {
    let d = tmp("dmg");
    let img = d.join("fs.img");
    let mnt = d.join("m");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "truncate -s 16M {i} && mke2fs -q -F -t ext4 -N 64 {i} && mount -o loop {i} {m} && mkdir -p {m}/a/b && echo x > {m}/a/b/c && umount {m}",
        i = img.display(),
        m = mnt.display()
    ));
    let pristine = std::fs::read(&img).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..300 {
        let mut data = pristine.clone();
        for _ in 0..8 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Superblock, descriptors, inode tables and the first directory blocks.
            let pos = 1024 + (seed % (1 << 20)) as usize;
            data[pos] ^= (seed >> 40) as u8 | 1;
        }
        std::fs::write(&img, &data).unwrap();
        let f = std::fs::File::open(&img).unwrap();
        let _ = read_tree(
            &FileRange {
                file: &f,
                base: 0,
                len: 16 << 20,
            },
            "ext4",
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
