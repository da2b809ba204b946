//! The chunk index of a snapshot: for every 4 MiB window of every area, which chunk holds it and
//! which byte ranges of it are used. Binary, zstd-compressed, streamed (it can hold millions of
//! records, so neither side keeps it all decoded in memory). Layout in docs/format.md.

use std::io::{Read, Write};

use anyhow::{Context, Result, bail};

use crate::repo::Digest;

const MAGIC: &[u8; 8] = b"BMRIDX\0\x01";
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_END: u8 = 0xff;
/// Sanity cap on ranges per record: a 4 MiB window of 512-byte units.
const MAX_RANGES: u32 = 8192;

#[derive(Debug, Clone, PartialEq)]
pub enum ChunkRef {
    /// Plain data stored in the chunk store; `stored_len` is the compressed size.
    Data {
        digest: Digest,
        stored_len: u32,
        /// sha256 of the compressed payload: lets a restore check chunks without decompressing.
        stored_sha: [u8; 32],
    },
    /// Every used byte of the window is zero: nothing stored.
    Zero,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub area: u32,
    /// Offset of the window inside its area.
    pub offset: u64,
    pub len: u32,
    pub chunk: ChunkRef,
    /// Used byte ranges (offset from window start, length), sorted, non-overlapping.
    pub ranges: Vec<(u32, u32)>,
}

impl Record {
    pub fn used_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.1)).sum()
    }
}

pub struct IndexWriter<W: Write> {
    enc: zstd::Encoder<'static, W>,
    records: u64,
}

impl<W: Write> IndexWriter<W> {
    pub fn new(w: W) -> Result<Self> {
        let mut enc = zstd::Encoder::new(w, 3)?;
        enc.write_all(MAGIC)?;
        Ok(IndexWriter { enc, records: 0 })
    }

    pub fn push(&mut self, r: &Record) -> Result<()> {
        let mut buf = Vec::with_capacity(64 + r.ranges.len() * 8);
        buf.extend_from_slice(&r.area.to_le_bytes());
        buf.extend_from_slice(&r.offset.to_le_bytes());
        buf.extend_from_slice(&r.len.to_le_bytes());
        match &r.chunk {
            ChunkRef::Data {
                digest,
                stored_len,
                stored_sha,
            } => {
                buf.push(KIND_DATA);
                buf.extend_from_slice(&digest.0);
                buf.extend_from_slice(&stored_len.to_le_bytes());
                buf.extend_from_slice(stored_sha);
            }
            ChunkRef::Zero => buf.push(KIND_ZERO),
        }
        buf.extend_from_slice(&(r.ranges.len() as u32).to_le_bytes());
        for (o, l) in &r.ranges {
            buf.extend_from_slice(&o.to_le_bytes());
            buf.extend_from_slice(&l.to_le_bytes());
        }
        self.enc.write_all(&buf)?;
        self.records += 1;
        Ok(())
    }

    /// Write the end marker (with the record count, so truncation is detected) and finish.
    pub fn finish(mut self) -> Result<(W, u64)> {
        self.enc.write_all(&[0xff; 4])?;
        self.enc.write_all(&0u64.to_le_bytes())?;
        self.enc.write_all(&0u32.to_le_bytes())?;
        self.enc.write_all(&[KIND_END])?;
        self.enc.write_all(&self.records.to_le_bytes())?;
        let w = self.enc.finish()?;
        Ok((w, self.records))
    }
}

/// Streaming reader; yields records until the end marker.
pub struct IndexReader<R: Read> {
    dec: zstd::Decoder<'static, std::io::BufReader<R>>,
    count: u64,
    done: bool,
    name: String,
}

impl<R: Read> IndexReader<R> {
    pub fn new(r: R, name: &str) -> Result<Self> {
        let mut dec = zstd::Decoder::new(r)
            .with_context(|| format!("chunk index of {name} is not readable"))?;
        let mut magic = [0u8; 8];
        dec.read_exact(&mut magic)
            .ok()
            .filter(|_| &magic == MAGIC)
            .with_context(|| format!("chunk index of {name} has an unknown format"))?;
        Ok(IndexReader {
            dec,
            count: 0,
            done: false,
            name: name.to_string(),
        })
    }

    fn read_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.dec.read_exact(&mut b).with_context(|| {
            format!(
                "chunk index of {} is truncated or corrupt: choose another snapshot with --at",
                self.name
            )
        })?;
        Ok(b)
    }

    fn next_record(&mut self) -> Result<Option<Record>> {
        if self.done {
            return Ok(None);
        }
        let area = u32::from_le_bytes(self.read_array()?);
        let offset = u64::from_le_bytes(self.read_array()?);
        let len = u32::from_le_bytes(self.read_array()?);
        let [kind] = self.read_array::<1>()?;
        let chunk = match kind {
            KIND_DATA => {
                let digest = Digest(self.read_array()?);
                let stored_len = u32::from_le_bytes(self.read_array()?);
                let stored_sha = self.read_array()?;
                ChunkRef::Data {
                    digest,
                    stored_len,
                    stored_sha,
                }
            }
            KIND_ZERO => ChunkRef::Zero,
            KIND_END => {
                let n = u64::from_le_bytes(self.read_array()?);
                if n != self.count {
                    bail!(
                        "chunk index of {} is corrupt (record count {} != {n})",
                        self.name,
                        self.count
                    );
                }
                self.done = true;
                return Ok(None);
            }
            k => bail!(
                "chunk index of {} has an unknown record kind {k}",
                self.name
            ),
        };
        let n = u32::from_le_bytes(self.read_array()?);
        if n > MAX_RANGES || u64::from(len) > crate::repo::CHUNK_SIZE {
            bail!("chunk index of {} is corrupt (bad record)", self.name);
        }
        let mut ranges = Vec::with_capacity(n as usize);
        let mut end = 0u32;
        for _ in 0..n {
            let o = u32::from_le_bytes(self.read_array()?);
            let l = u32::from_le_bytes(self.read_array()?);
            if o < end || l == 0 || o.checked_add(l).is_none_or(|e| e > len) {
                bail!("chunk index of {} is corrupt (bad range)", self.name);
            }
            end = o + l;
            ranges.push((o, l));
        }
        self.count += 1;
        Ok(Some(Record {
            area,
            offset,
            len,
            chunk,
            ranges,
        }))
    }
}

