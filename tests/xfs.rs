//! XFS allocation maps against the real tools (mkfs.xfs, xfs_db, xfs_io, xfs_repair,
//! xfs_logprint, partclone.xfs, mount): fixtures in a GPT partition with a fragmented file and
//! a big deleted one; every block partclone calls used must be in bmr's map, and bmr must not
//! keep much more than df and partclone count. A backup/restore round trip must give a
//! filesystem xfs_repair calls clean with the same files. A log with changes still to replay
//! must be refused, and damaged metadata must give an error, never a panic or a hang.

mod common;
use common::*;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PART_MIB: u64 = 512;
/// The partition: 1 MiB into the disk, 512 MiB long (mkfs.xfs refuses less than 300 MB).
const OFF: u64 = MIB;
const LEN: u64 = PART_MIB * MIB;
const BIG_MIB: u64 = 200;

/// A mounted XFS, unmounted on drop (declare it after the Loop it sits on).
struct Mnt(Option<PathBuf>);

impl Mnt {
    fn new(dev: &str, at: &Path, opts: &str) -> Mnt {
        std::fs::create_dir_all(at).unwrap();
        sh(&format!("mount -t xfs -o {opts} {dev} {}", at.display()));
        Mnt(Some(at.to_path_buf()))
    }
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap()
    }
    fn s(&self) -> String {
        self.path().display().to_string()
    }
    /// Unmount now, failing the test if umount fails.
    fn unmount(mut self) {
        if let Some(p) = self.0.take() {
            sh(&format!("umount {}", p.display()));
        }
    }
}

impl Drop for Mnt {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = sh_status(&format!("umount {}", p.display()));
        }
    }
}

/// mkfs.xfs's protofile for `dir` (v4 cannot be mounted on this kernel to be filled).
fn protofile(dir: &Path) -> String {
    fn walk(dir: &Path, depth: usize, out: &mut String) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        let pad = " ".repeat(depth);
        for e in entries {
            let name = e.file_name().into_string().unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                let t = std::fs::read_link(e.path()).unwrap();
                out.push_str(&format!("{pad}{name} l--777 0 0 {}\n", t.display()));
            } else if ft.is_dir() {
                out.push_str(&format!("{pad}{name} d--755 0 0\n"));
                walk(&e.path(), depth + 1, out);
                out.push_str(&format!("{pad}$\n"));
            } else {
                out.push_str(&format!("{pad}{name} ---644 0 0 {}\n", e.path().display()));
            }
        }
    }
    let mut out = String::from("/dev/null\n0 0\nd--755 0 0\n");
    walk(dir, 1, &mut out);
    out.push_str("$\n");
    out
}

struct Fixture {
    tmp: Tmp,
    disk: PathBuf,
    tree: PathBuf,
    /// Byte ranges (in the partition) of the big file deleted before the backup.
    deleted: Vec<(u64, u64)>,
    /// df's used bytes, measured on a fresh read-only mount after the delete.
    df_used: Option<u64>,
}

/// xfs_io fiemap of `file`: its extents as byte ranges of the device.
fn extents(file: &Path) -> Vec<(u64, u64)> {
    let out = sh(&format!("xfs_io -r -c fiemap {}", file.display()));
    out.lines()
        .filter_map(|l| {
            let (_, phys) = l.split_once("]: ")?;
            let (a, b) = phys.trim().split_once("..")?;
            let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
            Some((a * 512, (b - a + 1) * 512))
        })
        .collect()
}

/// Fragmented free space: a file with every other block punched out, so the free-space tree
/// of its AG has more than one level.
fn fragment(mnt: &Mnt, bs: u64) {
    let f = mnt.path().join("holes");
    sh(&format!(
        "xfs_io -f -c 'pwrite -q -b {big} 0 {big}' -c fsync {f} && \
         args=(); for i in $(seq 1 2 4095); do args+=(-c \"fpunch $((i * {bs})) {bs}\"); done && \
         xfs_io \"${{args[@]}}\" {f}",
        big = 4096 * bs,
        f = f.display()
    ));
}

