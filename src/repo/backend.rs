//! What a repository backend provides. Readers need no directory listing, so a local
//! directory, a USB stick and any static web server serve restores alike; writers add
//! atomic files, chunk storage, locks and the listings maintenance needs. A new backend
//! (an object store, an encrypting layer) implements these two traits and nothing else
//! changes.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use super::chunk::{Digest, MAX_STORED_CHUNK};

/// Read access to a repository.
pub trait RepoRead: Send + Sync {
    /// Human-readable location for messages (never with credentials in it).
    fn location(&self) -> String;
    /// A metadata file (config, host index, manifest, chunk index, file list); Ok(None) if it
    /// does not exist. A file larger than `max` (see [`limits`]) is refused before it is read
    /// into memory, with one line naming it and the cap.
    fn read_file(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>>;
    /// The stored (compressed) bytes of a chunk, into `buf` (replacing what it held). A
    /// backend refuses a chunk larger than [`MAX_STORED_CHUNK`] before reading it.
    fn read_chunk_into(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()>;
    /// Stored size of a chunk, None if it is missing.
    fn chunk_len(&self, digest: &Digest) -> Result<Option<u64>>;
    /// The local directory, when the repository is one (safety checks need it).
    fn local_path(&self) -> Option<&Path>;
}

/// The most a reader takes into memory for each kind of metadata file. A repository holding
/// more is damaged or hostile; refusing it keeps a rescue system (which runs from RAM) alive.
pub mod limits {
    /// `bmr-repo.json`: two fields.
    pub const MARKER: u64 = 64 << 10;
    /// A manifest, a host's snapshot index, `hosts.json`: tens of thousands of snapshots fit.
    pub const JSON: u64 = 64 << 20;
    /// A chunk index or a file list: the manifest declares its exact length; this caps the
    /// declaration (a file list of about thirty million entries).
    pub const BINARY: u64 = 1 << 30;
}

/// A file being written (chunk index, file list): invisible under its name until `commit`,
/// removed if dropped uncommitted.
pub trait StagedFile: Write + Send {
    /// Make the file durable and give it its name.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// A held repository lock; released on drop.
pub struct Lock(#[allow(dead_code)] pub(crate) Box<dyn Send>);

/// A stored object `prune` may consider.
pub struct StoredEntry {
    /// The chunk, or None for an unfinished upload or temporary file left by a crash.
    pub digest: Option<Digest>,
    pub name: String,
    pub len: u64,
}

/// Write access: everything backup, incremental, forget and prune do to a repository.
pub trait RepoWrite: RepoRead {
    /// Stored size and payload hash of a chunk that is present and intact enough to reuse for
    /// `plain_len` bytes of plain data: its header is ours and its zstd frame declares that
    /// length; with `full`, the stored payload also hashes to what its header records (a read
    /// of the chunk). None means: store it (again) with `put_chunk`.
    fn chunk_info(&self, digest: &Digest, plain_len: u64, full: bool) -> Option<(u64, [u8; 32])>;
    /// Store a compressed chunk; only a complete chunk ever appears under its name. Without
    /// `replace`, a chunk another writer stored meanwhile is kept; with it, what is there (a
    /// damaged chunk) is overwritten. Returns (stored length, payload hash, newly written).
    fn put_chunk(
        &self,
        digest: &Digest,
        payload: &[u8],
        replace: bool,
    ) -> Result<(u64, [u8; 32], bool)>;
    /// Move a damaged chunk aside (`NAME.damaged`, kept for inspection until `prune`), so the
    /// next backup holding its data stores it again instead of reusing it.
    fn set_aside_chunk(&self, digest: &Digest) -> Result<()>;
    /// Size of a metadata file, None if it does not exist.
    fn file_len(&self, rel: &str) -> Option<u64>;
    /// Replace a metadata file atomically and durably.
    fn write_file(&self, rel: &str, data: &[u8]) -> Result<()>;
    /// Start a metadata file written piece by piece.
    fn create_file(&self, rel: &str) -> Result<Box<dyn StagedFile>>;
    /// Make every chunk stored so far durable: called before a manifest refers to them.
    fn sync(&self) -> Result<()>;
    /// Take a named lock (exclusive or shared), waiting for other holders.
    fn lock(&self, name: &str, exclusive: bool) -> Result<Lock>;
    /// Names of the files in a metadata directory (not chunks).
    fn list_files(&self, dir: &str) -> Result<Vec<String>>;
    fn remove_file(&self, rel: &str) -> Result<()>;
    /// The stored objects under one of the 256 chunk prefixes.
    fn list_chunks(&self, prefix: u8) -> Result<Vec<StoredEntry>>;
    fn remove_chunk(&self, prefix: u8, name: &str) -> Result<()>;
}

/// Refuse a declared chunk size before taking memory for it.
pub fn check_chunk_size(digest: &Digest, len: u64, location: &str) -> Result<()> {
    if len > MAX_STORED_CHUNK {
        anyhow::bail!(
            "chunk {digest} in {location} is {len} bytes, more than a chunk can be ({MAX_STORED_CHUNK}): the repository is damaged; run bmr verify"
        );
    }
    Ok(())
}
