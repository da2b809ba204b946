//! btrfs allocation maps, read from the filesystem's own trees: the chunk tree says where each
//! logical range lives on the device (one copy per stripe; DUP keeps two on the same device),
//! the extent tree says which logical ranges hold data or tree blocks. A used range is marked
//! on every stripe of its chunk: dropping the second DUP copy leaves a filesystem that fails
//! `btrfs scrub`. Single-device filesystems only.

use crate::fs::read::ReadAt;
use std::collections::HashSet;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest as _, Sha256};

use super::{FsInfo, UsedMap, le16, le32, le64, uuid_text};

/// The primary superblock's offset; `MAGIC` sits 0x40 into it.
pub(crate) const SB_OFFSET: u64 = 0x10000;
pub(crate) const MAGIC: &[u8; 8] = b"_BHRfS_M";
pub(crate) const SB_SIZE: usize = 4096;
/// Superblock copies at 64 KiB, 64 MiB and 256 GiB, where the device is large enough.
const SB_MIRRORS: [u64; 3] = [0x1_0000, 0x400_0000, 0x40_0000_0000];
/// btrfs leaves the first MiB to boot loaders and partitioning tools.
const RESERVED: u64 = 1 << 20;
const SYS_ARRAY_MAX: usize = 2048;

pub(crate) const HEADER: usize = 101;
pub(crate) const ITEM: usize = 25;
const KEY_PTR: usize = 33;
pub(crate) const KEY: usize = 17;
pub(crate) const MAX_LEVEL: u8 = 7;

pub(crate) const ROOT_TREE: u64 = 1;
const EXTENT_TREE: u64 = 2;
pub(crate) const CHUNK_TREE: u64 = 3;
const BLOCK_GROUP_TREE: u64 = 11;

pub(crate) const ROOT_ITEM: u8 = 132;
const EXTENT_ITEM: u8 = 168;
const METADATA_ITEM: u8 = 169;
const BLOCK_GROUP_ITEM: u8 = 192;
const DEV_ITEM: u8 = 216;
const CHUNK_ITEM: u8 = 228;

pub(crate) const BG_DATA: u64 = 1 << 0;
const BG_SYSTEM: u64 = 1 << 1;
const BG_METADATA: u64 = 1 << 2;
const BG_RAID0: u64 = 1 << 3;
const BG_RAID1: u64 = 1 << 4;
const BG_DUP: u64 = 1 << 5;
const BG_RAID10: u64 = 1 << 6;
const BG_RAID5: u64 = 1 << 7;
const BG_RAID6: u64 = 1 << 8;
const BG_RAID1C3: u64 = 1 << 9;
const BG_RAID1C4: u64 = 1 << 10;
const BG_KINDS: u64 = BG_DATA | BG_SYSTEM | BG_METADATA;
const BG_PROFILES: u64 =
    BG_RAID0 | BG_RAID1 | BG_DUP | BG_RAID10 | BG_RAID5 | BG_RAID6 | BG_RAID1C3 | BG_RAID1C4;

const RO_FREE_SPACE_TREE: u64 = 1 << 0;
const RO_FREE_SPACE_TREE_VALID: u64 = 1 << 1;
const RO_VERITY: u64 = 1 << 2;
const RO_BLOCK_GROUP_TREE: u64 = 1 << 3;
/// compat_ro features bmr knows do not move allocations out of the extent tree. An unknown
/// one might (ro-compatible only promises that an old kernel can read files).
const RO_KNOWN: u64 =
    RO_FREE_SPACE_TREE | RO_FREE_SPACE_TREE_VALID | RO_VERITY | RO_BLOCK_GROUP_TREE;

const INCOMPAT_METADATA_UUID: u64 = 1 << 10;
/// Features that change nothing the map reads: backref and inode-ref formats, compression,
/// holes, mixed block groups, RAID1C34 profile names, simple quotas.
const INCOMPAT_HARMLESS: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 9)
    | INCOMPAT_METADATA_UUID
    | (1 << 11)
    | (1 << 16);
/// Known, but they change where allocations are recorded or where superblocks live.
const INCOMPAT_UNSUPPORTED: [(u64, &str); 3] = [
    (1 << 12, "zoned"),
    (1 << 13, "extent-tree-v2"),
    (1 << 14, "raid-stripe-tree"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) objectid: u64,
    pub(crate) kind: u8,
    pub(crate) offset: u64,
}

