//! ext2/3/4 file tree reader: inodes, directories (linear and htree, inline), extent trees and
//! block maps, fast and slow symlinks, device numbers, in-inode and block extended attributes
//! (POSIX ACLs converted to the setxattr format).

use std::cell::RefCell;
use std::collections::HashSet;

use anyhow::{Context, Result, bail};

use super::{Entry, Extent, Kind, ReadAt, Warnings};
use crate::fs::map::ext::{Sb, parse_sb};
use crate::fs::map::{le16, le32};

const EXTENTS_FL: u32 = 0x80000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const INCOMPAT_FILETYPE: u32 = 0x2;
const XATTR_MAGIC: u32 = 0xEA02_0000;
/// The inode holds one extended attribute's value (ea_inode feature).
const EA_INODE_FL: u32 = 0x20_0000;
/// fscrypt: a directory whose names (and files' data) are ciphertext.
const ENCRYPT_FL: u32 = 0x800;
/// The xattr name index of an fscrypt context, which Linux never lists.
const ENCRYPTION_INDEX: u8 = 9;
/// Linux's limit on one extended attribute value (XATTR_SIZE_MAX).
const MAX_XATTR_VALUE: u64 = 65536;
/// Warnings kept per filesystem; the rest are counted.
const MAX_WARNINGS: usize = 100;
/// Sanity caps against hostile images.
const MAX_DEPTH: usize = 4096;
const MAX_EXTENT_DEPTH: u16 = 5;

struct Fs<'a> {
    dev: &'a dyn ReadAt,
    sb: Sb,
    itables: Vec<u64>,
    /// What the inode being read lost (extended attributes bmr cannot represent); the tree
    /// walk names the file and moves these into its warnings.
    problems: RefCell<Vec<String>>,
}

struct Inode {
    ino: u64,
    raw: Vec<u8>,
    mode: u16,
    flags: u32,
    size: u64,
}

fn time(raw: &[u8], base: usize, extra: Option<usize>) -> (i64, u32) {
    let lo = i64::from(le32(raw, base) as i32);
    match extra.filter(|&o| o + 4 <= raw.len()) {
        Some(o) => {
            let x = le32(raw, o);
            (lo + (i64::from(x & 3) << 32), x >> 2)
        }
        None => (lo, 0),
    }
}

