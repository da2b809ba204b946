//! Partition-table capture and exact re-creation (GPT via gptman, MBR via mbrman).
//!
//! The backup keeps the table as data (`Table`, serialisable into the manifest) plus the raw
//! bytes of every area outside the data partitions (`raw_areas`). Restore writes those raw areas
//! back verbatim and then calls `write_table`, which only has to move the GPT backup structures
//! to the end of the target and fix the protective MBR size.

use anyhow::{Context, Result, anyhow, bail};
use gptman::{GPTHeader, GPTPartitionEntry};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "scheme", rename_all = "lowercase")]
pub enum Table {
    Gpt(GptTable),
    Mbr(MbrTable),
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GptTable {
    /// Canonical lowercase 8-4-4-4-12, as sgdisk prints it (GPT stores the first three groups little-endian).
    pub disk_guid: String,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    pub entries_lba: u64,
    pub num_entries: u32,
    pub entry_size: u32,
    pub partitions: Vec<GptPart>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GptPart {
    /// 1-based slot in the entry array (kept as is: slots 1, 2, 4 stay 1, 2, 4).
    pub slot: u32,
    pub type_guid: String,
    pub unique_guid: String,
    pub name: String,
    pub attributes: u64,
    pub first_lba: u64,
    pub last_lba: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MbrTable {
    /// "0x1234abcd"
    pub disk_signature: String,
    pub partitions: Vec<MbrPart>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MbrPart {
    /// 1-4 primary, 5.. logical, numbered like Linux.
    pub number: u32,
    pub bootable: bool,
    pub type_id: u8,
    pub start_lba: u64,
    pub sectors: u64,
    pub kind: MbrKind,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum MbrKind {
    Primary,
    Extended,
    Logical,
}

/// A partition holding data (GPT entries; MBR primary + logical — NOT the extended
/// container): the one partition type every layer uses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Partition {
    /// GPT slot or MBR number: the N of /dev/sdaN.
    pub number: u32,
    /// Bytes.
    pub start: u64,
    /// Bytes.
    pub len: u64,
    /// GPT type GUID (lower case) or MBR type like "0x83".
    pub type_desc: String,
    /// GPT unique partition GUID (lower case); empty on MBR.
    pub unique_guid: String,
    /// Kernel name (`sda1`, `nvme0n1p2`) of a partition found in sysfs; empty for one read
    /// from a partition table.
    pub kernel_name: String,
}

/// A byte range of the disk outside every data partition (head, gaps incl. EBRs, tail).
#[derive(Debug, Clone, PartialEq)]
pub struct RawArea {
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiskLayout {
    pub sector_size: u64,
    /// Rounded down to a whole number of sectors.
    pub disk_size: u64,
    pub table: Table,
    /// Non-fatal findings of `read` (e.g. "primary GPT header is corrupt, used the backup").
    pub warnings: Vec<String>,
}

const GPT_ENTRY_SIZE: u32 = 128;
/// Upper bound on entries we accept: protects against absurd allocations from a CRC-valid but odd header.
const GPT_MAX_ENTRIES: u32 = 65536;

impl DiskLayout {
    /// Read and parse the partition table of `dev` (a block device or an image file).
    pub fn read(dev: &File, disk_size: u64, sector_size: u64) -> Result<DiskLayout> {
        check_sector_size(sector_size)?;
        let disk_size = disk_size / sector_size * sector_size;
        let mut warnings = Vec::new();

        if let Some(gpt) = read_gpt(dev, disk_size, sector_size, &mut warnings)? {
            return Ok(DiskLayout {
                sector_size,
                disk_size,
                table: Table::Gpt(gpt),
                warnings,
            });
        }
        let table = match read_mbr(dev, disk_size, sector_size, &mut warnings)? {
            Some(mbr) => Table::Mbr(mbr),
            None => Table::None,
        };
        Ok(DiskLayout {
            sector_size,
            disk_size,
            table,
            warnings,
        })
    }

    /// Data partitions sorted by start offset.
    pub fn data_partitions(&self) -> Vec<Partition> {
        let ss = self.sector_size;
        let mut parts: Vec<Partition> = match &self.table {
            Table::Gpt(g) => g
                .partitions
                .iter()
                .map(|p| Partition {
                    number: p.slot,
                    start: p.first_lba * ss,
                    len: (p.last_lba.saturating_sub(p.first_lba) + 1) * ss,
                    type_desc: p.type_guid.to_lowercase(),
                    unique_guid: p.unique_guid.to_lowercase(),
                    kernel_name: String::new(),
                })
                .collect(),
            Table::Mbr(m) => m
                .partitions
                .iter()
                .filter(|p| p.kind != MbrKind::Extended)
                .map(|p| Partition {
                    number: p.number,
                    start: p.start_lba * ss,
                    len: p.sectors * ss,
                    type_desc: format!("0x{:02x}", p.type_id),
                    unique_guid: String::new(),
                    kernel_name: String::new(),
                })
                .collect(),
            Table::None => Vec::new(),
        };
        parts.sort_by_key(|p| (p.start, p.number));
        parts
    }

    /// Every byte range of the disk outside the data partitions, sorted and non-empty.
    pub fn raw_areas(&self) -> Vec<RawArea> {
        let mut areas = Vec::new();
        let mut pos = 0u64;
        for p in self.data_partitions() {
            let start = p.start.min(self.disk_size);
            if start > pos {
                areas.push(RawArea {
                    start: pos,
                    len: start - pos,
                });
            }
            pos = pos.max(p.start.saturating_add(p.len).min(self.disk_size));
        }
        if self.disk_size > pos {
            areas.push(RawArea {
                start: pos,
                len: self.disk_size - pos,
            });
        }
        areas
    }

    /// Smallest target (bytes) the table fits on: end of the last partition, plus for GPT the
    /// backup entry array and header. Raw areas beyond this size are not needed by the table
    /// (on GPT the tail holds the old backup structures), so restore may clip them.
    pub fn min_target_size(&self) -> u64 {
        let ss = self.sector_size;
        match &self.table {
            Table::Gpt(g) => {
                let end = g
                    .partitions
                    .iter()
                    .map(|p| p.last_lba.saturating_add(1))
                    .max()
                    .unwrap_or(g.first_usable_lba)
                    .max(g.first_usable_lba);
                end.saturating_add(gpt_array_sectors(g.num_entries, g.entry_size, ss))
                    .saturating_add(1)
                    .saturating_mul(ss)
            }
            Table::Mbr(m) => m
                .partitions
                .iter()
                .map(|p| p.start_lba.saturating_add(p.sectors))
                .max()
                .unwrap_or(1)
                .saturating_mul(ss),
            Table::None => self.disk_size,
        }
    }

    /// Re-create the table on `target` after the raw areas were written back at their offsets.
    pub fn write_table(&self, target: &File, target_size: u64) -> Result<()> {
        let ss = self.sector_size;
        self.check_target(target_size)?;
        let target_size = target_size / ss * ss;
        if let Table::Gpt(g) = &self.table {
            self.write_gpt(g, target, target_size)?;
        }
        let after = DiskLayout::read(target, target_size, ss)
            .context("re-reading the partition table written to the target failed")?;
        if !self.matches(&after) {
            bail!(
                "the partition table on the target differs from the captured one (captured {}, target has {}); the raw areas were probably not restored completely, restore again",
                describe(&self.table),
                describe(&after.table)
            );
        }
        if matches!(self.table, Table::Gpt(_)) {
            // `read` accepts one good copy; after a restore both must be valid.
            let last = target_size / ss - 1;
            for lba in [1, last] {
                if let Err(e) = gpt_copy(target, target_size, ss, lba) {
                    bail!(
                        "the GPT header written at LBA {lba} of the target does not read back ({e}); restore again"
                    );
                }
            }
        }
        Ok(())
    }

    /// True if `other` (e.g. a target after restore) carries the same table. For GPT the usable
    /// range's end may differ when the disk sizes differ (backup structures sit at the disk end).
    pub fn matches(&self, other: &DiskLayout) -> bool {
        if self.sector_size != other.sector_size {
            return false;
        }
        match (&self.table, &other.table) {
            (Table::Gpt(a), Table::Gpt(b)) if self.disk_size != other.disk_size => {
                let mut b = b.clone();
                b.last_usable_lba = a.last_usable_lba;
                *a == b
            }
            (a, b) => a == b,
        }
    }

    /// Where the GPT goes on a target of `target_size` bytes (whole sectors): the last LBA,
    /// the backup array's first LBA and the last usable LBA; an error if it does not fit.
    fn gpt_geometry(&self, g: &GptTable, target_size: u64) -> Result<(u64, u64, u64)> {
        let ss = self.sector_size;
        let array_sectors = gpt_array_sectors(g.num_entries, g.entry_size, ss);
        let sectors = target_size / ss;
        let max_end = g.partitions.iter().map(|p| p.last_lba).max().unwrap_or(0);
        let too_small = || {
            anyhow!(
                "target of {target_size} bytes cannot hold the GPT (last partition ends at LBA {max_end}, the backup array needs {array_sectors} sectors at the end); use a bigger target disk"
            )
        };
        let last_lba = sectors.checked_sub(1).ok_or_else(too_small)?;
        let backup_array_lba = last_lba.checked_sub(array_sectors).ok_or_else(too_small)?;
        // Same size: keep the captured usable range verbatim. Otherwise do what `sgdisk -e`
        // does: the usable area ends right before the backup array at the new disk end.
        // (gptman's `update_from` would do this too, but it takes the size from the file
        // length, resets first_usable_lba and underflows on tiny disks, so we set it here.)
        let last_usable = if target_size == self.disk_size {
            g.last_usable_lba
        } else {
            backup_array_lba.checked_sub(1).ok_or_else(too_small)?
        };
        if max_end > last_usable || last_usable >= backup_array_lba {
            return Err(too_small());
        }
        Ok((last_lba, backup_array_lba, last_usable))
    }

    /// Everything `write_table` checks before it writes, for a target of `target_size` bytes:
    /// a restore calls it while planning, so a table that cannot be written stops the restore
    /// before the first byte. `validate` must have accepted the layout.
    pub fn check_target(&self, target_size: u64) -> Result<()> {
        let ss = self.sector_size;
        check_sector_size(ss)?;
        let target_size = target_size / ss * ss;
        if target_size < self.min_target_size() {
            bail!(
                "target is too small: {} bytes, the partition table needs at least {} bytes; use a bigger target disk",
                target_size,
                self.min_target_size()
            );
        }
        if let Table::Gpt(g) = &self.table {
            check_gpt_entries(g)?;
            self.gpt_geometry(g, target_size)?;
        }
        Ok(())
    }

    fn write_gpt(&self, g: &GptTable, target: &File, target_size: u64) -> Result<()> {
        let ss = self.sector_size;
        check_gpt_entries(g)?;
        let sectors = target_size / ss;
        let (last_lba, backup_array_lba, last_usable) = self.gpt_geometry(g, target_size)?;

        let mut entries = vec![GPTPartitionEntry::empty(); g.num_entries as usize];
        for p in &g.partitions {
            let slot = p.slot as usize;
            if slot == 0 || slot > entries.len() {
                bail!(
                    "captured GPT partition slot {} is outside 1..{}; the manifest is corrupt",
                    p.slot,
                    g.num_entries
                );
            }
            entries[slot - 1] = GPTPartitionEntry {
                partition_type_guid: parse_guid(&p.type_guid)?,
                unique_partition_guid: parse_guid(&p.unique_guid)?,
                starting_lba: p.first_lba,
                ending_lba: p.last_lba,
                attribute_bits: p.attributes,
                partition_name: p.name.as_str().into(),
            };
        }
        let mut primary = GPTHeader {
            signature: *b"EFI PART",
            revision: [0, 0, 1, 0],
            header_size: 92,
            crc32_checksum: 0,
            reserved: [0; 4],
            primary_lba: 1,
            backup_lba: last_lba,
            first_usable_lba: g.first_usable_lba,
            last_usable_lba: last_usable,
            disk_guid: parse_guid(&g.disk_guid)?,
            partition_entry_lba: g.entries_lba,
            number_of_partition_entries: g.num_entries,
            size_of_partition_entry: g.entry_size,
            partition_entry_array_crc32: 0,
        };
        let mut backup = primary.clone();
        backup.primary_lba = last_lba;
        backup.backup_lba = 1;
        backup.partition_entry_lba = backup_array_lba;

        let zero = vec![0u8; ss as usize];
        let old_last = self.disk_size / ss - 1;
        if sectors > old_last + 1 {
            // The stale backup header of the source would otherwise still be found by tools
            // scanning for GPT headers; written before the new structures in case they overlap.
            target
                .write_all_at(&zero, old_last * ss)
                .context("zeroing the old backup GPT header on the target failed")?;
        }
        // gptman writes only the 92 header bytes: clear the rest of the new backup sector.
        target
            .write_all_at(&zero, last_lba * ss)
            .context("clearing the backup GPT header sector on the target failed")?;
        // GPTHeader::write_into writes just the header and its array (never sector 0), which
        // keeps the restored protective MBR's boot code. GPT::write_into is not used because a
        // GPT value can only be built by reading a disk or by new_from (fixed 128 entries).
        let mut dev = Dev::new(target, target_size);
        primary
            .write_into(&mut dev, ss, &entries)
            .map_err(|e| anyhow!("writing the primary GPT to the target failed: {e}"))?;
        backup
            .write_into(&mut dev, ss, &entries)
            .map_err(|e| anyhow!("writing the backup GPT to the target failed: {e}"))?;
        fix_protective_mbr(target, self.disk_size / ss, sectors)?;
        target
            .sync_data()
            .context("flushing the GPT to the target failed")?;
        Ok(())
    }
}

/// Set the protective MBR's 0xEE size to the new disk size, but only if it covered the whole
/// old disk (a hybrid MBR's 0xEE entry covers just part of it and stays as it was).
fn fix_protective_mbr(target: &File, old_sectors: u64, new_sectors: u64) -> Result<()> {
    let mut mbr = [0u8; 512];
    target
        .read_exact_at(&mut mbr, 0)
        .context("reading sector 0 of the target failed")?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(());
    }
    let cap = |n: u64| n.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
    for i in 0..4 {
        let e = 446 + 16 * i;
        if mbr[e + 4] != 0xEE {
            continue;
        }
        let start = u32::from_le_bytes([mbr[e + 8], mbr[e + 9], mbr[e + 10], mbr[e + 11]]);
        let size = u32::from_le_bytes([mbr[e + 12], mbr[e + 13], mbr[e + 14], mbr[e + 15]]);
        if start == 1 && size == cap(old_sectors) {
            target
                .write_all_at(&cap(new_sectors).to_le_bytes(), (e + 12) as u64)
                .context("updating the protective MBR size on the target failed")?;
        }
    }
    Ok(())
}

/// Largest disk a manifest may record: 2^56 bytes (64 PiB), far beyond any disk made, and
/// small enough that no sum of offsets and lengths inside it overflows.
pub const MAX_DISK_SIZE: u64 = 1 << 56;

impl DiskLayout {
    /// Check a layout recorded in a manifest (not read from a disk) against what the formats
    /// allow: sector and disk size, and for GPT the entry array, the usable range, slots,
    /// GUIDs, names and partitions inside the usable range without overlap; for MBR the
    /// numbering, one extended partition holding the logical ones, 32-bit fields and no
    /// overlap. A restore calls it before anything is written.
    pub fn validate(&self) -> Result<()> {
        check_sector_size(self.sector_size)?;
        if self.disk_size < self.sector_size || self.disk_size > MAX_DISK_SIZE {
            bail!(
                "recorded disk size {} bytes is outside {}..{MAX_DISK_SIZE} bytes",
                self.disk_size,
                self.sector_size
            );
        }
        let sectors = self.disk_size / self.sector_size;
        match &self.table {
            Table::Gpt(g) => validate_gpt(g, sectors, self.sector_size),
            Table::Mbr(m) => validate_mbr(m, sectors),
            Table::None => Ok(()),
        }
    }
}

fn check_gpt_entries(g: &GptTable) -> Result<()> {
    if g.entry_size != GPT_ENTRY_SIZE || g.num_entries == 0 || g.num_entries > GPT_MAX_ENTRIES {
        bail!(
            "recorded GPT has {} entries of {} bytes, only 1..{} entries of {} bytes are supported; recreate the table by hand",
            g.num_entries,
            g.entry_size,
            GPT_MAX_ENTRIES,
            GPT_ENTRY_SIZE
        );
    }
    Ok(())
}

fn validate_gpt(g: &GptTable, sectors: u64, ss: u64) -> Result<()> {
    check_gpt_entries(g)?;
    parse_guid(&g.disk_guid)?;
    let array = gpt_array_sectors(g.num_entries, g.entry_size, ss);
    // LBA 0 protective MBR, LBA 1 header, then the entry array, all before the usable range;
    // the usable range ends inside the disk (the backup array's place is checked against the
    // target, whose size may differ).
    if g.entries_lba < 2
        || g.entries_lba.saturating_add(array) > g.first_usable_lba
        || g.first_usable_lba > g.last_usable_lba.saturating_add(1)
        || g.last_usable_lba >= sectors
    {
        bail!(
            "recorded GPT has its entry array at LBA {} ({array} sectors) and usable LBAs {}..{} on a disk of {sectors} sectors: they do not fit",
            g.entries_lba,
            g.first_usable_lba,
            g.last_usable_lba
        );
    }
    let mut slots = HashSet::new();
    for p in &g.partitions {
        let n = p.slot;
        if n == 0 || n > g.num_entries || !slots.insert(n) {
            bail!(
                "recorded GPT partition slot {n} is outside 1..{} or used twice",
                g.num_entries
            );
        }
        if p.first_lba > p.last_lba
            || p.first_lba < g.first_usable_lba
            || p.last_lba > g.last_usable_lba
        {
            bail!(
                "recorded GPT partition {n} (LBA {}..{}) lies outside the usable LBAs {}..{} or ends before it starts",
                p.first_lba,
                p.last_lba,
                g.first_usable_lba,
                g.last_usable_lba
            );
        }
        // An all-zero type marks an unused entry: the partition would vanish.
        if parse_guid(&p.type_guid)? == [0; 16] {
            bail!("recorded GPT partition {n} has the unused (all-zero) type GUID");
        }
        parse_guid(&p.unique_guid)?;
        if p.name.encode_utf16().count() > 36 {
            bail!("recorded GPT partition {n} has a name longer than 36 UTF-16 units");
        }
    }
    check_overlap_recorded(
        g.partitions
            .iter()
            .map(|p| (p.slot, p.first_lba, p.last_lba + 1)),
    )
}

fn validate_mbr(m: &MbrTable, sectors: u64) -> Result<()> {
    let sig = m.disk_signature.strip_prefix("0x").unwrap_or("");
    if sig.len() != 8
        || !sig
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        bail!(
            "recorded MBR disk signature {:?} is not of the form 0x1234abcd",
            m.disk_signature
        );
    }
    let mut numbers = HashSet::new();
    let mut extended: Option<(u64, u64)> = None;
    let mut next_logical = 5;
    for p in &m.partitions {
        let n = p.number;
        let end = p.start_lba.saturating_add(p.sectors);
        // Both are 32-bit fields on disk.
        if p.start_lba == 0
            || p.sectors == 0
            || p.start_lba > u64::from(u32::MAX)
            || p.sectors > u64::from(u32::MAX)
            || end > sectors
        {
            bail!(
                "recorded MBR partition {n} (start {}, {} sectors) lies outside the disk of {sectors} sectors",
                p.start_lba,
                p.sectors
            );
        }
        if p.type_id == 0 {
            bail!("recorded MBR partition {n} has type 0 (unused)");
        }
        let primary = p.kind != MbrKind::Logical;
        if !numbers.insert(n)
            || (primary && !(1..=4).contains(&n))
            || (!primary && n != next_logical)
        {
            bail!("recorded MBR partition number {n} is out of place or used twice");
        }
        match p.kind {
            MbrKind::Extended if extended.is_some() => {
                bail!("recorded MBR has more than one extended partition")
            }
            MbrKind::Extended => extended = Some((p.start_lba, end)),
            MbrKind::Logical => {
                next_logical += 1;
                // The EBR sits in the sector(s) before each logical partition.
                if extended.is_none_or(|(s, e)| p.start_lba <= s || end > e) {
                    bail!("recorded MBR logical partition {n} lies outside the extended partition");
                }
            }
            MbrKind::Primary => {}
        }
    }
    // Primary entries (the extended one included) must not overlap, nor may data partitions.
    check_overlap_recorded(
        m.partitions
            .iter()
            .filter(|p| p.kind != MbrKind::Logical)
            .map(|p| (p.number, p.start_lba, p.start_lba + p.sectors)),
    )?;
    check_overlap_recorded(
        m.partitions
            .iter()
            .filter(|p| p.kind != MbrKind::Extended)
            .map(|p| (p.number, p.start_lba, p.start_lba + p.sectors)),
    )
}

fn check_overlap_recorded(parts: impl Iterator<Item = (u32, u64, u64)>) -> Result<()> {
    let mut v: Vec<_> = parts.collect();
    v.sort_by_key(|p| p.1);
    for w in v.windows(2) {
        if w[1].1 < w[0].2 {
            bail!("recorded partitions {} and {} overlap", w[0].0, w[1].0);
        }
    }
    Ok(())
}

fn check_sector_size(ss: u64) -> Result<()> {
    if !(512..=65536).contains(&ss) || !ss.is_power_of_two() {
        bail!("sector size {ss} is not supported; it must be a power of two from 512 to 65536");
    }
    Ok(())
}

pub(crate) fn gpt_array_sectors(num: u32, size: u32, ss: u64) -> u64 {
    (u64::from(num) * u64::from(size)).div_ceil(ss)
}

fn describe(t: &Table) -> String {
    match t {
        Table::Gpt(g) => format!("GPT {} with {} partitions", g.disk_guid, g.partitions.len()),
        Table::Mbr(m) => format!(
            "MBR {} with {} partitions",
            m.disk_signature,
            m.partitions.len()
        ),
        Table::None => "no partition table".into(),
    }
}

/// Format GPT GUID bytes (first three fields little-endian) the way sgdisk prints them, lowercase.
pub fn guid_to_string(b: &[u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{}-{}",
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    )
}

/// Inverse of `guid_to_string` (accepts either case).
pub fn parse_guid(s: &str) -> Result<[u8; 16]> {
    let bad = || anyhow!("invalid GUID {s:?} in the partition table data; the manifest is corrupt");
    let parts: Vec<&str> = s.split('-').collect();
    if parts.len() != 5 || parts.iter().map(|p| p.len()).ne([8, 4, 4, 4, 12]) {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    let mut at = 0;
    for (i, p) in parts.iter().enumerate() {
        let mut bytes = hex::decode(p).map_err(|_| bad())?;
        if i < 3 {
            bytes.reverse();
        }
        out[at..at + bytes.len()].copy_from_slice(&bytes);
        at += bytes.len();
    }
    Ok(out)
}

type GptCopy = (GPTHeader, Vec<GPTPartitionEntry>);

/// Read and validate one GPT header + its entry array at `lba` with gptman.
fn gpt_copy(dev: &File, disk_size: u64, ss: u64, lba: u64) -> Result<GptCopy, String> {
    let mut d = Dev::new(dev, disk_size);
    d.seek(SeekFrom::Start(lba * ss))
        .map_err(|e| e.to_string())?;
    let h = GPTHeader::read_from(&mut d).map_err(|e| e.to_string())?;
    let sectors = disk_size / ss;
    if h.primary_lba != lba {
        return Err(format!(
            "header at LBA {lba} says it is at LBA {}",
            h.primary_lba
        ));
    }
    // gptman asserts (panics) in its CRC code when entries are not 128 bytes: check first.
    if h.size_of_partition_entry != GPT_ENTRY_SIZE
        || h.number_of_partition_entries == 0
        || h.number_of_partition_entries > GPT_MAX_ENTRIES
    {
        return Err(format!(
            "unsupported entry array ({} entries of {} bytes)",
            h.number_of_partition_entries, h.size_of_partition_entry
        ));
    }
    let array = gpt_array_sectors(h.number_of_partition_entries, h.size_of_partition_entry, ss);
    if h.partition_entry_lba < 1
        || h.partition_entry_lba.saturating_add(array) > sectors
        || h.first_usable_lba > h.last_usable_lba.saturating_add(1)
        || h.last_usable_lba >= sectors
    {
        return Err("header fields point outside the disk".into());
    }
    let entries = h.read_partitions(&mut d, ss).map_err(|e| e.to_string())?;
    Ok((h, entries))
}

fn read_gpt(
    dev: &File,
    disk_size: u64,
    ss: u64,
    warnings: &mut Vec<String>,
) -> Result<Option<GptTable>> {
    let sectors = disk_size / ss;
    if sectors < 3 {
        return Ok(None);
    }
    let last = sectors - 1;
    let primary = gpt_copy(dev, disk_size, ss, 1);
    let backup = gpt_copy(dev, disk_size, ss, last);
    let (h, entries) = match (primary, backup) {
        (Ok(p), b) => {
            match b {
                Err(e) => warnings.push(format!(
                    "backup GPT header at LBA {last} is not valid ({e}); restore writes a new one"
                )),
                Ok((bh, _)) if bh.disk_guid != p.0.disk_guid => warnings.push(format!(
                    "backup GPT header at LBA {last} belongs to another disk GUID; restore writes a new one"
                )),
                Ok(_) => {}
            }
            if p.0.backup_lba != last {
                warnings.push(format!(
                    "primary GPT header puts the backup at LBA {} but the disk ends at LBA {last}",
                    p.0.backup_lba
                ));
            }
            p
        }
        (Err(pe), Ok((bh, be))) => {
            warnings.push(format!(
                "primary GPT header is not valid ({pe}); used the backup header at LBA {last}"
            ));
            // The backup does not say where the primary array lives: assume the standard LBA 2.
            let mut h = bh;
            h.partition_entry_lba = 2;
            (h, be)
        }
        (Err(pe), Err(be)) => {
            let other = if ss == 512 { 4096 } else { 512 };
            let hint = if has_gpt_signature(dev, other, 1) {
                format!(" (a GPT header exists for sector size {other}: wrong sector size?)")
            } else {
                String::new()
            };
            if has_gpt_signature(dev, ss, 1) || has_gpt_signature(dev, ss, last) {
                bail!(
                    "GPT on this disk is corrupt: primary header: {pe}; backup header: {be}{hint}; repair it with gdisk/sgdisk or back up the whole disk raw"
                );
            }
            if has_protective_mbr(dev) {
                bail!(
                    "disk has a protective MBR (type 0xEE) but no GPT header at LBA 1 or at the last LBA for sector size {ss}{hint}; repair the GPT with gdisk or check the sector size"
                );
            }
            return Ok(None);
        }
    };
    if !has_protective_mbr(dev) {
        warnings
            .push("sector 0 has no protective MBR (type 0xEE) entry; it is kept as found".into());
    }

    let mut partitions = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.is_unused() {
            continue;
        }
        let slot = i as u32 + 1;
        if e.starting_lba < h.first_usable_lba
            || e.ending_lba < e.starting_lba
            || e.ending_lba > h.last_usable_lba
        {
            bail!(
                "GPT partition {slot} (LBA {}..{}) lies outside the usable area {}..{}; fix the table with gdisk before backing up",
                e.starting_lba,
                e.ending_lba,
                h.first_usable_lba,
                h.last_usable_lba
            );
        }
        partitions.push(GptPart {
            slot,
            type_guid: guid_to_string(&e.partition_type_guid),
            unique_guid: guid_to_string(&e.unique_partition_guid),
            name: e.partition_name.as_str().to_string(),
            attributes: e.attribute_bits,
            first_lba: e.starting_lba,
            last_lba: e.ending_lba,
        });
    }
    check_overlap(
        partitions
            .iter()
            .map(|p| (p.slot, p.first_lba, p.last_lba + 1)),
    )?;
    Ok(Some(GptTable {
        disk_guid: guid_to_string(&h.disk_guid),
        first_usable_lba: h.first_usable_lba,
        last_usable_lba: h.last_usable_lba,
        entries_lba: h.partition_entry_lba,
        num_entries: h.number_of_partition_entries,
        entry_size: h.size_of_partition_entry,
        partitions,
    }))
}

/// Data partitions must not overlap, or the raw areas would be ill-defined.
fn check_overlap(parts: impl Iterator<Item = (u32, u64, u64)>) -> Result<()> {
    let mut v: Vec<_> = parts.collect();
    v.sort_by_key(|p| p.1);
    for w in v.windows(2) {
        if w[1].1 < w[0].2 {
            bail!(
                "partitions {} and {} overlap; fix the partition table before backing up",
                w[0].0,
                w[1].0
            );
        }
    }
    Ok(())
}

fn has_gpt_signature(dev: &File, ss: u64, lba: u64) -> bool {
    let mut sig = [0u8; 8];
    dev.read_exact_at(&mut sig, lba * ss).is_ok() && &sig == b"EFI PART"
}

fn has_protective_mbr(dev: &File) -> bool {
    let mut mbr = [0u8; 512];
    dev.read_exact_at(&mut mbr, 0).is_ok()
        && mbr[510..512] == [0x55, 0xAA]
        && (0..4).any(|i| mbr[446 + 16 * i + 4] == 0xEE)
}

/// A FAT filesystem on the whole disk (`mkfs.fat -I`, a "superfloppy"): its boot sector ends
/// in 0x55AA like an MBR, but its bytes where partition entries would be are boot code, zeros
/// or (mkfs.fat --mbr) a fake entry starting at sector 0.
fn is_superfloppy(dev: &File) -> bool {
    let mut s0 = [0u8; 512];
    dev.read_exact_at(&mut s0, 0).is_ok() && crate::fs::map::fat::is_boot_sector(&s0)
}

fn read_mbr(
    dev: &File,
    disk_size: u64,
    ss: u64,
    warnings: &mut Vec<String>,
) -> Result<Option<MbrTable>> {
    let sectors = disk_size / ss;
    if sectors == 0 {
        return Ok(None);
    }
    let mut d = Dev::new(dev, disk_size);
    // No 0x55AA or invalid boot flags: not an MBR (garbage, or an unpartitioned filesystem).
    let Ok(header) = mbrman::MBRHeader::read_from(&mut d) else {
        return Ok(None);
    };
    if header.iter().any(|(_, p)| p.sys == 0xEE) {
        bail!(
            "disk has a protective MBR (type 0xEE) but no GPT header at LBA 1 or at the last LBA for sector size {ss}; repair the GPT with gdisk or check the sector size"
        );
    }
    let sane = |p: &mbrman::MBRPartitionEntry| {
        p.starting_lba != 0
            && p.sectors != 0
            && u64::from(p.starting_lba) + u64::from(p.sectors) <= sectors
    };
    if is_superfloppy(dev) && !header.iter().any(|(_, p)| p.is_used() && sane(p)) {
        return Ok(None);
    }
    let insane = header.iter().any(|(_, p)| p.is_used() && !sane(p));
    if insane {
        warnings.push(
            "sector 0 ends in 0x55AA but its partition entries are not sane; treating the disk as unpartitioned".into(),
        );
        return Ok(None);
    }
    // mbrman adds u32 LBAs from the EBR chain without overflow checks: contain a panic from
    // crafted/garbage EBRs instead of aborting the program (needs panic=unwind).
    let mbr = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        mbrman::MBR::read_from(&mut Dev::new(dev, disk_size), ss as u32)
    }))
    .map_err(|_| {
        anyhow!("the extended partition chain (EBRs) is corrupt; fix it with fdisk or back up the whole disk raw")
    })?
    .map_err(|e| {
        anyhow!("the extended partition chain (EBRs) is unreadable ({e}); fix it with fdisk or back up the whole disk raw")
    })?;

