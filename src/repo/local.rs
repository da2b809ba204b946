//! A repository in a local directory (disk, USB stick, NFS mount).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

use super::backend::{Lock, RepoRead, RepoWrite, StagedFile, StoredEntry, check_chunk_size};
use super::chunk::{CHUNK_HEADER_LEN, Digest, MAX_STORED_CHUNK, chunk_header, parse_chunk};
use super::paths;
use super::{REPO_FORMAT, REPO_VERSION, RepoConfig};

pub struct LocalRepo {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn tmp_name(dir: &Path, base: &str) -> PathBuf {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp.{base}.{}.{n}", std::process::id()))
}

/// Write `data` to a temporary file beside `path`, sync it, and rename it into place.
fn install(path: &Path, tmp_base: &str, sync_dir: bool, data: &[&[u8]]) -> Result<()> {
    let dir = path.parent().context("repository path has no parent")?;
    let tmp = tmp_name(dir, tmp_base);
    let res = (|| -> Result<()> {
        let mut f = File::create(&tmp)?;
        for d in data {
            f.write_all(d)?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if sync_dir {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

impl LocalRepo {
    /// Open an existing repository.
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
        for i in 0..=255u8 {
            fs::create_dir_all(root.join(paths::chunk_dir(i)))
                .with_context(|| format!("cannot create repository {}", root.display()))?;
        }
        fs::create_dir_all(root.join(paths::HOSTS_DIR))?;
        fs::create_dir_all(root.join(paths::LOCKS_DIR))?;
        let repo = LocalRepo {
            root: root.to_path_buf(),
        };
        repo.write_file(
            paths::HOSTS_FILE,
            &serde_json::to_vec_pretty(&super::manifest::HostList::default())?,
        )?;
        let cfg = RepoConfig {
            format: REPO_FORMAT.into(),
            version: REPO_VERSION,
        };
        // The marker goes last: a half-initialised directory is not mistaken for a repository.
        repo.write_file(paths::REPO_FILE, &serde_json::to_vec_pretty(&cfg)?)?;
        Ok(())
    }
}

/// A metadata file under a temporary name until committed.
struct LocalStaged {
    tmp: PathBuf,
    path: PathBuf,
    file: Option<std::io::BufWriter<File>>,
}

impl Write for LocalStaged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(std::io::Error::other("file already committed")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl StagedFile for LocalStaged {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let f = self.file.take().context("file already committed")?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
            .with_context(|| format!("cannot sync {}", self.tmp.display()))?;
        fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot install {}", self.path.display()))?;
        Ok(())
    }
}

impl Drop for LocalStaged {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl RepoRead for LocalRepo {
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

    fn read_chunk_into(&self, d: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        let path = self.root.join(paths::chunk(d));
        let ctx = || format!("cannot read chunk {}", path.display());
        let mut f = File::open(&path).with_context(ctx)?;
        let len = f.metadata().with_context(ctx)?.len();
        // The location is formatted only for the error: this runs for every chunk read.
        if len > MAX_STORED_CHUNK {
            check_chunk_size(d, len, &self.location())?;
        }
        buf.clear();
        buf.reserve(len as usize);
        f.read_to_end(buf).with_context(ctx)?;
        Ok(())
    }

    fn chunk_len(&self, d: &Digest) -> Result<Option<u64>> {
        match fs::metadata(self.root.join(paths::chunk(d))) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot stat chunk {d}")),
        }
    }

    fn local_path(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

impl RepoWrite for LocalRepo {
    fn chunk_info(&self, d: &Digest) -> Option<(u64, [u8; 32])> {
        let f = File::open(self.root.join(paths::chunk(d))).ok()?;
        let len = f.metadata().ok()?.len();
        let mut head = [0u8; CHUNK_HEADER_LEN];
        f.read_exact_at(&mut head, 0).ok()?;
        let (sum, _) = parse_chunk(&head)?;
        (len > CHUNK_HEADER_LEN as u64).then_some((len, sum))
    }

    fn put_chunk(&self, d: &Digest, payload: &[u8]) -> Result<(u64, [u8; 32], bool)> {
        if let Some((len, sum)) = self.chunk_info(d) {
            return Ok((len, sum, false));
        }
        let path = self.root.join(paths::chunk(d));
        let header = chunk_header(payload);
        let mut sum = [0u8; 32];
        sum.copy_from_slice(&header[16..48]);
        // The directory entry is made durable by `sync` (syncfs) before a manifest refers to
        // the chunk, not here: one directory fsync per chunk would cost more than the data.
        install(&path, &d.hex()[..16], false, &[&header, payload])
            .with_context(|| format!("cannot store chunk {}", path.display()))?;
        Ok(((header.len() + payload.len()) as u64, sum, true))
    }

    fn write_file(&self, rel: &str, data: &[u8]) -> Result<()> {
        let path = self.root.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        install(&path, "meta", true, &[data])
            .with_context(|| format!("cannot write {}", path.display()))
    }

    fn create_file(&self, rel: &str) -> Result<Box<dyn StagedFile>> {
        let path = self.root.join(rel);
        let dir = path.parent().context("repository path has no parent")?;
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = tmp_name(dir, "staged");
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(Box::new(LocalStaged {
            tmp,
            path,
            file: Some(std::io::BufWriter::new(file)),
        }))
    }

    fn sync(&self) -> Result<()> {
        let f = File::open(&self.root)?;
        nix::unistd::syncfs(&f).with_context(|| format!("cannot sync {}", self.root.display()))?;
        Ok(())
    }

    fn lock(&self, name: &str, exclusive: bool) -> Result<Lock> {
        let dir = self.root.join(paths::LOCKS_DIR);
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
        Ok(Lock(Box::new(file)))
    }

    fn list_files(&self, dir: &str) -> Result<Vec<String>> {
        let path = self.root.join(dir);
        let entries = match fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", path.display())),
        };
        Ok(entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }

    fn remove_file(&self, rel: &str) -> Result<()> {
        fs::remove_file(self.root.join(rel)).with_context(|| format!("cannot remove {rel}"))
    }

    fn list_chunks(&self, prefix: u8) -> Result<Vec<StoredEntry>> {
        let Ok(entries) = fs::read_dir(self.root.join(paths::chunk_dir(prefix))) else {
            return Ok(Vec::new());
        };
        Ok(entries
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let digest = (!name.starts_with(".tmp."))
                    .then(|| hex::decode(&name).ok().and_then(|b| Digest::from_slice(&b)))
                    .flatten();
                StoredEntry {
                    digest,
                    len: e.metadata().map(|m| m.len()).unwrap_or(0),
                    name,
                }
            })
            .collect())
    }

    fn remove_chunk(&self, prefix: u8, name: &str) -> Result<()> {
        let path = self.root.join(paths::chunk_dir(prefix)).join(name);
        fs::remove_file(&path).with_context(|| format!("cannot delete {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_appear_only_when_committed() {
        let dir = std::env::temp_dir().join(format!("bmr-local-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let repo = LocalRepo::open_or_init(&dir).unwrap();
        let rel = "hosts/h/snapshots/x.idx";
        let mut f = repo.create_file(rel).unwrap();
        f.write_all(b"partial").unwrap();
        drop(f);
        assert_eq!(repo.read_file(rel).unwrap(), None);
        assert!(repo.list_files("hosts/h/snapshots").unwrap().is_empty());
        let mut f = repo.create_file(rel).unwrap();
        f.write_all(b"whole").unwrap();
        f.commit().unwrap();
        assert_eq!(repo.read_file(rel).unwrap().as_deref(), Some(&b"whole"[..]));
        assert_eq!(repo.list_files("hosts/h/snapshots").unwrap(), ["x.idx"]);

        // A chunk is stored once, reads back whole, and a file too big for a chunk is refused
        // before it is read.
        let d = Digest::of(b"data");
        let (len, _, new) = repo.put_chunk(&d, b"payload").unwrap();
        assert!(new && len == (CHUNK_HEADER_LEN + 7) as u64);
        assert!(!repo.put_chunk(&d, b"payload").unwrap().2);
        let mut buf = Vec::new();
        repo.read_chunk_into(&d, &mut buf).unwrap();
        assert_eq!(&buf[CHUNK_HEADER_LEN..], b"payload");
        let big = Digest::of(b"big");
        let f = File::create(dir.join(paths::chunk(&big))).unwrap();
        f.set_len(crate::repo::chunk::MAX_STORED_CHUNK + 1).unwrap();
        let e = repo.read_chunk_into(&big, &mut buf).unwrap_err();
        assert!(e.to_string().contains("more than a chunk can be"), "{e:#}");
        let _ = fs::remove_dir_all(&dir);
    }
}
