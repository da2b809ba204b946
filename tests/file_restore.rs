//! File-level restores that restore what they can: inode flags (immutable, append-only...)
//! through images, incrementals and restore-files; one bad entry of a file list costs that
//! entry only, reported on one readable line; and trees thousands of levels deep. ext4 is
//! loop-mounted on the host.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const P1: u64 = MIB;
const P1_LEN: u64 = 96 * MIB;

fn mount_part(tmp: &Tmp, disk: &Path, name: &str) -> Mount {
    let at = tmp.path(name);
    std::fs::create_dir_all(&at).unwrap();
    sh(&format!(
        "mount -o loop,offset={P1},sizelimit={P1_LEN} {} {}",
        disk.display(),
        at.display()
    ));
    Mount(at)
}

/// A fresh ext4 filesystem mounted at `name`: a destination for restore-files with flags.
fn scratch_ext4(tmp: &Tmp, name: &str) -> Mount {
    let img = tmp.path(&format!("{name}.img"));
    sh(&format!(
        "truncate -s 64M {i} && mke2fs -q -t ext4 {i}",
        i = img.display()
    ));
    let at = tmp.path(name);
    std::fs::create_dir_all(&at).unwrap();
    sh(&format!("mount -o loop {} {}", img.display(), at.display()));
    Mount(at)
}

fn backup(repo: &str, disk: &Path) {
    bmr_ok(&[
        "backup",
        "--repo",
        repo,
        "--host",
        "h",
        "-q",
        &disk.display().to_string(),
    ]);
}