    let mut partitions = Vec::new();
    for (i, p) in mbr.header.iter() {
        if p.is_unused() {
            continue;
        }
        partitions.push(MbrPart {
            number: i as u32,
            bootable: p.is_active(),
            type_id: p.sys,
            start_lba: p.starting_lba.into(),
            sectors: p.sectors.into(),
            kind: if p.is_extended() {
                MbrKind::Extended
            } else {
                MbrKind::Primary
            },
        });
    }
    // Linux numbers logicals 5, 6, ... counting only EBRs that hold a partition.
    let mut number = 5;
    for lp in &mbr.logical_partitions {
        let p = &lp.partition;
        if p.is_unused() || p.sectors == 0 {
            continue;
        }
        let end = u64::from(p.starting_lba) + u64::from(p.sectors);
        if end > sectors {
            bail!(
                "logical partition {number} (LBA {}..{end}) extends beyond the end of the disk; fix it with fdisk before backing up",
                p.starting_lba
            );
        }
        partitions.push(MbrPart {
            number,
            bootable: p.is_active(),
            type_id: p.sys,
            start_lba: p.starting_lba.into(),
            sectors: p.sectors.into(),
            kind: MbrKind::Logical,
        });
        number += 1;
    }
    check_overlap(
        partitions
            .iter()
            .filter(|p| p.kind != MbrKind::Extended)
            .map(|p| (p.number, p.start_lba, p.start_lba + p.sectors)),
    )?;
    Ok(Some(MbrTable {
        disk_signature: format!("0x{:08x}", u32::from_le_bytes(mbr.header.disk_signature)),
        partitions,
    }))
}

