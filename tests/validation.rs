//! The whole restore plan is validated before anything is created or written: a damaged or
//! forged partition table, chunk index or file list, a damaged chunk, and a target through
//! which the repository itself would be overwritten each end in one error line with the
//! target untouched (a missing target stays missing). Hostile inputs are crafted from a real
//! backup with python3 and the zstd tool.

mod common;
use common::*;
use std::path::{Path, PathBuf};

struct Fixture {
    tmp: Tmp,
    disk: PathBuf,
    repo: String,
}

fn fixture(name: &str) -> Fixture {
    let tmp = Tmp::new(name);
    let dir = tmp.path("tree");
    populate(&dir, 3);
    // A 200-byte name: the file-list test stretches it past NAME_MAX.
    sh(&format!(
        "echo long > {}/{}",
        dir.display(),
        "n".repeat(200)
    ));
    let disk = ext_disk(&tmp, 40, 24, "", &dir);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h1",
        "-q",
        &disk.display().to_string(),
    ]);
    Fixture { tmp, disk, repo }
}

impl Fixture {
    /// A target file of `size` bytes filled with a pattern, so any write shows.
    fn target(&self, name: &str, size: u64) -> PathBuf {
        let t = self.tmp.path(name);
        sh(&format!(
            "head -c {size} /dev/zero | tr '\\0' '\\125' > {}",
            t.display()
        ));
        t
    }

    fn restore_args<'a>(&'a self, t: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "restore", "--repo", &self.repo, "--host", "h1", "--target", t, "-q", "--yes",
        ];
        args.extend_from_slice(extra);
        args
    }

    /// The restore fails with one error line containing `want`, leaves `target` as it was and
    /// does not create a missing target; returns the error line.
    fn refused(&self, target: &Path, extra: &[&str], want: &str) -> String {
        let before = target.exists().then(|| sha_file(target));
        let t = target.display().to_string();
        let e = bmr_fails(&self.restore_args(&t, extra));
        assert!(e.contains(want), "expected {want:?} in: {e}");
        match before {
            Some(b) => assert_eq!(sha_file(target), b, "target changed: {e}"),
            None => assert!(!target.exists(), "missing target was created: {e}"),
        }
        e
    }

    fn snapshots(&self) -> PathBuf {
        PathBuf::from(format!("{}/hosts/h1/snapshots", self.repo))
    }

    /// The image's manifest (the only .json with "kind": "image").
    fn image_manifest(&self) -> PathBuf {
        let out = sh(&format!(
            "grep -l '\"kind\": \"image\"' {}/*.json",
            self.snapshots().display()
        ));
        PathBuf::from(out.lines().next().unwrap())
    }

    /// Run a python3 script with the manifest path as argv[1] (json imported as `json`,
    /// the loaded manifest as `m`; the script changes `m`, which is written back).
    fn edit_manifest(&self, manifest: &Path, code: &str) {
        let script = self.tmp.path("edit.py");
        std::fs::write(
            &script,
            format!(
                "import json, sys\nman_path = sys.argv[1]\nm = json.load(open(man_path))\n{code}\njson.dump(m, open(man_path, 'w'), indent=1)\n"
            ),
        )
        .unwrap();
        sh(&format!(
            "python3 {} {}",
            script.display(),
            manifest.display()
        ));
    }

    /// Every chunk file of the repository.
    fn chunks(&self) -> Vec<PathBuf> {
        sh(&format!("find {}/chunks -type f | sort", self.repo))
            .lines()
            .map(PathBuf::from)
            .collect()
    }
}

fn flip_byte(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let off = 48 + (len - 48) / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, off).unwrap();
}

