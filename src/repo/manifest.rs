//! Snapshot manifests and the per-host snapshot index: versioned JSON, validated on load.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::backend::limits;
use super::paths;
use super::{Digest, RepoRead, check_host_name};
use crate::device::layout::{DiskLayout, Table};

pub const MANIFEST_FORMAT: &str = "bmr-snapshot";
pub const MANIFEST_VERSION: u32 = 1;
pub const HOST_INDEX_FORMAT: &str = "bmr-host-index";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Image,
    /// Files changed since a previous snapshot, with the complete list of paths present.
    Incremental,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Image => "image",
            Kind::Incremental => "incr",
        })
    }
}

/// How the source was read.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// No filesystem was mounted read-write while reading.
    Offline,
    /// Read while mounted read-write (`--allow-live`): like a power cut, needs fsck/journal replay.
    CrashConsistent,
    /// LVM logical volumes read through snapshots (`--snapshot lvm`): each LV as of one
    /// instant, nothing else mounted read-write.
    Snapshot,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AreaKind {
    /// Bytes outside any partition: boot code, partition tables, gaps.
    Boot,
    Partition,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Content {
    /// Only blocks the filesystem marks as used are stored.
    UsedBlocks,
    /// Every byte is stored (all-zero chunks elided).
    Whole,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FsMeta {
    pub fstype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub block_size: u64,
}

impl FsMeta {
    pub fn of(f: &crate::fs::map::FsInfo) -> FsMeta {
        FsMeta {
            fstype: f.fstype.clone(),
            variant: f.variant.clone(),
            uuid: f.uuid.clone(),
            label: f.label.clone(),
            block_size: f.block_size,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Area {
    pub kind: AreaKind,
    /// Byte offset on the disk.
    pub start: u64,
    pub len: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    pub content: Content,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsMeta>,
    /// Bytes the restore writes for this area.
    pub used_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// For an LVM physical volume: its logical volumes and where their extents lie. For an md
    /// RAID1 member: the array's content, one volume named `md/NAME`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<LvMeta>,
    /// For an md RAID member: its superblock's record of the array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raid: Option<MdMeta>,
    /// For a LUKS volume: where its encrypted data lies (its header is in the image). The
    /// filesystem inside, when bmr could map it, is its one volume `luks/UUID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub luks: Option<LuksMeta>,
}

impl Area {
    /// A partition or boot area stored whole, with nothing known inside.
    pub fn whole(kind: AreaKind, start: u64, len: u64, partition: Option<u32>) -> Area {
        Area {
            kind,
            start,
            len,
            partition,
            content: Content::Whole,
            fs: None,
            used_bytes: len,
            note: None,
            volumes: Vec::new(),
            raid: None,
            luks: None,
        }
    }
}

/// What the manifest records of a LUKS volume. The image holds its header as it was and the
/// ciphertext of the used blocks: it is written back as it is, and opens with the old keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LuksMeta {
    /// 1 or 2.
    pub version: u16,
    pub uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// As dm-crypt names it: `aes-xts-plain64`.
    pub cipher: String,
    pub sector_size: u32,
    /// Bytes from the partition's start to the encrypted data.
    pub data_offset: u64,
    /// Bytes of encrypted data in the backed-up partition.
    pub data_size: u64,
    /// The data reaches to the end of the partition, whatever its size (it grows with it).
    pub dynamic: bool,
    /// Added to the sector number for the IV (LUKS2; 0 for LUKS1).
    #[serde(default)]
    pub iv_tweak: u64,
    /// The file lists of what is inside were stored: plaintext, by --allow-plaintext-luks.
    #[serde(default)]
    pub plaintext: bool,
}

impl LuksMeta {
    pub fn from_header(h: &crate::device::luks::LuksHeader, part_len: u64) -> LuksMeta {
        LuksMeta {
            version: h.version,
            uuid: h.uuid.clone(),
            label: h.label.clone(),
            cipher: h.cipher.clone(),
            sector_size: h.sector_size,
            data_offset: h.data_offset,
            data_size: h.data_len(part_len),
            dynamic: h.data_size.is_none(),
            iv_tweak: h.iv_tweak,
            plaintext: false,
        }
    }

    /// The name of the filesystem inside: `luks/UUID`.
    pub fn volume_name(&self) -> String {
        let clean: String = self
            .uuid
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        format!("luks/{clean}")
    }

    /// The header as `device::luks` reads it.
    pub fn header(&self) -> crate::device::luks::LuksHeader {
        crate::device::luks::LuksHeader {
            version: self.version,
            uuid: self.uuid.clone(),
            label: self.label.clone(),
            cipher: self.cipher.clone(),
            sector_size: self.sector_size,
            data_offset: self.data_offset,
            data_size: if self.dynamic {
                None
            } else {
                Some(self.data_size)
            },
            iv_tweak: self.iv_tweak,
            unsupported: None,
        }
    }
}

/// What the manifest records of an md RAID member (its superblock is in the image too).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MdMeta {
    /// The array's UUID as mdadm prints it.
    pub uuid: String,
    /// As stored: `homehost:name` (1.x), `mdN` (0.90).
    pub name: String,
    /// "1.0", "1.1", "1.2", "0.90".
    pub metadata: String,
    /// "raid1", "raid5", "linear", ...
    pub level: String,
    pub raid_disks: u32,
    /// Members the superblock records as active, this one included.
    pub active: u32,
    /// This member's slot, if active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<u32>,
    pub chunk: u64,
    /// Byte offsets in the member.
    pub super_offset: u64,
    pub data_offset: u64,
    /// Bytes of data per member.
    pub size: u64,
    pub bitmap: bool,
}

impl MdMeta {
    pub fn from_super(sb: &crate::device::md::MdSuper) -> MdMeta {
        MdMeta {
            uuid: sb.uuid.clone(),
            name: sb.name.clone(),
            metadata: sb.metadata.clone(),
            level: sb.level_name(),
            raid_disks: sb.raid_disks,
            active: sb.active,
            role: sb.role,
            chunk: sb.chunk,
            super_offset: sb.super_offset,
            data_offset: sb.data_offset,
            size: sb.size,
            bitmap: sb.bitmap,
        }
    }

    /// The volume name of the array's content: `md/NAME`.
    pub fn volume_name(&self) -> String {
        let short = self
            .name
            .rsplit_once(':')
            .map_or(self.name.as_str(), |(_, n)| n);
        let clean: String = short
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.+-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(32)
            .collect();
        format!("md/{}", if clean.is_empty() { "0".into() } else { clean })
    }
}

/// What the manifest records about one logical volume in a PV area.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LvMeta {
    /// `vg/lv`.
    pub name: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsMeta>,
    /// Where its bytes are in the area: (offset in the area, length, offset in the LV).
    pub extents: Vec<(u64, u64, u64)>,
    /// Read through a snapshot (active), or straight from the disk (inactive).
    pub snapshot: bool,
}

impl LvMeta {
    /// Where bytes `[lv_off, lv_off+len)` of the volume lie in its area, in pieces (area
    /// offset, length); `None` if some of them lie in no extent.
    pub fn map(&self, lv_off: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let (mut pos, end) = (lv_off, lv_off.checked_add(len)?);
        while pos < end {
            let &(a, l, o) = self
                .extents
                .iter()
                .find(|&&(_, l, o)| pos >= o && pos < o.saturating_add(l))?;
            let n = (o + l).min(end) - pos;
            out.push((a + (pos - o), n));
            pos += n;
        }
        Some(out)
    }

    /// Where the volume starts in its area, if it lies there in one piece, in order.
    pub fn contiguous(&self) -> Option<u64> {
        let mut ext = self.extents.clone();
        ext.sort_by_key(|e| e.2);
        let base = ext.first().filter(|e| e.2 == 0)?.0;
        let mut pos = 0;
        for &(a, l, o) in &ext {
            if o != pos || a != base + o {
                return None;
            }
            pos += l;
        }
        (pos == self.size).then_some(base)
    }
}

/// A boot entry of the source machine, recorded at backup time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BootRecord {
    pub description: String,
    /// GPT unique GUID of the partition the loader is on (lower case).
    pub partition_guid: String,
    /// Loader path on that partition, `EFI/debian/shimx64.efi`.
    pub loader: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskMeta {
    pub size: u64,
    pub sector_size: u64,
    pub table: Table,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexRef {
    /// File name beside the manifest.
    pub file: String,
    pub sha256: String,
    pub len: u64,
    pub records: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Plain bytes the restore writes.
    pub used_bytes: u64,
    /// Data chunks referenced.
    pub chunks: u64,
    /// Chunks this backup added to the store.
    pub new_chunks: u64,
    /// Compressed bytes this backup added to the store.
    pub new_bytes: u64,
    /// Compressed bytes of all referenced chunks (before dedup across snapshots).
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub host: String,
    pub kind: Kind,
    /// RFC 3339, UTC.
    pub time: String,
    pub unix_time: i64,
    pub source: String,
    /// Other names of the source disk on its machine (kernel name, /dev/disk/by-id and by-path
    /// links): device paths in the restored files that use them are rewritten on a new disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_names: Vec<String>,
    pub consistency: Consistency,
    pub bmr_version: String,
    pub chunk_size: u64,
    pub disk: DiskMeta,
    pub areas: Vec<Area>,
    pub index: IndexRef,
    pub stats: Stats,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Tables of contents of the filesystems in `areas`.
    #[serde(default)]
    pub tocs: Vec<TocRef>,
    /// The source machine's UEFI boot entries that start a loader from this disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub efi_boot: Vec<BootRecord>,
}

/// A table of contents (file list) stored beside a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TocRef {
    /// Index into the base image's `areas`.
    pub area: u32,
    /// The logical volume (`vg/lv`, one of the area's `volumes`) whose filesystem this is; none
    /// for the filesystem of the partition itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The filesystem holds /etc/fstab (a system's root): what `bmr ls` shows by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
    pub fstype: String,
    pub uuid: Option<String>,
    /// File name beside the manifest.
    pub file: String,
    pub sha256: String,
    pub len: u64,
    pub entries: u64,
}

/// Which filesystem of an image a file list is of: an area, and a logical volume in it.
pub type FsKey = (u32, Option<String>);

impl TocRef {
    pub fn key(&self) -> FsKey {
        (self.area, self.volume.clone())
    }
}

/// One filesystem of an incremental snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IncFs {
    pub mountpoint: String,
    pub toc: TocRef,
    pub changed: u64,
    pub deleted: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IncManifest {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub host: String,
    pub kind: Kind,
    pub time: String,
    pub unix_time: i64,
    pub bmr_version: String,
    /// The image whose blocks a restore writes first.
    pub base: String,
    /// The snapshot changes were computed against.
    pub parent: String,
    pub differential: bool,
    pub filesystems: Vec<IncFs>,
    pub stats: Stats,
}

impl Manifest {
    /// Check invariants a restore relies on, so a damaged or hostile manifest fails before any
    /// byte is written.
    pub fn validate(&self) -> Result<()> {
        let id = &self.id;
        check_snapshot_id(id)?;
        if self.index.file != paths::index_name(id) {
            bail!("snapshot {id}: manifest names an unexpected index file");
        }
        if self.chunk_size == 0 || self.chunk_size > super::CHUNK_SIZE {
            bail!("snapshot {id}: chunk size {} out of range", self.chunk_size);
        }
        if self.disk.sector_size < 512 || !self.disk.sector_size.is_power_of_two() {
            bail!("snapshot {id}: bad sector size {}", self.disk.sector_size);
        }
        let mut end = 0;
        for (i, a) in self.areas.iter().enumerate() {
            let a_end = a.start.checked_add(a.len);
            if a.len == 0 || a.start < end || a_end.is_none_or(|e| e > self.disk.size) {
                bail!("snapshot {id}: area {i} lies outside the disk or overlaps another");
            }
            end = a_end.unwrap_or(u64::MAX);
        }
        Ok(())
    }
}

impl Manifest {
    /// The recorded disk as a layout: the size rounded down to whole sectors, as a backup's
    /// [`DiskLayout::read`] sees it.
    pub fn layout(&self) -> DiskLayout {
        let ss = self.disk.sector_size.max(1);
        DiskLayout {
            sector_size: self.disk.sector_size,
            disk_size: self.disk.size / ss * ss,
            table: self.disk.table.clone(),
            warnings: Vec::new(),
        }
    }

    /// Check the layout fields a restore writes from, before it writes: the partition table
    /// itself ([`DiskLayout::validate`]), and that the areas are exactly what a backup makes of
    /// it: every data partition one partition area with its number, every byte outside them a
    /// boot area (stored whole), together covering the disk; used bytes within each area and
    /// adding up to the stats; file lists naming partition areas.
    pub fn validate_layout(&self) -> Result<()> {
        let id = &self.id;
        let bad = |what: String| {
            anyhow::anyhow!(
                "snapshot {id}: {what}: the manifest is damaged or forged, nothing was written; choose another snapshot with --at"
            )
        };
        let layout = self.layout();
        layout.validate().map_err(|e| bad(format!("{e:#}")))?;
        let ends_at = match self.disk.table {
            Table::None => self.disk.size,
            _ => layout.disk_size,
        };
        // Areas are sorted and disjoint (validate); here they must also leave no gap.
        let mut pos = 0;
        for (i, a) in self.areas.iter().enumerate() {
            if a.start != pos {
                return Err(bad(format!(
                    "area {i} starts at {} where the previous one ended at {pos}",
                    a.start
                )));
            }
            pos = a.start.saturating_add(a.len);
            if a.used_bytes > a.len || (a.content == Content::Whole && a.used_bytes != a.len) {
                return Err(bad(format!(
                    "area {i} records {} used bytes in {} bytes",
                    a.used_bytes, a.len
                )));
            }
            if a.kind == AreaKind::Boot && (a.content != Content::Whole || a.partition.is_some()) {
                return Err(bad(format!("boot area {i} is not stored whole")));
            }
        }
        if pos != ends_at {
            return Err(bad(format!(
                "the areas end at {pos}, the disk at {ends_at}"
            )));
        }
        if !matches!(self.disk.table, Table::None) {
            let mut want: Vec<(AreaKind, u64, u64, Option<u32>)> = layout
                .raw_areas()
                .iter()
                .map(|r| (AreaKind::Boot, r.start, r.len, None))
                .chain(
                    layout
                        .data_partitions()
                        .iter()
                        .map(|p| (AreaKind::Partition, p.start, p.len, Some(p.number))),
                )
                .collect();
            want.sort_by_key(|w| w.1);
            let got: Vec<(AreaKind, u64, u64, Option<u32>)> = self
                .areas
                .iter()
                .map(|a| (a.kind, a.start, a.len, a.partition))
                .collect();
            if got != want {
                return Err(bad(
                    "the areas are not the partitions of the recorded partition table and the bytes between them".into(),
                ));
            }
        }
        let used: u64 = self.areas.iter().map(|a| a.used_bytes).sum();
        if used != self.stats.used_bytes {
            return Err(bad(format!(
                "the areas hold {used} used bytes, the stats say {}",
                self.stats.used_bytes
            )));
        }
        for t in &self.tocs {
            if self
                .areas
                .get(t.area as usize)
                .is_none_or(|a| a.kind != AreaKind::Partition)
            {
                return Err(bad(format!(
                    "a file list names area {}, no partition",
                    t.area
                )));
            }
            if let Some(v) = &t.volume
                && self.volume(t.area, v).is_none()
            {
                return Err(bad(format!(
                    "a file list names logical volume {} in area {}, which has no such volume",
                    crate::util::text::elide_path(v.as_bytes()),
                    t.area
                )));
            }
        }
        for (i, a) in self.areas.iter().enumerate() {
            if let Some(md) = &a.raid {
                let ok = md.level == "raid1"
                    && a.volumes.len() == 1
                    && a.volumes[0].name == md.volume_name()
                    && a.volumes[0].extents == [(md.data_offset, md.size, 0)]
                    && a.volumes[0].size == md.size;
                if !ok && !a.volumes.is_empty() {
                    return Err(bad(format!(
                        "area {i} is an md member whose content is not recorded as one volume of its data"
                    )));
                }
            }
            if let Some(l) = &a.luks {
                let end = l.data_offset.checked_add(l.data_size);
                let ok = a.raid.is_none()
                    && end.is_some_and(|e| e <= a.len && (!l.dynamic || e == a.len))
                    && a.volumes.iter().all(|v| {
                        v.name == l.volume_name()
                            && v.extents == [(l.data_offset, l.data_size, 0)]
                            && v.size == l.data_size
                    })
                    && a.volumes.len() <= 1;
                if !ok {
                    return Err(bad(format!(
                        "area {i} is a LUKS volume whose data or content does not fit it"
                    )));
                }
            }
            for v in &a.volumes {
                if a.raid.is_none() && a.luks.is_none() && !is_lv_name(&v.name) {
                    return Err(bad(format!(
                        "area {i} names a logical volume {}, which is not VG/LV as lvm names them",
                        crate::util::text::elide_path(v.name.as_bytes())
                    )));
                }
                for &(off, len, lv_off) in &v.extents {
                    if off.checked_add(len).is_none_or(|e| e > a.len)
                        || lv_off.checked_add(len).is_none_or(|e| e > v.size)
                    {
                        return Err(bad(format!(
                            "logical volume {} of area {i} has extents outside its area or its size",
                            crate::util::text::elide_path(v.name.as_bytes())
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The md RAID1 arrays of the snapshot that mirror over several disks (`md/NAME`): each
    /// comes back degraded without `--mirror-disk`.
    pub fn mirrors(&self) -> Vec<&MdMeta> {
        self.areas
            .iter()
            .filter_map(|a| a.raid.as_ref())
            .filter(|r| r.level == "raid1" && r.raid_disks > 1)
            .collect()
    }

    /// Logical volume `name` of area `area`, with its index there.
    pub fn volume(&self, area: u32, name: &str) -> Option<(usize, &LvMeta)> {
        self.areas
            .get(area as usize)?
            .volumes
            .iter()
            .enumerate()
            .find(|(_, v)| v.name == name)
    }

    /// How a file list's filesystem is named to the user: `partition 3`, `vg0/root`, `disk`.
    pub fn fs_name(&self, t: &TocRef) -> String {
        match (
            &t.volume,
            self.areas.get(t.area as usize).and_then(|a| a.partition),
        ) {
            (Some(v), _) => v.clone(),
            (None, Some(n)) => format!("partition {n}"),
            (None, None) => "the whole disk".into(),
        }
    }
}

/// `vg/lv` with the characters lvm allows in both names: the restore builds device paths
/// (`/dev/vg/lv`) and lvm arguments from it.
fn is_lv_name(name: &str) -> bool {
    let ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 127
            && !n.starts_with('-')
            && n != "."
            && n != ".."
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b))
    };
    name.split_once('/')
        .is_some_and(|(vg, lv)| ok(vg) && ok(lv))
}

pub fn check_snapshot_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid snapshot id {id:?}");
    }
    Ok(())
}

/// One line of `bmr list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotSummary {
    pub id: String,
    pub kind: Kind,
    pub time: String,
    pub unix_time: i64,
    pub disk_size: u64,
    pub used_bytes: u64,
    pub new_bytes: u64,
    /// For incrementals: the image they build on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostIndex {
    pub format: String,
    pub version: u32,
    pub host: String,
    pub snapshots: Vec<SnapshotSummary>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HostList {
    pub hosts: Vec<String>,
}

pub fn read_hosts(src: &dyn RepoRead) -> Result<Vec<String>> {
    let Some(bytes) = src.read_file(paths::HOSTS_FILE, limits::JSON)? else {
        return Ok(Vec::new());
    };
    let list: HostList = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}/hosts.json is damaged", src.location()))?;
    Ok(list.hosts)
}

pub fn read_host_index(src: &dyn RepoRead, host: &str) -> Result<HostIndex> {
    check_host_name(host)?;
    let Some(bytes) = src.read_file(&paths::host_index(host), limits::JSON)? else {
        let known = read_hosts(src).unwrap_or_default();
        bail!(
            "no backups of host {host:?} in {}{}",
            src.location(),
            if known.is_empty() {
                String::new()
            } else {
                format!(": known hosts are {}", known.join(", "))
            }
        );
    };
    let idx: HostIndex = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "snapshot index of host {host} is damaged ({e}): run bmr verify --repo {}",
            src.location()
        )
    })?;
    if idx.host != host {
        bail!(
            "snapshot index of host {host} names host {:?}: the repository is damaged; run bmr verify --repo {}",
            idx.host,
            src.location()
        );
    }
    if idx.format != HOST_INDEX_FORMAT || idx.version != MANIFEST_VERSION {
        bail!(
            "snapshot index of host {host} has format {} version {}: use a matching bmr",
            idx.format,
            idx.version
        );
    }
    Ok(idx)
}

/// Read and version-check a manifest's JSON.
fn read_manifest_json(src: &dyn RepoRead, host: &str, id: &str) -> Result<serde_json::Value> {
    check_snapshot_id(id)?;
    let path = paths::manifest(host, id);
    let Some(bytes) = src.read_file(&path, limits::JSON)? else {
        bail!(
            "manifest of snapshot {id} (host {host}) is missing from {}: choose another snapshot with --at",
            src.location()
        );
    };
    // Peek at format/version first so a newer manifest gets a useful message, not a parse error.
    let head: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "manifest of snapshot {id} (host {host}) is truncated or corrupt ({e}): choose another snapshot with --at"
        )
    })?;
    if head.get("format").and_then(|v| v.as_str()) != Some(MANIFEST_FORMAT) {
        bail!("{path} is not a bmr snapshot manifest: choose another snapshot with --at");
    }
    let version = head.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != u64::from(MANIFEST_VERSION) {
        bail!(
            "snapshot {id} has manifest version {version}, this bmr reads version {MANIFEST_VERSION}: use a newer bmr"
        );
    }
    if head.get("id").and_then(|v| v.as_str()) != Some(id)
        || head.get("host").and_then(|v| v.as_str()) != Some(host)
    {
        bail!("manifest {path} belongs to another snapshot");
    }
    Ok(head)
}