/// A GPT disk with one XFS partition made with `mkfs_opts`, filled with a tree of files (and,
/// when `mount` is possible, a fragmented file and a 200 MiB file deleted again). The partition
/// is random bytes first, so skipped free space shows in a restore.
fn fixture(name: &str, mkfs_opts: &str, mount: bool) -> Fixture {
    let tmp = Tmp::new(&format!("xfs-{name}"));
    let disk = tmp.path("disk.img");
    sh(&format!(
        "truncate -s {}M {d} && sgdisk -n 1:2048:+{PART_MIB}M -t 1:8300 {d} >/dev/null",
        PART_MIB + 2,
        d = disk.display()
    ));
    random_at(&disk, OFF, LEN);
    let tree = tmp.path("tree");
    populate(&tree, 7);
    sh(&format!(
        "mkdir -p {t}/many && for i in $(seq 1 300); do head -c $((i * 211)) /dev/urandom > {t}/many/m$i; done && \
         head -c 20000000 /dev/urandom > {t}/many/twenty.bin",
        t = tree.display()
    ));
    let lo = Loop::new(&disk, OFF, LEN, false);
    let label = &name[..name.len().min(12)];
    if mount {
        sh(&format!(
            "mkfs.xfs -f -K -q -L {label} {mkfs_opts} {}",
            lo.0
        ));
    } else {
        let proto = tmp.path("proto");
        std::fs::write(&proto, protofile(&tree)).unwrap();
        sh(&format!(
            "mkfs.xfs -f -K -q -L {label} {mkfs_opts} -p {} {}",
            proto.display(),
            lo.0
        ));
        return Fixture {
            tmp,
            disk,
            tree,
            deleted: Vec::new(),
            df_used: None,
        };
    }
    let m = Mnt::new(&lo.0, &tmp.path("mnt"), "rw");
    sh(&format!("cp -a {}/. {}/", tree.display(), m.s()));
    let bs: u64 = sh(&format!("stat -f -c %S {}", m.s()))
        .trim()
        .parse()
        .unwrap();
    fragment(&m, bs);
    let big = m.path().join("big.del");
    sh(&format!(
        "head -c {BIG_MIB}M /dev/urandom > {} && sync",
        big.display()
    ));
    let deleted = extents(&big);
    let total: u64 = deleted.iter().map(|e| e.1).sum();
    assert_eq!(total, BIG_MIB * MIB, "{deleted:?}");
    // The punched file stays: its holes are the fragmented free space. It is not in the tree
    // (diffed after the restore), so it goes there too.
    sh(&format!(
        "rm {} && sync && cp -a {}/holes {}/",
        big.display(),
        m.s(),
        tree.display()
    ));
    m.unmount();
    // XFS frees a deleted file's blocks in the background; after the unmount it is done.
    let m = Mnt::new(&lo.0, &tmp.path("mnt"), "ro");
    let df_used: u64 = sh(&format!("df -B1 --output=used {} | tail -1", m.s()))
        .trim()
        .parse()
        .unwrap();
    m.unmount();
    Fixture {
        tmp,
        disk,
        tree,
        deleted,
        df_used: Some(df_used),
    }
}

/// The used ranges partclone.xfs reports for `dev` (its ddrescue domain log, "+" lines).
fn partclone_used(tmp: &Tmp, dev: &str) -> Vec<(u64, u64)> {
    let map = tmp.path("partclone.map");
    let _ = std::fs::remove_file(&map);
    sh(&format!(
        "partclone.xfs -q -D -s {dev} -O {} >/dev/null 2>&1",
        map.display()
    ));
    let text = std::fs::read_to_string(&map).unwrap();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let ranges: Vec<(u64, u64)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [pos, size, "+"] => Some((hex(pos)?, hex(size)?)),
                _ => None,
            }
        })
        .collect();
    assert!(
        !ranges.is_empty(),
        "no used ranges in partclone's log:\n{text}"
    );
    ranges
}

/// An xfs_db superblock field.
fn sb_field(dev: &str, name: &str) -> u64 {
    let out = sh(&format!("xfs_db -r -c 'sb 0' -c 'print {name}' {dev}"));
    out.trim()
        .strip_prefix(&format!("{name} = "))
        .unwrap_or_else(|| panic!("xfs_db: {out}"))
        .parse()
        .unwrap()
}

/// Bytes of [off, off+len) of the partition the map calls used.
fn used_in(map: &bmr::fs::map::UsedMap, off: u64, len: u64) -> u64 {
    map.used_ranges(off, len).iter().map(|r| r.1).sum()
}

