//! Repositories on local media: every attached filesystem is mounted read-only and searched
//! (its top three directory levels) for a repository, or one is named on the command line as
//! `label:NAME[:/path]`, `uuid:UUID[:/path]` or `dev:/dev/sdb1[:/path]`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::device::mount::MountGuard;
use crate::repo::REPO_FILE;

pub use crate::fs::id::Fs;

/// Every identified filesystem on the attached block devices.
pub fn blkid() -> Vec<Fs> {
    crate::fs::id::scan()
}

/// The whole disk a partition node belongs to (`sdb1` -> `sdb`, `nvme0n1p2` -> `nvme0n1`).
pub fn disk_of(dev: &str) -> String {
    let name = dev.rsplit('/').next().unwrap_or(dev);
    let sys = Path::new("/sys/class/block").join(name);
    if sys.join("partition").exists()
        && let Ok(real) = fs::canonicalize(&sys)
        && let Some(parent) = real.parent().and_then(|p| p.file_name())
    {
        return parent.to_string_lossy().to_string();
    }
    name.to_string()
}

/// A repository found on a mounted filesystem.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    pub fs: Fs,
    pub hosts: Vec<String>,
}

impl Found {
    pub fn describe(&self) -> String {
        let mut s = self.path.display().to_string();
        if !self.fs.dev.is_empty() {
            s.push_str(&format!(" on {}", self.fs.dev));
        }
        if !self.fs.label.is_empty() {
            s.push_str(&format!(" (label {})", self.fs.label));
        }
        match self.hosts.len() {
            0 => s.push_str(", no hosts yet"),
            _ => s.push_str(&format!(", hosts: {}", self.hosts.join(" "))),
        }
        s
    }
}

/// Mounted media stay mounted while the value lives.
#[derive(Default)]
pub struct Media {
    mounts: Vec<(String, PathBuf, Option<MountGuard>)>,
}

/// Where a device is already mounted, from /proc/self/mountinfo.
fn mounted_at(dev: &str) -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let real = fs::canonicalize(dev).ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let src = post.split_whitespace().nth(1)?;
        let dir = pre.split_whitespace().nth(4)?;
        (fs::canonicalize(src).ok()? == real).then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

const MOUNTABLE: &[&str] = &[
    "ext2", "ext3", "ext4", "vfat", "exfat", "ntfs", "xfs", "btrfs", "iso9660",
];

impl Media {
    /// Mount `fs` read-only (or reuse where it is mounted already); None if it cannot be.
    pub fn mount(&mut self, f: &Fs) -> Option<PathBuf> {
        if let Some((_, p, _)) = self.mounts.iter().find(|(d, _, _)| *d == f.dev) {
            return Some(p.clone());
        }
        if let Some(p) = mounted_at(&f.dev) {
            self.mounts.push((f.dev.clone(), p.clone(), None));
            return Some(p);
        }
        if !MOUNTABLE.contains(&f.fstype.as_str()) {
            return None;
        }
        let name = f.dev.rsplit('/').next().unwrap_or("dev");
        let dir = Path::new("/run/bmr/media").join(name);
        fs::create_dir_all(&dir).ok()?;
        let fstype = if f.fstype == "ntfs" {
            "ntfs3"
        } else {
            f.fstype.as_str()
        };
        use nix::mount::{MsFlags, mount};
        let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let mut ok = mount(
            Some(f.dev.as_str()),
            &dir,
            Some(fstype),
            flags,
            None::<&str>,
        )
        .is_ok();
        // A filesystem with a journal to replay cannot be mounted read-only without skipping it.
        if !ok && fstype.starts_with("ext") {
            ok = mount(
                Some(f.dev.as_str()),
                &dir,
                Some(fstype),
                flags,
                Some("noload"),
            )
            .is_ok();
        }
        if !ok {
            let _ = fs::remove_dir(&dir);
            return None;
        }
        self.mounts.push((
            f.dev.clone(),
            dir.clone(),
            Some(MountGuard { dir: dir.clone() }),
        ));
        Some(dir)
    }

    /// Mount every filesystem and return the repositories on them.
    pub fn discover(&mut self) -> Vec<Found> {
        let mut found = Vec::new();
        for f in blkid() {
            if let Some(root) = self.mount(&f) {
                for path in search(&root) {
                    found.push(Found {
                        hosts: hosts_of(&path),
                        path,
                        fs: f.clone(),
                    });
                }
            }
        }
        found
    }

    /// Devices this process mounted or found repositories on (never restore targets).
    pub fn devices(&self) -> Vec<String> {
        self.mounts.iter().map(|(d, _, _)| d.clone()).collect()
    }
}

fn is_repo(dir: &Path) -> bool {
    dir.join(REPO_FILE).is_file()
}

