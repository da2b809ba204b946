//! btrfs allocation maps checked against btrfs's own trees (`btrfs inspect-internal dump-tree`),
//! backups of btrfs partitions restored and verified with `btrfs check` and `btrfs scrub`, and
//! damaged filesystems that must give an error, never a panic or a hang.
//!
//! Needs root, loop devices, a kernel that mounts btrfs and btrfs-progs (scripts/deps.sh).
//! Fixtures mount with `nodiscard`: this kernel discards freed space by default, which would
//! turn a deleted file into zeros and hide a map that stored free space.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use bmr::fs::map::{FsInfo, UsedMap, probe, probe_uuid};
use common::*;

/// The big file written and deleted before each backup.
const DELETED_MIB: u64 = 200;
const PART_MIB: u64 = 640;

/// A mounted btrfs; unmounted on drop (declare it after its Loop).
struct BtrfsMount(PathBuf);

impl BtrfsMount {
    fn new(dev: &str, at: &Path, opts: &str) -> BtrfsMount {
        std::fs::create_dir_all(at).unwrap();
        // A restored copy has the source's fsid; the kernel remembers the detached source
        // device and may refuse the copy until it forgets it.
        sh("btrfs device scan --forget || true");
        sh(&format!("mount -t btrfs -o {opts} {dev} {}", at.display()));
        BtrfsMount(at.to_path_buf())
    }
}

impl Drop for BtrfsMount {
    fn drop(&mut self) {
        let _ = sh_status(&format!("umount {}", self.0.display()));
    }
}

/// CRC-32C, to re-checksum blocks the hostile tests patch (so the parser, not the checksum,
/// meets the damage).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn rd(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// What btrfs-progs says about a filesystem: its chunks, and every byte range that holds an
/// extent (data and tree blocks) or a tree block of the chunk, root and extent trees.
#[derive(Debug, Default)]
struct Oracle {
    fsid: String,
    nodesize: u64,
    sectorsize: u64,
    /// (logical, length, physical offset of every stripe)
    chunks: Vec<(u64, u64, Vec<u64>)>,
    /// (logical, length)
    extents: Vec<(u64, u64)>,
    /// Tree blocks printed: (logical, level, tree).
    blocks: Vec<(u64, u8, String)>,
}

impl Oracle {
    fn new(dev: &str) -> Oracle {
        let mut o = Oracle::default();
        for l in sh(&format!("btrfs inspect-internal dump-super {dev}")).lines() {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("fsid"), Some(v)) => o.fsid = v.to_string(),
                (Some("nodesize"), Some(v)) => o.nodesize = v.parse().unwrap(),
                (Some("sectorsize"), Some(v)) => o.sectorsize = v.parse().unwrap(),
                _ => {}
            }
        }
        assert!(o.nodesize > 0 && o.sectorsize > 0, "dump-super of {dev}");
        // Tree ids, which every btrfs-progs version takes: chunk, root, extent, block group.
        let mut trees = vec![("chunk", 3), ("root", 1), ("extent", 2)];
        let roots = sh(&format!("btrfs inspect-internal dump-tree -t 1 {dev}"));
        if roots.contains("(BLOCK_GROUP_TREE ROOT_ITEM") || roots.contains("(11 ROOT_ITEM") {
            trees.push(("block-group", 11));
        }
        for (tree, id) in trees {
            let out = sh(&format!("btrfs inspect-internal dump-tree -t {id} {dev}"));
            let mut chunk: Option<(u64, u64, Vec<u64>)> = None;
            for line in out.lines() {
                let t = line.trim();
                let w: Vec<&str> = t.split_whitespace().collect();
                if w.len() >= 4 && (w[0] == "leaf" || w[0] == "node") && w[2] != "flags" {
                    if let Ok(logical) = w[1].parse::<u64>() {
                        let level = if w[0] == "node" {
                            w[3].parse().unwrap()
                        } else {
                            0
                        };
                        o.blocks.push((logical, level, tree.to_string()));
                    }
                    continue;
                }
                if t.starts_with("item ") {
                    if let Some(c) = chunk.take() {
                        o.chunks.push(c);
                    }
                    let Some(k) = t.split_once("key (").and_then(|(_, r)| r.split_once(')')) else {
                        continue;
                    };
                    let k: Vec<&str> = k.0.split_whitespace().collect();
                    match k[1] {
                        "CHUNK_ITEM" if tree == "chunk" => {
                            chunk = Some((k[2].parse().unwrap(), 0, Vec::new()));
                        }
                        "EXTENT_ITEM" if tree == "extent" => {
                            o.extents
                                .push((k[0].parse().unwrap(), k[2].parse().unwrap()));
                        }
                        "METADATA_ITEM" if tree == "extent" => {
                            o.extents.push((k[0].parse().unwrap(), o.nodesize));
                        }
                        _ => {}
                    }
                    continue;
                }
                if let Some(c) = chunk.as_mut() {
                    if w.first() == Some(&"length") {
                        c.1 = w[1].parse().unwrap();
                    }
                    if w.first() == Some(&"stripe") && w.get(4) == Some(&"offset") {
                        c.2.push(w[5].parse().unwrap());
                    }
                }
            }
            if let Some(c) = chunk.take() {
                o.chunks.push(c);
            }
        }
        assert!(!o.chunks.is_empty() && !o.extents.is_empty(), "{o:?}");
        for &(l, _, _) in &o.blocks.clone() {
            o.extents.push((l, o.nodesize));
        }
        o
    }

    fn stripes(&self, logical: u64) -> (u64, &[u64]) {
        let c = self
            .chunks
            .iter()
            .find(|c| c.0 <= logical && logical < c.0 + c.1)
            .unwrap_or_else(|| panic!("logical {logical} is in no chunk"));
        (logical - c.0, &c.2)
    }

    /// Physical byte ranges that must be stored: the first MiB, the superblock copies, and
    /// every extent on every stripe. Returned as a per-sector bitmap over the partition.
    fn needed(&self, part_len: u64) -> Vec<bool> {
        let ss = self.sectorsize;
        let mut need = vec![false; part_len.div_ceil(ss) as usize];
        let mut mark = |off: u64, len: u64| {
            let end = (off + len).min(part_len);
            let mut s = off / ss;
            while s * ss < end {
                need[s as usize] = true;
                s += 1;
            }
        };
        mark(0, MIB);
        for m in [64 << 10, 64 << 20, 256 << 30] {
            if m < part_len {
                mark(m, 4096);
            }
        }
        for &(l, n) in &self.extents {
            let (within, stripes) = self.stripes(l);
            for &p in stripes {
                mark(p + within, n);
            }
        }
        need
    }
}

