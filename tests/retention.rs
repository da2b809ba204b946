//! forget keeps what the policy (and kept incrementals) need; prune deletes only what nothing
//! references, and the repository stays restorable.

mod common;
use common::*;

#[test]
fn forget_and_prune_keep_what_is_needed() {
    let tmp = Tmp::new("retention");
    let disk = tmp.path("d.img");
    sh(&format!(
        "truncate -s 24M {d} && sgdisk -n 1:2048:+16M -t 1:8300 {d} >/dev/null",
        d = disk.display()
    ));
    let repo = tmp.s("repo");
    let d = disk.display().to_string();
    for _ in 0..3 {
        random_at(&disk, MIB, 16 * MIB);
        bmr_ok(&["backup", "--repo", &repo, "--host", "h", "-q", &d]);
    }
    let chunks = || {
        sh(&format!("find {repo}/chunks -type f | wc -l"))
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = chunks();
    let e = bmr_fails(&["forget", "--repo", &repo, "--host", "h"]);
    assert!(e.contains("no retention policy"), "{e}");
    let out = bmr_ok(&[
        "forget",
        "--repo",
        &repo,
        "--host",
        "h",
        "--keep-last",
        "1",
        "--dry-run",
    ]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("forget ")).count(),
        2,
        "{out}"
    );
    bmr_ok(&["prune", "--repo", &repo]);
    assert_eq!(chunks(), before, "prune deleted chunks of kept snapshots");
    bmr_ok(&["forget", "--repo", &repo, "--host", "h", "--keep-last", "1"]);
    let list: serde_json::Value =
        serde_json::from_str(&bmr_ok(&["list", "--repo", &repo, "--json"])).unwrap();
    assert_eq!(list[0]["snapshots"].as_array().unwrap().len(), 1);
    let out = bmr_ok(&["prune", "--repo", &repo]);
    assert!(out.contains("deleted 8 unreferenced chunk(s)"), "{out}");
    assert_eq!(chunks(), before - 8);
    bmr_ok(&["verify", "--repo", &repo, "-q"]);
    let t = tmp.path("t.img");
    bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "h",
        "--target",
        &t.display().to_string(),
        "-q",
    ]);
    sh(&format!("cmp {} {}", disk.display(), t.display()));
}