/// Probes the fixture's partition and compares the map with partclone, xfs_db and df.
/// Returns the map and partclone's used ranges.
fn check_map(fx: &Fixture, variant: &str, label: &str) -> (bmr::fs::map::FsInfo, Vec<(u64, u64)>) {
    let f = File::open(&fx.disk).unwrap();
    let info = bmr::fs::map::probe(&f, OFF, LEN)
        .unwrap_or_else(|e| panic!("probe: {e:#}"))
        .expect("xfs detected");
    let lo = Loop::new(&fx.disk, OFF, LEN, false);
    assert_eq!(info.fstype, "xfs");
    assert_eq!(info.variant.as_deref(), Some(variant));
    let blkid = sh(&format!("blkid -p -o value -s UUID {}", lo.0));
    assert_eq!(info.uuid.as_deref(), Some(blkid.trim()));
    assert_eq!(info.label.as_deref(), Some(label));
    let bs = sb_field(&lo.0, "blocksize");
    assert_eq!(info.block_size, bs);

    let pc = partclone_used(&fx.tmp, &lo.0);
    let pc_total: u64 = pc.iter().map(|r| r.1).sum();
    for &(pos, size) in &pc {
        assert_eq!(
            used_in(&info.used, pos, size),
            size,
            "partclone calls {pos:#x}+{size:#x} used, bmr does not (all of it)"
        );
    }
    let used = info.used.used_bytes();
    let dblocks = sb_field(&lo.0, "dblocks");
    let fdblocks = sb_field(&lo.0, "fdblocks");
    let log = sb_field(&lo.0, "logblocks") * bs;
    let db_used = (dblocks - fdblocks) * bs;
    let slack = LEN * 3 / 100;
    eprintln!(
        "xfs {variant} {label}: bmr used {used}, partclone {pc_total}, xfs_db (dblocks - fdblocks) {db_used}, df {:?} (+ log {log}), partition {LEN}",
        fx.df_used
    );
    assert!(
        used <= pc_total + LEN / 100,
        "bmr {used} vs partclone {pc_total}"
    );
    assert!(used <= db_used + slack, "bmr {used} vs xfs_db {db_used}");
    // df leaves the internal log out of the filesystem's size; bmr keeps it.
    if let Some(df) = fx.df_used {
        assert!(
            used <= df + log + slack,
            "bmr {used} vs df {df} + log {log}"
        );
    }
    let del: u64 = fx.deleted.iter().map(|r| r.1).sum();
    let del_used: u64 = fx
        .deleted
        .iter()
        .map(|&(o, l)| used_in(&info.used, o, l))
        .sum();
    assert!(
        del_used * 100 <= del,
        "{del_used} of the deleted file's {del} bytes still marked used"
    );
    (info, pc)
}

/// Backup with the CLI, restore to a new image; the restored partition must be clean for
/// xfs_repair, equal in every block partclone calls used and (when mountable) hold the tree.
fn round_trip(fx: &Fixture, pc: &[(u64, u64)], mountable: bool) {
    let repo = fx.tmp.s("repo");
    let disk = fx.disk.display().to_string();
    bmr_ok(&["backup", "--repo", &repo, "--host", "x1", "-q", &disk]);
    let m: serde_json::Value =
        serde_json::from_str(&sh(&format!("cat {repo}/hosts/x1/snapshots/*.json"))).unwrap();
    let areas = m["areas"].as_array().unwrap();
    let xfs: Vec<_> = areas
        .iter()
        .filter(|a| a["fs"]["fstype"] == "xfs")
        .collect();
    assert_eq!(xfs.len(), 1, "{areas:#?}");
    assert_eq!(xfs[0]["content"], "used-blocks", "{:#?}", xfs[0]);
    assert!(xfs[0].get("note").is_none(), "{:#?}", xfs[0]);
    let list: serde_json::Value =
        serde_json::from_str(&bmr_ok(&["list", "--repo", &repo, "--json"])).unwrap();
    let used = list[0]["snapshots"][0]["used_bytes"].as_u64().unwrap();
    let pc_total: u64 = pc.iter().map(|r| r.1).sum();
    eprintln!(
        "bmr list: used_bytes {used} (partclone {pc_total}, df {:?})",
        fx.df_used
    );
    // The GPT and its backup are stored too.
    assert!(used <= pc_total + LEN * 3 / 100, "stored {used}");

    let out = fx.tmp.path("restored.img");
    let out_s = out.display().to_string();
    bmr_ok(&[
        "restore", "--repo", &repo, "--host", "x1", "--target", &out_s, "--verify", "-q",
    ]);
    let lo = Loop::new(&out, OFF, LEN, false);
    let (ok, log) = sh_status(&format!("xfs_repair -n {}", lo.0));
    assert!(ok, "xfs_repair -n of the restored partition:\n{log}");
    for &(pos, size) in pc {
        assert!(
            read_range(&fx.disk, OFF + pos, size) == read_range(&out, OFF + pos, size),
            "used bytes at {pos:#x}+{size:#x} differ after the restore"
        );
    }
    if mountable {
        let mnt = Mnt::new(&lo.0, &fx.tmp.path("restored-mnt"), "ro");
        sh(&format!(
            "diff -r --no-dereference {} {}",
            fx.tree.display(),
            mnt.s()
        ));
        mnt.unmount();
    }
    drop(lo);
    let _ = std::fs::remove_file(&out);
}