/// Every byte the oracle needs is marked used, and bmr marks at most 3% more; returns the
/// oracle's byte count.
fn check_against_oracle(name: &str, info: &FsInfo, o: &Oracle, part_len: u64) -> u64 {
    assert_eq!(info.fstype, "btrfs");
    assert_eq!(info.variant, None);
    assert_eq!(info.uuid.as_deref(), Some(o.fsid.as_str()), "{name}: uuid");
    assert_eq!(info.block_size, o.sectorsize);
    let need = o.needed(part_len);
    let mut missing = Vec::new();
    for (i, &n) in need.iter().enumerate() {
        let off = i as u64 * o.sectorsize;
        if n && !info.used.is_used(off) {
            missing.push(off);
        }
    }
    assert!(
        missing.is_empty(),
        "{name}: {} needed sectors not marked, first at {:?}",
        missing.len(),
        &missing[..missing.len().min(8)]
    );
    let oracle = need.iter().filter(|&&n| n).count() as u64 * o.sectorsize;
    let used = info.used.used_bytes();
    assert!(
        used <= oracle + oracle * 3 / 100,
        "{name}: bmr marks {used} bytes, the trees need {oracle}"
    );
    oracle
}

/// A copy of the partition holding only what the map calls used (the rest reads as zeros).
fn copy_used(src: &Path, offset: u64, len: u64, map: &UsedMap, dst: &Path) {
    let s = File::open(src).unwrap();
    let d = File::create(dst).unwrap();
    d.set_len(len).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for (off, n) in map.used_ranges(0, len) {
        let mut done = 0;
        while done < n {
            let k = (n - done).min(MIB) as usize;
            s.read_exact_at(&mut buf[..k], offset + off + done).unwrap();
            d.write_all_at(&buf[..k], off + done).unwrap();
            done += k as u64;
        }
    }
}

fn probe_file(p: &Path, offset: u64, len: u64) -> anyhow::Result<Option<FsInfo>> {
    probe(&File::open(p).unwrap(), offset, len)
}

/// Files, a subvolume, a read-only snapshot and changes after it (so the snapshot shares some
/// extents and owns others), then a big file written, synced and deleted.
fn fill(mnt: &Path) {
    let m = mnt.display();
    populate(&mnt.join("files"), 1);
    sh(&format!(
        "yes 'bmr compressible line' | head -c 4000000 > {m}/files/text.txt && \
         btrfs subvolume create {m}/sv1 >/dev/null"
    ));
    populate(&mnt.join("sv1"), 2);
    sh(&format!(
        "btrfs subvolume snapshot -r {m} {m}/snap >/dev/null && \
         rm {m}/files/sub/mid.bin && echo after > {m}/files/after.txt && \
         head -c 100000 /dev/urandom | dd of={m}/files/big.bin bs=4096 seek=10 conv=notrunc status=none && \
         head -c {}M /dev/urandom > {m}/deleted.bin && sync && rm {m}/deleted.bin && \
         btrfs filesystem sync {m}",
        DELETED_MIB
    ));
}

