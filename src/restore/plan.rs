//! The restore plan: built once from an open repository, a point in time, a target and the
//! options (how, not what), shown by every front end with the same [`RestorePlan::lines`],
//! then carried out by [`RestorePlan::execute`]. Everything that can be checked without
//! writing is checked while preparing, so a plan that could be shown is one that can start.
//! The engine never prompts: consent is the front end's business (typed disk name, `--yes`,
//! `bmr.yes`), and `execute` only takes its answer.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::device::Disk;
use crate::device::layout::Table;
use crate::fixup::FixupOptions;
use crate::repo::manifest::{AreaKind, Consistency, FsMeta, IncManifest, Manifest};
use crate::repo::snapshot::Point;
use crate::repo::toc::FileMeta;
use crate::repo::{Digest, RepoRead};
use crate::util::progress::{Progress, human_bytes};

use super::blocks::{self, FileChunk, Writer};

/// How to restore. The fields double as `bmr restore` flags; the TUI and the unattended
/// restore fill in the ones they offer and leave the rest at their defaults.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RestoreHow {
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
    /// The second disk of an md RAID1 in the snapshot: it gets the target's partition table
    /// and boot partitions, and its member partitions join the restored arrays (without it,
    /// each array comes back degraded, on the target alone).
    #[arg(long, value_name = "DISK")]
    pub mirror_disk: Option<PathBuf>,
    #[command(flatten)]
    pub fixups: FixupOptions,
}

/// The target as found while preparing.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub size: u64,
    pub sector_size: u64,
    /// An image file that does not exist yet: created at the source disk's size.
    pub create: bool,
    /// It holds the marker of an interrupted restore of this snapshot: that restore goes on.
    pub resume: bool,
    /// What it holds, when it is not blank: the front end must obtain consent.
    pub holds: Option<String>,
}

/// One filesystem an incremental brings from the image's state to the point's.
pub struct ApplyFs {
    pub area: u32,
    /// The logical volume in the area whose filesystem this is.
    pub volume: Option<String>,
    pub current: Vec<FileMeta>,
    pub desired: Vec<FileMeta>,
}

pub struct RestorePlan<'r> {
    pub src: &'r dyn RepoRead,
    pub point: Point,
    pub apply: Vec<ApplyFs>,
    /// Every chunk the file lists of `apply` name, once: pre-checked with the image's.
    pub file_chunks: Vec<FileChunk>,
    pub target: Target,
    /// `--mirror-disk`, as probed.
    pub mirror: Option<Target>,
    pub how: RestoreHow,
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

/// The smallest disk this snapshot fits on: its partitions and the partition table.
pub fn min_target_size(m: &Manifest) -> u64 {
    m.areas
        .iter()
        .filter(|a| a.kind == AreaKind::Partition)
        .map(|a| a.start + a.len)
        .max()
        .unwrap_or(0)
        .max(m.layout().min_target_size())
}