/// Decode a chunk index, keep the records `keep` (python expression over the list `recs` of
/// raw record bytes), encode it again with a true end count, and rewrite the manifest's
/// hash and length (and with `count`, its record count) to match.
const INDEX_PY: &str = r#"
import hashlib, json, struct, subprocess, sys
man, keep, count = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
m = json.load(open(man))
idx = man[:-len(".json")] + ".idx"
raw = subprocess.run(["zstd", "-dc", idx], check=True, capture_output=True).stdout
assert raw[:8] == b"BMRIDX\x00\x01"
pos, recs = 8, []
while True:
    start = pos
    area, off, ln, kind = struct.unpack_from("<IQIB", raw, pos)
    pos += 17
    if kind == 0xFF:
        break
    if kind == 1:
        pos += 32 + 4 + 32
    (n,) = struct.unpack_from("<I", raw, pos)
    pos += 4 + 8 * n
    recs.append(raw[start:pos])
recs = eval(keep)
plain = b"BMRIDX\x00\x01" + b"".join(recs) + struct.pack("<IQIB", 0xFFFFFFFF, 0, 0, 0xFF) + struct.pack("<Q", len(recs))
out = subprocess.run(["zstd", "-q", "-c"], input=plain, check=True, capture_output=True).stdout
open(idx, "wb").write(out)
m["index"]["sha256"] = hashlib.sha256(out).hexdigest()
m["index"]["len"] = len(out)
if count:
    m["index"]["records"] = len(recs)
json.dump(m, open(man, "w"), indent=1)
"#;

fn edit_index(f: &Fixture, keep: &str, count: bool) {
    let script = f.tmp.path("index.py");
    std::fs::write(&script, INDEX_PY).unwrap();
    sh(&format!(
        "python3 {} {} {} {}",
        script.display(),
        f.image_manifest().display(),
        shell_quote(keep),
        if count { 1 } else { 0 }
    ));
}

#[test]
fn damaged_partition_tables_are_refused_before_anything_is_written() {
    let f = fixture("val-table");
    let size = std::fs::metadata(&f.disk).unwrap().len();
    let target = f.target("t.img", size);
    let missing = f.tmp.path("missing.img");
    let manifest = f.image_manifest();
    let good = std::fs::read(&manifest).unwrap();
    let gpt = "g = m['disk']['table']; p = g['partitions'][0]";
    let cases = [
        ("p['first_lba'] = 0", "outside the usable LBAs"),
        (
            "g['partitions'].append(dict(p, slot=2, first_lba=p['first_lba'] + 8))",
            "overlap",
        ),
        (
            "p['first_lba'] = p['last_lba'] + 1",
            "ends before it starts",
        ),
        ("p['last_lba'] = 2**64 - 1", "outside the usable LBAs"),
        ("p['unique_guid'] = 'not-a-guid'", "invalid GUID"),
        (
            "p['type_guid'] = '00000000-0000-0000-0000-000000000000'",
            "all-zero",
        ),
        ("p['slot'] = 0", "slot 0"),
        ("p['slot'] = 129", "slot 129"),
        ("g['num_entries'] = 0", "0 entries"),
        ("g['entry_size'] = 0", "of 0 bytes"),
        ("g['first_usable_lba'] = 1", "do not fit"),
        ("m['disk']['size'] = 2**63", "disk size"),
        ("m['disk']['sector_size'] = 2**20", "sector size"),
        // The table alone is fine, but the areas are not its partitions.
        ("p['last_lba'] -= 2048", "not the partitions"),
        ("m['areas'][1]['used_bytes'] += 4096", "used bytes"),
    ];
    for (code, want) in cases {
        f.edit_manifest(&manifest, &format!("{gpt}\n{code}"));
        let e = f.refused(&target, &[], want);
        assert!(e.contains("nothing was written"), "{code}: {e}");
        f.refused(&missing, &[], want);
        std::fs::write(&manifest, &good).unwrap();
    }
    // What was refused is the damage: the repository as it is restores.
    bmr_ok(&f.restore_args(&target.display().to_string(), &["--verify"]));
}

