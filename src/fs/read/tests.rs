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

pub(super) fn by_path(entries: &[Entry]) -> HashMap<Vec<u8>, &Entry> {
    entries.iter().map(|e| (e.path.clone(), e)).collect()
}

/// Mount the image read-only and compare every path's metadata, xattrs and content.
fn compare_ext_with_mount(img: &Path, mnt: &Path, entries: &[Entry]) {
    compare_with_mount(img, mnt, entries, "ro,noatime");
}

fn compare_with_mount(img: &Path, mnt: &Path, entries: &[Entry], opts: &str) {
    let f = File::open(img).unwrap();
    let r = FileRange {
        file: &f,
        base: 0,
        len: f.metadata().unwrap().len(),
    };
    let _m = Mount::new(img, mnt, opts);
    let (real, ours) = same_paths(mnt, entries);
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
        like_mounted(&r, e, p, &md, &ctx);
    }
}

/// Mounted paths, and a reader's entries, by relative path.
pub(super) type Paths<'a> = (BTreeMap<Vec<u8>, PathBuf>, HashMap<Vec<u8>, &'a Entry>);

/// The paths of a mount and of a reader's entries, which must be the same set.
pub(super) fn same_paths<'a>(mnt: &Path, entries: &'a [Entry]) -> Paths<'a> {
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
    (real, ours)
}

/// Device numbers, xattrs, symlink target and content of `e` equal the mounted `p`'s.
pub(super) fn like_mounted(r: &dyn ReadAt, e: &Entry, p: &Path, md: &std::fs::Metadata, ctx: &str) {
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
            assert!(e.symlink.is_none(), "{ctx}");
            let want = std::fs::read(p).unwrap();
            let got = read_file(r, e).unwrap();
            assert!(got == want, "{ctx}: content differs ({e:?})");
        }
        _ => assert!(
            e.symlink.is_none() && e.extents.is_empty() && e.encoded.is_empty(),
            "{ctx}"
        ),
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

