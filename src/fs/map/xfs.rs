//! XFS (v4 and v5) allocation maps, read from each allocation group's by-block-number
//! free-space B+tree. Whatever that tree does not list as free counts as used: the AG
//! headers, the free list (AGFL), inodes, every other btree and the internal log.
//!
//! The internal log is checked first: the map is only right when the log ends with an unmount
//! record, because otherwise the log holds metadata changes (allocations, frees) that are not
//! yet in the trees.

use crate::fs::read::ReadAt;

use anyhow::{Context, Result, anyhow, bail};

use super::{FsInfo, UsedMap, be16, be32, be64, le32, uuid_text};

pub(crate) const SB_MAGIC: &[u8; 4] = b"XFSB";
const AGF_MAGIC: u32 = 0x5841_4746; // "XAGF"
const BNO_MAGIC_V4: u32 = 0x4142_5442; // "ABTB"
const BNO_MAGIC_V5: u32 = 0x4142_3342; // "AB3B"
const LOG_MAGIC: u32 = 0xFEED_BABE;

const INCOMPAT_META_UUID: u32 = 1 << 2;
const INCOMPAT_NEEDSREPAIR: u32 = 1 << 4;
/// ftype, sparse inodes, meta_uuid, bigtime, needsrepair, nrext64, exchange-range, parent
/// pointers, metadir: none of them changes the AG headers or the free-space trees. Newer bits
/// (zoned realtime and whatever follows) might, so such a filesystem is stored whole.
const INCOMPAT_KNOWN: u32 = 0x1ff;

/// Short-form btree block headers: v4 has magic, level, numrecs and two sibling pointers; v5
/// adds blkno, lsn, uuid, owner and crc.
const BT_HDR_V4: usize = 16;
const BT_HDR_V5: usize = 56;
/// Deeper than any free-space tree an AG of 2^31 blocks of 512 bytes can need.
const MAX_LEVELS: u32 = 16;

/// Basic blocks (the log's addressing unit).
const BB: u64 = 512;
/// Up to 8 log buffers of 256 KiB may be in flight when a system stops: blocks that far on
/// either side of the head must show the cycle pattern of a log that was written out in full.
const LOG_WINDOW_BB: u64 = 8 * (256 << 10) / BB;
/// The longest log record: 256 KiB of data behind up to 8 header blocks.
const LOG_MAX_RECORD_BB: u64 = (256 << 10) / BB + 8;

/// The superblock fields the map (and the file tree reader) need, validated.
pub(crate) struct Sb {
    pub(crate) v5: bool,
    pub(crate) block_size: u64,
    sect_size: u64,
    pub(crate) dblocks: u64,
    pub(crate) agblocks: u64,
    pub(crate) agcount: u64,
    pub(crate) agblklog: u32,
    logstart: u64,
    logblocks: u64,
    pub(crate) rblocks: u64,
    pub(crate) inprogress: bool,
    pub(crate) incompat: u32,
    log_incompat: u32,
    uuid: [u8; 16],
    /// The UUID stamped into v5 metadata (differs from `uuid` after `xfs_admin -U`).
    pub(crate) meta_uuid: [u8; 16],
    label: String,
}

impl Sb {
    pub(crate) fn ag_len(&self, agno: u64) -> u64 {
        if agno + 1 == self.agcount {
            self.dblocks - agno * self.agblocks
        } else {
            self.agblocks
        }
    }

    /// Blocks at the start of every AG holding its four header sectors (SB, AGF, AGI, AGFL).
    fn header_blocks(&self) -> u64 {
        (4 * self.sect_size).div_ceil(self.block_size)
    }

    fn bt_hdr(&self) -> usize {
        if self.v5 { BT_HDR_V5 } else { BT_HDR_V4 }
    }
}

