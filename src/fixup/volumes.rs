//! The filesystems of a restored disk, wherever they live: a partition, a logical volume
//! inside an LVM physical volume partition (where the manifest recorded its extents), an md
//! RAID1 member's array, or a LUKS volume opened with its key ([`unlock`]). The fix-ups and
//! the incremental restore find the root, /boot and every file list's filesystem through
//! this one list.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::device::Disk;
use crate::device::layout::Partition;
use crate::device::mount::{LvDev, MountGuard, PartDev, mount_device, mount_range};
use crate::repo::manifest::{LvMeta, Manifest};

#[derive(Debug, Clone)]
pub enum Place {
    Partition(Partition),
    /// A logical volume of the PV partition starting at `part_start`.
    Lv {
        part_start: u64,
        lv: LvMeta,
    },
    /// The filesystem inside the LUKS volume of the partition starting at `part_start`:
    /// reachable only while [`unlock`] holds it open.
    Luks {
        part_start: u64,
        lv: LvMeta,
    },
}

/// LUKS volumes open now: partition start -> /dev/mapper path.
static UNLOCKED: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());

fn unlocked(part_start: u64) -> Option<PathBuf> {
    UNLOCKED
        .lock()
        .ok()?
        .iter()
        .find(|(s, _)| *s == part_start)
        .map(|(_, p)| p.clone())
}

/// The LUKS volumes of a restored disk, opened by cryptsetup with the user's key for the
/// steps that look inside them; closed on drop.
pub struct Unlocked {
    open: Vec<(u64, String)>,
    _parts: Vec<PartDev>,
}

impl Drop for Unlocked {
    fn drop(&mut self) {
        for (start, name) in self.open.drain(..).rev() {
            let _ = std::process::Command::new("cryptsetup")
                .args(["close", &name])
                .status();
            if let Ok(mut u) = UNLOCKED.lock() {
                u.retain(|(s, _)| *s != start);
            }
        }
    }
}

/// Open every LUKS volume of `m` that holds a filesystem on the restored `disk`, with the key
/// from `keyfile`. Without a key nothing is opened (the steps inside say they were skipped).
pub fn unlock(m: &Manifest, disk: &Disk, keyfile: Option<&std::path::Path>) -> Result<Unlocked> {
    let mut u = Unlocked {
        open: Vec::new(),
        _parts: Vec::new(),
    };
    let areas: Vec<_> = m
        .areas
        .iter()
        .filter(|a| a.luks.is_some() && !a.volumes.is_empty())
        .collect();
    let Some(keyfile) = keyfile.filter(|_| !areas.is_empty()) else {
        return Ok(u);
    };
    let secret = crate::device::luks::Secret::from_file(keyfile)?;
    // A grown last partition is opened at its size now.
    let now = crate::device::layout::DiskLayout::read(&disk.file, disk.size, disk.sector_size)
        .context("cannot read the restored partition table")?
        .data_partitions();
    for (i, a) in areas.into_iter().enumerate() {
        let p = now
            .iter()
            .find(|q| q.start == a.start)
            .cloned()
            .with_context(|| {
                format!(
                    "the restored partition table has no partition at byte {} for {}",
                    a.start, a.volumes[0].name
                )
            })?;
        let dev = PartDev::open(disk, &p)?;
        let name = format!("bmr-luks-{}-{i}", std::process::id());
        let node = dev.path.to_string_lossy().to_string();
        secret
            .cryptsetup(&["open", "--type", "luks", "--key-file", "-", &node, &name])
            .with_context(|| {
                format!("cannot open the restored LUKS volume {}", a.volumes[0].name)
            })?;
        UNLOCKED
            .lock()
            .map_err(|_| anyhow::anyhow!("internal error: the LUKS registry is poisoned"))?
            .push((a.start, PathBuf::from(format!("/dev/mapper/{name}"))));
        u.open.push((a.start, name));
        u._parts.push(dev);
    }
    Ok(u)
}

#[derive(Debug, Clone)]
pub struct Volume {
    /// `partition 3`, `vg0/root`.
    pub name: String,
    pub place: Place,
}

/// A volume mounted (or opened) for a fix-up; everything is undone on drop, in order.
pub struct Mounted {
    pub guard: MountGuard,
    _lv: Option<LvDev>,
}

impl std::ops::Deref for Mounted {
    type Target = MountGuard;
    fn deref(&self) -> &MountGuard {
        &self.guard
    }
}

/// A volume as a block device path.
pub enum VolDev {
    Part(PartDev),
    Lv(LvDev),
    /// An open LUKS volume's mapping (closed by its [`Unlocked`]).
    Mapped(PathBuf),
}

impl VolDev {
    pub fn path(&self) -> &std::path::Path {
        match self {
            VolDev::Part(p) => &p.path,
            VolDev::Lv(l) => &l.path,
            VolDev::Mapped(p) => p,
        }
    }
}