#[test]
fn v5_default() {
    let fx = fixture("v5", "", true);
    let (_, pc) = check_map(&fx, "xfs v5", "v5");
    round_trip(&fx, &pc, true);
}

#[test]
fn v4_protofile() {
    let fx = fixture("v4", "-m crc=0", false);
    let (_, pc) = check_map(&fx, "xfs v4", "v4");
    round_trip(&fx, &pc, false);
}

#[test]
fn v5_1k_blocks() {
    let fx = fixture("1k", "-b size=1024", true);
    let (_, pc) = check_map(&fx, "xfs v5", "1k");
    round_trip(&fx, &pc, true);
}

#[test]
fn v5_reflink_rmapbt() {
    let fx = fixture("rmap", "-m reflink=1,rmapbt=1", true);
    check_map(&fx, "xfs v5", "rmap");
}

/// A log left with changes to replay is refused (the kernel and xfs_logprint agree), while
/// mounted too; after a mount and unmount replay it is mapped again. probe_uuid reads a
/// mounted filesystem's UUID.
#[test]
fn dirty_log() {
    let tmp = Tmp::new("xfs-dirty");
    let img = tmp.path("img");
    sh(&format!("truncate -s {LEN} {}", img.display()));
    let lo = Loop::new(&img, 0, LEN, false);
    sh(&format!("mkfs.xfs -f -q {}", lo.0));
    let state = || {
        sh(&format!(
            "xfs_logprint -t {} 2>&1 | grep -o 'state: <[A-Z]*>'",
            lo.0
        ))
    };
    let probe = || bmr::fs::map::probe(&File::open(&img).unwrap(), 0, LEN);
    assert!(state().contains("CLEAN"));
    probe().unwrap().expect("fresh xfs");

    let m = Mnt::new(&lo.0, &tmp.path("mnt"), "rw");
    populate(&m.path().join("t"), 3);
    sh("sync");
    let e = probe().expect_err("mounted, with changes in the log");
    assert!(e.to_string().contains("not cleanly unmounted"), "{e:#}");
    let blkid = sh(&format!("blkid -p -o value -s UUID {}", lo.0));
    assert_eq!(
        bmr::fs::map::probe_uuid(&File::open(&lo.0).unwrap()).as_deref(),
        Some(blkid.trim())
    );
    // A crash: stop all I/O without writing the log out further.
    sh(&format!("xfs_io -x -c 'shutdown' {}", m.s()));
    m.unmount();
    assert!(state().contains("DIRTY"), "{}", state());
    let e = probe().expect_err("dirty log");
    let msg = e.to_string();
    assert!(
        msg.contains("not cleanly unmounted") && msg.contains("mount and unmount it"),
        "{msg}"
    );
    let (ok, _) = sh_status(&format!("xfs_repair -n {}", lo.0));
    assert!(!ok, "xfs_repair -n accepted a log that needs replaying");

    // The mount replays the log; the unmount leaves it clean.
    Mnt::new(&lo.0, &tmp.path("mnt"), "rw").unmount();
    assert!(state().contains("CLEAN"));
    probe().unwrap().expect("replayed xfs");

    // 256 KiB log buffers: record headers span several blocks.
    let m = Mnt::new(&lo.0, &tmp.path("mnt"), "logbsize=256k");
    populate(&m.path().join("u"), 4);
    sh("sync");
    // A copy taken while frozen: bmr must judge its log as xfs_logprint does.
    let copy = tmp.path("frozen");
    sh(&format!("xfs_freeze -f {}", m.s()));
    let cp = sh_status(&format!(
        "cp --sparse=always {} {}",
        img.display(),
        copy.display()
    ));
    sh(&format!("xfs_freeze -u {}", m.s()));
    assert!(cp.0, "{}", cp.1);
    let frozen_clean = sh(&format!("xfs_logprint -t {} 2>&1", copy.display())).contains("<CLEAN>");
    let r = bmr::fs::map::probe(&File::open(&copy).unwrap(), 0, LEN);
    assert_eq!(r.is_ok(), frozen_clean, "{:?}", r.err());
    m.unmount();
    assert!(state().contains("CLEAN"));
    probe().unwrap().expect("clean after 256 KiB log buffers");
}

