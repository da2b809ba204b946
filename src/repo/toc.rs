//! Tables of contents: every file of a filesystem with its metadata and where its data lives
//! (blocks of the base image, or chunks stored by an incremental). Stored as a zstd-compressed
//! stream of CBOR records (RFC 8949), one per file, parents before children.

use std::collections::HashSet;
use std::io::{Read, Write};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::repo::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl FileKind {
    pub fn ls_char(self) -> char {
        match self {
            FileKind::File => '-',
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::CharDev => 'c',
            FileKind::BlockDev => 'b',
            FileKind::Fifo => 'p',
            FileKind::Socket => 's',
        }
    }
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Data {
    /// No data (not a regular file, or empty).
    None,
    /// In the base image's filesystem: (file offset, byte offset in the filesystem, length)
    /// runs; gaps are holes. `inline` holds data kept inside the inode; `encoded` the runs
    /// stored compressed by the filesystem (btrfs).
    Image {
        extents: Vec<(u64, u64, u64)>,
        inline: Option<ByteBuf>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        encoded: Vec<EncodedRun>,
    },
    /// Stored by an incremental: consecutive chunks of the file (digest, plain length).
    Chunks(Vec<(ByteBuf, u32)>),
}

/// A compressed run of a file in the image (see `fs::read::Encoded`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedRun {
    pub file_off: u64,
    pub disk_off: u64,
    pub disk_len: u64,
    /// "zlib", "lzo" or "zstd".
    pub compression: String,
    pub skip: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Relative path, raw bytes, '/'-separated; the root directory is empty.
    pub path: ByteBuf,
    pub kind: FileKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub atime: (i64, u32),
    pub inode: u64,
    pub nlink: u32,
    pub rdev: (u32, u32),
    pub symlink: Option<ByteBuf>,
    pub xattrs: Vec<(ByteBuf, ByteBuf)>,
    pub data: Data,
    /// btrfs: the root directory of a subvolume or snapshot carries its subvolume id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subvol: Option<u64>,
    /// Inode flags as lsattr shows them (`fs::flags::SETTABLE` bits: immutable, append-only,
    /// nodump, nocow...); absent in file lists of bmr before 0.2, which read as none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub flags: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl FileMeta {
    /// Same file as far as change detection goes (what `ls -l`, `stat` and the kernel show).
    pub fn unchanged(&self, other: &FileMeta) -> bool {
        self.kind == other.kind
            && self.inode == other.inode
            && self.size == other.size
            && self.mtime == other.mtime
            && self.ctime == other.ctime
            && self.flags == other.flags
    }

    pub fn chunk_digests(&self) -> impl Iterator<Item = Result<Digest>> + '_ {
        let chunks: &[(ByteBuf, u32)] = match &self.data {
            Data::Chunks(c) => c,
            _ => &[],
        };
        chunks.iter().filter(|(d, _)| !d.is_empty()).map(|(d, _)| {
            let arr: [u8; 32] = d
                .as_slice()
                .try_into()
                .context("bad chunk digest in a file list")?;
            Ok(Digest(arr))
        })
    }
}

