//! ext2/3/4 allocation maps, read from the block bitmaps in the group descriptors.

use crate::fs::read::ReadAt;

use anyhow::{Context, Result, bail};

use super::{FsInfo, UsedMap, le16, le32};

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_SPARSE_SUPER: u32 = 0x1;
const RO_HUGE_FILE: u32 = 0x8;
const RO_GDT_CSUM: u32 = 0x10;
const RO_DIR_NLINK: u32 = 0x20;
const RO_EXTRA_ISIZE: u32 = 0x40;
const RO_BIGALLOC: u32 = 0x200;
const RO_METADATA_CSUM: u32 = 0x400;
const BG_BLOCK_UNINIT: u16 = 0x2;

/// The superblock fields the allocation map and the file reader (crate::fs::read) need.
pub(crate) struct Sb {
    pub(crate) block_size: u64,
    pub(crate) cluster_ratio: u64,
    pub(crate) blocks_count: u64,
    pub(crate) first_data_block: u64,
    pub(crate) blocks_per_group: u64,
    pub(crate) inodes_per_group: u64,
    pub(crate) inode_size: u64,
    pub(crate) desc_size: u64,
    pub(crate) groups: u64,
    pub(crate) reserved_gdt: u64,
    pub(crate) first_meta_bg: u64,
    pub(crate) backup_bgs: [u64; 2],
    pub(crate) compat: u32,
    pub(crate) incompat: u32,
    pub(crate) ro: u32,
    pub(crate) uuid: [u8; 16],
    pub(crate) csum_seed: u32,
}

impl Sb {
    fn has_super(&self, g: u64) -> bool {
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return g == 0 || g == self.backup_bgs[0] || g == self.backup_bgs[1];
        }
        if self.ro & RO_SPARSE_SUPER == 0 || g <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&b| {
            let mut p = b;
            while p < g {
                p *= b;
            }
            p == g
        })
    }

    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    pub(crate) fn descs_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }

    /// Blocks of the classic (non-meta_bg) descriptor table.
    fn gdt_blocks(&self) -> u64 {
        if self.incompat & INCOMPAT_META_BG != 0 {
            self.first_meta_bg
        } else {
            self.groups.div_ceil(self.descs_per_block())
        }
    }

    /// Block holding the descriptor of group g.
    /// Block holding the primary superblock: 1 with 1 KiB blocks (even with bigalloc, where
    /// the first data block is 0), else 0.
    pub(crate) fn sb_block(&self) -> u64 {
        1024 / self.block_size
    }

    pub(crate) fn desc_block(&self, g: u64) -> u64 {
        let dpb = self.descs_per_block();
        let mg = g / dpb;
        if self.incompat & INCOMPAT_META_BG != 0 && mg >= self.first_meta_bg {
            let first = mg * dpb;
            let mut at = self.group_first_block(first) + u64::from(self.has_super(first));
            if first == 0 && self.first_data_block == 0 && self.block_size == 1024 {
                at += 1;
            }
            at
        } else {
            self.sb_block() + 1 + mg
        }
    }
}

/// ext2, ext3 or ext4, from the raw superblock's feature flags (as blkid names them).
pub(crate) fn raw_fstype(sb: &[u8]) -> &'static str {
    let ext4_incompat = INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG | INCOMPAT_META_BG;
    let ext4_ro =
        RO_HUGE_FILE | RO_GDT_CSUM | RO_DIR_NLINK | RO_EXTRA_ISIZE | RO_BIGALLOC | RO_METADATA_CSUM;
    if le32(sb, 96) & ext4_incompat != 0 || le32(sb, 100) & ext4_ro != 0 {
        "ext4"
    } else if le32(sb, 92) & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    }
}

