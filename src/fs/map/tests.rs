//! Fixture tests with real tools (mke2fs, e2fsck, debugfs, dumpe2fs, mkfs.fat, fsck.fat, mtools).
//!
//! The key check zeroes every byte the map calls unused and verifies the filesystem and all
//! file contents survive; used_bytes is compared with the tools' free counts so free space
//! is really skipped.

use super::*;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("fsmap-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: reproducible pseudo-random content without extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Files created in src/junk; the even ones are deleted again to fragment the free space.
const JUNK: usize = 16;

/// Source tree: random files, nested dirs, small files; ext also gets a sparse file and a symlink.
fn make_src(dir: &Path, small: bool, ext: bool) -> PathBuf {
    let src = dir.join("src");
    let nested = src.join("nested/deeper");
    fs::create_dir_all(&nested).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ dir.as_os_str().len() as u64);
    let big = if small { 700_000 } else { 2_500_000 };
    fs::write(src.join("big.bin"), rng.bytes(big)).unwrap();
    fs::write(nested.join("mid.bin"), rng.bytes(300_001)).unwrap();
    for i in 0..30 {
        fs::write(src.join(format!("nested/f{i}.txt")), rng.bytes(i * 997 + 1)).unwrap();
    }
    fs::write(src.join("empty"), b"").unwrap();
    fs::create_dir(src.join("junk")).unwrap();
    for i in 0..JUNK {
        fs::write(src.join(format!("junk/j{i}")), rng.bytes(20_000 + i * 300)).unwrap();
    }
    if ext {
        let f = fs::File::create(src.join("sparse.img")).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&rng.bytes(65536), 3 << 20).unwrap();
        std::os::unix::fs::symlink("nested/deeper/mid.bin", src.join("link")).unwrap();
    }
    src
}

/// Every file/dir/symlink of `src` must exist in `out` with identical content.
fn compare_tree(src: &Path, out: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let (a, b) = (e.path(), out.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            assert_eq!(
                fs::read_link(&a).unwrap(),
                fs::read_link(&b).unwrap(),
                "{b:?}"
            );
        } else if ft.is_dir() {
            n += compare_tree(&a, &b);
        } else {
            let got = fs::read(&b).unwrap_or_else(|e| panic!("{b:?}: {e}"));
            assert!(fs::read(&a).unwrap() == got, "content differs: {b:?}");
        }
        n += 1;
    }
    n
}

fn probe_path(p: &Path, offset: u64, len: u64) -> Result<Option<FsInfo>> {
    probe(&fs::File::open(p).unwrap(), offset, len)
}

fn probe_whole(p: &Path) -> FsInfo {
    let len = fs::metadata(p).unwrap().len();
    probe_path(p, 0, len)
        .unwrap_or_else(|e| panic!("probe {p:?}: {e:#}"))
        .expect("filesystem detected")
}

/// Writes zeros over every range the map calls unused.
fn zero_unused(p: &Path, map: &UsedMap) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut pos = 0;
    let mut gaps = Vec::new();
    for (off, len) in map.used_ranges(0, u64::MAX) {
        gaps.push((pos, off - pos));
        pos = off + len;
    }
    gaps.push((pos, map.len() - pos));
    for (mut off, mut len) in gaps {
        while len > 0 {
            let n = len.min(zeros.len() as u64);
            f.write_all_at(&zeros[..n as usize], off).unwrap();
            off += n;
            len -= n;
        }
    }
}

fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in dumpe2fs output"))
        .trim()
        .to_string()
}