impl Volume {
    /// Disk offset of the volume's first byte (where its superblock is probed).
    pub fn start(&self) -> Option<u64> {
        match &self.place {
            Place::Partition(p) => Some(p.start),
            Place::Lv { part_start, lv } => lv.map(0, 1).map(|v| part_start + v[0].0),
            Place::Luks { .. } => None,
        }
    }

    /// The open mapping of a LUKS volume; Err when it is not open.
    fn mapped(&self) -> Result<PathBuf> {
        match &self.place {
            Place::Luks { part_start, lv } => unlocked(*part_start).with_context(|| {
                format!(
                    "LUKS volume {} is not open: give its key (--luks-keyfile, bmr.luks-keyfile=)",
                    lv.name
                )
            }),
            _ => bail!("internal error: {} is not a LUKS volume", self.name),
        }
    }

    pub fn partition(&self) -> Option<&Partition> {
        match &self.place {
            Place::Partition(p) => Some(p),
            Place::Lv { .. } | Place::Luks { .. } => None,
        }
    }

    /// The filesystem in it, as `fs::id` identifies it (none in a LUKS volume not open).
    pub fn identify(&self, disk: &Disk) -> Option<crate::fs::id::Fs> {
        if let Place::Luks { .. } = self.place {
            return crate::fs::id::identify(&self.mapped().ok()?);
        }
        crate::fs::id::identify_at(&disk.file, self.start()?)
    }

    fn pieces(part_start: u64, lv: &LvMeta) -> Result<Vec<(u64, u64)>> {
        let p = lv.map(0, lv.size).ok_or_else(|| {
            anyhow::anyhow!(
                "logical volume {}: the manifest's extents do not cover it",
                lv.name
            )
        })?;
        Ok(p.into_iter().map(|(a, l)| (part_start + a, l)).collect())
    }

    pub fn open(&self, disk: &Disk, read_only: bool) -> Result<VolDev> {
        Ok(match &self.place {
            Place::Partition(p) if read_only => VolDev::Part(PartDev::open_read_only(disk, p)?),
            Place::Partition(p) => VolDev::Part(PartDev::open(disk, p)?),
            Place::Lv { part_start, lv } => VolDev::Lv(LvDev::open(
                disk,
                &lv.name,
                &Self::pieces(*part_start, lv)?,
                read_only,
            )?),
            Place::Luks { .. } => VolDev::Mapped(self.mapped()?),
        })
    }

    pub fn mount(&self, disk: &Disk, tag: &str, read_only: bool) -> Result<Mounted> {
        match &self.place {
            Place::Partition(p) => Ok(Mounted {
                guard: mount_range(disk, p.start, p.len, Some(p.number), tag, read_only)?,
                _lv: None,
            }),
            Place::Luks { lv, .. } => {
                let dev = self.mapped()?;
                let fstype = self.identify(disk).map(|f| f.fstype);
                let guard = mount_device(&dev, fstype.as_deref(), None, tag, read_only)
                    .with_context(|| format!("cannot mount the restored {}", lv.name))?;
                Ok(Mounted { guard, _lv: None })
            }
            Place::Lv { part_start, lv } => {
                let fstype = self.identify(disk).map(|f| f.fstype);
                let dev = LvDev::open(disk, &lv.name, &Self::pieces(*part_start, lv)?, read_only)?;
                let guard = mount_device(&dev.path, fstype.as_deref(), None, tag, read_only)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot mount the restored logical volume {}: {e:#}",
                            lv.name
                        )
                    })?;
                Ok(Mounted {
                    guard,
                    _lv: Some(dev),
                })
            }
        }
    }
}

/// Every partition of the restored table and, inside those the manifest records as LVM
/// physical volumes, their logical volumes.
pub fn list(m: &Manifest, parts: &[Partition]) -> Vec<Volume> {
    let mut out = Vec::new();
    for p in parts {
        let area = m
            .areas
            .iter()
            .find(|a| a.start == p.start && a.partition == Some(p.number));
        let lvs = area.map(|a| a.volumes.as_slice()).unwrap_or(&[]);
        if lvs.is_empty() {
            out.push(Volume {
                name: format!("partition {}", p.number),
                place: Place::Partition(p.clone()),
            });
        }
        for lv in lvs {
            out.push(in_area(area.is_some_and(|a| a.luks.is_some()), p.start, lv));
        }
    }
    out
}

/// The volume `lv` of the area at `part_start`: inside LUKS (`luks`) or not.
pub fn in_area(luks: bool, part_start: u64, lv: &LvMeta) -> Volume {
    let lv = lv.clone();
    Volume {
        name: lv.name.clone(),
        place: if luks {
            Place::Luks { part_start, lv }
        } else {
            Place::Lv { part_start, lv }
        },
    }
}

/// Where a mount point of `name` goes under /run/bmr: letters and digits only.
pub fn tag(prefix: &str, name: &str) -> String {
    let t: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    format!("{prefix}-{t}")
}
