//! Image restore: preflight (everything checked before the first write), then a pipeline of
//! fetch -> decompress + sha256 -> positional writes of used ranges only, partition data first,
//! boot areas and partition table last.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crossbeam_channel::{Receiver, bounded};

use crate::chunkindex::{ChunkRef, IndexReader, Record};
use crate::device::Disk;
use crate::layout::{DiskLayout, Table};
use crate::manifest::{AreaKind, Content, Manifest};
use crate::progress::{Progress, human_bytes};
use crate::repo::{CHUNK_SIZE, Digest, RepoSource};

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreOptions {
    #[command(flatten)]
    pub point: PointArgs,
    /// Target disk: a block device, or an image file (created if missing).
    #[arg(long)]
    pub target: PathBuf,
    /// Overwrite a target that holds data without asking.
    #[arg(long)]
    pub yes: bool,
    /// Read back everything written and check it.
    #[arg(long)]
    pub verify: bool,
    /// Also zero the free space of filesystems (by default it is left as it is).
    #[arg(long)]
    pub zero_free: bool,
    /// Skip reading every chunk before writing (faster on slow media; a damaged chunk is then
    /// found mid-restore, and the disk is left without a partition table).
    #[arg(long)]
    pub no_precheck: bool,
    /// Worker threads [default: twice the number of CPUs].
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub fixups: crate::fixup::FixupOptions,
}

pub struct RestoreSummary {
    pub id: String,
    pub written: u64,
    pub skipped: u64,
    pub elapsed: Duration,
    pub verified: bool,
}

const MARKER: &str = "BMR-RESTORE-IN-PROGRESS";

fn marker(m: &Manifest, sector: u64) -> Vec<u8> {
    let mut s = format!("{MARKER} snapshot={} host={}\n", m.id, m.host).into_bytes();
    s.resize(sector as usize, 0);
    s
}

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

/// Everything a restore needs from the repository, loaded and checked.
pub struct Loaded {
    pub manifest: Manifest,
    pub index: Vec<u8>,
}

/// Which snapshot `--at` names, with the image a restore writes first.
#[derive(Debug, Clone, clap::Args)]
pub struct PointArgs {
    /// Repository: a directory.
    #[arg(long)]
    pub repo: String,
    /// Host whose backups to use.
    #[arg(long)]
    pub host: String,
    /// Snapshot id, `latest`, or a time (newest snapshot at or before it).
    #[arg(long, default_value = "latest")]
    pub at: String,
}

/// A point in time: its image, and the incremental on top of it when the point is one.
pub struct Point {
    pub image: Loaded,
    pub inc: Option<crate::manifest::IncManifest>,
}

pub fn resolve(src: &dyn RepoSource, host: &str, at: &str) -> Result<Point> {
    crate::repo::check_config(src)?;
    let idx = crate::manifest::read_host_index(src, host)?;
    let sel = crate::manifest::select(&idx, at)?;
    let inc = match sel.kind {
        crate::manifest::Kind::Incremental => {
            Some(crate::manifest::read_inc_manifest(src, host, &sel.id)?)
        }
        crate::manifest::Kind::Image => None,
    };
    let image_id = inc.as_ref().map_or(sel.id.clone(), |i| i.base.clone());
    Ok(Point {
        image: load_snapshot(src, host, &image_id)?,
        inc,
    })
}

pub fn load_snapshot(src: &dyn RepoSource, host: &str, id: &str) -> Result<Loaded> {
    let manifest = crate::manifest::read_manifest(src, host, id)?;
    let index = crate::manifest::read_chunk_index(src, &manifest)?;
    Ok(Loaded { manifest, index })
}

pub fn records(l: &Loaded) -> Result<IndexReader<&[u8]>> {
    IndexReader::new(&l.index[..], &l.manifest.id)
}

