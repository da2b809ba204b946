//! Snapshots as a whole: choosing one (`--at`) with everything a reader needs loaded and
//! checked, and writing one (locks, staged files, manifest, host index) so that a snapshot
//! appears in its host's index only once every file it names is durable.

use std::io::Write;

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use super::backend::{Lock, RepoRead, RepoWrite, StagedFile, limits};
use super::chunkindex::IndexReader;
use super::manifest::{
    self, HOST_INDEX_FORMAT, HostIndex, HostList, IncManifest, Kind, MANIFEST_VERSION, Manifest,
    SnapshotSummary,
};
use super::paths;

/// An image snapshot with its chunk index, loaded and checked against the manifest.
pub struct Loaded {
    pub manifest: Manifest,
    pub index: Vec<u8>,
}

impl Loaded {
    pub fn records(&self) -> Result<IndexReader<&[u8]>> {
        IndexReader::new(&self.index[..], &self.manifest.id)
    }
}

pub fn load_image(src: &dyn RepoRead, host: &str, id: &str) -> Result<Loaded> {
    let manifest = manifest::read_manifest(src, host, id)?;
    let index = manifest::read_chunk_index(src, &manifest)?;
    Ok(Loaded { manifest, index })
}

/// A point in time: its image, and the incremental on top of it when the point is one.
pub struct Point {
    pub image: Loaded,
    pub inc: Option<IncManifest>,
}

impl Point {
    /// The snapshot the point names (the incremental, or the image itself).
    pub fn id(&self) -> &str {
        self.inc
            .as_ref()
            .map_or(&self.image.manifest.id, |i| i.id.as_str())
    }

    pub fn unix_time(&self) -> i64 {
        self.inc
            .as_ref()
            .map_or(self.image.manifest.unix_time, |i| i.unix_time)
    }
}

/// Resolve `--at` (a snapshot id, `latest`, or a time) for a host and load what it needs.
pub fn resolve(src: &dyn RepoRead, host: &str, at: &str) -> Result<Point> {
    resolve_in(src, &manifest::read_host_index(src, host)?, at)
}

/// [`resolve`] with the host's index already loaded.
pub fn resolve_in(src: &dyn RepoRead, idx: &HostIndex, at: &str) -> Result<Point> {
    let host = idx.host.as_str();
    let sel = manifest::select(idx, at)?;
    let inc = match sel.kind {
        Kind::Incremental => Some(manifest::read_inc_manifest(src, host, &sel.id)?),
        Kind::Image => None,
    };
    let image_id = inc.as_ref().map_or(sel.id.clone(), |i| i.base.clone());
    Ok(Point {
        image: load_image(src, host, &image_id)?,
        inc,
    })
}

/// A staged repository file that hashes and counts what passes through, so the manifest can
/// name its checksum without reading it back.
pub struct HashedFile {
    inner: Box<dyn StagedFile>,
    hash: Sha256,
    len: u64,
}

impl Write for HashedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl HashedFile {
    /// Commit the file; (sha256 hex, length).
    pub fn commit(self) -> Result<(String, u64)> {
        let sum = hex::encode(self.hash.finalize());
        self.inner.commit()?;
        Ok((sum, self.len))
    }
}

/// One snapshot being written. Holds the repository lock shared (prune waits for it) and the
/// host lock exclusive (one backup of a host at a time) until it is dropped.
pub struct SnapshotWriter<'r> {
    repo: &'r dyn RepoWrite,
    pub host: String,
    pub id: String,
    pub unix_time: i64,
    /// RFC 3339, UTC.
    pub time: String,
    _repo_lock: Lock,
    _host_lock: Lock,
}