/// Builds an ext image with `mke2fs args`, checks type/uuid/label, used_bytes against dumpe2fs,
/// then zeroes unused space in a copy and requires e2fsck -fn clean and identical files.
fn check_ext(name: &str, args: &[&str], size: &str, fstype: &str) -> (TempDir, PathBuf, FsInfo) {
    let td = TempDir::new(name);
    let src = make_src(&td.0, false, true);
    let img = td.0.join("img");
    let mut a = vec!["-F", "-q", "-L", "lbl", "-d", s(&src)];
    a.extend_from_slice(args);
    a.extend_from_slice(&[s(&img), size]);
    run("mke2fs", &a);
    // Free every other junk file so used blocks are fragmented, then drop them from src too.
    let cmds: String = (0..JUNK)
        .step_by(2)
        .map(|i| format!("rm /junk/j{i}\n"))
        .collect();
    let cmdfile = td.0.join("cmds");
    fs::write(&cmdfile, cmds).unwrap();
    run("debugfs", &["-w", "-f", s(&cmdfile), s(&img)]);
    for i in (0..JUNK).step_by(2) {
        fs::remove_file(src.join(format!("junk/j{i}"))).unwrap();
    }
    let info = probe_whole(&img);
    // A clean filesystem's descriptors agree with its bitmaps: nothing is stored whole.
    assert!(info.warnings.is_empty(), "{name}: {:?}", info.warnings);
    assert_eq!(info.fstype, fstype, "{name}");
    assert_eq!(info.variant, None);
    assert_eq!(info.label.as_deref(), Some("lbl"));

    let h = run("dumpe2fs", &["-h", s(&img)]);
    assert_eq!(
        info.uuid.as_deref(),
        Some(field(&h, "Filesystem UUID").as_str())
    );
    let bs: u64 = field(&h, "Block size").parse().unwrap();
    let cluster = h
        .lines()
        .find(|l| l.starts_with("Cluster size:"))
        .map_or(bs, |_| field(&h, "Cluster size").parse().unwrap());
    assert_eq!(info.block_size, cluster, "{name}");
    let count: u64 = field(&h, "Block count").parse().unwrap();
    let free: u64 = field(&h, "Free blocks").parse().unwrap();
    let expect = (count - free) * bs;
    let used = info.used.used_bytes();
    assert!(
        used >= expect && used <= expect + 4 * cluster,
        "{name}: used {used} vs dumpe2fs {expect}"
    );
    assert!(
        used < info.used.len() / 3,
        "{name}: free space not skipped ({used})"
    );

    let copy = td.0.join("zeroed");
    fs::copy(&img, &copy).unwrap();
    zero_unused(&copy, &info.used);
    run("e2fsck", &["-fn", s(&copy)]);
    let out = td.0.join("out");
    fs::create_dir(&out).unwrap();
    run(
        "debugfs",
        &["-R", &format!("rdump / {}", s(&out)), s(&copy)],
    );
    assert!(compare_tree(&src, &out) > 30);
    (td, img, info)
}

/// The same filesystem inside a bigger disk image at 1 MiB must give the same map, and a
/// partition shorter than the filesystem must be an error.
fn check_embedded(td: &TempDir, img: &Path, info: &FsInfo) {
    let disk = td.0.join("disk");
    let mut data = Rng(7).bytes(1 << 20);
    data.extend(fs::read(img).unwrap());
    data.extend(Rng(8).bytes(1 << 20));
    fs::write(&disk, data).unwrap();
    let len = info.used.len();
    let got = probe_path(&disk, 1 << 20, len)
        .unwrap()
        .expect("embedded fs");
    assert_eq!(
        got.used.used_ranges(0, u64::MAX),
        info.used.used_ranges(0, u64::MAX)
    );
    let e = probe_path(&disk, 1 << 20, len - 65536).expect_err("short partition");
    assert!(e.to_string().contains("larger than its partition"), "{e}");
}

#[test]
fn ext4_default_4k() {
    let (td, img, info) = check_ext("ext4", &["-t", "ext4", "-b", "4096"], "64M", "ext4");
    check_embedded(&td, &img, &info);
}

#[test]
fn ext4_64bit() {
    check_ext(
        "64bit",
        &["-t", "ext4", "-b", "4096", "-O", "64bit"],
        "64M",
        "ext4",
    );
}

#[test]
fn ext4_no_flex_bg() {
    check_ext(
        "noflex",
        &["-t", "ext4", "-b", "4096", "-O", "^flex_bg"],
        "64M",
        "ext4",
    );
}

#[test]
fn ext4_1k_blocks() {
    check_ext("1k", &["-t", "ext4", "-b", "1024"], "64M", "ext4");
}

#[test]
fn ext4_bigalloc() {
    let a = ["-t", "ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"];
    check_ext("bigalloc", &a, "64M", "ext4");
}

#[test]
fn ext4_meta_bg() {
    let a = ["-t", "ext4", "-b", "4096", "-O", "meta_bg,^resize_inode"];
    check_ext("metabg", &a, "64M", "ext4");
}

#[test]
fn ext4_meta_bg_many_groups() {
    // 64 groups of 1 MiB, 16 descriptors per block: four metagroups.
    let a = [
        "-t",
        "ext4",
        "-b",
        "1024",
        "-g",
        "1024",
        "-O",
        "meta_bg,^resize_inode,64bit",
    ];
    check_ext("metabg-many", &a, "64M", "ext4");
}