pub(crate) fn parse_sb(sb: &[u8], part_len: u64, at: u64) -> Result<Sb> {
    let name = raw_fstype(sb);
    let what = |m: &str| anyhow::anyhow!("{name} at offset {at}: {m}");
    let log = le32(sb, 24);
    if log > 6 {
        return Err(what("block size out of range (superblock damaged)"));
    }
    let block_size = 1024u64 << log;
    let compat = le32(sb, 92);
    let incompat = le32(sb, 96);
    let ro = le32(sb, 100);
    let log_cluster = le32(sb, 28);
    let cluster_ratio = if ro & RO_BIGALLOC != 0 {
        if log_cluster < log || log_cluster - log > 16 {
            return Err(what("bad cluster size"));
        }
        1u64 << (log_cluster - log)
    } else {
        1
    };
    let mut blocks_count = u64::from(le32(sb, 4));
    if incompat & INCOMPAT_64BIT != 0 {
        blocks_count |= u64::from(le32(sb, 0x150)) << 32;
    }
    let first_data_block = u64::from(le32(sb, 20));
    let blocks_per_group = u64::from(le32(sb, 32));
    let clusters_per_group = u64::from(le32(sb, 36));
    let inodes_per_group = u64::from(le32(sb, 40));
    let inode_size = if le32(sb, 76) == 0 {
        128
    } else {
        u64::from(le16(sb, 88))
    };
    let desc_size = if incompat & INCOMPAT_64BIT != 0 {
        u64::from(le16(sb, 254))
    } else {
        32
    };
    if blocks_count == 0 || blocks_per_group == 0 || inodes_per_group == 0 {
        return Err(what("zero block or inode counts (superblock damaged)"));
    }
    if ro & RO_BIGALLOC != 0 && clusters_per_group * cluster_ratio != blocks_per_group {
        return Err(what("inconsistent bigalloc cluster counts"));
    }
    // mke2fs's own lower bound: a damaged superblock's group count stays within its size.
    if blocks_per_group < 256 {
        return Err(what("fewer than 256 blocks per group (superblock damaged)"));
    }
    if blocks_per_group / cluster_ratio > block_size * 8 {
        return Err(what("more blocks per group than a bitmap block holds"));
    }
    if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() {
        return Err(what("bad group descriptor size"));
    }
    if !(128..=block_size).contains(&inode_size) {
        return Err(what("bad inode size"));
    }
    if first_data_block >= blocks_count {
        return Err(what("first data block beyond the end"));
    }
    let fs_bytes = blocks_count
        .checked_mul(block_size)
        .ok_or_else(|| what("block count overflows"))?;
    if fs_bytes > part_len {
        bail!(
            "{name} at offset {at}: the filesystem is {fs_bytes} bytes, larger than its partition ({part_len} bytes): the partition table or filesystem is damaged"
        );
    }
    let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
    Ok(Sb {
        block_size,
        cluster_ratio,
        blocks_count,
        first_data_block,
        blocks_per_group,
        inodes_per_group,
        inode_size,
        desc_size,
        groups,
        reserved_gdt: u64::from(le16(sb, 206)),
        first_meta_bg: u64::from(le32(sb, 260)),
        backup_bgs: [u64::from(le32(sb, 0x24c)), u64::from(le32(sb, 0x250))],
        compat,
        incompat,
        ro,
        uuid: sb
            .get(104..120)
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; 16]),
        csum_seed: le32(sb, 0x270),
    })
}

pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64, sb: &[u8]) -> Result<Option<FsInfo>> {
    if sb.len() < 1024 || le16(sb, 56) != 0xef53 {
        return Ok(None);
    }
    let s = parse_sb(sb, len, offset)?;
    let name = raw_fstype(sb);
    if s.incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return Ok(None); // an external journal device: no bitmaps, store it whole
    }
    if s.incompat & INCOMPAT_RECOVER != 0 {
        bail!(
            "{name} at offset {offset}: unrecovered journal (mounted, or the system crashed): run e2fsck -fy on it or back up from the rescue system"
        );
    }
    // Without a journal a mounted or crashed filesystem's bitmaps may be stale.
    let state = le16(sb, 58);
    if state & 1 == 0 || state & 2 != 0 {
        bail!(
            "{name} at offset {offset}: not marked clean (mounted, crashed or with errors): run e2fsck -f on it or back up from the rescue system"
        );
    }
    let bs = s.block_size;
    let cluster = bs * s.cluster_ratio;
    let fs_end = s.blocks_count * bs;
    let mut used = UsedMap::new(cluster, len);
    // Boot block, superblock and the primary descriptor table with its reserved growth blocks.
    used.mark_range(
        0,
        (s.first_data_block + 1 + s.gdt_blocks() + s.reserved_gdt) * bs,
    );
    let csum = s.ro & (RO_GDT_CSUM | RO_METADATA_CSUM) != 0;
    let bits_per_group = s.blocks_per_group / s.cluster_ratio;
    let itable_blocks = (s.inodes_per_group * s.inode_size).div_ceil(bs);
    let dpb = s.descs_per_block();
    let mut desc_buf = vec![0u8; bs as usize];
    let mut desc_block_loaded = u64::MAX;
    let mut bitmap = vec![0u8; bs as usize];
    let mut warnings = Vec::new();
    let read = |buf: &mut [u8], block: u64, what: &str| -> Result<()> {
        if block >= s.blocks_count {
            bail!(
                "{name} at offset {offset}: {what} at block {block} lies outside the filesystem (damaged)"
            );
        }
        dev.read_at(buf, offset + block * bs)
            .with_context(|| format!("{name} at offset {offset}: cannot read the {what}"))
    };
    for g in 0..s.groups {
        let db = s.desc_block(g);
        if db != desc_block_loaded {
            read(&mut desc_buf, db, "group descriptor table")?;
            used.mark_range(db * bs, bs);
            desc_block_loaded = db;
        }
        let d = &desc_buf[((g % dpb) * s.desc_size) as usize..][..s.desc_size as usize];
        let wide = s.desc_size >= 64;
        let hi = |o: usize| if wide { u64::from(le32(d, o)) << 32 } else { 0 };
        let block_bitmap = u64::from(le32(d, 0)) | hi(0x20);
        let inode_bitmap = u64::from(le32(d, 4)) | hi(0x24);
        let inode_table = u64::from(le32(d, 8)) | hi(0x28);
        let flags = le16(d, 18);
        for (blk, n, what) in [
            (block_bitmap, 1, "block bitmap"),
            (inode_bitmap, 1, "inode bitmap"),
            (inode_table, itable_blocks, "inode table"),
        ] {
            if blk == 0 || blk.checked_add(n).is_none_or(|e| e > s.blocks_count) {
                bail!(
                    "{name} at offset {offset}: group descriptor {g} points {what} outside the filesystem (damaged): run e2fsck"
                );
            }
            used.mark_range(blk * bs, n * bs);
        }
        let gstart = s.group_first_block(g) * bs;
        let nbits = bits_per_group.min((fs_end - gstart.min(fs_end)).div_ceil(cluster));
        let uninit = csum && flags & BG_BLOCK_UNINIT != 0;
        if uninit {
            // No bitmap on disk: the group holds only its own metadata, as the kernel
            // computes it when it first allocates there.
            uninit_bitmap(
                &s,
                g,
                [block_bitmap, inode_bitmap],
                inode_table,
                &mut bitmap,
            );
        } else {
            read(&mut bitmap, block_bitmap, "block bitmap")?;
        }
        if let Some(why) = group_doubt(&s, d, uninit, nbits, &bitmap) {
            // The descriptor and the bitmap disagree although the filesystem is marked clean:
            // keeping the whole group costs some space, trusting the wrong one loses data.
            warnings.push(format!(
                "{name} at offset {offset}: block group {g}: {why}; all its blocks are stored (run e2fsck -f to repair it)"
            ));
            used.mark_range(gstart, nbits * cluster);
            continue;
        }
        let mut i = 0;
        while i < nbits {
            let byte = bitmap[(i / 8) as usize];
            if i % 8 == 0 && (byte == 0 || byte == 0xff) && i + 8 <= nbits {
                if byte == 0xff {
                    used.mark_range(gstart + i * cluster, 8 * cluster);
                }
                i += 8;
                continue;
            }
            if byte & (1 << (i % 8)) != 0 {
                used.mark_range(gstart + i * cluster, cluster);
            }
            i += 1;
        }
    }
    // Backup superblocks and descriptor tables of initialised groups are in their bitmaps.
    used.coarsen_to(32 << 20);
    let label_raw = &sb[120..136];
    let label = String::from_utf8_lossy(label_raw.split(|&b| b == 0).next().unwrap_or(&[]))
        .trim()
        .to_string();
    Ok(Some(FsInfo {
        fstype: name.to_string(),
        variant: None,
        uuid: Some(super::uuid_text(&sb[104..120])),
        label: (!label.is_empty()).then_some(label),
        block_size: cluster,
        used,
        warnings,
    }))
}

