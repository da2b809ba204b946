//! Incrementals with deletions and point-in-time restore: the Monday–Thursday scenario, the
//! metadata edge cases, file restore, and symlink safety. ext4 is loop-mounted on the host.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

struct Disk {
    tmp: Tmp,
    disk: PathBuf,
    repo: String,
}

const P1: u64 = MIB;
const P1_LEN: u64 = 96 * MIB;

fn disk(name: &str, opts: &str, monday: impl Fn(&Path)) -> Disk {
    let tmp = Tmp::new(name);
    let tree = tmp.path("monday");
    std::fs::create_dir_all(&tree).unwrap();
    monday(&tree);
    let disk = ext_disk(&tmp, 100, 96, opts, &tree);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "h",
        "-q",
        &disk.display().to_string(),
    ]);
    Disk { tmp, disk, repo }
}

fn sha_full(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Disk {
    fn mount_rw(&self) -> MountRw {
        let at = self.tmp.path("live");
        std::fs::create_dir_all(&at).unwrap();
        sh(&format!(
            "mount -o loop,offset={P1},sizelimit={P1_LEN} {} {}",
            self.disk.display(),
            at.display()
        ));
        MountRw(at)
    }

    fn incremental(&self, mnt: &Path) -> String {
        let out = bmr_ok(&[
            "backup",
            "--incremental",
            "--repo",
            &self.repo,
            "--host",
            "h",
            &mnt.display().to_string(),
        ]);
        out.split_whitespace()
            .nth(1)
            .unwrap()
            .trim_end_matches(':')
            .to_string()
    }

    /// Restore `at` onto a new image and return the restored tree's state.
    fn restored(&self, at: &str) -> BTreeMap<Vec<u8>, String> {
        let t = self.tmp.path(&format!("restore-{at}.img"));
        bmr_ok(&[
            "restore",
            "--repo",
            &self.repo,
            "--host",
            "h",
            "--at",
            at,
            "--target",
            &t.display().to_string(),
            "-q",
        ]);
        let (ok, out) = sh_status(&format!(
            "dd if={} of={}.p1 bs=1M skip=1 count=96 status=none && e2fsck -fn {}.p1",
            t.display(),
            t.display(),
            t.display()
        ));
        assert!(ok, "e2fsck after restore at {at}:\n{out}");
        let m = Mount::ext(&t, P1, P1_LEN, &self.tmp.path(&format!("m-{at}")));
        let s = state(&m.0);
        drop(m);
        let _ = std::fs::remove_file(&t);
        s
    }
}

struct MountRw(PathBuf);
impl Drop for MountRw {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn monday_to_thursday_with_deletions() {
    let d = disk("tsm", "", |t| {
        for (n, c) in [
            ("file1", "monday 1"),
            ("file2", "monday 2"),
            ("file3", "monday 3"),
        ] {
            std::fs::write(t.join(n), c).unwrap();
        }
    });
    let mnt = d.mount_rw();
    let m = &mnt.0;
    std::fs::write(m.join("file4"), "tuesday 4").unwrap();
    let tue = d.incremental(m);
    let tue_state = state(m);
    std::fs::remove_file(m.join("file2")).unwrap();
    std::fs::write(m.join("file3"), "wednesday 3").unwrap();
    let wed = d.incremental(m);
    std::fs::remove_file(m.join("file1")).unwrap();
    let thu = d.incremental(m);
    let thu_state = state(m);
    drop(mnt);

    let thursday = d.restored(&thu);
    assert_eq!(names(&thursday), ["file3", "file4"]);
    assert_eq!(
        thursday, thu_state,
        "Thursday's restore differs from Thursday's disk"
    );
    let tuesday = d.restored(&tue);
    assert_eq!(names(&tuesday), ["file1", "file2", "file3", "file4"]);
    assert_eq!(tuesday, tue_state);
    // file contents by restore-files too, from the image and from an incremental.
    let out = d.tmp.path("files");
    bmr_ok(&[
        "restore-files",
        "--repo",
        &d.repo,
        "--host",
        "h",
        "--at",
        &wed,
        "--to",
        &out.display().to_string(),
        "/file3",
        "file1",
    ]);
    assert_eq!(
        std::fs::read_to_string(out.join("file3")).unwrap(),
        "wednesday 3"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("file1")).unwrap(),
        "monday 1"
    );
    let ls = bmr_ok(&["ls", "--repo", &d.repo, "--host", "h", "--at", &wed]);
    assert!(
        ls.contains("\"file3\"") && !ls.contains("\"file2\"") && ls.contains("\"file4\""),
        "{ls}"
    );

    // A missing chunk of a changed file: refused before anything is written, naming the file.
    let h = sha_full(b"wednesday 3");
    let chunk = format!("{}/chunks/{}/{h}", d.repo, &h[..2]);
    let saved = std::fs::read(&chunk).unwrap();
    std::fs::remove_file(&chunk).unwrap();
    let t = d.tmp.s("refused.img");
    let e = bmr_fails(&[
        "restore", "--repo", &d.repo, "--host", "h", "--at", &wed, "--target", &t,
    ]);
    assert!(
        e.contains("\"file3\"") && e.contains(&wed) && e.contains("missing"),
        "{e}"
    );
    assert!(!Path::new(&t).exists());
    std::fs::write(&chunk, saved).unwrap();

    // Keeping only Thursday keeps its image too; prune leaves both restorable.
    let out = bmr_ok(&[
        "forget",
        "--repo",
        &d.repo,
        "--host",
        "h",
        "--keep-last",
        "1",
    ]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("keep ")).count(),
        2,
        "{out}"
    );
    bmr_ok(&["prune", "--repo", &d.repo]);
    bmr_ok(&["verify", "--repo", &d.repo, "-q"]);
    assert_eq!(d.restored("latest"), thu_state);
    let e = bmr_fails(&[
        "restore", "--repo", &d.repo, "--host", "h", "--at", &tue, "--target", &t,
    ]);
    assert!(e.contains("snapshot id"), "{e}");
}