pub fn is_incremental(src: &dyn RepoRead, host: &str, id: &str) -> Result<bool> {
    let v = read_manifest_json(src, host, id)?;
    Ok(v.get("kind").and_then(|k| k.as_str()) == Some("incremental"))
}

pub fn read_manifest(src: &dyn RepoRead, host: &str, id: &str) -> Result<Manifest> {
    let head = read_manifest_json(src, host, id)?;
    if head.get("kind").and_then(|k| k.as_str()) == Some("incremental") {
        bail!("snapshot {id} is an incremental, not an image");
    }
    let m: Manifest = serde_json::from_value(head).map_err(|e| {
        anyhow::anyhow!(
            "manifest of snapshot {id} (host {host}) is corrupt ({e}): choose another snapshot with --at"
        )
    })?;
    m.validate()?;
    Ok(m)
}

pub fn read_inc_manifest(src: &dyn RepoRead, host: &str, id: &str) -> Result<IncManifest> {
    let head = read_manifest_json(src, host, id)?;
    let m: IncManifest = serde_json::from_value(head).map_err(|e| {
        anyhow::anyhow!(
            "manifest of snapshot {id} (host {host}) is corrupt ({e}): choose another snapshot with --at"
        )
    })?;
    check_snapshot_id(&m.base)?;
    Ok(m)
}