fn incremental(repo: &str, mnt: &Path) -> String {
    let out = bmr_ok(&[
        "backup",
        "--incremental",
        "--repo",
        repo,
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

/// `bmr restore --at` onto a new disk image; its ext4 partition checked and mounted.
fn restore_at(tmp: &Tmp, repo: &str, at: &str) -> (PathBuf, Mount) {
    let t = tmp.path(&format!("restore-{at}.img"));
    bmr_ok(&[
        "restore",
        "--repo",
        repo,
        "--host",
        "h",
        "--at",
        at,
        "--target",
        &t.display().to_string(),
        "-q",
    ]);
    let (ok, out) = sh_status(&format!(
        "dd if={t} of={t}.p1 bs=1M skip=1 count=96 status=none && e2fsck -fn {t}.p1 && rm {t}.p1",
        t = t.display()
    ));
    assert!(ok, "e2fsck after restore at {at}:\n{out}");
    let m = mount_part(tmp, &t, &format!("m-{at}"));
    (t, m)
}

/// lsattr's flag letters of one file or directory.
fn lsattr(p: &Path) -> String {
    sh(&format!(
        "lsattr -d {}",
        shell_quote(&p.display().to_string())
    ))
    .split_whitespace()
    .next()
    .unwrap()
    .to_string()
}

#[test]
fn immutable_and_append_only_files_survive_incrementals_and_restore_files() {
    let tmp = Tmp::new("flags");
    let tree = tmp.path("monday");
    std::fs::create_dir_all(tree.join("frozen")).unwrap();
    for (n, c) in [
        ("gone", "locked, deleted later"),
        ("log", "line 1\n"),
        ("nodump", "skip me"),
        ("frozen/old", "in a locked directory"),
        ("plain", "plain"),
    ] {
        std::fs::write(tree.join(n), c).unwrap();
    }
    let disk = ext_disk(&tmp, 100, 96, "", &tree);
    {
        let m = mount_part(&tmp, &disk, "live");
        sh(&format!(
            "cd {} && chattr +i gone && chattr +a log && chattr +d nodump && chattr +i frozen",
            m.0.display()
        ));
    }
    let repo = tmp.s("repo");
    backup(&repo, &disk);
    let m = mount_part(&tmp, &disk, "live");
    let live = &m.0;
    // Tuesday: the locked file is deleted, the locked directory changes, new flags appear.
    sh(&format!(
        "cd {} && chattr -i gone && rm gone && chattr -i frozen && rm frozen/old && \
         echo new > frozen/new && chattr +i frozen && echo 'line 2' >> log && \
         echo fresh > fresh && chattr +i fresh && chattr +A plain",
        live.display()
    ));
    let inc = incremental(&repo, live);
    // Nothing changed: the flags read back from the mounted filesystem match the list.
    let again = bmr_ok(&[
        "backup",
        "--incremental",
        "--repo",
        &repo,
        "--host",
        "h",
        &live.display().to_string(),
    ]);
    assert!(again.contains(" 0 changed"), "{again}");
    sh(&format!("chattr -R -i -a {}", live.display()));
    drop(m);

    let (_t, r) = restore_at(&tmp, &repo, &inc);
    let root = &r.0;
    assert!(!root.join("gone").exists());
    assert!(!root.join("frozen/old").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("frozen/new")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("log")).unwrap(),
        "line 1\nline 2\n"
    );
    assert!(lsattr(&root.join("frozen")).contains('i'));
    assert!(lsattr(&root.join("fresh")).contains('i'));
    assert!(lsattr(&root.join("log")).contains('a'));
    assert!(lsattr(&root.join("nodump")).contains('d'));
    assert!(lsattr(&root.join("plain")).contains('A'));
    assert!(!lsattr(&root.join("frozen/new")).contains('i'));
    drop(r);

    // restore-files from the image sets the flags too (on an ext4 destination)...
    let dest = scratch_ext4(&tmp, "dest");
    bmr_ok(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "h",
        "--at",
        "latest",
        "--to",
        &dest.0.display().to_string(),
        "/frozen",
        "/log",
        "/fresh",
    ]);
    assert!(lsattr(&dest.0.join("frozen")).contains('i'));
    assert!(lsattr(&dest.0.join("log")).contains('a'));
    assert!(lsattr(&dest.0.join("fresh")).contains('i'));
    drop(dest);
    // ...and on a destination without inode flags (ramfs) restores everything with a warning.
    let tmpfs = tmp.path("ramfs");
    std::fs::create_dir_all(&tmpfs).unwrap();
    sh(&format!("mount -t ramfs none {}", tmpfs.display()));
    let _t = Mount(tmpfs.clone());
    let out = bmr(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "h",
        "--to",
        &tmpfs.display().to_string(),
        "/frozen",
        "/log",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("inode flags") && err.contains("refused"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(tmpfs.join("log")).unwrap(),
        "line 1\nline 2\n"
    );
    assert_eq!(
        std::fs::read_to_string(tmpfs.join("frozen/new")).unwrap(),
        "new\n"
    );
}

/// The image's file list of the test disk, to craft a damaged one from.
fn toc_file(repo: &str) -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(format!("{repo}/hosts/h/snapshots"));
    let toc = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension()
                .is_some_and(|x| x.to_string_lossy().starts_with("toc"))
        })
        .unwrap();
    let manifest = toc.with_extension("json");
    (toc, manifest)
}

/// Replace the image's file list by `list`, with the manifest's checksum to match (what a
/// damaged or forged backup would look like to bmr).
fn forge(repo: &str, list: &[bmr::repo::toc::FileMeta]) {
    let (toc, manifest) = toc_file(repo);
    let mut w = bmr::repo::toc::TocWriter::new(Vec::new()).unwrap();
    for m in list {
        w.push(m).unwrap();
    }
    let (bytes, n) = w.finish().unwrap();
    std::fs::write(&toc, &bytes).unwrap();
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let t = &mut j["tocs"][0];
    t["sha256"] = bmr::repo::Digest::of(&bytes).hex().into();
    t["len"] = (bytes.len() as u64).into();
    t["entries"] = n.into();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&j).unwrap()).unwrap();
}

