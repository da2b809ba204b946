//! One restore plan: the CLI, the TUI and the unattended restore show the same text for the
//! same inputs, before any question; and a restore over HTTP fetches every metadata file
//! (marker, host index, manifests, chunk index, file lists) once, from a real nginx.

mod common;
use common::*;

/// The plan block of some output: from "Restore plan" through its indented lines.
fn plan_block(out: &str) -> Vec<String> {
    let mut lines = out.lines().skip_while(|l| l.trim_end() != "Restore plan");
    let Some(head) = lines.next() else {
        panic!("no restore plan in:\n{out}");
    };
    std::iter::once(head)
        .chain(lines.take_while(|l| l.starts_with("  ")))
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// A GPT disk with an ext4 partition backed up as host web1, then an incremental on top.
fn sample(tmp: &Tmp) -> String {
    let (repo, disk) = web1_image(tmp, 5);
    let mnt = tmp.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mount -o loop,offset={MIB},sizelimit={} {} {}",
        40 * MIB,
        disk.display(),
        mnt.display()
    ));
    std::fs::write(mnt.join("added-on-tuesday"), b"tuesday").unwrap();
    let out = bmr(&[
        "backup",
        "--incremental",
        "--repo",
        &repo,
        "--host",
        "web1",
        &mnt.display().to_string(),
    ]);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    repo
}

fn blank(path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
    sh(&format!("truncate -s 64M {}", path.display()));
}

#[test]
fn the_plan_is_the_same_text_in_the_cli_the_tui_and_unattended_mode() {
    let tmp = Tmp::new("plan-text");
    let repo = sample(&tmp);
    let target = tmp.path("t.img");
    let t = target.display().to_string();

    // CLI: --dry-run shows the plan and writes nothing.
    blank(&target);
    let before = sha_file(&target);
    let cli = bmr_ok(&[
        "restore",
        "--repo",
        &repo,
        "--host",
        "web1",
        "--target",
        &t,
        "--dry-run",
    ]);
    assert_eq!(sha_file(&target), before, "--dry-run wrote to the target");
    let cli = plan_block(&cli);
    assert!(
        cli.iter().any(|l| l.contains("apply incremental")),
        "{cli:?}"
    );

    // Unattended, from kernel parameters.
    let out = bmr(&[
        "rescue",
        "--cmdline",
        &format!("bmr.repo={repo} bmr.host=web1 bmr.target={t} bmr.after=shell"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert_eq!(
        plan_block(&text),
        cli,
        "unattended plan differs from the CLI's"
    );

    // The TUI, through a real pseudo-terminal; the plan is on screen before the first
    // question about the restore.
    blank(&target);
    let name = format!("bmr-plan-{}", std::process::id());
    let tui = Tmux::start(
        &name,
        &format!(
            "{} rescue --cmdline 'console=tty0'; sleep 600",
            env!("CARGO_BIN_EXE_bmr")
        ),
    );
    tui.wait("Repository");
    tui.keys("Down Enter");
    tui.wait("Repository path");
    tui.text(&repo);
    tui.keys("Enter");
    tui.wait("Point in time for web1");
    tui.keys("Enter"); // the newest point: the incremental
    tui.wait("Target disk");
    tui.keys("Up Up Enter");
    tui.wait("Device path");
    tui.text(&t);
    tui.keys("Enter");
    let screen = tui.wait("Read everything back");
    assert_eq!(plan_block(&screen), cli, "TUI plan differs from the CLI's");

    // The CLI asks only after the plan: without a terminal and --yes it refuses a target
    // holding data, with the plan already printed.
    sh(&format!("mkfs.ext4 -q -F {t}"));
    let out = bmr(&["restore", "--repo", &repo, "--host", "web1", "--target", &t]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("add --yes"), "{stderr}");
    let shown = plan_block(&stdout);
    assert!(
        shown
            .iter()
            .any(|l| l.contains("holds a ext4 filesystem") || l.contains("holds an ext4")),
        "{shown:?}"
    );
}

/// Requests for each path, counted.
fn counts(reqs: &[(String, String, u16)]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for (method, path, _) in reqs {
        if method == "GET" {
            *m.entry(path.clone()).or_insert(0) += 1;
        }
    }
    m
}

#[test]
fn a_restore_over_http_fetches_each_metadata_file_once() {
    let tmp = Tmp::new("plan-http");
    let repo = sample(&tmp);
    let nginx = Nginx::start(&tmp, &repo);
    let target = tmp.path("t.img");
    let t = target.display().to_string();
    let metadata = |path: &str| !path.starts_with("/chunks/");

    let check = |what: &str| {
        let reqs = nginx.take_requests();
        assert!(
            reqs.iter().all(|(_, _, status)| *status == 200),
            "{what}: {reqs:?}"
        );
        let got = counts(&reqs);
        let meta: Vec<(&String, &usize)> = got.iter().filter(|(p, _)| metadata(p)).collect();
        // The marker, the host index, two manifests, a chunk index and two file lists.
        assert!(meta.len() >= 7, "{what}: {meta:?}");
        for want in ["/bmr-repo.json", "/hosts/web1/snapshots.json"] {
            assert_eq!(got.get(want), Some(&1), "{what}: {meta:?}");
        }
        for kind in [".json", ".idx", ".toc"] {
            assert!(
                meta.iter()
                    .any(|(p, _)| p.contains("/snapshots/") && p.contains(kind)),
                "{what}: no {kind} fetched: {meta:?}"
            );
        }
        let twice: Vec<_> = meta.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{what}: fetched more than once: {twice:?}"
        );
        // Chunks: each downloaded once too (the pre-check reads them only from local repos).
        let chunks_twice: Vec<_> = got
            .iter()
            .filter(|(p, n)| p.starts_with("/chunks/") && **n > 1)
            .collect();
        assert!(chunks_twice.is_empty(), "{what}: {chunks_twice:?}");
    };

    bmr_ok(&[
        "restore", "--repo", &nginx.url, "--host", "web1", "--target", &t,
    ]);
    check("bmr restore");
    blank(&target);
    let out = bmr(&[
        "rescue",
        "--cmdline",
        &format!(
            "bmr.repo={} bmr.host=web1 bmr.target={t} bmr.after=shell",
            nginx.url
        ),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    check("unattended restore");
    // Without bmr.host the host list is read once more, and nothing else.
    blank(&target);
    let out = bmr(&[
        "rescue",
        "--cmdline",
        &format!("bmr.repo={} bmr.target={t} bmr.after=shell", nginx.url),
    ]);
    assert!(out.status.success());
    let got = counts(&nginx.take_requests());
    assert_eq!(got.get("/hosts.json"), Some(&1), "{got:?}");
}
