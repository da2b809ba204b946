//! Bring a restored filesystem from its image state to the exact state of an incremental:
//! delete what was gone, write what changed, set metadata. Every operation is relative to a
//! directory fd opened without following symlinks, so a restored `etc -> /` symlink can never
//! redirect a write out of the filesystem being restored.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, fstat, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};

use crate::fs::flags;
use crate::repo::reader::ChunkReader;
use crate::repo::toc::{Data, FileKind, FileMeta};
use crate::repo::{Digest, RepoRead};
use crate::util::text::elide_path;

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Directories of the chain kept open (the deepest ones); the others are reopened through
/// ".." when the work climbs back to them.
const OPEN_DIRS: usize = 64;

/// One directory on the way from the root to the last one opened.
struct Level {
    name: Vec<u8>,
    /// (device, inode): what ".." must lead back to.
    id: (u64, u64),
    fd: Option<OwnedFd>,
}

/// Opens directories below the root without ever following a symlink. The chain from the
/// root to the last directory opened is kept, so the next one (a sibling, a child, the
/// parent: the order of a file list) costs one openat, not one per level from the root: a
/// 3,000-level deep tree restores in linear time, with at most OPEN_DIRS descriptors open.
struct Dirs {
    root: OwnedFd,
    chain: Vec<Level>,
}

impl Dirs {
    fn open(&mut self, path: &[u8]) -> Result<&OwnedFd> {
        if path.is_empty() {
            return Ok(&self.root);
        }
        let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        let common = self
            .chain
            .iter()
            .zip(&comps)
            .take_while(|(l, c)| l.name.as_slice() == **c)
            .count();
        let up = self.chain.len() - common;
        if up > 0 && up <= common {
            // Climb: through "..", checked to be the directory that was there.
            while self.chain.len() > common {
                let top = self.chain.pop().context("directory chain")?;
                let depth = self.chain.len();
                if let Some(parent) = self.chain.last_mut()
                    && parent.fd.is_none()
                {
                    let from = top.fd.as_ref().context("directory chain")?;
                    let fd = openat(from.as_fd(), "..", DIR_FLAGS, Mode::empty())?;
                    let st = fstat(fd.as_fd())?;
                    if (st.st_dev, st.st_ino) != parent.id {
                        let shown: Vec<u8> = comps[..depth].join(&b'/');
                        bail!(
                            "directory {} changed while being restored",
                            elide_path(&shown)
                        );
                    }
                    parent.fd = Some(fd);
                }
            }
        } else {
            self.chain.truncate(common);
        }
        if self.chain.last().is_some_and(|l| l.fd.is_none()) {
            self.chain.clear();
        }
        while self.chain.len() < comps.len() {
            let c = comps[self.chain.len()];
            let parent = match self.chain.last() {
                Some(l) => l.fd.as_ref().context("directory chain")?,
                None => &self.root,
            };
            let fd = openat(
                parent.as_fd(),
                OsStr::from_bytes(c),
                DIR_FLAGS,
                Mode::empty(),
            )
            .with_context(|| {
                let upto: Vec<u8> = comps[..=self.chain.len()].join(&b'/');
                format!(
                    "cannot open directory {} without following links",
                    elide_path(&upto)
                )
            })?;
            let st = fstat(fd.as_fd())?;
            self.chain.push(Level {
                name: c.to_vec(),
                id: (st.st_dev, st.st_ino),
                fd: Some(fd),
            });
            let n = self.chain.len();
            if n > OPEN_DIRS {
                self.chain[n - 1 - OPEN_DIRS].fd = None;
            }
        }
        self.chain
            .last()
            .and_then(|l| l.fd.as_ref())
            .context("directory chain")
    }

    /// `path` was removed: no cached directory may stand for it any more.
    fn forget(&mut self, path: &[u8]) {
        let comps = path.split(|&b| b == b'/').count();
        let on_chain = self.chain.len() >= comps
            && self
                .chain
                .iter()
                .zip(path.split(|&b| b == b'/'))
                .all(|(l, c)| l.name.as_slice() == c);
        if on_chain {
            self.chain.clear();
        }
    }