#[test]
fn damaged_mbr_tables_are_refused_before_anything_is_written() {
    let tmp = Tmp::new("val-mbr");
    let disk = tmp.path("src.img");
    sh(&format!(
        "truncate -s 32M {d} && printf 'label: dos\\nstart=2048, size=8192, type=83\\nstart=10240, size=40960, type=5\\nstart=12288, size=8192, type=83\\n' | sfdisk -q {d}",
        d = disk.display()
    ));
    random_at(&disk, 2048 * 512, 4 * MIB);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h1",
        "-q",
        &disk.display().to_string(),
    ]);
    let f = Fixture {
        tmp,
        disk: disk.clone(),
        repo,
    };
    let target = f.target("t.img", 32 * MIB);
    let manifest = f.image_manifest();
    let good = std::fs::read(&manifest).unwrap();
    let mbr = "t = m['disk']['table']; ps = t['partitions']";
    let cases = [
        ("ps[0]['start_lba'] = 0", "outside the disk"),
        ("ps[0]['sectors'] = 2**40", "outside the disk"),
        ("ps[2]['start_lba'] = 9000", "outside the extended"),
        ("ps[2]['number'] = 7", "out of place"),
        (
            "ps[1]['kind'] = 'primary'; ps[1]['number'] = 1",
            "out of place",
        ),
        ("ps[0]['type_id'] = 0", "type 0"),
        ("t['disk_signature'] = 'xyz'", "disk signature"),
    ];
    for (code, want) in cases {
        f.edit_manifest(&manifest, &format!("{mbr}\n{code}"));
        f.refused(&target, &[], want);
        std::fs::write(&manifest, &good).unwrap();
    }
    bmr_ok(&f.restore_args(&target.display().to_string(), &["--verify"]));
}

#[test]
fn a_chunk_index_that_does_not_match_its_manifest_is_refused() {
    let f = fixture("val-index");
    let size = std::fs::metadata(&f.disk).unwrap().len();
    let target = f.target("t.img", size);
    let missing = f.tmp.path("missing.img");
    let manifest = f.image_manifest();
    let idx = manifest.with_extension("idx");
    let (good_m, good_i) = (
        std::fs::read(&manifest).unwrap(),
        std::fs::read(&idx).unwrap(),
    );
    let cases = [
        // All but one record dropped; the index's own end count says 1, the manifest not.
        ("recs[:1]", false, "1 records, the manifest says"),
        // The tail boot area's records dropped, the manifest's count rewritten too: an area
        // stored whole is not covered.
        (
            "[r for r in recs if struct.unpack_from('<I', r)[0] != 2]",
            true,
            "stored whole but its records cover",
        ),
        // The partition's last record dropped: its used bytes do not add up.
        (
            "(lambda i: recs[:i] + recs[i + 1:])(max(j for j, r in enumerate(recs) if struct.unpack_from('<I', r)[0] == 1))",
            true,
            "used bytes in its records",
        ),
        ("recs[1:2] + recs[:1] + recs[2:]", false, "out of order"),
        ("recs[:2] + recs[1:]", true, "out of order"),
    ];
    for (keep, count, want) in cases {
        edit_index(&f, keep, count);
        f.refused(&target, &[], want);
        f.refused(&missing, &[], want);
        let t = target.display().to_string();
        let (_, rss) = bmr_measured(&[], &f.restore_args(&t, &[]));
        println!("{keep}: peak RSS {rss} KiB");
        assert!(rss < 256 * 1024, "{keep}: peak RSS {rss} KiB");
        std::fs::write(&manifest, &good_m).unwrap();
        std::fs::write(&idx, &good_i).unwrap();
    }
    bmr_ok(&f.restore_args(&target.display().to_string(), &["--verify"]));
}

