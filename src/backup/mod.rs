//! Image backup: partition table, boot areas and the used blocks of every partition, chunked,
//! hashed, compressed and stored in the repository.
//!
//! Pipeline: one reader thread (pread of used ranges only) -> N workers (zero check, sha256,
//! dedup check, zstd, store) -> this thread (reorders, writes the chunk index). A fixed pool of
//! buffers bounds memory whatever the disk size.

pub mod incremental;
pub mod lvm;
pub mod subvol;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use crossbeam_channel::{Receiver, RecvTimeoutError, bounded};

use crate::backup::lvm::Snapshots;
use crate::device::Disk;
use crate::device::layout::{DiskLayout, Table};
use crate::fs::map::UsedMap;
use crate::repo::chunkindex::{ChunkRef, IndexWriter, Record};
use crate::repo::manifest::{
    Area, AreaKind, Consistency, Content, DiskMeta, FsMeta, IndexRef, Kind, MANIFEST_FORMAT,
    MANIFEST_VERSION, Manifest, Stats,
};
use crate::repo::snapshot::SnapshotWriter;
use crate::repo::{CHUNK_SIZE, Digest, RepoWrite};
use crate::util::pool::Feeder;
use crate::util::progress::{Progress, human_bytes};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotMode {
    /// Image backups: LVM snapshots of the logical volumes on the disk.
    Lvm,
    /// Incrementals: read-only snapshots of the mounted btrfs subvolumes (removed after).
    Btrfs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BackupOptions {
    /// Repository directory (created if missing or empty).
    #[arg(long)]
    pub repo: PathBuf,
    /// Host name the snapshot is filed under [default: this machine's hostname].
    #[arg(long)]
    pub host: Option<String>,
    /// Back up although a filesystem on DISK is mounted read-write (crash-consistent).
    #[arg(long)]
    pub allow_live: bool,
    /// Read a snapshot instead of the live disk (lvm) or the live subvolumes (btrfs, with
    /// --incremental).
    #[arg(long, value_enum)]
    pub snapshot: Option<SnapshotMode>,
    /// Another name the disk had on its own machine (e.g. /dev/sda or a /dev/disk/by-id path)
    /// when it is backed up elsewhere: a restore onto a new disk rewrites device paths in its
    /// fstab and GRUB files that use that name. The names this machine knows are recorded anyway.
    #[arg(long, value_name = "DEVICE")]
    pub source_name: Vec<String>,
    /// A key file, or a file holding the passphrase, that opens the LUKS volumes on DISK
    /// (read whole, as `cryptsetup --key-file`). bmr then maps the filesystem inside and
    /// stores the header and the ciphertext of its used blocks only; without it, a LUKS
    /// volume is stored whole. At a terminal, bmr asks for the passphrase instead.
    #[arg(long, value_name = "FILE")]
    pub luks_keyfile: Option<PathBuf>,
    /// Store what only the opened LUKS volume shows: the file lists of the filesystems inside
    /// (for `ls`, `restore-files`) and, with --incremental, their changed files. They are
    /// plaintext in the repository: give it only for a repository as safe as the disk.
    #[arg(long)]
    pub allow_plaintext_luks: bool,
    /// zstd compression level (1 = fastest, 19 = smallest). Level 1 keeps backups of large
    /// disks fast; level 3 stores about 10% less.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compression_level: i32,
    /// Worker threads [default: twice the number of CPUs].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Before reusing a chunk already in the repository, read it and check its stored bytes
    /// against its checksum (a damaged one is rewritten from this backup's data). Without it,
    /// only its header and declared length are checked: reading every reused chunk back
    /// would double a repeat backup's reads. `bmr verify` finds the rest and sets damaged
    /// chunks aside, so the next backup stores them again.
    #[arg(long)]
    pub verify_existing: bool,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
    /// File-level backup of the mounted filesystems of the host's last image: what changed
    /// since the host's previous backup of any kind, and the list of everything present.
    #[arg(long, conflicts_with = "differential")]
    pub incremental: bool,
    /// Like --incremental, but changes since the last image.
    #[arg(long)]
    pub differential: bool,
    /// The disk to back up (block device or raw disk image file); with --incremental, the
    /// mount points of the image's filesystems.
    #[arg(required = true, value_name = "DISK | MOUNTPOINT...")]
    pub paths: Vec<PathBuf>,
}

impl BackupOptions {
    fn disk(&self) -> Result<&std::path::Path> {
        match self.paths.as_slice() {
            [d] => Ok(d),
            _ => bail!("an image backup takes exactly one disk (did you mean --incremental?)"),
        }
    }
}

pub struct BackupSummary {
    pub id: String,
    pub host: String,
    pub stats: Stats,
    pub elapsed: Duration,
    pub warnings: Vec<String>,
}

pub fn default_host() -> Result<String> {
    let h = nix::unistd::gethostname().context("cannot read this machine's hostname")?;
    let h = h.to_string_lossy();
    Ok(h.split('.').next().unwrap_or(&h).to_string())
}

/// What to read for one area.
struct AreaPlan {
    area: Area,
    used: Option<UsedMap>,
    /// A LUKS volume's key, for the file list of the filesystem inside.
    key: Option<crate::device::luks::VolumeKey>,
}

fn plan_areas(
    disk: &Disk,
    layout: &DiskLayout,
    snaps: Option<&Snapshots>,
    secret: &mut crate::device::luks::KeySource,
    warnings: &mut Vec<String>,
) -> Result<Vec<AreaPlan>> {
    let mut plans = Vec::new();
    let whole = |kind, start, len, partition| AreaPlan {
        area: Area::whole(kind, start, len, partition),
        used: None,
        key: None,
    };
    for raw in layout.raw_areas() {
        plans.push(whole(AreaKind::Boot, raw.start, raw.len, None));
    }
    let mut parts: Vec<(Option<u32>, u64, u64)> = layout
        .data_partitions()
        .iter()
        .map(|p| (Some(p.number), p.start, p.len))
        .collect();
    // An unpartitioned disk may carry a filesystem directly.
    if matches!(layout.table, Table::None) && disk.size > 0 {
        parts.push((None, 0, disk.size));
        plans.retain(|p| p.area.start >= disk.size);
    }
    for (num, start, len) in parts {
        let what = num.map_or("disk".to_string(), |n| format!("partition {n}"));
        if let Some(pv) = snaps.and_then(|s| s.pv_at(start)) {
            let lvs: Vec<String> = pv
                .volumes
                .iter()
                .map(|v| {
                    let fs =
                        v.fs.as_ref()
                            .map_or("no filesystem bmr maps", |f| &f.fstype);
                    let how = if v.snapshot { "snapshot" } else { "inactive" };
                    format!("{} ({fs}, {how})", v.name)
                })
                .collect();
            plans.push(AreaPlan {
                area: Area {
                    kind: AreaKind::Partition,
                    start,
                    len,
                    partition: num,
                    content: Content::UsedBlocks,
                    fs: None,
                    used_bytes: pv.used.used_bytes(),
                    note: Some(format!(
                        "LVM physical volume of {}: {}",
                        pv.vg,
                        lvs.join(", ")
                    )),
                    volumes: pv.volumes.clone(),
                    raid: None,
                    luks: None,
                },
                used: Some(pv.used.clone()),
                key: None,
            });
            continue;
        }
        // An md member first: a 1.0 or 0.90 superblock sits after a filesystem that starts
        // at the member's first byte, and would be lost with the free space behind it.
        let probed = match crate::device::md::probe(&disk.file, start, len) {
            Ok(Some(sb)) => {
                plans.push(md_member(disk, num, start, len, &sb, warnings));
                continue;
            }
            Ok(None) => match crate::device::luks::probe(&disk.file, start, len) {
                Ok(Some(h)) => {
                    plans.push(luks_member(disk, num, start, len, &h, secret, warnings)?);
                    continue;
                }
                Ok(None) => crate::fs::map::probe(&disk.file, start, len),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match probed {
            Ok(Some(fs)) => {
                for w in &fs.warnings {
                    let msg = format!("{what}: {w}");
                    eprintln!("warning: {msg}");
                    warnings.push(msg);
                }
                let used_bytes = fs.used.used_bytes();
                plans.push(AreaPlan {
                    area: Area {
                        kind: AreaKind::Partition,
                        start,
                        len,
                        partition: num,
                        content: Content::UsedBlocks,
                        fs: Some(FsMeta::of(&fs)),
                        used_bytes,
                        note: None,
                        volumes: Vec::new(),
                        raid: None,
                        luks: None,
                    },
                    used: Some(fs.used),
                    key: None,
                });
            }
            Ok(None) => plans.push(whole(AreaKind::Partition, start, len, num)),
            Err(e) => {
                let msg = format!("{what}: {e:#}; stored whole instead, with no file list");
                eprintln!("warning: {msg}");
                warnings.push(msg.clone());
                let mut p = whole(AreaKind::Partition, start, len, num);
                p.area.note = Some(msg);
                plans.push(p);
            }
        }
    }
    plans.sort_by_key(|p| p.area.start);
    Ok(plans)
}

/// An md RAID member partition. A RAID1 member holds the whole array: its content is mapped
/// as one volume (`md/NAME`) at the data offset, the filesystem in it like any other, and the
/// rest of the member (superblock, bitmap, reserved space) is stored whole. A member of any
/// other level holds only part of the array: stored whole, with a warning.
fn md_member(
    disk: &Disk,
    num: Option<u32>,
    start: u64,
    len: u64,
    sb: &crate::device::md::MdSuper,
    warnings: &mut Vec<String>,
) -> AreaPlan {
    let what = num.map_or("disk".to_string(), |n| format!("partition {n}"));
    let meta = crate::repo::manifest::MdMeta::from_super(sb);
    let mut warn = |msg: String| {
        eprintln!("warning: {msg}");
        warnings.push(msg);
    };
    let mut area = Area {
        raid: Some(meta.clone()),
        ..Area::whole(AreaKind::Partition, start, len, num)
    };
    let array = format!("md array {} ({})", meta.volume_name(), meta.level);
    if sb.level != 1 {
        let msg = format!(
            "{what}: a member of {array}, whose data is spread over {} disks: stored whole, with no file list (bmr maps RAID1 members; back up the array device's filesystems with --incremental)",
            sb.raid_disks
        );
        warn(msg.clone());
        area.note = Some(msg);
        return AreaPlan {
            area,
            used: None,
            key: None,
        };
    }
    if sb.role.is_none() {
        let msg = format!(
            "{what}: a spare or faulty member of {array}: stored whole (back up an active member)"
        );
        warn(msg.clone());
        area.note = Some(msg);
        return AreaPlan {
            area,
            used: None,
            key: None,
        };
    }
    let mut used = crate::fs::map::UsedMap::new(4096, len);
    used.mark_range(0, sb.data_offset);
    let tail = sb.data_offset + sb.size;
    used.mark_range(tail, len - tail);
    let fs = match crate::fs::map::probe(&disk.file, start + sb.data_offset, sb.size) {
        Ok(fs) => fs,
        Err(e) => {
            warn(format!(
                "{what}: the filesystem in {array}: {e:#}; its content is stored whole"
            ));
            None
        }
    };
    match &fs {
        Some(f) => {
            for w in &f.warnings {
                warn(format!("{what}: {array}: {w}"));
            }
            for (o, l) in f.used.used_ranges(0, sb.size) {
                used.mark_range(sb.data_offset + o, l);
            }
        }
        None => used.mark_range(sb.data_offset, sb.size),
    }
    area.content = Content::UsedBlocks;
    area.used_bytes = used.used_bytes();
    let fsm = fs.as_ref().map(FsMeta::of);
    area.note = Some(format!(
        "{} member {} of {} ({} of {} active){}",
        meta.level,
        sb.role.unwrap_or(0),
        meta.volume_name(),
        sb.active,
        sb.raid_disks,
        fsm.as_ref()
            .map_or(String::new(), |f| format!(": {}", f.fstype))
    ));
    area.volumes = vec![crate::repo::manifest::LvMeta {
        name: meta.volume_name(),
        size: sb.size,
        fs: fsm,
        extents: vec![(sb.data_offset, sb.size, 0)],
        snapshot: false,
    }];
    AreaPlan {
        area,
        used: Some(used),
        key: None,
    }
}

/// A LUKS volume. With its key, the filesystem inside is mapped: the header and keyslots are
/// stored whole and, of the encrypted data, only the ciphertext of the used blocks, rounded
/// out to whole encryption sectors (a part of one would not decrypt). Without a key, or with
/// a cipher bmr cannot decrypt, the volume is stored whole, ciphertext and free space alike.
fn luks_member(
    disk: &Disk,
    num: Option<u32>,
    start: u64,
    len: u64,
    h: &crate::device::luks::LuksHeader,
    secret: &mut crate::device::luks::KeySource,
    warnings: &mut Vec<String>,
) -> Result<AreaPlan> {
    use crate::device::luks::{Decrypt, VolumeKey};
    let what = num.map_or("disk".to_string(), |n| format!("partition {n}"));
    let meta = crate::repo::manifest::LuksMeta::from_header(h, len);
    let mut warn = |msg: String| {
        eprintln!("warning: {msg}");
        warnings.push(msg);
    };
    let vol = format!("LUKS{} volume {}", h.version, meta.volume_name());
    let mut plan = AreaPlan {
        area: Area {
            luks: Some(meta.clone()),
            ..Area::whole(AreaKind::Partition, start, len, num)
        },
        used: None,
        key: None,
    };
    let whole = |why: String| {
        format!(
            "{what}: {vol}: {why}: stored whole (ciphertext, free space included), with no file list"
        )
    };
    if let Some(why) = &h.unsupported {
        let msg = whole(format!("bmr cannot look inside it ({why})"));
        warn(msg.clone());
        plan.area.note = Some(msg);
        return Ok(plan);
    }
    let Some(s) = secret.get(&what)? else {
        let msg = whole("no key to open it (give --luks-keyfile)".into());
        warn(msg.clone());
        plan.area.note = Some(msg);
        return Ok(plan);
    };
    // A key that opens nothing is the user's mistake: say so before anything is written.
    let key = VolumeKey::unlock(&disk.file, start, h, s).with_context(|| what.clone())?;
    let raw = crate::fs::read::FileRange {
        file: &disk.file,
        base: start,
        len,
    };
    let dec = Decrypt::new(&raw, h, len, &key)?;
    let dlen = dec.len();
    let fs = match crate::fs::map::probe(&dec, 0, dlen) {
        Ok(fs) => fs,
        Err(e) => {
            warn(format!(
                "{what}: the filesystem in {vol}: {e:#}; its content is stored whole"
            ));
            None
        }
    };
    let sector = u64::from(h.sector_size);
    let mut used = UsedMap::new(4096, len);
    used.mark_range(0, h.data_offset);
    let tail = h.data_offset + dlen;
    used.mark_range(tail, len - tail);
    match &fs {
        Some(f) => {
            for w in &f.warnings {
                warn(format!("{what}: {vol}: {w}"));
            }
            for (o, l) in f.used.used_ranges(0, dlen) {
                let a = o / sector * sector;
                let b = (o + l).div_ceil(sector) * sector;
                used.mark_range(h.data_offset + a, b - a);
            }
        }
        None => used.mark_range(h.data_offset, dlen),
    }
    let fsm = fs.as_ref().map(FsMeta::of);
    plan.area.note = Some(format!(
        "{vol} ({}){}",
        h.cipher,
        fsm.as_ref()
            .map_or(String::new(), |f| format!(": {}", f.fstype))
    ));
    plan.area.content = Content::UsedBlocks;
    plan.area.used_bytes = used.used_bytes();
    plan.area.volumes = vec![crate::repo::manifest::LvMeta {
        name: meta.volume_name(),
        size: dlen,
        fs: fsm,
        extents: vec![(h.data_offset, dlen, 0)],
        snapshot: false,
    }];
    plan.used = Some(used);
    plan.key = Some(key);
    Ok(plan)
}

struct Job {
    seq: u64,
    area: u32,
    offset: u64,
    len: u32,
    ranges: Vec<(u32, u32)>,
    buf: Vec<u8>,
}

struct Done {
    seq: u64,
    record: Record,
    new_bytes: u64,
    buf: Vec<u8>,
}

/// Read the used ranges of every area, a chunk-sized window at a time, into buffers from the
/// free list (which bounds memory).
fn reader(
    disk: &Disk,
    snaps: Option<&Snapshots>,
    plans: &[AreaPlan],
    free: &Receiver<Vec<u8>>,
    jobs: &Feeder<Job>,
) -> Result<()> {
    let mut seq = 0;
    for (ai, plan) in plans.iter().enumerate() {
        let a = &plan.area;
        let mut off = 0;
        while off < a.len {
            let wlen = (a.len - off).min(CHUNK_SIZE);
            let ranges: Vec<(u32, u32)> = match &plan.used {
                Some(map) => map
                    .used_ranges(off, wlen)
                    .into_iter()
                    .map(|(o, l)| ((o - off) as u32, l as u32))
                    .collect(),
                None => vec![(0, wlen as u32)],
            };
            if snaps.is_some() && crate::backup::lvm::interrupted() {
                bail!("interrupted");
            }
            if let (Some(first), Some(last)) = (ranges.first(), ranges.last()) {
                // A buffer comes back once its chunk is indexed; none will after an error.
                let mut buf = loop {
                    match free.recv_timeout(Duration::from_millis(100)) {
                        Ok(b) => break b,
                        Err(RecvTimeoutError::Timeout) if !jobs.stopped() => {}
                        Err(_) => return Ok(()),
                    }
                };
                buf.clear();
                buf.resize(wlen as usize, 0);
                let span = first.0 as usize..(last.0 + last.1) as usize;
                let at = a.start + off + span.start as u64;
                match snaps {
                    Some(s) => s.read_exact_at(&disk.file, &mut buf[span.clone()], at),
                    None => disk.file.read_exact_at(&mut buf[span.clone()], at),
                }
                .with_context(|| {
                    format!(
                        "cannot read {} at offset {}",
                        disk.path.display(),
                        a.start + off + span.start as u64
                    )
                })?;
                // Unused blocks inside the span are zeroed: they compress to nothing and dedup.
                let mut pos = span.start;
                for &(o, l) in &ranges {
                    buf[pos..o as usize].fill(0);
                    pos = (o + l) as usize;
                }
                let job = Job {
                    seq,
                    area: ai as u32,
                    offset: off,
                    len: wlen as u32,
                    ranges,
                    buf,
                };
                if !jobs.send(job) {
                    return Ok(());
                }
                seq += 1;
            }
            off += wlen;
        }
    }
    Ok(())
}

fn is_zero(buf: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { buf.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// A worker's state: its compressor and output buffer.
struct Packer {
    comp: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
    verify_existing: bool,
}

impl Packer {
    fn new(level: i32, verify_existing: bool) -> Result<Packer> {
        Ok(Packer {
            comp: zstd::bulk::Compressor::new(level)
                .map_err(|e| anyhow::anyhow!("cannot start zstd: {e}"))?,
            out: Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK_SIZE as usize)),
            verify_existing,
        })
    }

    /// Zero check, hash, dedup check, compress, store.
    fn pack(&mut self, repo: &dyn RepoWrite, job: Job) -> Result<Done> {
        let (chunk, new_bytes) = if is_zero(&job.buf) {
            (ChunkRef::Zero, 0)
        } else {
            let digest = Digest::of(&job.buf);
            match repo.chunk_info(&digest, job.buf.len() as u64, self.verify_existing) {
                Some((len, stored_sha)) => (
                    ChunkRef::Data {
                        digest,
                        stored_len: len as u32,
                        stored_sha,
                    },
                    0,
                ),
                None => {
                    self.out.clear();
                    self.comp
                        .compress_to_buffer(&job.buf, &mut self.out)
                        .context("zstd compression failed")?;
                    // Something under the name that did not pass the check: a damaged chunk,
                    // replaced with this data (which heals older snapshots that use it too).
                    let damaged = repo.chunk_len(&digest)?.is_some();
                    let (len, stored_sha, new) = repo.put_chunk(&digest, &self.out, damaged)?;
                    if damaged {
                        eprintln!(
                            "repaired damaged chunk {digest}: rewritten from this backup's data"
                        );
                    }
                    (
                        ChunkRef::Data {
                            digest,
                            stored_len: len as u32,
                            stored_sha,
                        },
                        if new { len } else { 0 },
                    )
                }
            }
        };
        Ok(Done {
            seq: job.seq,
            record: Record {
                area: job.area,
                offset: job.offset,
                len: job.len,
                chunk,
                ranges: job.ranges,
            },
            new_bytes,
            buf: job.buf,
        })
    }
}

pub fn run(opts: &BackupOptions) -> Result<BackupSummary> {
    let start = std::time::Instant::now();
    let host = match &opts.host {
        Some(h) => h.clone(),
        None => default_host()?,
    };
    crate::repo::check_host_name(&host)?;
    let disk_path = opts.disk()?;
    for n in &opts.source_name {
        if crate::device::names::disk_key(n).is_none() {
            bail!(
                "--source-name {n}: not a whole disk's device path: give one like /dev/sda, /dev/nvme0n1 or /dev/disk/by-id/ata-MODEL_SERIAL"
            );
        }
    }
    let disk = Disk::open_read(disk_path)?;
    let mut warnings = Vec::new();
    let layout = DiskLayout::read(&disk.file, disk.size, disk.sector_size)?;
    for w in &layout.warnings {
        eprintln!("warning: {w}");
        warnings.push(w.clone());
    }
    // Loop devices over the PV partitions of an image file, for lvm to see them; they outlive
    // `snaps`.
    let mut pv_loops = Vec::new();
    // Snapshots first: a filesystem mounted from a logical volume they cover is no obstacle.
    let snaps = match opts.snapshot {
        Some(SnapshotMode::Lvm) => {
            let s = Snapshots::take(&disk.file, &layout.data_partitions(), true)?.with_context(|| {
                format!(
                    "--snapshot lvm: no LVM physical volume of a volume group on {}: back it up without --snapshot",
                    disk_path.display()
                )
            })?;
            Some(s)
        }
        Some(SnapshotMode::Btrfs) => bail!(
            "--snapshot btrfs is for --incremental (an image backup reads the disk: use the rescue system, or --snapshot lvm for logical volumes)"
        ),
        None => offline_lvm(&disk, &layout, &mut pv_loops, &mut warnings),
    };
    let uses = crate::device::safety::mounts_on(&crate::device::safety::disk_devnums(disk_path))?;
    let live = uses.iter().find(|u| {
        u.read_write
            && !snaps
                .as_ref()
                .is_some_and(|s| s.covered.contains(&u.devnum))
    });
    let consistency = match live {
        Some(u) if !opts.allow_live => bail!(
            "{} has {} mounted read-write on {}: back up from the rescue system, unmount it, use --snapshot lvm (if it is a logical volume), or add --allow-live (crash-consistent)",
            disk_path.display(),
            u.source,
            u.mountpoint
        ),
        Some(u) => {
            let msg = format!(
                "{} is mounted read-write on {}: this backup is only crash-consistent",
                u.source, u.mountpoint
            );
            eprintln!("warning: {msg}");
            warnings.push(msg);
            Consistency::CrashConsistent
        }
        None if opts.snapshot == Some(SnapshotMode::Lvm) => Consistency::Snapshot,
        None => Consistency::Offline,
    };
    let mut secret = crate::device::luks::KeySource::new(opts.luks_keyfile.clone());
    let mut plans = plan_areas(&disk, &layout, snaps.as_ref(), &mut secret, &mut warnings)?;
    drop(secret);
    for p in plans.iter_mut() {
        if let Some(l) = p.area.luks.as_mut() {
            l.plaintext = opts.allow_plaintext_luks && p.key.is_some();
        }
    }

    let repo = crate::repo::open_write(&opts.repo, true)?;
    let repo = repo.as_ref();
    let w = SnapshotWriter::begin(repo, &host)?;
    let threads = opts
        .threads
        // Twice the CPUs: workers also wait on chunk fsyncs.
        .unwrap_or_else(crate::util::pool::default_threads)
        .max(1);
    let total: u64 = plans.iter().map(|p| p.area.used_bytes).sum();
    let guard = Progress::start("backup", total, opts.quiet);
    let progress = guard.handle();
    let mut index = IndexWriter::new(w.index_file()?)?;

    let nbufs = threads * 2 + 2;
    let (free_tx, free_rx) = bounded::<Vec<u8>>(nbufs);
    for _ in 0..nbufs {
        free_tx
            .send(Vec::with_capacity(CHUNK_SIZE as usize))
            .context("buffer pool")?;
    }
    let mut stats = Stats::default();
    // Workers finish out of order: the index is written in disk order.
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    let result = crate::util::pool::pipeline(
        threads,
        || Packer::new(opts.compression_level, opts.verify_existing),
        |p, job| p.pack(repo, job),
        |jobs| reader(&disk, snaps.as_ref(), &plans, &free_rx, jobs),
        |d: Done| {
            pending.insert(d.seq, d);
            while let Some(d) = pending.remove(&next) {
                let used = d.record.used_bytes();
                progress.add(used);
                stats.used_bytes += used;
                if let ChunkRef::Data { stored_len, .. } = d.record.chunk {
                    stats.chunks += 1;
                    stats.stored_bytes += u64::from(stored_len);
                    if d.new_bytes > 0 {
                        stats.new_chunks += 1;
                        stats.new_bytes += d.new_bytes;
                    }
                }
                index.push(&d.record)?;
                let _ = free_tx.send(d.buf);
                next += 1;
            }
            Ok(())
        },
    )
    .and_then(|()| {
        if pending.is_empty() {
            Ok(())
        } else {
            bail!("internal error: {} chunks were not indexed", pending.len())
        }
    });
    result?;
    drop(guard);
    // The file lists are read while the snapshots still hold the image's moment.
    let tocs = write_tocs(&w, &disk, snaps.as_ref(), &plans, &mut warnings)?;
    if let Some(s) = &snaps {
        s.check_valid()?;
    }
    drop(snaps);

    let (hw, records) = index.finish()?;
    // Chunks first, then the index that names them.
    let (index_sha, index_len) = w.commit_file(hw)?;
    let efi_boot = match &layout.table {
        crate::device::layout::Table::Gpt(g) => crate::fixup::efiboot::record(
            &g.partitions
                .iter()
                .map(|p| p.unique_guid.clone())
                .collect::<Vec<_>>(),
        ),
        _ => Vec::new(),
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        id: w.id.clone(),
        host: host.clone(),
        kind: Kind::Image,
        time: w.time.clone(),
        unix_time: w.unix_time,
        source: disk_path.display().to_string(),
        source_names: {
            let mut names = crate::device::names::names_of_disk(disk_path);
            names.extend(opts.source_name.iter().cloned());
            names.sort();
            names.dedup();
            names
        },
        consistency,
        bmr_version: env!("CARGO_PKG_VERSION").into(),
        chunk_size: CHUNK_SIZE,
        disk: DiskMeta {
            size: disk.size,
            sector_size: disk.sector_size,
            table: layout.table.clone(),
        },
        areas: plans.into_iter().map(|p| p.area).collect(),
        index: IndexRef {
            file: crate::repo::paths::index_name(&w.id),
            sha256: index_sha,
            len: index_len,
            records,
        },
        stats: stats.clone(),
        warnings: warnings.clone(),
        tocs,
        efi_boot,
    };
    w.commit_image(&manifest)?;
    Ok(BackupSummary {
        id: manifest.id,
        host,
        stats,
        elapsed: start.elapsed(),
        warnings,
    })
}

/// The logical volumes of the LVM physical volumes on a disk backed up without snapshots
/// (from the rescue system, or a disk image): mapped like any other filesystem, so their free
/// extents and free blocks are skipped and they get file lists. Without lvm, or with a volume
/// group bmr cannot map, a PV is stored whole, with a warning.
fn offline_lvm(
    disk: &Disk,
    layout: &DiskLayout,
    loops: &mut Vec<crate::device::mount::PartDev>,
    warnings: &mut Vec<String>,
) -> Option<Snapshots> {
    let parts = layout.data_partitions();
    let pvs: Vec<_> = parts
        .iter()
        .filter(|p| crate::backup::lvm::has_pv_label(&disk.file, p.start))
        .collect();
    if pvs.is_empty() {
        return None;
    }
    let mut warn = |msg: String| {
        eprintln!("warning: {msg}");
        warnings.push(msg);
    };
    if !disk.is_block {
        for p in &pvs {
            match crate::device::mount::PartDev::open_read_only(disk, p) {
                Ok(d) => loops.push(d),
                Err(e) => warn(format!("{e:#}")),
            }
        }
    }
    let whole = pvs
        .iter()
        .map(|p| p.number.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match Snapshots::take(&disk.file, &parts, false) {
        Ok(Some(s)) => {
            for p in &pvs {
                if s.pv_at(p.start).is_none() {
                    warn(format!(
                        "partition {} holds an LVM label of no volume group lvm shows: stored whole, with no file lists",
                        p.number
                    ));
                }
            }
            Some(s)
        }
        Ok(None) => {
            warn(format!(
                "partition {whole}: LVM physical volume that lvm does not show: stored whole, with no file lists"
            ));
            None
        }
        Err(e) => {
            warn(format!(
                "partition {whole}: {e:#}; the LVM physical volume is stored whole, with no file lists"
            ));
            None
        }
    }
}

/// A logical volume's bytes through the reads of the disk the backup sees (its snapshots).
struct LvRead<'a> {
    read: &'a dyn Fn(&mut [u8], u64) -> std::io::Result<()>,
    area_start: u64,
    lv: &'a crate::repo::manifest::LvMeta,
}

impl crate::fs::read::ReadAt for LvRead<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let pieces = self.lv.map(offset, buf.len() as u64).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read beyond the end of the logical volume",
            )
        })?;
        let mut done = 0;
        for (a, l) in pieces {
            (self.read)(&mut buf[done..done + l as usize], self.area_start + a)?;
            done += l as usize;
        }
        Ok(())
    }
}

