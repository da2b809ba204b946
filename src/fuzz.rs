//! Entry points for the fuzzers (`fuzz/`, run by scripts/fuzz.sh) and their replay under
//! `cargo test` (tests/fuzz_corpus.rs): one function per parser of untrusted bytes, each
//! driving the real code path from a byte buffer. They return nothing: the property is that
//! no input panics, hangs or takes unbounded memory; errors are the expected outcome.
//! docs/testing.md explains the targets and how to add one.

use std::io::Write;
use std::os::unix::fs::FileExt;

use anyhow::Result;

use crate::device::layout::DiskLayout;
use crate::fs::read::ReadAt;
use crate::repo::chunk::{Digest, check_stored, parse_chunk};
use crate::repo::reader::{ChunkReader, Stored};
use crate::repo::{RepoRead, chunkindex, manifest, toc};

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every fuzz target, by name (the names of the binaries in fuzz/fuzz_targets/).
pub const TARGETS: &[(&str, Target)] = &[
    ("manifest", manifest),
    ("host_index", host_index),
    ("chunk", chunk),
    ("chunk_index", chunk_index),
    ("toc", toc),
    ("layout", layout),
    ("ext", ext),
    ("fat", fat),
    ("xfs", xfs),
    ("btrfs", btrfs),
    ("cmdline", cmdline),
];

/// Largest image a sparse input may declare: big enough for the XFS and btrfs fixtures,
/// small enough that a map of it stays far below the fuzzers' 256 MiB limit.
pub const MAX_IMAGE: u64 = 4 << 30;

/// A repository that answers every metadata path and every chunk with the same bytes.
struct OneFile<'a>(&'a [u8]);

impl RepoRead for OneFile<'_> {
    fn location(&self) -> String {
        "fuzz".into()
    }
    fn read_file(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>> {
        // The caps the real backends apply, so the fuzzer sees what a repository serves.
        if self.0.len() as u64 > max {
            anyhow::bail!("{rel} is over {max} bytes");
        }
        Ok(Some(self.0.to_vec()))
    }
    fn read_chunk_into(&self, _: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        buf.extend_from_slice(self.0);
        Ok(())
    }
    fn chunk_len(&self, _: &Digest) -> Result<Option<u64>> {
        Ok(Some(self.0.len() as u64))
    }
    fn local_path(&self) -> Option<&std::path::Path> {
        None
    }
}

/// The `host` and `id` a JSON document names, so a real manifest passes the name checks and
/// the fuzzer gets past them.
fn names(data: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(data).unwrap_or_default();
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("x").to_string();
    (s("host"), s("id"))
}

/// An image or incremental manifest (JSON), as `resolve` reads it.
pub fn manifest(data: &[u8]) {
    let src = OneFile(data);
    let (host, id) = names(data);
    if let Ok(m) = manifest::read_manifest(&src, &host, &id) {
        let _ = manifest::read_chunk_index(&src, &m);
        for t in &m.tocs {
            let _ = manifest::read_toc(&src, &host, &id, t);
        }
    }
    if let Ok(m) = manifest::read_inc_manifest(&src, &host, &id) {
        for f in &m.filesystems {
            let _ = manifest::read_toc(&src, &host, &id, &f.toc);
        }
    }
    let _ = manifest::is_incremental(&src, &host, &id);
}

/// A host's snapshot index and the repository's host list (JSON), and `--at` over it.
pub fn host_index(data: &[u8]) {
    let src = OneFile(data);
    let _ = manifest::read_hosts(&src);
    let (host, _) = names(data);
    if let Ok(idx) = manifest::read_host_index(&src, &host) {
        for at in ["latest", "2026-11-22T14:00", "x"] {
            let _ = manifest::select(&idx, at);
        }
    }
}

/// A stored chunk: header, payload hash, zstd frame. The first 4 bytes are the plain length
/// the caller expects (what a chunk index or file list records), the rest the stored bytes.
pub fn chunk(data: &[u8]) {
    let Some((len, stored)) = data.split_first_chunk::<4>() else {
        return;
    };
    let plain_len = (u32::from_le_bytes(*len) as usize).min(crate::repo::CHUNK_SIZE as usize);
    let sha = parse_chunk(stored).map_or([0; 32], |(s, _)| s);
    let _ = check_stored(stored, &sha);
    let Ok(mut reader) = ChunkReader::new() else {
        return;
    };
    let mut out = vec![0u8; plain_len];
    let src = OneFile(stored);
    let recorded = Stored {
        len: stored.len() as u32,
        sha,
    };
    // With what an index records, and with only the name and length (a file list).
    let d = Digest::of(b"");
    let _ = reader.read(&src, &d, Some(recorded), plain_len, &mut out);
    let _ = reader.read(&src, &d, None, plain_len, &mut out);
}

/// An image's chunk index (zstd stream of binary records), read to its end.
pub fn chunk_index(data: &[u8]) {
    if let Ok(r) = chunkindex::IndexReader::new(data, "fuzz") {
        for rec in r {
            if rec.is_err() {
                break;
            }
        }
    }
}

