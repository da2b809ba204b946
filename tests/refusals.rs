//! Bad input gets one clear error line and leaves the target untouched; `bmr verify` finds
//! damage; an interrupted restore never looks finished and a rerun completes it.

mod common;
use common::*;
use std::path::{Path, PathBuf};

struct Fixture {
    tmp: Tmp,
    disk: PathBuf,
    repo: String,
    parts: Vec<Part>,
}

fn fixture(name: &str) -> Fixture {
    let tmp = Tmp::new(name);
    let dir = tmp.path("tree");
    populate(&dir, 1);
    let disk = ext_disk(&tmp, 40, 16, "", &dir);
    sh(&format!(
        "sgdisk -n 2:0:+4M -t 2:8300 {} >/dev/null",
        disk.display()
    ));
    random_at(&disk, 17 * MIB, 4 * MIB);
    let parts = vec![
        Part {
            number: 1,
            start: MIB,
            len: 16 * MIB,
            content: Content::Ext { dir },
        },
        Part {
            number: 2,
            start: 17 * MIB,
            len: 4 * MIB,
            content: Content::Raw,
        },
    ];
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
    Fixture {
        tmp,
        disk,
        repo,
        parts,
    }
}

impl Fixture {
    /// A blank target file of `size` bytes, filled with a pattern so any write shows.
    fn target(&self, name: &str, size: u64) -> PathBuf {
        let t = self.tmp.path(name);
        sh(&format!(
            "head -c {size} /dev/zero | tr '\\0' '\\125' > {}",
            t.display()
        ));
        t
    }

    fn restore(&self, target: &Path, extra: &[&str]) -> std::process::Output {
        let t = target.display().to_string();
        let mut args = vec![
            "restore", "--repo", &self.repo, "--host", "h1", "--target", &t, "-q",
        ];
        args.extend_from_slice(extra);
        bmr(&args)
    }

    fn restore_fails(&self, target: &Path, extra: &[&str]) -> String {
        let t = target.display().to_string();
        let mut args = vec![
            "restore", "--repo", &self.repo, "--host", "h1", "--target", &t, "-q",
        ];
        args.extend_from_slice(extra);
        bmr_fails(&args)
    }

    /// The biggest chunk file (a data chunk of the ext4 partition or the random one).
    fn a_chunk(&self) -> PathBuf {
        let out = sh(&format!(
            "find {}/chunks -type f -printf '%s %p\\n' | sort -n | tail -1 | cut -d' ' -f2",
            self.repo
        ));
        PathBuf::from(out.trim())
    }

