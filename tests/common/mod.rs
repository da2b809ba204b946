//! Fixture builders and checkers for the integration tests. They drive the real tools (mke2fs,
//! mkfs.fat, mtools, sgdisk, sfdisk, e2fsck, mount) and need root, as in CI.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// A loop device over `len` bytes of `img` from `offset` (read-only if asked); detached on drop.
pub struct Loop(pub String);

impl Loop {
    pub fn new(img: &Path, offset: u64, len: u64, read_only: bool) -> Loop {
        let ro = if read_only { "-r" } else { "" };
        let dev = sh(&format!(
            "losetup -f --show {ro} -o {offset} --sizelimit {len} {}",
            img.display()
        ));
        Loop(dev.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = sh_status(&format!("losetup -d {}", self.0));
    }
}

/// A scratch directory removed on drop.
pub struct Tmp(pub PathBuf);

impl Tmp {
    pub fn new(name: &str) -> Tmp {
        let base = std::env::var_os("BMR_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let p = base.join(format!("bmr-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
    pub fn s(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run a shell command; panic with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("bash").arg("-ec").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "command failed: {cmd}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a shell command, returning (success, stdout+stderr).
pub fn sh_status(cmd: &str) -> (bool, String) {
    let out = Command::new("bash").arg("-ec").arg(cmd).output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

pub fn bmr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bmr"))
        .args(args)
        .output()
        .unwrap()
}

/// Run bmr and require success.
pub fn bmr_ok(args: &[&str]) -> String {
    let out = bmr(args);
    assert!(
        out.status.success(),
        "bmr {args:?} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run bmr, require failure, and return its stderr (the error line).
pub fn bmr_fails(args: &[&str]) -> String {
    let out = bmr(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "bmr {args:?} should have failed\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("bmr: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    errors[0].to_string()
}

/// A tree of files with random content, nested directories, an empty file and a symlink.
pub fn populate(dir: &Path, seed: u32) {
    let d = dir.display();
    sh(&format!(
        "mkdir -p {d}/sub/deeper {d}/other && \
         head -c $((1024*1024 + {seed})) /dev/urandom > {d}/big.bin && \
         head -c 300000 /dev/urandom > {d}/sub/mid.bin && \
         for i in $(seq 1 40); do head -c $((i * 997)) /dev/urandom > {d}/sub/deeper/f$i; done && \
         echo 'hello from bmr {seed}' > {d}/other/hello.txt && : > {d}/empty && \
         ln -s other/hello.txt {d}/link"
    ));
}

/// A FAT-safe tree (no symlinks).
pub fn populate_fat(dir: &Path) {
    let d = dir.display();
    sh(&format!(
        "mkdir -p {d}/EFI/BOOT {d}/docs && head -c 700000 /dev/urandom > {d}/EFI/BOOT/BOOTX64.EFI && \
         for i in $(seq 1 25); do head -c $((i * 1511)) /dev/urandom > {d}/docs/file$i.txt; done"
    ));
}

#[derive(Clone, Debug)]
pub enum Content {
    /// ext2/3/4 image with the tree in `dir`.
    Ext { dir: PathBuf },
    /// FAT image with the tree in `dir`.
    Fat { dir: PathBuf },
    /// Raw random bytes.
    Raw,
}

#[derive(Clone, Debug)]
pub struct Part {
    pub number: u32,
    pub start: u64,
    pub len: u64,
    pub content: Content,
}

/// An ext filesystem image filled with random garbage first, so free space is not zero and a
/// restore that skipped a used block would show.
pub fn make_ext(img: &Path, size_mib: u64, fstype: &str, opts: &str, dir: &Path) {
    sh(&format!(
        "head -c {} /dev/urandom > {img} && mke2fs -q -F -t {fstype} -E nodiscard {opts} -d {dir} {img}",
        size_mib * MIB,
        img = img.display(),
        dir = dir.display()
    ));
}

pub fn make_fat(img: &Path, size_mib: u64, bits: u32, dir: &Path, extra: &str) {
    sh(&format!(
        "head -c {} /dev/urandom > {img} && mkfs.fat -F {bits} {extra} {img} >/dev/null && \
         mcopy -s -i {img} {dir}/* ::/",
        size_mib * MIB,
        img = img.display(),
        dir = dir.display()
    ));
}

pub fn place(disk: &Path, img: &Path, offset: u64) {
    sh(&format!(
        "dd if={} of={} bs=1M seek={offset} oflag=seek_bytes conv=notrunc status=none",
        img.display(),
        disk.display()
    ));
}

pub fn random_at(disk: &Path, offset: u64, len: u64) {
    sh(&format!(
        "head -c {len} /dev/urandom | dd of={} bs=64K seek={offset} oflag=seek_bytes conv=notrunc status=none",
        disk.display()
    ));
}

pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

pub fn extract(disk: &Path, offset: u64, len: u64, out: &Path) {
    sh(&format!(
        "dd if={} of={} bs=1M skip={offset} count={len} iflag=skip_bytes,count_bytes status=none",
        disk.display(),
        out.display()
    ));
}

/// Partitions as sfdisk sees them: (number, start byte, length bytes).
pub fn sfdisk_parts(disk: &Path) -> (serde_json::Value, Vec<(u32, u64, u64)>) {
    let json: serde_json::Value =
        serde_json::from_str(&sh(&format!("sfdisk -J {}", disk.display()))).unwrap();
    let pt = json["partitiontable"].clone();
    let ss = pt["sectorsize"].as_u64().unwrap_or(512);
    let name = disk.display().to_string();
    let parts = pt["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let num: u32 = node[name.len()..].parse().unwrap();
            (
                num,
                p["start"].as_u64().unwrap() * ss,
                p["size"].as_u64().unwrap() * ss,
            )
        })
        .collect();
    (pt, parts)
}

/// Used blocks of an ext image from dumpe2fs's free-block lists, as byte ranges.
pub fn ext_used_ranges(img: &Path) -> Vec<(u64, u64)> {
    let out = sh(&format!("dumpe2fs {} 2>/dev/null", img.display()));
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().parse().unwrap())
            .unwrap()
    };
    let bs = field("Block size:");
    let count = field("Block count:");
    let mut free = vec![false; count as usize];
    for l in out.lines() {
        let Some(list) = l.strip_prefix("  Free blocks: ") else {
            continue;
        };
        for item in list.split(", ").filter(|s| !s.is_empty()) {
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()),
                None => (item.parse().unwrap(), item.parse().unwrap()),
            };
            for blk in a..=b {
                free[blk as usize] = true;
            }
        }
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, f) in free.iter().enumerate() {
        if *f {
            continue;
        }
        let off = i as u64 * bs;
        match ranges.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += bs,
            _ => ranges.push((off, bs)),
        }
    }
    ranges
}

/// Mounted read-only with a loop device at an offset; unmounted on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn ext(disk: &Path, offset: u64, len: u64, at: &Path) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        sh(&format!(
            "mount -o ro,loop,offset={offset},sizelimit={len} {} {}",
            disk.display(),
            at.display()
        ));
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Check one restored partition against its fixture.
pub fn check_part(tmp: &Tmp, src: &Path, dst: &Path, p: &Part) {
    let tag = format!("p{}", p.number);
    let s_img = tmp.path(&format!("{tag}-src.img"));
    let d_img = tmp.path(&format!("{tag}-dst.img"));
    extract(src, p.start, p.len, &s_img);
    extract(dst, p.start, p.len, &d_img);
    match &p.content {
        Content::Raw => {
            sh(&format!("cmp {} {}", s_img.display(), d_img.display()));
        }
        Content::Ext { dir } => {
            let (ok, out) = sh_status(&format!("e2fsck -fn {}", d_img.display()));
            assert!(
                ok,
                "e2fsck of restored partition {} failed:\n{out}",
                p.number
            );
            for (off, len) in ext_used_ranges(&s_img) {
                assert!(
                    read_range(&s_img, off, len) == read_range(&d_img, off, len),
                    "partition {}: used bytes at {off}+{len} differ",
                    p.number
                );
            }
            let mnt = Mount::ext(dst, p.start, p.len, &tmp.path(&format!("{tag}-mnt")));
            sh(&format!(
                "diff -r --no-dereference -x lost+found {} {}",
                dir.display(),
                mnt.0.display()
            ));
        }
        Content::Fat { dir } => {
            let (ok, out) = sh_status(&format!("fsck.fat -n {}", d_img.display()));
            assert!(
                ok,
                "fsck.fat of restored partition {} failed:\n{out}",
                p.number
            );
            let out_dir = tmp.path(&format!("{tag}-files"));
            std::fs::create_dir_all(&out_dir).unwrap();
            sh(&format!(
                "mcopy -s -n -i {} ::/* {}/",
                d_img.display(),
                out_dir.display()
            ));
            sh(&format!("diff -r {} {}", dir.display(), out_dir.display()));
        }
    }
    let _ = std::fs::remove_file(&s_img);
    let _ = std::fs::remove_file(&d_img);
}

