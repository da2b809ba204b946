//! The reader against the kernel: real filesystems (mke2fs, mkfs.fat + mtools) compared entry by
//! entry with a read-only mount or mtools, plus damaged input that must never panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, c_char, c_void};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::fs::map::le16;

pub(super) fn sh(script: &str) -> String {
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "script failed: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(super) fn tmpdir(name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/fsread-test-{name}-{}", std::process::id()));
    let _ = Command::new("umount").arg(d.join("mnt")).output();
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("mnt")).unwrap();
    std::fs::create_dir_all(d.join("src")).unwrap();
    d
}

/// Unmounts on drop, so a failing assertion does not leave a mount behind.
pub(super) struct Mount(PathBuf);

impl Mount {
    pub(super) fn new(img: &Path, mnt: &Path, opts: &str) -> Mount {
        sh(&format!(
            "mount -o {opts},loop '{}' '{}'",
            img.display(),
            mnt.display()
        ));
        Mount(mnt.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

pub(super) struct Mem(pub(super) Vec<u8>);

impl ReadAt for Mem {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let s = usize::try_from(offset).map_err(std::io::Error::other)?;
        match self.0.get(s..s.saturating_add(buf.len())) {
            Some(src) if src.len() == buf.len() => {
                buf.copy_from_slice(src);
                Ok(())
            }
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "past end",
            )),
        }
    }
}

unsafe extern "C" {
    fn llistxattr(path: *const c_char, list: *mut c_char, size: usize) -> isize;
    fn lgetxattr(
        path: *const c_char,
        name: *const c_char,
        value: *mut c_void,
        size: usize,
    ) -> isize;
}