    fn manifest(&self) -> PathBuf {
        let out = sh(&format!("ls {}/hosts/h1/snapshots/*.json", self.repo));
        PathBuf::from(out.trim())
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

#[test]
fn corrupt_missing_and_truncated_inputs_write_nothing() {
    let f = fixture("bad-input");
    let size = std::fs::metadata(&f.disk).unwrap().len();
    let target = f.target("t.img", size);
    let before = sha_file(&target);

    // Not a repository: an empty directory and a missing path.
    let empty = f.tmp.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let t = target.display().to_string();
    for repo in [empty.display().to_string(), f.tmp.s("nowhere")] {
        let e = bmr_fails(&[
            "restore", "--repo", &repo, "--host", "h1", "--target", &t, "--yes",
        ]);
        assert!(e.contains("is not a bmr repository"), "{e}");
    }
    let e = bmr_fails(&["list", "--repo", &empty.display().to_string()]);
    assert!(e.contains("is not a bmr repository"), "{e}");

    // Unknown host names the known ones.
    let e = bmr_fails(&[
        "restore", "--repo", &f.repo, "--host", "nope", "--target", &t, "--yes",
    ]);
    assert!(
        e.contains("no backups of host \"nope\"") && e.contains("h1"),
        "{e}"
    );

    // Corrupt chunk (same size, one bit flipped).
    let chunk = f.a_chunk();
    let good = std::fs::read(&chunk).unwrap();
    flip_byte(&chunk);
    let e = f.restore_fails(&target, &["--yes"]);
    assert!(
        e.contains("is damaged") && e.contains("nothing was written"),
        "{e}"
    );
    assert_eq!(
        sha_file(&target),
        before,
        "target changed after a corrupt-chunk refusal"
    );
    // A missing target is not even created.
    let fresh = f.tmp.path("fresh.img");
    f.restore_fails(&fresh, &[]);
    assert!(!fresh.exists());

    // Missing chunk.
    std::fs::remove_file(&chunk).unwrap();
    let e = f.restore_fails(&target, &["--yes"]);
    assert!(e.contains("is missing"), "{e}");
    let e = f.restore_fails(&target, &["--yes", "--no-precheck"]);
    assert!(e.contains("is missing"), "{e}");
    assert_eq!(sha_file(&target), before);
    std::fs::write(&chunk, &good).unwrap();

    // Truncated manifest.
    let manifest = f.manifest();
    let text = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();
    let e = f.restore_fails(&target, &["--yes"]);
    assert!(e.contains("truncated or corrupt"), "{e}");

    // Manifest of an unknown version.
    let newer =
        String::from_utf8(text.clone())
            .unwrap()
            .replacen("\"version\": 1", "\"version\": 99", 1);
    std::fs::write(&manifest, newer).unwrap();
    let e = f.restore_fails(&target, &["--yes"]);
    assert!(e.contains("version 99") && e.contains("newer bmr"), "{e}");
    std::fs::write(&manifest, &text).unwrap();
    assert_eq!(sha_file(&target), before);

    // Target too small: both sizes named.
    let small = f.target("small.img", 8 * MIB);
    let small_before = sha_file(&small);
    let e = f.restore_fails(&small, &["--yes"]);
    assert!(
        e.contains("too small") && e.contains("8388608 bytes"),
        "{e}"
    );
    assert_eq!(sha_file(&small), small_before);

    // After all that, the repository still restores fine.
    let out = f.restore(&target, &["--yes", "--verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn refuses_targets_in_use_or_holding_data() {
    let f = fixture("targets");
    let size = std::fs::metadata(&f.disk).unwrap().len();

    // A target that holds a filesystem mounted through a loop device.
    let mounted = f.tmp.path("mounted.img");
    let dir = f.tmp.path("tree");
    make_ext(&mounted, 48, "ext4", "", &dir);
    let before = sha_file(&mounted);
    {
        let _m = Mount::ext(&mounted, 0, 48 * MIB, &f.tmp.path("mnt"));
        let e = f.restore_fails(&mounted, &["--yes"]);
        assert!(e.contains("in use") && e.contains("mounted on"), "{e}");
    }
    assert_eq!(sha_file(&mounted), before);

    // A target holding a partition table: refused without a terminal unless --yes.
    let used = f.target("used.img", size);
    sh(&format!("sgdisk -o {} >/dev/null", used.display()));
    let before = sha_file(&used);
    let e = f.restore_fails(&used, &[]);
    assert!(
        e.contains("holds a GPT partition table") && e.contains("--yes"),
        "{e}"
    );
    assert_eq!(sha_file(&used), before);
    let out = f.restore(&used, &["--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in &f.parts {
        check_part(&f.tmp, &f.disk, &used, p);
    }

    // The repository's own disk: a target inside the repository directory.
    let inside = format!("{}/inside.img", f.repo);
    let e = bmr_fails(&[
        "restore", "--repo", &f.repo, "--host", "h1", "--target", &inside,
    ]);
    assert!(e.contains("inside the repository"), "{e}");
}

#[test]
fn backup_refuses_a_read_write_mounted_disk() {
    let f = fixture("live");
    let d = f.disk.display().to_string();
    let mnt = f.tmp.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mount -o loop,offset={},sizelimit={} {d} {}",
        MIB,
        16 * MIB,
        mnt.display()
    ));
    let res = std::panic::catch_unwind(|| {
        let e = bmr_fails(&["backup", "--repo", &f.repo, "--host", "h1", &d]);
        assert!(
            e.contains("mounted read-write") && e.contains("--allow-live"),
            "{e}"
        );
        let out = bmr(&[
            "backup",
            "--repo",
            &f.repo,
            "--host",
            "h1",
            "--allow-live",
            "-q",
            &d,
        ]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("crash-consistent"));
    });
    sh(&format!("umount {}", mnt.display()));
    res.unwrap();
    let m = sh(&format!(
        "ls -t {}/hosts/h1/snapshots/*.json | head -1 | xargs cat",
        f.repo
    ));
    assert!(m.contains("\"consistency\": \"crash-consistent\""), "{m}");
}

#[test]
fn verify_names_damaged_chunks_and_snapshots() {
    let f = fixture("verify");
    let out = bmr_ok(&["verify", "--repo", &f.repo, "-q"]);
    assert!(out.contains("all intact"), "{out}");
    let chunk = f.a_chunk();
    flip_byte(&chunk);
    let out = bmr(&["verify", "--repo", &f.repo, "-q"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    let name = chunk.file_name().unwrap().to_string_lossy().into_owned();
    let snap = f
        .manifest()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        text.contains(&format!("DAMAGED: chunk {name}")) && text.contains(&snap),
        "{text}"
    );
}

#[test]
fn interrupted_restore_never_looks_finished_and_resumes() {
    let f = fixture("resume");
    let size = std::fs::metadata(&f.disk).unwrap().len();
    let target = f.target("t.img", size);
    // Without the pre-check the damage is found mid-restore.
    let chunk = f.a_chunk();
    let good = std::fs::read(&chunk).unwrap();
    flip_byte(&chunk);
    let e = f.restore_fails(&target, &["--yes", "--no-precheck"]);
    assert!(
        e.contains("is damaged") && e.contains("partition table was not written"),
        "{e}"
    );
    let head = read_range(&target, 0, 64);
    assert!(
        head.starts_with(b"BMR-RESTORE-IN-PROGRESS"),
        "no in-progress marker"
    );
    let (ok, _) = sh_status(&format!("sfdisk -d {}", target.display()));
    assert!(!ok, "an interrupted restore left a partition table");

    // Repaired repository: the rerun completes without asking (it is our own partial restore).
    std::fs::write(&chunk, &good).unwrap();
    let out = f.restore(&target, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in &f.parts {
        check_part(&f.tmp, &f.disk, &target, p);
    }
    assert!(sh(&format!("sgdisk -v {}", target.display())).contains("No problems found"));
}

#[test]
fn zero_free_clears_free_space_of_a_used_target() {
    let f = fixture("zerofree");
    let size = std::fs::metadata(&f.disk).unwrap().len();
    let target = f.target("t.img", size);
    let out = f.restore(&target, &["--yes", "--zero-free"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in &f.parts {
        check_part(&f.tmp, &f.disk, &target, p);
    }
    // Every byte of the ext4 partition outside its used blocks is now zero (it held 0x55).
    let p = &f.parts[0];
    let img = f.tmp.path("p1.img");
    extract(&f.disk, p.start, p.len, &img);
    let data = read_range(&target, p.start, p.len);
    let mut pos = 0usize;
    for (o, l) in ext_used_ranges(&img) {
        assert!(
            data[pos..o as usize].iter().all(|&b| b == 0),
            "free bytes before {o} not zeroed"
        );
        pos = (o + l) as usize;
    }
    assert!(data[pos..].iter().all(|&b| b == 0));
}

#[test]
fn concurrent_backups_of_two_hosts_and_points_in_time() {
    let f = fixture("concurrent");
    let d = f.disk.display().to_string();
    let spawn = |host: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bmr"))
            .args(["backup", "--repo", &f.repo, "--host", host, "-q", &d])
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("alpha"), spawn("beta"));
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let out = bmr_ok(&["verify", "--repo", &f.repo, "-q"]);
    assert!(
        out.contains("checked 3 snapshot(s)") && out.contains("all intact"),
        "{out}"
    );
    let list = bmr_ok(&["list", "--repo", &f.repo]);
    for h in ["alpha", "beta", "h1"] {
        assert!(list.contains(h), "{list}");
    }
    // A time before every snapshot selects nothing; a time after selects the newest.
    let t = f.tmp.s("t.img");
    let e = bmr_fails(&[
        "restore",
        "--repo",
        &f.repo,
        "--host",
        "beta",
        "--at",
        "2001-01-01 00:00",
        "--target",
        &t,
    ]);
    assert!(e.contains("no snapshot at or before"), "{e}");
    bmr_ok(&[
        "restore",
        "--repo",
        &f.repo,
        "--host",
        "beta",
        "--at",
        "2999-01-01T00:00:00Z",
        "--target",
        &t,
        "-q",
    ]);
    for p in &f.parts {
        check_part(&f.tmp, &f.disk, Path::new(&t), p);
    }
}