/// `ext4 "root" 6d1f...`: type, label and UUID of a filesystem, for the plan.
fn describe_fs(f: &FsMeta) -> String {
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

/// The disk's stack as the image holds it: each area, and the logical volumes inside a PV,
/// with what is stored of each (for the restore plan and `bmr list --at`).
pub fn area_lines(m: &Manifest) -> Vec<String> {
    let mut out = Vec::new();
    for (ai, a) in m.areas.iter().enumerate() {
        let what = match (a.kind, a.partition) {
            (AreaKind::Boot, _) => "boot area".to_string(),
            (AreaKind::Partition, Some(n)) => format!("partition {n}"),
            (AreaKind::Partition, None) => "whole disk".to_string(),
        };
        let fs = match (&a.fs, a.volumes.as_slice()) {
            (None, _) if let Some(md) = &a.raid => {
                let role = md
                    .role
                    .map_or("spare".to_string(), |r| format!("member {r}"));
                format!(
                    "md {} {role} of {} (metadata {}, {} of {} active){}",
                    md.level,
                    md.volume_name(),
                    md.metadata,
                    md.active,
                    md.raid_disks,
                    if a.volumes.is_empty() {
                        ", stored whole"
                    } else {
                        ""
                    }
                )
            }
            (None, _) if let Some(l) = &a.luks => format!(
                "LUKS{} {} (header and keyslots as they were{})",
                l.version,
                l.cipher,
                if a.volumes.is_empty() {
                    "; ciphertext stored whole"
                } else {
                    "; ciphertext of the used blocks"
                }
            ),
            // Whether single files can come back from it without this restore.
            (Some(f), _) if f.fstype == "swap" => format!("{}, header only", describe_fs(f)),
            (Some(f), _)
                if m.tocs
                    .iter()
                    .any(|t| t.area == ai as u32 && t.volume.is_none()) =>
            {
                format!("{}, file list", describe_fs(f))
            }
            (Some(f), _) => format!("{}, no file list", describe_fs(f)),
            (None, []) => "stored whole".to_string(),
            (None, lvs) => {
                let mut vgs: Vec<&str> = lvs
                    .iter()
                    .filter_map(|l| l.name.split('/').next())
                    .collect();
                vgs.dedup();
                format!("LVM PV of {}", vgs.join(", "))
            }
        };
        out.push(format!(
            "  {what:<13} at {:>12} size {:>10}  {fs}, {} to write",
            a.start,
            human_bytes(a.len),
            human_bytes(a.used_bytes)
        ));
        for lv in &a.volumes {
            let listed = m
                .tocs
                .iter()
                .any(|t| t.area == ai as u32 && t.volume.as_ref() == Some(&lv.name));
            let fs = match &lv.fs {
                None => "no filesystem bmr maps, stored whole".into(),
                Some(f) if f.fstype == "swap" => format!("{}, header only", describe_fs(f)),
                Some(f) if listed => format!("{}, file list", describe_fs(f)),
                Some(f) => format!("{}, no file list", describe_fs(f)),
            };
            out.push(format!(
                "    {} {:<22} size {:>10}  {fs}",
                if a.raid.is_some() {
                    "array"
                } else if a.luks.is_some() {
                    "LUKS"
                } else {
                    "LV"
                },
                lv.name,
                human_bytes(lv.size)
            ));
        }
    }
    out
}

/// Longest name of one directory entry, and of a path or symlink target, Linux accepts.
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4095;
/// Largest xattr value Linux accepts.
const XATTR_SIZE_MAX: usize = 65536;

/// Check one entry of a file list the restore applies for what would stop it half-way:
/// names, paths, symlink targets and xattrs the kernel refuses, chunk lists it cannot read.
fn check_entry(f: &FileMeta, inc: &str) -> Result<()> {
    let shown = crate::util::text::elide_path(&f.path);
    let bad = |what: String| {
        anyhow::anyhow!(
            "file list of snapshot {inc}: {shown} {what}: the backup is damaged or forged, nothing was written; restore another snapshot with --at, or single files with bmr restore-files"
        )
    };
    crate::repo::toc::check_path(&f.path)?;
    // No limit on the whole path: trees deeper than PATH_MAX are legal, and the apply works
    // relative to open directories.
    if let Some(n) = f.path.split(|&b| b == b'/').find(|c| c.len() > NAME_MAX) {
        return Err(bad(format!(
            "has a name of {} bytes (at most {NAME_MAX})",
            n.len()
        )));
    }
    if let Some(t) = &f.symlink
        && (t.is_empty() || t.len() > PATH_MAX || t.contains(&0))
    {
        return Err(bad(format!(
            "has a symlink target of {} bytes that is empty, too long or holds NUL",
            t.len()
        )));
    }
    for (k, v) in &f.xattrs {
        if k.is_empty() || k.len() > NAME_MAX || k.contains(&0) || v.len() > XATTR_SIZE_MAX {
            return Err(bad(format!(
                "has an xattr {:?} the kernel cannot store",
                String::from_utf8_lossy(k)
            )));
        }
    }
    if let crate::repo::toc::Data::Chunks(c) = &f.data {
        for (d, len) in c {
            if !(d.is_empty() || d.len() == 32) || u64::from(*len) > crate::repo::CHUNK_SIZE {
                return Err(bad("has a chunk that is not a bmr chunk".into()));
            }
        }
    }
    Ok(())
}

/// Load the file lists an incremental restore applies, each fully, and check every entry
/// ([`check_entry`]) before anything is written. Returns them with the chunks they name
/// (each once, with the first file that names it; each must exist), which the pre-check
/// reads.
fn plan_apply(
    src: &dyn RepoRead,
    m: &Manifest,
    inc: &IncManifest,
) -> Result<(Vec<ApplyFs>, Vec<FileChunk>)> {
    let mut plan = Vec::new();
    let mut chunks = Vec::new();
    let mut seen = std::collections::HashSet::new();
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
        let Some(base_toc) = m.tocs.iter().find(|t| t.key() == fs.toc.key()) else {
            bail!("image {} has no file list for {}", m.id, m.fs_name(&fs.toc));
        };
        let current = crate::repo::manifest::read_toc(src, &m.host, &m.id, base_toc)?;
        let desired = crate::repo::manifest::read_toc(src, &inc.host, &inc.id, &fs.toc)?;
        for f in &current {
            check_entry(f, &m.id)?;
        }
        for f in &desired {
            check_entry(f, &inc.id)?;
            if let crate::repo::toc::Data::Chunks(c) = &f.data {
                for (d, len) in c {
                    let Some(d) = Digest::from_slice(d) else {
                        continue;
                    };
                    if !seen.insert(d) {
                        continue;
                    }
                    let name = String::from_utf8_lossy(&f.path).into_owned();
                    if src.chunk_len(&d)?.is_none() {
                        bail!(
                            "file {name:?} of snapshot {}: chunk {d} is missing: nothing was written; run bmr verify and restore another point with --at",
                            inc.id
                        );
                    }
                    chunks.push(FileChunk {
                        digest: d,
                        len: *len,
                        file: name,
                    });
                }
            }
        }
        plan.push(ApplyFs {
            area,
            volume: fs.toc.volume.clone(),
            current,
            desired,
        });
    }
    Ok((plan, chunks))
}

