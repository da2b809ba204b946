//! The btrfs reader against the kernel: filesystems made by mkfs.btrfs and filled through a
//! mount (compression, subvolumes, snapshots, reflinks, every file type), compared entry by
//! entry with a read-only mount of the top-level subvolume; then damaged metadata (byte flips
//! re-checksummed, so the parsers meet them) and crafted loops.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::super::tests::{
    Mem, Mount, Rng, by_path, check_order, kind_of, like_mounted, same_paths, sh, tmpdir,
};
use super::super::{Entry, FileRange, Kind, read_file};
use super::read_tree_warn;

const SUBVOL_SHIFT: u32 = 40;

fn read(img: &Path) -> (Vec<Entry>, Vec<String>) {
    let f = File::open(img).unwrap();
    let r = FileRange {
        file: &f,
        base: 0,
        len: f.metadata().unwrap().len(),
    };
    let mut w = Vec::new();
    let entries = read_tree_warn(&r, &mut w).unwrap();
    check_order(&entries);
    (entries, w)
}

/// Fill a mounted btrfs (top-level subvolume at `m`).
const POPULATE: &str = r#"
    set -e +o pipefail
    btrfs -q subvolume create @ ; btrfs -q subvolume create @home
    btrfs -q subvolume create @home/nested
    cd @
    yes 'bmr compressible line of text' | head -c 3000000 > big.txt
    { head -c 300000 /dev/urandom; yes 'more text' | head -c 600000; } > mixed.bin
    head -c 400000 /dev/urandom > random.bin
    echo hello > small
    printf 'x%.0s' $(seq 2000) > inline2k
    printf 'y%.0s' $(seq 3000) > tail3000
    yes 'overwrite me' | head -c 1000000 > over.txt
    sync
    head -c 12288 /dev/urandom | dd of=over.txt bs=4096 seek=50 conv=notrunc status=none
    cp --reflink=always big.txt clone.txt
    printf 'changed in the clone' | dd of=clone.txt bs=1 seek=500000 conv=notrunc status=none
    ln small hardlink; mkdir sub; ln small sub/hardlink2
    ln -s small symlink; ln -s "$(printf 'a%.0s' $(seq 300))/target" longlink
    mknod chr c 1 3; mknod blk b 8 1; mknod hugedev c 4000 1000000; mkfifo fifo
    python3 -c "import socket; s=socket.socket(socket.AF_UNIX); s.bind('sock')"
    truncate -s 10M sparse
    printf data | dd of=sparse bs=1 seek=5000000 conv=notrunc status=none
    fallocate -l 1M prealloc; printf abc | dd of=prealloc conv=notrunc status=none
    printf x > xattr.txt
    setfattr -n user.a -v hello xattr.txt
    setfattr -n user.big -v "$(head -c 1500 /dev/zero | tr '\0' b)" xattr.txt
    setfattr -n trusted.t -v 0x00ff01 xattr.txt
    setfattr -n security.test -v sec xattr.txt
    touch acl.txt; setfacl -m u:1234:rwx,g:55:r acl.txt
    mkdir acldir; setfacl -m u:99:rx acldir; setfacl -d -m u:1234:rx,g:7:rwx acldir
    touch owned; chown 1234:5678 owned
    install -m 4755 /dev/null suid; mkdir sticky; chmod 1777 sticky
    touch "$(printf 'n%.0s' $(seq 255))" "$(printf 'bad\xff\xfename')" "with space"
    mkdir many; for i in $(seq 2100); do : > many/entry_with_a_longish_name_$i; done
    touch -d '2001-02-03 04:05:06.123456789' small
    touch old; touch -d '1960-01-01 01:02:03.5' old
    cd ..
    echo home > @home/file; mkdir @home/user; yes home | head -c 200000 > @home/user/doc
    echo nested > @home/nested/inner
    btrfs -q subvolume snapshot -r @ @snap
    btrfs -q subvolume snapshot -r @home @home-snap
    echo after-snapshot >> @/big.txt; rm @/random.bin
    echo top > top.txt
    sync
"#;