impl Fs<'_> {
    fn read(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.dev
            .read_at(&mut b, off)
            .with_context(|| format!("cannot read the filesystem at offset {off}"))?;
        Ok(b)
    }

    fn block(&self, blk: u64) -> Result<Vec<u8>> {
        if blk == 0 || blk >= self.sb.blocks_count {
            bail!("block {blk} lies outside the filesystem (damaged)");
        }
        self.read(blk * self.sb.block_size, self.sb.block_size as usize)
    }

    fn inode(&self, ino: u64) -> Result<Inode> {
        let ipg = self.sb.inodes_per_group;
        let g = (ino.checked_sub(1).context("inode 0")?) / ipg;
        let Some(&table) = self.itables.get(g as usize) else {
            bail!("inode {ino} does not exist (damaged directory entry)");
        };
        let off = table * self.sb.block_size + ((ino - 1) % ipg) * self.sb.inode_size;
        let raw = self.read(off, self.sb.inode_size as usize)?;
        let size = u64::from(le32(&raw, 4)) | (u64::from(le32(&raw, 108)) << 32);
        Ok(Inode {
            ino,
            mode: le16(&raw, 0),
            flags: le32(&raw, 32),
            size,
            raw,
        })
    }

    /// Physical runs of an inode's data: (logical block, physical block, count).
    fn runs(&self, ino: &Inode) -> Result<Vec<(u64, u64, u64)>> {
        let mut out = Vec::new();
        let iblock = ino.raw.get(40..100).context("short inode")?;
        if ino.flags & EXTENTS_FL != 0 {
            self.extent_node(iblock, MAX_EXTENT_DEPTH + 1, &mut out)
                .with_context(|| format!("inode {}: bad extent tree", ino.ino))?;
        } else {
            let bs = self.sb.block_size;
            let nblocks = ino.size.div_ceil(bs);
            let per = bs / 4;
            let mut push = |l: u64, p: u64| {
                if p == 0 {
                    return;
                }
                match out.last_mut() {
                    Some((ll, pp, n)) if *ll + *n == l && *pp + *n == p => *n += 1,
                    _ => out.push((l, p, 1)),
                }
            };
            for i in 0..12.min(nblocks) {
                push(i, u64::from(le32(iblock, (i * 4) as usize)));
            }
            let mut l = 12;
            for (slot, depth) in [(12usize, 1u32), (13, 2), (14, 3)] {
                if l >= nblocks {
                    break;
                }
                let root = u64::from(le32(iblock, slot * 4));
                let span = per.pow(depth);
                if root != 0 {
                    self.indirect(root, depth, l, nblocks, &mut push)?;
                }
                l += span;
            }
        }
        Ok(out)
    }

    fn indirect(
        &self,
        blk: u64,
        depth: u32,
        first: u64,
        nblocks: u64,
        push: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let b = self.block(blk)?;
        let per = self.sb.block_size / 4;
        let span = per.pow(depth - 1);
        for i in 0..per {
            let l = first + i * span;
            if l >= nblocks {
                break;
            }
            let p = u64::from(le32(&b, (i * 4) as usize));
            if p == 0 {
                continue;
            }
            if depth == 1 {
                push(l, p);
            } else {
                self.indirect(p, depth - 1, l, nblocks, push)?;
            }
        }
        Ok(())
    }

    fn extent_node(
        &self,
        node: &[u8],
        max_depth: u16,
        out: &mut Vec<(u64, u64, u64)>,
    ) -> Result<()> {
        if le16(node, 0) != 0xF30A {
            bail!("bad extent header magic");
        }
        let entries = le16(node, 2) as usize;
        let depth = le16(node, 6);
        if depth >= max_depth || 12 + entries * 12 > node.len() {
            bail!("extent tree too deep or too wide");
        }
        for i in 0..entries {
            let e = &node[12 + i * 12..24 + i * 12];
            if depth == 0 {
                let lblk = u64::from(le32(e, 0));
                let len = le16(e, 4);
                let start = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
                // Longer than 32768: an unwritten (preallocated) extent, which reads as zeros.
                if len == 0 || len > 32768 {
                    continue;
                }
                if start
                    .checked_add(u64::from(len))
                    .is_none_or(|e| e > self.sb.blocks_count)
                {
                    bail!("extent outside the filesystem");
                }
                out.push((lblk, start, u64::from(len)));
            } else {
                let leaf = (u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4));
                let child = self.block(leaf)?;
                self.extent_node(&child, depth, out)?;
            }
        }
        Ok(())
    }

    /// The whole content of a (small) inode: directories and slow symlinks.
    fn content(&self, ino: &Inode, limit: u64) -> Result<Vec<u8>> {
        if ino.size > limit {
            bail!(
                "inode {}: {} bytes is too big for a directory or symlink (damaged)",
                ino.ino,
                ino.size
            );
        }
        if ino.flags & INLINE_DATA_FL != 0 {
            return Ok(self.inline(ino)?.unwrap_or_default());
        }
        let bs = self.sb.block_size;
        let mut data = vec![0u8; ino.size as usize];
        for (l, p, n) in self.runs(ino)? {
            for k in 0..n {
                let off = ((l + k) * bs) as usize;
                if off >= data.len() {
                    break;
                }
                let b = self.block(p + k)?;
                let end = (off + bs as usize).min(data.len());
                data[off..end].copy_from_slice(&b[..end - off]);
            }
        }
        Ok(data)
    }

    fn inline(&self, ino: &Inode) -> Result<Option<Vec<u8>>> {
        if ino.flags & INLINE_DATA_FL == 0 {
            return Ok(None);
        }
        let mut data = ino.raw.get(40..100).context("short inode")?.to_vec();
        for (k, v) in self.xattrs_raw(ino)? {
            if k == b"system.data" {
                data.extend_from_slice(&v);
            }
        }
        data.truncate(ino.size as usize);
        Ok(Some(data))
    }

    fn xattrs_raw(&self, ino: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let extra = le16(&ino.raw, 128) as usize;
        let start = 128 + extra;
        if self.sb.inode_size > 128
            && start + 4 <= ino.raw.len()
            && le32(&ino.raw, start) == XATTR_MAGIC
        {
            let region = &ino.raw[start + 4..];
            self.parse_xattrs(region, region, &mut out);
        }
        let acl = u64::from(le32(&ino.raw, 104)) | (u64::from(le16(&ino.raw, 118)) << 32);
        if acl != 0 {
            match self.block(acl) {
                Ok(b) if le32(&b, 0) == XATTR_MAGIC => {
                    self.parse_xattrs(b.get(32..).unwrap_or(&[]), &b, &mut out)
                }
                Ok(_) => self.problem(format!(
                    "its extended attribute block {acl} is not one (damaged): the attributes kept there are left out"
                )),
                Err(e) => self.problem(format!(
                    "its extended attributes in block {acl} are left out: {e:#}"
                )),
            }
        }
        Ok(out)
    }

    fn problem(&self, m: String) {
        self.problems.borrow_mut().push(m);
    }

    /// Parse xattr entries; `values` is the buffer value offsets are relative to. An entry bmr
    /// cannot represent is left out with a problem naming it, never silently.
    fn parse_xattrs(&self, entries: &[u8], values: &[u8], out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        let mut pos = 0;
        while pos + 16 <= entries.len() && le32(entries, pos) != 0 {
            let nlen = entries[pos] as usize;
            let index = entries[pos + 1];
            let voff = le16(entries, pos + 2) as usize;
            let vinum = le32(entries, pos + 4);
            let vsize = le32(entries, pos + 8) as usize;
            let Some(name) = entries.get(pos + 16..pos + 16 + nlen) else {
                self.problem("an extended attribute entry runs past its block (damaged): it and those after it are left out".into());
                break;
            };
            pos += (16 + nlen).div_ceil(4) * 4;
            let prefix: &[u8] = match index {
                1 => b"user.",
                2 => b"system.posix_acl_access",
                3 => b"system.posix_acl_default",
                4 => b"trusted.",
                6 => b"security.",
                7 => b"system.",
                8 => b"system.richacl",
                _ => b"",
            };
            let mut full = prefix.to_vec();
            full.extend_from_slice(name);
            if index == ENCRYPTION_INDEX {
                // The fscrypt context: the tree walk says what an encrypted directory means.
                continue;
            }
            if prefix.is_empty() {
                self.problem(format!(
                    "extended attribute {:?} has name index {index}, which Linux does not list: left out",
                    String::from_utf8_lossy(name)
                ));
                continue;
            }
            let shown = String::from_utf8_lossy(&full).into_owned();
            let v = if vinum != 0 {
                match self.ea_inode_value(u64::from(vinum), vsize as u64) {
                    Ok(v) => v,
                    Err(e) => {
                        self.problem(format!("extended attribute {shown:?} left out: {e:#}"));
                        continue;
                    }
                }
            } else if let Some(v) = values.get(voff..voff + vsize) {
                v.to_vec()
            } else {
                self.problem(format!(
                    "extended attribute {shown:?} left out: its {vsize}-byte value at offset {voff} lies outside its block (damaged)"
                ));
                continue;
            };
            let v = if index == 2 || index == 3 {
                acl_to_xattr(&v)
            } else {
                v
            };
            out.push((full, v));
        }
    }

    /// The value of an extended attribute kept in its own inode (mke2fs -O ea_inode, for
    /// values that do not fit the inode or block): that inode's data, checked as Linux does.
    fn ea_inode_value(&self, inum: u64, size: u64) -> Result<Vec<u8>> {
        if size > MAX_XATTR_VALUE {
            bail!(
                "its value claims {size} bytes, more than Linux allows ({MAX_XATTR_VALUE}) (damaged)"
            );
        }
        let ino = self.inode(inum)?;
        if ino.flags & EA_INODE_FL == 0 {
            bail!("its value inode {inum} is not marked as one (damaged)");
        }
        if ino.size != size {
            bail!(
                "its value inode {inum} holds {} bytes, the entry says {size} (damaged)",
                ino.size
            );
        }
        self.content(&ino, MAX_XATTR_VALUE)
            .with_context(|| format!("value inode {inum}"))
    }

    fn entry(&self, path: Vec<u8>, ino: &Inode) -> Result<Entry> {
        let r = &ino.raw;
        let kind = match ino.mode & 0xF000 {
            0x4000 => Kind::Dir,
            0x8000 => Kind::File,
            0xA000 => Kind::Symlink,
            0x2000 => Kind::CharDev,
            0x6000 => Kind::BlockDev,
            0x1000 => Kind::Fifo,
            0xC000 => Kind::Socket,
            m => bail!("inode {} has an unknown type {m:#x} (damaged)", ino.ino),
        };
        let extra = le16(r, 128) as usize;
        let has = |end: usize| self.sb.inode_size > 128 && 128 + extra >= end;
        let x = |o: usize, end: usize| has(end).then_some(o);
        let iblock = r.get(40..100).context("short inode")?;
        let mut e = Entry {
            path,
            kind,
            mode: u32::from(ino.mode) & 0o7777,
            uid: u32::from(le16(r, 2)) | (u32::from(le16(r, 120)) << 16),
            gid: u32::from(le16(r, 24)) | (u32::from(le16(r, 122)) << 16),
            size: ino.size,
            mtime: time(r, 16, x(136, 140)),
            ctime: time(r, 12, x(132, 136)),
            atime: time(r, 8, x(140, 144)),
            inode: ino.ino,
            nlink: u32::from(le16(r, 26)),
            rdev: (0, 0),
            symlink: None,
            xattrs: Vec::new(),
            extents: Vec::new(),
            encoded: Vec::new(),
            inline: None,
            subvol: None,
            // ext4 keeps the FS_*_FL bits as they are.
            flags: ino.flags & crate::fs::flags::SETTABLE,
        };
        for (k, v) in self.xattrs_raw(ino)? {
            if k != b"system.data" {
                e.xattrs.push((k, v));
            }
        }
        match kind {
            Kind::Symlink => {
                let blocks = le32(r, 28);
                let fast = ino.flags & (EXTENTS_FL | INLINE_DATA_FL) == 0 && ino.size < 60 && {
                    let acl_blocks = if le32(r, 104) != 0 {
                        (self.sb.block_size / 512) as u32
                    } else {
                        0
                    };
                    blocks.saturating_sub(acl_blocks) == 0
                };
                e.symlink = Some(if fast {
                    iblock[..ino.size as usize].to_vec()
                } else {
                    self.content(ino, 65536)?
                });
            }
            Kind::CharDev | Kind::BlockDev => {
                let old = le32(iblock, 0);
                e.rdev = if old != 0 {
                    ((old >> 8) & 0xff, old & 0xff)
                } else {
                    let n = le32(iblock, 4);
                    ((n & 0xfff00) >> 8, (n & 0xff) | ((n >> 12) & 0xfff00))
                };
            }
            Kind::File => {
                if let Some(d) = self.inline(ino)? {
                    e.inline = Some(d);
                } else {
                    let bs = self.sb.block_size;
                    e.extents = self
                        .runs(ino)?
                        .into_iter()
                        .filter(|(l, _, _)| l * bs < ino.size)
                        .map(|(l, p, n)| Extent {
                            file_off: l * bs,
                            disk_off: p * bs,
                            len: (n * bs).min(ino.size - l * bs),
                        })
                        .collect();
                }
            }
            _ => {}
        }
        Ok(e)
    }

    /// Directory entries (name, inode), "." and ".." excluded.
    fn dir_entries(&self, ino: &Inode) -> Result<Vec<(Vec<u8>, u64)>> {
        let mut out = Vec::new();
        let filetype = self.sb.incompat & INCOMPAT_FILETYPE != 0;
        let mut parse = |buf: &[u8]| -> Result<()> {
            let mut pos = 0usize;
            while pos + 8 <= buf.len() {
                let inode = le32(buf, pos);
                let rec = le16(buf, pos + 4) as usize;
                let nlen = if filetype {
                    buf[pos + 6] as usize
                } else {
                    le16(buf, pos + 6) as usize
                };
                if rec < 8 || pos + rec > buf.len() || 8 + nlen > rec {
                    bail!("inode {}: damaged directory entry", ino.ino);
                }
                let name = &buf[pos + 8..pos + 8 + nlen];
                if inode != 0 && name != b"." && name != b".." && !name.is_empty() {
                    out.push((name.to_vec(), u64::from(inode)));
                }
                pos += rec;
            }
            Ok(())
        };
        if ino.flags & INLINE_DATA_FL != 0 {
            let data = self.inline(ino)?.unwrap_or_default();
            // The first 4 bytes are the parent's inode number; entries follow in 56 bytes, then
            // the overflow kept in system.data.
            parse(data.get(4..data.len().min(60)).unwrap_or(&[]))?;
            if data.len() > 60 {
                parse(&data[60..])?;
            }
        } else {
            // Block by block (entries never span blocks), so memory follows what the blocks
            // hold, not what the inode claims; a block mapped twice is damage, not more names.
            let bs = self.sb.block_size;
            let mut seen = std::collections::HashSet::new();
            for (l, p, n) in self.runs(ino)? {
                for k in 0..n {
                    if (l + k).saturating_mul(bs) >= ino.size {
                        break;
                    }
                    if !seen.insert(p + k) {
                        bail!(
                            "directory inode {}: block {} is mapped twice (damaged)",
                            ino.ino,
                            p + k
                        );
                    }
                    parse(&self.block(p + k)?)?;
                }
            }
        }
        Ok(out)
    }
}