    /// An fd of `path` itself (a regular file or a directory), for its inode flags.
    fn open_entry(&mut self, path: &[u8], kind: FileKind) -> Result<OwnedFd> {
        let (parent, name) = split(path);
        let dir = self.open(parent)?;
        let name = OsStr::from_bytes(if name.is_empty() { b"." } else { name });
        let fl = match kind {
            FileKind::Dir => DIR_FLAGS,
            _ => OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        };
        openat(dir.as_fd(), name, fl, Mode::empty())
            .with_context(|| format!("cannot open {}", elide_path(path)))
    }
}

#[derive(Debug, Default)]
pub struct ApplyStats {
    /// Stored chunk bytes fetched for files kept by incrementals.
    pub chunk_bytes: u64,
    pub removed: u64,
    pub written: u64,
    pub updated: u64,
    /// Entries that could not be restored (each reported on stderr), and those of them left
    /// out because a directory above them could not be made.
    pub failed: u64,
    pub failed_below: u64,
    /// Entries whose inode flags the destination refused (a warning: the data is there).
    pub flags_refused: u64,
}

impl ApplyStats {
    /// An error if any entry failed: `what` says what was restored into where.
    pub fn check(&self, total: usize, what: &str) -> Result<()> {
        if self.failed == 0 {
            return Ok(());
        }
        let below = if self.failed_below > 0 {
            format!(
                " ({} of them below directories that could not be made)",
                self.failed_below
            )
        } else {
            String::new()
        };
        bail!(
            "{} of {total} entries of {what} could not be restored{below}; see above",
            self.failed
        )
    }
}

/// Most entry failures reported one by one; the count covers the rest.
const MAX_REPORTED: u64 = 1000;

fn ts((s, ns): (i64, u32)) -> TimeSpec {
    TimeSpec::new(s, i64::from(ns))
}

fn same_meta(a: &FileMeta, b: &FileMeta) -> bool {
    a.mode == b.mode
        && a.uid == b.uid
        && a.gid == b.gid
        && a.mtime == b.mtime
        && a.xattrs == b.xattrs
        && a.symlink == b.symlink
        && a.rdev == b.rdev
}

/// Reads the base image's filesystem bytes (for files unchanged since the image).
pub trait ImageData {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;
}

struct Applier<'a, 'i> {
    chunks: ChunkReader,
    src: &'a dyn RepoRead,
    image: Option<&'i mut dyn ImageData>,
    snapshot: &'a str,
    dirs: Dirs,
    buf: Vec<u8>,
    stats: ApplyStats,
    /// The first refusal of inode flags, for the warning at the end.
    flags_error: Option<String>,
}

impl Applier<'_, '_> {
    /// One entry could not be restored: say so on one line, and go on with the others.
    fn fail(&mut self, e: anyhow::Error) {
        self.stats.failed += 1;
        if self.stats.failed <= MAX_REPORTED {
            eprintln!("error: {e:#} (snapshot {})", self.snapshot);
        } else if self.stats.failed == MAX_REPORTED + 1 {
            eprintln!("error: more entries could not be restored; the count follows at the end");
        }
    }