/// mkfs.btrfs `mkfs` on a fresh image, mounted with `opts` and filled; returns the image.
fn fixture(name: &str, mkfs: &str, opts: &str, size_mib: u64) -> (std::path::PathBuf, Vec<Entry>) {
    let d = tmpdir(name);
    let img = d.join("img");
    let mnt = d.join("mnt");
    sh(&format!(
        "truncate -s {size_mib}M '{i}' && mkfs.btrfs -q -f {mkfs} '{i}'",
        i = img.display()
    ));
    {
        let _m = Mount::new(&img, &mnt, &format!("nodiscard{opts}"));
        sh(&format!("cd '{}' && {POPULATE}", mnt.display()));
    }
    let (entries, w) = read(&img);
    assert!(
        w.is_empty(),
        "{name}: warnings on a sound filesystem: {w:?}"
    );
    compare_with_mount(&img, &mnt, &entries);
    (img, entries)
}

/// A read-only mount of the top-level subvolume, compared path by path.
fn compare_with_mount(img: &Path, mnt: &Path, entries: &[Entry]) {
    let f = File::open(img).unwrap();
    let r = FileRange {
        file: &f,
        base: 0,
        len: f.metadata().unwrap().len(),
    };
    sh("btrfs device scan --forget || true");
    let _m = Mount::new(img, mnt, "ro,noatime,subvolid=5");
    let (real, ours) = same_paths(mnt, entries);
    // The subvolume of every path: the nearest subvolume root (inode 256) above it.
    let mut subvol_of: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut roots = 0;
    for (rel, p) in &real {
        let md = std::fs::symlink_metadata(p).unwrap();
        let parent = rel
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(Vec::new(), |i| rel[..i].to_vec());
        let sv = if md.is_dir() && md.ino() == 256 {
            roots += 1;
            let out = std::process::Command::new("btrfs")
                .args(["inspect-internal", "rootid"])
                .arg(p)
                .output()
                .unwrap();
            assert!(out.status.success(), "rootid {}", p.display());
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        } else {
            subvol_of[&parent]
        };
        subvol_of.insert(rel.clone(), sv);
    }
    assert!(roots >= 6, "only {roots} subvolume roots");
    let mut files = 0;
    for (rel, p) in &real {
        let e = ours[rel];
        let md = std::fs::symlink_metadata(p).unwrap();
        let ctx = String::from_utf8_lossy(rel).into_owned();
        let sv = subvol_of[rel];
        assert_eq!(e.kind, kind_of(md.file_type()), "{ctx}");
        assert_eq!(e.mode, md.mode() & 0o7777, "{ctx}");
        assert_eq!((e.uid, e.gid), (md.uid(), md.gid()), "{ctx}");
        assert_eq!(e.size, md.size(), "{ctx}");
        assert_eq!(u64::from(e.nlink), md.nlink(), "{ctx}");
        assert_eq!(e.inode, (sv << SUBVOL_SHIFT) | md.ino(), "{ctx} inode");
        let is_root = md.is_dir() && md.ino() == 256;
        assert_eq!(e.subvol, is_root.then_some(sv), "{ctx} subvol");
        // The kernel makes up the times of a snapshot's stand-in for a nested subvolume.
        if md.ino() != 2 {
            assert_eq!(e.mtime, (md.mtime(), md.mtime_nsec() as u32), "{ctx} mtime");
            assert_eq!(e.ctime, (md.ctime(), md.ctime_nsec() as u32), "{ctx} ctime");
            assert_eq!(e.atime, (md.atime(), md.atime_nsec() as u32), "{ctx} atime");
        }
        if e.kind == Kind::File {
            files += 1;
        }
        like_mounted(&r, e, p, &md, &ctx);
    }
    assert!(files > 2100, "{files} files compared");
}

fn at<'a>(m: &HashMap<Vec<u8>, &'a Entry>, p: &str) -> &'a Entry {
    m.get(p.as_bytes()).unwrap_or_else(|| panic!("{p} missing"))
}