/// df's used bytes once the deletion is committed.
fn settled_df(mnt: &Path) -> u64 {
    let m = mnt.display();
    for _ in 0..120 {
        sh(&format!("btrfs filesystem sync {m}"));
        let used: u64 = sh(&format!("df -B1 --output=used {m} | tail -1"))
            .trim()
            .parse()
            .unwrap();
        if used < DELETED_MIB * MIB / 2 {
            return used;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "the deleted file still counts in df:\n{}",
        sh(&format!("btrfs filesystem df {m}"))
    );
}

/// A GPT disk with one btrfs partition made with `mkfs_opts`, filled and unmounted; returns
/// the disk, a copy of its files, and df's used bytes.
fn btrfs_disk(tmp: &Tmp, mkfs_opts: &str, mount_opts: &str, rootdir: bool) -> (PathBuf, u64) {
    let disk = tmp.path("src.img");
    sh(&format!(
        "truncate -s {}M {d} && sgdisk -n 1:2048:+{PART_MIB}M -t 1:8300 {d} >/dev/null",
        PART_MIB + 2,
        d = disk.display()
    ));
    let root_arg = if rootdir {
        let dir = tmp.path("rootdir");
        populate(&dir, 7);
        format!("--rootdir {}", dir.display())
    } else {
        String::new()
    };
    let lo = Loop::new(&disk, MIB, PART_MIB * MIB, false);
    sh(&format!(
        "mkfs.btrfs -q -f -K {mkfs_opts} {root_arg} {}",
        lo.0
    ));
    let mnt = tmp.path("mnt");
    let m = BtrfsMount::new(&lo.0, &mnt, &format!("nodiscard{mount_opts}"));
    fill(&mnt);
    let df = settled_df(&mnt);
    eprintln!(
        "btrfs filesystem df:\n{}",
        sh(&format!("btrfs filesystem df {}", mnt.display()))
    );
    let reference = tmp.path("ref");
    std::fs::create_dir_all(&reference).unwrap();
    sh(&format!(
        "cp -a {}/. {}/",
        mnt.display(),
        reference.display()
    ));
    drop(m);
    drop(lo);
    (disk, df)
}

/// Build, map, back up, restore and verify one fixture.
fn round_trip(name: &str, mkfs_opts: &str, mount_opts: &str, rootdir: bool) {
    let tmp = Tmp::new(&format!("btrfs-{name}"));
    let (disk, df) = btrfs_disk(&tmp, mkfs_opts, mount_opts, rootdir);
    let (start, len) = (MIB, PART_MIB * MIB);

    let oracle = {
        let lo = Loop::new(&disk, start, len, true);
        Oracle::new(&lo.0)
    };
    let info = probe_file(&disk, start, len)
        .unwrap()
        .expect("btrfs not recognised");
    let need = check_against_oracle(name, &info, &oracle, len);
    let used = info.used.used_bytes();
    assert!(
        used < DELETED_MIB * MIB / 2,
        "{name}: {used} bytes used: the deleted file was stored"
    );
    // The deleted file's data is still on the source disk (nodiscard), so leaving it out
    // above was the map's doing.
    let allocated: u64 = sh(&format!("du -B1 {} | cut -f1", disk.display()))
        .trim()
        .parse()
        .unwrap();
    assert!(
        allocated > used + DELETED_MIB * MIB * 9 / 10,
        "{name}: only {allocated} bytes of the source image hold data: the deleted file was discarded"
    );

    let repo = tmp.s("repo");
    let out = bmr(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h",
        "-q",
        &disk.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "backup failed: {stderr}");
    assert!(!stderr.contains("stored whole"), "{stderr}");
    let m: serde_json::Value =
        serde_json::from_str(&sh(&format!("cat {repo}/hosts/h/snapshots/*.json"))).unwrap();
    let area = m["areas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["partition"] == 1)
        .unwrap()
        .clone();
    assert_eq!(area["content"], "used-blocks", "{area:#}");
    assert_eq!(area["fs"]["fstype"], "btrfs", "{area:#}");
    assert_eq!(area["used_bytes"].as_u64(), Some(used));
    let list: serde_json::Value =
        serde_json::from_str(&bmr_ok(&["list", "--repo", &repo, "--json"])).unwrap();
    let listed = list[0]["snapshots"][0]["used_bytes"].as_u64().unwrap();
    eprintln!(
        "MEASURED {name}: bmr partition {used} bytes, bmr list {listed}, df used {df}, tree oracle {need}, source image data {allocated}"
    );
    assert!(
        listed <= df + df * 3 / 100,
        "{name}: bmr stores {listed} bytes, df says {df} are used"
    );

    let restored = tmp.path("restored.img");
    bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "h",
        "--target",
        &restored.display().to_string(),
        "--verify",
        "-q",
    ]);
    // Every needed byte came back as it was.
    let (s, d) = (File::open(&disk).unwrap(), File::open(&restored).unwrap());
    for (i, n) in oracle.needed(len).iter().enumerate() {
        if *n {
            let off = start + i as u64 * oracle.sectorsize;
            let k = oracle.sectorsize as usize;
            assert!(
                rd(&s, off, k) == rd(&d, off, k),
                "{name}: bytes at {off} differ"
            );
        }
    }
    let lo = Loop::new(&restored, start, len, true);
    let (ok, out) = sh_status(&format!(
        "btrfs check --readonly --check-data-csum {}",
        lo.0
    ));
    assert!(ok, "{name}: btrfs check of the restored partition:\n{out}");
    let mnt = tmp.path("restored-mnt");
    let mnt_guard = BtrfsMount::new(&lo.0, &mnt, "ro");
    let (ok, out) = sh_status(&format!("btrfs scrub start -B -r {}", mnt.display()));
    assert!(
        ok && out.contains("no errors found"),
        "{name}: scrub of the restored partition:\n{out}"
    );
    sh(&format!(
        "diff -r --no-dereference {} {}",
        tmp.path("ref").display(),
        mnt.display()
    ));
    drop(mnt_guard);
    drop(lo);
    let _ = sh_status("btrfs device scan --forget");
}