/// External logs and realtime sections are reported, not mapped.
#[test]
fn external_log_and_realtime() {
    let tmp = Tmp::new("xfs-ext");
    let img = tmp.path("img");
    let logimg = tmp.path("log");
    sh(&format!(
        "truncate -s {LEN} {} && truncate -s 64M {}",
        img.display(),
        logimg.display()
    ));
    let lo = Loop::new(&img, 0, LEN, false);
    let lolog = Loop::new(&logimg, 0, 64 * MIB, false);
    sh(&format!("mkfs.xfs -f -q -l logdev={} {}", lolog.0, lo.0));
    let e = bmr::fs::map::probe(&File::open(&img).unwrap(), 0, LEN).expect_err("external log");
    assert!(e.to_string().contains("log is on another device"), "{e:#}");
    sh(&format!("mkfs.xfs -f -q -r rtdev={} {}", lolog.0, lo.0));
    let e = bmr::fs::map::probe(&File::open(&img).unwrap(), 0, LEN).expect_err("realtime");
    assert!(e.to_string().contains("realtime"), "{e:#}");
}

/// CRC32C as XFS v5 stores it (little-endian, field zeroed while summing).
fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

/// A small XFS image (the partition alone) to damage: its geometry and metadata locations.
struct Victim {
    _tmp: Tmp,
    img: PathBuf,
    v5: bool,
    bs: u64,
    sect: u64,
    agblocks: u64,
    agcount: u64,
}

impl Victim {
    fn new(name: &str, opts: &str, fragment_it: bool) -> Victim {
        let tmp = Tmp::new(&format!("xfs-victim-{name}"));
        let img = tmp.path("img");
        sh(&format!("truncate -s {LEN} {}", img.display()));
        {
            let lo = Loop::new(&img, 0, LEN, false);
            if fragment_it {
                sh(&format!("mkfs.xfs -f -q {opts} {}", lo.0));
                let m = Mnt::new(&lo.0, &tmp.path("mnt"), "rw");
                let bs: u64 = sh(&format!("stat -f -c %S {}", m.s()))
                    .trim()
                    .parse()
                    .unwrap();
                fragment(&m, bs);
                m.unmount();
            } else {
                let tree = tmp.path("tree");
                populate(&tree, 5);
                let proto = tmp.path("proto");
                std::fs::write(&proto, protofile(&tree)).unwrap();
                sh(&format!(
                    "mkfs.xfs -f -q {opts} -p {} {}",
                    proto.display(),
                    lo.0
                ));
            }
        }
        let sb = read_range(&img, 0, 512);
        Victim {
            _tmp: tmp,
            img,
            v5: u16::from_be_bytes([sb[100], sb[101]]) & 0xf == 5,
            bs: u64::from(be32(&sb, 4)),
            sect: u64::from(u16::from_be_bytes([sb[102], sb[103]])),
            agblocks: u64::from(be32(&sb, 84)),
            agcount: u64::from(be32(&sb, 88)),
        }
    }

    fn agf_off(&self, ag: u64) -> u64 {
        ag * self.agblocks * self.bs + self.sect
    }

    /// (root block, levels) of AG `ag`'s by-block-number tree.
    fn bno_root(&self, ag: u64) -> (u64, u32) {
        let agf = read_range(&self.img, self.agf_off(ag), 512);
        (u64::from(be32(&agf, 16)), be32(&agf, 28))
    }

    fn block_off(&self, ag: u64, agbno: u64) -> u64 {
        (ag * self.agblocks + agbno) * self.bs
    }