/// The bitmap of a BLOCK_UNINIT group, as ext4_init_block_bitmap makes it: the superblock
/// and descriptor backups, and the group's own bitmaps and inode table where they lie in it.
fn uninit_bitmap(s: &Sb, g: u64, bitmaps: [u64; 2], inode_table: u64, bitmap: &mut [u8]) {
    bitmap.fill(0);
    let first = s.group_first_block(g);
    let end = first + s.blocks_per_group;
    let mut set = |blk: u64, n: u64| {
        for b in blk.max(first)..blk.saturating_add(n).min(end) {
            let bit = (b - first) / s.cluster_ratio;
            bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    };
    let sup = u64::from(s.has_super(g));
    let dpb = s.descs_per_block();
    if s.incompat & INCOMPAT_META_BG == 0 || g < s.first_meta_bg * dpb {
        if sup == 1 {
            set(first, 1 + s.gdt_blocks() + s.reserved_gdt);
        }
    } else {
        set(first, sup);
        let mg_first = g - g % dpb;
        if g == mg_first || g == mg_first + 1 || g == mg_first + dpb - 1 {
            set(first + sup, 1);
        }
    }
    for b in bitmaps {
        set(b, 1);
    }
    set(
        inode_table,
        (s.inodes_per_group * s.inode_size).div_ceil(s.block_size),
    );
}

/// Why a group's bitmap cannot be trusted, if it cannot: the descriptor's free count differs
/// from the bitmap's, or (metadata_csum) the bitmap's checksum is wrong.
fn group_doubt(s: &Sb, d: &[u8], uninit: bool, nbits: u64, bitmap: &[u8]) -> Option<String> {
    let wide = s.desc_size >= 64;
    let hi16 = |o: usize| if wide { u32::from(le16(d, o)) << 16 } else { 0 };
    let free_desc = u64::from(u32::from(le16(d, 0x0C)) | hi16(0x2C));
    let whole = (nbits / 8) as usize;
    let tail = bitmap
        .get(whole)
        .map_or(0, |b| b & ((1u16 << (nbits % 8)) - 1) as u8);
    let used_bits: u64 = bitmap[..whole]
        .iter()
        .map(|b| u64::from(b.count_ones()))
        .sum::<u64>()
        + u64::from(tail.count_ones());
    let free_bits = nbits - used_bits;
    if free_desc != free_bits {
        let unit = if s.cluster_ratio > 1 {
            "clusters"
        } else {
            "blocks"
        };
        let bitmap = if uninit {
            "marked BLOCK_UNINIT, whose metadata leaves"
        } else {
            "its block bitmap has"
        };
        return Some(format!(
            "its descriptor counts {free_desc} free {unit}, {bitmap} {free_bits}"
        ));
    }
    if !uninit && s.ro & RO_METADATA_CSUM != 0 {
        let size = (s.blocks_per_group / s.cluster_ratio / 8) as usize;
        // ext4's crc32c runs without the final inversion, from the filesystem's seed.
        let raw = |seed: u32, data: &[u8]| !crc32c::crc32c_append(!seed, data);
        let seed = if s.incompat & INCOMPAT_CSUM_SEED != 0 {
            s.csum_seed
        } else {
            raw(!0, &s.uuid)
        };
        let c = raw(seed, &bitmap[..size.min(bitmap.len())]);
        let stored = u32::from(le16(d, 0x18)) | hi16(0x38);
        let want = if wide { c } else { c & 0xffff };
        if stored != want {
            return Some(format!(
                "its block bitmap's checksum is {stored:#x}, its content gives {want:#x}"
            ));
        }
    }
    None
}
