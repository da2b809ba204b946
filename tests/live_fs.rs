//! Incrementals of mounted XFS and btrfs filesystems, laid out as servers install them: an
//! XFS root (RHEL and its rebuilds) and a btrfs with subvolumes `@` at / and `@home` at /home
//! (openSUSE). The Monday–Thursday scenario with deletions, renames and metadata-only
//! changes, restored at Thursday and at Tuesday onto new images, checked by `xfs_repair -n`
//! and `btrfs check`, and compared with the live tree of that day.
//!
//! Needs root, loop devices, a kernel that mounts xfs and btrfs, xfsprogs and btrfs-progs.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const P1: u64 = MIB;
const P1_LEN: u64 = 320 * MIB;

/// Mounts, unmounted in reverse order on drop.
struct Mounts(Vec<PathBuf>);
impl Mounts {
    fn mount(&mut self, dev: &str, at: &Path, opts: &str) {
        std::fs::create_dir_all(at).unwrap();
        sh(&format!("mount -o {opts} {dev} {}", at.display()));
        self.0.push(at.to_path_buf());
    }
}
impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = sh_status(&format!("umount {}", m.display()));
        }
    }
}

struct Host {
    tmp: Tmp,
    disk: PathBuf,
    repo: String,
}

impl Host {
    fn new(name: &str) -> Host {
        let tmp = Tmp::new(name);
        let disk = tmp.path("disk.img");
        sh(&format!(
            "truncate -s {}M {d} && sgdisk -n1:2048:+{}M -t1:8300 {d} >/dev/null",
            P1_LEN / MIB + 2,
            P1_LEN / MIB,
            d = disk.display()
        ));
        let repo = tmp.s("repo");
        Host { tmp, disk, repo }
    }

    fn image(&self) {
        let out = bmr_ok(&[
            "backup",
            "--repo",
            &self.repo,
            "--host",
            "h",
            "-q",
            &self.disk.display().to_string(),
        ]);
        assert!(!out.contains("no file list"), "{out}");
    }

    /// (snapshot id, changed, deleted)
    fn incremental(&self, extra: &[&str], mps: &[&Path]) -> (String, u64, u64) {
        let mut args = vec![
            "backup",
            "--incremental",
            "--repo",
            &self.repo,
            "--host",
            "h",
        ];
        args.extend_from_slice(extra);
        let mps: Vec<String> = mps.iter().map(|m| m.display().to_string()).collect();
        args.extend(mps.iter().map(|s| s.as_str()));
        let out = bmr_ok(&args);
        // "incremental ID: N files, C changed, D deleted, ..."
        let w: Vec<&str> = out.split_whitespace().collect();
        let num = |after: &str| -> u64 {
            let i = w
                .iter()
                .position(|x| x.trim_end_matches(',') == after)
                .unwrap();
            w[i - 1].parse().unwrap()
        };
        (
            w[1].trim_end_matches(':').to_string(),
            num("changed"),
            num("deleted"),
        )
    }

    fn restore(&self, at: &str) -> PathBuf {
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
        t
    }
}

fn write(p: &Path, s: &str) {
    std::fs::write(p, s).unwrap();
}

/// Monday's files under `root`: 1–3, a tree with a hard link, a symlink and an xattr.
fn monday(root: &Path) {
    for (n, c) in [
        ("file1", "monday 1"),
        ("file2", "monday 2"),
        ("file3", "monday 3"),
    ] {
        write(&root.join(n), c);
    }
    std::fs::create_dir_all(root.join("etc/app")).unwrap();
    write(&root.join("etc/app/conf"), "key=1\n");
    std::fs::hard_link(root.join("etc/app/conf"), root.join("etc/app/conf.link")).unwrap();
    std::os::unix::fs::symlink("app/conf", root.join("etc/conf")).unwrap();
    sh(&format!(
        "setfattr -n user.tag -v monday {}",
        root.join("file3").display()
    ));
}

