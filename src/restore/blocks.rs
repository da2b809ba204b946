//! Writing an image's blocks to the target: a pipeline of fetch -> decompress + sha256 ->
//! positional writes of used ranges only (O_DIRECT where aligned), partition data first, boot
//! areas last; the pre-check of every chunk before the first write; the read-back check.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

use crate::device::Disk;
use crate::device::layout::DiskLayout;
use crate::repo::chunkindex::{ChunkRef, Record};
use crate::repo::manifest::{AreaKind, Content, Manifest};
use crate::repo::reader::{ChunkReader, Stored};
use crate::repo::snapshot::Loaded;
use crate::repo::{CHUNK_SIZE, Digest, RepoRead};
use crate::util::pool::Feeder;
use crate::util::progress::Progress;

/// A page-aligned buffer, needed for O_DIRECT writes.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)
            .expect("valid constant layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Check every record against the manifest and that every chunk exists with its recorded
/// size; with `read_all`, also read each chunk and check its payload hash. Nothing is written.
pub fn precheck(
    src: &dyn RepoRead,
    l: &Loaded,
    read_all: bool,
    threads: usize,
    quiet: bool,
) -> Result<()> {
    let m = &l.manifest;
    let check = |r: &Record| -> Result<()> {
        let Some(area) = m.areas.get(r.area as usize) else {
            bail!("chunk index of {} names an unknown area {}", m.id, r.area);
        };
        if r.offset
            .checked_add(u64::from(r.len))
            .is_none_or(|e| e > area.len)
        {
            bail!(
                "chunk index of {} has a record outside area {}",
                m.id,
                r.area
            );
        }
        Ok(())
    };
    let missing = |d: &Digest| {
        anyhow::anyhow!(
            "chunk {d} needed by snapshot {} is missing from {}: run bmr verify --repo {} and restore another snapshot with --at",
            m.id,
            src.location(),
            src.location()
        )
    };
    let damaged = |d: &Digest| {
        anyhow::anyhow!(
            "chunk {d} needed by snapshot {} is damaged: nothing was written; run bmr verify --repo {} and restore another snapshot with --at",
            m.id,
            src.location()
        )
    };
    if !read_all {
        for r in l.records()? {
            let r = r?;
            check(&r)?;
            if let ChunkRef::Data {
                digest, stored_len, ..
            } = &r.chunk
            {
                match src.chunk_len(digest)? {
                    None => return Err(missing(digest)),
                    Some(n) if n != u64::from(*stored_len) => return Err(damaged(digest)),
                    Some(_) => {}
                }
            }
        }
        return Ok(());
    }
    // The manifest already knows the total: no extra pass over the index.
    let guard = Progress::start("checking backup", m.stats.stored_bytes, quiet);
    let progress = guard.handle();
    crate::util::pool::for_each(
        threads,
        || Ok(()),
        |(), r: Record| {
            let ChunkRef::Data {
                digest,
                stored_len,
                stored_sha,
            } = &r.chunk
            else {
                return Ok(());
            };
            // The header hash covers the stored bytes: checked without decompressing.
            if src.chunk_len(digest)?.is_none() {
                return Err(missing(digest));
            }
            // A fresh buffer per chunk, as in ChunkReader (measured faster than reusing one).
            let mut stored = Vec::new();
            src.read_chunk_into(digest, &mut stored)?;
            progress.add(u64::from(*stored_len));
            if stored.len() as u64 != u64::from(*stored_len)
                || crate::repo::chunk::check_stored(&stored, stored_sha).is_none()
            {
                return Err(damaged(digest));
            }
            Ok(())
        },
        |tx| {
            for r in l.records()? {
                let r = r?;
                check(&r)?;
                if !tx.send(r) {
                    break;
                }
            }
            Ok(())
        },
    )
}

/// A chunk an incremental's file list names: its plain length, and the first file naming it.
#[derive(Debug, Clone)]
pub struct FileChunk {
    pub digest: Digest,
    pub len: u32,
    pub file: String,
}

/// The chunks an incremental's file lists name, checked before the first write as the
/// image's are: with `read_all` each is read, decompressed and checked against its name (file
/// lists record no stored hash); otherwise each must exist.
pub fn precheck_files(
    src: &dyn RepoRead,
    inc: &str,
    chunks: &[FileChunk],
    read_all: bool,
    threads: usize,
    quiet: bool,
) -> Result<()> {
    let bad = |c: &FileChunk, what: String| {
        anyhow::anyhow!(
            "file {:?} of snapshot {inc}: chunk {} is {what}: nothing was written; run bmr verify --repo {} and restore another snapshot with --at",
            c.file,
            c.digest,
            src.location()
        )
    };
    if !read_all {
        for c in chunks {
            if src.chunk_len(&c.digest)?.is_none() {
                return Err(bad(c, "missing".into()));
            }
        }
        return Ok(());
    }
    let guard = Progress::start("checking files", chunks.len() as u64, quiet);
    let progress = guard.handle();
    crate::util::pool::for_each(
        threads,
        || Ok((ChunkReader::new()?, vec![0u8; CHUNK_SIZE as usize])),
        |(reader, buf), c: &FileChunk| {
            reader
                .read(src, &c.digest, None, c.len as usize, buf)
                .map_err(|e| {
                    bad(
                        c,
                        if e.is_missing() {
                            "missing".into()
                        } else {
                            format!("damaged ({e})")
                        },
                    )
                })?;
            progress.add(1);
            Ok(())
        },
        |tx| {
            for c in chunks {
                if !tx.send(c) {
                    break;
                }
            }
            Ok(())
        },
    )
}

pub enum Job {
    Write { base: u64, rec: Record },
    Zero { offset: u64, len: u64 },
}

/// Writes one image to one target.
pub struct Writer<'a> {
    pub src: &'a dyn RepoRead,
    pub m: &'a Manifest,
    pub disk: &'a Disk,
    /// Target was created by us: holes already read as zero.
    pub fresh: bool,
    pub resume: bool,
    pub limit: u64,
    pub progress: Progress,
    pub skipped: AtomicU64,
}

