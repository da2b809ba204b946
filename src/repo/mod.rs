//! The repository layer: it owns the on-disk format and every access to it.
//!
//! - [`backend`]: the read and write traits a storage backend implements; [`local`] (a
//!   directory, a USB stick, NFS) and [`http`] (any static web server, read only) are the
//!   backends today.
//! - One file per format: [`chunk`] (chunk names and headers), [`chunkindex`] (an
//!   image's chunk index), [`toc`] (file lists), [`manifest`] (manifests and host indexes),
//!   [`paths`] (where each lives).
//! - [`reader`]: the one chunk reader every restore path uses.
//! - [`snapshot`]: choosing a snapshot (`--at`) and writing one (staged files, host index).

pub mod backend;
pub mod chunk;
pub mod chunkindex;
pub mod http;
pub mod local;
pub mod manifest;
pub mod paths;
pub mod reader;
pub mod snapshot;
pub mod toc;

use std::path::Path;

use anyhow::{Result, bail};

pub use backend::{RepoRead, RepoWrite};
pub use chunk::{CHUNK_SIZE, Digest};
pub use paths::REPO_FILE;

pub const REPO_FORMAT: &str = "bmr-repository";
pub const REPO_VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
}

/// Open a repository for reading: a directory, or an http(s):// URL. The marker file is
/// checked here, once.
pub fn open(spec: &str) -> Result<Box<dyn RepoRead>> {
    if spec.starts_with("http://") || spec.starts_with("https://") {
        return Ok(Box::new(http::HttpRepo::open(spec)?));
    }
    Ok(Box::new(local::LocalRepo::open(Path::new(spec))?))
}

/// Open a repository for writing; with `create`, a missing or empty directory becomes a new
/// repository.
pub fn open_write(path: &Path, create: bool) -> Result<Box<dyn RepoWrite>> {
    Ok(Box::new(if create {
        local::LocalRepo::open_or_init(path)?
    } else {
        local::LocalRepo::open(path)?
    }))
}

/// Check the repository marker file; every backend calls this when it opens.
pub fn check_config(src: &dyn RepoRead) -> Result<()> {
    let Some(bytes) = src.read_file(REPO_FILE, backend::limits::MARKER)? else {
        bail!(
            "{} is not a bmr repository (no {REPO_FILE}): check the --repo path",
            src.location()
        );
    };
    let cfg: RepoConfig = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}/{REPO_FILE} is damaged ({e}): check the --repo path",
            src.location()
        )
    })?;
    if cfg.format != REPO_FORMAT {
        bail!(
            "{} is not a bmr repository (format {:?}): check the --repo path",
            src.location(),
            cfg.format
        );
    }
    if cfg.version != REPO_VERSION {
        bail!(
            "repository {} has format version {}, this bmr understands version {REPO_VERSION}: use a matching bmr",
            src.location(),
            cfg.version
        );
    }
    Ok(())
}

/// Host names become directory names: keep them to a safe alphabet.
pub fn check_host_name(host: &str) -> Result<()> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('.')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("invalid host name {host:?}: use letters, digits, '-', '_' and '.'");
    }
    Ok(())
}