impl From<crate::fs::read::Entry> for FileMeta {
    fn from(e: crate::fs::read::Entry) -> FileMeta {
        use crate::fs::read::Compression as C;
        use crate::fs::read::Kind as K;
        let kind = match e.kind {
            K::File => FileKind::File,
            K::Dir => FileKind::Dir,
            K::Symlink => FileKind::Symlink,
            K::CharDev => FileKind::CharDev,
            K::BlockDev => FileKind::BlockDev,
            K::Fifo => FileKind::Fifo,
            K::Socket => FileKind::Socket,
        };
        let data = if kind == FileKind::File {
            Data::Image {
                extents: e
                    .extents
                    .iter()
                    .map(|x| (x.file_off, x.disk_off, x.len))
                    .collect(),
                inline: e.inline.map(ByteBuf::from),
                encoded: e
                    .encoded
                    .iter()
                    .map(|x| EncodedRun {
                        file_off: x.file_off,
                        disk_off: x.disk_off,
                        disk_len: x.disk_len,
                        compression: match x.compression {
                            C::Zlib => "zlib",
                            C::Lzo => "lzo",
                            C::Zstd => "zstd",
                        }
                        .into(),
                        skip: x.skip,
                        len: x.len,
                    })
                    .collect(),
            }
        } else {
            Data::None
        };
        let mut xattrs: Vec<(ByteBuf, ByteBuf)> = e
            .xattrs
            .into_iter()
            .map(|(k, v)| (ByteBuf::from(k), ByteBuf::from(v)))
            .collect();
        xattrs.sort();
        FileMeta {
            path: ByteBuf::from(e.path),
            kind,
            mode: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime: e.mtime,
            ctime: e.ctime,
            atime: e.atime,
            inode: e.inode,
            nlink: e.nlink,
            rdev: e.rdev,
            symlink: e.symlink.map(ByteBuf::from),
            xattrs,
            data,
            subvol: e.subvol,
            flags: e.flags & crate::fs::flags::SETTABLE,
        }
    }
}

/// Reject paths that could escape the restore directory or confuse it.
pub fn check_path(p: &[u8]) -> Result<()> {
    if let Some(why) = hostile(p) {
        bail!(
            "hostile path {} in a file list ({why}): the backup is damaged or forged",
            crate::util::text::elide_path(p)
        );
    }
    Ok(())
}

/// Why `p` cannot be a path below the restore directory, if it cannot.
fn hostile(p: &[u8]) -> Option<&'static str> {
    if p.is_empty() {
        None
    } else if p.starts_with(b"/") || p.contains(&0) {
        Some("absolute or NUL")
    } else if p
        .split(|&b| b == b'/')
        .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        Some("empty, . or .. component")
    } else {
        None
    }
}

/// Most warnings one file list prints about its entries; then a count of the rest.
const MAX_WARNINGS: usize = 20;

/// The entries of a decoded list that can be restored, with a warning on stderr for each left
/// out: hostile paths (and so everything below a hostile directory, whose paths carry the same
/// component) and second entries for a path (the first is kept). One forged name must not
/// cost the rest of the backup.
fn keep_valid(list: Vec<FileMeta>, what: &str) -> Vec<FileMeta> {
    let mut w = crate::fs::read::Warnings::new(MAX_WARNINGS);
    let mut keep = vec![true; list.len()];
    {
        let mut seen: HashSet<&[u8]> = HashSet::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let shown = || crate::util::text::elide_path(&m.path);
            if let Some(why) = hostile(&m.path) {
                w.push(format!(
                    "{what}: left out hostile path {} ({why}): the backup is damaged or forged",
                    shown()
                ));
                keep[i] = false;
            } else if !seen.insert(m.path.as_slice()) {
                w.push(format!(
                    "{what}: lists {} twice: the first is kept (the backup is damaged or forged)",
                    shown()
                ));
                keep[i] = false;
            }
        }
    }
    for m in w.finish("entries of it left out") {
        eprintln!("warning: {m}");
    }
    let mut k = keep.into_iter();
    list.into_iter()
        .filter(|_| k.next().unwrap_or(false))
        .collect()
}

pub struct TocWriter<W: Write> {
    enc: zstd::Encoder<'static, W>,
    count: u64,
}

impl<W: Write> TocWriter<W> {
    pub fn new(w: W) -> Result<Self> {
        Ok(TocWriter {
            enc: zstd::Encoder::new(w, 3)?,
            count: 0,
        })
    }

    pub fn push(&mut self, m: &FileMeta) -> Result<()> {
        ciborium::into_writer(m, &mut self.enc).context("cannot encode a file list entry")?;
        self.count += 1;
        Ok(())
    }

    pub fn finish(self) -> Result<(W, u64)> {
        Ok((self.enc.finish()?, self.count))
    }
}