pub(super) fn xattrs_of(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cp = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut list = vec![0u8; 65536];
    let n = unsafe { llistxattr(cp.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    let mut out = Vec::new();
    for name in list[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
    {
        if name == b"system.data" {
            continue;
        }
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        let m = unsafe { lgetxattr(cp.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0, "lgetxattr {} {:?}", p.display(), cn);
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

pub(super) fn kind_of(ft: std::fs::FileType) -> Kind {
    if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_char_device() {
        Kind::CharDev
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    }
}

/// Every path under `root` (relative, raw bytes), root included.
pub(super) fn walk_mount(root: &Path) -> BTreeMap<Vec<u8>, PathBuf> {
    let mut out = BTreeMap::new();
    out.insert(Vec::new(), root.to_path_buf());
    let mut stack = vec![(Vec::new(), root.to_path_buf())];
    while let Some((rel, dir)) = stack.pop() {
        for de in std::fs::read_dir(&dir).unwrap() {
            let de = de.unwrap();
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(de.file_name().as_bytes());
            if de.file_type().unwrap().is_dir() {
                stack.push((r.clone(), de.path()));
            }
            out.insert(r, de.path());
        }
    }
    out
}

pub(super) fn check_order(entries: &[Entry]) {
    assert_eq!(entries.first().map(|e| e.path.as_slice()), Some(&b""[..]));
    let mut seen = BTreeSet::new();
    for e in entries {
        if !e.path.is_empty() {
            let parent = match e.path.iter().rposition(|&b| b == b'/') {
                Some(p) => e.path[..p].to_vec(),
                None => Vec::new(),
            };
            assert!(
                seen.contains(&parent),
                "parent of {:?} not before it",
                e.path
            );
        }
        assert!(seen.insert(e.path.clone()), "duplicate {:?}", e.path);
    }
}

fn read_img(img: &Path, fstype: &str) -> Vec<Entry> {
    let f = File::open(img).unwrap();
    let len = f.metadata().unwrap().len();
    let r = FileRange {
        file: &f,
        base: 0,
        len,
    };
    let entries = read_tree(&r, fstype).unwrap();
    check_order(&entries);
    entries
}

fn by_path(entries: &[Entry]) -> HashMap<Vec<u8>, &Entry> {
    entries.iter().map(|e| (e.path.clone(), e)).collect()
}

/// Mount the image read-only and compare every path's metadata, xattrs and content.
fn compare_ext_with_mount(img: &Path, mnt: &Path, entries: &[Entry]) {
    let f = File::open(img).unwrap();
    let r = FileRange {
        file: &f,
        base: 0,
        len: f.metadata().unwrap().len(),
    };
    let _m = Mount::new(img, mnt, "ro,noatime");
    let real = walk_mount(mnt);
    let ours = by_path(entries);
    let real_paths: BTreeSet<_> = real.keys().cloned().collect();
    let our_paths: BTreeSet<_> = ours.keys().cloned().collect();
    let missing: Vec<_> = real_paths.difference(&our_paths).take(5).collect();
    let extra: Vec<_> = our_paths.difference(&real_paths).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?} extra {extra:?}"
    );
    for (rel, p) in &real {
        let e = ours[rel];
        let md = std::fs::symlink_metadata(p).unwrap();
        let ctx = String::from_utf8_lossy(rel).into_owned();
        assert_eq!(e.kind, kind_of(md.file_type()), "{ctx}");
        assert_eq!(e.mode, md.mode() & 0o7777, "{ctx}");
        assert_eq!((e.uid, e.gid), (md.uid(), md.gid()), "{ctx}");
        assert_eq!(e.size, md.size(), "{ctx}");
        assert_eq!(e.mtime, (md.mtime(), md.mtime_nsec() as u32), "{ctx} mtime");
        assert_eq!(e.ctime, (md.ctime(), md.ctime_nsec() as u32), "{ctx} ctime");
        assert_eq!(e.atime, (md.atime(), md.atime_nsec() as u32), "{ctx} atime");
        assert_eq!(e.inode, md.ino(), "{ctx}");
        assert_eq!(u64::from(e.nlink), md.nlink(), "{ctx}");
        let rdev = md.rdev();
        let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
        let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
        assert_eq!(e.rdev, (major as u32, minor as u32), "{ctx}");
        let mut x = e.xattrs.clone();
        x.sort();
        assert_eq!(x, xattrs_of(p), "{ctx} xattrs");
        match e.kind {
            Kind::Symlink => assert_eq!(
                e.symlink.as_deref(),
                Some(std::fs::read_link(p).unwrap().as_os_str().as_bytes()),
                "{ctx}"
            ),
            Kind::File => {
                assert!(e.symlink.is_none());
                let want = std::fs::read(p).unwrap();
                assert!(read_file(&r, e).unwrap() == want, "{ctx}: content differs");
            }
            _ => assert!(e.symlink.is_none() && e.extents.is_empty()),
        }
    }
}

#[test]
fn ext4_full() {
    let d = tmpdir("ext4");
    let img = d.join("img");
    let mnt = d.join("mnt");
    sh(&format!(
        r#"cd '{d}'
        S=src
        mkdir -p $S/sub/inner "$S/with space"
        echo hello > $S/hello.txt
        head -c 100000 /dev/urandom > $S/sub/rand.bin
        ln -s hello.txt $S/link0
        ln $S/hello.txt $S/sub/hello-hardlink
        mke2fs -q -F -t ext4 -m 0 -b 4096 -I 256 -d $S img 256M
        mount -o loop img mnt
        cd mnt
        printf x > xattr.txt
        setfattr -n user.a -v hello xattr.txt
        setfattr -n user.big -v "$(head -c 1500 /dev/zero | tr '\0' b)" xattr.txt
        setfattr -n security.test -v sec xattr.txt
        setfattr -n trusted.t -v 0x00ff01 xattr.txt
        mkdir xdir; setfattr -n user.dirattr -v v xdir
        touch acl.txt; setfacl -m u:1234:rwx,g:55:r acl.txt
        mkdir acldir; setfacl -m u:99:rx acldir; setfacl -d -m u:1234:rx,g:7:rwx acldir
        touch capbin; setcap cap_net_raw+ep capbin
        touch owned; chown 1234:5678 owned
        install -m 4755 /dev/null suid
        install -m 2750 /dev/null sgid
        mkdir sticky; chmod 1777 sticky
        ln hello.txt hardlink2
        ln -s short fast
        ln -s "$(printf 'a%.0s' $(seq 100))/target" longlink
        mkfifo fifo
        mknod chr c 1 3
        mknod blk b 8 1
        mknod hugedev c 4000 1000000
        python3 -c "import socket; s=socket.socket(socket.AF_UNIX); s.bind('sock')"
        truncate -s 10M sparse
        printf data | dd of=sparse bs=1 seek=5000000 conv=notrunc status=none
        fallocate -l 1M prealloc
        printf abc | dd of=prealloc conv=notrunc status=none
        touch empty
        touch "$(printf 'new\nline')" "with space name" "$(printf 'bad\xff\xfename')"
        p=deep; for i in $(seq 30); do p=$p/d$i; done; mkdir -p $p; echo bottom > $p/f
        mkdir many; for i in $(seq 3000); do : > many/file_with_a_longish_name_$i; done
        # Fragment the free space so the big file needs many extents (an indexed extent tree).
        avail=$(df --output=avail -B1 . | tail -1)
        fallocate -l $((avail - 56*1024*1024)) ballast
        mkdir holes; for i in $(seq 400); do head -c 131072 /dev/zero > holes/h$i; done
        sync; rm -f holes/h*[02468]; sync
        head -c 20000000 /dev/urandom > big
        touch -d '2001-02-03 04:05:06.123456789' hello.txt
        touch old; touch -d '1960-01-01 01:02:03.5' old
        touch future; touch -d '2200-01-01 00:00:00.25' future
        lsattr -d many | grep -q I
        cd ..
        umount mnt
        "#,
        d = d.display()
    ));
    let entries = read_img(&img, "ext4");
    let m = by_path(&entries);
    assert!(entries.len() > 3000 + 30 + 30);
    let big = m[&b"big"[..]];
    assert!(big.extents.len() > 4, "big: {:?}", big.extents);
    let sparse = m[&b"sparse"[..]];
    assert!(sparse.extents.iter().all(|x| x.file_off > 0), "{sparse:?}");
    let pre = m[&b"prealloc"[..]];
    assert_eq!(pre.extents.len(), 1, "{pre:?}");
    assert_eq!(m[&b"hardlink2"[..]].inode, m[&b"hello.txt"[..]].inode);
    assert_eq!(m[&b"chr"[..]].rdev, (1, 3));
    assert_eq!(m[&b"hugedev"[..]].rdev, (4000, 1000000));
    let acl = m[&b"acl.txt"[..]];
    assert!(
        acl.xattrs
            .iter()
            .any(|(n, v)| n == b"system.posix_acl_access" && v.starts_with(&[2, 0, 0, 0]))
    );
    assert!(
        m[&b"capbin"[..]]
            .xattrs
            .iter()
            .any(|(n, _)| n == b"security.capability")
    );
    assert_eq!(m[&b"future"[..]].mtime, (7_258_118_400, 250_000_000));
    assert!(m[&b"old"[..]].mtime.0 < 0);
    compare_ext_with_mount(&img, &mnt, &entries);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn ext2_block_maps() {
    let d = tmpdir("ext2");
    let img = d.join("img");
    let mnt = d.join("mnt");
    sh(&format!(
        r#"cd '{d}'
        S=src
        mkdir -p $S/dir/sub
        head -c 30000000 /dev/urandom > $S/dir/big30
        echo small > $S/small
        ln $S/small $S/dir/small-link
        ln -s small $S/fast
        ln -s "$(printf 'b%.0s' $(seq 200))" $S/slow
        mkfifo $S/fifo
        truncate -s 5M $S/sparse
        printf x | dd of=$S/sparse bs=1 seek=3000000 conv=notrunc status=none
        : > $S/empty
        mke2fs -q -F -t ext2 -b 1024 -I 128 -d $S img 64M
        "#,
        d = d.display()
    ));
    let entries = read_img(&img, "ext2");
    let m = by_path(&entries);
    assert!(m[&b"dir/big30"[..]].extents.len() > 1);
    compare_ext_with_mount(&img, &mnt, &entries);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn ext4_inline_data() {
    let d = tmpdir("inline");
    let img = d.join("img");
    let mnt = d.join("mnt");
    sh(&format!(
        r#"cd '{d}'
        mkdir -p src/sd; echo tiny > src/sd/tiny; head -c 120 /dev/urandom > src/mid
        mke2fs -q -F -t ext4 -O inline_data -b 4096 -I 256 -d src img 64M
        mount -o loop img mnt
        cd mnt
        printf 'ten bytes!' > f10
        head -c 59 /dev/urandom > f59
        head -c 100 /dev/urandom > f100
        head -c 3000 /dev/urandom > f3000
        mkdir d1; echo a > d1/a; echo b > d1/b
        mkdir d2; for i in $(seq 8); do : > d2/n$i; done
        mkdir d3; for i in $(seq 100); do : > d3/entry$i; done
        ln -s tgt lnk
        ln -s "$(printf 'c%.0s' $(seq 80))" longlnk
        setfattr -n user.x -v y f10
        cd ..
        umount mnt
        "#,
        d = d.display()
    ));
    let entries = read_img(&img, "ext4");
    let m = by_path(&entries);
    assert!(m[&b"f10"[..]].inline.is_some());
    assert!(m[&b"f100"[..]].inline.is_some(), "f100 not inline");
    assert!(m[&b"f3000"[..]].inline.is_none());
    compare_ext_with_mount(&img, &mnt, &entries);
    let _ = std::fs::remove_dir_all(&d);
}

fn fat_case(fat_bits: u32, size_kb: u32) {
    let d = tmpdir(&format!("fat{fat_bits}"));
    let img = d.join("img");
    sh(&format!(
        r#"cd '{d}'
        mkfs.fat -F {fat_bits} -s 2 -C img {size_kb} >/dev/null
        echo hello > small.txt
        : > empty
        head -c 100000 /dev/urandom > multi.bin
        head -c 10000 /dev/urandom > a; head -c 10000 /dev/urandom > b; head -c 10000 /dev/urandom > c
        head -c 60000 /dev/urandom > frag
        I="-i img"
        mmd $I ::/dir1 ::/dir1/sub "::/Long Directory Name" ::/dir1/sub/deeper
        mcopy $I small.txt ::/small.txt
        mcopy $I small.txt ::/UPPER.TXT
        mcopy $I small.txt "::/Long Directory Name/A Long File Name With Spaces.text"
        mcopy $I empty ::/dir1/EMPTY
        mcopy $I multi.bin ::/dir1/sub/multi.bin
        for i in $(seq 40); do mcopy $I small.txt ::/dir1/file_number_$i.txt; done
        mcopy $I a ::/frag_a; mcopy $I b ::/frag_b; mcopy $I c ::/frag_c
        mdel $I ::/frag_b
        free=$(mdir $I ::/ | grep 'bytes free' | tr -dc 0-9)
        head -c $((free - 10240 - 55000)) /dev/zero > filler
        mcopy $I filler ::/filler
        mcopy $I frag ::/dir1/sub/deeper/fragmented.bin
        "#,
        d = d.display()
    ));
    let entries = read_img(&img, "vfat");
    let m = by_path(&entries);
    let listing = sh(&format!("mdir -/ -b -i '{}' ::/", img.display()));
    let mut want = BTreeMap::new();
    for line in listing.lines() {
        let p = line.strip_prefix("::/").expect("mdir line");
        match p.strip_suffix('/') {
            Some(dir) => want.insert(dir.as_bytes().to_vec(), Kind::Dir),
            None => want.insert(p.as_bytes().to_vec(), Kind::File),
        };
    }
    let got: BTreeMap<Vec<u8>, Kind> = entries
        .iter()
        .filter(|e| !e.path.is_empty())
        .map(|e| (e.path.clone(), e.kind))
        .collect();
    assert_eq!(got, want);
    let f = File::open(&img).unwrap();
    let r = FileRange {
        file: &f,
        base: 0,
        len: f.metadata().unwrap().len(),
    };
    let out = d.join("out");
    for e in entries.iter().filter(|e| e.kind == Kind::File) {
        let p = String::from_utf8(e.path.clone()).unwrap();
        sh(&format!(
            "mcopy -n -o -i '{}' '::/{p}' '{}'",
            img.display(),
            out.display()
        ));
        let want = std::fs::read(&out).unwrap();
        assert_eq!(e.size, want.len() as u64, "{p}");
        assert!(read_file(&r, e).unwrap() == want, "{p}: content differs");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (e.mtime.0 - now).abs() < 2 * 86400,
            "{p}: mtime {:?}",
            e.mtime
        );
    }
    // mtools fills the freed hole with either the filler or the last file: one is fragmented.
    let frag = m[&b"dir1/sub/deeper/fragmented.bin"[..]];
    let filler = m[&b"filler"[..]];
    assert!(
        frag.extents.len() >= 2 || filler.extents.len() >= 2,
        "{frag:?} {filler:?}"
    );
    assert!(m[&b"small.txt"[..]].extents.len() == 1);
    let inodes: BTreeSet<u64> = entries.iter().map(|e| e.inode).collect();
    assert_eq!(inodes.len(), entries.len());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn fat16() {
    fat_case(16, 32768);
}

#[test]
fn fat32() {
    fat_case(32, 140_000);
}

/// xorshift64* pseudo-random numbers (deterministic).
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn fuzz(base: &[u8], regions: &[(u64, u64)], fstype: &str, rounds: u32, seed: u64) -> (u32, u32) {
    let mut rng = Rng(seed);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..rounds {
        let mut img = base.to_vec();
        let flips = 1 + rng.below(16);
        for _ in 0..flips {
            let (start, len) = regions[rng.below(regions.len() as u64) as usize];
            let at = (start + rng.below(len)) as usize;
            if let Some(b) = img.get_mut(at) {
                *b ^= 1 << rng.below(8);
                if rng.below(4) == 0 {
                    *b = rng.next() as u8;
                }
            }
        }
        let mem = Mem(img);
        match read_tree(&mem, fstype) {
            Ok(entries) => {
                ok += 1;
                for e in entries
                    .iter()
                    .filter(|e| e.kind == Kind::File && e.size < 1 << 26)
                {
                    let _ = read_file(&mem, e);
                }
            }
            Err(e) => {
                err += 1;
                assert!(!format!("{e}").is_empty());
            }
        }
    }
    (ok, err)
}

#[test]
fn corrupt_input_never_panics() {
    let d = tmpdir("fuzz");
    let img = d.join("img");
    let out = sh(&format!(
        r#"cd '{d}'
        S=src
        mkdir -p $S/a/b/c $S/d
        for i in $(seq 60); do echo "file $i" > $S/a/f$i; done
        head -c 50000 /dev/urandom > $S/d/bin
        ln -s f1 $S/a/l; ln -s "$(printf 'x%.0s' $(seq 90))" $S/a/ll
        mkfifo $S/p
        setfattr -n user.k -v value $S/d/bin 2>/dev/null || true
        mke2fs -q -F -t ext4 -b 1024 -I 256 -d $S img 8M >/dev/null
        dumpe2fs img 2>/dev/null | grep -m1 'Inode table at' | sed 's/.*at \([0-9]*\)-.*/\1/'
        for p in / /a /a/b /d; do debugfs -R "blocks $p" img 2>/dev/null; done
        "#,
        d = d.display()
    ));
    let mut nums = out.split_whitespace().map(|s| s.parse::<u64>().unwrap());
    let itable = nums.next().unwrap();
    let mut regions = vec![(itable * 1024, 64 * 256)];
    regions.extend(nums.map(|b| (b * 1024, 1024)));
    assert!(regions.len() >= 5, "{regions:?}");
    let base = std::fs::read(&img).unwrap();
    let (ok, err) = fuzz(&base, &regions, "ext4", 200, 0x1234_5678_9abc_def1);
    eprintln!("ext4 fuzz: {ok} ok, {err} errors");
    assert!(err > 0);

    sh(&format!(
        r#"cd '{d}'
        mkfs.fat -F 16 -s 1 -C fat 20000 >/dev/null
        mmd -i fat ::/dir ::/dir/sub
        for i in $(seq 30); do echo "file $i" > f; mcopy -i fat f ::/dir/some_long_name_$i.txt; done
        head -c 30000 /dev/urandom > big; mcopy -i fat big ::/dir/sub/big
        "#,
        d = d.display()
    ));
    let fat = std::fs::read(d.join("fat")).unwrap();
    let rsvd = u64::from(le16(&fat, 14)) * 512;
    let fats = u64::from(fat[16]) * u64::from(le16(&fat, 22)) * 512;
    let root = u64::from(le16(&fat, 17)) * 32;
    // The FATs, the root directory and the first clusters (subdirectories).
    let regions = [(rsvd, fats), (rsvd + fats, root + 8192)];
    let (ok, err) = fuzz(&fat, &regions, "vfat", 200, 0xfeed_beef_dead_cafe);
    eprintln!("fat fuzz: {ok} ok, {err} errors");
    let _ = std::fs::remove_dir_all(&d);
}