/// A file list (zstd stream of CBOR records).
pub fn toc(data: &[u8]) {
    if let Ok(list) = toc::read_all(data, "fuzz") {
        for m in &list {
            for d in m.chunk_digests() {
                let _ = d;
            }
        }
    }
}

/// A memory file holding `size` bytes (sparse: holes cost nothing), for the code that reads
/// a `File` (partition tables, allocation maps).
fn memfile(size: u64, parts: &[(u64, &[u8])]) -> Option<std::fs::File> {
    let fd =
        nix::sys::memfd::memfd_create("bmr-fuzz", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).ok()?;
    let f = std::fs::File::from(fd);
    f.set_len(size).ok()?;
    for (off, b) in parts {
        f.write_all_at(b, *off).ok()?;
    }
    Some(f)
}

/// A disk image (the input is the whole disk): GPT (primary and backup) or MBR with its EBR
/// chain, at both sector sizes; then what backup and restore derive from it.
pub fn layout(data: &[u8]) {
    let Some(mut f) = memfile(data.len() as u64, &[]) else {
        return;
    };
    if f.write_all(data).is_err() {
        return;
    }
    for ss in [512, 4096] {
        if let Ok(l) = DiskLayout::read(&f, data.len() as u64, ss) {
            let _ = l.data_partitions();
            let _ = l.raw_areas();
            let _ = l.min_target_size();
            let _ = l.matches(&l);
        }
    }
}

/// A filesystem image in the sparse form [`Sparse::parse`] reads.
pub struct Sparse<'a> {
    pub size: u64,
    pub parts: Vec<(u64, &'a [u8])>,
}

impl<'a> Sparse<'a> {
    /// `size: u64 LE`, then runs of `offset: u64 LE, len: u32 LE, bytes`, all zeros between
    /// them (scripts/fuzz-seeds.sh writes these from real images). A short last run keeps
    /// what is there; runs past `size` are cut.
    pub fn parse(data: &'a [u8]) -> Sparse<'a> {
        let (size, mut rest) = match data.split_first_chunk::<8>() {
            Some((s, r)) => (u64::from_le_bytes(*s).min(MAX_IMAGE), r),
            None => (0, &[][..]),
        };
        let mut parts = Vec::new();
        while let Some((off, r)) = rest.split_first_chunk::<8>()
            && let Some((len, r)) = r.split_first_chunk::<4>()
        {
            let off = u64::from_le_bytes(*off);
            let n = (u32::from_le_bytes(*len) as usize).min(r.len());
            let (b, r) = r.split_at(n);
            rest = r;
            if off < size {
                let keep = (size - off).min(b.len() as u64) as usize;
                parts.push((off, &b[..keep]));
            }
        }
        Sparse { size, parts }
    }
}

impl ReadAt for Sparse<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read beyond the end of the image",
            ));
        }
        buf.fill(0);
        for &(o, b) in &self.parts {
            let bend = o + b.len() as u64;
            if bend <= offset || o >= end {
                continue;
            }
            let from = o.max(offset);
            let to = bend.min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&b[(from - o) as usize..(to - o) as usize]);
        }
        Ok(())
    }
}

/// An ext2/3/4 image in the sparse form (superblock, group descriptors, bitmaps, inodes,
/// extent trees, directories, xattrs).
pub fn ext(data: &[u8]) {
    fs_image(data, "ext4");
}

/// A FAT12/16/32 image in the sparse form (boot sector, FAT, directories, long names).
pub fn fat(data: &[u8]) {
    fs_image(data, "vfat");
}

/// An XFS image in the sparse form (superblock, AG headers, free-space and inode B+trees,
/// inodes, directory and attribute forks, the log's state).
pub fn xfs(data: &[u8]) {
    fs_image(data, "xfs");
}

/// A btrfs image in the sparse form (superblock, chunk, root, extent and file trees,
/// compressed extents).
pub fn btrfs(data: &[u8]) {
    fs_image(data, "btrfs");
}

/// A filesystem image (sparse form): identification, the allocation map backup uses, the file
/// tree the file lists come from, and the content of its small files (`ls`/`restore-files`).
fn fs_image(data: &[u8], fstype: &str) {
    let img = Sparse::parse(data);
    let mut head = vec![0u8; (68 << 10).min(img.size as usize)];
    if img.read_at(&mut head, 0).is_ok() {
        let _ = crate::fs::id::identify_bytes(&head);
    }
    if let Some(f) = memfile(img.size, &img.parts) {
        let _ = crate::fs::map::probe(&f, 0, img.size);
    }
    let mut warnings = Vec::new();
    if let Ok(entries) = crate::fs::read::read_tree_warn(&img, fstype, &mut warnings) {
        // read_file takes what an entry declares: only small ones, so the fuzzer's memory
        // limit measures the readers, not a file size it made up.
        for e in entries.iter().filter(|e| e.size <= 1 << 20).take(64) {
            let _ = crate::fs::read::read_file(&img, e);
        }
    }
}

/// The kernel command line of the rescue system.
pub fn cmdline(data: &[u8]) {
    let p = crate::rescue::cmdline::parse(&String::from_utf8_lossy(data));
    let _ = p.unattended();
}