impl Key {
    pub(crate) fn at(b: &[u8], o: usize) -> Key {
        Key {
            objectid: le64(b, o),
            kind: b.get(o + 8).copied().unwrap_or(0),
            offset: le64(b, o + 9),
        }
    }
}

/// One chunk: a logical range and the physical offset of each of its full copies on this
/// device.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Chunk {
    pub(crate) logical: u64,
    pub(crate) length: u64,
    pub(crate) kind: u64,
    pub(crate) stripes: Vec<u64>,
}

/// Logical → physical, sorted by logical address, without overlaps.
#[derive(Default)]
pub(crate) struct ChunkMap(Vec<Chunk>);

impl ChunkMap {
    fn insert(&mut self, c: Chunk) -> Result<()> {
        let i = self.0.partition_point(|x| x.logical < c.logical);
        if let Some(x) = self.0.get(i)
            && x.logical == c.logical
        {
            if *x != c {
                bail!("two different chunks at logical {} (damaged)", c.logical);
            }
            return Ok(());
        }
        let overlaps_prev = i > 0 && self.0[i - 1].logical + self.0[i - 1].length > c.logical;
        let overlaps_next = self
            .0
            .get(i)
            .is_some_and(|x| c.logical + c.length > x.logical);
        if overlaps_prev || overlaps_next {
            bail!("chunks overlap at logical {} (damaged)", c.logical);
        }
        self.0.insert(i, c);
        Ok(())
    }

    /// The chunk holding all of [logical, logical+len).
    pub(crate) fn find(&self, logical: u64, len: u64) -> Option<(usize, &Chunk)> {
        let i = self
            .0
            .partition_point(|x| x.logical <= logical)
            .checked_sub(1)?;
        let c = &self.0[i];
        let end = logical.checked_add(len)?;
        (end <= c.logical + c.length).then_some((i, c))
    }
}

pub(crate) struct Super {
    pub(crate) fsid: [u8; 16],
    /// What tree block headers carry: the fsid, or metadata_uuid once the fsid was changed.
    pub(crate) header_fsid: [u8; 16],
    pub(crate) generation: u64,
    pub(crate) root: u64,
    pub(crate) root_level: u8,
    pub(crate) chunk_root: u64,
    pub(crate) chunk_root_level: u8,
    pub(crate) chunk_root_generation: u64,
    pub(crate) sectorsize: u64,
    pub(crate) nodesize: u64,
    pub(crate) csum_type: u16,
    pub(crate) compat_ro: u64,
    pub(crate) devid: u64,
    pub(crate) dev_bytes: u64,
    pub(crate) label: String,
}

fn bytes16(b: &[u8], o: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Some(s) = b.get(o..o + 16) {
        out.copy_from_slice(s);
    }
    out
}

/// Whether the checksum in the first 32 bytes of `block` matches the rest. None: a type bmr
/// cannot compute (BLAKE2b); the structural checks still apply.
fn csum_ok(csum_type: u16, block: &[u8]) -> Option<bool> {
    let (stored, data) = block.split_at(32);
    match csum_type {
        0 => Some(stored[..4] == crc32c::crc32c(data).to_le_bytes()),
        1 => Some(stored[..8] == xxhash_rust::xxh64::xxh64(data, 0).to_le_bytes()),
        2 => Some(stored == Sha256::digest(data).as_slice()),
        _ => None,
    }
}

