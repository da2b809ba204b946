//! XFS (v4 and v5) file tree reader: inodes v1/v2/v3 (read a cluster at a time), data and
//! attribute forks in local, extents and B+tree (bmbt) format, shortform, block, leaf and node
//! directories, local and remote symlinks, device numbers, extended attributes in shortform,
//! leaf and node (da-btree) attribute forks with remote values, and POSIX ACLs converted from
//! XFS's big-endian `SGI_ACL_*` attributes to the setxattr format.
//!
//! A damaged inode, directory block or attribute block is skipped with a warning (the rest of
//! the tree still comes through); what bmr cannot represent (a realtime section, an inode
//! format it does not know, newer on-disk features) refuses the whole tree in one line, and so
//! does a log that still holds changes (the metadata on disk is stale then).

use std::cell::RefCell;
use std::collections::HashSet;

use anyhow::{Context, Result, anyhow, bail};

use super::{Entry, Extent, Kind, ReadAt, Warnings};
use crate::fs::map::xfs::{SB_MAGIC, Sb, cleanly_unmounted, crc_ok, parse_sb};
use crate::fs::map::{be16, be32, be64};

/// v4 superblock feature bits (sb_versionnum, sb_features2).
const VERSION_NLINK: u16 = 0x0020;
const VERSION_DIRV2: u16 = 0x2000;
const VERSION_MOREBITS: u16 = 0x8000;
const FEATURES2_FTYPE: u32 = 0x0200;
/// v5 incompat bits.
const INCOMPAT_FTYPE: u32 = 1 << 0;
const INCOMPAT_NEEDSREPAIR: u32 = 1 << 4;
/// ftype, sparse inodes, meta_uuid, bigtime, nrext64, exchange-range, parent pointers: all
/// read here. The metadata directory tree (0x100) and anything newer are refused.
const INCOMPAT_READ: u32 = 0xef;

const INODE_MAGIC: u16 = 0x494e; // "IN"
const FMT_DEV: u8 = 0;
const FMT_LOCAL: u8 = 1;
const FMT_EXTENTS: u8 = 2;
const FMT_BTREE: u8 = 3;
const DIFLAG_REALTIME: u16 = 0x1;
const DIFLAG2_BIGTIME: u64 = 0x8;
const DIFLAG2_NREXT64: u64 = 0x10;

const BMAP_MAGIC: u32 = 0x424d_4150; // "BMAP"
const BMAP3_MAGIC: u32 = 0x424d_4133; // "BMA3"
const DIR2_BLOCK_MAGIC: u32 = 0x5844_3242; // "XD2B"
const DIR2_DATA_MAGIC: u32 = 0x5844_3244; // "XD2D"
const DIR3_BLOCK_MAGIC: u32 = 0x5844_4233; // "XDB3"
const DIR3_DATA_MAGIC: u32 = 0x5844_4433; // "XDD3"
const ATTR_LEAF_MAGIC: u16 = 0xfbee;
const ATTR3_LEAF_MAGIC: u16 = 0x3bee;
const DA_NODE_MAGIC: u16 = 0xfebe;
const DA3_NODE_MAGIC: u16 = 0x3ebe;
const ATTR3_RMT_MAGIC: u32 = 0x5841_524d; // "XARM"
const SYMLINK_MAGIC: u32 = 0x5853_4c4d; // "XSLM"

const ATTR_LOCAL: u8 = 0x01;
const ATTR_ROOT: u8 = 0x02;
const ATTR_SECURE: u8 = 0x04;
const ATTR_PARENT: u8 = 0x08;
const ATTR_INCOMPLETE: u8 = 0x80;

/// Directory data blocks live below this byte offset of the directory (leaf and free-index
/// blocks above it).
const DIR2_LEAF_OFFSET: u64 = 32 << 30;
/// The longest symlink target and xattr value XFS allows.
const SYMLINK_MAXLEN: u64 = 1024;
const XATTR_SIZE_MAX: usize = 65536;
/// Remote value and remote symlink block header (v5).
const RMT_HDR: usize = 56;
/// Sanity caps against hostile images.
const MAX_DEPTH: usize = 4096;
const MAX_BMBT_LEVELS: u16 = 9;
const MAX_DA_DEPTH: u32 = 5;
const MAX_WARNINGS: usize = 100;
/// Inode clusters kept in memory.
const CLUSTER_CACHE: usize = 8;

/// Something this reader cannot represent: the whole tree is refused.
#[derive(Debug)]
struct Unsupported(String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

/// One run of a fork: logical block, linear filesystem block, length in blocks.
#[derive(Debug, Clone, Copy)]
struct Run {
    off: u64,
    blk: u64,
    len: u64,
    unwritten: bool,
}

struct Inode {
    ino: u64,
    raw: Vec<u8>,
    version: u8,
    mode: u16,
    format: u8,
    aformat: u8,
    flags2: u64,
    size: u64,
    nextents: u64,
    anextents: u64,
    /// Start of the literal area (the forks).
    core: usize,
    /// Attribute fork offset in the literal area, in bytes; 0 when there is none.
    forkoff: usize,
}

impl Inode {
    fn dfork(&self) -> &[u8] {
        let end = if self.forkoff == 0 {
            self.raw.len()
        } else {
            self.core + self.forkoff
        };
        &self.raw[self.core..end]
    }

    fn afork(&self) -> Option<&[u8]> {
        (self.forkoff != 0).then(|| &self.raw[self.core + self.forkoff..])
    }
}

struct Fs<'a> {
    dev: &'a dyn ReadAt,
    sb: Sb,
    bs: u64,
    inode_size: usize,
    inopblog: u32,
    /// Directory block size in filesystem blocks.
    dirblk_fsbs: u64,
    ftype: bool,
    v1_inodes: bool,
    cluster_blocks: u64,
    /// (first linear block, bytes) of recently read inode clusters.
    clusters: RefCell<Vec<(u64, Vec<u8>)>>,
    next_slot: RefCell<usize>,
}