/// Load a file list and check it against its recorded hash.
pub fn read_toc(
    src: &dyn RepoRead,
    host: &str,
    id: &str,
    t: &TocRef,
) -> Result<Vec<crate::repo::toc::FileMeta>> {
    if !paths::is_toc_name(&t.file, id, t.area)
        || (t.file == paths::toc_name(id, t.area, None)) != t.volume.is_none()
    {
        bail!(
            "snapshot {id}: unexpected file list name {:?}",
            crate::util::text::elide_path(t.file.as_bytes())
        );
    }
    let path = format!("{}/{}", paths::snapshot_dir(host), t.file);
    // The manifest declares the length: anything else is refused before it is read.
    let Some(bytes) = src.read_file(&path, t.len.min(limits::BINARY))? else {
        bail!("file list {path} of snapshot {id} is missing: choose another snapshot with --at");
    };
    if Digest::of(&bytes).hex() != t.sha256 {
        bail!(
            "file list {path} of snapshot {id} is damaged (checksum mismatch): choose another snapshot with --at"
        );
    }
    let what = format!(
        "file list {path} of snapshot {id} ({} filesystem{}, area {})",
        t.fstype.chars().take(32).collect::<String>(),
        t.uuid
            .as_deref()
            .map(|u| format!(" {}", u.chars().take(64).collect::<String>()))
            .unwrap_or_default(),
        t.area
    );
    crate::repo::toc::read_all(&bytes, &what)
}