/// A write worker's buffers.
struct WorkerState {
    buf: AlignedBuf,
    scratch: Option<AlignedBuf>,
    reader: ChunkReader,
}

impl Writer<'_> {
    /// Fetch, decompress and check a chunk into `buf`.
    fn fetch(&self, rec: &Record, st: &mut WorkerState) -> Result<()> {
        let ChunkRef::Data {
            digest,
            stored_len,
            stored_sha,
        } = &rec.chunk
        else {
            st.buf[..rec.len as usize].fill(0);
            return Ok(());
        };
        let stored = Stored {
            len: *stored_len,
            sha: *stored_sha,
        };
        st.reader
            .read(self.src, digest, Some(stored), rec.len as usize, &mut st.buf)
            .map_err(|e| {
                anyhow::anyhow!(
                    "chunk {digest} of snapshot {} is {}: restore stopped before writing it, the partition table was not written; run bmr verify --repo {} and restore another snapshot with --at",
                    self.m.id,
                    if e.is_missing() { "missing".to_string() } else { format!("damaged ({e})") },
                    self.src.location()
                )
            })
    }

    /// On resume: is the target already right for this record?
    fn already_written(&self, base: u64, rec: &Record, scratch: &mut AlignedBuf) -> bool {
        let len = rec.len as usize;
        scratch[..len].fill(0);
        for &(o, l) in &rec.ranges {
            let (o, l) = (o as usize, l as usize);
            if self
                .disk
                .file
                .read_exact_at(&mut scratch[o..o + l], base + o as u64)
                .is_err()
            {
                return false;
            }
        }
        match &rec.chunk {
            ChunkRef::Data { digest, .. } => Digest::of(&scratch[..len]) == *digest,
            ChunkRef::Zero => scratch[..len].iter().all(|&b| b == 0),
        }
    }

    fn write_ranges(&self, buf: &[u8], base: u64, ranges: &[(u32, u32)]) -> Result<()> {
        for &(o, l) in ranges {
            let off = base + u64::from(o);
            let end = (off + u64::from(l)).min(self.limit);
            if off >= end {
                continue;
            }
            let data = &buf[o as usize..o as usize + (end - off) as usize];
            self.write_at(data, off)?;
        }
        Ok(())
    }

    /// Page-aligned middle parts go through O_DIRECT (no page-cache churn), edges buffered.
    fn write_at(&self, data: &[u8], off: u64) -> Result<()> {
        // A block device takes direct writes at its logical sector size, so only a range's
        // odd edges go through the page cache, where a failing sector would surface only at
        // the flush, unnamed. Image files stay at the page size their filesystems want.
        let a = if self.disk.is_block {
            self.disk.sector_size
        } else {
            4096
        };
        let fail = |at: u64, len: usize| {
            move |e: std::io::Error| self.disk.io_error("write", at, len as u64, e)
        };
        let buf_addr = data.as_ptr() as u64;
        let (head, mid_len) = match &self.disk.direct {
            // Buffer and disk offsets must share alignment for the direct part.
            Some(_) if buf_addr % a == off % a => {
                let head = ((a - off % a) % a).min(data.len() as u64);
                let mid = (data.len() as u64 - head) / a * a;
                (head as usize, mid as usize)
            }
            _ => (data.len(), 0),
        };
        if head > 0 {
            self.disk
                .file
                .write_all_at(&data[..head], off)
                .map_err(fail(off, head))?;
        }
        if mid_len > 0
            && let Some(direct) = &self.disk.direct
        {
            direct
                .write_all_at(&data[head..head + mid_len], off + head as u64)
                .map_err(fail(off + head as u64, mid_len))?;
        }
        let rest = head + mid_len;
        if rest < data.len() {
            self.disk
                .file
                .write_all_at(&data[rest..], off + rest as u64)
                .map_err(fail(off + rest as u64, data.len() - rest))?;
        }
        Ok(())
    }

    fn work(&self, st: &mut WorkerState, job: Job) -> Result<()> {
        match job {
            Job::Zero { offset, len } => {
                let len = len.min(self.limit.saturating_sub(offset));
                self.disk.zero_range(offset, len)
            }
            Job::Write { base, rec } => {
                let used = rec.used_bytes();
                if let Some(s) = st.scratch.as_mut()
                    && self.already_written(base, &rec, s)
                {
                    self.skipped.fetch_add(used, Ordering::Relaxed);
                    self.progress.add(used);
                    return Ok(());
                }
                match rec.chunk {
                    ChunkRef::Zero if self.fresh => {}
                    ChunkRef::Zero => {
                        for &(o, l) in &rec.ranges {
                            let off = base + u64::from(o);
                            let len = u64::from(l).min(self.limit.saturating_sub(off));
                            self.disk.zero_range(off, len)?;
                        }
                    }
                    ChunkRef::Data { .. } => {
                        self.fetch(&rec, st)?;
                        self.write_ranges(&st.buf, base, &rec.ranges)?;
                    }
                }
                self.progress.add(used);
                Ok(())
            }
        }
    }

    /// Write one pass (partition areas, or boot areas).
    pub fn pass(&self, l: &Loaded, pass: AreaKind, zero_free: bool, threads: usize) -> Result<()> {
        crate::util::pool::for_each(
            threads,
            || {
                Ok(WorkerState {
                    buf: AlignedBuf::new(CHUNK_SIZE as usize),
                    scratch: self.resume.then(|| AlignedBuf::new(CHUNK_SIZE as usize)),
                    reader: ChunkReader::new()?,
                })
            },
            |st, job| self.work(st, job),
            |tx| feed(l, self, pass, zero_free, tx),
        )
    }
}