/// Look at the target without writing: size, sector size, an interrupted restore's marker,
/// and what it holds.
fn probe_target(m: &Manifest, path: &Path, repo_local: Option<&Path>) -> Result<Target> {
    crate::device::safety::check_restore_target(path, repo_local)?;
    if std::fs::symlink_metadata(path).is_err() {
        m.layout().check_target(m.disk.size).with_context(|| {
            format!(
                "the new image file {} would not hold the backup",
                path.display()
            )
        })?;
        return Ok(Target {
            path: path.to_path_buf(),
            size: m.disk.size,
            sector_size: m.disk.sector_size,
            create: true,
            resume: false,
            holds: None,
        });
    }
    let disk = Disk::open_read(path)?;
    let min_size = min_target_size(m);
    if disk.size < min_size {
        bail!(
            "target {} is too small: {} ({} bytes), the backup needs at least {} ({} bytes): use a bigger disk",
            path.display(),
            human_bytes(disk.size),
            disk.size,
            human_bytes(min_size),
            min_size
        );
    }
    if disk.sector_size != m.disk.sector_size {
        bail!(
            "target {} has {}-byte sectors, the backup was taken from a disk with {}-byte sectors: use a disk with {}-byte sectors",
            path.display(),
            disk.sector_size,
            m.disk.sector_size,
            m.disk.sector_size
        );
    }
    // The partition table is written last: a target it does not fit is refused now.
    m.layout().check_target(disk.size)?;
    let mut first = vec![0u8; disk.sector_size as usize];
    let resume =
        disk.file.read_exact_at(&mut first, 0).is_ok() && first == marker(m, disk.sector_size);
    let holds = if resume {
        None
    } else {
        crate::device::safety::existing_content(&disk)?
    };
    Ok(Target {
        path: path.to_path_buf(),
        size: disk.size,
        sector_size: disk.sector_size,
        create: false,
        resume,
        holds,
    })
}