/// Whether the little-endian CRC32C stored at `at` matches `buf` (summed with that field zero).
pub(crate) fn crc_ok(buf: &[u8], at: usize) -> bool {
    if buf.len() < at + 4 {
        return false;
    }
    let mut copy = buf.to_vec();
    copy[at..at + 4].fill(0);
    crc32c::crc32c(&copy) == le32(buf, at)
}

pub(crate) fn parse_sb(sb: &[u8], part_len: u64, at: u64) -> Result<Sb> {
    let what = |m: &str| anyhow!("xfs at offset {at}: {m}");
    let version = be16(sb, 100) & 0xf;
    let v5 = match version {
        4 => false,
        5 => true,
        _ => {
            bail!(
                "xfs at offset {at}: superblock version {version} is neither 4 nor 5 (damaged, or too old or new for bmr)"
            )
        }
    };
    if v5 && !crc_ok(sb, 224) {
        return Err(what(
            "the superblock fails its checksum (damaged): run xfs_repair",
        ));
    }
    let block_size = u64::from(be32(sb, 4));
    if !(512..=65536).contains(&block_size)
        || !block_size.is_power_of_two()
        || block_size.trailing_zeros() != u32::from(sb[120])
    {
        return Err(what("block size out of range (superblock damaged)"));
    }
    let sect_size = u64::from(be16(sb, 102));
    if !(512..=32768).contains(&sect_size)
        || !sect_size.is_power_of_two()
        || sect_size.trailing_zeros() != u32::from(sb[121])
        || sect_size > block_size
    {
        return Err(what("sector size out of range (superblock damaged)"));
    }
    let dblocks = be64(sb, 8);
    let agblocks = u64::from(be32(sb, 84));
    let agcount = u64::from(be32(sb, 88));
    let agblklog = u32::from(sb[124]);
    // agblklog is agblocks rounded up to a power of two: it splits block numbers into
    // AG and block-in-AG, so it must match exactly.
    if agblocks < 64 || agcount == 0 || agblklog != 64 - (agblocks - 1).leading_zeros() {
        return Err(what("bad allocation group geometry (superblock damaged)"));
    }
    let before_last = (agcount - 1) * agblocks;
    if dblocks <= before_last || dblocks > before_last + agblocks {
        return Err(what(
            "block count does not match the allocation groups (superblock damaged)",
        ));
    }
    let fs_bytes = dblocks
        .checked_mul(block_size)
        .ok_or_else(|| what("block count overflows"))?;
    if fs_bytes > part_len {
        bail!(
            "xfs at offset {at}: the filesystem is {fs_bytes} bytes, larger than its partition ({part_len} bytes): the partition table or filesystem is damaged"
        );
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[32..48]);
    let incompat = if v5 { be32(sb, 216) } else { 0 };
    let mut meta_uuid = uuid;
    if incompat & INCOMPAT_META_UUID != 0 {
        meta_uuid.copy_from_slice(&sb[248..264]);
    }
    let name = &sb[108..120];
    let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
    Ok(Sb {
        v5,
        block_size,
        sect_size,
        dblocks,
        agblocks,
        agcount,
        agblklog,
        logstart: be64(sb, 48),
        logblocks: u64::from(be32(sb, 96)),
        rblocks: be64(sb, 16),
        inprogress: sb[126] != 0,
        incompat,
        log_incompat: if v5 { be32(sb, 220) } else { 0 },
        uuid,
        meta_uuid,
        label: String::from_utf8_lossy(name).trim_end().to_string(),
    })
}

pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64, head: &[u8]) -> Result<Option<FsInfo>> {
    if !head.starts_with(SB_MAGIC) {
        return Ok(None);
    }
    let sect = u64::from(be16(head, 102));
    if !(512..=32768).contains(&sect) || !sect.is_power_of_two() || sect > len {
        bail!("xfs at offset {offset}: sector size out of range (superblock damaged)");
    }
    let mut sb = vec![0u8; sect as usize];
    dev.read_at(&mut sb, offset)
        .with_context(|| format!("xfs at offset {offset}: cannot read the superblock"))?;
    let s = parse_sb(&sb, len, offset)?;
    if s.inprogress {
        bail!("xfs at offset {offset}: mkfs.xfs never finished on it (unusable): make it again");
    }
    if s.incompat & INCOMPAT_NEEDSREPAIR != 0 {
        bail!(
            "xfs at offset {offset}: marked as needing repair: run xfs_repair, then back up again"
        );
    }
    if s.incompat & !INCOMPAT_KNOWN != 0 {
        bail!(
            "xfs at offset {offset}: uses on-disk features bmr does not read (incompat flags {:#x})",
            s.incompat & !INCOMPAT_KNOWN
        );
    }
    if s.rblocks != 0 {
        bail!(
            "xfs at offset {offset}: has a realtime section on another device, which bmr does not map"
        );
    }
    if s.logstart == 0 {
        bail!(
            "xfs at offset {offset}: its log is on another device, so bmr cannot tell whether it was cleanly unmounted"
        );
    }
    let read = |b: &mut [u8], o: u64| dev.read_at(b, o);
    let log = Log::locate(&read, offset, &s)?;
    if !log_clean(&log, &s)? {
        bail!(
            "xfs at offset {offset}: not cleanly unmounted (its log holds changes not yet written back): mount and unmount it, or run xfs_repair, then back up again"
        );
    }
    let mut used = UsedMap::new(s.block_size, len);
    for agno in 0..s.agcount {
        map_ag(dev, offset, &s, &log, agno, &mut used)?;
    }
    used.coarsen_to(32 << 20);
    Ok(Some(FsInfo {
        fstype: "xfs".into(),
        variant: Some(if s.v5 { "xfs v5" } else { "xfs v4" }.into()),
        uuid: Some(uuid_text(&s.uuid)),
        label: (!s.label.is_empty()).then(|| s.label.clone()),
        block_size: s.block_size,
        used,
        warnings: Vec::new(),
    }))
}

/// Whether the internal log needs no replay. Set while mounted by features that need a log
/// this kernel understands; a clean unmount clears them.
fn log_clean(log: &Log, s: &Sb) -> Result<bool> {
    Ok(s.log_incompat == 0 && log.clean()?)
}

/// Positional reads of the device holding the filesystem.
pub(crate) type ReadFn<'a> = &'a dyn Fn(&mut [u8], u64) -> std::io::Result<()>;

/// Whether the filesystem whose superblock is `s` (at byte `offset` of what `read` reads)
/// was cleanly unmounted: the same test the map makes before trusting any metadata.
pub(crate) fn cleanly_unmounted(read: ReadFn, offset: u64, s: &Sb) -> Result<bool> {
    if s.logstart == 0 {
        bail!(
            "xfs at offset {offset}: its log is on another device, so bmr cannot tell whether it was cleanly unmounted"
        );
    }
    let log = Log::locate(read, offset, s)?;
    log_clean(&log, s)
}

