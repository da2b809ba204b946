//! A repository in a local directory (disk, USB stick, NFS mount).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

use super::{Digest, REPO_FILE, REPO_FORMAT, REPO_VERSION, RepoConfig, RepoSource};

pub struct LocalRepo {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn tmp_name(dir: &Path, base: &str) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp.{base}.{}.{n}", std::process::id()))
}

/// A held flock; released on drop.
pub struct Lock {
    _file: File,
}

impl LocalRepo {
    /// Open an existing repository for reading.
    pub fn open(root: &Path) -> Result<LocalRepo> {
        if !root.is_dir() {
            bail!(
                "{} is not a bmr repository (no such directory): check the --repo path",
                root.display()
            );
        }
        let repo = LocalRepo {
            root: root.to_path_buf(),
        };
        super::check_config(&repo)?;
        Ok(repo)
    }

    /// Open for writing, creating the repository when the directory is missing or empty.
    pub fn open_or_init(root: &Path) -> Result<LocalRepo> {
        let empty = match fs::read_dir(root) {
            Ok(mut d) => d.next().is_none(),
            Err(e) if e.kind() == ErrorKind::NotFound => true,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", root.display()));
            }
        };
        if empty {
            Self::init(root)?;
        }
        Self::open(root)
    }

    fn init(root: &Path) -> Result<()> {
        fs::create_dir_all(root.join("chunks"))
            .with_context(|| format!("cannot create repository {}", root.display()))?;
        for i in 0..=255u8 {
            fs::create_dir_all(root.join("chunks").join(format!("{i:02x}"))).with_context(
                || format!("cannot create chunk directories in {}", root.display()),
            )?;
        }
        fs::create_dir_all(root.join("hosts"))?;
        fs::create_dir_all(root.join("locks"))?;
        let repo = LocalRepo {
            root: root.to_path_buf(),
        };
        repo.write_atomic(
            "hosts.json",
            &serde_json::to_vec_pretty(&crate::manifest::HostList::default())?,
        )?;
        let cfg = RepoConfig {
            format: REPO_FORMAT.into(),
            version: REPO_VERSION,
        };
        // The marker goes last: a half-initialised directory is not mistaken for a repository.
        repo.write_atomic(REPO_FILE, &serde_json::to_vec_pretty(&cfg)?)?;
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Size and recorded payload hash of a stored chunk, None if missing or not intact enough
    /// to reuse (a damaged header is replaced by the next backup that needs the chunk).
    pub fn chunk_info(&self, d: &Digest) -> Option<(u64, [u8; 32])> {
        use std::os::unix::fs::FileExt;
        let f = File::open(self.root.join(d.chunk_path())).ok()?;
        let len = f.metadata().ok()?.len();
        let mut head = [0u8; super::CHUNK_HEADER_LEN];
        f.read_exact_at(&mut head, 0).ok()?;
        let (sum, _) = super::parse_chunk(&head)?;
        (len > super::CHUNK_HEADER_LEN as u64).then_some((len, sum))
    }

    /// Store a compressed chunk. Written under a temporary name, synced, then renamed, so a
    /// crash never leaves a partial chunk under its real name. Returns (stored length, payload
    /// hash, newly written).
    pub fn put_chunk(&self, d: &Digest, payload: &[u8]) -> Result<(u64, [u8; 32], bool)> {
        let path = self.root.join(d.chunk_path());
        if let Some((len, sum)) = self.chunk_info(d) {
            return Ok((len, sum, false));
        }
        let header = super::chunk_header(payload);
        let mut sum = [0u8; 32];
        sum.copy_from_slice(&header[16..48]);
        let dir = path.parent().context("chunk path has no parent")?;
        let tmp = tmp_name(dir, &d.hex()[..16]);
        let res = (|| -> Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&header)?;
            f.write_all(payload)?;
            f.sync_data()?;
            fs::rename(&tmp, &path)?;
            Ok(())
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot store chunk {}", path.display()));
        }
        Ok(((header.len() + payload.len()) as u64, sum, true))
    }

    /// Replace a metadata file atomically and durably.
    pub fn write_atomic(&self, rel: &str, data: &[u8]) -> Result<()> {
        let path = self.root.join(rel);
        let dir = path.parent().context("metadata path has no parent")?;
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = tmp_name(dir, "meta");
        let res = (|| -> Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()?;
            Ok(())
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", path.display()));
        }
        Ok(())
    }

    /// Flush everything written so far (all chunks) to stable storage.
    pub fn sync_all(&self) -> Result<()> {
        let f = File::open(&self.root)?;
        nix::unistd::syncfs(&f).with_context(|| format!("cannot sync {}", self.root.display()))?;
        Ok(())
    }

    /// Take an flock under locks/ (exclusive or shared), waiting for other holders.
    pub fn lock(&self, name: &str, exclusive: bool) -> Result<Lock> {
        let dir = self.root.join("locks");
        fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open lock {}", path.display()))?;
        let op = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        #[allow(deprecated)]
        nix::fcntl::flock(file.as_raw_fd(), op)
            .with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(Lock { _file: file })
    }
}

impl RepoSource for LocalRepo {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn read_file(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let path = self.root.join(rel);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn read_chunk(&self, d: &Digest) -> Result<Vec<u8>> {
        let path = self.root.join(d.chunk_path());
        fs::read(&path).with_context(|| format!("cannot read chunk {}", path.display()))
    }

    fn chunk_len(&self, d: &Digest) -> Result<Option<u64>> {
        match fs::metadata(self.root.join(d.chunk_path())) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot stat chunk {d}")),
        }
    }

    fn local_path(&self) -> Option<&Path> {
        Some(&self.root)
    }
}