pub(crate) fn parse_super(sb: &[u8], part_len: u64) -> Result<Super> {
    let csum_type = le16(sb, 0xc4);
    if csum_type > 3 {
        bail!("unknown checksum type {csum_type} (a newer btrfs, or damaged)");
    }
    if csum_ok(csum_type, sb) == Some(false) {
        bail!("superblock checksum mismatch (damaged): run btrfs check on it");
    }
    if le64(sb, 0x30) != SB_OFFSET {
        bail!("the superblock names a wrong own offset (damaged)");
    }
    let num_devices = le64(sb, 0x88);
    if num_devices != 1 {
        bail!("the filesystem spans {num_devices} devices: bmr maps single-device btrfs only");
    }
    if le64(sb, 0x60) != 0 {
        bail!(
            "not cleanly unmounted (it has a log tree: mounted, crashed or fsync'd data pending): mount and unmount it, then back up again"
        );
    }
    let sectorsize = u64::from(le32(sb, 0x90));
    let nodesize = u64::from(le32(sb, 0x94));
    if !sectorsize.is_power_of_two() || !(512..=65536).contains(&sectorsize) {
        bail!("sector size {sectorsize} out of range (superblock damaged)");
    }
    if !nodesize.is_power_of_two() || !(4096..=65536).contains(&nodesize) || nodesize < sectorsize {
        bail!("node size {nodesize} out of range (superblock damaged)");
    }
    let incompat = le64(sb, 0xbc);
    for (bit, name) in INCOMPAT_UNSUPPORTED {
        if incompat & bit != 0 {
            bail!("uses the {name} feature, which bmr does not map");
        }
    }
    let unknown = incompat & !INCOMPAT_HARMLESS;
    if unknown != 0 {
        bail!("unknown incompatible features {unknown:#x} (a newer btrfs)");
    }
    let compat_ro = le64(sb, 0xb4);
    let unknown = compat_ro & !RO_KNOWN;
    if unknown != 0 {
        bail!("unknown read-only-compatible features {unknown:#x} (a newer btrfs)");
    }
    let sys_len = le32(sb, 0xa0) as usize;
    if sys_len > SYS_ARRAY_MAX {
        bail!("system chunk array of {sys_len} bytes, more than 2048 (superblock damaged)");
    }
    // dev_item starts at 0xc9: devid, total_bytes, ...
    let dev_bytes = le64(sb, 0xc9 + 8);
    if dev_bytes > part_len {
        bail!(
            "the filesystem is {dev_bytes} bytes, larger than its partition ({part_len} bytes): the partition table or filesystem is damaged"
        );
    }
    let fsid = bytes16(sb, 0x20);
    let header_fsid = if incompat & INCOMPAT_METADATA_UUID != 0 {
        bytes16(sb, 0x23b)
    } else {
        fsid
    };
    let root_level = sb[0xc6];
    let chunk_root_level = sb[0xc7];
    if root_level > MAX_LEVEL || chunk_root_level > MAX_LEVEL {
        bail!("tree root level above {MAX_LEVEL} (superblock damaged)");
    }
    let label_raw = &sb[0x12b..0x12b + 256];
    let label =
        String::from_utf8_lossy(label_raw.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
    Ok(Super {
        fsid,
        header_fsid,
        generation: le64(sb, 0x48),
        root: le64(sb, 0x50),
        root_level,
        chunk_root: le64(sb, 0x58),
        chunk_root_level,
        chunk_root_generation: le64(sb, 0xa4),
        sectorsize,
        nodesize,
        csum_type,
        compat_ro,
        devid: le64(sb, 0xc9),
        dev_bytes,
        label,
    })
}

/// A chunk item (struct btrfs_chunk) of `avail` bytes at `b[o..]`, keyed at `logical`; returns
/// it with its byte size.
fn parse_chunk(
    s: &Super,
    b: &[u8],
    o: usize,
    avail: usize,
    logical: u64,
) -> Result<(Chunk, usize)> {
    let what = || format!("chunk at logical {logical}");
    if avail < 48 + 32 {
        bail!("{}: item too short (damaged)", what());
    }
    let length = le64(b, o);
    let kind = le64(b, o + 24);
    let num_stripes = usize::from(le16(b, o + 44));
    let size = 48 + num_stripes * 32;
    if num_stripes == 0 || size > avail {
        bail!(
            "{}: {num_stripes} stripes do not fit its item (damaged)",
            what()
        );
    }
    if length == 0
        || !length.is_multiple_of(s.sectorsize)
        || !logical.is_multiple_of(s.sectorsize)
        || logical.checked_add(length).is_none()
    {
        bail!("{}: bad length {length} (damaged)", what());
    }
    if kind & !(BG_KINDS | BG_PROFILES) != 0 || kind & BG_KINDS == 0 {
        bail!("{}: unknown chunk type {kind:#x}", what());
    }
    let copies = match kind & BG_PROFILES {
        0 => 1,
        BG_DUP | BG_RAID1 => 2,
        BG_RAID1C3 => 3,
        BG_RAID1C4 => 4,
        p => bail!(
            "{}: striped profile {p:#x} (RAID0/10/5/6), which bmr does not map",
            what()
        ),
    };
    if num_stripes != copies {
        bail!(
            "{}: {num_stripes} stripes where its profile keeps {copies} copies (damaged)",
            what()
        );
    }
    let mut stripes = Vec::with_capacity(num_stripes);
    for i in 0..num_stripes {
        let so = o + 48 + i * 32;
        let devid = le64(b, so);
        let phys = le64(b, so + 8);
        if devid != s.devid {
            bail!(
                "{}: a copy on device {devid}, not this one (device {}): multi-device btrfs is not mapped",
                what(),
                s.devid
            );
        }
        if phys.checked_add(length).is_none_or(|e| e > s.dev_bytes) {
            bail!(
                "{}: a copy at {phys} lies beyond the end of the device (damaged)",
                what()
            );
        }
        stripes.push(phys);
    }
    Ok((
        Chunk {
            logical,
            length,
            kind,
            stripes,
        },
        size,
    ))
}

/// The bootstrap chunks in the superblock: enough to find the chunk tree.
fn sys_chunks(s: &Super, sb: &[u8]) -> Result<ChunkMap> {
    let len = le32(sb, 0xa0) as usize;
    let arr = &sb[0x32b..0x32b + len];
    let mut map = ChunkMap::default();
    let mut o = 0;
    while o < len {
        if len - o < KEY {
            bail!("system chunk array ends inside a key (superblock damaged)");
        }
        let k = Key::at(arr, o);
        if k.kind != CHUNK_ITEM {
            bail!(
                "system chunk array holds an item of type {} (superblock damaged)",
                k.kind
            );
        }
        o += KEY;
        let (c, size) = parse_chunk(s, arr, o, len - o, k.offset)?;
        if c.kind & BG_SYSTEM == 0 {
            bail!(
                "system chunk array holds a non-system chunk at logical {} (superblock damaged)",
                c.logical
            );
        }
        map.insert(c)?;
        o += size;
    }
    if map.0.is_empty() {
        bail!("no system chunks in the superblock (damaged)");
    }
    Ok(map)
}

/// Where a tree's root is and what its root block must say about itself.
#[derive(Clone, Copy)]
pub(crate) struct Root {
    pub(crate) owner: u64,
    pub(crate) bytenr: u64,
    pub(crate) level: u8,
    pub(crate) generation: u64,
}

/// Positional reads of the device, relative to the start of the filesystem.
pub(crate) type ReadFn<'a> = &'a dyn Fn(&mut [u8], u64) -> std::io::Result<()>;

pub(crate) struct Reader<'a> {
    pub(crate) dev: ReadFn<'a>,
    pub(crate) s: &'a Super,
    /// Every tree block read, to refuse a second visit (a loop or shared block in a tree that
    /// never shares) and to mark them all. The file reader clears it between subvolume trees
    /// (snapshots share blocks).
    pub(crate) visited: HashSet<u64>,
    pub(crate) max_nodes: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(dev: ReadFn<'a>, s: &'a Super) -> Reader<'a> {
        Reader {
            dev,
            s,
            visited: HashSet::new(),
            // A sound filesystem's tree blocks do not overlap: at most this many fit the device.
            max_nodes: (s.dev_bytes / s.nodesize) as usize + 1,
        }
    }

    /// One tree block, from the first copy that passes every check.
    fn node(
        &self,
        map: &ChunkMap,
        logical: u64,
        level: u8,
        owner: u64,
        generation: u64,
        first_key: Option<Key>,
    ) -> Result<Vec<u8>> {
        let ns = self.s.nodesize;
        if !logical.is_multiple_of(self.s.sectorsize) {
            bail!("tree block at logical {logical} is not sector-aligned (damaged)");
        }
        let Some((_, c)) = map.find(logical, ns) else {
            bail!("tree block at logical {logical} lies in no chunk (damaged)");
        };
        if c.kind & (BG_METADATA | BG_SYSTEM) == 0 {
            bail!("tree block at logical {logical} lies in a data chunk (damaged)");
        }
        let mut first_err = None;
        for &phys in &c.stripes {
            let mut buf = vec![0u8; ns as usize];
            let at = phys + (logical - c.logical);
            let checked = (self.dev)(&mut buf, at)
                .with_context(|| format!("cannot read the tree block at logical {logical}"))
                .and_then(|()| self.check_node(&buf, logical, level, owner, generation, first_key));
            match checked {
                Ok(()) => return Ok(buf),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| anyhow!("tree block at logical {logical}: no copies")))
    }

    fn check_node(
        &self,
        b: &[u8],
        logical: u64,
        level: u8,
        owner: u64,
        generation: u64,
        first_key: Option<Key>,
    ) -> Result<()> {
        let bad = |m: String| anyhow!("tree block at logical {logical}: {m} (damaged)");
        if csum_ok(self.s.csum_type, b) == Some(false) {
            return Err(bad("checksum mismatch".into()));
        }
        if bytes16(b, 0x20) != self.s.header_fsid {
            return Err(bad("belongs to another filesystem".into()));
        }
        if le64(b, 0x30) != logical {
            return Err(bad(format!("says it is at {}", le64(b, 0x30))));
        }
        let got_level = b[0x64];
        if got_level != level {
            return Err(bad(format!("level {got_level} where {level} was expected")));
        }
        let got_owner = le64(b, 0x58);
        // Subvolume trees share blocks with their snapshots: a block keeps the owner that
        // wrote it, which may be any subvolume.
        if got_owner != owner && !(is_fs_tree(owner) && is_fs_tree(got_owner)) {
            return Err(bad(format!("owned by tree {got_owner}, not tree {owner}")));
        }
        let got_gen = le64(b, 0x50);
        if got_gen != generation || got_gen > self.s.generation {
            return Err(bad(format!(
                "generation {got_gen} where {generation} was expected"
            )));
        }
        let n = le32(b, 0x60) as usize;
        let room = b.len() - HEADER;
        let entry = if level == 0 { ITEM } else { KEY_PTR };
        if n > room / entry || (level > 0 && n == 0) {
            return Err(bad(format!("{n} items do not fit")));
        }
        let mut prev: Option<Key> = None;
        for i in 0..n {
            let e = HEADER + i * entry;
            let k = Key::at(b, e);
            if i == 0
                && let Some(fk) = first_key
                && k != fk
            {
                return Err(bad("first key differs from its parent's".into()));
            }
            if prev.is_some_and(|p| p >= k) {
                return Err(bad(format!("keys out of order at item {i}")));
            }
            prev = Some(k);
            if level == 0 {
                let off = le32(b, e + KEY) as usize;
                let size = le32(b, e + KEY + 4) as usize;
                if off < n * ITEM || off.checked_add(size).is_none_or(|end| end > room) {
                    return Err(bad(format!("item {i} lies outside the block")));
                }
            } else if le64(b, e + KEY) == 0 {
                return Err(bad(format!("pointer {i} is zero")));
            }
        }
        Ok(())
    }

    /// Every leaf item of the tree at `root`, in key order.
    fn walk(
        &mut self,
        map: &ChunkMap,
        root: Root,
        name: &str,
        f: &mut dyn FnMut(Key, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.walk_tolerant(map, root, name, f, None)
    }

    /// Like `walk`; with `skipped`, a tree block that cannot be read or fails a check (and the
    /// subtree below it) is left out and described there instead of ending the walk.
    pub(crate) fn walk_tolerant(
        &mut self,
        map: &ChunkMap,
        root: Root,
        name: &str,
        f: &mut dyn FnMut(Key, &[u8]) -> Result<()>,
        mut skipped: Option<&mut Vec<String>>,
    ) -> Result<()> {
        if root.level > MAX_LEVEL {
            bail!("the {name} root has level {} (damaged)", root.level);
        }
        // (logical, level, generation, first key): children pushed in reverse so leaves come
        // out in key order. Depth is at most 8 levels, so the stack stays small.
        let mut stack = vec![(root.bytenr, root.level, root.generation, None)];
        while let Some((logical, level, generation, first_key)) = stack.pop() {
            if !self.visited.insert(logical) {
                let msg = format!(
                    "tree block at logical {logical} is reached twice in the {name} (a loop: damaged)"
                );
                match skipped.as_deref_mut() {
                    Some(v) => {
                        v.push(msg);
                        continue;
                    }
                    None => bail!(msg),
                }
            }
            if self.visited.len() > self.max_nodes {
                bail!("more tree blocks than the filesystem can hold (damaged)");
            }
            let b = match self
                .node(map, logical, level, root.owner, generation, first_key)
                .with_context(|| format!("in the {name}"))
            {
                Ok(b) => b,
                Err(e) => match skipped.as_deref_mut() {
                    Some(v) => {
                        v.push(format!("{e:#}"));
                        continue;
                    }
                    None => return Err(e),
                },
            };
            let n = le32(&b, 0x60) as usize;
            if level == 0 {
                for i in 0..n {
                    let e = HEADER + i * ITEM;
                    let off = HEADER + le32(&b, e + KEY) as usize;
                    let size = le32(&b, e + KEY + 4) as usize;
                    f(Key::at(&b, e), &b[off..off + size])?;
                }
            } else {
                for i in (0..n).rev() {
                    let e = HEADER + i * KEY_PTR;
                    stack.push((
                        le64(&b, e + KEY),
                        level - 1,
                        le64(&b, e + KEY + 8),
                        Some(Key::at(&b, e)),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The top-level subvolume (5) or a subvolume or snapshot (256 to 2^64 - 256).
pub(crate) fn is_fs_tree(id: u64) -> bool {
    id == 5 || (256..=u64::MAX - 255).contains(&id)
}

/// A ROOT_ITEM's root block: bytenr at 176, level at 238 (after the embedded inode item).
pub(crate) fn root_from_item(owner: u64, d: &[u8], name: &str) -> Result<Root> {
    if d.len() < 239 {
        bail!("the {name} root item is too short (damaged)");
    }
    Ok(Root {
        owner,
        bytenr: le64(d, 176),
        level: d[238],
        generation: le64(d, 160),
    })
}

/// The chunk map: the bootstrap chunks in the superblock, then the chunk tree (which must
/// list exactly one device and agree with the bootstrap copies).
pub(crate) fn load_chunks(r: &mut Reader, s: &Super, sb: &[u8]) -> Result<ChunkMap> {
    let sys = sys_chunks(s, sb)?;
    let mut chunks = ChunkMap::default();
    let mut devices = 0u64;
    let chunk_root = Root {
        owner: CHUNK_TREE,
        bytenr: s.chunk_root,
        level: s.chunk_root_level,
        generation: s.chunk_root_generation,
    };
    r.walk(&sys, chunk_root, "chunk tree", &mut |k, d| {
        match k.kind {
            CHUNK_ITEM => {
                let (c, size) = parse_chunk(s, d, 0, d.len(), k.offset)?;
                if size != d.len() {
                    bail!(
                        "chunk at logical {}: item size mismatch (damaged)",
                        k.offset
                    );
                }
                chunks.insert(c)?;
            }
            DEV_ITEM => devices += 1,
            _ => {}
        }
        Ok(())
    })?;
    if devices != 1 {
        bail!("the chunk tree lists {devices} devices: bmr maps single-device btrfs only");
    }
    // The bootstrap copies must agree with the tree (insert refuses a different chunk).
    for c in sys.0 {
        chunks.insert(c)?;
    }

    Ok(chunks)
}

pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Result<Option<FsInfo>> {
    if len < SB_OFFSET + SB_SIZE as u64 {
        return Ok(None);
    }
    let mut sb = vec![0u8; SB_SIZE];
    dev.read_at(&mut sb, offset + SB_OFFSET)
        .with_context(|| format!("cannot read the partition at offset {offset}"))?;
    if &sb[0x40..0x48] != MAGIC {
        return Ok(None);
    }
    map(dev, offset, len, &sb)
        .map(Some)
        .with_context(|| format!("btrfs at offset {offset}"))
}

fn map(dev: &dyn ReadAt, offset: u64, len: u64, sb: &[u8]) -> Result<FsInfo> {
    let s = parse_super(sb, len)?;
    let read = |buf: &mut [u8], at: u64| dev.read_at(buf, offset + at);
    let mut r = Reader::new(&read, &s);

    let chunks = load_chunks(&mut r, &s, sb)?;

    let mut extent_root = None;
    let mut bg_root = None;
    let tree_root = Root {
        owner: ROOT_TREE,
        bytenr: s.root,
        level: s.root_level,
        generation: s.generation,
    };
    r.walk(&chunks, tree_root, "root tree", &mut |k, d| {
        if k.kind == ROOT_ITEM && k.offset == 0 {
            match k.objectid {
                EXTENT_TREE => extent_root = Some(root_from_item(EXTENT_TREE, d, "extent tree")?),
                BLOCK_GROUP_TREE => {
                    bg_root = Some(root_from_item(BLOCK_GROUP_TREE, d, "block group tree")?);
                }
                _ => {}
            }
        }
        Ok(())
    })?;
    let extent_root = extent_root.ok_or_else(|| anyhow!("no extent tree (damaged)"))?;
    if s.compat_ro & RO_BLOCK_GROUP_TREE != 0 && bg_root.is_none() {
        bail!("the block group tree is missing (damaged)");
    }

    let mut used = UsedMap::new(s.sectorsize, len);
    used.mark_range(0, RESERVED);
    for m in SB_MIRRORS {
        used.mark_range(m, SB_SIZE as u64);
    }
    // Bytes the extent tree accounts to each chunk, against what its block group says.
    let mut accounted = vec![0u64; chunks.0.len()];
    let mut groups: Vec<(u64, u64, u64)> = Vec::new();
    let nodesize = s.nodesize;
    let mut on_bg = |k: Key, d: &[u8]| -> Result<()> {
        if d.len() < 24 {
            bail!(
                "block group at logical {}: item too short (damaged)",
                k.objectid
            );
        }
        groups.push((k.objectid, k.offset, le64(d, 0)));
        Ok(())
    };
    {
        let (chunks, used, accounted) = (&chunks, &mut used, &mut accounted);
        let mut mark = |logical: u64, n: u64| -> Result<()> {
            let Some((i, c)) = chunks.find(logical, n) else {
                bail!("extent at logical {logical} (+{n}) lies outside every chunk (damaged)");
            };
            for &phys in &c.stripes {
                used.mark_range(phys + (logical - c.logical), n);
            }
            accounted[i] += n;
            Ok(())
        };
        r.walk(chunks, extent_root, "extent tree", &mut |k, d| {
            match k.kind {
                EXTENT_ITEM => {
                    if k.offset == 0 {
                        bail!("extent at logical {} has length 0 (damaged)", k.objectid);
                    }
                    mark(k.objectid, k.offset)?;
                }
                METADATA_ITEM => mark(k.objectid, nodesize)?,
                BLOCK_GROUP_ITEM => on_bg(k, d)?,
                _ => {}
            }
            Ok(())
        })?;
        if let Some(root) = bg_root {
            r.walk(chunks, root, "block group tree", &mut |k, d| {
                if k.kind == BLOCK_GROUP_ITEM {
                    on_bg(k, d)?;
                }
                Ok(())
            })?;
        }
    }
    // Each chunk has its block group; one whose "used" exceeds the extents found means the
    // extent tree was not read whole, and a map from it would lose data.
    if groups.len() != chunks.0.len() {
        bail!(
            "{} block groups for {} chunks (damaged)",
            groups.len(),
            chunks.0.len()
        );
    }
    for (logical, length, bg_used) in groups {
        let Some((i, c)) = chunks.find(logical, length) else {
            bail!("block group at logical {logical} has no chunk (damaged)");
        };
        if c.logical != logical || c.length != length {
            bail!("block group at logical {logical} does not match its chunk (damaged)");
        }
        if accounted[i] < bg_used {
            bail!(
                "block group at logical {logical} has {bg_used} bytes used, but its extents add up to {}: the extent tree is incomplete (damaged); run btrfs check",
                accounted[i]
            );
        }
    }
    // Tree blocks walked are extents too; marked again in case an item was missing.
    for &logical in &r.visited {
        if let Some((_, c)) = chunks.find(logical, nodesize) {
            for &phys in &c.stripes {
                used.mark_range(phys + (logical - c.logical), nodesize);
            }
        }
    }
    used.coarsen_to(32 << 20);
    Ok(FsInfo {
        fstype: "btrfs".to_string(),
        variant: None,
        uuid: Some(uuid_text(&s.fsid)),
        label: (!s.label.is_empty()).then(|| s.label.clone()),
        block_size: s.sectorsize,
        used,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(logical: u64, length: u64) -> Chunk {
        Chunk {
            logical,
            length,
            kind: BG_DATA,
            stripes: vec![logical],
        }
    }

    #[test]
    fn chunk_map_lookup_and_overlap() {
        let mut m = ChunkMap::default();
        m.insert(chunk(1 << 20, 1 << 20)).unwrap();
        m.insert(chunk(8 << 20, 1 << 20)).unwrap();
        m.insert(chunk(1 << 20, 1 << 20)).unwrap();
        assert!(m.insert(chunk((1 << 20) + 4096, 4096)).is_err());
        assert!(m.insert(chunk((8 << 20) - 4096, 8192)).is_err());
        assert_eq!(m.find(1 << 20, 4096).unwrap().0, 0);
        assert_eq!(m.find((9 << 20) - 4096, 4096).unwrap().0, 1);
        assert!(m.find((2 << 20) - 4096, 8192).is_none());
        assert!(m.find(0, 1).is_none());
        assert!(m.find(u64::MAX, 2).is_none());
    }
}