/// Largest string or byte string in an entry. An xattr value is at most 64 KiB
/// (XATTR_SIZE_MAX) and a name 255 bytes, but a path has no limit (trees deeper than PATH_MAX
/// exist): 1 MiB is a 500,000-level path, and the budget below still bounds the whole list.
pub const MAX_STRING: usize = 1 << 20;
/// What decoding a file list may cost in memory: this many times its stored (compressed)
/// size, at least [`DECODE_FLOOR`], at most [`DECODE_MAX`]. A real file list compresses a few
/// ten times (chunk digests and disk offsets do not compress at all); a zstd bomb compresses
/// thousands of times and is refused here instead of filling a rescue system's RAM.
pub const DECODE_RATIO: u64 = 128;
pub const DECODE_FLOOR: u64 = 128 << 20;
pub const DECODE_MAX: u64 = 8 << 30;
/// Memory an array or map element costs once decoded, for the budget.
const SLOT: u64 = 16;

/// Copies what a CBOR decoder reads, so one entry's exact bytes can be measured first and
/// decoded after.
struct Tee<'a, R: Read> {
    inner: R,
    raw: &'a mut Vec<u8>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.raw.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Read one CBOR item (an entry) into `raw`, walking its headers without building anything:
/// every length is checked against [`MAX_STRING`] and the budget before the bytes behind it
/// are read. Ok(false) at a clean end of the stream.
fn next_entry<R: Read>(
    dec: &mut R,
    raw: &mut Vec<u8>,
    budget: &mut u64,
    what: &str,
) -> Result<bool> {
    use ciborium_ll::Header;
    raw.clear();
    let mut d = ciborium_ll::Decoder::from(Tee {
        inner: &mut *dec,
        raw,
    });
    let mut pending: u64 = 1;
    let mut first = true;
    let mut scratch = [0u8; 4096];
    while pending > 0 {
        let h = match d.pull() {
            Ok(h) => h,
            // ciborium cannot tell a clean end from a truncated record at the first byte.
            Err(ciborium_ll::Error::Io(e))
                if first && e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                if raw.is_empty() {
                    return Ok(false);
                }
                bail!("{what} is truncated or corrupt ({e})");
            }
            Err(ciborium_ll::Error::Io(e)) => bail!("{what} is truncated or corrupt ({e})"),
            Err(ciborium_ll::Error::Syntax(at)) => {
                bail!("{what} is corrupt (bad CBOR at byte {at} of an entry)")
            }
        };
        first = false;
        pending -= 1;
        let cost = match h {
            Header::Positive(_) | Header::Negative(_) | Header::Float(_) | Header::Simple(_) => 8,
            Header::Bytes(Some(n)) | Header::Text(Some(n)) => {
                if n > MAX_STRING {
                    bail!(
                        "{what} is corrupt: an entry holds a string of {n} bytes, more than any field can be ({MAX_STRING}): the backup is damaged or forged"
                    );
                }
                let mut left = n;
                while left > 0 {
                    let k = left.min(scratch.len());
                    ciborium_io::Read::read_exact(&mut d, &mut scratch[..k])
                        .map_err(|e| anyhow::anyhow!("{what} is truncated or corrupt ({e})"))?;
                    left -= k;
                }
                n as u64
            }
            Header::Array(Some(n)) => {
                pending = pending.saturating_add(n as u64);
                (n as u64).saturating_mul(SLOT)
            }
            Header::Map(Some(n)) => {
                pending = pending.saturating_add((n as u64).saturating_mul(2));
                (n as u64).saturating_mul(2 * SLOT)
            }
            // bmr writes definite lengths and no tags.
            _ => bail!("{what} is corrupt (unexpected CBOR item): the backup is damaged or forged"),
        };
        *budget = budget.checked_sub(cost).with_context(|| {
            format!(
                "{what} decodes to more than bmr accepts for its stored size: the backup is damaged or forged (a zstd bomb?)"
            )
        })?;
    }
    Ok(true)
}