#[test]
fn a_missing_target_stays_missing_when_a_chunk_is_damaged() {
    let f = fixture("val-fresh");
    let chunk = f
        .chunks()
        .into_iter()
        .max_by_key(|c| std::fs::metadata(c).unwrap().len())
        .unwrap();
    flip_byte(&chunk);
    let missing = f.tmp.path("missing.img");
    // Locally the pre-check reads every chunk; with --no-precheck the damage is found while
    // writing, and the image file made for the restore goes again.
    f.refused(&missing, &[], "is damaged");
    f.refused(&missing, &["--no-precheck"], "was removed");
    // Over HTTP the pre-check only asks whether each chunk exists.
    let (_server, url) = serve(&f.tmp, &f.repo, 0);
    let t = missing.display().to_string();
    let e = bmr_fails(&[
        "restore", "--repo", &url, "--host", "h1", "--target", &t, "-q", "--yes",
    ]);
    assert!(e.contains("damaged") && e.contains("was removed"), "{e}");
    assert!(!missing.exists(), "{e}");
}

/// An incremental on top of the image: one changed file (its chunk is the only new one).
fn with_incremental(f: &Fixture) -> (String, PathBuf) {
    let before = f.chunks();
    let mnt = f.tmp.path("live");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mount -o loop,offset={},sizelimit={} {} {}",
        MIB,
        24 * MIB,
        f.disk.display(),
        mnt.display()
    ));
    sh(&format!(
        "head -c 300000 /dev/urandom > {m}/changed.bin && echo more >> {m}/{n}",
        m = mnt.display(),
        n = "n".repeat(200)
    ));
    let out = bmr(&[
        "backup",
        "--incremental",
        "--repo",
        &f.repo,
        "--host",
        "h1",
        &mnt.display().to_string(),
    ]);
    sh(&format!("umount {}", mnt.display()));
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    let new: Vec<PathBuf> = f
        .chunks()
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    let biggest = new
        .into_iter()
        .max_by_key(|c| std::fs::metadata(c).unwrap().len())
        .expect("the incremental stored no chunk");
    (id, biggest)
}

#[test]
fn an_incremental_s_file_lists_and_chunks_are_checked_before_writing() {
    let f = fixture("val-inc");
    let (inc, chunk) = with_incremental(&f);
    let size = std::fs::metadata(&f.disk).unwrap().len();
    let target = f.target("t.img", size);
    let missing = f.tmp.path("missing.img");
    let at = ["--at", inc.as_str()];

    // A damaged file chunk: found by the pre-check, not after the image is written.
    let good = std::fs::read(&chunk).unwrap();
    flip_byte(&chunk);
    let e = f.refused(&target, &at, "is damaged");
    assert!(e.contains(&inc) && e.contains("nothing was written"), "{e}");
    f.refused(&missing, &at, "is damaged");
    std::fs::write(&chunk, &good).unwrap();

    // A 300-byte name in the incremental's file list (hash and length made to match).
    let man = f.snapshots().join(format!("{inc}.json"));
    let toc = sh(&format!("ls {}/{inc}*.toc*", f.snapshots().display()));
    let toc = PathBuf::from(toc.lines().next().unwrap());
    let good_toc = std::fs::read(&toc).unwrap();
    let good_man = std::fs::read(&man).unwrap();
    let script = f.tmp.path("toc.py");
    std::fs::write(
        &script,
        r#"
import hashlib, json, subprocess, sys
man, toc = sys.argv[1], sys.argv[2]
raw = subprocess.run(["zstd", "-dc", toc], check=True, capture_output=True).stdout
# CBOR byte string of 200 bytes (0x58 0xc8) -> 300 bytes (0x59 0x01 0x2c).
old = b"\x58\xc8" + b"n" * 200
assert raw.count(old) == 1, raw.count(old)
raw = raw.replace(old, b"\x59\x01\x2c" + b"n" * 300)
out = subprocess.run(["zstd", "-q", "-c"], input=raw, check=True, capture_output=True).stdout
open(toc, "wb").write(out)
m = json.load(open(man))
for fs in m["filesystems"]:
    fs["toc"]["sha256"] = hashlib.sha256(out).hexdigest()
    fs["toc"]["len"] = len(out)
json.dump(m, open(man, "w"), indent=1)
"#,
    )
    .unwrap();
    sh(&format!(
        "python3 {} {} {}",
        script.display(),
        man.display(),
        toc.display()
    ));
    let e = f.refused(&target, &at, "name of 300 bytes");
    assert!(e.contains("nothing was written"), "{e}");
    f.refused(&missing, &at, "name of 300 bytes");
    std::fs::write(&toc, &good_toc).unwrap();
    std::fs::write(&man, &good_man).unwrap();

    bmr_ok(&f.restore_args(&target.display().to_string(), &at));
}