/// Marks everything of AG `agno` that its by-block-number free-space tree does not list.
fn map_ag(
    dev: &dyn ReadAt,
    offset: u64,
    s: &Sb,
    log: &Log,
    agno: u64,
    used: &mut UsedMap,
) -> Result<()> {
    let bs = s.block_size;
    let ag_len = s.ag_len(agno);
    let ag_first = agno * s.agblocks;
    let what = |m: String| anyhow!("xfs at offset {offset}: AG {agno}: {m}: run xfs_repair");
    let mut agf = vec![0u8; s.sect_size as usize];
    dev.read_at(&mut agf, offset + ag_first * bs + s.sect_size)
        .with_context(|| format!("xfs at offset {offset}: cannot read the header of AG {agno}"))?;
    if be32(&agf, 0) != AGF_MAGIC || be32(&agf, 4) != 1 {
        return Err(what("no free-space header (damaged)".into()));
    }
    if s.v5 && (!crc_ok(&agf, 216) || agf[64..80] != s.meta_uuid) {
        return Err(what(
            "the free-space header fails its checksum or names another filesystem (damaged)".into(),
        ));
    }
    if u64::from(be32(&agf, 8)) != agno || u64::from(be32(&agf, 12)) != ag_len {
        return Err(what(
            "the free-space header's AG number or length disagrees with the superblock (damaged)"
                .into(),
        ));
    }
    let root = u64::from(be32(&agf, 16));
    let levels = be32(&agf, 28);
    let freeblks = u64::from(be32(&agf, 52));
    if levels == 0 || levels > MAX_LEVELS {
        return Err(what(format!(
            "free-space tree with {levels} levels (damaged)"
        )));
    }
    let leaf_max = (bs as usize - s.bt_hdr()) / 8;
    let mut w = Walk {
        dev,
        s,
        offset,
        agno,
        ag_first,
        ag_len,
        log_range: log.range_in_ag(agno),
        next: 0,
        free: 0,
        visits: 0,
        // Every block but the root is at least half full, and free extents are never
        // adjacent, so an honest tree has far fewer blocks than this.
        max_visits: 4 * (ag_len / leaf_max as u64 + 1) + 4 * u64::from(MAX_LEVELS),
        used,
    };
    w.block(root, levels - 1, true)?;
    w.mark_used_to(ag_len);
    if w.free != freeblks {
        return Err(what(format!(
            "the free-space tree lists {} free blocks, its header says {freeblks} (damaged, or changed while being read)",
            w.free
        )));
    }
    Ok(())
}

/// A depth-first walk of one AG's by-block-number tree, in key order.
struct Walk<'a> {
    dev: &'a dyn ReadAt,
    s: &'a Sb,
    offset: u64,
    agno: u64,
    ag_first: u64,
    ag_len: u64,
    /// The internal log's blocks when they lie in this AG: never free.
    log_range: Option<(u64, u64)>,
    /// End of the last free extent seen: records must come in increasing order, which also
    /// catches a block reached twice (a cycle or shared subtree) by its repeated records.
    next: u64,
    free: u64,
    visits: u64,
    max_visits: u64,
    used: &'a mut UsedMap,
}