/// Check that every record is consistent with the manifest and that every chunk exists with its
/// recorded size; with `read_all`, also read each chunk and check its payload hash.
fn preflight(
    src: &dyn RepoSource,
    l: &Loaded,
    read_all: bool,
    threads: usize,
    quiet: bool,
) -> Result<u64> {
    let m = &l.manifest;
    let mut total = 0u64;
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
        for r in records(l)? {
            let r = r?;
            check(&r)?;
            total += r.used_bytes();
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
        return Ok(total);
    }
    // The manifest already knows the total: no extra pass over the index.
    let guard = Progress::start("checking backup", m.stats.stored_bytes, quiet);
    let progress = guard.handle();
    let (tx, rx) = bounded::<Record>(threads * 2);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..threads {
            let rx = rx.clone();
            let (failure, stop, progress) = (&failure, &stop, progress.clone());
            s.spawn(move || {
                for r in rx.iter() {
                    if stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    let ChunkRef::Data {
                        digest,
                        stored_len,
                        stored_sha,
                    } = &r.chunk
                    else {
                        continue;
                    };
                    let err = match src.chunk_len(digest) {
                        Ok(None) => Some(missing(digest)),
                        Err(e) => Some(e),
                        Ok(Some(_)) => match src.read_chunk(digest) {
                            Err(e) => Some(e),
                            Ok(b) => (b.len() as u64 != u64::from(*stored_len)
                                || crate::repo::check_stored(&b, stored_sha).is_none())
                            .then(|| damaged(digest)),
                        },
                    };
                    progress.add(u64::from(*stored_len));
                    if let Some(e) = err {
                        stop.store(true, Ordering::Relaxed);
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            });
        }
        drop(rx);
        for r in records(l)? {
            let r = r?;
            check(&r)?;
            total += r.used_bytes();
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if tx.send(r).is_err() {
                break;
            }
        }
        drop(tx);
        Ok(())
    })?;
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(total)
}

enum Job {
    Write { base: u64, rec: Record },
    Zero { offset: u64, len: u64 },
}

struct Ctx<'a> {
    src: &'a dyn RepoSource,
    m: &'a Manifest,
    disk: &'a Disk,
    /// Target was created by us: holes already read as zero.
    fresh: bool,
    resume: bool,
    limit: u64,
    progress: Progress,
    stop: AtomicBool,
    skipped: AtomicU64,
    failure: Mutex<Option<anyhow::Error>>,
}

impl Ctx<'_> {
    fn fail(&self, e: anyhow::Error) {
        self.stop.store(true, Ordering::Relaxed);
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    /// Fetch, decompress and check a chunk into `buf`; returns its plain length.
    fn fetch(
        &self,
        rec: &Record,
        buf: &mut AlignedBuf,
        dec: &mut zstd::bulk::Decompressor,
    ) -> Result<()> {
        let ChunkRef::Data {
            digest, stored_sha, ..
        } = &rec.chunk
        else {
            buf[..rec.len as usize].fill(0);
            return Ok(());
        };
        let stored = self.src.read_chunk(digest)?;
        let bad = || {
            anyhow::anyhow!(
                "chunk {digest} of snapshot {} is damaged: restore stopped before writing it, the partition table was not written; run bmr verify --repo {} and restore another snapshot with --at",
                self.m.id,
                self.src.location()
            )
        };
        // The plain-data hash below is the check that matters; hashing the payload as well
        // would cost a third more hashing for nothing (the pre-check already did it).
        let payload = match crate::repo::parse_chunk(&stored) {
            Some((sum, p)) if sum == *stored_sha => p,
            _ => return Err(bad()),
        };
        let n = dec
            .decompress_to_buffer(payload, &mut buf[..CHUNK_SIZE as usize])
            .map_err(|_| bad())?;
        if n != rec.len as usize || Digest::of(&buf[..n]) != *digest {
            return Err(bad());
        }
        Ok(())
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
        const A: u64 = 4096;
        let ctx = || format!("cannot write {} at offset {off}", self.disk.path.display());
        let buf_addr = data.as_ptr() as u64;
        let (head, mid_len) = match &self.disk.direct {
            // Buffer and disk offsets must share alignment for the direct part.
            Some(_) if buf_addr % A == off % A => {
                let head = ((A - off % A) % A).min(data.len() as u64);
                let mid = (data.len() as u64 - head) / A * A;
                (head as usize, mid as usize)
            }
            _ => (data.len(), 0),
        };
        if head > 0 {
            self.disk
                .file
                .write_all_at(&data[..head], off)
                .with_context(ctx)?;
        }
        if mid_len > 0
            && let Some(direct) = &self.disk.direct
        {
            direct
                .write_all_at(&data[head..head + mid_len], off + head as u64)
                .with_context(ctx)?;
        }
        let rest = head + mid_len;
        if rest < data.len() {
            self.disk
                .file
                .write_all_at(&data[rest..], off + rest as u64)
                .with_context(ctx)?;
        }
        Ok(())
    }

    fn worker(&self, jobs: &Receiver<Job>) {
        let mut buf = AlignedBuf::new(CHUNK_SIZE as usize);
        let mut scratch = self.resume.then(|| AlignedBuf::new(CHUNK_SIZE as usize));
        let mut dec = match zstd::bulk::Decompressor::new() {
            Ok(d) => d,
            Err(e) => return self.fail(anyhow::anyhow!("cannot start zstd: {e}")),
        };
        for job in jobs.iter() {
            if self.stop.load(Ordering::Relaxed) {
                continue;
            }
            let res = match job {
                Job::Zero { offset, len } => {
                    let len = len.min(self.limit.saturating_sub(offset));
                    self.disk.zero_range(offset, len)
                }
                Job::Write { base, rec } => (|| {
                    let used = rec.used_bytes();
                    if let Some(s) = scratch.as_mut()
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
                            self.fetch(&rec, &mut buf, &mut dec)?;
                            self.write_ranges(&buf, base, &rec.ranges)?;
                        }
                    }
                    self.progress.add(used);
                    Ok(())
                })(),
            };
            if let Err(e) = res {
                self.fail(e);
            }
        }
    }
}

