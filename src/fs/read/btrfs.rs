//! btrfs file tree reader (single device): the top-level subvolume's directory tree, and every
//! subvolume and snapshot below it, from their own trees. Inodes, DIR_INDEX entries (DIR_ITEM
//! when a directory has none), xattrs, symlinks, device numbers, and each file's EXTENT_DATA:
//! plain extents (mapped to physical offsets through the chunk map), compressed ones (zlib,
//! LZO, zstd) as encoded runs, inline data decoded. Preallocated extents and holes read as
//! zeros.
//!
//! Damage in one place leaves out what it touches, with a warning, and nothing else: an
//! unreadable tree block (and its subtree), an item that does not parse, an entry whose inode
//! is missing, a file with an extent outside every data chunk. The superblock, the chunk tree
//! and the top-level subvolume's root must be sound.
//!
//! Inode numbers are per subvolume in btrfs; `Entry::inode` must be unique in the filesystem
//! (it is the hard-link identity), so it is [`toc_inode`]: `(subvolume id << 40) | objectid`,
//! also for the top-level subvolume (id 5). The incremental backup's live walker calls the same
//! function.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use anyhow::{Context, Result, bail};

use super::decode::{MAX_ENCODED, decode};
use super::{Compression, Encoded, Entry, Extent, Kind, ReadAt, Warnings};
use crate::fs::map::btrfs::{
    BG_DATA, ChunkMap, Key, MAGIC, ROOT_ITEM, ROOT_TREE, Reader, Root, SB_OFFSET, SB_SIZE,
    is_fs_tree, load_chunks, parse_super, root_from_item,
};
use crate::fs::map::{le16, le32, le64};

const FS_TREE: u64 = 5;
const ROOT_DIR: u64 = 256;
/// What the kernel shows where a snapshot holds a subvolume that is not part of it.
const EMPTY_SUBVOL_DIR: u64 = 2;

const INODE_ITEM: u8 = 1;
const XATTR_ITEM: u8 = 24;
const DIR_ITEM: u8 = 84;
const DIR_INDEX: u8 = 96;
const EXTENT_DATA: u8 = 108;
const ROOT_REF: u8 = 156;

const INODE_ITEM_SIZE: usize = 160;
const DIR_ITEM_HEADER: usize = 30;
const EXTENT_INLINE_HEADER: usize = 21;
const EXTENT_REG_SIZE: usize = 53;
const FILE_EXTENT_INLINE: u8 = 0;
const FILE_EXTENT_REG: u8 = 1;
const FILE_EXTENT_PREALLOC: u8 = 2;

/// Inline data is at most a page (64 KiB on the largest pages btrfs runs on).
const MAX_INLINE: u64 = 64 << 10;
const MAX_SYMLINK: u64 = 4096;
const MAX_DEPTH: usize = 4096;
/// Warnings kept (the count of the rest is reported).
const MAX_WARNINGS: usize = 200;
/// Objectids above this would collide in the inode formula.
const MAX_OBJECTID: u64 = (1 << 40) - 1;

/// The file list's inode number of inode `objectid` of subvolume `subvol`: unique in the
/// filesystem for 16 million subvolume ids and a trillion inodes per subvolume.
pub fn toc_inode(subvol: u64, objectid: u64) -> u64 {
    (subvol << 40) | (objectid & MAX_OBJECTID)
}

struct InodeItem {
    size: u64,
    nlink: u32,
    uid: u32,
    gid: u32,
    mode: u32,
    rdev: u64,
    atime: (i64, u32),
    ctime: (i64, u32),
    mtime: (i64, u32),
    flags: u64,
}

#[derive(Clone)]
struct FileExtent {
    file_off: u64,
    ram_bytes: u64,
    compression: u8,
    other: bool,
    kind: u8,
    /// INLINE: the data as stored.
    inline: Vec<u8>,
    disk_bytenr: u64,
    disk_num_bytes: u64,
    offset: u64,
    num_bytes: u64,
}

/// Everything one tree holds about one objectid.
#[derive(Default)]
struct Ino {
    item: Option<InodeItem>,
    /// (name, location) from DIR_INDEX, and from DIR_ITEM.
    index: Vec<(Vec<u8>, Key)>,
    hashed: Vec<(Vec<u8>, Key)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    extents: Vec<FileExtent>,
    /// The first item of this inode that did not parse.
    bad: Option<String>,
}

fn time(d: &[u8], o: usize) -> (i64, u32) {
    (le64(d, o) as i64, le32(d, o + 8))
}

