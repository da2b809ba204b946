//! [`ChunkReader`]: the one way data comes out of the chunk store, for every reader (restore,
//! file restore, incremental apply, verify): fetch, header, decompress into the caller's
//! buffer, length and digest check.

use std::fmt;

use super::backend::RepoRead;
use super::chunk::{CHUNK_SIZE, Digest, parse_chunk};

/// log2 of [`CHUNK_SIZE`]: the largest zstd window a chunk's frame can need.
const CHUNK_WINDOW_LOG: u32 = CHUNK_SIZE.trailing_zeros();

/// What an image's chunk index knows of a stored chunk beyond its name; file lists of
/// incrementals know only the name and the plain length.
#[derive(Clone, Copy, Debug)]
pub struct Stored {
    pub len: u32,
    pub sha: [u8; 32],
}

/// Why a chunk could not be read; readers add which snapshot or file needed it.
#[derive(Debug)]
pub enum ChunkError {
    Missing,
    Unreadable(anyhow::Error),
    WrongSize {
        got: u64,
        want: u64,
    },
    /// The header is not a bmr chunk header, or its payload hash is not the one recorded.
    ChecksumMismatch,
    /// The payload does not decompress to the data the chunk is named after.
    BadContent,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkError::Missing => f.write_str("missing"),
            ChunkError::Unreadable(e) => write!(f, "unreadable ({e:#})"),
            ChunkError::WrongSize { got, want } => {
                write!(f, "wrong size ({got} bytes, expected {want})")
            }
            ChunkError::ChecksumMismatch => f.write_str("checksum mismatch"),
            ChunkError::BadContent => f.write_str("content does not match its name"),
        }
    }
}

impl ChunkError {
    pub fn is_missing(&self) -> bool {
        matches!(self, ChunkError::Missing)
    }
}

/// Reads chunks for one thread, reusing its decompressor; the plain data goes into the
/// caller's (reused) buffer. Counts the stored bytes it fetched.
pub struct ChunkReader {
    dec: zstd::bulk::Decompressor<'static>,
    pub fetched: u64,
}

impl ChunkReader {
    pub fn new() -> anyhow::Result<ChunkReader> {
        let mut dec = zstd::bulk::Decompressor::new()
            .map_err(|e| anyhow::anyhow!("cannot start zstd: {e}"))?;
        // No chunk needs a window beyond its own size: refuse frames that ask for more.
        dec.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(CHUNK_WINDOW_LOG))
            .map_err(|e| anyhow::anyhow!("cannot set up zstd: {e}"))?;
        Ok(ChunkReader { dec, fetched: 0 })
    }

    /// Read chunk `digest` holding `plain_len` bytes into `out[..plain_len]`. With `stored`,
    /// the stored size and header hash must be the recorded ones. The plain-data digest is the
    /// check that matters; the payload is not hashed as well (a third more hashing for nothing).
    pub fn read(
        &mut self,
        src: &dyn RepoRead,
        digest: &Digest,
        stored: Option<Stored>,
        plain_len: usize,
        out: &mut [u8],
    ) -> Result<(), ChunkError> {
        if plain_len > out.len() || plain_len as u64 > CHUNK_SIZE {
            return Err(ChunkError::BadContent);
        }
        // A fresh fetch buffer per chunk: reusing one measured slower here (read_to_end into a
        // reused Vec cost a restore of 4 GiB about half a second of system time).
        let mut bytes = Vec::new();
        if let Err(e) = src.read_chunk_into(digest, &mut bytes) {
            return Err(match src.chunk_len(digest) {
                Ok(None) => ChunkError::Missing,
                _ => ChunkError::Unreadable(e),
            });
        }
        self.fetched += bytes.len() as u64;
        if let Some(s) = stored
            && bytes.len() as u64 != u64::from(s.len)
        {
            return Err(ChunkError::WrongSize {
                got: bytes.len() as u64,
                want: u64::from(s.len),
            });
        }
        let payload = match (parse_chunk(&bytes), stored) {
            (Some((sum, _)), Some(s)) if sum != s.sha => return Err(ChunkError::ChecksumMismatch),
            (Some((_, p)), _) => p,
            (None, _) => return Err(ChunkError::ChecksumMismatch),
        };
        // The frame must declare the recorded length before anything is decoded; the output
        // is the caller's slice of that length, so even a frame that lies about its size (or
        // declares none) cannot decode to more.
        if super::chunk::frame_len(payload) != Some(plain_len as u64) {
            return Err(ChunkError::BadContent);
        }
        let n = self
            .dec
            .decompress_to_buffer(payload, &mut out[..plain_len])
            .map_err(|_| ChunkError::BadContent)?;
        if n != plain_len || Digest::of(&out[..n]) != *digest {
            return Err(ChunkError::BadContent);
        }
        Ok(())
    }
}