/// The repositories at `root` or up to three directory levels below it.
pub fn search(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut level = vec![root.to_path_buf()];
    for depth in 0..4 {
        let mut next = Vec::new();
        for d in level {
            if is_repo(&d) {
                out.push(d);
                continue;
            }
            if depth == 3 {
                continue;
            }
            let Ok(rd) = fs::read_dir(&d) else { continue };
            // Bounded: a huge data disk must not stall the search.
            for e in rd.flatten().take(2000) {
                let n = e.file_name();
                if n == "lost+found" || n.to_string_lossy().starts_with('.') {
                    continue;
                }
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    next.push(e.path());
                }
            }
        }
        next.sort();
        level = next;
    }
    out
}

fn hosts_of(repo: &Path) -> Vec<String> {
    let Ok(b) = fs::read(repo.join(crate::repo::paths::HOSTS_FILE)) else {
        return Vec::new();
    };
    serde_json::from_slice::<crate::repo::manifest::HostList>(&b)
        .map(|l| l.hosts)
        .unwrap_or_default()
}

/// The filesystem `label:NAME`, `uuid:UUID` or `dev:/dev/X` names, if it is there.
fn medium(kind: &str, what: &str) -> Option<Fs> {
    blkid().into_iter().find(|f| match kind {
        "label" => f.label == what,
        "uuid" => f.uuid.eq_ignore_ascii_case(what),
        _ => {
            fs::canonicalize(&f.dev).ok() == fs::canonicalize(what).ok() && Path::new(what).exists()
        }
    })
}

/// A file on a medium, for secrets that must not be on the kernel command line:
/// `label:NAME:/path`, `uuid:UUID:/path`, `dev:/dev/X:/path` (the medium mounted read-only),
/// or an absolute path. Ok(None): that medium is not there (yet).
pub fn resolve_file(media: &mut Media, spec: &str, param: &str) -> Result<Option<PathBuf>> {
    let Some((kind, rest)) = spec
        .split_once(':')
        .filter(|(k, _)| matches!(*k, "label" | "uuid" | "dev"))
    else {
        let p = Path::new(spec);
        if !p.is_absolute() {
            bail!(
                "{param}={spec}: use label:NAME:/path, uuid:UUID:/path, dev:/dev/X:/path or an absolute path"
            );
        }
        return Ok(p.is_file().then(|| p.to_path_buf()));
    };
    let Some((what, sub)) = rest.split_once(":/") else {
        bail!("{param}={spec}: name the file on the medium, e.g. {param}={kind}:{rest}:/bmr/key");
    };
    let Some(f) = medium(kind, what) else {
        return Ok(None);
    };
    let Some(root) = media.mount(&f) else {
        bail!(
            "{param}: cannot mount {} read-only: check the filesystem",
            f.dev
        );
    };
    let p = root.join(sub);
    if !p.is_file() {
        bail!("{param}: no file /{sub} on {} ({spec})", f.dev);
    }
    Ok(Some(p))
}

/// Resolve a local repository spec to a directory, mounting what it names.
/// Ok(None) means: not found yet (the medium may still appear).
pub fn resolve(media: &mut Media, spec: &str) -> Result<Option<Found>> {
    let (kind, rest) = match spec.split_once(':') {
        Some((k @ ("label" | "uuid" | "dev"), r)) => (k, r),
        _ => {
            let p = Path::new(spec);
            if !p.is_absolute() {
                bail!(
                    "repository {spec:?}: use an http(s):// URL, label:NAME[:/path], uuid:UUID[:/path], dev:/dev/X[:/path] or an absolute path"
                );
            }
            if !is_repo(p) {
                return Ok(None);
            }
            return Ok(Some(Found {
                path: p.to_path_buf(),
                fs: Fs::default(),
                hosts: hosts_of(p),
            }));
        }
    };
    // `dev:/dev/sdb1:/path`: the device itself contains no ':'.
    let (what, sub) = match rest.split_once(":/") {
        Some((w, s)) => (w, Some(format!("/{s}"))),
        None => (rest, None),
    };
    let Some(f) = medium(kind, what) else {
        return Ok(None);
    };
    let Some(root) = media.mount(&f) else {
        bail!(
            "cannot mount {} ({}) read-only: check the filesystem",
            f.dev,
            if f.fstype.is_empty() {
                "unknown type"
            } else {
                &f.fstype
            }
        );
    };
    let path = match &sub {
        Some(s) => {
            let p = root.join(s.trim_start_matches('/'));
            if !is_repo(&p) {
                bail!(
                    "{} on {} is not a bmr repository (no {REPO_FILE}): check the path in bmr.repo",
                    s,
                    f.dev
                );
            }
            p
        }
        None => match search(&root).as_slice() {
            [p] => p.clone(),
            [] => bail!(
                "no bmr repository on {} ({spec}): give its path, e.g. {spec}:/backups",
                f.dev
            ),
            many => bail!(
                "{} repositories on {}: name one, e.g. {spec}:{}",
                many.len(),
                f.dev,
                many[0]
                    .strip_prefix(&root)
                    .map(|p| format!("/{}", p.display()))
                    .unwrap_or_default()
            ),
        },
    };
    Ok(Some(Found {
        hosts: hosts_of(&path),
        path,
        fs: f.clone(),
    }))
}
