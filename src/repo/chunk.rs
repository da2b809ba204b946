//! The chunk format: a chunk is named by the sha256 of its plain data and stored as one zstd
//! frame behind a skippable frame that holds the sha256 of the compressed payload, so a chunk
//! can be checked without decompressing and `zstd -d` still reads the file as it is.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// Largest amount of plain data in one chunk.
pub const CHUNK_SIZE: u64 = 4 << 20;
pub const CHUNK_HEADER_LEN: usize = 48;
/// Largest stored chunk a reader accepts: the header plus zstd's bound for a full chunk.
/// Anything bigger is damaged or hostile and is refused before memory is taken for it.
pub const MAX_STORED_CHUNK: u64 = CHUNK_HEADER_LEN as u64 + (CHUNK_SIZE + (CHUNK_SIZE >> 7) + 4096);
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5B;
/// A damaged chunk moved aside by `bmr verify` is named DIGEST + this.
pub const DAMAGED_SUFFIX: &str = ".damaged";
const CHUNK_MAGIC: &[u8; 4] = b"BMRC";

/// sha256 of a chunk's plain data: its name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// A digest as file lists store it (a byte string); None if it is not 32 bytes.
    pub fn from_slice(b: &[u8]) -> Option<Digest> {
        b.try_into().ok().map(Digest)
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
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

/// Check stored bytes against the payload hash an index recorded, without decompressing
/// (the restore pre-check); returns the payload.
pub fn check_stored<'a>(stored: &'a [u8], expect: &[u8; 32]) -> Option<&'a [u8]> {
    let (sum, payload) = parse_chunk(stored)?;
    (sum == *expect && Sha256::digest(payload).as_slice() == expect).then_some(payload)
}

/// The plain length a chunk payload's zstd frame header declares; None if the header is
/// damaged, declares no length, or more than a chunk holds. Needs only the first 18 bytes.
pub fn frame_len(payload: &[u8]) -> Option<u64> {
    zstd::zstd_safe::get_frame_content_size(payload)
        .ok()
        .flatten()
        .filter(|&n| n <= CHUNK_SIZE)
}