/// Feed one pass (partition areas, or boot areas) to the workers.
fn feed(l: &Loaded, ctx: &Writer, pass: AreaKind, zero_free: bool, tx: &Feeder<Job>) -> Result<()> {
    let m = &l.manifest;
    // Per used-blocks area, how far free space has been accounted for (for --zero-free).
    let mut cursor: Vec<u64> = vec![0; m.areas.len()];
    let zero_tail = |ai: usize, from: u64| -> Option<Job> {
        let a = &m.areas[ai];
        (from < a.len).then(|| Job::Zero {
            offset: a.start + from,
            len: a.len - from,
        })
    };
    let want_zero =
        |ai: usize| zero_free && !ctx.fresh && m.areas[ai].content == Content::UsedBlocks;
    let mut last_area: Option<usize> = None;
    let mut seen = vec![false; m.areas.len()];
    // Boot areas are written with the area at offset 0 (MBR, primary GPT) strictly last.
    let mut head: Vec<Record> = Vec::new();
    for r in l.records()? {
        let r = r?;
        let ai = r.area as usize;
        let area = &m.areas[ai];
        if area.kind != pass {
            continue;
        }
        if tx.stopped() {
            return Ok(());
        }
        seen[ai] = true;
        if last_area != Some(ai) {
            if let Some(p) = last_area
                && want_zero(p)
                && let Some(j) = zero_tail(p, cursor[p])
            {
                tx.send(j);
            }
            last_area = Some(ai);
        }
        if want_zero(ai) {
            for &(o, len) in &r.ranges {
                let start = r.offset + u64::from(o);
                if start > cursor[ai] {
                    tx.send(Job::Zero {
                        offset: area.start + cursor[ai],
                        len: start - cursor[ai],
                    });
                }
                cursor[ai] = start + u64::from(len);
            }
        }
        if pass == AreaKind::Boot && area.start == 0 {
            head.push(r);
            continue;
        }
        let base = area.start + r.offset;
        if !tx.send(Job::Write { base, rec: r }) {
            return Ok(());
        }
    }
    if let Some(p) = last_area
        && want_zero(p)
        && let Some(j) = zero_tail(p, cursor[p])
    {
        tx.send(j);
    }
    // Used-blocks areas without a single record still need zeroing.
    for (ai, a) in m.areas.iter().enumerate() {
        if a.kind == pass && want_zero(ai) && !seen[ai] {
            tx.send(Job::Zero {
                offset: a.start,
                len: a.len,
            });
        }
    }
    for r in head {
        tx.send(Job::Write {
            base: r.offset,
            rec: r,
        });
    }
    Ok(())
}