impl Walk<'_> {
    fn err(&self, m: String) -> anyhow::Error {
        anyhow!(
            "xfs at offset {}: AG {}: {m} (damaged): run xfs_repair",
            self.offset,
            self.agno
        )
    }

    fn mark_used_to(&mut self, end: u64) {
        let bs = self.s.block_size;
        if end > self.next {
            self.used
                .mark_range((self.ag_first + self.next) * bs, (end - self.next) * bs);
        }
    }

    fn block(&mut self, agbno: u64, level: u32, root: bool) -> Result<()> {
        let s = self.s;
        if agbno < s.header_blocks() || agbno >= self.ag_len {
            return Err(self.err(format!(
                "the free-space tree points to block {agbno}, outside the AG"
            )));
        }
        self.visits += 1;
        if self.visits > self.max_visits {
            return Err(self.err("the free-space tree has more blocks than the AG can need".into()));
        }
        let bs = s.block_size as usize;
        let mut b = vec![0u8; bs];
        let fsb = self.ag_first + agbno;
        self.dev
            .read_at(&mut b, self.offset + fsb * s.block_size)
            .with_context(|| {
                format!(
                    "xfs at offset {}: cannot read free-space tree block {agbno} of AG {}",
                    self.offset, self.agno
                )
            })?;
        let magic = if s.v5 { BNO_MAGIC_V5 } else { BNO_MAGIC_V4 };
        if be32(&b, 0) != magic {
            return Err(self.err(format!("block {agbno} is not a free-space tree block")));
        }
        if u32::from(be16(&b, 4)) != level {
            return Err(self.err(format!(
                "free-space tree block {agbno} has level {}, expected {level}",
                be16(&b, 4)
            )));
        }
        if s.v5 {
            let daddr = fsb * s.block_size / BB;
            if !crc_ok(&b, 52)
                || be64(&b, 16) != daddr
                || b[32..48] != s.meta_uuid
                || u64::from(be32(&b, 48)) != self.agno
            {
                return Err(self.err(format!(
                    "free-space tree block {agbno} fails its checksum or belongs elsewhere"
                )));
            }
        }
        let hdr = s.bt_hdr();
        let numrecs = usize::from(be16(&b, 6));
        if level == 0 {
            let max = (bs - hdr) / 8;
            if numrecs > max || (numrecs == 0 && !root) {
                return Err(self.err(format!(
                    "free-space tree leaf {agbno} holds {numrecs} records"
                )));
            }
            for i in 0..numrecs {
                let start = u64::from(be32(&b, hdr + 8 * i));
                let count = u64::from(be32(&b, hdr + 8 * i + 4));
                self.free_extent(start, count)?;
            }
        } else {
            let max = (bs - hdr) / 12;
            if numrecs == 0 || numrecs > max {
                return Err(self.err(format!(
                    "free-space tree node {agbno} holds {numrecs} pointers"
                )));
            }
            // Pointers follow the room for `max` keys, however many are in use.
            let ptrs = hdr + 8 * max;
            for i in 0..numrecs {
                let child = u64::from(be32(&b, ptrs + 4 * i));
                self.block(child, level - 1, false)?;
            }
        }
        Ok(())
    }

    fn free_extent(&mut self, start: u64, count: u64) -> Result<()> {
        let end = start + count;
        let bad = count == 0
            || start < self.next
            || start < self.s.header_blocks()
            || end > self.ag_len
            || self
                .log_range
                .is_some_and(|(ls, le)| start < le && ls < end);
        if bad {
            return Err(self.err(format!(
                "free extent {start}+{count} overlaps metadata, the log or the previous extent, or ends outside the AG"
            )));
        }
        self.mark_used_to(start);
        self.next = end;
        self.free += count;
        Ok(())
    }
}

/// The internal log: a ring of 512-byte basic blocks, each starting with the cycle number
/// (the count of passes over the ring) it was written in.
struct Log<'a> {
    dev: ReadFn<'a>,
    /// Byte offset on `dev`.
    start: u64,
    /// Length in basic blocks.
    bbs: u64,
    /// AG and first block in it.
    agno: u64,
    agbno: u64,
    blocks: u64,
}

impl<'a> Log<'a> {
    fn locate(dev: ReadFn<'a>, offset: u64, s: &Sb) -> Result<Log<'a>> {
        let agno = s.logstart >> s.agblklog;
        let agbno = s.logstart & ((1u64 << s.agblklog) - 1);
        // The internal log lies inside one AG, after its headers.
        let fits = agno < s.agcount
            && agbno >= s.header_blocks()
            && s.logblocks >= 2
            && agbno + s.logblocks <= s.ag_len(agno);
        if !fits {
            bail!("xfs at offset {offset}: the log lies outside its AG (superblock damaged)");
        }
        Ok(Log {
            dev,
            start: offset + (agno * s.agblocks + agbno) * s.block_size,
            bbs: s.logblocks * s.block_size / BB,
            agno,
            agbno,
            blocks: s.logblocks,
        })
    }

    fn range_in_ag(&self, agno: u64) -> Option<(u64, u64)> {
        (agno == self.agno).then_some((self.agbno, self.agbno + self.blocks))
    }

    fn read(&self, bb: u64, buf: &mut [u8]) -> Result<()> {
        (self.dev)(buf, self.start + bb * BB).context("cannot read the XFS log")
    }

    /// Cycle numbers of `count` blocks from `from` on, wrapping around the ring.
    fn cycles(&self, from: u64, count: u64) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(count as usize);
        let mut buf = vec![0u8; 128 * BB as usize];
        let mut pos = from % self.bbs;
        let mut left = count;
        while left > 0 {
            let n = left.min(128).min(self.bbs - pos);
            let chunk = &mut buf[..(n * BB) as usize];
            self.read(pos, chunk)?;
            out.extend(chunk.chunks_exact(BB as usize).map(cycle_of));
            left -= n;
            pos = (pos + n) % self.bbs;
        }
        Ok(out)
    }