impl<'r> SnapshotWriter<'r> {
    pub fn begin(repo: &'r dyn RepoWrite, host: &str) -> Result<SnapshotWriter<'r>> {
        super::check_host_name(host)?;
        let repo_lock = repo.lock("repo", false)?;
        let host_lock = repo.lock(&format!("host-{host}"), true)?;
        let (unix_time, time) = crate::util::timefmt::now();
        Ok(SnapshotWriter {
            repo,
            host: host.to_string(),
            id: crate::util::timefmt::new_snapshot_id(unix_time),
            unix_time,
            time,
            _repo_lock: repo_lock,
            _host_lock: host_lock,
        })
    }

    fn staged(&self, rel: &str) -> Result<HashedFile> {
        Ok(HashedFile {
            inner: self.repo.create_file(rel)?,
            hash: Sha256::new(),
            len: 0,
        })
    }

    /// The chunk index of this (image) snapshot.
    pub fn index_file(&self) -> Result<HashedFile> {
        self.staged(&paths::index(&self.host, &self.id))
    }

    /// The file list of area `area`.
    pub fn toc_file(&self, area: u32, volume: Option<usize>) -> Result<HashedFile> {
        self.staged(&paths::toc(&self.host, &self.id, area, volume))
    }

    /// Make the chunks durable, then the staged file: a file that names chunks never
    /// appears before them.
    pub fn commit_file(&self, f: HashedFile) -> Result<(String, u64)> {
        self.repo.sync()?;
        f.commit()
    }

    pub fn commit_image(self, m: &Manifest) -> Result<()> {
        self.commit_manifest(
            &serde_json::to_vec_pretty(m)?,
            SnapshotSummary {
                id: m.id.clone(),
                kind: m.kind,
                time: m.time.clone(),
                unix_time: m.unix_time,
                disk_size: m.disk.size,
                used_bytes: m.stats.used_bytes,
                new_bytes: m.stats.new_bytes,
                base: None,
            },
        )
    }

    pub fn commit_incremental(self, m: &IncManifest, disk_size: u64) -> Result<()> {
        self.commit_manifest(
            &serde_json::to_vec_pretty(m)?,
            SnapshotSummary {
                id: m.id.clone(),
                kind: Kind::Incremental,
                time: m.time.clone(),
                unix_time: m.unix_time,
                disk_size,
                used_bytes: m.stats.used_bytes,
                new_bytes: m.stats.new_bytes,
                base: Some(m.base.clone()),
            },
        )
    }

    fn commit_manifest(self, json: &[u8], summary: SnapshotSummary) -> Result<()> {
        self.repo.sync()?;
        self.repo
            .write_file(&paths::manifest(&self.host, &self.id), json)?;
        add_to_host_index(self.repo, &self.host, summary)
    }
}

/// Add a snapshot to its host's index and the host to the repository's host list. The caller
/// holds the host lock.
fn add_to_host_index(repo: &dyn RepoWrite, host: &str, summary: SnapshotSummary) -> Result<()> {
    let path = paths::host_index(host);
    let mut idx = match repo.read_file(&path, limits::JSON)? {
        Some(_) => manifest::read_host_index(repo, host)?,
        None => HostIndex {
            format: HOST_INDEX_FORMAT.into(),
            version: MANIFEST_VERSION,
            host: host.to_string(),
            snapshots: Vec::new(),
        },
    };
    idx.snapshots.push(summary);
    write_host_index(repo, &idx)?;

    let _l = repo.lock("hosts", true)?;
    let mut hosts: HostList = match repo.read_file(paths::HOSTS_FILE, limits::JSON)? {
        Some(b) => serde_json::from_slice(&b).context("hosts.json in the repository is damaged")?,
        None => HostList::default(),
    };
    if !hosts.hosts.iter().any(|h| h == host) {
        hosts.hosts.push(host.to_string());
        hosts.hosts.sort();
        repo.write_file(paths::HOSTS_FILE, &serde_json::to_vec_pretty(&hosts)?)?;
    }
    Ok(())
}

/// Replace a host's snapshot index (the caller holds the host lock).
pub fn write_host_index(repo: &dyn RepoWrite, idx: &HostIndex) -> Result<()> {
    repo.write_file(
        &paths::host_index(&idx.host),
        &serde_json::to_vec_pretty(idx)?,
    )
}