/// Feed one pass (partition areas, or boot areas) to the workers.
fn feed(
    l: &Loaded,
    ctx: &Ctx,
    pass: AreaKind,
    zero_free: bool,
    tx: &crossbeam_channel::Sender<Job>,
) -> Result<()> {
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
    for r in records(l)? {
        let r = r?;
        let ai = r.area as usize;
        let area = &m.areas[ai];
        if area.kind != pass {
            continue;
        }
        if ctx.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        seen[ai] = true;
        if last_area != Some(ai) {
            if let Some(p) = last_area
                && want_zero(p)
                && let Some(j) = zero_tail(p, cursor[p])
            {
                let _ = tx.send(j);
            }
            last_area = Some(ai);
        }
        if want_zero(ai) {
            for &(o, len) in &r.ranges {
                let start = r.offset + u64::from(o);
                if start > cursor[ai] {
                    let _ = tx.send(Job::Zero {
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
        if tx.send(Job::Write { base, rec: r }).is_err() {
            return Ok(());
        }
    }
    if let Some(p) = last_area
        && want_zero(p)
        && let Some(j) = zero_tail(p, cursor[p])
    {
        let _ = tx.send(j);
    }
    // Used-blocks areas without a single record still need zeroing.
    for (ai, a) in m.areas.iter().enumerate() {
        if a.kind == pass && want_zero(ai) && !seen[ai] {
            let _ = tx.send(Job::Zero {
                offset: a.start,
                len: a.len,
            });
        }
    }
    for r in head {
        let _ = tx.send(Job::Write {
            base: r.offset,
            rec: r,
        });
    }
    Ok(())
}

fn run_pass(l: &Loaded, ctx: &Ctx, pass: AreaKind, zero_free: bool, threads: usize) -> Result<()> {
    let (tx, rx) = bounded::<Job>(threads * 2);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let rx = rx.clone();
            s.spawn(move || ctx.worker(&rx));
        }
        drop(rx);
        let r = feed(l, ctx, pass, zero_free, &tx);
        drop(tx);
        r
    })?;
    // Workers record the first failure and stop; report it once the pass has drained.
    if let Some(e) = ctx.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    Ok(())
}

/// The restore plan shown before anything is written.
pub fn plan_lines(
    m: &Manifest,
    target: &std::path::Path,
    target_size: u64,
    fresh: bool,
    resume: bool,
    total: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    let scheme = match &m.disk.table {
        Table::Gpt(_) => "GPT",
        Table::Mbr(_) => "MBR",
        Table::None => "no partition table",
    };
    out.push("Restore plan".to_string());
    out.push(format!(
        "  snapshot  {} of host {}, taken {} ({})",
        m.id,
        m.host,
        crate::timefmt::display(m.unix_time),
        match m.consistency {
            crate::manifest::Consistency::Offline => "offline",
            crate::manifest::Consistency::CrashConsistent => "crash-consistent",
            crate::manifest::Consistency::Snapshot => "through LVM snapshots",
        }
    ));
    out.push(format!(
        "  source    {} ({}), {scheme}, {} sectors of {} bytes",
        m.source,
        human_bytes(m.disk.size),
        m.disk.size / m.disk.sector_size,
        m.disk.sector_size
    ));
    let aliases: Vec<&str> = m
        .source_names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != m.source)
        .collect();
    if !aliases.is_empty() {
        out.push(format!("            also named {}", aliases.join(", ")));
    }
    out.push(format!(
        "  target    {} ({}){}{}",
        target.display(),
        human_bytes(target_size),
        if fresh { ", new image file" } else { "" },
        if resume {
            ", resuming an interrupted restore"
        } else {
            ""
        }
    ));
    for a in &m.areas {
        let what = match (a.kind, a.partition) {
            (AreaKind::Boot, _) => "boot area".to_string(),
            (AreaKind::Partition, Some(n)) => format!("partition {n}"),
            (AreaKind::Partition, None) => "whole disk".to_string(),
        };
        let fs = match (&a.fs, a.volumes.as_slice()) {
            (Some(f), _) => describe_fs(f),
            (None, []) => "stored whole".to_string(),
            (None, lvs) => {
                let lvs: Vec<String> = lvs
                    .iter()
                    .map(|lv| {
                        let fs = lv
                            .fs
                            .as_ref()
                            .map_or("no filesystem bmr maps".into(), describe_fs);
                        format!("{} ({fs}, {})", lv.name, human_bytes(lv.size))
                    })
                    .collect();
                format!("LVM PV with {}", lvs.join(", "))
            }
        };
        out.push(format!(
            "  {what:<13} at {:>12} size {:>10}  {fs}, {} to write",
            a.start,
            human_bytes(a.len),
            human_bytes(a.used_bytes)
        ));
    }
    if target_size > m.disk.size && matches!(m.disk.table, Table::Gpt(_)) {
        out.push("  the target is bigger: the GPT backup header moves to its end".to_string());
    }
    out.push(format!(
        "  {} to write; partition table and boot areas last",
        human_bytes(total)
    ));
    out
}

/// Create a missing image-file target at the source size.
fn prepare_target(path: &std::path::Path, size: u64) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create image file {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("cannot size image file {}", path.display()))?;
    Ok(true)
}