    fn cycle(&self, bb: u64) -> Result<u32> {
        let mut b = [0u8; BB as usize];
        self.read(bb, &mut b)?;
        Ok(cycle_of(&b))
    }

    /// Whether the log ends with an unmount record and nothing after it, the test the kernel
    /// makes before deciding a mount needs no recovery. A damaged log reads as not clean.
    fn clean(&self) -> Result<bool> {
        let n = self.bbs;
        let first = self.cycle(0)?;
        let last = self.cycle(n - 1)?;
        // Blocks [0, head) are of cycle `cur`, [head, n) of the pass before.
        let (head, cur) = if first == last {
            if first == 0 {
                // Never written since it was zeroed: nothing to replay.
                return self.window_ok(0, 1);
            }
            (0, first.wrapping_add(1))
        } else if last.wrapping_add(1) == first {
            let (mut lo, mut hi) = (0, n - 1);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if self.cycle(mid)? == last {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            (hi, first)
        } else {
            return Ok(false);
        };
        if !self.window_ok(head, cur)? {
            return Ok(false);
        }
        // The last record: the nearest header before the head (data blocks start with the
        // cycle number, never the magic).
        let mut found = None;
        let mut b = [0u8; BB as usize];
        for k in 1..=n.min(LOG_MAX_RECORD_BB + 8) {
            let p = (head + n - k) % n;
            self.read(p, &mut b)?;
            if be32(&b, 0) == LOG_MAGIC {
                found = Some(p);
                break;
            }
        }
        let Some(rec) = found else {
            return Ok(false);
        };
        let version = be32(&b, 8);
        let len = u64::from(be32(&b, 12));
        let size = u64::from(be32(&b, 320));
        let hblks = if version & 2 != 0 && size > 32768 {
            size.div_ceil(32768)
        } else {
            1
        };
        if be64(&b, 16) & 0xffff_ffff != rec || hblks > 8 || len > 256 << 10 {
            return Ok(false);
        }
        if (rec + hblks + len.div_ceil(BB)) % n != head || be32(&b, 40) != 1 {
            return Ok(false);
        }
        // The one operation's header; its flags byte is past the stamped cycle word.
        self.read((rec + hblks) % n, &mut b)?;
        const UNMOUNT_TRANS: u8 = 0x20;
        Ok(b[9] & UNMOUNT_TRANS != 0)
    }

    /// The blocks around the head follow the two-cycle pattern: no hole left by a write that
    /// never reached the disk.
    fn window_ok(&self, head: u64, cur: u32) -> Result<bool> {
        let n = self.bbs;
        let w = n.min(LOG_WINDOW_BB);
        let expect = |p: u64| if p < head { cur } else { cur.wrapping_sub(1) };
        let behind = self.cycles((head + n - w) % n, w)?;
        let ahead = self.cycles(head, w)?;
        let ok_behind = behind
            .iter()
            .enumerate()
            .all(|(i, &c)| c == expect((head + n - w + i as u64) % n));
        let ok_ahead = ahead
            .iter()
            .enumerate()
            .all(|(i, &c)| c == expect((head + i as u64) % n));
        Ok(ok_behind && ok_ahead)
    }
}

/// A record header keeps the cycle in its second word; every other block in its first.
fn cycle_of(b: &[u8]) -> u32 {
    if be32(b, 0) == LOG_MAGIC {
        be32(b, 4)
    } else {
        be32(b, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_field_check() {
        let mut b = b"abcd\0\0\0\0efgh".to_vec();
        let c = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        assert!(crc_ok(&b, 4));
        b[0] ^= 1;
        assert!(!crc_ok(&b, 4));
        assert!(!crc_ok(&b, 10));
    }
}