#[test]
fn ext4_sparse_super2() {
    let a = ["-t", "ext4", "-b", "1024", "-O", "sparse_super2"];
    check_ext("sparse2", &a, "64M", "ext4");
}

#[test]
fn ext4_64k_blocks() {
    check_ext("64k", &["-t", "ext4", "-b", "65536"], "256M", "ext4");
}

#[test]
fn ext2_plain() {
    check_ext("ext2", &["-t", "ext2"], "64M", "ext2");
}

#[test]
fn ext3_plain() {
    check_ext("ext3", &["-t", "ext3"], "64M", "ext3");
}

/// Overwrites `bytes` at `off`, probes, restores; returns the probe result.
fn probe_patched(img: &Path, off: u64, bytes: &[u8]) -> Result<Option<FsInfo>> {
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut orig = vec![0u8; bytes.len()];
    f.read_exact_at(&mut orig, off).unwrap();
    f.write_all_at(bytes, off).unwrap();
    let r = probe(&f, 0, f.metadata().unwrap().len());
    f.write_all_at(&orig, off).unwrap();
    r
}

fn expect_err(r: Result<Option<FsInfo>>, needle: &str) {
    match r {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("ext4 at offset 0: "), "{msg}");
            assert!(msg.contains(needle) && !msg.contains('\n'), "{msg}");
        }
        Ok(_) => panic!("expected error containing {needle:?}"),
    }
}

#[test]
fn ext_corrupt_and_fuzz() {
    let td = TempDir::new("corrupt");
    let img = td.0.join("img");
    run(
        "mke2fs",
        &[
            "-F",
            "-q",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-g",
            "4096",
            s(&img),
            "64M",
        ],
    );
    let sb = 1024;
    expect_err(
        probe_patched(&img, sb + 4, &0xFFFF_FFF0u32.to_le_bytes()),
        "larger than its partition",
    );
    // Descriptor 0 (block 1) points the block bitmap past the end.
    expect_err(
        probe_patched(&img, 4096, &0x00FF_FFF0u32.to_le_bytes()),
        "group descriptor 0 points block bitmap outside the filesystem",
    );
    let (incompat, desc_size) = {
        let f = fs::File::open(&img).unwrap();
        let mut b = [0u8; 0x100];
        f.read_exact_at(&mut b, sb).unwrap();
        let incompat = u32::from_le_bytes(b[0x60..0x64].try_into().unwrap());
        let ds = u16::from_le_bytes([b[0xFE], b[0xFF]]);
        (
            incompat,
            if incompat & 0x80 != 0 {
                u64::from(ds)
            } else {
                32
            },
        )
    };
    expect_err(
        probe_patched(&img, 4096 + desc_size + 8, &0x00FF_FFF0u32.to_le_bytes()),
        "group descriptor 1 points inode table outside",
    );
    expect_err(
        probe_patched(&img, sb + 0x60, &(incompat | 0x4).to_le_bytes()),
        "unrecovered journal",
    );
    expect_err(probe_patched(&img, sb + 0x3A, &[2, 0]), "not marked clean");
    expect_err(probe_patched(&img, sb + 0x18, &[9, 0, 0, 0]), "block size");
    assert!(probe_patched(&img, sb + 0x38, &[0, 0]).unwrap().is_none());

    // Random byte flips in the superblock and descriptors: errors are fine, panics are not.
    let mut rng = Rng(42);
    let mut errors = 0;
    for _ in 0..200 {
        let off = if rng.below(2) == 0 {
            sb + rng.below(0x110)
        } else {
            4096 + rng.below(64 * 16)
        };
        let val = [rng.next() as u8];
        if probe_patched(&img, off, &val).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 0);
}

/// Blocks of `inode`'s data as debugfs lists them ("(0-9):100-109, ...").
fn file_blocks(img: &Path, path: &str) -> Vec<u64> {
    let out = run("debugfs", &["-R", &format!("blocks {path}"), s(img)]);
    out.split_whitespace().map(|b| b.parse().unwrap()).collect()
}