/// Bytes of the disk outside all partitions: (start, len) gaps, from sfdisk's view.
pub fn gaps(parts: &[(u64, u64)], disk_size: u64) -> Vec<(u64, u64)> {
    let mut v = parts.to_vec();
    v.sort();
    let mut out = Vec::new();
    let mut pos = 0;
    for (s, l) in v {
        if s > pos {
            out.push((pos, s - pos));
        }
        pos = pos.max(s + l);
    }
    if pos < disk_size {
        out.push((pos, disk_size - pos));
    }
    out
}

pub fn sha_file(p: &Path) -> String {
    sh(&format!("sha256sum {} | cut -d' ' -f1", p.display()))
}

/// A GPT disk image of `disk_mib` with partition 1 at 1 MiB holding an ext4 filesystem of
/// `ext_mib` made from `tree` (with extra mke2fs `opts`).
pub fn ext_disk(tmp: &Tmp, disk_mib: u64, ext_mib: u64, opts: &str, tree: &Path) -> PathBuf {
    let disk = tmp.path("src.img");
    sh(&format!(
        "truncate -s {disk_mib}M {d} && sgdisk -n 1:2048:+{ext_mib}M -t 1:8300 {d} >/dev/null",
        d = disk.display()
    ));
    let img = tmp.path("fs.img");
    make_ext(&img, ext_mib, "ext4", opts, tree);
    place(&disk, &img, MIB);
    let _ = std::fs::remove_file(&img);
    disk
}