#[test]
fn default_mkfs() {
    round_trip("default", "-L bmrlabel", "", false);
}

#[test]
fn metadata_single() {
    round_trip("msingle", "-m single", "", false);
}

#[test]
fn metadata_dup_data_single() {
    round_trip("mdup", "-m dup -d single", "", false);
}

#[test]
fn rootdir() {
    round_trip("rootdir", "", "", true);
}

#[test]
fn zstd_compressed() {
    round_trip("zstd", "", ",compress=zstd", false);
}

/// An image file made by mkfs.btrfs --rootdir (no mount): the map covers the trees, and the
/// used bytes alone make a filesystem btrfs check (with data checksums) finds clean.
/// `then` runs on the image afterwards (IMG is its path).
fn image_case(
    name: &str,
    opts: &str,
    then: &str,
    size_mib: u64,
    files: u32,
) -> (Tmp, PathBuf, FsInfo) {
    let tmp = Tmp::new(&format!("btrfs-img-{name}"));
    let dir = tmp.path("tree");
    populate(&dir, 3);
    if files > 0 {
        sh(&format!(
            "mkdir -p {d}/many && for i in $(seq 1 {files}); do head -c 5000 /dev/urandom > {d}/many/f$i; done",
            d = dir.display()
        ));
    }
    let img = tmp.path("fs.img");
    sh(&format!(
        "truncate -s {size_mib}M {i} && mkfs.btrfs -q -f -K {opts} --rootdir {d} {i}",
        i = img.display(),
        d = dir.display()
    ));
    if !then.is_empty() {
        sh(&then.replace("IMG", &img.display().to_string()));
    }
    let len = size_mib * MIB;
    let info = probe_file(&img, 0, len).unwrap().expect("btrfs");
    let oracle = Oracle::new(&img.display().to_string());
    let need = check_against_oracle(name, &info, &oracle, len);
    eprintln!(
        "MEASURED image {name}: bmr {} bytes, tree oracle {need}",
        info.used.used_bytes()
    );
    let copy = tmp.path("copy.img");
    copy_used(&img, 0, len, &info.used, &copy);
    let (ok, out) = sh_status(&format!(
        "btrfs check --readonly --check-data-csum {}",
        copy.display()
    ));
    assert!(ok, "{name}: btrfs check of the used bytes alone:\n{out}");
    (tmp, img, info)
}

#[test]
fn image_variants() {
    image_case("xxhash", "--csum xxhash", "", 256, 0);
    image_case("sha256", "--csum sha256", "", 256, 0);
    image_case("blake2", "--csum blake2", "", 256, 0);
    image_case("mixed", "-M", "", 256, 0);
    // Tree blocks as EXTENT_ITEMs (with their length) instead of METADATA_ITEMs.
    image_case("noskinny", "-O ^skinny-metadata", "", 256, 0);
    // A changed fsid: tree blocks keep carrying the old one, as metadata_uuid.
    image_case("metadata-uuid", "", "btrfstune -f -m IMG", 256, 0);
    // Small nodes and many files: trees with interior nodes.
    let (_t, img, _) = image_case("nodes4k", "-n 4096", "", 256, 600);
    let o = Oracle::new(&img.display().to_string());
    assert!(
        o.blocks.iter().any(|b| b.1 > 0 && b.2 == "extent"),
        "the extent tree has no interior node"
    );
}