fn read_list(repo: &str) -> Vec<bmr::repo::toc::FileMeta> {
    let (toc, _) = toc_file(repo);
    bmr::repo::toc::read_all(&std::fs::read(toc).unwrap(), "t").unwrap()
}

#[test]
fn restore_files_restores_what_it_can_and_names_each_failure() {
    use bmr::repo::toc::{Data, FileKind};
    use serde_bytes::ByteBuf;
    let tmp = Tmp::new("what-it-can");
    let tree = tmp.path("src");
    std::fs::create_dir_all(tree.join("d")).unwrap();
    std::fs::write(tree.join("a"), "content of a").unwrap();
    std::fs::write(tree.join("b"), "content of b").unwrap();
    std::fs::write(tree.join("d/x"), "content of d/x").unwrap();
    let disk = ext_disk(&tmp, 100, 96, "", &tree);
    let repo = tmp.s("repo");
    backup(&repo, &disk);
    let mut list = read_list(&repo);
    let template = list
        .iter()
        .find(|m| m.path.as_slice() == b"b")
        .unwrap()
        .clone();
    let like = |path: &[u8], kind: FileKind| {
        let mut m = template.clone();
        m.path = ByteBuf::from(path.to_vec());
        m.kind = kind;
        m.size = 0;
        m.data = Data::None;
        m.mode = if kind == FileKind::Dir { 0o755 } else { 0o644 };
        m
    };
    // An xattr no filesystem takes (unknown namespace): the file is restored, the failure told.
    let a = list.iter_mut().find(|m| m.path.as_slice() == b"a").unwrap();
    a.xattrs
        .push((ByteBuf::from(&b"bogus.attr"[..]), ByteBuf::from(&b"v"[..])));
    let mut nul = like(b"nul-link", FileKind::Symlink);
    nul.symlink = Some(ByteBuf::from(&b"tar\0get"[..]));
    let long = vec![b'n'; 300];
    let mut long_dir = b"d/".to_vec();
    long_dir.extend_from_slice(&[b'm'; 300]);
    let mut below = long_dir.clone();
    below.extend_from_slice(b"/inside");
    let mut deep = b"d/missing".to_vec();
    for _ in 0..100_000 {
        deep.extend_from_slice(b"/q");
    }
    let dup = like(b"b", FileKind::File);
    list.extend([
        nul,
        like(&long, FileKind::File),
        like(&long_dir, FileKind::Dir),
        like(&below, FileKind::File),
        like(&deep, FileKind::File),
        like(b"d/../../escape", FileKind::File),
        dup,
    ]);
    // The hostile path and the second "b" are left out by the loader.
    let kept = list.len() - 2;
    forge(&repo, &list);

    let to = tmp.path("out");
    let out = bmr(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "h",
        "--to",
        &to.display().to_string(),
        "/",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for l in err.lines() {
        assert!(l.chars().count() < 400, "a line of {} chars", l.len());
    }
    let has = |what: &[&str]| {
        assert!(
            err.lines().any(|l| what.iter().all(|w| l.contains(w))),
            "no line with {what:?} in:\n{err}"
        )
    };
    has(&["warning", "hostile path", "escape", "ext4", "snapshot"]);
    has(&["warning", "\"b\" twice"]);
    has(&["error", "\"a\"", "bogus.attr"]);
    has(&["error", "\"nul-link\"", "NUL"]);
    has(&["error", "nnnnnnnn", "File name too long"]);
    has(&["error", "mmmmmmmm", "File name too long"]);
    has(&["error", "\"d/missing/q/q", "q/q/q\"", "…", "\"d/missing\""]);
    let summary: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("bmr: error:"))
        .collect();
    assert_eq!(summary.len(), 1, "{err}");
    // a (its xattr), nul-link, the long file, the long directory and the file inside it, the
    // deep one; the root entry is not restored by restore-files, so not counted.
    assert!(
        summary[0].contains(&format!("6 of {} entries", kept - 1))
            && summary[0].contains("see above"),
        "{}",
        summary[0]
    );
    assert_eq!(
        std::fs::read_to_string(to.join("a")).unwrap(),
        "content of a"
    );
    assert_eq!(
        std::fs::read_to_string(to.join("b")).unwrap(),
        "content of b"
    );
    assert_eq!(
        std::fs::read_to_string(to.join("d/x")).unwrap(),
        "content of d/x"
    );
    assert!(!tmp.path("escape").exists() && !to.join("escape").exists());
}