    fn write_content(&mut self, f: &File, m: &FileMeta) -> Result<()> {
        let name = elide_path(&m.path);
        let chunks = match &m.data {
            Data::Chunks(c) => c,
            Data::Image {
                extents,
                inline,
                encoded,
            } => {
                let image = self
                    .image
                    .as_mut()
                    .with_context(|| format!("file {name}: no image to read it from"))?;
                if let Some(data) = inline {
                    let n = data.len().min(m.size as usize);
                    f.write_all_at(&data[..n], 0)
                        .with_context(|| format!("cannot write {name}"))?;
                }
                for &(file_off, disk_off, len) in extents {
                    let len = len.min(m.size.saturating_sub(file_off));
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(self.buf.len() as u64) as usize;
                        image.read_at(&mut self.buf[..n], disk_off + done)?;
                        f.write_all_at(&self.buf[..n], file_off + done)
                            .with_context(|| format!("cannot write {name}"))?;
                        done += n as u64;
                    }
                }
                for r in encoded {
                    use crate::fs::read::Compression as C;
                    let len = r.len.min(m.size.saturating_sub(r.file_off));
                    if len == 0 {
                        continue;
                    }
                    let compression = match r.compression.as_str() {
                        "zlib" => C::Zlib,
                        "lzo" => C::Lzo,
                        "zstd" => C::Zstd,
                        other => bail!(
                            "file {name}: compression {other:?} in the file list is unknown to this bmr"
                        ),
                    };
                    let x = crate::fs::read::Encoded {
                        file_off: r.file_off,
                        disk_off: r.disk_off,
                        disk_len: r.disk_len,
                        compression,
                        skip: r.skip,
                        len,
                    };
                    let plain = crate::fs::read::read_encoded(&x, |buf, off| image.read_at(buf, off))
                        .with_context(|| {
                            format!(
                                "file {name}: its {} compressed bytes at file offset {} (image offset {}) do not decode",
                                r.compression, r.file_off, r.disk_off
                            )
                        })?;
                    f.write_all_at(&plain, r.file_off)
                        .with_context(|| format!("cannot write {name}"))?;
                }
                f.set_len(m.size)
                    .with_context(|| format!("cannot size {name}"))?;
                return Ok(());
            }
            Data::None => return Ok(()),
        };
        let mut off = 0u64;
        for (d, len) in chunks {
            if !d.is_empty() {
                let digest = Digest::from_slice(d).context("bad digest")?;
                self.chunks
                    .read(self.src, &digest, None, *len as usize, &mut self.buf)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "file {name}: chunk {digest} is {}: run bmr verify",
                            if e.is_missing() {
                                "missing".to_string()
                            } else {
                                format!("damaged ({e})")
                            }
                        )
                    })?;
                f.write_all_at(&self.buf[..*len as usize], off)
                    .with_context(|| format!("cannot write {name}"))?;
            }
            off += u64::from(*len);
        }
        f.set_len(m.size)
            .with_context(|| format!("cannot size {name}"))?;
        Ok(())
    }

    /// Owner, mode, extended attributes and times of an entry that exists. Each is tried even
    /// when another failed; the error names all that failed.
    fn set_meta(&mut self, m: &FileMeta) -> Result<()> {
        let (parent, name) = split(&m.path);
        let name_os = OsStr::from_bytes(if name.is_empty() { b"." } else { name });
        let shown = elide_path(&m.path);
        let mut failed: Vec<String> = Vec::new();
        let dir = self
            .dirs
            .open(parent)
            .with_context(|| format!("cannot restore {shown}"))?;
        if let Err(e) = fchownat(
            dir.as_fd(),
            name_os,
            Some(Uid::from_raw(m.uid)),
            Some(Gid::from_raw(m.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            failed.push(format!("owner {}:{} ({e})", m.uid, m.gid));
        }
        // Non-symlinks are reached through an O_PATH fd's /proc link: never a path walk.
        let (opath, xpath): (Option<OwnedFd>, PathBuf) = if m.kind == FileKind::Symlink {
            (
                None,
                PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name_os),
            )
        } else {
            let fd = openat(
                dir.as_fd(),
                name_os,
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .with_context(|| format!("cannot open {shown}"))?;
            let p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m.mode)) {
                failed.push(format!("mode {:o} ({e})", m.mode));
            }
            (Some(fd), p)
        };
        let follow = opath.is_some();
        let existing: Vec<std::ffi::OsString> = if follow {
            xattr::list_deref(&xpath)
        } else {
            xattr::list(&xpath)
        }
        .map(|l| l.collect())
        .unwrap_or_default();
        for n in existing {
            if !m.xattrs.iter().any(|(k, _)| k.as_slice() == n.as_bytes()) {
                let _ = if follow {
                    xattr::remove_deref(&xpath, &n)
                } else {
                    xattr::remove(&xpath, &n)
                };
            }
        }
        for (k, v) in &m.xattrs {
            let r = if follow {
                xattr::set_deref(&xpath, OsStr::from_bytes(k), v)
            } else {
                xattr::set(&xpath, OsStr::from_bytes(k), v)
            };
            if let Err(e) = r {
                failed.push(format!("extended attribute {} ({e})", elide_path(k)));
            }
        }
        drop(opath);
        let dir = self.dirs.open(parent)?;
        if let Err(e) = utimensat(
            dir.as_fd(),
            name_os,
            &ts(m.atime),
            &ts(m.mtime),
            UtimensatFlags::NoFollowSymlink,
        ) {
            failed.push(format!("times ({e})"));
        }
        if !failed.is_empty() {
            bail!("cannot set the {} of {shown}", failed.join(", "));
        }
        Ok(())
    }

    /// Create `d`, which is not there, with its content and metadata.
    fn create(&mut self, d: &FileMeta, links: &mut HashMap<u64, Vec<u8>>) -> Result<()> {
        let shown = elide_path(&d.path);
        let (parent, name) = split(&d.path);
        let name_os = OsStr::from_bytes(name);
        let mode = Mode::from_bits_truncate(0o600);
        let dir = self
            .dirs
            .open(parent)
            .with_context(|| format!("cannot restore {shown}"))?;
        match d.kind {
            FileKind::Dir => match mkdirat(dir.as_fd(), name_os, Mode::from_bits_truncate(0o700)) {
                Err(nix::errno::Errno::EEXIST) => {
                    // Restoring files into a directory that already has this subdirectory.
                    openat(dir.as_fd(), name_os, DIR_FLAGS, Mode::empty())
                        .with_context(|| format!("{shown} exists and is not a directory"))?;
                }
                r => r.with_context(|| format!("cannot create directory {shown}"))?,
            },
            FileKind::Symlink => {
                let target = d.symlink.as_deref().map(|v| v.as_slice()).unwrap_or(b"");
                if target.contains(&0) {
                    bail!(
                        "cannot create symlink {shown}: its target {} holds a NUL byte (a damaged file list)",
                        elide_path(target)
                    );
                }
                symlinkat(OsStr::from_bytes(target), dir.as_fd(), name_os).with_context(|| {
                    format!("cannot create symlink {shown} -> {}", elide_path(target))
                })?;
            }
            FileKind::File => {
                if let Some(first) = links.get(&d.inode).filter(|_| d.nlink > 1).cloned() {
                    let (fp, fname) = split(&first);
                    let fdir = openat(
                        self.dirs.open(fp)?.as_fd(),
                        ".",
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )?;
                    let dir = self.dirs.open(parent)?;
                    linkat(
                        fdir.as_fd(),
                        OsStr::from_bytes(fname),
                        dir.as_fd(),
                        name_os,
                        nix::fcntl::AtFlags::empty(),
                    )
                    .with_context(|| format!("cannot link {shown}"))?;
                    return Ok(());
                }
                let fd = openat(
                    dir.as_fd(),
                    name_os,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    mode,
                )
                .with_context(|| {
                    format!("cannot create {shown} (restore into an empty directory)")
                })?;
                // nocow and compression apply only to data written after them.
                if d.flags & flags::BEFORE_DATA != 0 {
                    let _ = flags::update(fd.as_fd(), 0, d.flags & flags::BEFORE_DATA);
                }
                let f = File::from(fd);
                if matches!(d.data, Data::Image { .. }) && self.image.is_none() {
                    bail!(
                        "file {shown}: its data should come from the image but the image does not hold it: the backup is inconsistent"
                    );
                }
                self.write_content(&f, d)?;
                self.stats.written += 1;
                if d.nlink > 1 {
                    links.insert(d.inode, d.path.to_vec());
                }
            }
            FileKind::CharDev | FileKind::BlockDev | FileKind::Fifo | FileKind::Socket => {
                let kind = match d.kind {
                    FileKind::CharDev => SFlag::S_IFCHR,
                    FileKind::BlockDev => SFlag::S_IFBLK,
                    FileKind::Fifo => SFlag::S_IFIFO,
                    _ => SFlag::S_IFSOCK,
                };
                mknodat(
                    dir.as_fd(),
                    name_os,
                    kind,
                    mode,
                    libc::makedev(d.rdev.0, d.rdev.1),
                )
                .with_context(|| format!("cannot create {shown}"))?;
            }
        }
        self.set_meta(d)
    }

    /// Change the inode flags of `path` (a file or directory): clear `clear`, then add `add`.
    fn update_flags(&mut self, path: &[u8], kind: FileKind, clear: u32, add: u32) -> Result<()> {
        let fd = self.dirs.open_entry(path, kind)?;
        flags::update(fd.as_fd(), clear, add).map_err(|e| {
            anyhow!(
                "cannot set the inode flags {:?} of {} ({e})",
                flags::letters(add),
                elide_path(path)
            )
        })
    }
}