/// A test HTTP server (tests/flaky_http.py) on loopback, killed on drop.
pub struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn serve(tmp: &Tmp, dir: &str, drop_every: u32) -> (Server, String) {
    serve_with(tmp, dir, drop_every, &[])
}

/// As `serve`, with extra server arguments (`--tls CERT KEY`, `--posts DIR`).
pub fn serve_with(tmp: &Tmp, dir: &str, drop_every: u32, extra: &[&str]) -> (Server, String) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let port_file = tmp.path(&format!("port-{n}"));
    // Wrapped in Server at once, which kills and waits for it on drop.
    let server = Server(
        std::process::Command::new("python3")
            .args([
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/flaky_http.py"),
                "--dir",
                dir,
                "--port-file",
                &port_file.display().to_string(),
                "--drop",
                &drop_every.to_string(),
            ])
            .args(extra)
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if let Ok(p) = std::fs::read_to_string(&port_file)
            && !p.is_empty()
        {
            let scheme = if extra.contains(&"--tls") {
                "https"
            } else {
                "http"
            };
            return (server, format!("{scheme}://127.0.0.1:{p}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("test HTTP server did not start");
}

/// A tmux session running one command, read through capture-pane.
pub struct Tmux(pub String);
impl Tmux {
    pub fn start(name: &str, cmd: &str) -> Tmux {
        sh(&format!(
            "tmux new-session -d -s {name} -x 160 -y 50 {}",
            shell_quote(cmd)
        ));
        Tmux(name.to_string())
    }
    pub fn screen(&self) -> String {
        sh(&format!("tmux capture-pane -p -S -200 -t {}", self.0))
    }
    pub fn wait(&self, what: &str) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if s.contains(what) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "timed out waiting for {what:?}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    pub fn keys(&self, keys: &str) {
        sh(&format!("tmux send-keys -t {} {keys}", self.0));
        std::thread::sleep(Duration::from_millis(300));
    }
    pub fn text(&self, text: &str) {
        sh(&format!(
            "tmux send-keys -t {} -l {}",
            self.0,
            shell_quote(text)
        ));
    }
}
impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = sh_status(&format!("tmux kill-session -t {}", self.0));
    }
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// nginx serving `dir` on 127.0.0.1, as a static web server in front of a repository would;
/// every request is logged (method, path, status) to the returned file.
pub struct Nginx {
    server: Server,
    pub url: String,
    pub log: PathBuf,
}

impl Nginx {
    pub fn start(tmp: &Tmp, dir: &str) -> Nginx {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = tmp.path(&format!("nginx-{n}"));
        std::fs::create_dir_all(&base).unwrap();
        let log = base.join("access.log");
        // A port the kernel just handed out; nginx binds it right after.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = base.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nuser root;\nworker_processes 1;\n\
                 pid {b}/nginx.pid;\nerror_log {b}/error.log;\nevents {{ worker_connections 64; }}\n\
                 http {{\n  log_format bmr '$request_method $uri $status';\n\
                 access_log {log} bmr;\n  client_body_temp_path {b}/body;\n\
                 proxy_temp_path {b}/proxy;\n  fastcgi_temp_path {b}/fastcgi;\n\
                 uwsgi_temp_path {b}/uwsgi;\n  scgi_temp_path {b}/scgi;\n\
                 server {{ listen 127.0.0.1:{port}; root {dir}; }}\n}}\n",
                b = base.display(),
                log = log.display(),
            ),
        )
        .unwrap();
        let server = Server(
            Command::new("nginx")
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(&base)
                .spawn()
                .expect("nginx (scripts/deps.sh installs it)"),
        );
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Nginx { server, url, log };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "nginx did not start: {}",
            std::fs::read_to_string(base.join("error.log")).unwrap_or_default()
        );
    }

    /// The requests logged so far as (method, path, status), and the log emptied.
    pub fn take_requests(&self) -> Vec<(String, String, u16)> {
        let _ = &self.server;
        // nginx writes each line when the request ends: the client has its answer by then,
        // but give the write a moment.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        std::fs::write(&self.log, "").unwrap();
        text.lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some((
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                    f.next()?.parse().ok()?,
                ))
            })
            .collect()
    }
}