/// Random bit flips in `regions`; (clean reads, reads that reported damage: an error or warnings).
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
        let mut warnings = Vec::new();
        match read_tree_warn(&mem, fstype, &mut warnings) {
            Ok(entries) => {
                // Damage below the root is left out with a warning, the rest still listed.
                if warnings.is_empty() {
                    ok += 1;
                } else {
                    err += 1;
                }
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

/// The tree every mountable XFS fixture gets: every kind of inode, every directory and
/// attribute fork format, remote symlinks and values, ACLs, holes, unwritten extents, a
/// B+tree data fork and (with reflink) shared blocks.
const XFS_POPULATE: &str = r#"
        mkdir -p a/b/c "with space"
        echo hello > hello.txt
        head -c 100000 /dev/urandom > a/rand.bin
        ln hello.txt a/b/hardlink
        ln hello.txt hardlink2
        ln -s hello.txt short
        ln -s "$(printf 'a%.0s' $(seq 100))/target" medium
        ln -s "$(for i in $(seq 100); do printf 'component%03d/' $i; done | head -c 1000)" remote
        mkfifo fifo
        mknod chr c 1 3
        mknod blk b 8 1
        mknod hugedev c 500 200000
        python3 -c "import socket; s=socket.socket(socket.AF_UNIX); s.bind('sock')"
        truncate -s 10M sparse
        printf data | dd of=sparse bs=1 seek=5000000 conv=notrunc status=none
        fallocate -l 1M prealloc
        printf abc | dd of=prealloc conv=notrunc status=none
        xfs_io -f -c "falloc 1048576 1048576" -c "pwrite -q 0 4096" -c "pwrite -q 1310720 4096" mixed
        args=(); for i in $(seq 0 399); do args+=(-c "pwrite -q -S $((i % 200)) $((i * 12288)) 4096"); done
        xfs_io -f "${args[@]}" -c fsync frag
        if xfs_info . | grep -q 'reflink=1'; then cp --reflink=always a/rand.bin reflinked; fi
        touch empty
        touch "$(printf 'bad\xff\xfename')" "$(printf 'new\nline')" "$(printf 'L%.0s' $(seq 255))"
        mkdir small; for i in $(seq 5); do : > small/s$i; done
        mkdir medium_dir; for i in $(seq 60); do : > medium_dir/entry_$i; done
        mkdir leafdir; for i in $(seq 400); do : > leafdir/a_longer_file_name_number_$i; done
        mkdir many; for i in $(seq 3000); do : > many/file_with_a_longish_name_$i; done
        rm many/file_with_a_longish_name_1*
        p=deep; for i in $(seq 30); do p=$p/d$i; done; mkdir -p $p; echo bottom > $p/f
        printf x > xattr.txt
        setfattr -n user.a -v hello xattr.txt
        setfattr -n trusted.t -v 0x00ff01 xattr.txt
        setfattr -n security.test -v sec xattr.txt
        printf y > bigx; setfattr -n user.big -v "$(head -c 6000 /dev/zero | tr '\0' b)" bigx
        setfattr -n user.small -v s bigx
        printf z > leafx; for i in $(seq 12); do setfattr -n user.key$i -v "$i $(printf 'v%.0s' $(seq $LEAFX_LEN))" leafx; done
        printf w > nodex; for i in $(seq 700); do setfattr -n user.some_longer_key_$i -v "value number $i" nodex; done
        setfattr -n user.big -v "$(head -c 20000 /dev/zero | tr '\0' c)" nodex
        mkdir xdir; setfattr -n user.dirattr -v v xdir
        touch acl.txt; setfacl -m u:1234:rwx,g:55:r acl.txt
        mkdir acldir; setfacl -m u:99:rx acldir; setfacl -d -m u:1234:rx,g:7:rwx acldir
        touch acldir/inherits
        touch owned; chown 1234:5678 owned
        install -m 4755 /dev/null suid
        install -m 2750 /dev/null sgid
        mkdir sticky; chmod 1777 sticky
        touch -d '2001-02-03 04:05:06.123456789' hello.txt
        touch old; touch -d '1960-01-01 01:02:03.5' old
        touch future; touch -d '2200-01-01 00:00:00.25' future
        "#;

/// xfs_db confirms the fixture has the formats the test means to cover (run in the directory
/// holding `img` and `inodes`).
const XFS_CHECK_FORMATS: &str = r#"
        ino() { awk -v f="$1" '$1 == f {print $2}' inodes; }
        db() { xfs_db -r -c "inode $(ino $1)" "${@:2}" img; }
        bs=$(xfs_db -r -c 'sb 0' -c 'print blocksize' img | sed 's/.* = //')
        want() { echo "$2" | grep -q -- "$3" || { echo "$1: want $3, got: $2" >&2; exit 1; }; }
        want frag "$(db frag -c 'print core.format')" '3 (btree)'
        want small "$(db small -c 'print core.format')" '1 (local)'
        want xattr.txt "$(db xattr.txt -c 'print core.aformat')" '1 (local)'
        want remote "$(db remote -c 'print core.format')" '2 (extents)'
        want medium_dir "$(db medium_dir -c 'bmap')" 'data offset 0 '
        ! db medium_dir -c bmap | grep -v 'data offset 0 ' | grep -q offset
        leaf=$(( (32 << 30) / bs )); free=$(( (64 << 30) / bs ))
        want leafdir "$(db leafdir -c bmap)" "data offset $leaf "
        ! db leafdir -c bmap | grep -q "data offset $free "
        want many "$(db many -c bmap)" "data offset $free "
        want leafx "$(db leafx -c 'ablock 0' -c print)" 'magic = 0x.bee'
        want nodex "$(db nodex -c 'ablock 0' -c print)" 'magic = 0x.ebe'
        "#;

/// `leafx_len`: the length of leafx's 12 values, so they overflow the inode but fit one block.
fn xfs_case(name: &str, mkfs: &str, leafx_len: u32) -> Vec<Entry> {
    let d = tmpdir(&format!("xfs-{name}"));
    let img = d.join("img");
    let mnt = d.join("mnt");
    sh(&format!(
        r#"cd '{d}'
        truncate -s 512M img
        mkfs.xfs -f -q -K {mkfs} img
        mount -o loop img mnt
        cd mnt
        LEAFX_LEN={leafx_len}
        {XFS_POPULATE}
        for f in frag many leafdir medium_dir small nodex leafx xattr.txt remote; do
            echo "$f $(stat -c %i $f)"; done > ../inodes
        cd ..
        umount mnt
        {XFS_CHECK_FORMATS}
        "#,
        d = d.display()
    ));
    let entries = read_img(&img, "xfs");
    let m = by_path(&entries);
    assert!(entries.len() > 1889 + 400 + 60, "{}", entries.len());
    let frag = m[&b"frag"[..]];
    assert_eq!(frag.extents.len(), 400, "frag: {:?}", &frag.extents[..3]);
    let sparse = m[&b"sparse"[..]];
    assert!(sparse.extents.iter().all(|x| x.file_off > 0), "{sparse:?}");
    let pre = m[&b"prealloc"[..]];
    assert_eq!(pre.extents.len(), 1, "{pre:?}");
    assert!(pre.extents[0].len <= 65536, "{pre:?}");
    let mixed = m[&b"mixed"[..]];
    assert_eq!(mixed.extents.len(), 2, "{mixed:?}");
    assert_eq!(m[&b"hardlink2"[..]].inode, m[&b"hello.txt"[..]].inode);
    assert_eq!(m[&b"hello.txt"[..]].nlink, 3);
    assert_eq!(m[&b"chr"[..]].rdev, (1, 3));
    assert_eq!(m[&b"hugedev"[..]].rdev, (500, 200000));
    assert_eq!(m[&b"remote"[..]].symlink.as_ref().unwrap().len(), 1000);
    assert_eq!(m[&b"hello.txt"[..]].mtime, (981_173_106, 123_456_789));
    assert!(m[&b"old"[..]].mtime.0 < 0);
    let nodex = m[&b"nodex"[..]];
    assert_eq!(nodex.xattrs.len(), 701);
    let acl = m[&b"acl.txt"[..]];
    assert!(
        acl.xattrs
            .iter()
            .any(|(n, v)| n == b"system.posix_acl_access" && v.starts_with(&[2, 0, 0, 0]))
    );
    if let Some(r) = m.get(&b"reflinked"[..]) {
        assert_eq!(r.extents, m[&b"a/rand.bin"[..]].extents);
    }
    compare_with_mount(&img, &mnt, &entries, "ro,norecovery");
    let _ = std::fs::remove_dir_all(&d);
    entries
}

#[test]
fn xfs_v5_default() {
    xfs_case("v5", "", 45);
}

#[test]
fn xfs_v5_1k_blocks() {
    xfs_case("1k", "-b size=1024", 45);
}

#[test]
fn xfs_v5_reflink_rmapbt_nrext64() {
    xfs_case("rmap", "-m reflink=1,rmapbt=1 -i nrext64=1", 45);
}

#[test]
fn xfs_v5_16k_dirblocks_1k_inodes_no_bigtime() {
    xfs_case("bigdir", "-n size=16384 -i size=1024 -m bigtime=0", 200);
}

/// A protofile tree for XFS v4 (which this kernel cannot mount): every kind mkfs can make,
/// big directories, remote symlinks, owners and set-id bits. Returns (path, kind, mode, uid,
/// gid, what: content source, target or "major minor").
/// What a protofile line should give: path, kind, mode, uid, gid, and the content source,
/// symlink target or "major minor".
type ProtoWant = (String, Kind, u32, u32, u32, String);

fn xfs_proto_tree(d: &Path) -> (String, Vec<ProtoWant>) {
    sh(&format!(
        "cd '{}' && head -c 300000 /dev/urandom > big && echo hello > small && : > empty && \
         head -c 5000 /dev/urandom > mid",
        d.display()
    ));
    let mut want = Vec::new();
    let mut proto = String::from("/dev/null\n0 0\nd--755 0 0\n");
    let file = |p: &str| format!("{}/{p}", d.display());
    let long: String = (0..100)
        .map(|i| format!("component{i:03}/"))
        .collect::<String>()[..1000]
        .to_string();
    let mut add = |proto: &mut String,
                   depth: usize,
                   name: &str,
                   path: &str,
                   k: Kind,
                   m: &str,
                   ids: (u32, u32),
                   extra: &str| {
        proto.push_str(&format!(
            "{}{name} {m} {} {} {extra}\n",
            " ".repeat(depth),
            ids.0,
            ids.1
        ));
        let mut mode = u32::from_str_radix(&m[3..], 8).unwrap();
        if &m[1..2] == "u" {
            mode |= 0o4000;
        }
        if &m[2..3] == "g" {
            mode |= 0o2000;
        }
        want.push((path.to_string(), k, mode, ids.0, ids.1, extra.to_string()));
    };
    add(
        &mut proto,
        1,
        "big",
        "big",
        Kind::File,
        "---644",
        (0, 0),
        &file("big"),
    );
    add(
        &mut proto,
        1,
        "small",
        "small",
        Kind::File,
        "---600",
        (12, 34),
        &file("small"),
    );
    add(
        &mut proto,
        1,
        "empty",
        "empty",
        Kind::File,
        "-ug755",
        (0, 0),
        &file("empty"),
    );
    add(
        &mut proto,
        1,
        "short",
        "short",
        Kind::Symlink,
        "l--777",
        (0, 0),
        "small",
    );
    add(
        &mut proto,
        1,
        "remote",
        "remote",
        Kind::Symlink,
        "l--777",
        (0, 0),
        &long,
    );
    add(
        &mut proto,
        1,
        "chr",
        "chr",
        Kind::CharDev,
        "c--644",
        (0, 6),
        "1 3",
    );
    add(
        &mut proto,
        1,
        "blk",
        "blk",
        Kind::BlockDev,
        "b--660",
        (0, 6),
        "259 100000",
    );
    add(
        &mut proto,
        1,
        "fifo",
        "fifo",
        Kind::Fifo,
        "p--600",
        (5, 5),
        "",
    );
    for (dir, n) in [
        ("sf", 3),
        ("blockdir", 60),
        ("leafdir", 400),
        ("many", 3000),
    ] {
        add(&mut proto, 1, dir, dir, Kind::Dir, "d--755", (1, 2), "");
        for i in 0..n {
            let name = format!("a_longer_entry_name_{i}");
            let src = if i % 100 == 0 { "mid" } else { "empty" };
            add(
                &mut proto,
                2,
                &name,
                &format!("{dir}/{name}"),
                Kind::File,
                "---644",
                (0, 0),
                &file(src),
            );
        }
        proto.push_str(" $\n");
    }
    proto.push_str("$\n");
    want.insert(0, (String::new(), Kind::Dir, 0o755, 0, 0, String::new()));
    (proto, want)
}

#[test]
fn xfs_v4_protofile() {
    for (name, opts) in [
        ("v4", "-m crc=0"),
        ("v4ft", "-m crc=0 -n ftype=1 -b size=1024"),
    ] {
        let d = tmpdir(&format!("xfs-{name}"));
        let (proto, want) = xfs_proto_tree(&d.join("src"));
        std::fs::write(d.join("proto"), proto).unwrap();
        sh(&format!(
            "cd '{}' && truncate -s 512M img && mkfs.xfs -f -q -K {opts} -p proto img && \
             xfs_db -r -c 'sb 0' -c 'print versionnum' img | grep -q 0x",
            d.display()
        ));
        let img = d.join("img");
        let entries = read_img(&img, "xfs");
        let f = File::open(&img).unwrap();
        let r = FileRange {
            file: &f,
            base: 0,
            len: f.metadata().unwrap().len(),
        };
        let m = by_path(&entries);
        assert_eq!(entries.len(), want.len());
        for (path, kind, mode, uid, gid, extra) in &want {
            let e = m[path.as_bytes()];
            assert_eq!(
                (e.kind, e.mode, e.uid, e.gid),
                (*kind, *mode, *uid, *gid),
                "{path}"
            );
            match kind {
                Kind::File => {
                    let data = std::fs::read(extra).unwrap();
                    assert_eq!(e.size, data.len() as u64, "{path}");
                    assert!(read_file(&r, e).unwrap() == data, "{path}: content differs");
                }
                Kind::Symlink => assert_eq!(e.symlink.as_deref(), Some(extra.as_bytes()), "{path}"),
                Kind::CharDev | Kind::BlockDev => {
                    let (a, b) = extra.split_once(' ').unwrap();
                    assert_eq!(e.rdev, (a.parse().unwrap(), b.parse().unwrap()), "{path}");
                }
                _ => {}
            }
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// A file with a few bytes flipped, read without copying the image.
struct Patched<'a> {
    file: &'a File,
    flips: Vec<(u64, u8)>,
}

impl ReadAt for Patched<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)?;
        for &(at, x) in &self.flips {
            if at >= offset && at < offset + buf.len() as u64 {
                buf[(at - offset) as usize] ^= x;
            }
        }
        Ok(())
    }
}

/// Byte offsets of XFS metadata worth damaging: the inode chunks of the given files and the
/// first blocks of their data and attribute forks.
fn xfs_regions(img: &Path, names: &[(&str, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let db = |c: &str| sh(&format!("xfs_db -r {c} '{}'", img.display()));
    for &(name, ino) in names {
        let byte: u64 = db(&format!("-c 'convert ino {ino} byte'"))
            .split_whitespace()
            .next()
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .unwrap_or_else(|| panic!("{name}: no inode location"));
        out.push((byte, 512));
        for fork in ["-d", "-a"] {
            for l in db(&format!("-c 'inode {ino}' -c 'bmap {fork}'"))
                .lines()
                .take(3)
            {
                let Some(sb) = l.split("startblock ").nth(1) else {
                    continue;
                };
                let fsb: u64 = sb.split_whitespace().next().unwrap().parse().unwrap();
                let b = db(&format!("-c 'convert fsblock {fsb} byte'"));
                let b = u64::from_str_radix(
                    b.split_whitespace()
                        .next()
                        .unwrap()
                        .trim_start_matches("0x"),
                    16,
                )
                .unwrap();
                out.push((b, 4096));
            }
        }
    }
    out
}

fn xfs_fuzz(img: &Path, regions: &[(u64, u64)], rounds: u32, seed: u64) -> (u32, u32, u32) {
    let f = File::open(img).unwrap();
    let mut rng = Rng(seed);
    let (mut ok, mut err, mut warned) = (0, 0, 0);
    for _ in 0..rounds {
        let mut flips = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let (start, len) = regions[rng.below(regions.len() as u64) as usize];
            let x = if rng.below(4) == 0 {
                rng.next() as u8 | 1
            } else {
                1 << rng.below(8)
            };
            flips.push((start + rng.below(len), x));
        }
        let p = Patched { file: &f, flips };
        match xfs::read_tree_report(&p) {
            Ok((entries, warnings)) => {
                ok += 1;
                warned += u32::from(!warnings.is_empty());
                for e in entries
                    .iter()
                    .filter(|e| e.kind == Kind::File && e.size < 1 << 26)
                {
                    let _ = read_file(&p, e);
                }
            }
            Err(e) => {
                err += 1;
                assert!(!format!("{e}").is_empty());
            }
        }
    }
    (ok, err, warned)
}

/// Damaged XFS: random flips (v4 has no checksums to stop them; v5 mostly fails them) never
/// panic or hang; a directory entry pointing back at an ancestor and a B+tree pointer outside
/// the filesystem skip one entry with a warning and keep the rest.
#[test]
fn xfs_hostile() {
    let d = tmpdir("xfs-hostile");
    let (proto, _) = xfs_proto_tree(&d.join("src"));
    std::fs::write(d.join("proto"), proto).unwrap();
    sh(&format!(
        "cd '{}' && truncate -s 512M v4 && mkfs.xfs -f -q -K -m crc=0 -p proto v4",
        d.display()
    ));
    let v4 = d.join("v4");
    let names: Vec<(&str, u64)> = ["", "sf", "blockdir", "leafdir", "many", "big", "remote"]
        .iter()
        .map(|n| {
            let e = read_img(&v4, "xfs");
            (*n, e.iter().find(|e| e.path == n.as_bytes()).unwrap().inode)
        })
        .collect();
    let regions = xfs_regions(&v4, &names);
    let (ok, err, warned) = xfs_fuzz(&v4, &regions, 300, 0x005e_ed0f_f1a5);
    eprintln!("xfs v4 fuzz: {ok} ok ({warned} with warnings), {err} errors");
    assert!(err + warned > 30, "{ok} {err} {warned}");

    let img = d.join("img");
    sh(&format!(
        r#"cd '{d}'
        truncate -s 512M img
        mkfs.xfs -f -q -K img
        mount -o loop img mnt
        mkdir -p mnt/a/b/c mnt/many; echo x > mnt/a/b/file
        for i in $(seq 600); do : > mnt/many/some_name_$i; done
        args=(); for i in $(seq 0 99); do args+=(-c "pwrite -q $((i * 8192)) 4096"); done
        xfs_io -f "${{args[@]}}" mnt/frag
        printf z > mnt/attrs; for i in $(seq 300); do setfattr -n user.k$i -v "value $i" mnt/attrs; done
        umount mnt
        "#,
        d = d.display()
    ));
    let entries = read_img(&img, "xfs");
    let ino = |p: &str| {
        entries
            .iter()
            .find(|e| e.path == p.as_bytes())
            .unwrap()
            .inode
    };
    let (root, b, frag) = (ino(""), ino("a/b"), ino("frag"));
    let names = [
        ("", root),
        ("many", ino("many")),
        ("frag", frag),
        ("attrs", ino("attrs")),
    ];
    let regions = xfs_regions(&img, &names);
    let (ok, err, warned) = xfs_fuzz(&img, &regions, 200, 0xabcd_ef01_2345);
    eprintln!("xfs v5 fuzz: {ok} ok ({warned} with warnings), {err} errors");
    assert!(err + warned > 30, "{ok} {err} {warned}");

    let xdb = |cmds: &str| sh(&format!("xfs_db -x {cmds} '{}'", img.display()));
    let fresh = |f: &File| {
        xfs::read_tree_report(&FileRange {
            file: f,
            base: 0,
            len: 512 << 20,
        })
    };
    // a/b/c -> the root directory: a loop.
    let a = ino("a");
    xdb(&format!(
        "-c 'inode {b}' -c 'write u3.sfdir3.list[0].inumber.i4 {a}'"
    ));
    let (got, warnings) = fresh(&File::open(&img).unwrap()).unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("a/b/c") && w.contains("loop")),
        "{warnings:?}"
    );
    assert_eq!(got.len(), entries.len() - 1);
    xdb(&format!(
        "-c 'inode {b}' -c 'write u3.sfdir3.list[0].inumber.i4 {}'",
        ino("a/b/c")
    ));
    // A B+tree pointer far outside the filesystem: frag is skipped, the rest stays.
    xdb(&format!(
        "-c 'inode {frag}' -c 'write u3.bmbt.ptrs[1] 4000000000'"
    ));
    let (got, warnings) = fresh(&File::open(&img).unwrap()).unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("\"frag\"") && w.contains("outside the filesystem")),
        "{warnings:?}"
    );
    assert_eq!(got.len(), entries.len() - 1);
    assert!(got.iter().all(|e| e.path != b"frag"));
    let _ = std::fs::remove_dir_all(&d);
}