/// Table of contents of every filesystem `fs::read` knows, read from the disk itself (logical
/// volumes through their snapshots, so the list is of the moment the image is of). A
/// filesystem whose tree cannot be read still has its image; it only lacks file-level access
/// (a warning).
fn write_tocs(
    w: &SnapshotWriter,
    disk: &Disk,
    snaps: Option<&Snapshots>,
    plans: &[AreaPlan],
    warnings: &mut Vec<String>,
) -> Result<Vec<crate::repo::manifest::TocRef>> {
    let read = |buf: &mut [u8], off: u64| match snaps {
        Some(s) => s.read_exact_at(&disk.file, buf, off),
        None => disk.file.read_exact_at(buf, off),
    };
    let mut out = Vec::new();
    for (ai, p) in plans.iter().enumerate() {
        let a = &p.area;
        let what = a
            .partition
            .map_or("the disk".to_string(), |n| format!("partition {n}"));
        for (k, lv) in a.volumes.iter().enumerate() {
            let Some(fs) = lv.fs.as_ref().filter(|f| f.fstype != "swap") else {
                continue;
            };
            let vol = Some((k, lv.name.as_str()));
            if let Some(l) = &a.luks {
                // Names and sizes of files are plaintext: only when the user allowed it.
                let (Some(key), true) = (&p.key, l.plaintext) else {
                    let msg = format!(
                        "no file list for the {} filesystem in {}: it would be plaintext in the repository (add --allow-plaintext-luks to store it); the image holds only ciphertext",
                        fs.fstype, lv.name
                    );
                    eprintln!("warning: {msg}");
                    warnings.push(msg);
                    continue;
                };
                let raw = crate::fs::read::FileRange {
                    file: &disk.file,
                    base: a.start,
                    len: a.len,
                };
                let dec = crate::device::luks::Decrypt::new(&raw, &l.header(), a.len, key)?;
                if let Some(t) = toc_of(w, &dec, ai as u32, vol, fs, &lv.name, warnings)? {
                    out.push(t);
                }
                continue;
            }
            let range = LvRead {
                read: &read,
                area_start: a.start,
                lv,
            };
            if let Some(t) = toc_of(w, &range, ai as u32, vol, fs, &lv.name, warnings)? {
                out.push(t);
            }
        }
        let Some(fs) = &a.fs else {
            // A filesystem the map refused (damaged, not cleanly unmounted: a btrfs log tree)
            // is stored whole, and its structures are not trusted for a file list either.
            if a.content == crate::repo::manifest::Content::Whole
                && let Some(note) = &a.note
            {
                let msg = format!("no file list for {what}: {note}");
                eprintln!("warning: {msg}");
                warnings.push(msg);
            }
            continue;
        };
        if fs.fstype == "swap" {
            continue;
        }
        let range = crate::fs::read::FileRange {
            file: &disk.file,
            base: a.start,
            len: a.len,
        };
        if let Some(t) = toc_of(w, &range, ai as u32, None, fs, &what, warnings)? {
            out.push(t);
        }
    }
    Ok(out)
}