    /// Probe with `patch` applied to the metadata unit (AGF sector or btree block) at `off`
    /// of `len` bytes, its v5 checksum (at `crc_at`) recomputed; the image is put back after.
    fn probe_patched(
        &self,
        off: u64,
        len: u64,
        crc_at: usize,
        patch: impl FnOnce(&mut Vec<u8>),
    ) -> anyhow::Result<Option<bmr::fs::map::FsInfo>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.img)
            .unwrap();
        let mut orig = vec![0u8; len as usize];
        f.read_exact_at(&mut orig, off).unwrap();
        let mut b = orig.clone();
        patch(&mut b);
        if self.v5 {
            b[crc_at..crc_at + 4].fill(0);
            let c = crc32c(&b);
            b[crc_at..crc_at + 4].copy_from_slice(&c.to_le_bytes());
        }
        f.write_all_at(&b, off).unwrap();
        let r = bmr::fs::map::probe(&f, 0, LEN);
        f.write_all_at(&orig, off).unwrap();
        r
    }
}

fn expect_err(r: anyhow::Result<Option<bmr::fs::map::FsInfo>>, what: &str) {
    match r {
        Err(e) => assert!(e.to_string().contains(what), "want {what:?}, got: {e:#}"),
        Ok(_) => panic!("want an error with {what:?}, got Ok"),
    }
}

/// Targeted damage to a two-level free-space tree (checksums made valid again, so the
/// structure checks are what catches it): a pointer out of the AG, a subtree reached twice
/// (what a cycle at the same level looks like), a pointer back up to the root (a cycle
/// through the levels), a wrong free count, an absurd depth.
#[test]
fn hostile_tree() {
    let v = Victim::new("tree", "-b size=1024", true);
    let f = File::open(&v.img).unwrap();
    bmr::fs::map::probe(&f, 0, LEN).unwrap().expect("intact");
    let ag = (0..v.agcount)
        .find(|&a| v.bno_root(a).1 >= 2)
        .expect("an AG with a two-level free-space tree");
    let (root, levels) = v.bno_root(ag);
    let hdr = 56;
    let ptrs = hdr + 8 * ((v.bs as usize - hdr) / 12);
    let off = v.block_off(ag, root);
    let bs = v.bs;
    let set =
        |b: &mut Vec<u8>, at: usize, val: u32| b[at..at + 4].copy_from_slice(&val.to_be_bytes());
    expect_err(
        v.probe_patched(off, bs, 52, |b| set(b, ptrs, 0xFFFF_FF00)),
        "outside the AG",
    );
    expect_err(
        v.probe_patched(off, bs, 52, |b| {
            let p0 = be32(b, ptrs);
            set(b, ptrs + 4, p0);
        }),
        "previous extent",
    );
    expect_err(
        v.probe_patched(off, bs, 52, |b| set(b, ptrs, root as u32)),
        &format!("expected {}", levels - 2),
    );
    let agf = v.agf_off(ag);
    expect_err(
        v.probe_patched(agf, v.sect, 216, |b| {
            let n = be32(b, 52);
            set(b, 52, n + 1);
        }),
        "header says",
    );
    expect_err(
        v.probe_patched(agf, v.sect, 216, |b| set(b, 28, 40)),
        "levels",
    );
    // Random flips in the root, in the first leaf and in the AGF.
    let leaf = u64::from(be32(&read_range(&v.img, off, bs), ptrs));
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut errors = 0;
    for i in 0..300 {
        let (o, len, crc) = match i % 3 {
            0 => (off, bs, 52),
            1 => (v.block_off(ag, leaf), bs, 52),
            _ => (agf, v.sect, 216),
        };
        let at = (next() % 512.min(len)) as usize;
        let val = next() as u8;
        if v.probe_patched(o, len, crc, |b| b[at] ^= val | 1).is_err() {
            errors += 1;
        }
    }
    assert!(
        errors > 30,
        "only {errors} of 300 damaged images were refused"
    );
}

/// Byte flips without checksums to hide behind (v4): superblock, every AGF, every tree root.
#[test]
fn hostile_v4_flips() {
    let v = Victim::new("v4", "-m crc=0", false);
    bmr::fs::map::probe(&File::open(&v.img).unwrap(), 0, LEN)
        .unwrap()
        .expect("intact");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut errors = 0;
    for i in 0..400u64 {
        let ag = next() % v.agcount;
        let (off, len) = match i % 3 {
            0 => (0, 256),
            1 => (v.agf_off(ag), 96),
            _ => (v.block_off(ag, v.bno_root(ag).0), 64),
        };
        let at = off + next() % len;
        let val = next() as u8 | 1;
        if v.probe_patched(at, 1, 0, |b| b[0] ^= val).is_err() {
            errors += 1;
        }
    }
    assert!(
        errors > 50,
        "only {errors} of 400 damaged images were refused"
    );
}