#[test]
fn uuid_and_label_as_blkid_says() {
    let tmp = Tmp::new("btrfs-uuid");
    let img = tmp.path("fs.img");
    sh(&format!(
        "truncate -s 200M {i} && mkfs.btrfs -q -K -L 'my label' {i}",
        i = img.display()
    ));
    let q = |tag: &str| sh(&format!("blkid -p -o value -s {tag} {}", img.display()));
    let info = probe_file(&img, 0, 200 * MIB).unwrap().unwrap();
    assert_eq!(info.uuid.as_deref(), Some(q("UUID").trim()));
    assert_eq!(info.label.as_deref(), Some("my label"));
    assert_eq!(
        probe_uuid(&File::open(&img).unwrap()).as_deref(),
        Some(q("UUID").trim())
    );
    let id = bmr::fs::id::identify(&img).unwrap();
    assert_eq!(
        (id.fstype.as_str(), id.label.as_str()),
        ("btrfs", "my label")
    );
    assert_eq!(Some(id.uuid), info.uuid);
}

#[test]
fn multi_device_is_refused() {
    let tmp = Tmp::new("btrfs-multi");
    let (a, b) = (tmp.path("a.img"), tmp.path("b.img"));
    sh(&format!(
        "truncate -s 200M {a} {b} && mkfs.btrfs -q -f -K -d single -m single {a} {b}",
        a = a.display(),
        b = b.display()
    ));
    for p in [&a, &b] {
        let e = probe_file(p, 0, 200 * MIB).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("btrfs at offset 0: ") && msg.contains("spans 2 devices"),
            "{msg}"
        );
    }
    let _ = sh_status("btrfs device scan --forget");
}

/// Overwrites `bytes` at each of `offs`, probes with a watchdog, puts the old bytes back.
fn probe_patched(
    img: &Path,
    len: u64,
    patches: &[(u64, Vec<u8>)],
) -> anyhow::Result<Option<FsInfo>> {
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let orig: Vec<Vec<u8>> = patches.iter().map(|(o, b)| rd(&f, *o, b.len())).collect();
    for (o, b) in patches {
        f.write_all_at(b, *o).unwrap();
    }
    let g = f.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(probe(&g, 0, len));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("probe hung or panicked");
    for ((o, _), b) in patches.iter().zip(orig) {
        f.write_all_at(&b, *o).unwrap();
    }
    r
}

/// The block at `phys` with `edit` applied and its crc32c recomputed.
fn edited(f: &File, phys: u64, size: usize, edit: &dyn Fn(&mut [u8])) -> Vec<u8> {
    let mut b = rd(f, phys, size);
    edit(&mut b);
    let c = crc32c(&b[32..]);
    b[..32].fill(0);
    b[..4].copy_from_slice(&c.to_le_bytes());
    b
}

const SB: u64 = 0x10000;

fn expect_err(r: anyhow::Result<Option<FsInfo>>, needle: &str) {
    match r {
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.starts_with("btrfs at offset 0: ")
                    && msg.contains(needle)
                    && !msg.contains('\n'),
                "{msg}"
            );
        }
        Ok(_) => panic!("expected an error containing {needle:?}"),
    }
}