/// Tuesday to Thursday on a live tree: returns (Tuesday's id, Thursday's id, the states).
#[allow(clippy::type_complexity)]
fn week(
    h: &Host,
    roots: &[&Path],
    wed_extra: &[&str],
) -> (
    String,
    String,
    BTreeMap<Vec<u8>, String>,
    BTreeMap<Vec<u8>, String>,
) {
    let r = roots[0];
    let everything = |roots: &[&Path]| {
        let mut s = BTreeMap::new();
        for (i, r) in roots.iter().enumerate() {
            for (k, v) in state(r) {
                s.insert([format!("{i}:").into_bytes(), k].concat(), v);
            }
        }
        s
    };
    write(&r.join("file4"), "tuesday 4");
    for extra in &roots[1..] {
        write(&extra.join("tuesday"), "in another mount");
    }
    let (tue, changed, deleted) = h.incremental(&[], roots);
    // The image's file list agrees with the kernel: only the new files and their
    // directories differ from it.
    assert_eq!(
        (changed, deleted),
        (2 * roots.len() as u64, 0),
        "Tuesday's changes"
    );
    let tue_state = everything(roots);
    std::fs::remove_file(r.join("file2")).unwrap();
    write(&r.join("file3"), "wednesday 3");
    sh(&format!("chmod 600 {}", r.join("file1").display()));
    sh(&format!(
        "chown 1234:5678 {f} && setfattr -n user.tag -v wednesday {f}",
        f = r.join("etc/app/conf").display()
    ));
    std::fs::rename(r.join("etc/conf"), r.join("etc/conf.renamed")).unwrap();
    let (_wed, _, deleted) = h.incremental(wed_extra, roots);
    assert_eq!(deleted, 2, "Wednesday deleted file2 and renamed etc/conf");
    std::fs::remove_file(r.join("file1")).unwrap();
    let (thu, _, deleted) = h.incremental(&[], roots);
    assert_eq!(deleted, 1);
    let thu_state = everything(roots);
    (tue, thu, tue_state, thu_state)
}

fn check_day(got: &BTreeMap<Vec<u8>, String>, want: &BTreeMap<Vec<u8>, String>, files: &[&str]) {
    let top: Vec<String> = names(got)
        .into_iter()
        .filter(|n| n.starts_with("0:file"))
        .collect();
    assert_eq!(top, files, "files at /");
    assert_eq!(got, want, "the restore differs from that day's live tree");
}

#[test]
fn xfs_root_monday_to_thursday() {
    let h = Host::new("livexfs");
    let live = h.tmp.path("live");
    {
        let lo = Loop::new(&h.disk, P1, P1_LEN, false);
        sh(&format!("mkfs.xfs -q {}", lo.0));
        let mut m = Mounts(Vec::new());
        m.mount(&lo.0, &live, "rw");
        monday(&live);
    }
    h.image();
    let lo = Loop::new(&h.disk, P1, P1_LEN, false);
    let mut m = Mounts(Vec::new());
    m.mount(&lo.0, &live, "rw");
    let (tue, thu, tue_state, thu_state) = week(&h, &[&live], &[]);
    drop(m);
    drop(lo);

    for (at, want, files) in [
        (&thu, &thu_state, &["0:file3", "0:file4"][..]),
        (
            &tue,
            &tue_state,
            &["0:file1", "0:file2", "0:file3", "0:file4"][..],
        ),
    ] {
        let img = h.restore(at);
        let lo = Loop::new(&img, P1, P1_LEN, true);
        let (ok, out) = sh_status(&format!("xfs_repair -n {}", lo.0));
        assert!(ok, "xfs_repair -n after the restore at {at}:\n{out}");
        let mut m = Mounts(Vec::new());
        let at_dir = h.tmp.path(&format!("r-{at}"));
        m.mount(&lo.0, &at_dir, "ro,nouuid");
        let got: BTreeMap<Vec<u8>, String> = state(&at_dir)
            .into_iter()
            .map(|(k, v)| ([b"0:".to_vec(), k].concat(), v))
            .collect();
        check_day(&got, want, files);
    }
}