/// A truncated partition and a v5 superblock whose checksum fails.
#[test]
fn short_partition_and_bad_crc() {
    let v = Victim::new("short", "", false);
    let f = File::open(&v.img).unwrap();
    let e = bmr::fs::map::probe(&f, 0, LEN - MIB).expect_err("short");
    assert!(e.to_string().contains("larger than its partition"), "{e:#}");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&v.img)
        .unwrap();
    f.write_all_at(&[0x42], 200).unwrap();
    let e = bmr::fs::map::probe(&f, 0, LEN).expect_err("bad crc");
    assert!(e.to_string().contains("checksum"), "{e:#}");
}

/// Geometries filled through a protofile (no mount needed): 4 KiB sectors, 64 KiB blocks,
/// v4 with 512-byte blocks.
#[test]
fn v5_4k_sectors() {
    let fx = fixture("4ksect", "-s size=4096", false);
    check_map(&fx, "xfs v5", "4ksect");
}

#[test]
fn v5_64k_blocks() {
    let fx = fixture("64k", "-b size=65536", false);
    check_map(&fx, "xfs v5", "64k");
}

#[test]
fn v4_512_blocks() {
    let fx = fixture("v4-512", "-m crc=0 -b size=512", false);
    let (_, pc) = check_map(&fx, "xfs v4", "v4-512");
    round_trip(&fx, &pc, false);
}

/// Per-file metadata of a tree as find and getfattr show it, sorted: path, mode, owner, size,
/// mtime (ns), link count, and every extended attribute (ACLs included) in hex.
fn tree_meta(dir: &Path) -> String {
    sh(&format!(
        "cd {d} && find . -mindepth 1 -printf '%P %M %U %G %s %T@ %n\\n' | sort && \
         getfattr -R -h -d -m - -e hex . 2>/dev/null | \
         awk '/^# file: /{{f=substr($0,9); next}} NF{{print f, $0}}' | sort",
        d = dir.display()
    ))
}