fn parse_inode(d: &[u8]) -> Result<InodeItem> {
    if d.len() < INODE_ITEM_SIZE {
        bail!("inode item of {} bytes (damaged)", d.len());
    }
    Ok(InodeItem {
        size: le64(d, 16),
        nlink: le32(d, 40),
        uid: le32(d, 44),
        gid: le32(d, 48),
        mode: le32(d, 52),
        rdev: le64(d, 56),
        atime: time(d, 112),
        ctime: time(d, 124),
        mtime: time(d, 136),
        flags: le64(d, 64),
    })
}

/// One entry of a DIR_ITEM, DIR_INDEX or XATTR_ITEM: location, name, data.
type DirEntry<'a> = (Key, &'a [u8], &'a [u8]);

/// DIR_ITEM, DIR_INDEX and XATTR_ITEM items: entries back to back.
fn parse_dir_items(d: &[u8]) -> Result<Vec<DirEntry<'_>>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < d.len() {
        if d.len() - pos < DIR_ITEM_HEADER {
            bail!("directory or xattr item ends inside its header (damaged)");
        }
        let location = Key::at(d, pos);
        let data_len = usize::from(le16(d, pos + 25));
        let name_len = usize::from(le16(d, pos + 27));
        let start = pos + DIR_ITEM_HEADER;
        let Some(name) = d.get(start..start + name_len) else {
            bail!("directory or xattr name beyond its item (damaged)");
        };
        let Some(data) = d.get(start + name_len..start + name_len + data_len) else {
            bail!("xattr value beyond its item (damaged)");
        };
        out.push((location, name, data));
        pos = start + name_len + data_len;
    }
    Ok(out)
}

fn parse_extent(k: Key, d: &[u8]) -> Result<FileExtent> {
    if d.len() < EXTENT_INLINE_HEADER {
        bail!("file extent item of {} bytes (damaged)", d.len());
    }
    let mut x = FileExtent {
        file_off: k.offset,
        ram_bytes: le64(d, 8),
        compression: d[16],
        other: d[17] != 0 || le16(d, 18) != 0,
        kind: d[20],
        inline: Vec::new(),
        disk_bytenr: 0,
        disk_num_bytes: 0,
        offset: 0,
        num_bytes: 0,
    };
    match x.kind {
        FILE_EXTENT_INLINE => x.inline = d[EXTENT_INLINE_HEADER..].to_vec(),
        FILE_EXTENT_REG | FILE_EXTENT_PREALLOC => {
            if d.len() < EXTENT_REG_SIZE {
                bail!("file extent item of {} bytes (damaged)", d.len());
            }
            x.disk_bytenr = le64(d, 21);
            x.disk_num_bytes = le64(d, 29);
            x.offset = le64(d, 37);
            x.num_bytes = le64(d, 45);
        }
        t => bail!("file extent of unknown type {t} (damaged)"),
    }
    Ok(x)
}

fn compression(c: u8) -> Result<Option<Compression>> {
    Ok(match c {
        0 => None,
        1 => Some(Compression::Zlib),
        2 => Some(Compression::Lzo),
        3 => Some(Compression::Zstd),
        c => bail!("unknown compression type {c}"),
    })
}

struct Fs<'a> {
    r: Reader<'a>,
    chunks: ChunkMap,
    /// Subvolume id → its root (the ROOT_ITEM with the highest key offset).
    roots: HashMap<u64, Root>,
    /// (parent subvolume, child subvolume) pairs the root tree links (ROOT_REF).
    refs: HashSet<(u64, u64)>,
    warn: Warnings,
}

