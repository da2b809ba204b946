//! LVM snapshots: a consistent image backup of a disk whose logical volumes are in use.
//!
//! Each LVM physical volume on the disk is imaged as it stood before bmr made its snapshots:
//! the PV label and metadata area are read first, then every active logical volume gets a
//! snapshot and its extents are read through it. The snapshots' copy-on-write extents were
//! free in the metadata that was read, so they are stored as free: the restored volume group
//! has no trace of them. Free extents are skipped, and so are the free blocks of the ext4 and
//! FAT filesystems inside the logical volumes.
//!
//! Supported: linear (and single-stripe) logical volumes, every PV of the volume group on the
//! disk being backed up. Thin pools, RAID, mirrors and existing snapshots are refused with a
//! clear message, since their extents cannot be read through one snapshot.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::device::layout::Partition;
use crate::device::lvm::{field, lvm, num, parse_pe_range, report};
use crate::fs::map::{FsInfo, UsedMap};
use crate::repo::manifest::{FsMeta, LvMeta};

/// Name prefix of bmr's snapshots, so one left behind by a killed backup is recognised.
pub const SNAP_PREFIX: &str = "bmr-snap-";
/// PV areas outside the extents (label, metadata) are held in memory while the snapshots live.
const MAX_META_BYTES: u64 = 64 << 20;

/// Where the bytes of one stretch of a PV area come from while the snapshots exist.
#[derive(Debug)]
enum Src {
    /// Held in memory from before the snapshots (index into `PvImage::saved`).
    Saved(usize),
    /// A snapshot device, at this offset.
    Snap(usize, u64),
    /// The disk itself (an inactive LV).
    Disk,
    /// A free extent: not read.
    Free,
}

#[derive(Debug)]
struct Piece {
    /// Offset in the partition.
    start: u64,
    len: u64,
    src: Src,
}

/// One PV partition as it will be imaged.
#[derive(Debug)]
pub struct PvImage {
    /// Byte offset of the partition on the disk, and its length.
    pub start: u64,
    pub len: u64,
    pub vg: String,
    pieces: Vec<Piece>,
    saved: Vec<Vec<u8>>,
    /// The PV partition itself: LVM writes its metadata there (O_DIRECT), so the whole disk's
    /// page cache may hold stale copies of it.
    dev: File,
    pub used: UsedMap,
    pub volumes: Vec<LvMeta>,
}

/// The snapshots of one backup; removed when dropped, whatever happened.
pub struct Snapshots {
    pub pvs: Vec<PvImage>,
    devices: Vec<File>,
    /// `vg/lv` of the snapshots made, for removal.
    made: Vec<String>,
    /// Device numbers of the logical volumes covered by a snapshot (mounted: fine).
    pub covered: HashSet<u64>,
    /// Dropped after the snapshots are removed (fields drop after `drop`).
    _held: HeldSignals,
}

#[derive(Debug)]
struct Seg {
    vg: String,
    lv: String,
    attr: String,
    lv_size: u64,
    segtype: String,
    stripes: u64,
    lv_off: u64,
    pe_ranges: String,
}

fn segments() -> Result<Vec<Seg>> {
    report(
        "lvs",
        "vg_name,lv_name,lv_attr,lv_size,segtype,stripes,seg_start,seg_pe_ranges",
        &["-a", "--segments"],
    )?
    .iter()
    .map(|r| {
        Ok(Seg {
            vg: field(r, "vg_name")?.into(),
            lv: field(r, "lv_name")?.into(),
            attr: field(r, "lv_attr")?.into(),
            lv_size: num(r, "lv_size")?,
            segtype: field(r, "segtype")?.into(),
            stripes: num(r, "stripes").unwrap_or(1),
            lv_off: num(r, "seg_start")?,
            pe_ranges: field(r, "seg_pe_ranges")?.into(),
        })
    })
    .collect()
}