#[test]
fn hostile_input() {
    let tmp = Tmp::new("btrfs-hostile");
    let dir = tmp.path("tree");
    sh(&format!(
        "mkdir -p {d} && for i in $(seq 1 600); do head -c 5000 /dev/urandom > {d}/f$i; done",
        d = dir.display()
    ));
    let img = tmp.path("fs.img");
    let len = 256 * MIB;
    sh(&format!(
        "truncate -s 256M {i} && mkfs.btrfs -q -f -K -n 4096 -m dup --rootdir {d} {i}",
        i = img.display(),
        d = dir.display()
    ));
    let base = probe_file(&img, 0, len).unwrap().unwrap();
    let o = Oracle::new(&img.display().to_string());
    let f = File::open(&img).unwrap();
    let ns = o.nodesize as usize;
    let copies = |logical: u64| -> Vec<u64> {
        let (within, s) = o.stripes(logical);
        s.iter().map(|p| p + within).collect()
    };
    let sb_patch = |edit: &dyn Fn(&mut [u8])| vec![(SB, edited(&f, SB, 4096, edit))];
    let node_patch = |logical: u64, edit: &dyn Fn(&mut [u8])| -> Vec<(u64, Vec<u8>)> {
        copies(logical)
            .into_iter()
            .map(|p| (p, edited(&f, p, ns, edit)))
            .collect()
    };

    // Each check with the checksum made right, so the structure check must catch it.
    expect_err(
        probe_patched(
            &img,
            len,
            &sb_patch(&|b| b[0x60..0x68].copy_from_slice(&123u64.to_le_bytes())),
        ),
        "not cleanly unmounted",
    );
    expect_err(
        probe_patched(&img, len, &sb_patch(&|b| b[0x88] = 2)),
        "spans 2 devices",
    );
    expect_err(
        probe_patched(
            &img,
            len,
            &sb_patch(&|b| b[0x50..0x58].copy_from_slice(&(1u64 << 50).to_le_bytes())),
        ),
        "lies in no chunk",
    );
    expect_err(
        probe_patched(&img, len, &[(SB + 0x100, vec![0xff])]),
        "superblock checksum mismatch",
    );
    // The first system chunk's first stripe moved past the end of the device.
    expect_err(
        probe_patched(
            &img,
            len,
            &sb_patch(&|b| {
                let o = 0x32b + 17 + 48 + 8;
                b[o..o + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            }),
        ),
        "beyond the end of the device",
    );
    expect_err(
        probe_patched(
            &img,
            len,
            &sb_patch(&|b| {
                let o = 0x32b + 17 + 24;
                b[o] |= 0x80; // RAID5
            }),
        ),
        "striped profile",
    );

    // The extent tree's interior node: a child pointer to itself, then two to one child.
    let &(node, _, _) = o
        .blocks
        .iter()
        .find(|b| b.1 == 1 && b.2 == "extent")
        .expect("an interior extent tree node");
    let ptr = |i: usize| 101 + i * 33;
    let self_loop = node_patch(node, &|b| {
        let p = ptr(1) + 17;
        let generation = le64(b, 0x50);
        b[p..p + 8].copy_from_slice(&node.to_le_bytes());
        b[p + 8..p + 16].copy_from_slice(&generation.to_le_bytes());
    });
    expect_err(probe_patched(&img, len, &self_loop), "reached twice");
    let shared = node_patch(node, &|b| {
        let (p0, p1) = (ptr(0) + 17, ptr(1) + 17);
        let first: Vec<u8> = b[p0..p0 + 16].to_vec();
        b[p1..p1 + 16].copy_from_slice(&first);
    });
    expect_err(probe_patched(&img, len, &shared), "reached twice");
    let outside = node_patch(node, &|b| {
        let p = ptr(0) + 17;
        b[p..p + 8].copy_from_slice(&(1u64 << 45).to_le_bytes());
    });
    expect_err(probe_patched(&img, len, &outside), "lies in no chunk");
    // Only the first DUP copy damaged (checksum left wrong): read from the second.
    let first = copies(node)[0];
    let r = probe_patched(&img, len, &[(first + 200, vec![0x5a; 64])])
        .unwrap()
        .unwrap();
    assert_eq!(r.used.used_bytes(), base.used.used_bytes());

    // Random byte flips, re-checksummed: any answer but a panic or a hang.
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut errors = 0;
    let sys_len = u32::from_le_bytes(rd(&f, SB + 0xa0, 4).try_into().unwrap()) as u64;
    for round in 0..600 {
        let v = next() as u8 | 1;
        let patch = if round % 2 == 0 {
            // Mostly the system chunk array, sometimes anywhere in the superblock.
            let off = if round % 6 == 0 {
                0x20 + next() % (4096 - 0x20)
            } else {
                0x32b + next() % sys_len.max(1)
            } as usize;
            sb_patch(&move |b| b[off] ^= v)
        } else {
            let (l, _, _) = o.blocks[(next() % o.blocks.len() as u64) as usize].clone();
            let off = if round % 3 == 0 {
                0x20 + next() % (ns as u64 - 0x20)
            } else {
                0x20 + next() % 0x300
            } as usize;
            let mut p = node_patch(l, &move |b| b[off] ^= v);
            if round % 5 == 0 {
                p.truncate(1);
            }
            p
        };
        if probe_patched(&img, len, &patch).is_err() {
            errors += 1;
        }
    }
    eprintln!("MEASURED hostile: {errors} of 600 damaged filesystems gave an error");
    assert!(
        errors > 100,
        "only {errors} of 600 damaged filesystems gave an error"
    );
    // Nothing was left changed.
    assert_eq!(
        probe_file(&img, 0, len).unwrap().unwrap().used.used_bytes(),
        base.used.used_bytes()
    );
}

/// mountinfo shows btrfs with an anonymous device number: the backup must still see that the
/// disk's btrfs is mounted read-write (its trees change under a used-blocks image).
#[test]
fn mounted_btrfs_is_in_use() {
    let tmp = Tmp::new("btrfs-live");
    let disk = tmp.path("disk.img");
    sh(&format!(
        "truncate -s 260M {d} && sgdisk -n 1:2048:+256M -t 1:8300 {d} >/dev/null",
        d = disk.display()
    ));
    let lo = Loop::new(&disk, MIB, 256 * MIB, false);
    sh(&format!("mkfs.btrfs -q -f -K {}", lo.0));
    let mnt = tmp.path("mnt");
    let m = BtrfsMount::new(&lo.0, &mnt, "nodiscard");
    let err = bmr_fails(&[
        "backup",
        "--repo",
        &tmp.s("repo"),
        "--host",
        "h",
        &disk.display().to_string(),
    ]);
    assert!(err.contains("mounted read-write"), "{err}");
    drop(m);
    drop(lo);
}

/// An image copied after an fsync and before the next commit holds a log tree: refused.
#[test]
fn fsync_log_is_refused() {
    let tmp = Tmp::new("btrfs-log");
    let img = tmp.path("fs.img");
    sh(&format!("truncate -s 256M {}", img.display()));
    let lo = Loop::new(&img, 0, 256 * MIB, false);
    sh(&format!("mkfs.btrfs -q -f -K {}", lo.0));
    let mnt = tmp.path("mnt");
    let m = BtrfsMount::new(&lo.0, &mnt, "nodiscard,commit=300");
    let copy = tmp.path("crashed.img");
    sh(&format!(
        "btrfs filesystem sync {m} && \
         python3 -c \"import os; f = open('{m}/x', 'wb'); f.write(b'a' * 100000); f.flush(); os.fsync(f.fileno())\" && \
         cp {i} {c}",
        m = mnt.display(),
        i = img.display(),
        c = copy.display()
    ));
    drop(m);
    drop(lo);
    let log_root = le64(&rd(&File::open(&copy).unwrap(), SB + 0x60, 8), 0);
    assert_ne!(log_root, 0, "the copy has no log tree");
    let e = probe_file(&copy, 0, 256 * MIB).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("not cleanly unmounted") && msg.contains("mount and unmount it"),
        "{msg}"
    );
    // Unmounted cleanly, the same filesystem maps.
    assert!(probe_file(&img, 0, 256 * MIB).unwrap().is_some());
}