impl Fs<'_> {
    /// Every item of one subvolume's tree, grouped by objectid.
    fn load(&mut self, id: u64, root: Root) -> BTreeMap<u64, Ino> {
        let mut inos: BTreeMap<u64, Ino> = BTreeMap::new();
        let mut skipped = Vec::new();
        self.r.visited.clear();
        let name = format!("tree of subvolume {id}");
        let res = self.r.walk_tolerant(
            &self.chunks,
            root,
            &name,
            &mut |k, d| {
                if !matches!(
                    k.kind,
                    INODE_ITEM | XATTR_ITEM | DIR_ITEM | DIR_INDEX | EXTENT_DATA
                ) {
                    return Ok(());
                }
                let ino = inos.entry(k.objectid).or_default();
                let r: Result<()> = (|| {
                    match k.kind {
                        INODE_ITEM => ino.item = Some(parse_inode(d)?),
                        XATTR_ITEM => {
                            for (_, n, v) in parse_dir_items(d)? {
                                ino.xattrs.push((n.to_vec(), v.to_vec()));
                            }
                        }
                        DIR_INDEX => {
                            let mut e = parse_dir_items(d)?;
                            if e.len() != 1 {
                                bail!("DIR_INDEX item with {} entries (damaged)", e.len());
                            }
                            let (loc, n, _) = e.remove(0);
                            ino.index.push((n.to_vec(), loc));
                        }
                        DIR_ITEM => {
                            for (loc, n, _) in parse_dir_items(d)? {
                                ino.hashed.push((n.to_vec(), loc));
                            }
                        }
                        _ => ino.extents.push(parse_extent(k, d)?),
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    ino.bad.get_or_insert(format!("item {k:?}: {e:#}"));
                }
                Ok(())
            },
            Some(&mut skipped),
        );
        for s in skipped {
            self.warn.push(format!("subvolume {id}: {s}; left out"));
        }
        if let Err(e) = res {
            self.warn.push(format!(
                "subvolume {id}: {e:#}; the rest of its tree is left out"
            ));
        }
        for ino in inos.values_mut() {
            if ino.index.is_empty() {
                ino.index = std::mem::take(&mut ino.hashed);
            } else {
                ino.hashed = Vec::new();
            }
        }
        inos
    }

    /// Physical offset of [logical, logical+len) in a data chunk (its first copy).
    fn phys(&self, logical: u64, len: u64) -> Result<u64> {
        match self.chunks.find(logical, len.max(1)) {
            Some((_, c)) if c.kind & BG_DATA != 0 => Ok(c.stripes[0] + (logical - c.logical)),
            Some(_) => bail!("data at logical {logical} lies in a metadata chunk (damaged)"),
            None => bail!(
                "data at logical {logical} (+{len}) lies in no chunk, or spans one's end (damaged)"
            ),
        }
    }

    fn inline_data(&self, x: &FileExtent) -> Result<Vec<u8>> {
        if x.file_off != 0 {
            bail!("inline extent at file offset {} (damaged)", x.file_off);
        }
        if x.ram_bytes > MAX_INLINE {
            bail!("inline extent of {} bytes (damaged)", x.ram_bytes);
        }
        if x.other {
            bail!("inline extent with encryption or another encoding");
        }
        match compression(x.compression)? {
            None => Ok(x.inline.clone()),
            Some(c) => decode(c, &x.inline, x.ram_bytes as usize),
        }
    }

    fn entry(&self, sv: u64, oid: u64, ino: &Ino, path: Vec<u8>) -> Result<Entry> {
        if let Some(b) = &ino.bad {
            bail!("{b}");
        }
        let Some(it) = &ino.item else {
            bail!("inode {oid} has no inode item (damaged)");
        };
        if oid > MAX_OBJECTID {
            bail!("inode number {oid} is too large");
        }
        let kind = match it.mode & 0o170000 {
            0o040000 => Kind::Dir,
            0o100000 => Kind::File,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::CharDev,
            0o060000 => Kind::BlockDev,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            m => bail!("inode {oid} has an unknown type {m:#o} (damaged)"),
        };
        let mut e = Entry {
            path,
            kind,
            mode: it.mode & 0o7777,
            uid: it.uid,
            gid: it.gid,
            size: it.size,
            mtime: it.mtime,
            ctime: it.ctime,
            atime: it.atime,
            // Unique across subvolumes: see the module documentation.
            inode: toc_inode(sv, oid),
            nlink: it.nlink,
            rdev: (0, 0),
            symlink: None,
            xattrs: ino.xattrs.clone(),
            extents: Vec::new(),
            encoded: Vec::new(),
            inline: None,
            subvol: None,
            flags: crate::fs::flags::from_btrfs(it.flags),
        };
        match kind {
            Kind::CharDev | Kind::BlockDev => {
                // The kernel's own dev_t (MKDEV: 12-bit major above a 20-bit minor), not the
                // new_encode_dev form ext4 stores: what `stat` shows for 8:1 is 0x800001 here.
                let d = it.rdev;
                e.rdev = (((d >> 20) & 0xfff) as u32, (d & 0xf_ffff) as u32);
            }
            Kind::Symlink => {
                let x = ino
                    .extents
                    .first()
                    .filter(|x| x.kind == FILE_EXTENT_INLINE)
                    .context("symlink without its inline target (damaged)")?;
                if x.ram_bytes > MAX_SYMLINK {
                    bail!("symlink target of {} bytes (damaged)", x.ram_bytes);
                }
                // The inode's size is the target's length, as readlink(2) answers:
                // mkfs.btrfs --rootdir stores the terminating NUL in the extent too.
                let mut t = self.inline_data(x)?;
                t.truncate(usize::try_from(it.size).unwrap_or(usize::MAX));
                e.symlink = Some(t);
            }
            Kind::File => self.file_data(&mut e, ino)?,
            _ => {}
        }
        Ok(e)
    }

    fn file_data(&self, e: &mut Entry, ino: &Ino) -> Result<()> {
        let size = e.size;
        for x in &ino.extents {
            if x.file_off >= size {
                continue;
            }
            if x.kind == FILE_EXTENT_INLINE {
                e.inline = Some(self.inline_data(x)?);
                continue;
            }
            if x.kind == FILE_EXTENT_PREALLOC || x.disk_bytenr == 0 || x.num_bytes == 0 {
                continue;
            }
            if x.other {
                bail!(
                    "extent at file offset {} uses encryption or another encoding",
                    x.file_off
                );
            }
            let len = x.num_bytes.min(size - x.file_off);
            if x.offset
                .checked_add(x.num_bytes)
                .is_none_or(|end| end > x.ram_bytes)
            {
                bail!(
                    "extent at file offset {}: {} bytes at {} of a {}-byte extent (damaged)",
                    x.file_off,
                    x.num_bytes,
                    x.offset,
                    x.ram_bytes
                );
            }
            match compression(x.compression)? {
                None => {
                    let logical = x.disk_bytenr.checked_add(x.offset).context("overflow")?;
                    e.extents.push(Extent {
                        file_off: x.file_off,
                        disk_off: self.phys(logical, len)?,
                        len,
                    });
                }
                Some(c) => {
                    if x.disk_num_bytes == 0
                        || x.disk_num_bytes > MAX_ENCODED
                        || x.ram_bytes > MAX_ENCODED
                    {
                        bail!(
                            "compressed extent at file offset {} of {} bytes for {} (damaged)",
                            x.file_off,
                            x.disk_num_bytes,
                            x.ram_bytes
                        );
                    }
                    e.encoded.push(Encoded {
                        file_off: x.file_off,
                        disk_off: self.phys(x.disk_bytenr, x.disk_num_bytes)?,
                        disk_len: x.disk_num_bytes,
                        compression: c,
                        skip: x.offset,
                        len,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Read the whole tree; see the module documentation. Warnings (what was left out) are
/// printed.
pub fn read_tree(dev: &dyn ReadAt) -> Result<Vec<Entry>> {
    let mut w = Vec::new();
    let r = read_tree_warn(dev, &mut w);
    for m in w {
        eprintln!("warning: {m}");
    }
    r
}

/// Read the whole tree; what was left out is described in `warnings`.
pub fn read_tree_warn(dev: &dyn ReadAt, warnings: &mut Vec<String>) -> Result<Vec<Entry>> {
    let mut sb = vec![0u8; SB_SIZE];
    dev.read_at(&mut sb, SB_OFFSET)
        .context("cannot read the btrfs superblock")?;
    if &sb[0x40..0x48] != MAGIC {
        bail!("not a btrfs filesystem");
    }
    let s = parse_super(&sb, u64::MAX)?;
    let read = |buf: &mut [u8], at: u64| dev.read_at(buf, at);
    let mut r = Reader::new(&read, &s);
    let chunks = load_chunks(&mut r, &s, &sb)?;
    let mut fs = Fs {
        r,
        chunks,
        roots: HashMap::new(),
        refs: HashSet::new(),
        warn: Warnings::new(MAX_WARNINGS),
    };
    let out = read_all(&mut fs, &s);
    warnings.extend(fs.warn.finish("warnings"));
    out
}

fn read_all(fs: &mut Fs, s: &crate::fs::map::btrfs::Super) -> Result<Vec<Entry>> {
    let tree_root = Root {
        owner: ROOT_TREE,
        bytenr: s.root,
        level: s.root_level,
        generation: s.generation,
    };
    let mut skipped = Vec::new();
    let (mut roots, mut refs) = (HashMap::new(), HashSet::new());
    fs.r.visited.clear();
    fs.r.walk_tolerant(
        &fs.chunks,
        tree_root,
        "root tree",
        &mut |k, d| {
            match k.kind {
                // Keys come in order: a later ROOT_ITEM of the same tree is newer.
                ROOT_ITEM if is_fs_tree(k.objectid) => {
                    match root_from_item(k.objectid, d, "subvolume") {
                        Ok(r) => {
                            roots.insert(k.objectid, r);
                        }
                        Err(e) => skipped.push(format!("subvolume {}: {e:#}", k.objectid)),
                    }
                }
                ROOT_REF => {
                    refs.insert((k.objectid, k.offset));
                }
                _ => {}
            }
            Ok(())
        },
        None,
    )?;
    for m in skipped {
        fs.warn.push(format!("{m}; left out"));
    }
    fs.roots = roots;
    fs.refs = refs;
    if !fs.roots.contains_key(&FS_TREE) {
        bail!("no top-level subvolume (damaged)");
    }

    let mut out = Vec::new();
    let mut entered: HashSet<u64> = HashSet::from([FS_TREE]);
    let mut queue: VecDeque<(Vec<u8>, u64, usize)> = VecDeque::from([(Vec::new(), FS_TREE, 0)]);
    while let Some((base, sv, base_depth)) = queue.pop_front() {
        let Some(&root) = fs.roots.get(&sv) else {
            fs.warn.push(format!(
                "{:?}: subvolume {sv} has no root item (damaged); left out",
                String::from_utf8_lossy(&base)
            ));
            continue;
        };
        let inos = fs.load(sv, root);
        let before = out.len();
        walk_subvol(
            fs,
            sv,
            &inos,
            base.clone(),
            base_depth,
            &mut entered,
            &mut queue,
            &mut out,
        );
        if let Some(e) = out.get_mut(before).filter(|e| e.path == base) {
            e.subvol = Some(sv);
        } else if sv == FS_TREE {
            bail!("the top-level subvolume's root directory cannot be read (damaged)");
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn walk_subvol(
    fs: &mut Fs,
    sv: u64,
    inos: &BTreeMap<u64, Ino>,
    base: Vec<u8>,
    base_depth: usize,
    entered: &mut HashSet<u64>,
    queue: &mut VecDeque<(Vec<u8>, u64, usize)>,
    out: &mut Vec<Entry>,
) {
    let shown = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let mut seen_dirs = HashSet::new();
    let mut stack: Vec<(Vec<u8>, u64, usize)> = vec![(base, ROOT_DIR, base_depth)];
    while let Some((path, oid, depth)) = stack.pop() {
        let empty = Ino::default();
        let ino = inos.get(&oid).unwrap_or(&empty);
        let e = match fs.entry(sv, oid, ino, path.clone()) {
            Ok(e) => e,
            Err(err) => {
                fs.warn.push(format!(
                    "{:?} (subvolume {sv}): {err:#}; left out",
                    shown(&path)
                ));
                continue;
            }
        };
        if e.kind != Kind::Dir {
            out.push(e);
            continue;
        }
        if !seen_dirs.insert(oid) || depth > MAX_DEPTH {
            fs.warn.push(format!(
                "{:?} (subvolume {sv}): directory loop or absurd depth (damaged); left out",
                shown(&path)
            ));
            continue;
        }
        let times = (e.mtime, e.ctime, e.atime);
        out.push(e);
        let mut children: Vec<&(Vec<u8>, Key)> = ino.index.iter().collect();
        children.sort_by(|a, b| a.0.cmp(&b.0));
        children.dedup_by(|a, b| a.0 == b.0);
        for (name, loc) in children.into_iter().rev() {
            let mut p = path.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(name);
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                fs.warn.push(format!(
                    "{:?} (subvolume {sv}): a directory entry with an impossible name (damaged); left out",
                    shown(&p)
                ));
                continue;
            }
            match loc.kind {
                INODE_ITEM => stack.push((p, loc.objectid, depth + 1)),
                ROOT_ITEM => {
                    let child = loc.objectid;
                    if entered.contains(&child) {
                        fs.warn.push(format!(
                            "{:?}: subvolume {child} appears a second time, inside subvolume {sv} (a loop: damaged); left out",
                            shown(&p)
                        ));
                    } else if fs.refs.contains(&(sv, child)) && fs.roots.contains_key(&child) {
                        entered.insert(child);
                        queue.push_back((p, child, depth + 1));
                    } else {
                        // A snapshot holds the subvolumes below its source as empty
                        // directories (the kernel shows the same).
                        out.push(Entry {
                            path: p,
                            kind: Kind::Dir,
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                            size: 0,
                            mtime: times.0,
                            ctime: times.1,
                            atime: times.2,
                            inode: toc_inode(sv, EMPTY_SUBVOL_DIR),
                            nlink: 1,
                            rdev: (0, 0),
                            symlink: None,
                            xattrs: Vec::new(),
                            extents: Vec::new(),
                            encoded: Vec::new(),
                            inline: None,
                            subvol: None,
                            flags: 0,
                        });
                    }
                }
                t => fs.warn.push(format!(
                    "{:?} (subvolume {sv}): a directory entry pointing at an item of type {t} (damaged); left out",
                    shown(&p)
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests;
