//! `bmr rescue` on this host: the unattended restore driven by a kernel command line (given with
//! --cmdline), its refusals, repositories found on local media by label or device, HTTPS with a
//! private CA, the JSON report, and the TUI driven through a real pseudo-terminal (tmux).
//! The same binary is booted in QEMU by qemu-tests/.

mod common;
use common::*;
use std::path::Path;

fn rescue(cmdline: &str) -> (i32, String) {
    let out = bmr(&["rescue", "--cmdline", cmdline]);
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

/// The one `BMR-RESULT:` line of a run.
fn result(out: &str) -> String {
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("BMR-RESULT:"))
        .collect();
    assert_eq!(lines.len(), 1, "want exactly one result line:\n{out}");
    lines[0].to_string()
}

/// A GPT disk with an ext4 partition, backed up as host web1.
fn sample(tmp: &Tmp) -> (String, std::path::PathBuf) {
    web1_image(tmp, 11)
}

fn check_restored(tmp: &Tmp, target: &Path) {
    assert!(sh(&format!("sgdisk -v {}", target.display())).contains("No problems found"));
    let part = tmp.path("restored-part.img");
    extract(target, MIB, 40 * MIB, &part);
    sh(&format!("e2fsck -fn {}", part.display()));
    let src = tmp.path("src-part.img");
    extract(&tmp.path("src.img"), MIB, 40 * MIB, &src);
    let (a, b) = (tmp.path("a"), tmp.path("b"));
    sh(&format!(
        "mkdir -p {a} {b} && mount -o ro,loop {} {a} && mount -o ro,loop {} {b}; \
         rc=0; diff -r {a} {b} || rc=1; umount {a} {b}; exit $rc",
        src.display(),
        part.display(),
        a = a.display(),
        b = b.display()
    ));
}

#[test]
fn unattended_restore_reports_and_checks_out() {
    let tmp = Tmp::new("rescue-ok");
    let (repo, _disk) = sample(&tmp);
    let posts = tmp.path("posts");
    std::fs::create_dir_all(&posts).unwrap();
    let (_srv, url) = serve_with(&tmp, &repo, 0, &["--posts", &posts.display().to_string()]);
    let target = tmp.path("target.img");
    sh(&format!("truncate -s 64M {}", target.display()));
    let (code, out) = rescue(&format!(
        "console=ttyS0 bmr.repo={repo} bmr.host=web1 bmr.target={} bmr.verify bmr.wait=3 bmr.report={url}/report",
        target.display()
    ));
    assert_eq!(code, 0, "{out}");
    let line = result(&out);
    assert!(
        line.starts_with("BMR-RESULT: ok restored host web1 snapshot"),
        "{line}"
    );
    assert!(line.contains("verified"), "{line}");
    assert!(out.contains("Restore plan"), "{out}");
    check_restored(&tmp, &target);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(posts.join("0.json")).expect("report posted"))
            .unwrap();
    assert_eq!(report["result"], "ok");
    assert_eq!(report["host"], "web1");
    assert_eq!(report["verified"], true);
    assert!(report["bytes_written"].as_u64().unwrap() > 0);
}

#[test]
fn unattended_refusals_touch_nothing() {
    let tmp = Tmp::new("rescue-refuse");
    let (repo, _disk) = sample(&tmp);
    let target = tmp.path("target.img");
    // A target that holds data: a filesystem of its own.
    sh(&format!(
        "truncate -s 64M {t} && mkfs.ext4 -q -F {t}",
        t = target.display()
    ));
    let before = sha_file(&target);
    let t = target.display().to_string();
    let cases = [
        (
            format!("bmr.repo={repo} bmr.tagret={t}"),
            "unknown kernel parameter bmr.tagret",
        ),
        (
            format!("bmr.repo={repo} bmr.host=web1"),
            "bmr.target is missing",
        ),
        (
            format!("bmr.repo={repo} bmr.host=nope bmr.target={t}"),
            "no backups of host \"nope\"",
        ),
        (
            format!("bmr.repo={repo} bmr.target={t} bmr.after=halt"),
            "bmr.after=halt",
        ),
        (format!("bmr.repo={repo} bmr.target={t}"), "add bmr.yes"),
        (
            format!("bmr.repo=relative/path bmr.target={t}"),
            "use an http(s):// URL",
        ),
        (
            format!("bmr.repo=label:NO-SUCH-LABEL bmr.target={t} bmr.wait=1"),
            "not found within 1 s",
        ),
        (
            format!("bmr.repo={repo} bmr.target=/dev/disk/by-id/virtio-NOSUCH"),
            "no disk /dev/disk/by-id/virtio-NOSUCH",
        ),
    ];
    for (cmdline, want) in cases {
        let (code, out) = rescue(&cmdline);
        assert_eq!(code, 1, "{cmdline}: {out}");
        let line = result(&out);
        assert!(line.starts_with("BMR-RESULT: failed "), "{line}");
        assert!(line.contains(want), "{cmdline}: want {want:?} in {line}");
        assert_eq!(sha_file(&target), before, "{cmdline} changed the target");
    }
    // With consent the same target is restored.
    let (code, out) = rescue(&format!(
        "bmr.repo={repo} bmr.target={t} bmr.yes bmr.after=shell"
    ));
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("not carried out"),
        "bmr.after=shell needs no power action: {out}"
    );
    check_restored(&tmp, &target);
}

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = sh_status(&format!("losetup -d {}", self.0));
    }
}

