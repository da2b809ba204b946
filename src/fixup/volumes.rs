//! The filesystems of a restored disk, wherever they live: a partition, or a logical volume
//! inside an LVM physical volume partition (where the manifest recorded its extents). The
//! fix-ups and the incremental restore find the root, /boot and every file list's filesystem
//! through this one list.

use anyhow::Result;

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
}

impl VolDev {
    pub fn path(&self) -> &std::path::Path {
        match self {
            VolDev::Part(p) => &p.path,
            VolDev::Lv(l) => &l.path,
        }
    }
}

impl Volume {
    /// Disk offset of the volume's first byte (where its superblock is probed).
    pub fn start(&self) -> Option<u64> {
        match &self.place {
            Place::Partition(p) => Some(p.start),
            Place::Lv { part_start, lv } => lv.map(0, 1).map(|v| part_start + v[0].0),
        }
    }

    pub fn partition(&self) -> Option<&Partition> {
        match &self.place {
            Place::Partition(p) => Some(p),
            Place::Lv { .. } => None,
        }
    }

    /// The filesystem in it, as `fs::id` identifies it.
    pub fn identify(&self, disk: &Disk) -> Option<crate::fs::id::Fs> {
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
        })
    }

    pub fn mount(&self, disk: &Disk, tag: &str, read_only: bool) -> Result<Mounted> {
        match &self.place {
            Place::Partition(p) => Ok(Mounted {
                guard: mount_range(disk, p.start, p.len, Some(p.number), tag, read_only)?,
                _lv: None,
            }),
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
        let lvs = m
            .areas
            .iter()
            .find(|a| a.start == p.start && a.partition == Some(p.number))
            .map(|a| a.volumes.as_slice())
            .unwrap_or(&[]);
        if lvs.is_empty() {
            out.push(Volume {
                name: format!("partition {}", p.number),
                place: Place::Partition(p.clone()),
            });
        }
        for lv in lvs {
            out.push(Volume {
                name: lv.name.clone(),
                place: Place::Lv {
                    part_start: p.start,
                    lv: lv.clone(),
                },
            });
        }
    }
    out
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