/// The TUI's first steps: a repository by its path, the newest point of `host`, a target by
/// its path (the last two entries of the disk menu: "Enter a device path", "Look for disks
/// again").
pub fn tui_to_target(t: &Tmux, repo: &str, host: &str, target: &Path) {
    t.wait("Repository");
    t.keys("Down Enter");
    t.wait("Repository path");
    t.text(repo);
    t.keys("Enter");
    t.wait(&format!("Point in time for {host}"));
    t.keys("Enter");
    t.wait("Target disk");
    t.keys("Up Up Enter");
    t.wait("Device path");
    t.text(&target.display().to_string());
    t.keys("Enter");
}

/// A GPT disk image with an ext4 partition of files made from `seed`, backed up as host web1:
/// (repository, disk).
pub fn web1_image(tmp: &Tmp, seed: u32) -> (String, PathBuf) {
    let dir = tmp.path("tree");
    populate(&dir, seed);
    let disk = ext_disk(tmp, 48, 40, "", &dir);
    let repo = tmp.s("repo");
    bmr_ok(&[
        "backup",
        "--repo",
        &repo,
        "--host",
        "web1",
        &disk.display().to_string(),
    ]);
    (repo, disk)
}

/// Everything observable about a tree: kind, mode, owner, size, mtime, link target, content,
/// xattrs, and hard-link groups.
pub fn state(root: &Path) -> BTreeMap<Vec<u8>, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    fn walk(
        root: &Path,
        p: &Path,
        out: &mut BTreeMap<Vec<u8>, String>,
        inodes: &mut BTreeMap<(u64, u64), Vec<u8>>,
    ) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            if rel == b"lost+found" {
                continue;
            }
            let md = std::fs::symlink_metadata(&path).unwrap();
            let ft = md.file_type();
            let mut xattrs: Vec<String> = xattr_list(&path);
            xattrs.sort();
            let extra = if ft.is_symlink() {
                format!("-> {:?}", std::fs::read_link(&path).unwrap())
            } else if ft.is_file() {
                let data = std::fs::read(&path).unwrap();
                let first = inodes
                    .entry((md.dev(), md.ino()))
                    .or_insert_with(|| rel.clone())
                    .clone();
                format!(
                    "sha {} link-of {:?}",
                    sha(&data),
                    String::from_utf8_lossy(&first)
                )
            } else {
                String::new()
            };
            // Directory mtimes change as entries come and go; compare them too.
            out.insert(
                rel.clone(),
                format!(
                    "mode {:o} uid {} gid {} size {} mtime {}.{} {extra} xattrs {xattrs:?}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    if ft.is_dir() { 0 } else { md.size() },
                    md.mtime(),
                    md.mtime_nsec(),
                ),
            );
            if ft.is_dir() {
                walk(root, &path, out, inodes);
            }
        }
    }
    walk(root, root, &mut out, &mut inodes);
    out
}

pub fn xattr_list(p: &Path) -> Vec<String> {
    let Ok(names) = xattr::list(p) else {
        return Vec::new();
    };
    names
        .map(|n| {
            let v = xattr::get(p, &n).ok().flatten().unwrap_or_default();
            format!("{:?}={v:02x?}", n)
        })
        .collect()
}

pub fn sha(data: &[u8]) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(data);
    h.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

pub fn names(s: &BTreeMap<Vec<u8>, String>) -> Vec<String> {
    s.keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

/// Run bmr under /usr/bin/time (with extra environment); (output, peak RSS in KiB).
pub fn bmr_measured(env: &[(&str, &str)], args: &[&str]) -> (Output, u64) {
    let rss = std::env::temp_dir().join(format!(
        "bmr-rss-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        // A guard, not a timing assertion: a reader that hangs fails the test instead.
        .args(["timeout", "300", env!("CARGO_BIN_EXE_bmr")])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("/usr/bin/time (package time)");
    let text = std::fs::read_to_string(&rss).unwrap_or_default();
    let _ = std::fs::remove_file(&rss);
    let kib = text
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no RSS from /usr/bin/time: {text:?}"));
    (out, kib)
}