/// A LUKS key given for the restore must open the snapshot's volumes (their headers are in
/// the image): a wrong one is refused before anything is written. An incremental inside a
/// volume needs it.
fn check_luks_key(
    src: &dyn RepoRead,
    image: &crate::repo::snapshot::Loaded,
    keyfile: Option<&Path>,
) -> Result<()> {
    let Some(keyfile) = keyfile else {
        return Ok(());
    };
    let secret = crate::device::luks::Secret::from_file(keyfile)?;
    let m = &image.manifest;
    for (i, a) in m.areas.iter().enumerate() {
        let Some(l) = &a.luks else { continue };
        let mut r = crate::restore::files::ImageReader::new(src, m, &image.index, i as u32)?;
        r.unlock(l, &secret).with_context(|| {
            format!("--luks-keyfile {}; nothing was written", keyfile.display())
        })?;
    }
    Ok(())
}

impl<'r> RestorePlan<'r> {
    /// Everything checked that can be checked without writing: the snapshot's file lists and
    /// chunks for an incremental, the fix-ups' needs, the target (in use, part of the
    /// repository, too small, other sector size) and what it holds.
    pub fn prepare(
        src: &'r dyn RepoRead,
        point: Point,
        target: &Path,
        how: RestoreHow,
    ) -> Result<RestorePlan<'r>> {
        let m = &point.image.manifest;
        // The snapshot first, whole: the table and areas it records, and its chunk index
        // against them. Nothing below may meet a range it has not checked.
        m.validate_layout()?;
        crate::repo::chunkindex::check_against(m, point.image.records()?)?;
        let (apply, file_chunks) = match &point.inc {
            Some(i) => plan_apply(src, m, i)?,
            None => (Vec::new(), Vec::new()),
        };
        crate::fixup::preflight(m, &how.fixups, target)?;
        if how.fixups.luks_keyfile.is_none()
            && let Some(f) = apply
                .iter()
                .find(|f| m.areas[f.area as usize].luks.is_some())
        {
            bail!(
                "the incremental changed files in LUKS volume {}: give its key (--luks-keyfile FILE, bmr.luks-keyfile=) to apply them; nothing was written",
                f.volume.as_deref().unwrap_or("?")
            );
        }
        check_luks_key(src, &point.image, how.fixups.luks_keyfile.as_deref())?;
        let mirror = match &how.mirror_disk {
            Some(d) => {
                super::mirror::preflight(m, target, d)?;
                let t = probe_target(m, d, src.local_path())
                    .with_context(|| format!("--mirror-disk {}", d.display()))?;
                if t.create {
                    bail!(
                        "--mirror-disk {}: no such disk; nothing was written",
                        d.display()
                    );
                }
                Some(t)
            }
            None => None,
        };
        let target = probe_target(m, target, src.local_path())?;
        if let Some(mt) = &mirror
            && (how.fixups.grow || how.fixups.grow_lv.is_some())
            && mt.size < target.size
        {
            bail!(
                "--mirror-disk {} ({}) is smaller than the target ({}), which --grow fills: give a disk at least as big, or restore without --grow; nothing was written",
                mt.path.display(),
                human_bytes(mt.size),
                human_bytes(target.size)
            );
        }
        Ok(RestorePlan {
            src,
            point,
            apply,
            file_chunks,
            target,
            mirror,
            how,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.point.image.manifest
    }

    /// Bytes the restore writes.
    pub fn total(&self) -> u64 {
        self.manifest().stats.used_bytes
    }

    /// The plan as people read it: the same text in the CLI, the TUI and unattended mode.
    pub fn lines(&self) -> Vec<String> {
        let m = self.manifest();
        let t = &self.target;
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
            crate::util::timefmt::display(m.unix_time),
            match m.consistency {
                Consistency::Offline => "offline",
                Consistency::CrashConsistent => "crash-consistent",
                Consistency::Snapshot => "through LVM snapshots",
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
            t.path.display(),
            human_bytes(t.size),
            if t.create { ", new image file" } else { "" },
            if t.resume {
                ", resuming an interrupted restore"
            } else {
                ""
            }
        ));
        if let Some(what) = &t.holds {
            out.push(format!("            holds {what}: it will be overwritten"));
        }
        if let Some(mt) = &self.mirror {
            out.extend(super::mirror::plan_line(
                m,
                &mt.path,
                mt.size,
                mt.holds.as_deref(),
            ));
        }
        out.extend(area_lines(m));
        if self.mirror.is_none() {
            for md in m.mirrors() {
                out.push(format!(
                    "  {} comes back degraded: 1 of its {} disks (give the second with --mirror-disk, or add one after boot: mdadm /dev/{} --add DEVICE)",
                    md.volume_name(),
                    md.raid_disks,
                    md.volume_name()
                ));
            }
        }
        if t.size > m.disk.size && matches!(m.disk.table, Table::Gpt(_)) {
            out.push("  the target is bigger: the GPT backup header moves to its end".to_string());
        }
        out.push(format!(
            "  {} to write; partition table and boot areas last",
            human_bytes(self.total())
        ));
        if let Some(inc) = &self.point.inc {
            out.push(format!(
                "  then      apply incremental {} ({}): changed files and deletions",
                inc.id,
                crate::util::timefmt::display(inc.unix_time)
            ));
        }
        if self.how.verify {
            out.push("  then      read back everything written and check it".to_string());
        }
        for l in crate::fixup::plan_lines(m, &self.how.fixups) {
            out.push(format!("  {l}"));
        }
        out
    }