#[test]
fn repository_found_on_local_media_by_label_and_device() {
    let tmp = Tmp::new("rescue-media");
    let (repo, _disk) = sample(&tmp);
    // The repository on a "USB disk": an ext4 image holding backups/site-a/<repo>.
    let label = format!("BMRT{}", std::process::id() % 100000);
    let media_tree = tmp.path("media");
    sh(&format!(
        "mkdir -p {m}/backups/site-a && cp -a {repo} {m}/backups/site-a/repo && mkdir -p {m}/other/dir",
        m = media_tree.display()
    ));
    let media = tmp.path("media.img");
    sh(&format!(
        "mke2fs -q -t ext4 -L {label} -d {} {} 64M",
        media_tree.display(),
        media.display()
    ));
    let dev = Loop(
        sh(&format!("losetup -f --show {}", media.display()))
            .trim()
            .to_string(),
    );
    let target = tmp.path("target.img");
    for (i, spec) in [
        format!("label:{label}"),
        format!("label:{label}:/backups/site-a/repo"),
        format!("dev:{}", dev.0),
    ]
    .iter()
    .enumerate()
    {
        let _ = std::fs::remove_file(&target);
        sh(&format!("truncate -s 64M {}", target.display()));
        let (code, out) = rescue(&format!(
            "bmr.repo={spec} bmr.target={} bmr.wait=5",
            target.display()
        ));
        assert_eq!(code, 0, "{spec}: {out}");
        assert!(result(&out).starts_with("BMR-RESULT: ok"), "{out}");
        assert!(out.contains("repository: /run/bmr/media/"), "{out}");
        if i == 0 {
            check_restored(&tmp, &target);
        }
        // The medium was mounted read-only and is unmounted again.
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!info.contains("/run/bmr/media/"), "left mounted:\n{info}");
    }
    // A wrong path on the right medium names the problem.
    let (code, out) = rescue(&format!(
        "bmr.repo=label:{label}:/backups/nope bmr.target={} bmr.wait=5",
        target.display()
    ));
    assert_eq!(code, 1);
    assert!(result(&out).contains("/backups/nope on /dev/loop"), "{out}");
}

#[test]
fn https_with_a_private_ca() {
    let tmp = Tmp::new("rescue-tls");
    let (repo, _disk) = sample(&tmp);
    // A private CA and a server certificate it signed, as a company PKI would issue.
    let (ca, cert, key) = (tmp.s("ca.pem"), tmp.s("cert.pem"), tmp.s("key.pem"));
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out {ca} -days 2 \
           -subj /CN=bmr-test-ca 2>/dev/null && \
         openssl req -newkey rsa:2048 -nodes -keyout {key} -out srv.csr -subj /CN=127.0.0.1 2>/dev/null && \
         printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext.cnf && \
         openssl x509 -req -in srv.csr -CA {ca} -CAkey ca.key -CAcreateserial -out {cert} -days 2 \
           -extfile ext.cnf 2>/dev/null",
        d = tmp.0.display()
    ));
    let (_srv, url) = serve_with(&tmp, &repo, 0, &["--tls", &cert, &key]);
    assert!(url.starts_with("https://"));
    let e = bmr_fails(&["list", "--repo", &url]);
    assert!(
        e.contains("TLS certificate not trusted") && e.contains("--ca"),
        "{e}"
    );
    let listed = bmr_ok(&["list", "--repo", &url, "--ca", &ca]);
    assert!(listed.contains("web1"), "{listed}");
    let e = bmr_fails(&["list", "--repo", &url, "--ca", &key]);
    assert!(e.contains("holds no PEM certificate"), "{e}");
    let target = tmp.path("target.img");
    let (code, out) = rescue(&format!(
        "bmr.repo={url} bmr.target={} bmr.ca={ca} bmr.wait=3",
        target.display()
    ));
    // A missing image file is created by restore, as with `bmr restore --target`.
    assert_eq!(code, 1, "{out}");
    assert!(result(&out).contains("no disk"), "{out}");
    sh(&format!("truncate -s 64M {}", target.display()));
    let (code, out) = rescue(&format!(
        "bmr.repo={url} bmr.target={} bmr.ca={ca} bmr.wait=3",
        target.display()
    ));
    assert_eq!(code, 0, "{out}");
    check_restored(&tmp, &target);
}

#[test]
fn tui_restore_through_a_pseudo_terminal() {
    let tmp = Tmp::new("rescue-tui");
    let (repo, _disk) = sample(&tmp);
    let target = tmp.path("t.img");
    sh(&format!(
        "truncate -s 64M {t} && mkfs.ext4 -q -F {t}",
        t = target.display()
    ));
    let before = sha_file(&target);
    let name = format!("bmr-tui-{}", std::process::id());
    let t = Tmux::start(
        &name,
        &format!(
            "{} rescue --cmdline 'console=tty0'; echo EXIT=$?; sleep 600",
            env!("CARGO_BIN_EXE_bmr")
        ),
    );
    // Two passes: the first is not confirmed (nothing may change), the second restores.
    for pass in 0..2 {
        tui_to_target(&t, &repo, "web1", &target);
        let s = t.wait("Read everything back");
        assert!(
            s.contains("Restore plan") && s.contains("partition 1"),
            "{s}"
        );
        t.keys("Enter");
        // The target is bigger than the source disk: keep the partitions as they were.
        t.wait("grow the last partition");
        t.keys("Enter");
        t.wait("Type t.img to start");
        if pass == 0 {
            t.text("sda");
            t.keys("Enter");
            t.wait("Not confirmed: nothing was written");
            assert_eq!(sha_file(&target), before);
            t.wait("Next");
            t.keys("Up Enter");
        } else {
            t.text("t.img");
            t.keys("Enter");
        }
    }
    let s = t.wait("Done:");
    assert!(s.contains("BMR-RESULT: ok"), "{s}");
    t.wait("Next");
    t.keys("Down Down Enter");
    t.wait("EXIT=0");
    check_restored(&tmp, &target);
}
