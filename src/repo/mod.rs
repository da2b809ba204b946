//! The repository: a content-addressed chunk store plus per-host snapshot manifests.
//!
//! Reading goes through [`RepoSource`], so a local directory, a USB stick and (later) an HTTP(S)
//! server look the same to restore and verify. Writing is local only ([`local::LocalRepo`]).

pub mod http;
pub mod local;

use std::fmt;
use std::path::Path;

use anyhow::{Result, bail};
use sha2::{Digest as _, Sha256};

pub const REPO_FILE: &str = "bmr-repo.json";
pub const REPO_FORMAT: &str = "bmr-repository";
pub const REPO_VERSION: u32 = 1;
/// Largest amount of plain data in one chunk.
pub const CHUNK_SIZE: u64 = 4 << 20;

/// sha256 of a chunk's plain data: its name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Path of the chunk relative to the repository root.
    pub fn chunk_path(&self) -> String {
        let h = self.hex();
        format!("chunks/{}/{}", &h[..2], h)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.hex())
    }
}

/// Chunk files start with a zstd skippable frame holding the sha256 of the compressed payload, so
/// a chunk can be checked without decompressing and `zstd -d` still reads the file as is.
pub const CHUNK_HEADER_LEN: usize = 48;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5B;
const CHUNK_MAGIC: &[u8; 4] = b"BMRC";

pub fn chunk_header(payload: &[u8]) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[0..4].copy_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&40u32.to_le_bytes());
    h[8..12].copy_from_slice(CHUNK_MAGIC);
    h[12..16].copy_from_slice(&1u32.to_le_bytes());
    h[16..48].copy_from_slice(&Sha256::digest(payload));
    h
}

/// Split a stored chunk into (recorded payload hash, payload); None if the header is not ours.
pub fn parse_chunk(stored: &[u8]) -> Option<([u8; 32], &[u8])> {
    let h = stored.get(..CHUNK_HEADER_LEN)?;
    if h[0..4] != SKIPPABLE_MAGIC.to_le_bytes()
        || h[4..8] != 40u32.to_le_bytes()
        || &h[8..12] != CHUNK_MAGIC
        || h[12..16] != 1u32.to_le_bytes()
    {
        return None;
    }
    let mut sum = [0u8; 32];
    sum.copy_from_slice(&h[16..48]);
    Some((sum, &stored[CHUNK_HEADER_LEN..]))
}

/// Check a stored chunk against the payload hash the index recorded; returns the payload.
pub fn check_stored<'a>(stored: &'a [u8], expect: &[u8; 32]) -> Option<&'a [u8]> {
    let (sum, payload) = parse_chunk(stored)?;
    (sum == *expect && Sha256::digest(payload).as_slice() == expect).then_some(payload)
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
}

/// Read access to a repository. Implementations never need a directory listing.
pub trait RepoSource: Send + Sync {
    /// Human-readable location for messages.
    fn location(&self) -> String;
    /// A metadata file (config, host index, manifest, chunk index); Ok(None) if it does not exist.
    fn read_file(&self, rel: &str) -> Result<Option<Vec<u8>>>;
    /// The stored (compressed) bytes of a chunk.
    fn read_chunk(&self, digest: &Digest) -> Result<Vec<u8>>;
    /// Stored size of a chunk, None if it is missing.
    fn chunk_len(&self, digest: &Digest) -> Result<Option<u64>>;
    /// The local directory, when the repository is one (safety checks need it).
    fn local_path(&self) -> Option<&Path>;
}

/// Open a repository for reading from a path (later: URL).
pub fn open_source(spec: &str) -> Result<Box<dyn RepoSource>> {
    if spec.starts_with("http://") || spec.starts_with("https://") {
        return Ok(Box::new(http::HttpRepo::open(spec)?));
    }
    let repo = local::LocalRepo::open(Path::new(spec))?;
    Ok(Box::new(repo))
}

/// Check the repository marker file; every reader calls this first.
pub fn check_config(src: &dyn RepoSource) -> Result<()> {
    let Some(bytes) = src.read_file(REPO_FILE)? else {
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