impl<R: Read> Iterator for IndexReader<R> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Check a whole chunk index against its manifest before a restore writes from it: the
/// record count the manifest names, every record in a window of its area (at a multiple of the
/// chunk size, as long as the window), in order and without overlap, every area stored whole
/// covered window by window, and the used bytes, data chunks and stored bytes of the records
/// adding up to what the manifest says per area and in its stats. Streams: nothing is kept
/// per record.
pub fn check_against(
    m: &crate::repo::manifest::Manifest,
    records: impl Iterator<Item = Result<Record>>,
) -> Result<()> {
    use crate::repo::manifest::Content;
    let id = &m.id;
    let bad = |what: String| {
        anyhow::anyhow!(
            "chunk index of snapshot {id} does not match its manifest ({what}): the backup is damaged, nothing was written; run bmr verify and choose another snapshot with --at"
        )
    };
    let cs = m.chunk_size.max(1);
    let mut count = 0u64;
    let mut used = vec![0u64; m.areas.len()];
    let mut covered = vec![0u64; m.areas.len()];
    let (mut chunks, mut stored) = (0u64, 0u64);
    // The first (area, offset) the next record may have.
    let mut next = (0usize, 0u64);
    for r in records {
        let r = r?;
        count += 1;
        let ai = r.area as usize;
        let Some(a) = m.areas.get(ai) else {
            return Err(bad(format!(
                "record {count} names area {ai}, which does not exist"
            )));
        };
        if (ai, r.offset) < next {
            return Err(bad(format!(
                "record {count} (area {ai}, offset {}) is out of order or overlaps the one before",
                r.offset
            )));
        }
        if !r.offset.is_multiple_of(cs)
            || r.offset >= a.len
            || u64::from(r.len) != (a.len - r.offset).min(cs)
            || r.ranges.is_empty()
        {
            return Err(bad(format!(
                "record {count} ({} bytes at offset {}) is not a window of area {ai} ({} bytes)",
                r.len, r.offset, a.len
            )));
        }
        next = (ai, r.offset + u64::from(r.len));
        used[ai] += r.used_bytes();
        covered[ai] += u64::from(r.len);
        if let ChunkRef::Data { stored_len, .. } = &r.chunk {
            chunks += 1;
            stored += u64::from(*stored_len);
        }
    }
    if count != m.index.records {
        return Err(bad(format!(
            "{count} records, the manifest says {}",
            m.index.records
        )));
    }
    for (ai, a) in m.areas.iter().enumerate() {
        if a.content == Content::Whole && covered[ai] != a.len {
            return Err(bad(format!(
                "area {ai} is stored whole but its records cover {} of its {} bytes",
                covered[ai], a.len
            )));
        }
        if used[ai] != a.used_bytes {
            return Err(bad(format!(
                "area {ai} has {} used bytes in its records, the manifest says {}",
                used[ai], a.used_bytes
            )));
        }
    }
    if (chunks, stored) != (m.stats.chunks, m.stats.stored_bytes) {
        return Err(bad(format!(
            "{chunks} data chunks of {stored} bytes, the manifest says {} of {}",
            m.stats.chunks, m.stats.stored_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let recs = vec![
            Record {
                area: 0,
                offset: 0,
                len: 1 << 20,
                chunk: ChunkRef::Data {
                    digest: Digest::of(b"x"),
                    stored_len: 77,
                    stored_sha: [7; 32],
                },
                ranges: vec![(0, 1 << 20)],
            },
            Record {
                area: 1,
                offset: 4 << 20,
                len: 4 << 20,
                chunk: ChunkRef::Zero,
                ranges: vec![(0, 4096), (8192, 4096)],
            },
        ];
        let mut w = IndexWriter::new(Vec::new()).unwrap();
        for r in &recs {
            w.push(r).unwrap();
        }
        let (bytes, n) = w.finish().unwrap();
        assert_eq!(n, 2);
        let back: Vec<Record> = IndexReader::new(&bytes[..], "t")
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(back, recs);

        // Cut the plain stream short: must be an error, not a silent short index.
        let plain = zstd::decode_all(&bytes[..]).unwrap();
        let cut = zstd::encode_all(&plain[..plain.len() - 10], 3).unwrap();
        let res: Result<Vec<Record>> = IndexReader::new(&cut[..], "t").unwrap().collect();
        assert!(res.unwrap_err().to_string().contains("truncated"));
    }
}