/// Where every LV but bmr's own snapshots lies, to compare before and after.
fn layout(segs: &[Seg]) -> Vec<(&str, &str, u64, u64, &str, &str)> {
    let mut v: Vec<_> = segs
        .iter()
        .filter(|s| !s.lv.starts_with(SNAP_PREFIX))
        .map(|s| {
            let (vg, lv) = (s.vg.as_str(), s.lv.as_str());
            (
                vg,
                lv,
                s.lv_size,
                s.lv_off,
                s.segtype.as_str(),
                s.pe_ranges.as_str(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The signal (^C, SIGTERM, SIGHUP) that arrived while snapshots existed; 0: none. Such a
/// signal is held until the snapshots are removed, then delivered: a killed backup must not
/// leave snapshots filling up the volume group.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn hold(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
}

/// The held signals with what they did before; restored, and a held one delivered, on drop.
struct HeldSignals(Vec<(Signal, SigAction)>);

impl HeldSignals {
    fn hold() -> HeldSignals {
        let act = SigAction::new(SigHandler::Handler(hold), SaFlags::empty(), SigSet::empty());
        let mut saved = Vec::new();
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: `hold` only stores to an atomic, which is async-signal-safe.
            match unsafe { sigaction(sig, &act) } {
                // Ignored (nohup, a background job): stays ignored.
                Ok(old) if matches!(old.handler(), SigHandler::SigIgn) => {
                    let _ = unsafe { sigaction(sig, &old) };
                }
                Ok(old) => saved.push((sig, old)),
                Err(e) => eprintln!("warning: cannot hold {sig} during the snapshots: {e}"),
            }
        }
        HeldSignals(saved)
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        for (sig, old) in &self.0 {
            // SAFETY: puts back the disposition this process had before.
            let _ = unsafe { sigaction(*sig, old) };
        }
        let pending = PENDING.swap(0, Ordering::SeqCst);
        if let Ok(sig) = Signal::try_from(pending) {
            eprintln!(
                "bmr: {sig}: the LVM snapshots are removed; nothing was stored as a snapshot"
            );
            let _ = nix::sys::signal::raise(sig);
        }
    }
}

/// A signal is waiting: stop reading, so the snapshots can be removed.
pub fn interrupted() -> bool {
    PENDING.load(Ordering::SeqCst) != 0
}

impl Snapshots {
    /// Find the PVs among `parts` (on `disk`), save their metadata, snapshot every active
    /// logical volume (with `snapshot`; without, an active LV is read from its own device,
    /// which the caller has checked is not mounted read-write) and work out what to read from
    /// where. `Ok(None)`: no PV on the disk.
    pub fn take(disk: &File, parts: &[Partition], snapshot: bool) -> Result<Option<Snapshots>> {
        // Only snapshots need a signal held until they are removed.
        let held = if snapshot {
            HeldSignals::hold()
        } else {
            HeldSignals(Vec::new())
        };
        Self::take_held(disk, parts, snapshot, held)
    }

    fn take_held(
        disk: &File,
        parts: &[Partition],
        snapshot: bool,
        held: HeldSignals,
    ) -> Result<Option<Snapshots>> {
        let pv_rows = report("pvs", "pv_name,vg_name,pe_start,pv_pe_count", &[])?;
        // PV device -> (partition, vg, pe_start, pe_count)
        let mut pvs = Vec::new();
        for r in &pv_rows {
            let name = field(r, "pv_name")?;
            let Some(start) = pv_offset(disk, Path::new(name)) else {
                continue;
            };
            if let Some(part) = parts.iter().find(|p| p.start == start) {
                let vg = field(r, "vg_name")?.to_string();
                if vg.is_empty() {
                    continue; // a PV in no volume group holds nothing
                }
                pvs.push((
                    name.to_string(),
                    (part.number, part.start, part.len),
                    vg,
                    num(r, "pe_start")?,
                    num(r, "pv_pe_count")?,
                ));
            }
        }
        if pvs.is_empty() {
            return Ok(None);
        }
        let vgs: Vec<String> = {
            let mut v: Vec<String> = pvs.iter().map(|p| p.2.clone()).collect();
            v.sort();
            v.dedup();
            v
        };
        let vg_rows = report(
            "vgs",
            "vg_name,vg_extent_size,vg_free_count,vg_seqno,pv_count",
            &[],
        )?;
        let mut vg_info = BTreeMap::new();
        for r in &vg_rows {
            let name = field(r, "vg_name")?;
            if !vgs.iter().any(|v| v == name) {
                continue;
            }
            let here = pvs.iter().filter(|p| p.2 == name).count() as u64;
            if num(r, "pv_count")? != here {
                let elsewhere: Vec<&str> = pv_rows
                    .iter()
                    .filter(|r| field(r, "vg_name").is_ok_and(|v| v == name))
                    .filter_map(|r| field(r, "pv_name").ok())
                    .filter(|n| !pvs.iter().any(|p| p.0 == *n))
                    .collect();
                bail!(
                    "volume group {name} also has physical volumes on other disks ({}): bmr images one disk at a time, and maps a volume group only when all of it is on that disk; move the VG onto one disk, or back up each of its disks (their PVs are then stored whole)",
                    if elsewhere.is_empty() {
                        "not found: missing".to_string()
                    } else {
                        elsewhere.join(", ")
                    }
                );
            }
            vg_info.insert(
                name.to_string(),
                (
                    num(r, "vg_extent_size")?,
                    num(r, "vg_free_count")?,
                    num(r, "vg_seqno")?,
                ),
            );
        }
        let segs: Vec<Seg> = segments()?
            .into_iter()
            .filter(|s| vgs.contains(&s.vg))
            .collect();
        for s in &segs {
            if s.lv.starts_with(SNAP_PREFIX) {
                bail!(
                    "{}/{} is left over from an interrupted bmr backup: remove it (lvremove {}/{}) and run again",
                    s.vg,
                    s.lv,
                    s.vg,
                    s.lv
                );
            }
            if matches!(s.attr.chars().next(), Some('s' | 'S')) {
                bail!(
                    "{}/{} is an LVM snapshot: bmr cannot image a volume group that already has snapshots; remove it or back up from the rescue system",
                    s.vg,
                    s.lv
                );
            }
            let plain = s.segtype == "linear" || (s.segtype == "striped" && s.stripes == 1);
            if !plain {
                bail!(
                    "{}/{} is a {} logical volume: bmr reads linear LVs through snapshots only; back up from the rescue system",
                    s.vg,
                    s.lv,
                    s.segtype
                );
            }
        }

        // Before any snapshot: the PVs' label and metadata areas, and every LV's layout.
        let mut images = Vec::new();
        for (name, (_num, start, len), vg, pe_start, pe_count) in &pvs {
            let (ext, _, _) = vg_info[vg];
            let data_end = pe_start
                .checked_add(pe_count.saturating_mul(ext))
                .filter(|&e| e <= *len)
                .with_context(|| {
                    format!("{name}: lvm's extent layout does not fit in the partition")
                })?;
            let tail = len - data_end;
            if pe_start + tail > MAX_META_BYTES {
                bail!(
                    "{name}: {pe_start} bytes before the first extent and {tail} after the last: more than bmr holds in memory"
                );
            }
            let dev = File::open(name).with_context(|| format!("cannot open {name}"))?;
            let mut head = vec![0u8; *pe_start as usize];
            dev.read_exact_at(&mut head, 0)
                .with_context(|| format!("cannot read the LVM metadata of {name}"))?;
            let mut end = vec![0u8; tail as usize];
            dev.read_exact_at(&mut end, data_end)
                .with_context(|| format!("cannot read the end of {name}"))?;
            images.push(PvImage {
                start: *start,
                len: *len,
                vg: vg.clone(),
                pieces: vec![
                    Piece {
                        start: 0,
                        len: *pe_start,
                        src: Src::Saved(0),
                    },
                    Piece {
                        start: data_end,
                        len: tail,
                        src: Src::Saved(1),
                    },
                ],
                saved: vec![head, end],
                dev,
                used: UsedMap::new(4096, *len),
                volumes: Vec::new(),
            });
        }

        // The metadata just saved must be the one the layout above was read from.
        for r in report("vgs", "vg_name,vg_seqno", &[])? {
            let name = field(&r, "vg_name")?;
            if let Some(&(_, _, before)) = vg_info.get(name)
                && num(&r, "vg_seqno")? != before
            {
                bail!(
                    "volume group {name} changed while bmr read its metadata: run the backup again"
                );
            }
        }

        let mut lvs: BTreeMap<(String, String), Vec<&Seg>> = BTreeMap::new();
        for s in &segs {
            lvs.entry((s.vg.clone(), s.lv.clone())).or_default().push(s);
        }
        let mut snaps = Snapshots {
            pvs: Vec::new(),
            devices: Vec::new(),
            made: Vec::new(),
            covered: HashSet::new(),
            _held: held,
        };
        for ((vg, lv), ss) in &lvs {
            let active = ss[0].attr.chars().nth(4) == Some('a');
            let (ext, free, _) = vg_info[vg];
            let lv_size = ss[0].lv_size;
            let src_dev;
            let fs;
            if active && !snapshot {
                let path = format!("/dev/{vg}/{lv}");
                let f = File::open(&path).with_context(|| format!("cannot open {path}"))?;
                fs = probe_lv(&f, 0, lv_size, &format!("{vg}/{lv}"))?;
                snaps.devices.push(f);
                src_dev = Some(snaps.devices.len() - 1);
            } else if active {
                if free == 0 {
                    bail!(
                        "volume group {vg} has no free extents for a snapshot of {lv}: free some (vgextend, or lvreduce another LV), or back up from the rescue system"
                    );
                }
                // Room for what changes while the backup runs: the LV's own size at most,
                // else an equal share of the free extents.
                let active_here = lvs
                    .iter()
                    .filter(|((v, _), s)| v == vg && s[0].attr.chars().nth(4) == Some('a'))
                    .count() as u64;
                let extents = (free / active_here.max(1))
                    .max(1)
                    .min(lv_size.div_ceil(ext));
                let snap = format!("{SNAP_PREFIX}{lv}");
                let origin = format!("{vg}/{lv}");
                if let Some(d) = crate::device::block_devnum(Path::new(&format!("/dev/{vg}/{lv}")))
                {
                    snaps.covered.insert(d);
                }
                if interrupted() {
                    bail!("interrupted before the snapshot of {origin}");
                }
                lvm(&[
                    "lvcreate",
                    "--snapshot",
                    "--yes",
                    "--name",
                    &snap,
                    "--extents",
                    &extents.to_string(),
                    &origin,
                ])
                .with_context(|| format!("cannot take a snapshot of {origin}"))?;
                snaps.made.push(format!("{vg}/{snap}"));
                let path = format!("/dev/{vg}/{snap}");
                let f = File::open(&path).with_context(|| format!("cannot open {path}"))?;
                fs = probe_lv(&f, 0, lv_size, &origin)?;
                snaps.devices.push(f);
                src_dev = Some(snaps.devices.len() - 1);
            } else {
                // Inactive: its extents cannot change; map the filesystem where it lies whole.
                fs = match ss.as_slice() {
                    [s] => {
                        let (pv, first, _) = parse_pe_range(&s.pe_ranges)?;
                        let p = pvs
                            .iter()
                            .position(|p| p.0 == pv)
                            .with_context(|| format!("{vg}/{lv} lies on {pv}, not on this disk"))?;
                        let off = pvs[p].3 + first * ext;
                        probe_lv(&images[p].dev, off, lv_size, &format!("{vg}/{lv}"))?
                    }
                    _ => None,
                };
                src_dev = None;
            }
            let mut meta = LvMeta {
                name: format!("{vg}/{lv}"),
                size: lv_size,
                fs: fs.as_ref().map(FsMeta::of),
                extents: Vec::new(),
                snapshot: active && snapshot,
            };
            for s in ss {
                let (pv, first, count) = parse_pe_range(&s.pe_ranges)?;
                let p = pvs
                    .iter()
                    .position(|p| p.0 == pv)
                    .with_context(|| format!("{vg}/{lv} lies on {pv}, not on this disk"))?;
                let area_off = pvs[p].3 + first * ext;
                let len = count * ext;
                let img = &mut images[p];
                img.pieces.push(Piece {
                    start: area_off,
                    len,
                    src: match src_dev {
                        Some(d) => Src::Snap(d, s.lv_off),
                        None => Src::Disk,
                    },
                });
                match &fs {
                    Some(f) => {
                        for (o, l) in f.used.used_ranges(s.lv_off, len) {
                            img.used.mark_range(area_off + (o - s.lv_off), l);
                        }
                    }
                    None => img.used.mark_range(area_off, len),
                }
                meta.extents.push((area_off, len, s.lv_off));
            }
            let p = images
                .iter()
                .position(|i| i.vg == *vg)
                .context("internal error: LV without a PV")?;
            images[p].volumes.push(meta);
        }
        // Nothing else may have changed the LVs meanwhile: the saved metadata must describe
        // the extents the snapshots were taken of. (lvcreate itself commits the metadata more
        // than once per snapshot, so the sequence number tells nothing here.)
        let after: Vec<Seg> = segments()?
            .into_iter()
            .filter(|s| vgs.contains(&s.vg))
            .collect();
        if layout(&after) != layout(&segs) {
            bail!(
                "a volume group on this disk changed while bmr took its snapshots: run the backup again"
            );
        }
        for img in &mut images {
            img.pieces.sort_by_key(|p| p.start);
            fill_free(&mut img.pieces, img.len);
            for (i, s) in img.saved.iter().enumerate() {
                if let Some(p) = img
                    .pieces
                    .iter()
                    .find(|p| matches!(p.src, Src::Saved(j) if j == i))
                {
                    img.used.mark_range(p.start, s.len() as u64);
                }
            }
            img.used.coarsen_to(32 << 20);
        }
        snaps.pvs = images;
        Ok(Some(snaps))
    }

    /// The PV image of the partition at this disk offset.
    pub fn pv_at(&self, start: u64) -> Option<&PvImage> {
        self.pvs.iter().find(|p| p.start == start)
    }

    /// Read disk bytes as the backup must see them: PV partitions through the snapshots and
    /// the saved metadata, everything else from the disk.
    pub fn read_exact_at(&self, disk: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        let Some(img) = self
            .pvs
            .iter()
            .find(|p| offset >= p.start && end <= p.start + p.len)
        else {
            return disk.read_exact_at(buf, offset);
        };
        let rel = offset - img.start;
        for piece in &img.pieces {
            let (a, b) = (
                piece.start.max(rel),
                (piece.start + piece.len).min(rel + buf.len() as u64),
            );
            if a >= b {
                continue;
            }
            let out = &mut buf[(a - rel) as usize..(b - rel) as usize];
            let inner = a - piece.start;
            match piece.src {
                Src::Saved(i) => out.copy_from_slice(&img.saved[i][inner as usize..][..out.len()]),
                Src::Snap(d, lv_off) => self.devices[d].read_exact_at(out, lv_off + inner)?,
                Src::Disk => img.dev.read_exact_at(out, a)?,
                Src::Free => out.fill(0),
            }
        }
        Ok(())
    }

    /// Fails if a snapshot overflowed (its copy-on-write space ran out while reading): what
    /// was read through it is then not one point in time.
    pub fn check_valid(&self) -> Result<()> {
        for name in &self.made {
            let rows = report("lvs", "lv_attr,snap_percent", &[name])?;
            let bad = rows.iter().any(|r| {
                field(r, "lv_attr")
                    .is_ok_and(|a| a.starts_with('S') || a.chars().nth(4) == Some('I'))
            });
            if bad {
                bail!(
                    "the snapshot {name} overflowed during the backup (too much was written meanwhile): run it again at a quieter time, or give the volume group more free extents"
                );
            }
        }
        Ok(())
    }
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        self.devices.clear();
        for name in self.made.drain(..).rev() {
            if let Err(e) = lvm(&["lvremove", "--yes", &name]) {
                eprintln!("warning: {e:#}; remove the snapshot by hand: lvremove {name}");
            }
        }
    }
}

/// Where a PV device lies on the disk being imaged: a partition of it (its sysfs `start`), or,
/// when the disk is an image file, a partition of a loop device over it or a loop device over a
/// stretch of it (`losetup -o`). `None`: elsewhere.
fn pv_offset(disk: &File, dev: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let n = crate::device::block_devnum(dev)?;
    let sys = format!("/sys/dev/block/{}:{}", libc::major(n), libc::minor(n));
    let read = |rel: &str| std::fs::read_to_string(format!("{sys}/{rel}")).ok();
    let m = disk.metadata().ok()?;
    let backs_image = |rel: &str| {
        read(rel)
            .and_then(|b| std::fs::metadata(b.trim()).ok())
            .is_some_and(|b| b.ino() == m.ino() && b.dev() == m.dev())
    };
    if let Some(start) = read("start").and_then(|s| s.trim().parse::<u64>().ok()) {
        let on_disk = if m.rdev() != 0 {
            let want = format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev()));
            read("../dev").is_some_and(|p| p.trim() == want)
        } else {
            backs_image("../loop/backing_file")
        };
        return on_disk.then_some(start * 512);
    }
    if m.rdev() == 0 && backs_image("loop/backing_file") {
        return read("loop/offset").and_then(|s| s.trim().parse().ok());
    }
    None
}