fn read_img_warn(img: &Path, fstype: &str) -> (Vec<Entry>, Vec<String>) {
    let f = File::open(img).unwrap();
    let r = FileRange {
        file: &f,
        base: 0,
        len: f.metadata().unwrap().len(),
    };
    let mut w = Vec::new();
    let entries = read_tree_warn(&r, fstype, &mut w).unwrap();
    check_order(&entries);
    (entries, w)
}

/// The inode mke2fs/the kernel made to hold an xattr value (EXT4_EA_INODE_FL), by debugfs.
fn ea_inode_of(img: &Path) -> u64 {
    (12..64)
        .find(|i| {
            let out = sh(&format!(
                "debugfs -R 'stat <{i}>' '{}' 2>/dev/null",
                img.display()
            ));
            out.split("Flags: 0x")
                .nth(1)
                .and_then(|f| u32::from_str_radix(f.split_whitespace().next()?, 16).ok())
                .is_some_and(|f| f & 0x20_0000 != 0)
        })
        .expect("an EA inode")
}

/// Values too big for the inode and its xattr block live in inodes of their own
/// (mke2fs -O ea_inode, setfattr on the mounted filesystem): the reader must list them as the
/// kernel does, and a damaged one is left out with a warning naming file and attribute.
#[test]
fn ext4_ea_inode_xattrs() {
    let d = tmpdir("eainode");
    let img = d.join("img");
    let mnt = d.join("mnt");
    sh(&format!(
        r#"cd '{d}'
        mke2fs -q -F -t ext4 -O ea_inode -b 4096 img 64M
        mount -o loop img mnt
        echo data > mnt/f; echo more > mnt/g
        setfattr -n user.big -v "$(head -c 9000 /dev/zero | tr '\0' v)" mnt/f
        setfattr -n user.small -v s mnt/f
        setfattr -n user.huge -v "$(head -c 60000 /dev/urandom | base64 -w0 | cut -c1-65000)" mnt/g
        umount mnt
        "#,
        d = d.display()
    ));
    let (entries, w) = read_img_warn(&img, "ext4");
    assert!(w.is_empty(), "{w:?}");
    let m = by_path(&entries);
    let x = |p: &[u8], n: &[u8]| {
        m[p].xattrs
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(x(b"f", b"user.big"), Some(vec![b'v'; 9000]));
    assert_eq!(x(b"f", b"user.small"), Some(b"s".to_vec()));
    assert_eq!(x(b"g", b"user.huge").map(|v| v.len()), Some(65000));
    compare_ext_with_mount(&img, &mnt, &entries);

    // The value's inode no longer marked as one: left out, said, the rest kept.
    let ea = ea_inode_of(&img);
    sh(&format!(
        "debugfs -w -R 'set_inode_field <{ea}> flags 0x80000' '{}'",
        img.display()
    ));
    let (entries, w) = read_img_warn(&img, "ext4");
    assert!(
        matches!(w.as_slice(), [m] if m.contains("extended attribute \"user.")
            && m.contains("not marked as one")),
        "{w:?}"
    );
    assert_eq!(entries.len(), 4, "{entries:?}");
    let _ = std::fs::remove_dir_all(&d);
}

/// A directory encrypted with fscrypt (e4crypt on a real mount) holds ciphertext names, and
/// a damaged directory (its block edited: names with '/' or NUL, a duplicate name) holds
/// names no Linux path can have: each is left out with a warning, never the whole list.
#[test]
fn ext4_encrypted_dir_and_impossible_names() {
    let d = tmpdir("names");
    let img = d.join("img");
    sh(&format!(
        r#"cd '{d}'
        mke2fs -q -F -t ext4 -O encrypt -b 4096 img 64M
        mount -o loop img mnt
        mkdir mnt/secret mnt/names mnt/plain
        echo -n 'bmr test passphrase' | e4crypt add_key -S 0x5eed5eed5eed5eed5eed5eed5eed5eed mnt/secret >/dev/null
        for i in $(seq 64); do echo $i > mnt/secret/file-with-a-long-name-$i; done
        mkdir mnt/secret/sub; echo x > mnt/secret/sub/x
        touch mnt/names/aXb mnt/names/nYl mnt/names/dupA mnt/names/dupB mnt/names/ok
        echo plain > mnt/plain/a
        umount mnt
        "#,
        d = d.display()
    ));
    // Edit the names directory's block, as damage (or a forger) would.
    let blk: u64 = sh(&format!(
        "debugfs -R 'blocks /names' '{}' 2>/dev/null",
        img.display()
    ))
    .trim()
    .parse()
    .unwrap();
    let mut raw = std::fs::read(&img).unwrap();
    let block = &mut raw[(blk * 4096) as usize..][..4096];
    for (from, to) in [
        (&b"aXb"[..], &b"a/b"[..]),
        (b"nYl", b"n\0l"),
        (b"dupB", b"dupA"),
    ] {
        let at = block.windows(from.len()).position(|w| w == from).unwrap();
        block[at..at + to.len()].copy_from_slice(to);
    }
    std::fs::write(&img, &raw).unwrap();

    let (entries, w) = read_img_warn(&img, "ext4");
    let m = by_path(&entries);
    assert_eq!(m[&b"secret"[..]].kind, Kind::Dir);
    assert!(
        !entries.iter().any(|e| e.path.starts_with(b"secret/")),
        "ciphertext names listed"
    );
    for e in &entries {
        assert!(!e.path.contains(&0), "{:?}", e.path);
        assert!(e.path.is_empty() || e.path.split(|&b| b == b'/').all(|c| !c.is_empty()));
    }
    for p in [&b"names/ok"[..], b"names/dupA", b"plain/a"] {
        assert!(m.contains_key(p), "{} missing", String::from_utf8_lossy(p));
    }
    assert!(!m.contains_key(&b"names/a/b"[..]) && !m.contains_key(&b"names/a"[..]));
    assert_eq!(
        entries.iter().filter(|e| e.path == b"names/dupA").count(),
        1
    );
    let has = |s: &str| w.iter().filter(|m| m.contains(s)).count();
    assert_eq!(
        has("encrypted directory /secret: its files are in the image but not in the file list"),
        1,
        "{w:?}"
    );
    assert_eq!(has("a name with a NUL or '/' byte"), 2, "{w:?}");
    assert_eq!(has("/names/dupA: a second entry of that name"), 1, "{w:?}");
    assert_eq!(w.len(), 4, "{w:?}");
    let _ = std::fs::remove_dir_all(&d);
}