/// Read/Write/Seek view of a `&File` that ends at `len` (the disk size we were given, not the
/// file length, which gptman/mbrman would otherwise use) and uses pread/pwrite.
struct Dev<'a> {
    f: &'a File,
    pos: u64,
    len: u64,
}

impl<'a> Dev<'a> {
    fn new(f: &'a File, len: u64) -> Self {
        Dev { f, pos: 0, len }
    }
}

impl Read for Dev<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len {
            return Ok(0);
        }
        let n = buf
            .len()
            .min((self.len - self.pos).min(usize::MAX as u64) as usize);
        let n = self.f.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Dev<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos.saturating_add(buf.len() as u64) > self.len {
            return Err(io::Error::other("write past the end of the target"));
        }
        self.f.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Dev<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    const MIB: u64 = 1 << 20;
    const GUID: &str = "0123abcd-4567-89ef-0123-456789abcdef";

    /// Temp dir removed on drop.
    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Tmp {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "layout-test-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
        fn img(&self, name: &str, size: u64) -> PathBuf {
            let p = self.0.join(name);
            let out = Command::new("truncate")
                .arg("-s")
                .arg(size.to_string())
                .arg(&p)
                .status()
                .unwrap();
            assert!(out.success());
            p
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> String {
        let mut c = Command::new(cmd);
        c.args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("{cmd}: {e}"));
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    fn rw(p: &Path) -> File {
        OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    /// Deterministic pseudo-random bytes (xorshift) written at `off`.
    fn scribble(p: &Path, off: u64, len: usize, seed: u64) {
        let mut x = seed | 1;
        let buf: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        rw(p).write_all_at(&buf, off).unwrap();
    }

    fn read_bytes(p: &Path, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        File::open(p).unwrap().read_exact_at(&mut b, off).unwrap();
        b
    }

    fn layout(p: &Path, ss: u64) -> Result<DiskLayout> {
        let f = File::open(p).unwrap();
        DiskLayout::read(&f, f.metadata().unwrap().len(), ss)
    }

    /// Simulated restore: fill the target with junk, copy every raw area verbatim, write the table.
    fn restore(l: &DiskLayout, src: &Path, dst: &Path) -> Result<()> {
        let size = std::fs::metadata(dst).unwrap().len();
        scribble(dst, 0, size as usize, 0xdead_beef);
        let (sf, df) = (File::open(src).unwrap(), rw(dst));
        for a in l.raw_areas() {
            // Clip to the target, as restore does for targets smaller than the source.
            let end = (a.start + a.len).min(size);
            if a.start >= end {
                continue;
            }
            let mut b = vec![0; (end - a.start) as usize];
            sf.read_exact_at(&mut b, a.start).unwrap();
            df.write_all_at(&b, a.start).unwrap();
        }
        l.write_table(&df, size)
    }

    /// `sgdisk -i N` field value, e.g. "Partition unique GUID".
    fn field(text: &str, key: &str) -> String {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(key)
                    .map(|v| v.trim_start_matches(':').trim())
            })
            .unwrap_or_else(|| panic!("{key} missing in {text}"))
            .to_string()
    }

    fn first_word(v: &str) -> String {
        v.split_whitespace().next().unwrap().to_lowercase()
    }

    /// `sgdisk -p` without the lines that legitimately change with the disk size/path.
    fn sgdisk_p(p: &Path) -> String {
        run("sgdisk", &["-p", s(p)], None)
            .lines()
            .filter(|l| !l.starts_with("Disk ") || l.starts_with("Disk identifier"))
            .filter(|l| !l.starts_with("First usable") && !l.starts_with("Total free"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn make_gpt(t: &Tmp, name: &str) -> PathBuf {
        let img = t.img(name, 64 * MIB);
        run(
            "sgdisk",
            &[
                "-U",
                GUID,
                "-n",
                "1:2048:+1M",
                "-t",
                "1:ef02",
                "-c",
                "1:bios",
                "-n",
                "2:0:+8M",
                "-t",
                "2:ef00",
                "-n",
                "4:0:+16M",
                "-t",
                "4:8300",
                "-c",
                "4:root fs",
                "-A",
                "4:set:2",
                s(&img),
            ],
            None,
        );
        scribble(&img, 0, 440, 1); // boot code
        scribble(&img, 34 * 512, (2048 - 34) * 512, 2); // post-header gap
        scribble(&img, 53248 * 512, 4096, 3); // free space after the last partition
        img
    }

    #[test]
    fn guid_roundtrip_mixed_endian() {
        let b = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid_to_string(&b), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(
            parse_guid("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").unwrap(),
            b
        );
        assert!(parse_guid("c12a7328-f81f-11d2-ba4b").is_err());
    }

    #[test]
    fn gpt_slots_1_2_4_read_and_restore() {
        let t = Tmp::new("gpt");
        let img = make_gpt(&t, "src.img");
        let l = layout(&img, 512).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        // What a real disk gives passes the check a restore makes of a recorded table.
        l.validate().unwrap();
        let Table::Gpt(g) = &l.table else {
            panic!("not GPT: {:?}", l.table)
        };
        let p = run("sgdisk", &["-p", s(&img)], None);
        assert_eq!(
            field(&p, "Disk identifier (GUID)").to_lowercase(),
            g.disk_guid
        );
        assert_eq!(g.disk_guid, GUID);
        assert!(p.contains(&format!(
            "First usable sector is {}, last usable sector is {}",
            g.first_usable_lba, g.last_usable_lba
        )));
        assert!(p.contains(&format!(
            "Main partition table begins at sector {} and ends at sector {}",
            g.entries_lba,
            g.entries_lba + 31
        )));
        assert_eq!((g.num_entries, g.entry_size), (128, 128));
        assert_eq!(
            g.partitions.iter().map(|p| p.slot).collect::<Vec<_>>(),
            [1, 2, 4]
        );
        for part in &g.partitions {
            let i = run("sgdisk", &["-i", &part.slot.to_string(), s(&img)], None);
            assert_eq!(
                first_word(&field(&i, "Partition GUID code")),
                part.type_guid
            );
            assert_eq!(
                field(&i, "Partition unique GUID").to_lowercase(),
                part.unique_guid
            );
            assert_eq!(
                first_word(&field(&i, "First sector")),
                part.first_lba.to_string()
            );
            assert_eq!(
                first_word(&field(&i, "Last sector")),
                part.last_lba.to_string()
            );
            assert_eq!(
                u64::from_str_radix(&field(&i, "Attribute flags"), 16).unwrap(),
                part.attributes
            );
            assert_eq!(field(&i, "Partition name"), format!("'{}'", part.name));
        }
        assert_eq!(g.partitions[2].name, "root fs");
        assert_eq!(g.partitions[2].attributes, 4);
        assert_eq!(
            g.partitions[0].type_guid,
            "21686148-6449-6e6f-744e-656564454649"
        );

        let dp = l.data_partitions();
        assert_eq!(dp.iter().map(|p| p.number).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!((dp[0].start, dp[0].len), (2048 * 512, MIB));
        assert_eq!(
            l.raw_areas(),
            [
                RawArea {
                    start: 0,
                    len: 2048 * 512
                },
                RawArea {
                    start: 53248 * 512,
                    len: 64 * MIB - 53248 * 512
                },
            ]
        );
        assert_eq!(l.min_target_size(), (53247 + 1 + 33) * 512);

        // The manifest form round-trips.
        let json = serde_json::to_string(&l.table).unwrap();
        assert!(json.contains("\"scheme\":\"gpt\""));
        assert_eq!(serde_json::from_str::<Table>(&json).unwrap(), l.table);

        let info4 = run("sgdisk", &["-i", "4", s(&img)], None);
        for (name, size) in [("same.img", 64 * MIB), ("big.img", 114 * MIB)] {
            let dst = t.img(name, size);
            restore(&l, &img, &dst).unwrap();
            let v = run("sgdisk", &["-v", s(&dst)], None);
            assert!(v.contains("No problems found"), "{name}: {v}");
            assert_eq!(sgdisk_p(&dst), sgdisk_p(&img), "{name}");
            assert_eq!(run("sgdisk", &["-i", "4", s(&dst)], None), info4, "{name}");
            assert_eq!(read_bytes(&dst, 0, 440), read_bytes(&img, 0, 440), "{name}");
            let back = layout(&dst, 512).unwrap();
            assert!(back.warnings.is_empty(), "{:?}", back.warnings);
            assert!(l.matches(&back));
            let new_last = size / 512 - 1;
            assert_eq!(&read_bytes(&dst, new_last * 512, 8), b"EFI PART");
            // Protective MBR size follows the target.
            let pm = read_bytes(&dst, 446 + 12, 4);
            assert_eq!(u32::from_le_bytes(pm.try_into().unwrap()) as u64, new_last);
            if size > 64 * MIB {
                let old_last = 64 * MIB / 512 - 1;
                assert!(
                    read_bytes(&dst, old_last * 512, 512)
                        .iter()
                        .all(|&b| b == 0)
                );
                let Table::Gpt(bg) = &back.table else {
                    panic!()
                };
                assert_eq!(bg.last_usable_lba, new_last - 33);
            } else {
                assert_eq!(back.table, l.table);
            }
        }

        // Below the minimum the restore refuses, naming both sizes.
        let small = t.img("small.img", l.min_target_size() - 512);
        let e = l
            .write_table(&rw(&small), l.min_target_size() - 512)
            .unwrap_err();
        assert!(
            e.to_string().contains(&l.min_target_size().to_string()),
            "{e}"
        );
        // Exactly the minimum works.
        let min = t.img("min.img", l.min_target_size());
        restore(&l, &img, &min).unwrap();
        let v = run("sgdisk", &["-v", s(&min)], None);
        assert!(v.contains("No problems found"), "{v}");
    }

    #[test]
    fn mbr_with_logicals() {
        let t = Tmp::new("mbr");
        let img = t.img("src.img", 64 * MIB);
        run(
            "sfdisk",
            &["-q", s(&img)],
            Some(
                "label: dos\nlabel-id: 0x1234abcd\nunit: sectors\n\n\
                 start=2048, size=16384, type=83, bootable\n\
                 start=18432, size=100000, type=5\n\
                 start=20480, size=16384, type=83\n\
                 start=38912, size=20000, type=82\n",
            ),
        );
        scribble(&img, 0, 440, 4);
        scribble(&img, 512, 2047 * 512, 5);
        let l = layout(&img, 512).unwrap();
        l.validate().unwrap();
        let Table::Mbr(m) = &l.table else {
            panic!("not MBR: {:?}", l.table)
        };
        assert_eq!(m.disk_signature, "0x1234abcd");
        let got: Vec<_> = m
            .partitions
            .iter()
            .map(|p| {
                (
                    p.number,
                    p.kind,
                    p.bootable,
                    p.type_id,
                    p.start_lba,
                    p.sectors,
                )
            })
            .collect();
        use MbrKind::*;
        assert_eq!(
            got,
            [
                (1, Primary, true, 0x83, 2048, 16384),
                (2, Extended, false, 0x05, 18432, 100000),
                (5, Logical, false, 0x83, 20480, 16384),
                (6, Logical, false, 0x82, 38912, 20000),
            ]
        );
        let dp = l.data_partitions();
        assert_eq!(dp.iter().map(|p| p.number).collect::<Vec<_>>(), [1, 5, 6]);
        assert_eq!(dp[2].type_desc, "0x82");
        // Every EBR lies in a raw area.
        let raw = l.raw_areas();
        let mbr = mbrman::MBR::read_from(&mut File::open(&img).unwrap(), 512).unwrap();
        assert_eq!(mbr.logical_partitions.len(), 2);
        for lp in &mbr.logical_partitions {
            let off = u64::from(lp.absolute_ebr_lba) * 512;
            assert!(
                raw.iter()
                    .any(|a| a.start <= off && off + 512 <= a.start + a.len),
                "EBR at {off} not in {raw:?}"
            );
        }
        assert_eq!(l.min_target_size(), (18432 + 100000) * 512);

        let dump = |p: &Path| run("sfdisk", &["-d", s(p)], None).replace(s(p), "DEV");
        for (name, size) in [("same.img", 64 * MIB), ("big.img", 100 * MIB)] {
            let dst = t.img(name, size);
            restore(&l, &img, &dst).unwrap();
            assert_eq!(dump(&dst), dump(&img), "{name}");
            assert_eq!(
                read_bytes(&dst, 0, 2048 * 512),
                read_bytes(&img, 0, 2048 * 512)
            );
            assert!(l.matches(&layout(&dst, 512).unwrap()));
        }
        // A target whose raw areas were not restored fails the final check.
        let bare = t.img("bare.img", 64 * MIB);
        let e = l.write_table(&rw(&bare), 64 * MIB).unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");
    }

    #[test]
    fn garbage_is_unpartitioned() {
        let t = Tmp::new("garbage");
        let img = t.img("g.img", 4 * MIB);
        scribble(&img, 0, 4 * MIB as usize, 6);
        let l = layout(&img, 512).unwrap();
        assert_eq!(l.table, Table::None);
        assert!(l.data_partitions().is_empty());
        assert_eq!(
            l.raw_areas(),
            [RawArea {
                start: 0,
                len: 4 * MIB
            }]
        );
        // Sizes are rounded down to whole sectors.
        let f = File::open(&img).unwrap();
        assert_eq!(
            DiskLayout::read(&f, 4 * MIB + 100, 512).unwrap().disk_size,
            4 * MIB
        );
        assert!(DiskLayout::read(&f, 4 * MIB, 1000).is_err());
    }

    #[test]
    fn gpt_corrupt_headers() {
        let t = Tmp::new("corrupt");
        let img = make_gpt(&t, "c.img");
        let good = layout(&img, 512).unwrap();
        let last = 64 * MIB / 512 - 1;
        // Flip a byte of the primary header's CRC field.
        let crc = read_bytes(&img, 512 + 16, 1)[0];
        rw(&img).write_all_at(&[crc ^ 0xff], 512 + 16).unwrap();
        let l = layout(&img, 512).unwrap();
        assert_eq!(l.table, good.table);
        assert!(
            l.warnings
                .iter()
                .any(|w| w.contains("primary GPT header is not valid")),
            "{:?}",
            l.warnings
        );
        // A restore from it yields a fully valid GPT again.
        let dst = t.img("d.img", 64 * MIB);
        restore(&l, &img, &dst).unwrap();
        assert!(run("sgdisk", &["-v", s(&dst)], None).contains("No problems found"));

        let crc = read_bytes(&img, last * 512 + 16, 1)[0];
        rw(&img)
            .write_all_at(&[crc ^ 0xff], last * 512 + 16)
            .unwrap();
        let e = layout(&img, 512).unwrap_err().to_string();
        assert!(
            e.contains("GPT on this disk is corrupt") && !e.contains('\n'),
            "{e}"
        );

        // Protective MBR with the GPT headers gone entirely.
        let zero = vec![0u8; 512];
        rw(&img).write_all_at(&zero, 512).unwrap();
        rw(&img).write_all_at(&zero, last * 512).unwrap();
        let e = layout(&img, 512).unwrap_err().to_string();
        assert!(e.contains("protective MBR"), "{e}");
    }

    /// 4096-byte logical sectors: sgdisk only uses them on a block device, so the fixture is made
    /// through a loop device with --sector-size 4096 (needs root and /dev/loop-control).
    #[test]
    fn gpt_4k_sectors() {
        let t = Tmp::new("4k");
        let img = t.img("4k.img", 64 * MIB);
        let with_loop = |p: &Path, args: &[&str]| -> String {
            let dev = run(
                "losetup",
                &["--sector-size", "4096", "-f", "--show", s(p)],
                None,
            );
            let dev = dev.trim().to_string();
            let mut a: Vec<&str> = args.to_vec();
            a.push(&dev);
            let out = Command::new("sgdisk").args(&a).output().unwrap();
            run("losetup", &["-d", &dev], None);
            assert!(out.status.success(), "sgdisk {a:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).replace(&dev, "DEV")
        };
        with_loop(
            &img,
            &[
                "-U", GUID, "-n", "1:0:+8M", "-t", "1:ef00", "-n", "3:0:+16M", "-c", "3:data",
            ],
        );
        let l = layout(&img, 4096).unwrap();
        l.validate().unwrap();
        let Table::Gpt(g) = &l.table else {
            panic!("not GPT: {:?}", l.table)
        };
        assert_eq!((g.first_usable_lba, g.entries_lba), (6, 2));
        assert_eq!(g.last_usable_lba, 16384 - 6);
        assert_eq!(
            g.partitions.iter().map(|p| p.slot).collect::<Vec<_>>(),
            [1, 3]
        );
        assert_eq!(l.data_partitions()[0].start, 256 * 4096);
        // Read with the wrong sector size: a clear error, not a misparse.
        let e = layout(&img, 512).unwrap_err().to_string();
        assert!(e.contains("sector size 4096"), "{e}");
        assert_eq!(l.min_target_size(), (6400 + 4 + 1) * 4096);

        let dst = t.img("big4k.img", 96 * MIB);
        restore(&l, &img, &dst).unwrap();
        let v = with_loop(&dst, &["-v"]);
        assert!(v.contains("No problems found"), "{v}");
        let back = layout(&dst, 4096).unwrap();
        assert!(back.warnings.is_empty() && l.matches(&back), "{back:?}");
        assert_eq!(with_loop(&dst, &["-i", "3"]), with_loop(&img, &["-i", "3"]));
    }

    /// mkfs.fat on a whole disk (-I, a "superfloppy"; with --mbr its fake entry from sector 0)
    /// is a filesystem on an unpartitioned disk, not an empty MBR; a real MBR whose partition
    /// holds FAT stays an MBR.
    #[test]
    fn fat_superfloppy_is_unpartitioned() {
        let t = Tmp::new("superfloppy");
        for (bits, mib, extra) in [
            ("12", 4, "--mbr=n"),
            ("16", 64, "--mbr=n"),
            ("32", 128, "--mbr=n"),
            ("16", 64, "--mbr=y"),
            ("32", 128, "--mbr=y"),
        ] {
            let img = t.img(&format!("fat{bits}{extra}.img"), mib * MIB);
            run("mkfs.fat", &["-I", "-F", bits, extra, s(&img)], None);
            let l = layout(&img, 512).unwrap();
            assert_eq!(l.table, Table::None, "FAT{bits} {extra}");
            assert!(l.warnings.is_empty(), "FAT{bits} {extra}: {:?}", l.warnings);
        }
        let img = t.img("mbr.img", 64 * MIB);
        run(
            "sfdisk",
            &["-q", s(&img)],
            Some("label: dos\nstart=2048, size=60000, type=c\n"),
        );
        let part = t.img("part.img", 60000 * 512);
        run("mkfs.fat", &["-F", "16", s(&part)], None);
        run(
            "dd",
            &[
                &format!("if={}", s(&part)),
                &format!("of={}", s(&img)),
                "bs=512",
                "seek=2048",
                "conv=notrunc",
                "status=none",
            ],
            None,
        );
        let l = layout(&img, 512).unwrap();
        assert!(
            matches!(&l.table, Table::Mbr(m) if m.partitions.len() == 1),
            "{l:?}"
        );
    }
}
