//! The same repository served by a static HTTP server: restore, list, ls and restore-files work
//! unchanged; a connection dropped mid-download is retried; bad URLs and missing chunks give
//! one clear line.

mod common;
use common::*;

#[test]
fn restore_over_http_survives_dropped_connections() {
    let tmp = Tmp::new("http");
    let dir = tmp.path("tree");
    populate(&dir, 3);
    let disk = ext_disk(&tmp, 48, 40, "", &dir);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "web",
        "-q",
        &disk.display().to_string(),
    ]);

    // Every 3rd chunk download is cut off halfway: retries make the restore succeed anyway.
    let (_srv, url) = serve(&tmp, &repo, 3);
    let t = tmp.path("t.img");
    bmr_ok(&[
        "restore",
        "--repo",
        &url,
        "--host",
        "web",
        "--target",
        &t.display().to_string(),
        "--verify",
        "-q",
    ]);
    let part = Part {
        number: 1,
        start: MIB,
        len: 40 * MIB,
        content: Content::Ext { dir: dir.clone() },
    };
    check_part(&tmp, &disk, &t, &part);
    assert!(sh(&format!("sgdisk -v {}", t.display())).contains("No problems found"));
    let list = bmr_ok(&["list", "--repo", &url, "--host", "web"]);
    assert!(list.contains("web"), "{list}");
    let out = tmp.path("files");
    bmr_ok(&[
        "restore-files",
        "--repo",
        &url,
        "--host",
        "web",
        "--to",
        &out.display().to_string(),
        "/sub",
    ]);
    sh(&format!(
        "diff -r {}/sub {}/sub",
        dir.display(),
        out.display()
    ));

    // Clear lines for a wrong host, a path that is no repository, and a missing chunk.
    let t2 = tmp.s("t2.img");
    let e = bmr_fails(&["restore", "--repo", &url, "--host", "nope", "--target", &t2]);
    assert!(
        e.contains("no backups of host \"nope\"") && e.contains("web"),
        "{e}"
    );
    let e = bmr_fails(&[
        "restore",
        "--repo",
        &format!("{url}/chunks"),
        "--host",
        "web",
        "--target",
        &t2,
    ]);
    assert!(e.contains("is not a bmr repository"), "{e}");
    let chunk = sh(&format!("find {repo}/chunks -type f -size +100k | head -1"));
    std::fs::remove_file(chunk.trim()).unwrap();
    let e = bmr_fails(&["restore", "--repo", &url, "--host", "web", "--target", &t2]);
    assert!(e.contains("is missing"), "{e}");
    assert!(!std::path::Path::new(&t2).exists());
}

#[test]
fn unreachable_server_is_one_clear_line() {
    let e = bmr_fails(&["list", "--repo", "http://127.0.0.1:9/repo"]);
    assert!(
        e.contains("cannot fetch http://127.0.0.1:9/repo/bmr-repo.json")
            && e.contains("check the network"),
        "{e}"
    );
}