fn dumpe2fs_group(img: &Path, g: u64, key: &str) -> u64 {
    let out = run("dumpe2fs", &[s(img)]);
    let block = out
        .split(&format!("Group {g}: "))
        .nth(1)
        .unwrap_or_else(|| panic!("no group {g}"));
    let at = block.find(key).unwrap_or_else(|| panic!("no {key}")) + key.len();
    block[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A clean filesystem whose group descriptors contradict its bitmaps (crafted with debugfs
/// and python on a real mke2fs image, confirmed by e2fsck -fn) must not lose the blocks the
/// bitmap or a BLOCK_UNINIT flag calls free: that group is stored whole, with a warning.
#[test]
fn ext_group_descriptor_contradicts_bitmap() {
    let td = TempDir::new("doubt");
    let src = td.0.join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big"), Rng(5).bytes(60 << 20)).unwrap();
    let img = td.0.join("img");
    let mk = |extra: &str| {
        let mut a = vec!["-F", "-q", "-t", "ext4", "-b", "4096", "-g", "8192"];
        a.extend(extra.split_whitespace());
        a.extend_from_slice(&["-d", s(&src), s(&img), "128M"]);
        run("mke2fs", &a);
    };
    let debugfs = |cmds: &str| {
        let f = td.0.join("cmds");
        fs::write(&f, cmds).unwrap();
        run("debugfs", &["-w", "-n", "-f", s(&f), s(&img)]);
    };
    let in_group_2 = |info: &FsInfo, blocks: &[u64]| {
        blocks
            .iter()
            .filter(|&&b| (16384..24576).contains(&b))
            .all(|&b| info.used.is_used(b * 4096))
    };
    let clean_e2fsck = |ok: bool| {
        let out = Command::new("e2fsck")
            .args(["-fn", s(&img)])
            .output()
            .unwrap();
        assert_eq!(
            out.status.success(),
            ok,
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    };

    for extra in ["", "-O ^metadata_csum,uninit_bg"] {
        mk(extra);
        let blocks = file_blocks(&img, "/big");
        assert!(
            blocks.iter().any(|b| (16384..24576).contains(b)),
            "{blocks:?}"
        );
        let info = probe_whole(&img);
        assert!(info.warnings.is_empty(), "{:?}", info.warnings);
        let clean_used = info.used.used_bytes();

        // BLOCK_UNINIT on a group that holds file data.
        debugfs("set_bg 2 flags 3\nset_bg 2 checksum calc\n");
        clean_e2fsck(false);
        let info = probe_whole(&img);
        assert!(
            in_group_2(&info, &blocks),
            "{extra}: BLOCK_UNINIT lost file blocks"
        );
        assert!(
            matches!(info.warnings.as_slice(), [w] if w.contains("block group 2:") && w.contains("BLOCK_UNINIT")),
            "{extra}: {:?}",
            info.warnings
        );
        assert!(info.used.used_bytes() > clean_used);

        // A bitmap that frees blocks the file uses, the free count left as it was.
        mk(extra);
        let bitmap = dumpe2fs_group(&img, 2, "Block bitmap at");
        let free = dumpe2fs_free(&img, 2);
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0u8; 144], bitmap * 4096 + 512).unwrap();
        drop(f);
        clean_e2fsck(false);
        let info = probe_whole(&img);
        assert!(
            in_group_2(&info, &blocks),
            "{extra}: freed bitmap bits lost file blocks"
        );
        assert!(
            matches!(info.warnings.as_slice(), [w] if w.contains("block group 2:") && w.contains("free blocks")),
            "{extra}: {:?}",
            info.warnings
        );

        // The same, the free count raised to match: only metadata_csum's bitmap checksum
        // tells.
        debugfs(&format!(
            "set_bg 2 free_blocks_count {}\nset_bg 2 checksum calc\n",
            free + 144 * 8
        ));
        let info = probe_whole(&img);
        if extra.is_empty() {
            assert!(in_group_2(&info, &blocks), "bitmap checksum not checked");
            assert!(
                matches!(info.warnings.as_slice(), [w] if w.contains("block group 2:") && w.contains("checksum")),
                "{:?}",
                info.warnings
            );
        } else {
            assert!(info.warnings.is_empty(), "{:?}", info.warnings);
        }
    }
}

/// A group's free block count as its descriptor says ("N free blocks").
fn dumpe2fs_free(img: &Path, g: u64) -> u64 {
    let out = run("dumpe2fs", &[s(img)]);
    let block = out.split(&format!("Group {g}: ")).nth(1).unwrap();
    block
        .lines()
        .find_map(|l| l.trim().split_once(" free blocks,"))
        .map(|(n, _)| n.parse().unwrap())
        .unwrap()
}

#[test]
fn not_a_filesystem() {
    let td = TempDir::new("random");
    let p = td.0.join("rand");
    fs::write(&p, Rng(1).bytes(4 << 20)).unwrap();
    assert!(probe_path(&p, 0, 4 << 20).unwrap().is_none());
    assert!(probe_path(&p, 512, 100).unwrap().is_none());
    fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    assert!(probe_path(&p, 0, 1 << 20).unwrap().is_none());
    assert!(probe_path(&p, 0, 0).unwrap().is_none());
}

/// Builds a FAT image with mkfs.fat, fills it with mcopy, checks identity, used_bytes against
/// mdir's free space, then zeroes unused space in a copy: fsck.fat -n clean, files identical.
fn check_fat(name: &str, args: &[&str], kib: u64, variant: &str) -> (TempDir, PathBuf, FsInfo) {
    let td = TempDir::new(name);
    let src = make_src(&td.0, kib < 10_000, false);
    let img = td.0.join("img");
    let mut a = vec!["-C", "-i", "1234ABCD", "-n", "MYLABEL"];
    a.extend_from_slice(args);
    let kib = kib.to_string();
    a.extend_from_slice(&[s(&img), &kib]);
    run("mkfs.fat", &a);
    // Junk first, deleted at the end, so the used clusters are fragmented.
    run("mcopy", &["-s", "-i", s(&img), s(&src.join("junk")), "::"]);
    let entries: Vec<String> = fs::read_dir(&src)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != "junk")
        .map(|e| e.unwrap().path().to_str().unwrap().to_string())
        .collect();
    let mut a = vec!["-s", "-i", s(&img)];
    a.extend(entries.iter().map(String::as_str));
    a.push("::");
    run("mcopy", &a);
    for i in (0..JUNK).step_by(2) {
        run("mdel", &["-i", s(&img), &format!("::junk/j{i}")]);
        fs::remove_file(src.join(format!("junk/j{i}"))).unwrap();
    }

    let info = probe_whole(&img);
    assert_eq!(info.fstype, "vfat");
    assert_eq!(info.variant.as_deref(), Some(variant));
    assert_eq!(info.uuid.as_deref(), Some("1234-ABCD"));
    assert_eq!(info.label.as_deref(), Some("MYLABEL"));

    let dir = run("mdir", &["-i", s(&img), "::"]);
    let free: u64 = dir
        .lines()
        .find_map(|l| l.trim().strip_suffix("bytes free"))
        .expect("bytes free")
        .replace([' ', '\u{a0}'], "")
        .parse()
        .unwrap();
    let (len, used) = (info.used.len(), info.used.used_bytes());
    // The only bytes neither used nor free: the partial cluster after the last one.
    let rest = len - used - free;
    assert!(
        rest < info.block_size,
        "{name}: used {used} free {free} len {len}"
    );
    assert!(used < len / 2, "{name}: free space not skipped");

    let copy = td.0.join("zeroed");
    fs::copy(&img, &copy).unwrap();
    zero_unused(&copy, &info.used);
    run("fsck.fat", &["-n", s(&copy)]);
    let out = td.0.join("out");
    fs::create_dir(&out).unwrap();
    run("mcopy", &["-s", "-n", "-i", s(&copy), "::*", s(&out)]);
    assert!(compare_tree(&src, &out) > 30);
    (td, img, info)
}

#[test]
fn fat12() {
    check_fat("fat12", &["-F", "12"], 4096, "fat12");
}

#[test]
fn fat16() {
    let (td, img, info) = check_fat("fat16", &["-F", "16"], 65536, "fat16");
    check_embedded(&td, &img, &info);
}

#[test]
fn fat16_4k_sectors() {
    check_fat("fat16-4k", &["-F", "16", "-S", "4096"], 65536, "fat16");
}

#[test]
fn fat32() {
    let (td, img, _) = check_fat(
        "fat32",
        &["-F", "32", "-S", "512", "-s", "1"],
        40_000,
        "fat32",
    );
    // Corrupt geometry: FAT size so large the metadata exceeds the volume.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.write_all_at(&0x0FFF_FFFFu32.to_le_bytes(), 0x24).unwrap();
    let e = probe(&f, 0, f.metadata().unwrap().len()).expect_err("corrupt FAT32");
    assert!(e.to_string().starts_with("vfat at offset 0: "), "{e}");
    drop(td);
}

#[test]
fn fat_fuzz() {
    let td = TempDir::new("fatfuzz");
    let img = td.0.join("img");
    run("mkfs.fat", &["-C", "-F", "16", s(&img), "16384"]);
    let mut rng = Rng(99);
    for _ in 0..200 {
        let off = rng.below(512 + 4096);
        let val = [rng.next() as u8];
        let _ = probe_patched(&img, off, &val);
    }
}