/// ext4 stores POSIX ACLs compactly (version 1, ids only for named users and groups);
/// setxattr wants version 2 with an id in every entry.
fn acl_to_xattr(v: &[u8]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut pos = 4;
    while pos + 4 <= v.len() {
        let tag = le16(v, pos);
        let perm = le16(v, pos + 2);
        let (id, step) = if tag == 2 || tag == 8 {
            (le32(v, pos + 4), 8)
        } else {
            (u32::MAX, 4)
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        pos += step;
    }
    out
}

/// The whole tree, parents before children. What cannot be listed (an encrypted directory's
/// subtree, a name that cannot be a Linux path component, a duplicate name, a damaged inode or
/// directory below the root) is left out with a warning; the rest is still listed.
pub fn read_tree_warn(dev: &dyn ReadAt, warnings: &mut Vec<String>) -> Result<Vec<Entry>> {
    let mut sbuf = vec![0u8; 1024];
    dev.read_at(&mut sbuf, 1024)
        .context("cannot read the ext superblock")?;
    if le16(&sbuf, 56) != 0xEF53 {
        bail!("not an ext filesystem");
    }
    let sb = parse_sb(&sbuf, u64::MAX, 0)?;
    // A reader knows no partition size: the filesystem's last byte must be readable, or the
    // group table below is as large as a damaged superblock says.
    dev.read_at(&mut [0u8; 1], sb.blocks_count * sb.block_size - 1)
        .context("the ext superblock gives a size beyond the end of its device (damaged)")?;
    let fs0 = Fs {
        dev,
        sb,
        itables: Vec::new(),
        problems: RefCell::new(Vec::new()),
    };
    let mut itables = Vec::with_capacity(fs0.sb.groups as usize);
    let dpb = fs0.sb.descs_per_block();
    let mut cached: Option<(u64, Vec<u8>)> = None;
    for g in 0..fs0.sb.groups {
        let db = fs0.sb.desc_block(g);
        if cached.as_ref().is_none_or(|(b, _)| *b != db) {
            cached = Some((db, fs0.block(db)?));
        }
        let b = &cached.as_ref().context("descriptor cache")?.1;
        let d = &b[((g % dpb) * fs0.sb.desc_size) as usize..];
        let hi = if fs0.sb.desc_size >= 64 {
            u64::from(le32(d, 0x28)) << 32
        } else {
            0
        };
        itables.push(u64::from(le32(d, 8)) | hi);
    }
    let fs = Fs { itables, ..fs0 };
    let mut warn = Warnings::new(MAX_WARNINGS);
    let r = walk(&fs, &mut warn);
    warnings.extend(warn.finish("entries left out of the file list"));
    r
}

/// How a path is shown in a warning.
fn shown(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path))
}