fn layout_of(m: &Manifest) -> DiskLayout {
    DiskLayout {
        sector_size: m.disk.sector_size,
        disk_size: m.disk.size,
        table: m.disk.table.clone(),
        warnings: Vec::new(),
    }
}

/// The smallest disk this snapshot fits on: its partitions and the partition table.
pub fn min_target_size(m: &Manifest) -> u64 {
    m.areas
        .iter()
        .filter(|a| a.kind == AreaKind::Partition)
        .map(|a| a.start + a.len)
        .max()
        .unwrap_or(0)
        .max(layout_of(m).min_target_size())
}

pub fn run(opts: &RestoreOptions) -> Result<RestoreSummary> {
    let start = Instant::now();
    let src = crate::repo::open_source(&opts.point.repo)?;
    let src = src.as_ref();
    // A point after the image: restore the image, then bring its filesystems to that point.
    let Point { image: l, inc } = resolve(src, &opts.point.host, &opts.point.at)?;
    let m = &l.manifest;
    let apply_plan = match &inc {
        Some(i) => plan_apply(src, m, i)?,
        None => Vec::new(),
    };
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)
        .max(1);
    let layout = layout_of(m);
    let min_size = min_target_size(m);

    // Target checks that need no write access come before the (possibly long) chunk check.
    crate::fixup::preflight(&opts.fixups, &opts.target)?;
    if opts.target.exists() {
        crate::safety::check_restore_target(&opts.target, src.local_path())?;
    }
    let read_all = !opts.no_precheck && src.local_path().is_some();
    let total = preflight(src, &l, read_all, threads, opts.quiet)?;

    let fresh = prepare_target(&opts.target, m.disk.size)?;
    let result = (|| {
        crate::safety::check_restore_target(&opts.target, src.local_path())?;
        let disk = Disk::open_write(&opts.target)?;
        if disk.size < min_size {
            bail!(
                "target {} is too small: {} ({} bytes), the backup needs at least {} ({} bytes): use a bigger disk",
                opts.target.display(),
                human_bytes(disk.size),
                disk.size,
                human_bytes(min_size),
                min_size
            );
        }
        if disk.sector_size != m.disk.sector_size {
            bail!(
                "target {} has {}-byte sectors, the backup was taken from a disk with {}-byte sectors: use a disk with {}-byte sectors",
                opts.target.display(),
                disk.sector_size,
                m.disk.sector_size,
                m.disk.sector_size
            );
        }
        let mark = marker(m, disk.sector_size);
        let mut first = vec![0u8; disk.sector_size as usize];
        let resume = !fresh && disk.file.read_exact_at(&mut first, 0).is_ok() && first == mark;
        if !fresh
            && !resume
            && let Some(what) = crate::safety::existing_content(&disk)?
        {
            crate::safety::confirm_overwrite(&disk, &what, opts.yes)?;
        }
        for line in plan_lines(m, &disk.path, disk.size, fresh, resume, total) {
            println!("{line}");
        }
        for line in crate::fixup::plan_lines(m, &opts.fixups) {
            println!("  {line}");
        }
        Ok((disk, resume, mark))
    })();
    let (disk, resume, mark) = match result {
        Ok(v) => v,
        Err(e) => {
            if fresh {
                let _ = std::fs::remove_file(&opts.target);
            }
            return Err(e);
        }
    };

    // From here on the target changes. Mark it first, and hide any old table, so an interrupted
    // restore never looks like a usable disk.
    let ss = disk.sector_size;
    if !resume {
        disk.file
            .write_all_at(&mark, 0)
            .and_then(|_| disk.file.write_all_at(&vec![0u8; ss as usize], ss))
            .and_then(|_| {
                let last = (disk.size / ss).saturating_sub(1) * ss;
                if last > ss {
                    disk.file.write_all_at(&vec![0u8; ss as usize], last)
                } else {
                    Ok(())
                }
            })
            .and_then(|_| disk.file.sync_data())
            .with_context(|| format!("cannot write to {}", disk.path.display()))?;
    }
    let guard = Progress::start("restore", total, opts.quiet);
    let ctx = Ctx {
        src,
        m,
        disk: &disk,
        fresh,
        resume,
        limit: disk.size,
        progress: guard.handle(),
        stop: AtomicBool::new(false),
        skipped: AtomicU64::new(0),
        failure: Mutex::new(None),
    };
    run_pass(&l, &ctx, AreaKind::Partition, opts.zero_free, threads)?;
    disk.file
        .sync_data()
        .with_context(|| format!("cannot flush {}", disk.path.display()))?;
    run_pass(&l, &ctx, AreaKind::Boot, opts.zero_free, threads)?;
    drop(guard);
    if !matches!(layout.table, Table::None) {
        layout.write_table(&disk.file, disk.size).with_context(|| {
            format!(
                "cannot write the partition table to {}",
                disk.path.display()
            )
        })?;
    }
    disk.file
        .sync_all()
        .with_context(|| format!("cannot flush {}", disk.path.display()))?;
    disk.reread_partitions();
    if opts.verify {
        verify_target(&l, &disk, &layout, threads, opts.quiet)?;
    }
    // The blocks are written: what follows mounts the restored filesystems.
    let skipped = ctx.skipped.load(Ordering::Relaxed);
    drop(ctx);
    let mut disk = disk;
    disk.release_exclusive()?;
    if let Some(i) = &inc {
        for (ai, current, desired) in &apply_plan {
            let area = &m.areas[*ai as usize];
            let mnt = crate::apply::mount_area(&disk, area, &ai.to_string())?;
            let st = crate::apply::apply(src, &i.id, &mnt.dir, current, desired, None)?;
            println!(
                "applied incremental {} to the filesystem at offset {}: {} removed, {} written, {} updated",
                i.id, area.start, st.removed, st.written, st.updated
            );
        }
    }
    crate::fixup::run(m, &disk, &opts.fixups)?;
    Ok(RestoreSummary {
        id: inc.as_ref().map_or(m.id.clone(), |i| i.id.clone()),
        written: total - skipped,
        skipped,
        elapsed: start.elapsed(),
        verified: opts.verify,
    })
}