/// What every fixture must show, so a reader that drops a feature cannot pass.
fn common_checks(entries: &[Entry], compressed: bool) {
    let m = by_path(entries);
    assert_eq!(at(&m, "").subvol, Some(5));
    for p in ["@", "@home", "@home/nested", "@snap", "@home-snap"] {
        assert!(at(&m, p).subvol.is_some(), "{p} is no subvolume root");
    }
    // The snapshot keeps what @ lost after it.
    assert!(m.contains_key(&b"@snap/random.bin"[..]) && !m.contains_key(&b"@/random.bin"[..]));
    assert_eq!(at(&m, "@home-snap/nested").subvol, None);
    assert_eq!(at(&m, "@/hardlink").inode, at(&m, "@/small").inode);
    assert_eq!(at(&m, "@/sub/hardlink2").inode, at(&m, "@/small").inode);
    assert_ne!(at(&m, "@snap/small").inode, at(&m, "@/small").inode);
    assert_eq!(at(&m, "@/hugedev").rdev, (4000, 1_000_000));
    assert_eq!(at(&m, "@/small").mtime, (981_173_106, 123_456_789));
    assert!(at(&m, "@/old").mtime.0 < 0);
    assert!(at(&m, "@/small").inline.is_some());
    assert!(at(&m, "@/inline2k").inline.is_some());
    let sparse = at(&m, "@/sparse");
    assert!(
        sparse.extents.iter().all(|x| x.file_off > 0) && sparse.encoded.is_empty(),
        "{sparse:?}"
    );
    let pre = at(&m, "@/prealloc");
    let data: u64 = pre.extents.iter().map(|x| x.len).sum::<u64>()
        + pre.encoded.iter().map(|x| x.len).sum::<u64>();
    assert!(data < 1 << 20, "prealloc: {pre:?}");
    let acl = at(&m, "@/acl.txt");
    assert!(
        acl.xattrs
            .iter()
            .any(|(n, v)| n == b"system.posix_acl_access" && v.starts_with(&[2, 0, 0, 0]))
    );
    let big = at(&m, "@/big.txt");
    let over = at(&m, "@/over.txt");
    if compressed {
        assert!(big.encoded.len() > 4, "big.txt: {big:?}");
        assert!(
            over.encoded.iter().any(|x| x.skip > 0),
            "over.txt has no compressed extent referenced at an offset: {over:?}"
        );
        // The clone shares the original's extents.
        let clone = at(&m, "@/clone.txt");
        assert!(
            clone
                .encoded
                .iter()
                .any(|c| big.encoded.iter().any(|b| b.disk_off == c.disk_off))
        );
    } else {
        assert!(big.encoded.is_empty() && !big.extents.is_empty());
        assert!(
            over.extents.len() >= 3,
            "over.txt should be split by the overwrite: {over:?}"
        );
    }
    // Incompressible data stays plain where compression is on.
    let random = at(&m, "@snap/random.bin");
    assert!(
        !random.extents.is_empty() && random.encoded.is_empty(),
        "{random:?}"
    );
}

#[test]
fn btrfs_default() {
    let (_, e) = fixture("btrfs-default", "", "", 512);
    common_checks(&e, false);
}

#[test]
fn btrfs_metadata_single_and_dup() {
    let (_, e) = fixture("btrfs-msingle", "-m single", "", 512);
    common_checks(&e, false);
    let (_, e) = fixture("btrfs-mdup", "-m dup -d single", "", 512);
    common_checks(&e, false);
}

#[test]
fn btrfs_rootdir() {
    let d = tmpdir("btrfs-rootdir");
    let img = d.join("img");
    sh(&format!(
        r#"cd '{d}'
        mkdir -p src/dir/sub; echo hi > src/dir/hi; head -c 300000 /dev/urandom > src/dir/sub/bin
        ln -s hi src/dir/l; ln src/dir/hi src/hard; mkfifo src/fifo; mknod src/blk b 8 1
        mknod src/chr c 4000 1000000
        touch -d '2010-01-01 00:00:00.5' src/dir/hi
        truncate -s 256M img
        mkfs.btrfs -q -f --rootdir src img
        "#,
        d = d.display()
    ));
    let (entries, w) = read(&img);
    assert!(w.is_empty(), "{w:?}");
    assert!(entries.len() >= 7);
    let mnt = d.join("mnt");
    // compare_with_mount wants subvolumes: compare the basics here.
    let f = File::open(&img).unwrap();
    let r = FileRange {
        file: &f,
        base: 0,
        len: f.metadata().unwrap().len(),
    };
    let _m = Mount::new(&img, &mnt, "ro,noatime,subvolid=5");
    let (real, ours) = same_paths(&mnt, &entries);
    for (rel, p) in &real {
        let e = ours[rel];
        let md = std::fs::symlink_metadata(p).unwrap();
        assert_eq!(e.inode, (5 << SUBVOL_SHIFT) | md.ino());
        assert_eq!(e.mtime, (md.mtime(), md.mtime_nsec() as u32));
        assert_eq!((e.mode, e.nlink), (md.mode() & 0o7777, md.nlink() as u32));
        like_mounted(&r, e, p, &md, &String::from_utf8_lossy(rel));
    }
}