    /// The plan for `--json` and the rescue report.
    pub fn to_json(&self) -> serde_json::Value {
        let m = self.manifest();
        let t = &self.target;
        serde_json::json!({
            "host": m.host,
            "snapshot": self.point.id(),
            "image": m.id,
            "incremental": self.point.inc.as_ref().map(|i| &i.id),
            "time": crate::util::timefmt::display(self.point.unix_time()),
            "source": { "path": m.source, "size": m.disk.size, "sector_size": m.disk.sector_size },
            "target": {
                "path": t.path.display().to_string(),
                "size": t.size,
                "create": t.create,
                "resume": t.resume,
                "holds": t.holds,
            },
            "areas": m.areas.iter().map(|a| serde_json::json!({
                "kind": a.kind,
                "partition": a.partition,
                "start": a.start,
                "len": a.len,
                "content": a.content,
                "fs": a.fs,
                "volumes": a.volumes,
                "raid": a.raid,
                "luks": a.luks,
                "bytes_to_write": a.used_bytes,
            })).collect::<Vec<_>>(),
            "mirror": self.mirror.as_ref().map(|mt| serde_json::json!({
                "path": mt.path.display().to_string(),
                "size": mt.size,
                "holds": mt.holds,
            })),
            "bytes_to_write": self.total(),
            "verify": self.how.verify,
            "fixups": crate::fixup::plan_lines(m, &self.how.fixups),
        })
    }