/// A GPT disk with one btrfs partition of `mib` MiB, mounted with `opts` while `script` runs
/// in it, then unmounted.
fn btrfs_disk_with(tmp: &Tmp, mib: u64, opts: &str, script: &str) -> PathBuf {
    let disk = tmp.path("src.img");
    sh(&format!(
        "truncate -s {}M {d} && sgdisk -n 1:2048:+{mib}M -t 1:8300 {d} >/dev/null",
        mib + 2,
        d = disk.display()
    ));
    let lo = Loop::new(&disk, MIB, mib * MIB, false);
    sh(&format!("mkfs.btrfs -q -f {}", lo.0));
    let mnt = tmp.path("mnt");
    let m = BtrfsMount::new(&lo.0, &mnt, opts);
    sh(&format!(
        "set +o pipefail; cd {m} && {}",
        script,
        m = mnt.display()
    ));
    drop(m);
    drop(lo);
    disk
}

/// Metadata as the kernel shows it, for comparing a restored tree with its source.
fn stat_tree(dir: &Path) -> String {
    sh(&format!(
        "cd {} && find . -mindepth 1 | LC_ALL=C sort | while read -r p; do \
           stat -c '%n %F %a %u %g %.9Y' \"$p\"; [ -d \"$p\" ] || stat -c %s \"$p\"; \
           getfattr -h -d -m - --absolute-names \"$p\" 2>/dev/null | grep -v '^#' | LC_ALL=C sort; \
           [ -L \"$p\" ] || getfacl -cp \"$p\" 2>/dev/null | LC_ALL=C sort; \
         done",
        dir.display()
    ))
}