/// Read back every used range (bypassing the page cache) and compare with the chunk hashes.
pub fn read_back(
    l: &Loaded,
    disk: &Disk,
    layout: &DiskLayout,
    threads: usize,
    quiet: bool,
) -> Result<()> {
    let m = &l.manifest;
    let target = DiskLayout::read(&disk.file, disk.size, disk.sector_size).with_context(|| {
        format!(
            "verify: cannot read the partition table back from {}",
            disk.path.display()
        )
    })?;
    if !layout.matches(&target) {
        bail!(
            "verify: the partition table on {} differs from the backup's",
            disk.path.display()
        );
    }
    // Drop cached pages so we read what the device holds.
    let _ = nix::fcntl::posix_fadvise(
        &disk.file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    let total: u64 = m.stats.used_bytes;
    let guard = Progress::start("verify", total, quiet);
    let progress = guard.handle();
    crate::util::pool::for_each(
        threads,
        || Ok(AlignedBuf::new(CHUNK_SIZE as usize)),
        |buf, (base, r): (u64, Record)| {
            let len = r.len as usize;
            buf[..len].fill(0);
            for &(o, l) in &r.ranges {
                let (o, l) = (o as usize, l as usize);
                let at = base + o as u64;
                disk.file
                    .read_exact_at(&mut buf[o..o + l], at)
                    .map_err(|e| disk.io_error("read back", at, l as u64, e))?;
            }
            let ok = match &r.chunk {
                ChunkRef::Data { digest, .. } => Digest::of(&buf[..len]) == *digest,
                ChunkRef::Zero => buf[..len].iter().all(|&b| b == 0),
            };
            progress.add(r.used_bytes());
            if !ok {
                let ss = disk.sector_size.max(1);
                bail!(
                    "verify: sectors {}-{} of {} ({len} bytes at offset {base}) differ from the backup: the disk dropped writes or is failing; restore again or use another disk",
                    base / ss,
                    (base + len as u64).div_ceil(ss) - 1,
                    disk.path.display()
                );
            }
            Ok(())
        },
        |tx| {
            for r in l.records()? {
                let r = r?;
                let a = &m.areas[r.area as usize];
                // The partition table was rewritten for a different-size disk: skip what it covers.
                if a.kind == AreaKind::Boot && disk.size != m.disk.size {
                    continue;
                }
                if !tx.send((a.start + r.offset, r)) {
                    break;
                }
            }
            Ok(())
        },
    )
}
