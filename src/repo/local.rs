//! A repository in a local directory (disk, USB stick, NFS mount).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

use super::backend::{Lock, RepoRead, RepoWrite, StagedFile, StoredEntry, check_chunk_size};
use super::chunk::{
    CHUNK_HEADER_LEN, DAMAGED_SUFFIX, Digest, MAX_STORED_CHUNK, check_stored, chunk_header,
    frame_len, parse_chunk,
};
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

    fn read_file(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let path = self.root.join(rel);
        let ctx = || format!("cannot read {}", path.display());
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(ctx),
        };
        let too_big = |n: String| {
            anyhow::anyhow!(
                "{} is {n}, more than bmr accepts for this file ({max} bytes): the repository is damaged",
                path.display()
            )
        };
        let len = f.metadata().with_context(ctx)?.len();
        if len > max {
            return Err(too_big(format!("{len} bytes")));
        }
        // Counted as well: the file may grow while it is read (or be a FIFO or a device).
        let mut b = Vec::with_capacity(len as usize);
        f.take(max + 1).read_to_end(&mut b).with_context(ctx)?;
        if b.len() as u64 > max {
            return Err(too_big(format!("more than {max} bytes")));
        }
        Ok(Some(b))
    }

    fn read_chunk_into(&self, d: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        let path = self.root.join(paths::chunk(d));
        let ctx = || format!("cannot read chunk {}", path.display());
        let f = File::open(&path).with_context(ctx)?;
        let len = f.metadata().with_context(ctx)?.len();
        // The location is formatted only for the error: this runs for every chunk read.
        if len > MAX_STORED_CHUNK {
            check_chunk_size(d, len, &self.location())?;
        }
        buf.clear();
        buf.reserve(len as usize);
        // Counted too: the file may have grown since it was measured.
        f.take(MAX_STORED_CHUNK + 1)
            .read_to_end(buf)
            .with_context(ctx)?;
        if buf.len() as u64 > MAX_STORED_CHUNK {
            check_chunk_size(d, buf.len() as u64, &self.location())?;
        }
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
    fn chunk_info(&self, d: &Digest, plain_len: u64, full: bool) -> Option<(u64, [u8; 32])> {
        let f = File::open(self.root.join(paths::chunk(d))).ok()?;
        let len = f.metadata().ok()?.len();
        if len <= CHUNK_HEADER_LEN as u64 || len > MAX_STORED_CHUNK {
            return None;
        }
        if full {
            let mut stored = Vec::with_capacity(len as usize);
            (&f).take(MAX_STORED_CHUNK).read_to_end(&mut stored).ok()?;
            let (sum, payload) = parse_chunk(&stored)?;
            return (check_stored(&stored, &sum).is_some()
                && frame_len(payload) == Some(plain_len))
            .then_some((len, sum));
        }
        // The header and the zstd frame header (at most 18 bytes) in one small read.
        let mut head = [0u8; CHUNK_HEADER_LEN + 18];
        let n = (len as usize).min(head.len());
        f.read_exact_at(&mut head[..n], 0).ok()?;
        let (sum, payload) = parse_chunk(&head[..n])?;
        (frame_len(payload) == Some(plain_len)).then_some((len, sum))
    }

    fn put_chunk(
        &self,
        d: &Digest,
        payload: &[u8],
        replace: bool,
    ) -> Result<(u64, [u8; 32], bool)> {
        // Another backup (of another host) may have stored it meanwhile: keep that one, its
        // stored size and hash are what the other snapshot recorded.
        if !replace
            && let Some(plain) = frame_len(payload)
            && let Some((len, sum)) = self.chunk_info(d, plain, false)
        {
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

    fn set_aside_chunk(&self, d: &Digest) -> Result<()> {
        let path = self.root.join(paths::chunk(d));
        let aside = path.with_file_name(format!("{}{DAMAGED_SUFFIX}", d.hex()));
        fs::rename(&path, &aside).with_context(|| format!("cannot move {} aside", path.display()))
    }

    fn file_len(&self, rel: &str) -> Option<u64> {
        fs::symlink_metadata(self.root.join(rel))
            .ok()
            .map(|m| m.len())
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
        assert_eq!(repo.read_file(rel, 100).unwrap(), None);
        assert!(repo.list_files("hosts/h/snapshots").unwrap().is_empty());
        let mut f = repo.create_file(rel).unwrap();
        f.write_all(b"whole").unwrap();
        f.commit().unwrap();
        assert_eq!(
            repo.read_file(rel, 100).unwrap().as_deref(),
            Some(&b"whole"[..])
        );
        let e = repo.read_file(rel, 4).unwrap_err().to_string();
        assert!(e.contains("x.idx is 5 bytes, more than bmr accepts"), "{e}");
        assert_eq!(repo.list_files("hosts/h/snapshots").unwrap(), ["x.idx"]);

        // A chunk is stored once, reads back whole, and a file too big for a chunk is refused
        // before it is read.
        let d = Digest::of(b"data");
        let z = zstd::bulk::compress(b"data", 1).unwrap();
        let (len, _, new) = repo.put_chunk(&d, &z, false).unwrap();
        assert!(new && len == (CHUNK_HEADER_LEN + z.len()) as u64);
        assert!(!repo.put_chunk(&d, &z, false).unwrap().2);
        assert!(repo.chunk_info(&d, 4, true).is_some());
        assert!(
            repo.chunk_info(&d, 5, false).is_none(),
            "wrong plain length"
        );
        let mut buf = Vec::new();
        repo.read_chunk_into(&d, &mut buf).unwrap();
        assert_eq!(&buf[CHUNK_HEADER_LEN..], &z[..]);
        let big = Digest::of(b"big");
        let f = File::create(dir.join(paths::chunk(&big))).unwrap();
        f.set_len(crate::repo::chunk::MAX_STORED_CHUNK + 1).unwrap();
        let e = repo.read_chunk_into(&big, &mut buf).unwrap_err();
        assert!(e.to_string().contains("more than a chunk can be"), "{e:#}");
        let _ = fs::remove_dir_all(&dir);
    }
}