#[test]
fn metadata_edge_cases_round_trip() {
    let d = disk("edges", "", |t| {
        std::fs::write(t.join("perm"), "p").unwrap();
        std::fs::write(t.join("owner"), "o").unwrap();
        std::fs::write(t.join("old name"), "renamed").unwrap();
        std::fs::write(t.join("flip"), "file first").unwrap();
        std::os::unix::fs::symlink("perm", t.join("link")).unwrap();
        std::os::unix::fs::symlink("/", t.join("etc")).unwrap();
    });
    let mnt = d.mount_rw();
    let m = &mnt.0;
    let host_etc = std::fs::read("/etc/hostname").ok();
    sh(&format!(
        "cd {} && chmod 600 perm && chown 1234:5678 owner && mv 'old name' 'new name' && \
         rm flip && mkdir flip && echo inside > flip/x && rm link && ln -s owner link && \
         rm etc && mkdir etc && echo restored > etc/hostname && \
         echo hl > hard1 && ln hard1 hard2 && truncate -s 10M sparse && echo mid | dd of=sparse bs=1 seek=5000000 conv=notrunc status=none && \
         : > empty && printf x > \"$(printf 'sp ace\\nnew\\xffline')\" && \
         mkdir -p deep/$(seq -s/ 1 40 | tr -d '\\n') && echo bottom > deep/$(seq -s/ 1 40 | tr -d '\\n')/f && \
         setfattr -n user.note -v hello perm && chmod 4755 owner",
        m.display()
    ));
    let inc1 = d.incremental(m);
    let s1 = state(m);
    // ...and back: the directory becomes a file again; a permission-only change.
    sh(&format!(
        "cd {} && rm -r flip && echo file again > flip && chmod 640 perm",
        m.display()
    ));
    let inc2 = d.incremental(m);
    let s2 = state(m);
    drop(mnt);
    assert_eq!(d.restored(&inc1), s1);
    assert_eq!(d.restored(&inc2), s2);
    assert_eq!(
        std::fs::read("/etc/hostname").ok(),
        host_etc,
        "a restored symlink redirected a write"
    );
}