/// `depth` nested directories "d" under `root`, with a file "f" at the bottom: made through
/// directory fds, as no path may be that long.
fn deep_tree(root: &Path, depth: usize) {
    sh(&format!(
        "python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
for i in range({depth}):
    os.mkdir(\"d\", dir_fd=fd)
    nfd = os.open(\"d\", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = nfd
f = os.open(\"f\", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
os.write(f, b\"bottom\\n\")
' {}",
        root.display()
    ));
}

/// The depth of the "d" chain below `root`, and the files along it: (depth, name, content).
fn read_deep(root: &Path) -> (usize, Vec<(usize, String, String)>) {
    let out = sh(&format!(
        "python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
depth = 0
while True:
    for n in sorted(os.listdir(fd)):
        if n != \"d\" and n != \"lost+found\":
            f = os.open(n, os.O_RDONLY, dir_fd=fd)
            print(depth, n, os.read(f, 100).decode().strip())
            os.close(f)
    try:
        nfd = os.open(\"d\", os.O_RDONLY, dir_fd=fd)
    except FileNotFoundError:
        break
    os.close(fd)
    fd = nfd
    depth += 1
print(\"depth\", depth)
' {}",
        root.display()
    ));
    let mut files = Vec::new();
    let mut depth = 0;
    for l in out.lines() {
        let w: Vec<&str> = l.splitn(3, ' ').collect();
        if w[0] == "depth" {
            depth = w[1].parse().unwrap();
        } else {
            files.push((w[0].parse().unwrap(), w[1].to_string(), w[2].to_string()));
        }
    }
    (depth, files)
}

#[test]
fn three_thousand_levels_restore_and_an_incremental_deleting_in_them_applies() {
    let tmp = Tmp::new("deep");
    let tree = tmp.path("src");
    std::fs::create_dir_all(&tree).unwrap();
    // On the mounted filesystem: mke2fs -d fails on paths longer than PATH_MAX.
    let disk = ext_disk(&tmp, 100, 96, "", &tree);
    deep_tree(&mount_part(&tmp, &disk, "live").0, 3000);
    let repo = tmp.s("repo");
    backup(&repo, &disk);
    let to = tmp.path("out");
    let start = std::time::Instant::now();
    bmr_ok(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "h",
        "--to",
        &to.display().to_string(),
        "/d",
    ]);
    // Printed, not asserted: timing belongs to the benchmark.
    eprintln!(
        "restore-files of a 3,000-level tree: {:.2}s",
        start.elapsed().as_secs_f64()
    );
    let (depth, files) = read_deep(&to);
    assert_eq!(depth, 3000);
    assert_eq!(files, [(3000, "f".to_string(), "bottom".to_string())]);
    sh(&format!("rm -rf {}", to.display()));

    // Tuesday: a file added half-way down, the one at the bottom deleted.
    let m = mount_part(&tmp, &disk, "live");
    sh(&format!(
        "python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
for i in range(3000):
    if i == 1500:
        f = os.open(\"mid\", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b\"tuesday\\n\")
    nfd = os.open(\"d\", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = nfd
os.unlink(\"f\", dir_fd=fd)
' {}",
        m.0.display()
    ));
    let inc = incremental(&repo, &m.0);
    drop(m);
    let (_t, r) = restore_at(&tmp, &repo, &inc);
    let (depth, files) = read_deep(&r.0);
    assert_eq!(depth, 3000);
    assert_eq!(files, [(1500, "mid".to_string(), "tuesday".to_string())]);
}