/// The file list of one filesystem; `None` (with a warning) when its tree cannot be read.
fn toc_of(
    w: &SnapshotWriter,
    range: &dyn crate::fs::read::ReadAt,
    area: u32,
    volume: Option<(usize, &str)>,
    fs: &FsMeta,
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<crate::repo::manifest::TocRef>> {
    let mut read_warnings = Vec::new();
    let read = crate::fs::read::read_tree_warn(range, &fs.fstype, &mut read_warnings);
    for m in read_warnings {
        let msg = format!("file list of the {} filesystem of {what}: {m}", fs.fstype);
        eprintln!("warning: {msg}");
        warnings.push(msg);
    }
    let entries = match read {
        Ok(e) => e,
        Err(e) => {
            let msg = format!(
                "no file list for the {} filesystem of {what}: {e:#}",
                fs.fstype
            );
            eprintln!("warning: {msg}");
            warnings.push(msg);
            return Ok(None);
        }
    };
    let system = entries.iter().any(|e| e.path == b"etc/fstab");
    let k = volume.map(|v| v.0);
    let mut t = crate::repo::toc::TocWriter::new(w.toc_file(area, k)?)?;
    for e in entries {
        t.push(&crate::repo::toc::FileMeta::from(e))?;
    }
    let (f, count) = t.finish()?;
    let (sha256, len) = f.commit()?;
    Ok(Some(crate::repo::manifest::TocRef {
        area,
        volume: volume.map(|v| v.1.to_string()),
        system,
        fstype: fs.fstype.clone(),
        uuid: fs.uuid.clone(),
        file: crate::repo::paths::toc_name(&w.id, area, k),
        sha256,
        len,
        entries: count,
    }))
}

pub fn print_summary(s: &BackupSummary) {
    println!(
        "snapshot {} of host {}: {} used, {} new in the repository ({} new chunks of {}), {:.1}s",
        s.id,
        s.host,
        human_bytes(s.stats.used_bytes),
        human_bytes(s.stats.new_bytes),
        s.stats.new_chunks,
        s.stats.chunks,
        s.elapsed.as_secs_f64()
    );
}
