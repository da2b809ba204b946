//! The repository layer on hostile input: repositories made by a real `bmr backup`, then
//! altered (tests/hostile_repo.py, zstd, python3) the way a damaged disk, a bad network or a
//! forger would. Every reader stays within a fixed amount of memory, says in one line what is
//! wrong, and a backup never builds on a chunk known to be damaged.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// Peak RSS allowed for restore, verify, ls and restore-files on any hostile input.
const MAX_RSS_KIB: u64 = 256 * 1024;

const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hostile_repo.py");

/// A GPT disk with an ext4 partition of random files, backed up as host h.
fn fixture(name: &str) -> (Tmp, String, std::path::PathBuf) {
    let tmp = Tmp::new(name);
    let dir = tmp.path("tree");
    populate(&dir, 7);
    let disk = ext_disk(&tmp, 48, 40, "", &dir);
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
    (tmp, repo, disk)
}

fn helper(args: &[&str]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    sh(&format!("python3 {HELPER} {}", quoted.join(" ")))
}

/// bmr must fail within the memory bound; its one error line.
fn fails_bounded(env: &[(&str, &str)], args: &[&str]) -> String {
    let (out, kib) = bmr_measured(env, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "bmr {args:?} should have failed\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        kib <= MAX_RSS_KIB,
        "bmr {args:?} peaked at {kib} KiB (limit {MAX_RSS_KIB})\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("bmr: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    errors[0].to_string()
}

/// A target image file of the source disk's size.
fn target(tmp: &Tmp, disk: &Path, name: &str) -> String {
    let t = tmp.path(name);
    sh(&format!(
        "truncate -s $(stat -c %s {}) {}",
        disk.display(),
        t.display()
    ));
    t.display().to_string()
}

#[test]
fn chunk_bombs_are_refused_in_bounded_memory() {
    for variant in ["declared", "--no-size"] {
        let (tmp, repo, disk) = fixture(&format!("chunk-bomb{variant}"));
        // Every data chunk becomes a zstd frame of 3 GiB of zeroes (its own size declared in
        // the frame, or none), with the index rewritten to match its stored size and hash.
        helper(&["chunk-bomb", &repo, "h", variant]);
        let t = target(&tmp, &disk, "t.img");
        let e = fails_bounded(
            &[],
            &[
                "restore", "--repo", &repo, "--host", "h", "--target", &t, "-q",
            ],
        );
        // Refused before writing: by the index check (the stored sizes disagree with the
        // manifest's stats) or by the chunk check, depending on what the bomb rewrote.
        assert!(e.contains("does not match"), "{e}");
        let to = tmp.s("files");
        let (out, kib) = bmr_measured(
            &[],
            &[
                "restore-files",
                "--repo",
                &repo,
                "--host",
                "h",
                "--to",
                &to,
                "big.bin",
            ],
        );
        // The entry's own line names the damage; the last line sums up.
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && kib <= MAX_RSS_KIB,
            "{kib} KiB: {e}"
        );
        assert!(e.contains("content does not match its name"), "{e}");
        // Last: verify sets the damaged chunks aside.
        let (out, kib) = bmr_measured(&[], &["verify", "--repo", &repo, "-q"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(kib <= MAX_RSS_KIB, "verify peaked at {kib} KiB");
        assert!(
            !out.status.success() && stdout.contains("content does not match its name"),
            "{stdout}"
        );
    }
}

#[test]
fn file_list_bomb_is_refused_in_bounded_memory() {
    let (tmp, repo, _disk) = fixture("toc-bomb");
    // An entry whose path is 2 GiB long, in a file list of a few MiB.
    helper(&["toc-bomb", &repo, "h"]);
    let e = fails_bounded(&[], &["ls", "--repo", &repo, "--host", "h", "/"]);
    assert!(
        e.contains("file list hosts/h/snapshots/")
            && e.contains("ext4 filesystem")
            && e.contains("more than any field can be"),
        "{e}"
    );
    let to = tmp.s("files");
    let e = fails_bounded(
        &[],
        &[
            "restore-files",
            "--repo",
            &repo,
            "--host",
            "h",
            "--to",
            &to,
            "big.bin",
        ],
    );
    assert!(e.contains("more than any field can be"), "{e}");
    assert!(!Path::new(&to).exists(), "restore-files created its target");
    let (out, kib) = bmr_measured(&[], &["verify", "--repo", &repo, "-q"]);
    assert!(kib <= MAX_RSS_KIB, "verify peaked at {kib} KiB");
    assert!(!out.status.success());
}

#[test]
fn oversized_metadata_is_refused_before_it_is_read() {
    let (tmp, repo, disk) = fixture("big-json");
    // Valid JSON all the same (whitespace after the value): only the size is wrong.
    let pad = |rel: &str, mib: u64| {
        sh(&format!(
            "head -c {}M /dev/zero | tr '\\0' ' ' >> {repo}/{rel}",
            mib
        ))
    };
    let manifest = sh(&format!("cd {repo} && ls hosts/h/snapshots/*.json"));
    let manifest = manifest.trim();
    pad(manifest, 100);
    let t = target(&tmp, &disk, "t.img");
    let e = fails_bounded(
        &[],
        &[
            "restore", "--repo", &repo, "--host", "h", "--target", &t, "-q",
        ],
    );
    assert!(
        e.contains(manifest) && e.contains("more than bmr accepts for this file (67108864 bytes)"),
        "{e}"
    );
    // The host index, 300 MiB, over HTTP from nginx.
    pad("hosts/h/snapshots.json", 300);
    let web = Nginx::start(&tmp, &repo);
    for args in [
        vec!["ls", "--repo", &web.url, "--host", "h", "/"],
        vec![
            "restore", "--repo", &web.url, "--host", "h", "--target", &t, "-q",
        ],
        vec![
            "restore-files",
            "--repo",
            &web.url,
            "--host",
            "h",
            "--to",
            "/nonexistent-bmr-target",
            "big.bin",
        ],
    ] {
        let e = fails_bounded(&[], &args);
        assert!(
            e.contains("hosts/h/snapshots.json is 3")
                && e.contains("more than bmr accepts for this file (67108864 bytes)"),
            "{e}"
        );
    }
    let (out, kib) = bmr_measured(&[], &["verify", "--repo", &web.url, "-q"]);
    assert!(kib <= MAX_RSS_KIB, "verify peaked at {kib} KiB");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("more than bmr accepts"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn slow_link_finishes_and_a_stalled_server_is_named() {
    let (tmp, repo, _disk) = fixture("slow-http");
    let want = sha_file(&tmp.path("tree/big.bin"));
    // 256 KiB every half second: each chunk of big.bin takes longer than the 2 s idle timeout,
    // but data keeps coming.
    let (_slow, url) = serve_with(&tmp, &repo, 0, &["--slow", "262144", "0.5"]);
    let to = tmp.s("slow");
    let (out, _) = bmr_measured(
        &[("BMR_HTTP_IDLE_TIMEOUT", "2")],
        &[
            "restore-files",
            "--repo",
            &url,
            "--host",
            "h",
            "--to",
            &to,
            "big.bin",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha_file(&tmp.path("slow/big.bin")), want);

    // Half a chunk, then silence: the error says so, after a few idle timeouts.
    let (_stall, url) = serve_with(&tmp, &repo, 0, &["--stall"]);
    let server = url.trim_start_matches("http://").to_string();
    let (out, kib) = bmr_measured(
        &[("BMR_HTTP_IDLE_TIMEOUT", "1")],
        &[
            "restore-files",
            "--repo",
            &url,
            "--host",
            "h",
            "--to",
            &tmp.s("stall"),
            "big.bin",
        ],
    );
    // restore-files names the entry the stall cost, then fails with the summary line.
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && kib <= MAX_RSS_KIB,
        "{kib} KiB: {e}"
    );
    assert!(e.contains(&format!("no data from {server} for 1 s")), "{e}");
}

fn flip_payload_byte(path: &Path) {
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

/// The largest chunk file and its name.
fn biggest_chunk(repo: &str) -> (std::path::PathBuf, String) {
    let p = sh(&format!(
        "find {repo}/chunks -type f -printf '%s %p\\n' | sort -n | tail -1 | cut -d' ' -f2"
    ));
    let p = std::path::PathBuf::from(p.trim());
    let name = p.file_name().unwrap().to_string_lossy().into_owned();
    (p, name)
}

#[test]
fn backups_repair_damaged_chunks_instead_of_reusing_them() {
    let (_tmp, repo, disk) = fixture("dedup-damaged");
    let disk = disk.display().to_string();
    let backup = |extra: &[&str]| {
        let mut args = vec!["backup", "--repo", &repo, "--host", "h", "-q"];
        args.extend_from_slice(extra);
        args.push(&disk);
        let out = bmr(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let intact = || {
        let out = bmr(&["verify", "--repo", &repo, "-q"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && stdout.contains("all intact"),
            "{stdout}"
        );
    };
    let (chunk, name) = biggest_chunk(&repo);

    // Bit rot in the payload: found by --verify-existing, rewritten from the disk's data.
    flip_payload_byte(&chunk);
    let stderr = backup(&["--verify-existing"]);
    assert!(
        stderr.contains(&format!("repaired damaged chunk {name}")),
        "{stderr}"
    );
    intact();

    // A damaged header is found by the cheap check every backup makes.
    sh(&format!(
        "printf '\\x00' | dd of={} bs=1 seek=9 conv=notrunc status=none",
        chunk.display()
    ));
    let stderr = backup(&[]);
    assert!(
        stderr.contains(&format!("repaired damaged chunk {name}")),
        "{stderr}"
    );
    intact();

    // Bit rot a plain backup cannot see: bmr verify finds it and sets the chunk aside, so the
    // next backup stores it again and every snapshot is whole once more.
    flip_payload_byte(&chunk);
    let out = bmr(&["verify", "--repo", &repo, "-q"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && stdout.contains(&format!("chunk {name}")),
        "{stdout}"
    );
    assert!(stdout.contains("moved aside"), "{stdout}");
    assert!(!chunk.exists());
    backup(&[]);
    assert!(chunk.exists());
    intact();
    // The set-aside copy goes with prune.
    let out = bmr_ok(&["prune", "--repo", &repo]);
    assert!(out.contains("deleted 1 unreferenced chunk(s)"), "{out}");
    intact();
}

#[test]
fn prune_removes_what_a_killed_backup_staged() {
    let tmp = Tmp::new("killed-backup");
    let disk = tmp.path("disk.img");
    let d = disk.display().to_string();
    sh(&format!(
        "truncate -s 400M {d} && sgdisk -n 1:2048:+390M -t 1:8300 {d} >/dev/null"
    ));
    random_at(&disk, MIB, 64 * MIB);
    let repo = tmp.s("repo");
    bmr_ok(&["backup", "--repo", &repo, "--host", "h", "-q", &d]);
    // New data, the slowest compression, one thread: the backup is still running when killed.
    random_at(&disk, MIB, 390 * MIB);
    let mut child = Command::new(env!("CARGO_BIN_EXE_bmr"))
        .args([
            "backup",
            "--repo",
            &repo,
            "--host",
            "h",
            "-q",
            "--threads",
            "1",
            "--compression-level",
            "19",
            &d,
        ])
        .spawn()
        .unwrap();
    let staged = || sh(&format!("find {repo}/hosts -name '.tmp.*' -printf '%f\\n'"));
    let mut seen = false;
    for _ in 0..600 {
        if !staged().trim().is_empty() {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        seen && !status.success(),
        "the backup was not killed mid-run"
    );
    let left = staged();
    assert!(!left.trim().is_empty(), "nothing staged was left");

    let dry = bmr_ok(&["prune", "--repo", &repo, "--dry-run"]);
    assert!(dry.contains("would delete 1 staged file(s)"), "{dry}");
    assert_eq!(staged(), left, "--dry-run removed something");
    let out = bmr_ok(&["prune", "--repo", &repo]);
    assert!(
        out.contains("deleted 1 staged file(s) left by interrupted backups"),
        "{out}"
    );
    assert!(staged().trim().is_empty(), "{}", staged());
    let out = bmr(&["verify", "--repo", &repo, "-q"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_bad_digest_names_the_file_list_and_entry_before_writing() {
    let (tmp, repo, _disk) = fixture("bad-digest");
    helper(&["toc-digest", &repo, "h", "sub/deeper/f20"]);
    let to = tmp.s("files");
    let e = bmr_fails(&[
        "restore-files",
        "--repo",
        &repo,
        "--host",
        "h",
        "--to",
        &to,
        "sub",
    ]);
    assert!(
        e.contains("file list hosts/h/snapshots/")
            && e.contains("ext4 filesystem")
            && e.contains("\"sub/deeper/f20\"")
            && e.contains("chunk digest of 31 bytes"),
        "{e}"
    );
    assert!(
        !Path::new(&to).exists(),
        "restore-files wrote before refusing"
    );
}