#[test]
fn the_repository_is_never_overwritten_through_the_target() {
    // An unpartitioned 2 MiB disk of random bytes: its one chunk file is bigger than the disk,
    // so it is a target big enough to be written.
    let tmp = Tmp::new("val-repo");
    let disk = tmp.path("src.img");
    sh(&format!("truncate -s 2M {}", disk.display()));
    random_at(&disk, 0, 2 * MIB);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h1",
        "-q",
        &disk.display().to_string(),
    ]);
    let f = Fixture { tmp, disk, repo };
    let chunk = f
        .chunks()
        .into_iter()
        .max_by_key(|c| std::fs::metadata(c).unwrap().len())
        .unwrap();
    let chunk_sha = sha_file(&chunk);

    // A hard link to a chunk file, outside the repository directory.
    let link = f.tmp.path("hardlink.img");
    std::fs::hard_link(&chunk, &link).unwrap();
    f.refused(&link, &[], "hard links");
    // A symlink to one.
    let sym = f.tmp.path("symlink.img");
    std::os::unix::fs::symlink(&chunk, &sym).unwrap();
    f.refused(&sym, &[], "inside the repository");
    // A new file in the repository through a symlinked directory: not even created.
    let alias = f.tmp.path("alias");
    std::os::unix::fs::symlink(&f.repo, &alias).unwrap();
    f.refused(&alias.join("new.img"), &[], "inside the repository");
    // The repository seen through a bind mount: another path, the same directory.
    let bind = f.tmp.path("bind");
    std::fs::create_dir_all(&bind).unwrap();
    sh(&format!("mount --bind {} {}", f.repo, bind.display()));
    let through = bind.join(chunk.strip_prefix(&f.repo).unwrap());
    let (ok, out) = sh_status(&format!(
        "{} restore --repo {} --host h1 --target {} -q --yes",
        env!("CARGO_BIN_EXE_bmr"),
        f.repo,
        through.display()
    ));
    sh(&format!("umount {}", bind.display()));
    assert!(!ok && out.contains("inside the repository"), "{out}");
    assert_eq!(sha_file(&chunk), chunk_sha, "a chunk was overwritten");

    // A disk whose filesystem holds the repository.
    let fs = f.tmp.path("repofs.img");
    sh(&format!(
        "truncate -s 64M {0} && mkfs.ext4 -q {0}",
        fs.display()
    ));
    let lo = Loop::new(&fs, 0, 64 * MIB, false);
    let at = f.tmp.path("repofs");
    std::fs::create_dir_all(&at).unwrap();
    sh(&format!("mount {} {}", lo.0, at.display()));
    let repo2 = at.join("repo").display().to_string();
    let (ok, out) = sh_status(&format!(
        "{b} backup --repo {repo2} --host h1 -q {d} && {b} restore --repo {repo2} --host h1 --target {t} -q --yes",
        b = env!("CARGO_BIN_EXE_bmr"),
        d = f.disk.display(),
        t = lo.0
    ));
    sh(&format!("umount {}", at.display()));
    assert!(!ok && out.contains("holds the repository"), "{out}");
}