/// `current`: the file list of the image (what the mounted filesystem holds now);
/// `desired`: the incremental's complete list. An entry that cannot be restored is reported on
/// stderr and the others are restored; the result counts the failures (`ApplyStats::check`).
pub fn apply(
    src: &dyn RepoRead,
    snapshot: &str,
    root: &Path,
    current: &[FileMeta],
    desired: &[FileMeta],
    image: Option<&mut dyn ImageData>,
) -> Result<ApplyStats> {
    let rootfd = openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", root.display()))?;
    let mut a = Applier {
        chunks: ChunkReader::new()?,
        src,
        image,
        snapshot,
        dirs: Dirs {
            root: rootfd,
            chain: Vec::new(),
        },
        buf: vec![0u8; crate::repo::CHUNK_SIZE as usize],
        stats: ApplyStats::default(),
        flags_error: None,
    };
    let want: HashMap<&[u8], &FileMeta> = desired.iter().map(|m| (m.path.as_slice(), m)).collect();
    let have: HashMap<&[u8], &FileMeta> = current.iter().map(|m| (m.path.as_slice(), m)).collect();
    let keep = |t: &FileMeta| -> bool {
        want.get(t.path.as_slice()).is_some_and(|d| {
            d.kind == t.kind
                && match d.kind {
                    FileKind::File => matches!(d.data, Data::Image { .. }),
                    FileKind::Symlink => d.symlink == t.symlink,
                    FileKind::CharDev | FileKind::BlockDev => d.rdev == t.rdev,
                    _ => true,
                }
        })
    };
    // Immutable and append-only entries can be neither changed nor removed, nor (directories)
    // have entries added or removed: unlock them all first; the last pass locks what the
    // incremental has locked.
    let mut unlocked: HashSet<&[u8]> = HashSet::new();
    for t in current.iter().rev() {
        if t.flags & flags::LOCKING != 0 && matches!(t.kind, FileKind::File | FileKind::Dir) {
            match a.update_flags(&t.path, t.kind, flags::LOCKING, 0) {
                Ok(()) => {
                    unlocked.insert(t.path.as_slice());
                }
                Err(e) => a.fail(e),
            }
        }
    }
    // Directories whose entries or metadata this changes; no other is written to (a read-only
    // btrfs snapshot in the filesystem stays untouched).
    let mut touched: HashSet<Vec<u8>> = HashSet::new();
    // Children come after parents in the list: remove in reverse order.
    for t in current.iter().rev() {
        if t.path.is_empty() || keep(t) {
            continue;
        }
        let (parent, name) = split(&t.path);
        let flag = if t.kind == FileKind::Dir {
            UnlinkatFlags::RemoveDir
        } else {
            UnlinkatFlags::NoRemoveDir
        };
        let shown = elide_path(&t.path);
        let r = a
            .dirs
            .open(parent)
            .with_context(|| format!("cannot remove {shown}"))
            .and_then(|dir| {
                unlinkat(dir.as_fd(), OsStr::from_bytes(name), flag)
                    .with_context(|| format!("cannot remove {shown}"))
            });
        if t.kind == FileKind::Dir {
            a.dirs.forget(&t.path);
        }
        match r {
            Ok(()) => a.stats.removed += 1,
            Err(e) => a.fail(e),
        }
        touched.insert(parent.to_vec());
    }
    let mut links: HashMap<u64, Vec<u8>> = HashMap::new();
    // Directories that could not be made: what lies below them is left out, counted.
    let mut broken: HashSet<&[u8]> = HashSet::new();
    for d in desired {
        let kept = have.get(d.path.as_slice()).filter(|t| keep(t));
        if d.path.is_empty() {
            if kept.is_none_or(|t| !same_meta(t, d))
                && let Err(e) = a.set_meta(d)
            {
                a.fail(e);
            }
            continue;
        }
        let (parent, _) = split(&d.path);
        if broken.contains(parent) {
            if d.kind == FileKind::Dir {
                broken.insert(&d.path);
            }
            a.stats.failed += 1;
            a.stats.failed_below += 1;
            continue;
        }
        if kept.is_none() {
            touched.insert(parent.to_vec());
            if d.kind == FileKind::Dir {
                touched.insert(d.path.to_vec());
            }
            if let Err(e) = a.create(d, &mut links) {
                // A directory that does not exist takes its entries with it.
                if d.kind == FileKind::Dir && a.dirs.open(&d.path).is_err() {
                    broken.insert(&d.path);
                }
                a.fail(e);
            }
        } else if kept.is_some_and(|t| !same_meta(t, d)) {
            match a.set_meta(d) {
                Ok(()) => a.stats.updated += 1,
                Err(e) => a.fail(e),
            }
            if d.kind == FileKind::Dir {
                touched.insert(d.path.to_vec());
            }
        } else if d.kind == FileKind::File && d.nlink > 1 {
            links.entry(d.inode).or_insert_with(|| d.path.to_vec());
        }
    }
    // Creating and removing entries changed directory times: set them last, deepest first.
    for d in desired
        .iter()
        .rev()
        .filter(|d| d.kind == FileKind::Dir && touched.contains(d.path.as_slice()))
    {
        if broken.contains(d.path.as_slice()) {
            continue;
        }
        let (parent, name) = split(&d.path);
        let name_os = OsStr::from_bytes(if name.is_empty() { b"." } else { name });
        let r = a.dirs.open(parent).and_then(|dir| {
            utimensat(
                dir.as_fd(),
                name_os,
                &ts(d.atime),
                &ts(d.mtime),
                UtimensatFlags::NoFollowSymlink,
            )
            .with_context(|| format!("cannot set the times of {}", elide_path(&d.path)))
        });
        if let Err(e) = r {
            a.fail(e);
        }
    }
    // Inode flags last, deepest first: immutable and append-only forbid what came before
    // (setting them changes no times). A destination without them is worth a warning only.
    for d in desired.iter().rev() {
        if !matches!(d.kind, FileKind::File | FileKind::Dir) {
            continue;
        }
        let (parent, _) = split(&d.path);
        if broken.contains(d.path.as_slice()) || (!d.path.is_empty() && broken.contains(parent)) {
            continue;
        }
        let before = have.get(d.path.as_slice()).filter(|t| keep(t));
        let needed = match before {
            Some(t) => t.flags != d.flags || unlocked.contains(d.path.as_slice()),
            // New: its own flags, or what it may have inherited from its directory.
            None => {
                d.flags != 0
                    || have
                        .get(parent)
                        .or_else(|| want.get(parent))
                        .is_some_and(|p| p.flags != 0)
            }
        };
        if !needed {
            continue;
        }
        if let Err(e) = a.update_flags(&d.path, d.kind, flags::SETTABLE, d.flags) {
            a.stats.flags_refused += 1;
            if a.flags_error.is_none() {
                a.flags_error = Some(format!("{e:#}"));
            }
        }
    }
    if let Some(e) = &a.flags_error {
        eprintln!(
            "warning: {} entries keep other inode flags (lsattr) than snapshot {snapshot} recorded, the filesystem at {} refused them; the first: {e}",
            a.stats.flags_refused,
            root.display()
        );
    }
    a.stats.chunk_bytes = a.chunks.fetched;
    Ok(a.stats)
}