/// The file list end to end: a backup of a GPT disk with an XFS partition makes one (no "no
/// file list" warning), `bmr ls` lists it and `bmr restore-files` brings back content, modes,
/// owners, mtimes, xattrs, ACLs and hard links.
#[test]
fn file_list_end_to_end() {
    let tmp = Tmp::new("xfs-files");
    let disk = tmp.path("disk.img");
    sh(&format!(
        "truncate -s {}M {d} && sgdisk -n 1:2048:+{PART_MIB}M -t 1:8300 {d} >/dev/null",
        PART_MIB + 2,
        d = disk.display()
    ));
    let lo = Loop::new(&disk, OFF, LEN, false);
    sh(&format!("mkfs.xfs -f -K -q {}", lo.0));
    let m = Mnt::new(&lo.0, &tmp.path("mnt"), "rw");
    let t = m.path().join("t");
    populate(&t, 11);
    sh(&format!(
        r#"cd {t}
        ln big.bin sub/big-hardlink
        ln -s "$(printf 'x%.0s' $(seq 900))" longlink
        mkdir big-dir; for i in $(seq 2500); do echo $i > big-dir/entry_number_$i; done
        setfattr -n user.a -v hello other/hello.txt
        setfattr -n trusted.t -v 0x00ff01 other/hello.txt
        setfattr -n security.s -v sec other/hello.txt
        setfattr -n user.big -v "$(head -c 6000 /dev/zero | tr '\0' q)" sub/mid.bin
        for i in $(seq 200); do setfattr -n user.key$i -v "value $i" sub/deeper/f1; done
        setfacl -m u:1234:rwx,g:55:r other/hello.txt
        setfacl -d -m u:1234:rx,g:7:rwx sub
        chown 1234:5678 sub/deeper/f2; chmod 4755 sub/deeper/f3
        args=(); for i in $(seq 0 199); do args+=(-c "pwrite -q $((i * 16384)) 4096"); done
        xfs_io -f "${{args[@]}}" frag
        truncate -s 20M sparse; echo tail >> sparse
        touch -d '2001-02-03 04:05:06.123456789' other/hello.txt
        "#,
        t = t.display()
    ));
    m.unmount();
    let m = Mnt::new(&lo.0, &tmp.path("mnt"), "ro");
    let want = tree_meta(&m.path().join("t"));
    assert!(want.contains("system.posix_acl_access") && want.contains("user.key200"));

    let repo = tmp.s("repo");
    let d = disk.display().to_string();
    let out = bmr(&["backup", "--repo", &repo, "--host", "h", "-q", &d]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("no file list"), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let manifest: serde_json::Value =
        serde_json::from_str(&sh(&format!("cat {repo}/hosts/h/snapshots/*.json"))).unwrap();
    let tocs = manifest["tocs"].as_array().unwrap();
    assert_eq!(tocs.len(), 1, "{manifest:#}");
    assert_eq!(tocs[0]["fstype"], "xfs");

    let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "h", "--part", "1", "/t"]);
    for name in [
        "big.bin", "sub", "other", "longlink", "big-dir", "frag", "sparse",
    ] {
        assert!(ls.contains(name), "{name} not in:\n{ls}");
    }
    let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "h", "--json", "/t/big-dir"]);
    assert!(ls.contains("entry_number_2500"), "{ls}");

    // Into another XFS: the host's ext4 has no room for 200 xattrs on one file.
    let target = tmp.path("target.img");
    sh(&format!("truncate -s {LEN} {}", target.display()));
    let lo2 = Loop::new(&target, 0, LEN, false);
    sh(&format!("mkfs.xfs -f -K -q {}", lo2.0));
    let tm = Mnt::new(&lo2.0, &tmp.path("restored"), "rw");
    let to = tm.path().to_path_buf();
    let to_s = to.display().to_string();
    bmr_ok(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "h",
        "--part",
        "1",
        "--to",
        &to_s,
        "/t",
    ]);
    sh(&format!(
        "diff -r --no-dereference {} {}/t",
        m.path().join("t").display(),
        to.display()
    ));
    let got = tree_meta(&to.join("t"));
    if got != want {
        let w: Vec<&str> = want.lines().collect();
        let g: Vec<&str> = got.lines().collect();
        let missing: Vec<_> = w.iter().filter(|l| !g.contains(l)).take(10).collect();
        let extra: Vec<_> = g.iter().filter(|l| !w.contains(l)).take(10).collect();
        panic!("restored tree differs:\nsource only: {missing:#?}\nrestored only: {extra:#?}");
    }
    let ino = |p: &str| sh(&format!("stat -c %i {}/t/{p}", to.display()));
    assert_eq!(ino("big.bin"), ino("sub/big-hardlink"));
    tm.unmount();
    m.unmount();
}

/// A dirty log: the backup completes, the partition is stored whole and the warning says it
/// has no file list; the reader refuses it on its own too.
#[test]
fn dirty_log_no_file_list() {
    let tmp = Tmp::new("xfs-dirty-toc");
    let disk = tmp.path("disk.img");
    sh(&format!(
        "truncate -s {}M {d} && sgdisk -n 1:2048:+{PART_MIB}M -t 1:8300 {d} >/dev/null",
        PART_MIB + 2,
        d = disk.display()
    ));
    let lo = Loop::new(&disk, OFF, LEN, false);
    sh(&format!("mkfs.xfs -f -K -q {}", lo.0));
    let m = Mnt::new(&lo.0, &tmp.path("mnt"), "rw");
    populate(&m.path().join("t"), 2);
    sh("sync");
    sh(&format!("xfs_io -x -c 'shutdown' {}", m.s()));
    m.unmount();
    let f = File::open(&disk).unwrap();
    let r = bmr::fs::read::FileRange {
        file: &f,
        base: OFF,
        len: LEN,
    };
    let e = bmr::fs::read::read_tree(&r, "xfs").expect_err("dirty log");
    assert!(e.to_string().contains("not cleanly unmounted"), "{e:#}");

    let repo = tmp.s("repo");
    let d = disk.display().to_string();
    let out = bmr(&["backup", "--repo", &repo, "--host", "h", "-q", &d]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not cleanly unmounted") && stderr.contains("no file list"),
        "{stderr}"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&sh(&format!("cat {repo}/hosts/h/snapshots/*.json"))).unwrap();
    assert!(
        manifest["tocs"].as_array().unwrap().is_empty(),
        "{manifest:#}"
    );
    let part = manifest["areas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["partition"] == 1)
        .unwrap();
    assert_eq!(part["content"], "whole", "{part:#}");
    let e = bmr_fails(&["ls", "--repo", &repo, "--host", "h"]);
    assert!(e.contains("no file list"), "{e}");
}