fn damaged(ino: u64, m: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("inode {ino}: {m} (damaged)")
}

/// A timestamp: classic (signed seconds, nanoseconds) or bigtime (nanoseconds since 1901).
fn time(raw: &[u8], at: usize, bigtime: bool) -> (i64, u32) {
    if bigtime {
        let v = be64(raw, at);
        let secs = (v / 1_000_000_000) as i64 - (1i64 << 31);
        (secs, (v % 1_000_000_000) as u32)
    } else {
        (i64::from(be32(raw, at) as i32), be32(raw, at + 4))
    }
}

impl Fs<'_> {
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.dev
            .read_at(buf, off)
            .with_context(|| format!("cannot read the filesystem at offset {off}"))
    }

    /// An fsblock number (AG number and block in it) as a linear block number, checking that
    /// `len` blocks from it stay in their AG.
    fn linear(&self, fsb: u64, len: u64) -> Option<u64> {
        let agno = fsb >> self.sb.agblklog;
        let agbno = fsb & ((1u64 << self.sb.agblklog) - 1);
        if agno >= self.sb.agcount || agbno.checked_add(len)? > self.sb.ag_len(agno) {
            return None;
        }
        Some(agno * self.sb.agblocks + agbno)
    }

    fn inode(&self, ino: u64) -> Result<Inode> {
        let agino_bits = self.sb.agblklog + self.inopblog;
        let agno = ino.checked_shr(agino_bits).unwrap_or(u64::MAX);
        let agbno = (ino >> self.inopblog) & ((1u64 << self.sb.agblklog) - 1);
        let slot = (ino & ((1u64 << self.inopblog) - 1)) as usize;
        if agno >= self.sb.agcount || agbno >= self.sb.ag_len(agno) {
            bail!("inode {ino} does not exist (damaged directory entry)");
        }
        let isz = self.inode_size;
        let first = agbno - agbno % self.cluster_blocks;
        let nblocks = self.cluster_blocks.min(self.sb.ag_len(agno) - first);
        let cl = agno * self.sb.agblocks + first;
        let in_cluster = ((agbno - first) * self.bs) as usize + slot * isz;
        let mut raw = vec![0u8; isz];
        {
            let mut cache = self.clusters.borrow_mut();
            let hit = cache.iter().position(|(b, _)| *b == cl);
            let i = match hit {
                Some(i) => i,
                None => {
                    let len = (nblocks * self.bs) as usize;
                    let i = if cache.len() < CLUSTER_CACHE {
                        cache.push((cl, vec![0u8; len]));
                        cache.len() - 1
                    } else {
                        let mut n = self.next_slot.borrow_mut();
                        *n = (*n + 1) % CLUSTER_CACHE;
                        *n
                    };
                    let (b, buf) = &mut cache[i];
                    *b = u64::MAX;
                    buf.resize(len, 0);
                    self.read(buf, cl * self.bs)
                        .with_context(|| format!("inode {ino}"))?;
                    *b = cl;
                    i
                }
            };
            let buf = &cache[i].1;
            raw.copy_from_slice(&buf[in_cluster..in_cluster + isz]);
        }
        if be16(&raw, 0) != INODE_MAGIC {
            return Err(damaged(ino, "no inode magic"));
        }
        let version = raw[4];
        let ok_version = if self.sb.v5 {
            version == 3
        } else {
            version == 2 || (version == 1 && self.v1_inodes)
        };
        if !ok_version {
            return Err(damaged(ino, format!("inode version {version}")));
        }
        if self.sb.v5 {
            if !crc_ok(&raw, 100) {
                return Err(damaged(ino, "fails its checksum"));
            }
            if be64(&raw, 152) != ino || raw[160..176] != self.sb.meta_uuid {
                return Err(damaged(ino, "belongs elsewhere"));
            }
        }
        let core = if version == 3 { 176 } else { 100 };
        let flags2 = if version == 3 { be64(&raw, 120) } else { 0 };
        let (nextents, anextents) = if flags2 & DIFLAG2_NREXT64 != 0 {
            (be64(&raw, 24), u64::from(be32(&raw, 76)))
        } else {
            (u64::from(be32(&raw, 76)), u64::from(be16(&raw, 80)))
        };
        let forkoff = usize::from(raw[82]) * 8;
        if forkoff != 0 && core + forkoff >= isz {
            return Err(damaged(ino, "attribute fork offset beyond the inode"));
        }
        if be16(&raw, 90) & DIFLAG_REALTIME != 0 && be16(&raw, 2) & 0xF000 == 0x8000 {
            return Err(damaged(
                ino,
                "a realtime file on a filesystem without a realtime section",
            ));
        }
        Ok(Inode {
            ino,
            version,
            mode: be16(&raw, 2),
            format: raw[5],
            aformat: raw[83],
            flags2,
            size: be64(&raw, 56),
            nextents,
            anextents,
            core,
            forkoff,
            raw,
        })
    }

    /// One bmbt record (16 bytes, big-endian bit fields).
    fn record(&self, ino: u64, r: &[u8]) -> Result<Run> {
        let l0 = be64(r, 0);
        let l1 = be64(r, 8);
        let off = (l0 & ((1u64 << 63) - 1)) >> 9;
        let fsb = ((l0 & 0x1ff) << 43) | (l1 >> 21);
        let len = l1 & ((1u64 << 21) - 1);
        if len == 0 {
            return Err(damaged(ino, "an empty extent"));
        }
        let blk = self
            .linear(fsb, len)
            .ok_or_else(|| damaged(ino, format!("extent at block {fsb} outside the filesystem")))?;
        Ok(Run {
            off,
            blk,
            len,
            unwritten: l0 >> 63 != 0,
        })
    }

    /// The runs of a fork in logical order.
    fn fork_map(&self, ino: &Inode, fork: &[u8], format: u8, declared: u64) -> Result<Vec<Run>> {
        let mut out = Vec::new();
        match format {
            FMT_EXTENTS => {
                if declared > (fork.len() / 16) as u64 {
                    return Err(damaged(
                        ino.ino,
                        format!("{declared} extents do not fit in the inode"),
                    ));
                }
                out.reserve(declared as usize);
                for i in 0..declared as usize {
                    out.push(self.record(ino.ino, &fork[i * 16..i * 16 + 16])?);
                }
            }
            FMT_BTREE => {
                if fork.len() < 4 + 16 {
                    return Err(damaged(ino.ino, "B+tree root does not fit"));
                }
                let level = be16(fork, 0);
                let numrecs = usize::from(be16(fork, 2));
                let maxrecs = (fork.len() - 4) / 16;
                if level == 0 || level > MAX_BMBT_LEVELS || numrecs == 0 || numrecs > maxrecs {
                    return Err(damaged(
                        ino.ino,
                        format!("B+tree root of level {level} with {numrecs} pointers"),
                    ));
                }
                let mut bufs = vec![vec![0u8; self.bs as usize]; usize::from(level)];
                let mut visited = HashSet::new();
                for i in 0..numrecs {
                    let ptr = be64(fork, 4 + maxrecs * 8 + i * 8);
                    self.bmbt(ino.ino, ptr, level - 1, &mut bufs, &mut visited, &mut out)?;
                }
            }
            f => {
                return Err(damaged(
                    ino.ino,
                    format!("fork format {f} where extents are expected"),
                ));
            }
        }
        if out.len() as u64 != declared {
            return Err(damaged(
                ino.ino,
                format!(
                    "the fork maps {} extents, the inode says {declared}",
                    out.len()
                ),
            ));
        }
        let mut next = 0;
        for r in &out {
            if r.off < next {
                return Err(damaged(ino.ino, "overlapping or unsorted extents"));
            }
            next = r.off + r.len;
        }
        Ok(out)
    }

    fn bmbt(
        &self,
        ino: u64,
        fsb: u64,
        level: u16,
        bufs: &mut [Vec<u8>],
        visited: &mut HashSet<u64>,
        out: &mut Vec<Run>,
    ) -> Result<()> {
        let (b, rest) = bufs
            .split_first_mut()
            .context("B+tree deeper than its root")?;
        let blk = self
            .linear(fsb, 1)
            .ok_or_else(|| damaged(ino, format!("B+tree block {fsb} outside the filesystem")))?;
        if !visited.insert(blk) {
            return Err(damaged(ino, format!("B+tree block {fsb} reached twice")));
        }
        self.read(b, blk * self.bs)?;
        let v5 = self.sb.v5;
        let magic = if v5 { BMAP3_MAGIC } else { BMAP_MAGIC };
        if be32(b, 0) != magic || be16(b, 4) != level {
            return Err(damaged(
                ino,
                format!("block {fsb} is not a B+tree block of level {level}"),
            ));
        }
        if v5
            && (!crc_ok(b, 64)
                || be64(b, 24) != blk * self.bs / 512
                || b[40..56] != self.sb.meta_uuid
                || be64(b, 56) != ino)
        {
            return Err(damaged(
                ino,
                format!("B+tree block {fsb} fails its checksum or belongs elsewhere"),
            ));
        }
        let hdr = if v5 { 72 } else { 24 };
        let numrecs = usize::from(be16(b, 6));
        let maxrecs = (b.len() - hdr) / 16;
        if numrecs == 0 || numrecs > maxrecs {
            return Err(damaged(
                ino,
                format!("B+tree block {fsb} holds {numrecs} records"),
            ));
        }
        if level == 0 {
            for i in 0..numrecs {
                let at = hdr + i * 16;
                out.push(self.record(ino, &b[at..at + 16])?);
            }
        } else {
            let ptrs = hdr + maxrecs * 8;
            for i in 0..numrecs {
                let child = be64(b, ptrs + i * 8);
                // Children use the buffers of the levels below: this one stays intact.
                self.bmbt(ino, child, level - 1, rest, visited, out)?;
            }
        }
        Ok(())
    }

    /// Fills `buf` (whole blocks) from logical block `lblk` of a fork on; the linear block of
    /// its start, or None when part of it is a hole or unwritten.
    fn read_mapped(&self, map: &[Run], lblk: u64, buf: &mut [u8]) -> Result<Option<u64>> {
        let bs = self.bs as usize;
        let n = (buf.len() / bs) as u64;
        let mut first = None;
        let mut l = lblk;
        while l < lblk + n {
            let i = map.partition_point(|r| r.off + r.len <= l);
            let Some(r) = map.get(i).filter(|r| r.off <= l && !r.unwritten) else {
                return Ok(None);
            };
            let take = (r.off + r.len - l).min(lblk + n - l);
            let p = r.blk + (l - r.off);
            first.get_or_insert(p);
            let at = ((l - lblk) as usize) * bs;
            self.read(&mut buf[at..at + take as usize * bs], p * self.bs)?;
            l += take;
        }
        Ok(first)
    }

    fn kind(&self, ino: &Inode) -> Result<Kind> {
        Ok(match ino.mode & 0xF000 {
            0x4000 => Kind::Dir,
            0x8000 => Kind::File,
            0xA000 => Kind::Symlink,
            0x2000 => Kind::CharDev,
            0x6000 => Kind::BlockDev,
            0x1000 => Kind::Fifo,
            0xC000 => Kind::Socket,
            m => return Err(damaged(ino.ino, format!("unknown type {m:#x}"))),
        })
    }

    fn entry(&self, path: Vec<u8>, ino: &Inode, kind: Kind, w: &mut Warnings) -> Result<Entry> {
        let r = &ino.raw;
        let fmt_ok = match kind {
            Kind::File => matches!(ino.format, FMT_EXTENTS | FMT_BTREE),
            Kind::Dir | Kind::Symlink => matches!(ino.format, FMT_LOCAL | FMT_EXTENTS | FMT_BTREE),
            _ => ino.format == FMT_DEV,
        };
        if !fmt_ok {
            if ino.format > FMT_BTREE {
                return Err(Unsupported(format!(
                    "xfs: inode {} uses data fork format {}, which bmr does not read",
                    ino.ino, ino.format
                ))
                .into());
            }
            return Err(damaged(
                ino.ino,
                format!("data fork format {} for a {kind:?}", ino.format),
            ));
        }
        let bigtime = ino.flags2 & DIFLAG2_BIGTIME != 0;
        let mut e = Entry {
            path,
            kind,
            mode: u32::from(ino.mode) & 0o7777,
            uid: be32(r, 8),
            gid: be32(r, 12),
            size: ino.size,
            atime: time(r, 32, bigtime),
            mtime: time(r, 40, bigtime),
            ctime: time(r, 48, bigtime),
            inode: ino.ino,
            nlink: if ino.version == 1 {
                u32::from(be16(r, 6))
            } else {
                be32(r, 16)
            },
            rdev: (0, 0),
            symlink: None,
            xattrs: self.xattrs(ino, w)?,
            extents: Vec::new(),
            encoded: Vec::new(),
            inline: None,
            subvol: None,
            flags: crate::fs::flags::from_xfs(be16(r, 90), ino.flags2),
        };
        match kind {
            Kind::CharDev | Kind::BlockDev => {
                let dev = be32(ino.dfork(), 0);
                e.rdev = (dev >> 18, dev & 0x3ffff);
            }
            Kind::Symlink => e.symlink = Some(self.symlink(ino)?),
            Kind::File => {
                let map = self.fork_map(ino, ino.dfork(), ino.format, ino.nextents)?;
                let bs = self.bs;
                for run in map.iter().filter(|r| !r.unwritten) {
                    let file_off = run.off * bs;
                    if file_off >= ino.size {
                        break;
                    }
                    let len = (run.len * bs).min(ino.size - file_off);
                    let disk_off = run.blk * bs;
                    match e.extents.last_mut() {
                        Some(x)
                            if x.file_off + x.len == file_off && x.disk_off + x.len == disk_off =>
                        {
                            x.len += len
                        }
                        _ => e.extents.push(Extent {
                            file_off,
                            disk_off,
                            len,
                        }),
                    }
                }
            }
            _ => {}
        }
        Ok(e)
    }

    fn symlink(&self, ino: &Inode) -> Result<Vec<u8>> {
        if ino.size == 0 || ino.size > SYMLINK_MAXLEN {
            return Err(damaged(ino.ino, format!("a symlink of {} bytes", ino.size)));
        }
        let len = ino.size as usize;
        if ino.format == FMT_LOCAL {
            return ino
                .dfork()
                .get(..len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| damaged(ino.ino, "inline symlink longer than its fork"));
        }
        let map = self.fork_map(ino, ino.dfork(), ino.format, ino.nextents)?;
        let hdr = if self.sb.v5 { RMT_HDR } else { 0 };
        let mut out = Vec::with_capacity(len);
        let mut buf = Vec::new();
        for r in &map {
            if out.len() >= len {
                break;
            }
            if r.unwritten || r.len > 3 {
                return Err(damaged(ino.ino, "symlink blocks are not plain extents"));
            }
            buf.resize((r.len * self.bs) as usize, 0);
            self.read(&mut buf, r.blk * self.bs)?;
            let n = (buf.len() - hdr).min(len - out.len());
            if self.sb.v5
                && (be32(&buf, 0) != SYMLINK_MAGIC
                    || be32(&buf, 4) as usize != out.len()
                    || be32(&buf, 8) as usize != n
                    || !crc_ok(&buf, 12)
                    || buf[16..32] != self.sb.meta_uuid
                    || be64(&buf, 32) != ino.ino
                    || be64(&buf, 40) != r.blk * self.bs / 512)
            {
                return Err(damaged(
                    ino.ino,
                    "symlink block fails its checksum or header",
                ));
            }
            out.extend_from_slice(&buf[hdr..hdr + n]);
        }
        if out.len() != len {
            return Err(damaged(ino.ino, "symlink shorter than its size"));
        }
        Ok(out)
    }

    /// Directory entries (name, inode), "." and ".." excluded.
    fn dir_entries(&self, ino: &Inode, w: &mut Warnings) -> Result<Vec<(Vec<u8>, u64)>> {
        let mut out = Vec::new();
        if ino.format == FMT_LOCAL {
            let f = ino.dfork();
            let f = f.get(..(ino.size as usize).min(f.len())).unwrap_or(f);
            let bad = || damaged(ino.ino, "short-form directory overruns its fork");
            if f.len() < 6 {
                return Err(bad());
            }
            let count = usize::from(f[0]);
            let isz = if f[1] != 0 { 8 } else { 4 };
            let mut pos = 2 + isz;
            for _ in 0..count {
                let nlen = usize::from(*f.get(pos).ok_or_else(bad)?);
                let name = f.get(pos + 3..pos + 3 + nlen).ok_or_else(bad)?;
                let p = pos + 3 + nlen + usize::from(self.ftype);
                let num = f.get(p..p + isz).ok_or_else(bad)?;
                let child = num.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b));
                if nlen == 0 {
                    return Err(damaged(ino.ino, "an empty name"));
                }
                out.push((name.to_vec(), child));
                pos = p + isz;
            }
            return Ok(out);
        }
        let map = self.fork_map(ino, ino.dfork(), ino.format, ino.nextents)?;
        let ratio = self.dirblk_fsbs;
        let leaf_blk = DIR2_LEAF_OFFSET / self.bs;
        let mut buf = vec![0u8; (ratio * self.bs) as usize];
        let mut next = 0u64;
        for r in &map {
            let mut d = r.off - r.off % ratio;
            while d < r.off + r.len && d < leaf_blk {
                if d >= next {
                    next = d + ratio;
                    match self.read_mapped(&map, d, &mut buf)? {
                        Some(blk) => {
                            if let Err(e) = self.dir_block(ino.ino, &buf, blk, &mut out) {
                                w.push(format!(
                                    "directory inode {}: block {d} skipped: {e:#}",
                                    ino.ino
                                ));
                            }
                        }
                        None => w.push(format!(
                            "directory inode {}: block {d} is not fully mapped, skipped (damaged)",
                            ino.ino
                        )),
                    }
                }
                d += ratio;
            }
        }
        Ok(out)
    }

    /// Entries of one directory data block (block format or data block of a leaf/node dir).
    fn dir_block(&self, ino: u64, b: &[u8], blk: u64, out: &mut Vec<(Vec<u8>, u64)>) -> Result<()> {
        let magic = be32(b, 0);
        let v5 = self.sb.v5;
        let (block_fmt, hdr) = match (v5, magic) {
            (false, DIR2_BLOCK_MAGIC) => (true, 16),
            (false, DIR2_DATA_MAGIC) => (false, 16),
            (true, DIR3_BLOCK_MAGIC) => (true, 64),
            (true, DIR3_DATA_MAGIC) => (false, 64),
            _ => bail!("not a directory data block (damaged)"),
        };
        if v5
            && (!crc_ok(b, 4)
                || be64(b, 8) != blk * self.bs / 512
                || b[24..40] != self.sb.meta_uuid
                || be64(b, 40) != ino)
        {
            bail!("fails its checksum or belongs elsewhere (damaged)");
        }
        let mut end = b.len();
        if block_fmt {
            let count = be32(b, end - 8) as usize;
            let room = (end - 8 - hdr) / 8;
            if count > room {
                bail!("block tail with {count} leaf entries (damaged)");
            }
            end -= 8 + count * 8;
        }
        let mut pos = hdr;
        let ft = usize::from(self.ftype);
        while pos + 8 <= end {
            if be16(b, pos) == 0xffff {
                let len = usize::from(be16(b, pos + 2));
                if len < 8 || len % 8 != 0 || pos + len > end {
                    bail!("unused space of {len} bytes at {pos} (damaged)");
                }
                pos += len;
                continue;
            }
            let inum = be64(b, pos);
            let nlen = usize::from(b[pos + 8]);
            let size = (8 + 1 + nlen + ft + 2).div_ceil(8) * 8;
            if nlen == 0 || pos + size > end {
                bail!("entry at {pos} overruns the block (damaged)");
            }
            let name = &b[pos + 9..pos + 9 + nlen];
            if name != b"." && name != b".." {
                out.push((name.to_vec(), inum));
            }
            pos += size;
        }
        Ok(())
    }

    fn xattrs(&self, ino: &Inode, w: &mut Warnings) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let Some(f) = ino.afork() else {
            return Ok(out);
        };
        match ino.aformat {
            FMT_LOCAL => {
                let bad = || damaged(ino.ino, "short-form attributes overrun their fork");
                if f.len() < 4 {
                    return Err(bad());
                }
                let total = usize::from(be16(f, 0)).min(f.len());
                let f = &f[..total];
                let count = usize::from(*f.get(2).ok_or_else(bad)?);
                let mut pos = 4;
                for _ in 0..count {
                    let h = f.get(pos..pos + 3).ok_or_else(bad)?;
                    let (nlen, vlen, flags) = (usize::from(h[0]), usize::from(h[1]), h[2]);
                    let name = f.get(pos + 3..pos + 3 + nlen).ok_or_else(bad)?;
                    let value = f
                        .get(pos + 3 + nlen..pos + 3 + nlen + vlen)
                        .ok_or_else(bad)?;
                    push_attr(&mut out, flags, name, value.to_vec());
                    pos += 3 + nlen + vlen;
                }
            }
            FMT_EXTENTS | FMT_BTREE => {
                let map = self.fork_map(ino, f, ino.aformat, ino.anextents)?;
                if map.is_empty() {
                    return Ok(out);
                }
                let mut visited = HashSet::new();
                let mut buf = vec![0u8; self.bs as usize];
                self.attr_block(ino, &map, 0, 0, &mut buf, &mut visited, &mut out, w)?;
            }
            f => {
                return Err(Unsupported(format!(
                    "xfs: inode {} uses attribute fork format {f}, which bmr does not read",
                    ino.ino
                ))
                .into());
            }
        }
        Ok(out)
    }

    /// One block of the attribute da-btree: a leaf's attributes, or a node's children.
    #[allow(clippy::too_many_arguments)]
    fn attr_block(
        &self,
        ino: &Inode,
        map: &[Run],
        dablk: u64,
        depth: u32,
        buf: &mut Vec<u8>,
        visited: &mut HashSet<u64>,
        out: &mut Vec<(Vec<u8>, Vec<u8>)>,
        w: &mut Warnings,
    ) -> Result<()> {
        if depth > MAX_DA_DEPTH || !visited.insert(dablk) {
            return Err(damaged(
                ino.ino,
                format!("attribute block {dablk} reached twice or too deep"),
            ));
        }
        let Some(blk) = self.read_mapped(map, dablk, buf)? else {
            return Err(damaged(
                ino.ino,
                format!("attribute block {dablk} is not mapped"),
            ));
        };
        let b = &buf[..];
        let v5 = self.sb.v5;
        let magic = be16(b, 8);
        if v5
            && (!crc_ok(b, 12)
                || be64(b, 16) != blk * self.bs / 512
                || b[32..48] != self.sb.meta_uuid
                || be64(b, 48) != ino.ino)
        {
            return Err(damaged(
                ino.ino,
                format!("attribute block {dablk} fails its checksum or belongs elsewhere"),
            ));
        }
        match (v5, magic) {
            (false, ATTR_LEAF_MAGIC) | (true, ATTR3_LEAF_MAGIC) => {
                let (count_at, hdr) = if v5 { (56, 80) } else { (12, 32) };
                let count = usize::from(be16(b, count_at));
                if hdr + count * 8 > b.len() {
                    return Err(damaged(
                        ino.ino,
                        format!("attribute leaf {dablk} with {count} entries"),
                    ));
                }
                let bad = || damaged(ino.ino, format!("attribute leaf {dablk} overruns"));
                for i in 0..count {
                    let e = &b[hdr + i * 8..hdr + i * 8 + 8];
                    let idx = usize::from(be16(e, 4));
                    let flags = e[6];
                    if flags & (ATTR_INCOMPLETE | ATTR_PARENT) != 0 {
                        continue;
                    }
                    if flags & ATTR_LOCAL != 0 {
                        let h = b.get(idx..idx + 3).ok_or_else(bad)?;
                        let (vlen, nlen) = (usize::from(be16(h, 0)), usize::from(h[2]));
                        let name = b.get(idx + 3..idx + 3 + nlen).ok_or_else(bad)?;
                        let value = b
                            .get(idx + 3 + nlen..idx + 3 + nlen + vlen)
                            .ok_or_else(bad)?;
                        push_attr(out, flags, name, value.to_vec());
                    } else {
                        let h = b.get(idx..idx + 9).ok_or_else(bad)?;
                        let (vblk, vlen, nlen) = (
                            u64::from(be32(h, 0)),
                            be32(h, 4) as usize,
                            usize::from(h[8]),
                        );
                        let name = b.get(idx + 9..idx + 9 + nlen).ok_or_else(bad)?.to_vec();
                        match self.remote_value(ino, map, vblk, vlen) {
                            Ok(v) => push_attr(out, flags, &name, v),
                            Err(e) => w.push(format!(
                                "inode {}: attribute {:?} skipped: {e:#}",
                                ino.ino,
                                String::from_utf8_lossy(&name)
                            )),
                        }
                    }
                }
            }
            (false, DA_NODE_MAGIC) | (true, DA3_NODE_MAGIC) => {
                let (count_at, hdr) = if v5 { (56, 64) } else { (12, 16) };
                let count = usize::from(be16(b, count_at));
                if count == 0 || hdr + count * 8 > b.len() {
                    return Err(damaged(
                        ino.ino,
                        format!("attribute node {dablk} with {count} entries"),
                    ));
                }
                let children: Vec<u64> = (0..count)
                    .map(|i| u64::from(be32(b, hdr + i * 8 + 4)))
                    .collect();
                for c in children {
                    self.attr_block(ino, map, c, depth + 1, buf, visited, out, w)?;
                }
            }
            _ => {
                return Err(damaged(
                    ino.ino,
                    format!("attribute block {dablk} has magic {magic:#x}"),
                ));
            }
        }
        Ok(())
    }

    fn remote_value(&self, ino: &Inode, map: &[Run], vblk: u64, vlen: usize) -> Result<Vec<u8>> {
        if vlen > XATTR_SIZE_MAX {
            bail!("a value of {vlen} bytes (damaged)");
        }
        let bs = self.bs as usize;
        let v5 = self.sb.v5;
        let per = if v5 { bs - RMT_HDR } else { bs };
        let mut out = Vec::with_capacity(vlen);
        let mut b = vec![0u8; bs];
        let mut l = vblk;
        while out.len() < vlen {
            let Some(blk) = self.read_mapped(map, l, &mut b)? else {
                bail!("remote value block {l} is not mapped (damaged)");
            };
            let n = per.min(vlen - out.len());
            if v5 {
                if be32(&b, 0) != ATTR3_RMT_MAGIC
                    || be32(&b, 4) as usize != out.len()
                    || be32(&b, 8) as usize != n
                    || !crc_ok(&b, 12)
                    || b[16..32] != self.sb.meta_uuid
                    || be64(&b, 32) != ino.ino
                    || be64(&b, 40) != blk * self.bs / 512
                {
                    bail!("remote value block {l} fails its checksum or header (damaged)");
                }
                out.extend_from_slice(&b[RMT_HDR..RMT_HDR + n]);
            } else {
                out.extend_from_slice(&b[..n]);
            }
            l += 1;
        }
        Ok(out)
    }
}