#[test]
fn btrfs_zstd() {
    let (_, e) = fixture("btrfs-zstd", "", ",compress=zstd", 512);
    common_checks(&e, true);
    let big = by_path(&e)[&b"@/big.txt"[..]].encoded[0].compression;
    assert_eq!(big, crate::fs::read::Compression::Zstd);
}

#[test]
fn btrfs_zlib() {
    let (_, e) = fixture("btrfs-zlib", "", ",compress=zlib", 512);
    common_checks(&e, true);
    let big = by_path(&e)[&b"@/big.txt"[..]].encoded[0].compression;
    assert_eq!(big, crate::fs::read::Compression::Zlib);
}

#[test]
fn btrfs_lzo() {
    let (_, e) = fixture("btrfs-lzo", "", ",compress=lzo", 512);
    common_checks(&e, true);
    let big = by_path(&e)[&b"@/big.txt"[..]].encoded[0].compression;
    assert_eq!(big, crate::fs::read::Compression::Lzo);
}

// ---- damaged and crafted metadata ----

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn recsum(img: &mut [u8], phys: usize, nodesize: usize) {
    let c = crc32c::crc32c(&img[phys + 32..phys + nodesize]);
    img[phys..phys + 4].copy_from_slice(&c.to_le_bytes());
}

/// Physical offsets of every tree block of the trees `ids` (first copy), with their levels.
fn tree_blocks(img: &Path, ids: &[&str]) -> Vec<(u64, u8)> {
    let chunks = chunks(img);
    let phys = |logical: u64| {
        let c = chunks
            .iter()
            .find(|c| c.0 <= logical && logical < c.0 + c.1)
            .unwrap_or_else(|| panic!("logical {logical} is in no chunk"));
        c.2 + (logical - c.0)
    };
    let mut out = Vec::new();
    for id in ids {
        let dump = sh(&format!(
            "btrfs inspect-internal dump-tree -t {id} '{}'",
            img.display()
        ));
        for l in dump.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() >= 4
                && (w[0] == "leaf" || w[0] == "node")
                && w[2] != "flags"
                && let Ok(logical) = w[1].parse::<u64>()
            {
                let level = if w[0] == "node" {
                    w[3].parse().unwrap_or(1)
                } else {
                    0
                };
                out.push((phys(logical), level));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// (logical, length, first stripe's physical offset) of every chunk, from the chunk tree.
fn chunks(img: &Path) -> Vec<(u64, u64, u64)> {
    let dump = sh(&format!(
        "btrfs inspect-internal dump-tree -t 3 '{}'",
        img.display()
    ));
    let mut out: Vec<(u64, u64, Option<u64>)> = Vec::new();
    for l in dump.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let Some(i) = w.iter().position(|&x| x == "CHUNK_ITEM") {
            out.push((w[i + 1].trim_end_matches(')').parse().unwrap(), 0, None));
        } else if let Some(c) = out.last_mut() {
            if w.first() == Some(&"length") {
                c.1 = w[1].parse().unwrap();
            }
            if w.first() == Some(&"stripe") && w.get(4) == Some(&"offset") && c.2.is_none() {
                c.2 = Some(w[5].parse().unwrap());
            }
        }
    }
    out.into_iter()
        .map(|(l, n, p)| (l, n, p.unwrap()))
        .collect()
}

/// A small single-metadata btrfs with a subvolume and a deep, wide tree (4 KiB nodes).
fn small_fixture(name: &str, opts: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let d = tmpdir(name);
    let img = d.join("img");
    let mnt = d.join("mnt");
    sh(&format!(
        "truncate -s 200M '{i}' && mkfs.btrfs -q -f -n 4096 -m single '{i}'",
        i = img.display()
    ));
    {
        let _m = Mount::new(&img, &mnt, &format!("nodiscard{opts}"));
        sh(&format!(
            r#"set +o pipefail; cd '{}'
            mkdir -p d1/d2/d3; echo a > d1/a; echo deep > d1/d2/d3/f
            yes compressible | head -c 600000 > d1/big; head -c 50000 /dev/urandom > d1/rand
            ln -s a d1/l; setfattr -n user.x -v y d1/a
            btrfs -q subvolume create sv; echo in-sv > sv/f; mkdir sv/dir; echo x > sv/dir/g
            mkdir wide; for i in $(seq 400); do echo $i > wide/file_$i; done
            sync"#,
            mnt.display()
        ));
    }
    (d, img)
}

fn find_item(
    img: &[u8],
    blocks: &[(u64, u8)],
    key: (u64, u8, u64),
    nodesize: usize,
) -> (usize, usize) {
    for &(p, level) in blocks {
        if level != 0 {
            continue;
        }
        let b = &img[p as usize..p as usize + nodesize];
        let n = le32(b, 0x60) as usize;
        for i in 0..n {
            let e = 101 + i * 25;
            if (le64(b, e), b[e + 8], le64(b, e + 9)) == key {
                return (p as usize, p as usize + 101 + le32(b, e + 17) as usize);
            }
        }
    }
    panic!("item {key:?} not found");
}

fn inode_of(mnt: &Path, rel: &str) -> u64 {
    std::fs::symlink_metadata(mnt.join(rel)).unwrap().ino()
}

#[test]
fn btrfs_crafted_loops_and_pointers() {
    let (d, img) = small_fixture("btrfs-crafted", "");
    let mnt = d.join("mnt");
    let base = std::fs::read(&img).unwrap();
    let nodesize = 4096;
    let d1 = {
        let _m = Mount::new(&img, &mnt, "ro");
        inode_of(&mnt, "d1")
    };
    let index = |tree: &str, dir: u64, name: &str| -> u64 {
        let out = sh(&format!(
            "btrfs inspect-internal dump-tree -t {tree} '{}' | grep -A4 'key ({dir} DIR_INDEX' | grep -B4 'name: {name}$' | grep -o 'DIR_INDEX [0-9]*'",
            img.display()
        ));
        out.trim().rsplit(' ').next().unwrap().parse().unwrap()
    };
    let fs_blocks = tree_blocks(&img, &["5"]);
    assert!(
        fs_blocks.iter().any(|b| b.1 > 0),
        "the fs tree has no interior node"
    );
    let (sound, w) = {
        let mem = Mem(base.clone());
        let mut w = Vec::new();
        (read_tree_warn(&mem, &mut w).unwrap(), w)
    };
    assert!(w.is_empty(), "{w:?}");
    let n_sound = sound.len();

    // 1. d1/d2's DIR_INDEX points at d1, its own parent: a directory loop.
    {
        let mut img2 = base.clone();
        let (leaf, item) = find_item(&img2, &fs_blocks, (d1, 96, index("5", d1, "d2")), nodesize);
        img2[item..item + 8].copy_from_slice(&d1.to_le_bytes());
        recsum(&mut img2, leaf, nodesize);
        let mut w = Vec::new();
        let e = read_tree_warn(&Mem(img2), &mut w).unwrap();
        assert!(
            w.iter().any(|m| m.contains("d1/d2") && m.contains("loop")),
            "{w:?}"
        );
        assert!(!e.iter().any(|e| e.path.starts_with(b"d1/d2")));
        assert!(
            e.iter().any(|e| e.path == b"d1/a") && e.iter().any(|e| e.path == b"wide/file_400")
        );
    }
    // 2. A directory entry in subvolume 256 pointing back at the top-level subvolume.
    {
        let mut img2 = base.clone();
        let sv_blocks = tree_blocks(&img, &["256"]);
        let (leaf, item) = find_item(
            &img2,
            &sv_blocks,
            (256, 96, index("256", 256, "dir")),
            nodesize,
        );
        img2[item..item + 8].copy_from_slice(&5u64.to_le_bytes());
        img2[item + 8] = 132;
        img2[item + 9..item + 17].copy_from_slice(&u64::MAX.to_le_bytes());
        recsum(&mut img2, leaf, nodesize);
        let mut w = Vec::new();
        let e = read_tree_warn(&Mem(img2), &mut w).unwrap();
        assert!(
            w.iter()
                .any(|m| m.contains("sv/dir") && m.contains("subvolume 5")),
            "{w:?}"
        );
        assert!(
            e.iter().any(|e| e.path == b"sv/f") && !e.iter().any(|e| e.path.starts_with(b"sv/dir"))
        );
        assert!(e.len() < n_sound && e.len() > n_sound - 5);
    }
    // 3. An interior node's pointer to a block outside the device: that subtree is left out.
    {
        let mut img2 = base.clone();
        let &(node, _) = fs_blocks.iter().find(|b| b.1 > 0).unwrap();
        let node = node as usize;
        let n = le32(&img2[node..], 0x60) as usize;
        assert!(n >= 2);
        let ptr = node + 101 + (n - 1) * 33 + 17;
        img2[ptr..ptr + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
        recsum(&mut img2, node, nodesize);
        let mut w = Vec::new();
        let e = read_tree_warn(&Mem(img2), &mut w).unwrap();
        assert!(w.iter().any(|m| m.contains("lies in no chunk")), "{w:?}");
        assert!(!e.is_empty() && e.len() < n_sound);
    }
    // 4. A leaf whose checksum no longer matches: its items are left out, the rest is read.
    {
        let mut img2 = base.clone();
        let &(leaf, _) = fs_blocks.iter().rfind(|b| b.1 == 0).unwrap();
        img2[leaf as usize + 200] ^= 0x55;
        let mut w = Vec::new();
        let e = read_tree_warn(&Mem(img2), &mut w).unwrap();
        assert!(w.iter().any(|m| m.contains("checksum mismatch")), "{w:?}");
        assert!(!e.is_empty() && e.len() < n_sound);
    }
    // 5. The top-level subvolume's root unreadable: one clear error.
    {
        let mut img2 = base.clone();
        let root_blocks = tree_blocks(&img, &["1"]);
        let (leaf, item) = find_item(&img2, &root_blocks, (5, 132, 0), nodesize);
        img2[item + 176..item + 184].copy_from_slice(&(1u64 << 50).to_le_bytes());
        recsum(&mut img2, leaf, nodesize);
        let mut w = Vec::new();
        let e = read_tree_warn(&Mem(img2), &mut w).unwrap_err();
        assert!(
            format!("{e:#}").contains("top-level subvolume"),
            "{e:#} {w:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn btrfs_corrupt_metadata_never_panics() {
    let (d, img) = small_fixture("btrfs-fuzz", ",compress=zstd");
    let base = std::fs::read(&img).unwrap();
    let nodesize = 4096usize;
    let blocks = tree_blocks(&img, &["1", "5", "256"]);
    assert!(blocks.len() > 10, "{blocks:?}");
    let mut rng = Rng(0x5eed_b7f5_0000_0001);
    let (mut ok, mut err, mut warned) = (0, 0, 0);
    for _ in 0..300 {
        let mut img2 = base.clone();
        let mut touched = Vec::new();
        for _ in 0..1 + rng.below(12) {
            let (p, _) = blocks[rng.below(blocks.len() as u64) as usize];
            // Past the checksum and the header fields the node checks compare.
            let at = p as usize + 101 + rng.below(nodesize as u64 - 101) as usize;
            img2[at] ^= 1 << rng.below(8);
            if rng.below(4) == 0 {
                img2[at] = rng.next() as u8;
            }
            touched.push(p as usize);
        }
        if rng.below(4) != 0 {
            for p in touched {
                recsum(&mut img2, p, nodesize);
            }
        }
        let mem = Mem(img2);
        let mut w = Vec::new();
        match read_tree_warn(&mem, &mut w) {
            Ok(entries) => {
                ok += 1;
                warned += usize::from(!w.is_empty());
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
    eprintln!("btrfs fuzz: {ok} ok ({warned} with warnings), {err} errors");
    assert!(warned > 50, "{warned} rounds with warnings");
    let _ = std::fs::remove_dir_all(&d);
}