#[test]
fn hundred_thousand_files_unchanged_incremental_stores_nothing() {
    let d = disk("many", "-N 120000", |_| {});
    // Many files are made on the mounted filesystem (mke2fs -d is slow at this), then imaged.
    let mnt = d.mount_rw();
    sh(&format!(
        "cd {} && for i in $(seq 1 100); do mkdir d$i; (cd d$i && seq 1 1000 | xargs touch); done",
        mnt.0.display()
    ));
    drop(mnt);
    bmr_ok(&[
        "backup",
        "--repo",
        &d.repo,
        "--host",
        "h",
        "-q",
        &d.disk.display().to_string(),
    ]);
    let mnt = d.mount_rw();
    std::fs::write(mnt.0.join("d1/1"), "changed").unwrap();
    let inc = d.incremental(&mnt.0);
    let start = std::time::Instant::now();
    let inc2 = d.incremental(&mnt.0);
    // Printed, not asserted: timing belongs to the benchmark (docs/benchmarks.md).
    eprintln!(
        "unchanged incremental of 100,100 entries: {:.2}s",
        start.elapsed().as_secs_f64()
    );
    drop(mnt);
    let list: serde_json::Value =
        serde_json::from_str(&bmr_ok(&["list", "--repo", &d.repo, "--json"])).unwrap();
    let snaps = list[0]["snapshots"].as_array().unwrap();
    let last = snaps.iter().find(|s| s["id"] == inc2.as_str()).unwrap();
    assert_eq!(last["new_bytes"].as_u64(), Some(0));
    let s = d.restored(&inc);
    assert_eq!(s.len(), 100_100);
    assert!(s[&b"d1/1"[..]].contains("size 7"));
}

#[test]
fn incremental_must_name_every_filesystem_the_previous_one_covered() {
    let tmp = Tmp::new("inc-cover");
    let (a, b) = (tmp.path("a"), tmp.path("b"));
    populate(&a, 1);
    populate(&b, 2);
    let disk = tmp.path("disk.img");
    sh(&format!(
        "truncate -s 64M {d} && sgdisk -o -n 1:2048:+24M -n 2:0:+24M {d} >/dev/null",
        d = disk.display()
    ));
    let (_, parts) = sfdisk_parts(&disk);
    for (p, dir) in parts.iter().zip([&a, &b]) {
        let img = tmp.path(&format!("p{}.img", p.0));
        make_ext(&img, p.2 / MIB, "ext4", "", dir);
        place(&disk, &img, p.1);
    }
    let repo = tmp.s("repo");
    let d = disk.display().to_string();
    bmr_ok(&["backup", "--repo", &repo, "--host", "h", "-q", &d]);
    let mounts: Vec<MountRw> = parts
        .iter()
        .map(|p| {
            let at = tmp.path(&format!("live{}", p.0));
            std::fs::create_dir_all(&at).unwrap();
            sh(&format!(
                "mount -o loop,offset={},sizelimit={} {d} {}",
                p.1,
                p.2,
                at.display()
            ));
            MountRw(at)
        })
        .collect();
    let (m1, m2) = (
        mounts[0].0.display().to_string(),
        mounts[1].0.display().to_string(),
    );
    let inc = |mps: &[&str]| {
        let mut args = vec!["backup", "--incremental", "--repo", &repo, "--host", "h"];
        args.extend_from_slice(mps);
        bmr(&args)
    };
    std::fs::write(mounts[1].0.join("new-on-b"), "tuesday").unwrap();
    assert!(inc(&[&m1, &m2]).status.success());
    let count = || sh(&format!("ls {repo}/hosts/h/snapshots/ | grep -c 'json$'"));
    let before = count();
    // Only the first: the second's Tuesday file would vanish from a restore to this point.
    let out = inc(&[&m1]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("also covered") && e.contains(&m2), "{e}");
    assert_eq!(count(), before, "a refused incremental left a snapshot");
    assert!(inc(&[&m2, &m1]).status.success());
}