/// Whether the partition at `start` carries an LVM2 physical volume label (in one of its
/// first four sectors).
pub fn has_pv_label(disk: &File, start: u64) -> bool {
    let mut b = [0u8; 2048];
    if disk.read_exact_at(&mut b, start).is_err() {
        return false;
    }
    b.chunks(512)
        .any(|s| &s[..8] == b"LABELONE" && &s[24..32] == b"LVM2 001")
}

/// The filesystem in an LV; a damaged one is stored whole rather than failing the backup.
fn probe_lv(dev: &File, off: u64, len: u64, what: &str) -> Result<Option<FsInfo>> {
    match crate::fs::map::probe(dev, off, len) {
        Ok(fs) => {
            for w in fs.iter().flat_map(|f| &f.warnings) {
                eprintln!("warning: {what}: {w}");
            }
            Ok(fs)
        }
        Err(e) => {
            eprintln!("warning: {what}: {e:#}; stored whole instead");
            Ok(None)
        }
    }
}

/// Cover the gaps between pieces (sorted) with free extents.
fn fill_free(pieces: &mut Vec<Piece>, len: u64) {
    let mut gaps = Vec::new();
    let mut pos = 0;
    for p in pieces.iter() {
        if p.start > pos {
            gaps.push(Piece {
                start: pos,
                len: p.start - pos,
                src: Src::Free,
            });
        }
        pos = pos.max(p.start + p.len);
    }
    if pos < len {
        gaps.push(Piece {
            start: pos,
            len: len - pos,
            src: Src::Free,
        });
    }
    pieces.extend(gaps);
    pieces.sort_by_key(|p| p.start);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_free() {
        let mut p = vec![
            Piece {
                start: 0,
                len: 10,
                src: Src::Saved(0),
            },
            Piece {
                start: 30,
                len: 10,
                src: Src::Disk,
            },
        ];
        fill_free(&mut p, 50);
        let spans: Vec<(u64, u64, bool)> = p
            .iter()
            .map(|p| (p.start, p.len, matches!(p.src, Src::Free)))
            .collect();
        assert_eq!(
            spans,
            [
                (0, 10, false),
                (10, 20, true),
                (30, 10, false),
                (40, 10, true)
            ]
        );
    }
}