/// Load the file lists an incremental restore applies, and check that every chunk they name
/// exists, before anything is written.
type ApplyPlan = Vec<(u32, Vec<crate::toc::FileMeta>, Vec<crate::toc::FileMeta>)>;

/// `ext4 "root" 6d1f...`: type, label and UUID of a filesystem, for the plan.
fn describe_fs(f: &crate::manifest::FsMeta) -> String {
    format!(
        "{}{}{}",
        f.variant.as_deref().unwrap_or(&f.fstype),
        f.label
            .as_deref()
            .map(|l| format!(" \"{l}\""))
            .unwrap_or_default(),
        f.uuid
            .as_deref()
            .map(|u| format!(" {u}"))
            .unwrap_or_default()
    )
}

fn plan_apply(
    src: &dyn RepoSource,
    m: &Manifest,
    inc: &crate::manifest::IncManifest,
) -> Result<ApplyPlan> {
    let mut plan = Vec::new();
    for fs in &inc.filesystems {
        let area = fs.toc.area;
        if m.areas
            .get(area as usize)
            .is_none_or(|a| a.kind != AreaKind::Partition)
        {
            bail!(
                "incremental {} names area {area}, which image {} does not have",
                inc.id,
                m.id
            );
        }
        let Some(base_toc) = m.tocs.iter().find(|t| t.area == area) else {
            bail!("image {} has no file list for area {area}", m.id);
        };
        let current = crate::manifest::read_toc(src, &m.host, &m.id, base_toc)?;
        let desired = crate::manifest::read_toc(src, &inc.host, &inc.id, &fs.toc)?;
        for f in &desired {
            for d in f.chunk_digests() {
                let d = d?;
                if src.chunk_len(&d)?.is_none() {
                    bail!(
                        "file {:?} of snapshot {}: chunk {d} is missing: run bmr verify and restore another point with --at",
                        String::from_utf8_lossy(&f.path),
                        inc.id
                    );
                }
            }
        }
        plan.push((area, current, desired));
    }
    Ok(plan)
}