    /// Carry the plan out. `overwrite` is the front end's consent to replace what the target
    /// holds; without it a target holding data is refused, and nothing is written.
    pub fn execute(self, overwrite: bool) -> Result<RestoreSummary> {
        let start = Instant::now();
        let src = self.src;
        let l = &self.point.image;
        let m = &l.manifest;
        let how = &self.how;
        for t in std::iter::once(&self.target).chain(&self.mirror) {
            if let Some(what) = &t.holds
                && !overwrite
            {
                bail!(
                    "target {} holds {what}: nothing was written; confirm overwriting it",
                    t.path.display()
                );
            }
        }
        let threads = how
            .threads
            .unwrap_or_else(crate::util::pool::default_threads)
            .max(1);
        crate::fixup::preflight(self.manifest(), &how.fixups, &self.target.path)?;
        // Looked at again, as the target is below: the mirror disk is written last, long after
        // the plan was shown.
        if let Some(mt) = &self.mirror {
            let now = probe_target(m, &mt.path, src.local_path())?;
            if (now.holds.is_some(), now.size) != (mt.holds.is_some(), mt.size) {
                bail!(
                    "mirror disk {} changed since the restore plan was made: nothing was written; run the restore again",
                    mt.path.display()
                );
            }
        }
        let read_all = !how.no_precheck && src.local_path().is_some();
        blocks::precheck(src, l, read_all, threads, how.quiet)?;
        if let Some(i) = &self.point.inc {
            blocks::precheck_files(src, &i.id, &self.file_chunks, read_all, threads, how.quiet)?;
        }

        let path = &self.target.path;
        let fresh = self.target.create && prepare_target(path, m.disk.size)?;
        let opened = (|| {
            // Looked at again: the target may have changed since the plan was made.
            let now = probe_target(m, path, src.local_path())?;
            if (now.resume, now.holds.is_some(), now.size)
                != (
                    self.target.resume,
                    self.target.holds.is_some() && !fresh,
                    self.target.size,
                )
            {
                bail!(
                    "target {} changed since the restore plan was made: nothing was written; run the restore again",
                    path.display()
                );
            }
            Disk::open_write(path)
        })();
        let disk = match opened {
            Ok(d) => d,
            Err(e) => {
                if fresh {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };
        let total = self.total();
        let skipped = match self.write_blocks(&disk, fresh, threads) {
            Ok(n) => n,
            // An image file made for this restore and left without its partition table is
            // of no use (and a damaged chunk stops a rerun too): it goes, as it came.
            Err(e) if fresh => {
                drop(disk);
                let _ = std::fs::remove_file(path);
                bail!(
                    "{e:#}; the image file {} this restore had created was removed",
                    path.display()
                );
            }
            Err(e) => return Err(e),
        };
        let layout = m.layout();
        if how.verify {
            blocks::read_back(l, &disk, &layout, threads, how.quiet)?;
        }
        // The blocks are written: what follows mounts the restored filesystems.
        let mut disk = disk;
        disk.release_exclusive()?;
        // An entry that cannot be applied is reported and the rest applied; the restore fails
        // at the end, after the fix-ups.
        let mut not_applied = Vec::new();
        // Closed again before the fix-ups: a partition in use cannot grow.
        let in_luks = self
            .apply
            .iter()
            .any(|f| m.areas[f.area as usize].luks.is_some());
        let unlocked = if in_luks {
            Some(crate::fixup::volumes::unlock(
                m,
                &disk,
                how.fixups.luks_keyfile.as_deref(),
            )?)
        } else {
            None
        };
        if let Some(i) = &self.point.inc {
            for f in &self.apply {
                let area = &m.areas[f.area as usize];
                let (mnt, what) = match &f.volume {
                    None => (
                        crate::fixup::volumes::Volume {
                            name: String::new(),
                            place: crate::fixup::volumes::Place::Partition(
                                crate::device::layout::Partition {
                                    number: area.partition.unwrap_or(0),
                                    start: area.start,
                                    len: area.len,
                                    ..Default::default()
                                },
                            ),
                        }
                        .mount(
                            &disk,
                            &format!("apply-{}", f.area),
                            false,
                        )?,
                        format!("the filesystem at offset {}", area.start),
                    ),
                    Some(v) => {
                        let (_, lv) = m
                            .volume(f.area, v)
                            .context("internal error: the plan's volume vanished")?;
                        let vol =
                            crate::fixup::volumes::in_area(area.luks.is_some(), area.start, lv);
                        let tag = crate::fixup::volumes::tag("apply", v);
                        let kind = if area.raid.is_some() {
                            "md array"
                        } else if area.luks.is_some() {
                            "LUKS volume"
                        } else {
                            "logical volume"
                        };
                        (vol.mount(&disk, &tag, false)?, format!("{kind} {v}"))
                    }
                };
                let st = super::apply::apply(src, &i.id, &mnt.dir, &f.current, &f.desired, None)?;
                println!(
                    "applied incremental {} to {what}: {} removed, {} written, {} updated",
                    i.id, st.removed, st.written, st.updated
                );
                if let Err(e) = st.check(f.desired.len(), &format!("incremental {} ({what})", i.id))
                {
                    not_applied.push(format!("{e:#}"));
                }
            }
        }
        drop(unlocked);
        crate::fixup::run(m, &disk, &how.fixups)?;
        if let Some(mt) = &self.mirror {
            for line in super::mirror::run(m, &disk, &mt.path)? {
                println!("{line}");
            }
        }
        if !not_applied.is_empty() {
            bail!("{}", not_applied.join("; "));
        }
        Ok(RestoreSummary {
            id: self.point.id().to_string(),
            written: total - skipped,
            skipped,
            elapsed: start.elapsed(),
            verified: how.verify,
        })
    }
}

impl RestorePlan<'_> {
    /// Mark the target, write the partition areas, the boot areas and the partition table;
    /// the bytes that were already in place (on resume).
    fn write_blocks(&self, disk: &Disk, fresh: bool, threads: usize) -> Result<u64> {
        let src = self.src;
        let l = &self.point.image;
        let m = &l.manifest;
        let how = &self.how;
        let resume = self.target.resume;
        let mark = marker(m, disk.sector_size);

        // From here on the target changes. Mark it first, and hide any old table, so an
        // interrupted restore never looks like a usable disk.
        let ss = disk.sector_size;
        if !resume {
            let zero = vec![0u8; ss as usize];
            let last = (disk.size / ss).saturating_sub(1) * ss;
            let mut writes = vec![(&mark[..], 0), (&zero[..], ss)];
            if last > ss {
                writes.push((&zero[..], last));
            }
            for (data, at) in writes {
                disk.file
                    .write_all_at(data, at)
                    .map_err(|e| disk.io_error("write", at, ss, e))?;
            }
            disk.flush()?;
        }
        let guard = Progress::start("restore", self.total(), how.quiet);
        let w = Writer {
            src,
            m,
            disk,
            fresh,
            resume,
            limit: disk.size,
            progress: guard.handle(),
            skipped: AtomicU64::new(0),
        };
        w.pass(l, AreaKind::Partition, how.zero_free, threads)?;
        disk.flush()?;
        w.pass(l, AreaKind::Boot, how.zero_free, threads)?;
        drop(guard);
        let layout = m.layout();
        if !matches!(layout.table, Table::None) {
            layout.write_table(&disk.file, disk.size).with_context(|| {
                format!(
                    "cannot write the partition table to {}",
                    disk.path.display()
                )
            })?;
        }
        disk.flush()?;
        disk.reread_partitions();
        Ok(w.skipped.load(Ordering::Relaxed))
    }
}

/// Create a missing image-file target at the source size; Ok(false) if it exists.
fn prepare_target(path: &Path, size: u64) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create image file {}", path.display()))?;
    if let Err(e) = f.set_len(size) {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| {
            format!(
                "cannot make image file {} {size} bytes long (nothing was written; it needs a filesystem that allows files this big)",
                path.display()
            )
        });
    }
    Ok(true)
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