/// Decode a whole file list. Entries with hostile paths (absolute, `..`, NUL) or a path seen
/// before are left out with a warning (`keep_valid`); a chunk digest that is not one refuses
/// the list. Memory stays within a multiple of the stored size ([`DECODE_RATIO`]): each entry
/// is measured before it is decoded.
pub fn read_all(bytes: &[u8], what: &str) -> Result<Vec<FileMeta>> {
    let mut dec = zstd::Decoder::new(bytes).with_context(|| format!("{what} is not readable"))?;
    // bmr writes file lists at level 3 (a 2 MiB window): refuse frames that want a huge one.
    dec.window_log_max(24)
        .with_context(|| format!("{what} is not readable"))?;
    let mut budget = (bytes.len() as u64)
        .saturating_mul(DECODE_RATIO)
        .clamp(DECODE_FLOOR, DECODE_MAX);
    let mut out = Vec::new();
    let mut raw = Vec::new();
    while next_entry(&mut dec, &mut raw, &mut budget, what)? {
        let m: FileMeta = ciborium::from_reader(&raw[..])
            .map_err(|e| anyhow::anyhow!("{what} is truncated or corrupt ({e})"))?;
        if let Data::Chunks(c) = &m.data
            && let Some((d, _)) = c.iter().find(|(d, _)| !d.is_empty() && d.len() != 32)
        {
            bail!(
                "{what}: entry {} names a chunk digest of {} bytes (a digest has 32): the backup is damaged or forged; restore other files or another snapshot",
                crate::util::text::elide_path(&m.path),
                d.len()
            );
        }
        out.push(m);
    }
    Ok(keep_valid(out, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(path: &[u8]) -> FileMeta {
        FileMeta {
            path: ByteBuf::from(path.to_vec()),
            kind: FileKind::File,
            mode: 0o644,
            uid: 1,
            gid: 2,
            size: 3,
            mtime: (4, 5),
            ctime: (6, 7),
            atime: (8, 9),
            inode: 10,
            nlink: 1,
            rdev: (0, 0),
            symlink: None,
            xattrs: vec![(ByteBuf::from(b"user.x".to_vec()), ByteBuf::from(vec![0xff]))],
            data: Data::Chunks(vec![(ByteBuf::from(vec![1; 32]), 3)]),
            subvol: None,
            flags: 0,
        }
    }

    fn encode(ms: &[FileMeta]) -> Vec<u8> {
        let mut w = TocWriter::new(Vec::new()).unwrap();
        for m in ms {
            w.push(m).unwrap();
        }
        w.finish().unwrap().0
    }

    #[test]
    fn round_trip_and_hostile_paths() {
        let ms = vec![meta(b""), meta(b"a b/\xff\nname")];
        assert_eq!(read_all(&encode(&ms), "t").unwrap(), ms);
        // One hostile path or a second entry for a path costs only that entry.
        for bad in [
            &b"/etc/passwd"[..],
            b"a/../../x",
            b"a//b",
            b"a/\0b",
            b"./a",
            b"a/",
        ] {
            assert!(
                check_path(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("hostile path")
            );
            let list = [meta(b""), meta(b"a"), meta(bad), meta(b"a/ok")];
            let got: Vec<_> = read_all(&encode(&list), "t")
                .unwrap()
                .into_iter()
                .map(|m| m.path.into_vec())
                .collect();
            assert_eq!(got, [&b""[..], b"a", b"a/ok"], "{bad:?}");
        }
        let mut second = meta(b"x");
        second.size = 99;
        let got = read_all(&encode(&[meta(b"x"), second]), "t").unwrap();
        assert_eq!(got, [meta(b"x")]);
        // Flags survive; a list without them (older bmr) reads as none.
        let mut f = meta(b"f");
        f.flags = crate::fs::flags::IMMUTABLE;
        assert_eq!(read_all(&encode(&[f.clone()]), "t").unwrap(), [f.clone()]);
        assert!(!f.unchanged(&meta(b"f")));
        assert!(meta(b"f").unchanged(&meta(b"f")));
        let full = encode(&ms);
        let plain = zstd::decode_all(&full[..]).unwrap();
        let cut = zstd::encode_all(&plain[..plain.len() - 5], 3).unwrap();
        assert!(
            read_all(&cut, "t")
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }
}