/// Read back every used range (bypassing the page cache) and compare with the chunk hashes.
fn verify_target(
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
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let (tx, rx) = bounded::<(u64, Record)>(threads * 2);
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..threads {
            let rx = rx.clone();
            let (failure, progress) = (&failure, progress.clone());
            s.spawn(move || {
                let mut buf = AlignedBuf::new(CHUNK_SIZE as usize);
                for (base, r) in rx.iter() {
                    let len = r.len as usize;
                    buf[..len].fill(0);
                    let mut ok = true;
                    for &(o, l) in &r.ranges {
                        let (o, l) = (o as usize, l as usize);
                        if disk.file.read_exact_at(&mut buf[o..o + l], base + o as u64).is_err() {
                            ok = false;
                        }
                    }
                    ok = ok
                        && match &r.chunk {
                            ChunkRef::Data { digest, .. } => Digest::of(&buf[..len]) == *digest,
                            ChunkRef::Zero => buf[..len].iter().all(|&b| b == 0),
                        };
                    progress.add(r.used_bytes());
                    if !ok {
                        failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| {
                            anyhow::anyhow!(
                                "verify: {} bytes at offset {base} on {} differ from the backup: the disk may be failing; restore again or use another disk",
                                len,
                                disk.path.display()
                            )
                        });
                    }
                }
            });
        }
        drop(rx);
        for r in records(l)? {
            let r = r?;
            let a = &m.areas[r.area as usize];
            // The partition table was rewritten for a different-size disk: skip what it covers.
            if a.kind == AreaKind::Boot && disk.size != m.disk.size {
                continue;
            }
            if tx.send((a.start + r.offset, r)).is_err() {
                break;
            }
        }
        drop(tx);
        Ok(())
    })?;
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(())
}

pub fn print_summary(s: &RestoreSummary) {
    println!(
        "restored snapshot {}: {} written{}{}, {:.1}s",
        s.id,
        human_bytes(s.written),
        if s.skipped > 0 {
            format!(", {} already in place", human_bytes(s.skipped))
        } else {
            String::new()
        },
        if s.verified { ", verified" } else { "" },
        s.elapsed.as_secs_f64()
    );
}