#[test]
fn btrfs_subvolumes_monday_to_thursday() {
    let h = Host::new("livebtrfs");
    let live = h.tmp.path("live");
    let home = live.join("home");
    {
        let lo = Loop::new(&h.disk, P1, P1_LEN, false);
        sh(&format!("mkfs.btrfs -q {}", lo.0));
        let top = h.tmp.path("top");
        let mut m = Mounts(Vec::new());
        m.mount(&lo.0, &top, "rw,subvolid=5");
        sh(&format!(
            "btrfs subvolume create {t}/@ >/dev/null && btrfs subvolume create {t}/@home >/dev/null && mkdir {t}/@/home {t}/@home/user",
            t = top.display()
        ));
        monday(&top.join("@"));
        write(&top.join("@home/user/notes"), "monday notes");
        // A snapshot nobody mounts: incrementals leave it as the image has it.
        sh(&format!(
            "btrfs subvolume snapshot -r {t}/@ {t}/@-monday >/dev/null",
            t = top.display()
        ));
    }
    h.image();
    let ls = |dir: &str| bmr_ok(&["ls", "--repo", &h.repo, "--host", "h", dir]);
    let (top, user, snap) = (ls("/"), ls("/@home/user"), ls("/@-monday"));
    assert!(
        top.contains("\"@\" [subvolume 256]")
            && user.contains("\"notes\"")
            && snap.contains("\"file2\""),
        "{top}{user}{snap}"
    );
    let lo = Loop::new(&h.disk, P1, P1_LEN, false);
    let mut m = Mounts(Vec::new());
    m.mount(&lo.0, &live, "rw,subvol=@");
    m.mount(&lo.0, &home, "rw,subvol=@home");
    let (tue, thu, tue_state, thu_state) = week(&h, &[&live, &home], &["--snapshot", "btrfs"]);
    // Nothing changed since Thursday: a snapshot run and a live run after it both see that
    // (the snapshot does not touch the live subvolumes).
    let (_, changed, deleted) = h.incremental(&["--snapshot", "btrfs"], &[&live, &home]);
    assert_eq!((changed, deleted), (0, 0), "a snapshot run after Thursday");
    let (_, changed, _) = h.incremental(&[], &[&live, &home]);
    assert_eq!(changed, 0, "the snapshot run changed the live subvolumes");
    let subvols = sh(&format!("btrfs subvolume list {}", live.display()));
    assert_eq!(
        subvols.lines().count(),
        3,
        "--snapshot btrfs left a snapshot:\n{subvols}"
    );
    drop(m);
    drop(lo);

    for (at, want, files) in [
        (&thu, &thu_state, &["0:file3", "0:file4"][..]),
        (
            &tue,
            &tue_state,
            &["0:file1", "0:file2", "0:file3", "0:file4"][..],
        ),
    ] {
        let img = h.restore(at);
        let lo = Loop::new(&img, P1, P1_LEN, true);
        sh("btrfs device scan --forget || true");
        let (ok, out) = sh_status(&format!("btrfs check --readonly {}", lo.0));
        assert!(ok, "btrfs check after the restore at {at}:\n{out}");
        let r = h.tmp.path(&format!("r-{at}"));
        let mut m = Mounts(Vec::new());
        m.mount(&lo.0, &r, "ro,subvol=@");
        m.mount(&lo.0, &r.join("home"), "ro,subvol=@home");
        let mut got = BTreeMap::new();
        for (i, root) in [r.clone(), r.join("home")].iter().enumerate() {
            for (k, v) in state(root) {
                got.insert([format!("{i}:").into_bytes(), k].concat(), v);
            }
        }
        check_day(&got, want, files);
        // The unmounted snapshot is still Monday's.
        let top = h.tmp.path(&format!("rt-{at}"));
        m.mount(&lo.0, &top, "ro,subvolid=5");
        assert_eq!(
            std::fs::read_to_string(top.join("@-monday/file2")).unwrap(),
            "monday 2"
        );
        let (ok, out) = sh_status(&format!("btrfs scrub start -B -r {}", top.display()));
        assert!(
            ok && out.contains("no errors found"),
            "scrub at {at}:\n{out}"
        );
    }
}
