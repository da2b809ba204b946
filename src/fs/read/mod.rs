//! Read a filesystem's complete file tree (metadata and where each file's data lives) from the
//! raw filesystem, without mounting it: the table of contents of an image backup.

pub mod btrfs;
pub mod decode;
pub mod ext;
pub mod fat;
pub mod xfs;

use anyhow::{Result, bail};

/// What a reader skipped of a damaged filesystem, capped so a wrecked one cannot flood the log
/// or memory: the first `cap`, then a count of the rest.
pub(crate) struct Warnings {
    list: Vec<String>,
    more: usize,
    cap: usize,
}

impl Warnings {
    pub(crate) fn new(cap: usize) -> Warnings {
        Warnings {
            list: Vec::new(),
            more: 0,
            cap,
        }
    }

    pub(crate) fn push(&mut self, m: String) {
        if self.list.len() < self.cap {
            self.list.push(m);
        } else {
            self.more += 1;
        }
    }

    /// The kept warnings, and a last line counting the others (`rest` names them).
    pub(crate) fn finish(self, rest: &str) -> Vec<String> {
        let mut out = self.list;
        if self.more > 0 {
            out.push(format!("and {} more {rest}", self.more));
        }
        out
    }
}

/// Positional reads relative to the start of the filesystem; fills `buf` or fails.
pub trait ReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

/// A partition of an open file or device.
pub struct FileRange<'a> {
    pub file: &'a std::fs::File,
    pub base: u64,
    pub len: u64,
}

impl ReadAt for FileRange<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read beyond the end of the partition",
            ));
        }
        self.file.read_exact_at(buf, self.base + offset)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub file_off: u64,
    /// Bytes from the start of the filesystem.
    pub disk_off: u64,
    pub len: u64,
}

/// How an encoded (compressed) extent's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    /// btrfs's framing: a 4-byte total length, then per-sector LZO1X segments.
    Lzo,
    Zstd,
}

/// A run of a file whose bytes are compressed on disk (btrfs): `disk_len` stored bytes at
/// `disk_off` decode to an extent of which bytes `skip..skip+len` are the file's bytes
/// `file_off..file_off+len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub file_off: u64,
    pub disk_off: u64,
    pub disk_len: u64,
    pub compression: Compression,
    pub skip: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative, '/'-separated raw bytes; the root directory is empty.
    pub path: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub atime: (i64, u32),
    /// Hard-link identity.
    pub inode: u64,
    pub nlink: u32,
    pub rdev: (u32, u32),
    pub symlink: Option<Vec<u8>>,
    /// Full names and values as setxattr(2) takes them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Regular files: data runs sorted by file offset; gaps are holes.
    pub extents: Vec<Extent>,
    /// Compressed runs (btrfs); gaps between these and `extents` are holes.
    pub encoded: Vec<Encoded>,
    /// Data kept inside the inode (ext4 inline_data, btrfs inline extents), decoded.
    pub inline: Option<Vec<u8>>,
    /// btrfs: the root directory of a subvolume or snapshot carries its subvolume id.
    pub subvol: Option<u64>,
    /// Inode flags as lsattr shows them (`fs::flags`, only the settable ones).
    pub flags: u32,
}

/// The whole tree, parents before children. Warnings (parts left out) go to stderr.
pub fn read_tree(fs: &dyn ReadAt, fstype: &str) -> Result<Vec<Entry>> {
    let mut warnings = Vec::new();
    let r = read_tree_warn(fs, fstype, &mut warnings);
    for w in warnings {
        eprintln!("warning: {w}");
    }
    r
}

/// The whole tree, parents before children; what a reader left out of a damaged filesystem
/// (one bad entry or tree block, not the rest) is described in `warnings`.
pub fn read_tree_warn(
    fs: &dyn ReadAt,
    fstype: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Entry>> {
    match fstype {
        "ext2" | "ext3" | "ext4" => ext::read_tree_warn(fs, warnings),
        "vfat" => fat::read_tree(fs),
        "xfs" => xfs::read_tree_warn(fs, warnings),
        "btrfs" => btrfs::read_tree_warn(fs, warnings),
        other => bail!("no file reader for {other}"),
    }
}

/// A regular file's content from its extents, encoded runs and inline data (holes read as
/// zeros).
pub fn read_file(fs: &dyn ReadAt, e: &Entry) -> Result<Vec<u8>> {
    if e.size > 16 << 30 {
        bail!(
            "{:?} is too big to read into memory",
            String::from_utf8_lossy(&e.path)
        );
    }
    let mut data = vec![0u8; e.size as usize];
    if let Some(i) = &e.inline {
        let n = i.len().min(data.len());
        data[..n].copy_from_slice(&i[..n]);
    }
    for x in &e.extents {
        let start = x.file_off.min(e.size) as usize;
        let end = (x.file_off + x.len).min(e.size) as usize;
        fs.read_at(&mut data[start..end], x.disk_off)?;
    }
    for x in &e.encoded {
        let start = x.file_off.min(e.size);
        let end = x.file_off.saturating_add(x.len).min(e.size);
        if start == end {
            continue;
        }
        let plain = read_encoded(x, |buf, off| Ok(fs.read_at(buf, off)?))?;
        data[start as usize..end as usize].copy_from_slice(&plain[..(end - start) as usize]);
    }
    Ok(data)
}

/// The file bytes of one encoded run (`len` bytes), its stored bytes read through `read`.
pub fn read_encoded(
    x: &Encoded,
    mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
) -> Result<Vec<u8>> {
    let out_len = x.skip.saturating_add(x.len);
    if x.disk_len > decode::MAX_ENCODED || out_len > decode::MAX_ENCODED {
        bail!(
            "compressed run at file offset {}: {} stored bytes for {out_len} (damaged)",
            x.file_off,
            x.disk_len
        );
    }
    let mut stored = vec![0u8; x.disk_len as usize];
    read(&mut stored, x.disk_off)?;
    let mut plain = decode::decode(x.compression, &stored, out_len as usize)?;
    plain.drain(..x.skip as usize);
    Ok(plain)
}

#[cfg(test)]
mod tests;