/// The backup of a compressed btrfs with subvolumes has a file list: `bmr ls` shows the
/// subvolumes and their files, `bmr restore-files` brings back compressed, inline and sparse
/// files and whole subtrees as they were.
#[test]
fn file_list_ls_and_restore_files() {
    let tmp = Tmp::new("btrfs-files");
    let disk = btrfs_disk_with(
        &tmp,
        320,
        "nodiscard,compress=zstd",
        r#"btrfs -q subvolume create @ && btrfs -q subvolume create @home && \
        btrfs -q subvolume create @home/nested && \
        cd @ && yes 'compressible text for bmr' | head -c 3000000 > big.txt && \
        echo small > small && printf 'z%.0s' $(seq 1500) > inline && \
        yes 'overwritten' | head -c 800000 > over.txt && sync && \
        head -c 8192 /dev/urandom | dd of=over.txt bs=4096 seek=40 conv=notrunc status=none && \
        truncate -s 5M sparse && printf tail | dd of=sparse bs=1 seek=4000000 conv=notrunc status=none && \
        head -c 200000 /dev/urandom > random.bin && \
        ln small hard && mkdir -p etc/deep && echo conf > etc/deep/conf && ln -s ../small etc/link && \
        setfattr -n user.note -v hello small && setfacl -m u:1234:rwx,g:55:r etc/deep/conf && \
        setfacl -d -m u:99:rx etc && chown 1234:5678 etc/deep/conf && chmod 640 etc/deep/conf && \
        touch -d '2003-04-05 06:07:08.5' big.txt inline && cd .. && \
        mkdir -p @home/user && yes home | head -c 300000 > @home/user/doc && \
        echo nested > @home/nested/inner && btrfs -q subvolume snapshot -r @ @snap && sync"#,
    );
    let repo = tmp.s("repo");
    let out = bmr(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h",
        "-q",
        &disk.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "backup failed: {stderr}");
    assert!(
        !stderr.contains("no file list") && !stderr.contains("warning"),
        "{stderr}"
    );

    let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "h", "/"]);
    for sv in [
        "\"@\" [subvolume",
        "\"@home\" [subvolume",
        "\"@snap\" [subvolume",
    ] {
        assert!(ls.contains(sv), "{sv} missing from:\n{ls}");
    }
    let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "h", "/@"]);
    assert!(
        ls.contains("\"big.txt\"") && ls.contains("\"sparse\""),
        "{ls}"
    );
    assert!(ls.contains(" 3000000 "), "{ls}");
    let ls = bmr_ok(&["ls", "--repo", &repo, "--host", "h", "/@home"]);
    assert!(
        ls.contains("\"user\"") && ls.contains("\"nested\" [subvolume"),
        "{ls}"
    );

    let to = tmp.path("out");
    bmr_ok(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "h",
        "--to",
        &to.display().to_string(),
        "/@",
        "/@home/user",
        "/@snap/over.txt",
    ]);
    let lo = Loop::new(&disk, MIB, 320 * MIB, true);
    let mnt = tmp.path("src-mnt");
    let m = BtrfsMount::new(&lo.0, &mnt, "ro,subvolid=5");
    for sub in ["@", "@home/user"] {
        sh(&format!(
            "diff -r --no-dereference {}/{sub} {}/{sub}",
            mnt.display(),
            to.display()
        ));
        assert_eq!(stat_tree(&mnt.join(sub)), stat_tree(&to.join(sub)), "{sub}");
    }
    sh(&format!(
        "cmp {m}/@snap/over.txt {t}/@snap/over.txt && cmp {m}/@/over.txt {t}/@/over.txt",
        m = mnt.display(),
        t = to.display()
    ));
    let ino = |p: &str| sh(&format!("stat -c %i {}/{p}", to.display()));
    assert_eq!(ino("@/small"), ino("@/hard"), "hard link not linked");
    // The sparse file came back sparse.
    let blocks: u64 = sh(&format!("stat -c %b {}/@/sparse", to.display()))
        .trim()
        .parse()
        .unwrap();
    assert!(blocks < 100, "sparse file takes {blocks} blocks");
    drop(m);
    drop(lo);
}

/// A filesystem copied with a log tree pending (after an fsync) is stored whole, with the
/// warning that it has no file list; the backup completes.
#[test]
fn log_tree_gets_no_file_list() {
    let tmp = Tmp::new("btrfs-log-toc");
    let disk = tmp.path("src.img");
    sh(&format!(
        "truncate -s 258M {d} && sgdisk -n 1:2048:+256M -t 1:8300 {d} >/dev/null",
        d = disk.display()
    ));
    let lo = Loop::new(&disk, MIB, 256 * MIB, false);
    sh(&format!("mkfs.btrfs -q -f {}", lo.0));
    let mnt = tmp.path("mnt");
    let m = BtrfsMount::new(&lo.0, &mnt, "nodiscard,commit=300");
    let copy = tmp.path("crashed.img");
    sh(&format!(
        "echo before > {m}/f && btrfs filesystem sync {m} && \
         python3 -c \"import os; f = open('{m}/x', 'wb'); f.write(b'a' * 100000); f.flush(); os.fsync(f.fileno())\" && \
         cp --sparse=always {d} {c}",
        m = mnt.display(),
        d = disk.display(),
        c = copy.display()
    ));
    drop(m);
    drop(lo);
    let log_root = le64(&rd(&File::open(&copy).unwrap(), MIB + SB + 0x60, 8), 0);
    assert_ne!(log_root, 0, "the copy has no log tree");
    let repo = tmp.s("repo");
    let out = bmr(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h",
        "-q",
        &copy.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "backup failed: {stderr}");
    assert!(
        stderr.contains("no file list") && stderr.contains("log tree"),
        "{stderr}"
    );
    let err = bmr_fails(&["ls", "--repo", &repo, "--host", "h", "/"]);
    assert!(err.contains("no file lists"), "{err}");
    // The image is there: restored, it mounts and replays its log.
    let restored = tmp.path("restored.img");
    bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "h",
        "--target",
        &restored.display().to_string(),
        "--verify",
        "-q",
    ]);
    let lo = Loop::new(&restored, MIB, 256 * MIB, false);
    let rm = tmp.path("restored-mnt");
    let m = BtrfsMount::new(&lo.0, &rm, "nodiscard");
    assert_eq!(std::fs::read(rm.join("x")).unwrap(), vec![b'a'; 100000]);
    drop(m);
    drop(lo);
}