/// Depth-first, parents before children, names sorted for a stable order. Only the root must
/// be readable; below it a damaged part is left out with a warning.
fn walk(fs: &Fs, warn: &mut Warnings) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut stack: Vec<(Vec<u8>, u64, usize)> = vec![(Vec::new(), 2, 0)];
    while let Some((path, ino_no, depth)) = stack.pop() {
        let read = fs.inode(ino_no).and_then(|ino| {
            let e = fs.entry(path.clone(), &ino)?;
            Ok((ino, e))
        });
        let problems = fs.problems.take();
        let (ino, e) = match read {
            Ok(r) => r,
            Err(e) if depth == 0 => return Err(e.context("the root directory")),
            Err(e) => {
                warn.push(format!("{}: left out: {e:#}", shown(&path)));
                continue;
            }
        };
        for p in problems {
            warn.push(format!("{}: {p}", shown(&path)));
        }
        if e.kind != Kind::Dir {
            out.push(e);
            continue;
        }
        if !seen_dirs.insert(ino_no) {
            warn.push(format!(
                "{}: another link to directory inode {ino_no}, listed already (damaged): left out",
                shown(&path)
            ));
            continue;
        }
        if depth > MAX_DEPTH {
            warn.push(format!(
                "{}: directories nested deeper than {MAX_DEPTH} (damaged): left out",
                shown(&path)
            ));
            continue;
        }
        out.push(e);
        if ino.flags & ENCRYPT_FL != 0 {
            warn.push(format!(
                "encrypted directory {}: its files are in the image but not in the file list",
                shown(&path)
            ));
            continue;
        }
        let children = match fs.dir_entries(&ino) {
            Ok(c) => c,
            Err(e) => {
                warn.push(format!("{}: its entries are left out: {e:#}", shown(&path)));
                continue;
            }
        };
        for (name, child) in valid_names(&path, children, warn).into_iter().rev() {
            let mut p = path.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(&name);
            stack.push((p, child, depth + 1));
        }
    }
    Ok(out)
}

/// A directory's entries that can be a Linux path component, the first of duplicate names
/// only, sorted by name.
fn valid_names(
    dir: &[u8],
    children: Vec<(Vec<u8>, u64)>,
    warn: &mut Warnings,
) -> Vec<(Vec<u8>, u64)> {
    let mut seen = HashSet::new();
    let mut keep = Vec::with_capacity(children.len());
    for (name, ino) in children {
        let mut p = dir.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(&name);
        if name.contains(&0) || name.contains(&b'/') {
            warn.push(format!(
                "{}: a name with a NUL or '/' byte (inode {ino}; damaged directory) cannot be a file name: left out",
                shown(&p)
            ));
        } else if !seen.insert(name.clone()) {
            warn.push(format!(
                "{}: a second entry of that name (inode {ino}; damaged directory): the first is kept",
                shown(&p)
            ));
        } else {
            keep.push((name, ino));
        }
    }
    keep.sort();
    keep
}