/// An attribute under its Linux name; ACLs converted to the setxattr format.
fn push_attr(out: &mut Vec<(Vec<u8>, Vec<u8>)>, flags: u8, name: &[u8], value: Vec<u8>) {
    if flags & (ATTR_INCOMPLETE | ATTR_PARENT) != 0 {
        return;
    }
    if flags & ATTR_ROOT != 0 {
        let acl: Option<&[u8]> = match name {
            b"SGI_ACL_FILE" => Some(b"system.posix_acl_access"),
            b"SGI_ACL_DEFAULT" => Some(b"system.posix_acl_default"),
            _ => None,
        };
        // The kernel lists an ACL twice to a privileged caller: as the POSIX ACL and as the
        // raw trusted attribute (getfattr shows both); the file list keeps both too.
        if let Some(v) = acl.and_then(|full| Some((full, acl_to_xattr(&value)?))) {
            out.push((v.0.to_vec(), v.1));
        }
    }
    let prefix: &[u8] = if flags & ATTR_ROOT != 0 {
        b"trusted."
    } else if flags & ATTR_SECURE != 0 {
        b"security."
    } else {
        b"user."
    };
    let mut full = prefix.to_vec();
    full.extend_from_slice(name);
    out.push((full, value));
}

/// XFS's ACL (be32 count, then be32 tag, be32 id, be16 perm, be16 pad per entry) as the
/// kernel's xattr (le32 version 2, then le16 tag, le16 perm, le32 id per entry).
fn acl_to_xattr(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 4 {
        return None;
    }
    let n = be32(v, 0) as usize;
    if v.len() < 4 + n.checked_mul(12)? {
        return None;
    }
    let mut out = Vec::with_capacity(4 + n * 8);
    out.extend_from_slice(&2u32.to_le_bytes());
    for i in 0..n {
        let e = &v[4 + i * 12..16 + i * 12];
        let tag = be32(e, 0) as u16;
        let id = if tag == 2 || tag == 8 {
            be32(e, 4)
        } else {
            u32::MAX
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&be16(e, 8).to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Some(out)
}

/// The tree, printing a warning for every entry skipped as damaged.
pub fn read_tree(dev: &dyn ReadAt) -> Result<Vec<Entry>> {
    let mut warnings = Vec::new();
    let entries = read_tree_warn(dev, &mut warnings)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    Ok(entries)
}

/// The tree; what was skipped of a damaged filesystem is added to `warnings`.
pub fn read_tree_warn(dev: &dyn ReadAt, warnings: &mut Vec<String>) -> Result<Vec<Entry>> {
    let (entries, w) = read_tree_report(dev)?;
    warnings.extend(w.into_iter().map(|w| format!("xfs: {w}")));
    Ok(entries)
}

/// The tree and the warnings about what was skipped.
pub(crate) fn read_tree_report(dev: &dyn ReadAt) -> Result<(Vec<Entry>, Vec<String>)> {
    let mut head = vec![0u8; 512];
    dev.read_at(&mut head, 0)
        .context("cannot read the xfs superblock")?;
    if !head.starts_with(SB_MAGIC) {
        bail!("not an xfs filesystem");
    }
    let sect = usize::from(be16(&head, 102));
    if !(512..=32768).contains(&sect) || !sect.is_power_of_two() {
        bail!("xfs: sector size out of range (superblock damaged)");
    }
    let mut raw = vec![0u8; sect];
    dev.read_at(&mut raw, 0)
        .context("cannot read the xfs superblock")?;
    let sb = parse_sb(&raw, u64::MAX, 0)?;
    if sb.inprogress {
        bail!("xfs: mkfs.xfs never finished on it");
    }
    if sb.incompat & INCOMPAT_NEEDSREPAIR != 0 {
        bail!("xfs: marked as needing repair: run xfs_repair");
    }
    if sb.incompat & !INCOMPAT_READ != 0 {
        bail!(
            "xfs: uses on-disk features the file list reader does not know (incompat flags {:#x})",
            sb.incompat & !INCOMPAT_READ
        );
    }
    if sb.rblocks != 0 {
        bail!("xfs: has a realtime section, whose files bmr does not list");
    }
    let bs = sb.block_size;
    let mut last = vec![0u8; bs as usize];
    dev.read_at(&mut last, (sb.dblocks - 1) * bs)
        .context("xfs: the partition is shorter than the filesystem")?;
    let read = |b: &mut [u8], o: u64| dev.read_at(b, o);
    if !cleanly_unmounted(&read, 0, &sb)? {
        bail!(
            "xfs: not cleanly unmounted (its log holds changes not yet written back): mount and unmount it, or run xfs_repair"
        );
    }
    let version = be16(&raw, 100);
    let inode_size = usize::from(be16(&raw, 104));
    let inopblock = u64::from(be16(&raw, 106));
    let inopblog = u32::from(raw[123]);
    let dirblklog = u32::from(raw[192]);
    let features2 = be32(&raw, 200);
    let geometry_ok = (256..=2048).contains(&inode_size)
        && inode_size.is_power_of_two()
        && inode_size.trailing_zeros() == u32::from(raw[122])
        && inopblock == bs / inode_size as u64
        && inopblock == 1 << inopblog
        && (bs << dirblklog.min(16)) <= 65536;
    if !geometry_ok {
        bail!("xfs: bad inode or directory geometry (superblock damaged)");
    }
    if !sb.v5 && version & VERSION_DIRV2 == 0 {
        bail!("xfs: version 1 directories, which bmr does not read");
    }
    let ftype = if sb.v5 {
        sb.incompat & INCOMPAT_FTYPE != 0
    } else {
        version & VERSION_MOREBITS != 0 && features2 & FEATURES2_FTYPE != 0
    };
    let rootino = be64(&raw, 56);
    let cluster_blocks = ((8192.min(64 * inode_size as u64)) / bs).max(1);
    let fs = Fs {
        dev,
        bs,
        inode_size,
        inopblog,
        dirblk_fsbs: 1 << dirblklog,
        ftype,
        v1_inodes: !sb.v5 && version & VERSION_NLINK == 0,
        cluster_blocks,
        clusters: RefCell::new(Vec::new()),
        next_slot: RefCell::new(0),
        sb,
    };
    let mut w = Warnings::new(MAX_WARNINGS);
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    // Depth-first, parents before children, names sorted for a stable order.
    let mut stack: Vec<(Vec<u8>, u64, usize)> = vec![(Vec::new(), rootino, 0)];
    while let Some((path, ino_no, depth)) = stack.pop() {
        let is_root = path.is_empty();
        let what = || String::from_utf8_lossy(&path).into_owned();
        let got = fs.inode(ino_no).and_then(|ino| {
            let kind = fs.kind(&ino)?;
            let e = fs.entry(path.clone(), &ino, kind, &mut w)?;
            Ok((ino, e))
        });
        let (ino, e) = match got {
            Ok(x) => x,
            Err(e) if e.downcast_ref::<Unsupported>().is_some() => return Err(e),
            Err(e) if is_root => return Err(e.context("xfs: the root directory")),
            Err(e) => {
                w.push(format!("{:?} skipped: {e:#}", what()));
                continue;
            }
        };
        let is_dir = e.kind == Kind::Dir;
        if is_root && !is_dir {
            bail!("xfs: the root inode {ino_no} is not a directory (damaged)");
        }
        if is_dir && (!seen_dirs.insert(ino_no) || depth > MAX_DEPTH) {
            w.push(format!(
                "{:?} skipped: directory inode {ino_no} reached twice or too deep (a loop, damaged)",
                what()
            ));
            continue;
        }
        out.push(e);
        if !is_dir {
            continue;
        }
        let mut children = match fs.dir_entries(&ino, &mut w) {
            Ok(c) => c,
            Err(e) if is_root => return Err(e.context("xfs: the root directory")),
            Err(e) => {
                w.push(format!("the contents of {:?} skipped: {e:#}", what()));
                continue;
            }
        };
        children.sort();
        children.dedup_by(|a, b| a.0 == b.0);
        for (name, child) in children.into_iter().rev() {
            if name.contains(&b'/') || name.contains(&0) {
                w.push(format!(
                    "{:?}: an entry with '/' or NUL in its name skipped (damaged)",
                    what()
                ));
                continue;
            }
            let mut p = path.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(&name);
            stack.push((p, child, depth + 1));
        }
    }
    Ok((out, w.finish("damaged entries skipped")))
}