/// Load a snapshot's chunk index and check it against the manifest's hash.
pub fn read_chunk_index(src: &dyn RepoRead, m: &Manifest) -> Result<Vec<u8>> {
    let path = paths::index(&m.host, &m.id);
    let Some(bytes) = src.read_file(&path, m.index.len.min(limits::BINARY))? else {
        bail!(
            "chunk index of snapshot {} is missing ({path}): choose another snapshot with --at",
            m.id
        );
    };
    if Digest::of(&bytes).hex() != m.index.sha256 || bytes.len() as u64 != m.index.len {
        bail!(
            "chunk index of snapshot {} is damaged (checksum mismatch): choose another snapshot with --at",
            m.id
        );
    }
    Ok(bytes)
}

/// Resolve `--at`: a snapshot id, `latest`, or a time meaning the newest snapshot at or before it.
pub fn select<'a>(idx: &'a HostIndex, at: &str) -> Result<&'a SnapshotSummary> {
    if idx.snapshots.is_empty() {
        bail!("host {} has no snapshots", idx.host);
    }
    if at == "latest" {
        return idx
            .snapshots
            .iter()
            .enumerate()
            .max_by_key(|(i, s)| (s.unix_time, *i))
            .map(|(_, s)| s)
            .context("no snapshots");
    }
    if let Some(s) = idx.snapshots.iter().find(|s| s.id == at) {
        return Ok(s);
    }
    let Some(t) = crate::util::timefmt::parse_point(at) else {
        bail!(
            "--at {at:?} is neither a snapshot id of host {}, 'latest', nor a time like 2026-11-22T14:00: run bmr list",
            idx.host
        );
    };
    idx.snapshots
        .iter()
        .filter(|s| s.unix_time <= t)
        .enumerate()
        .max_by_key(|(i, s)| (s.unix_time, *i))
        .map(|(_, s)| s)
        .with_context(|| {
            format!(
                "host {} has no snapshot at or before {at}: run bmr list",
                idx.host
            )
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn lv_names() {
        for ok in ["vg0/root", "ubuntu-vg/ubuntu-lv", "rhel_x/swap", "a.b/c+d"] {
            assert!(super::is_lv_name(ok), "{ok}");
        }
        for bad in [
            "root", "vg0/", "/root", "vg0/../x", "../etc/x", "vg0/a/b", "-vg/x", "vg 0/x",
        ] {
            assert!(!super::is_lv_name(bad), "{bad}");
        }
    }
}
