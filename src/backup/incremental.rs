//! File-level incremental backups of the mounted filesystems of a host's last image.
//!
//! Each incremental records the complete list of paths present (so deletions are known) with
//! full metadata; data is stored only for files that changed (mtime, ctime, size, inode or
//! type differ from the previous backup), chunked and deduplicated like image data. Files
//! unchanged since the image keep pointing at the image's blocks.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, fstat, fstatat};

use anyhow::{Context, Result, bail};
use serde_bytes::ByteBuf;

use super::subvol::{self, Snapshot, SubvolIds};
use crate::device::safety::mount_field;
use crate::repo::manifest::{
    FsKey, IncFs, IncManifest, Kind, MANIFEST_FORMAT, MANIFEST_VERSION, Stats, TocRef,
};
use crate::repo::snapshot::SnapshotWriter;
use crate::repo::toc::{Data, FileKind, FileMeta, TocWriter};
use crate::repo::{CHUNK_SIZE, Digest, RepoWrite};
use crate::util::progress::human_bytes;

pub struct IncSummary {
    pub id: String,
    pub changed: u64,
    pub deleted: u64,
    pub files: u64,
    pub new_bytes: u64,
    pub elapsed: std::time::Duration,
}

/// The mount covering `mp` exactly, from /proc/self/mountinfo.
struct MountOf {
    source: String,
    fstype: String,
    /// The directory of the filesystem mounted there, relative to its root ("" for the
    /// whole filesystem; "@" for a btrfs subvolume mounted with subvol=@, or a bind mount's
    /// directory).
    root: Vec<u8>,
}

fn mount_of(mp: &Path) -> Result<MountOf> {
    use std::os::unix::ffi::OsStrExt;
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let want = mp.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.get(4).map(|p| mount_field(p)).as_deref() == Some(want) {
            // The last matching line is the visible mount.
            let root = mount_field(f.get(3).copied().unwrap_or("/"));
            found = Some(MountOf {
                source: f.get(sep + 2).copied().unwrap_or("").to_string(),
                fstype: f.get(sep + 1).copied().unwrap_or("").to_string(),
                root: root
                    .split(|&c| c == b'/')
                    .filter(|c| !c.is_empty())
                    .collect::<Vec<_>>()
                    .join(&b'/'),
            });
        }
    }
    found.with_context(|| {
        format!(
            "{} is not a mount point: name the mount point of a filesystem of the image",
            mp.display()
        )
    })
}

fn kind_of(mode: u32) -> FileKind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFCHR => FileKind::CharDev,
        libc::S_IFBLK => FileKind::BlockDev,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        _ => FileKind::File,
    }
}

/// `name` in the directory `dir` as a path the xattr calls (the l* ones: never following the
/// last component) and the btrfs ioctls take: short at any depth of the tree.
fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

/// The file list entry of `name` in `dir` (`shown`: its path for messages).
fn meta_of(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    rel: &[u8],
    st: &FileStat,
    flags: u32,
    shown: &str,
) -> Result<FileMeta> {
    let kind = kind_of(st.st_mode);
    let symlink = if kind == FileKind::Symlink {
        let t = readlinkat(dir, name).with_context(|| format!("cannot read link {shown}"))?;
        Some(ByteBuf::from(t.as_bytes().to_vec()))
    } else {
        None
    };
    let mut xattrs = Vec::new();
    // The l* calls: symlinks' own xattrs; sockets and fifos need no open either.
    let xpath = proc_path(dir, name);
    if let Ok(names) = xattr::list(&xpath) {
        for n in names {
            if let Ok(Some(v)) = xattr::get(&xpath, &n) {
                xattrs.push((ByteBuf::from(n.as_bytes().to_vec()), ByteBuf::from(v)));
            }
        }
    }
    xattrs.sort();
    let rdev = st.st_rdev;
    Ok(FileMeta {
        path: ByteBuf::from(rel.to_vec()),
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        ctime: (st.st_ctime, st.st_ctime_nsec as u32),
        atime: (st.st_atime, st.st_atime_nsec as u32),
        inode: st.st_ino,
        nlink: st.st_nlink as u32,
        rdev: if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
            (libc::major(rdev), libc::minor(rdev))
        } else {
            (0, 0)
        },
        symlink,
        xattrs,
        data: Data::None,
        subvol: None,
        flags,
    })
}

/// Store a file's content as chunks; all-zero pieces are holes (empty digest).
fn store_file(
    repo: &dyn RepoWrite,
    mut f: File,
    shown: &str,
    comp: &mut zstd::bulk::Compressor,
    stats: &mut Stats,
) -> Result<Data> {
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = f
                .read(&mut buf[n..])
                .with_context(|| format!("cannot read {shown}"))?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        let piece = &buf[..n];
        if piece.iter().all(|&b| b == 0) {
            chunks.push((ByteBuf::new(), n as u32));
        } else {
            let d = Digest::of(piece);
            if repo.chunk_info(&d, n as u64, false).is_none() {
                let z = comp.compress(piece).context("zstd compression failed")?;
                let damaged = repo.chunk_len(&d)?.is_some();
                let (len, _, new) = repo.put_chunk(&d, &z, damaged)?;
                if damaged {
                    eprintln!("repaired damaged chunk {d}: rewritten from this backup's data");
                }
                if new {
                    stats.new_chunks += 1;
                    stats.new_bytes += len;
                }
            }
            stats.chunks += 1;
            chunks.push((ByteBuf::from(d.0.to_vec()), n as u32));
        }
        stats.used_bytes += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok(Data::Chunks(chunks))
}

/// Directories are opened without following links, so a symlink swapped in for a directory
/// while the walk runs can never lead it elsewhere.
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// The names in an open directory, sorted (the file list's order).
fn names_of(dir: BorrowedFd<'_>, shown: &str) -> Result<Vec<OsString>> {
    // Through the fd's /proc link: a short path at any depth.
    let mut names: Vec<OsString> = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .with_context(|| format!("cannot list {shown}"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {shown}"))?;
    names.sort();
    Ok(names)
}

/// A directory the walk is in: its entries still to visit and its identity (device, inode),
/// checked when the walk climbs back to it through "..".
struct Frame {
    rel: Vec<u8>,
    names: std::vec::IntoIter<OsString>,
    id: (u64, u64),
}

/// One filesystem of the image being walked: its previous file list, what the walks found,
/// and which parts of it they covered.
struct Walker<'a> {
    repo: &'a dyn RepoWrite,
    /// The previous file list; what is left after the walks was deleted or not covered.
    prev: HashMap<Vec<u8>, FileMeta>,
    out: BTreeMap<Vec<u8>, FileMeta>,
    /// Directories inside a walk that the walk did not enter (other mounts, btrfs subvolumes
    /// not mounted on their own): their previous entries stay.
    skipped: Vec<Vec<u8>>,
    /// The device the current walk stays on.
    dev: u64,
    /// btrfs: subvolume ids (the file list's inode numbers carry them).
    subvols: Option<SubvolIds>,
    comp: zstd::bulk::Compressor<'static>,
    stats: Stats,
    changed: u64,
    links: HashMap<u64, Data>,
    /// The current walk's mount point, and the length of its directory's path in the file
    /// list: for messages.
    mp: Vec<u8>,
    prefix_len: usize,
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut r = rel.to_vec();
    if !r.is_empty() {
        r.push(b'/');
    }
    r.extend_from_slice(name);
    r
}

/// `path` is `prefix` or below it.
fn under(path: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty()
        || (path.starts_with(prefix) && (path.len() == prefix.len() || path[prefix.len()] == b'/'))
}

impl Walker<'_> {
    /// `rel` (a path of the file list) as this walk's mount point and the path below it.
    fn shown(&self, rel: &[u8]) -> String {
        let mut p = self.mp.clone();
        let below = rel.get(self.prefix_len..).unwrap_or(rel);
        let below = below.strip_prefix(b"/").unwrap_or(below);
        if !below.is_empty() {
            p.push(b'/');
            p.extend_from_slice(below);
        }
        crate::util::text::elide_path(&p)
    }

    /// Walk the tree at `top`, the directory `prefix` of the filesystem. One directory is open
    /// at a time and the walk climbs back through "..", so a tree of any depth needs neither
    /// more file descriptors nor paths longer than PATH_MAX, and each step costs the same.
    fn walk(&mut self, top: &Path, prefix: Vec<u8>) -> Result<()> {
        self.mp = top.as_os_str().as_bytes().to_vec();
        self.prefix_len = prefix.len();
        let tfd = nix::fcntl::open(top, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
            .with_context(|| format!("cannot open {}", top.display()))?;
        let Some((mut cur, st)) = self.visit(tfd.as_fd(), OsStr::new("."), prefix.clone(), true)?
        else {
            return Ok(());
        };
        let names = names_of(cur.as_fd(), &self.shown(&prefix))?;
        let mut stack = vec![Frame {
            rel: prefix,
            names: names.into_iter(),
            id: (st.st_dev, st.st_ino),
        }];
        while let Some(f) = stack.last_mut() {
            if let Some(n) = f.names.next() {
                let rel = join(&f.rel, n.as_bytes());
                if let Some((fd, st)) = self.visit(cur.as_fd(), &n, rel.clone(), false)? {
                    let names = names_of(fd.as_fd(), &self.shown(&rel))?;
                    stack.push(Frame {
                        rel,
                        names: names.into_iter(),
                        id: (st.st_dev, st.st_ino),
                    });
                    cur = fd;
                }
                continue;
            }
            let done = stack.pop().map(|f| f.rel).unwrap_or_default();
            if let Some(parent) = stack.last() {
                let up =
                    openat(cur.as_fd(), "..", DIR_FLAGS, Mode::empty()).with_context(|| {
                        format!("cannot open the directory above {}", self.shown(&done))
                    })?;
                let st = fstat(up.as_fd())?;
                if (st.st_dev, st.st_ino) != parent.id {
                    bail!(
                        "{} was moved while the backup read it: run the backup again",
                        self.shown(&done)
                    );
                }
                cur = up;
            }
        }
        Ok(())
    }

    /// Record `name` in `dir`; a directory to walk into comes back open, with its stat.
    fn visit(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: Vec<u8>,
        top: bool,
    ) -> Result<Option<(OwnedFd, FileStat)>> {
        let shown = self.shown(&rel);
        let mut st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .with_context(|| format!("cannot stat {shown}"))?;
        let kind = kind_of(st.st_mode);
        let is_dir = kind == FileKind::Dir;
        let placeholder =
            self.subvols.is_some() && is_dir && st.st_ino == subvol::EMPTY_SUBVOL_DIR_INO;
        if !top && is_dir && (st.st_dev != self.dev || placeholder) {
            // Another mount, a btrfs subvolume of its own, or (in a snapshot) the stand-in of
            // one: what the previous list says of it and below it still holds.
            let m = match self.prev.get(&rel) {
                Some(p) => p.clone(),
                None if placeholder => return Ok(None),
                None => meta_of(dir, name, &rel, &st, 0, &shown)?,
            };
            self.out.insert(rel.clone(), m);
            self.skipped.push(rel);
            return Ok(None);
        }
        // Files and directories are opened once: for their flags, then their data or entries.
        // Devices, fifos and sockets are not opened (that could act on a device).
        let fd = match kind {
            FileKind::File | FileKind::Dir => {
                let mut fl = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                fl |= if is_dir {
                    OFlag::O_DIRECTORY
                } else {
                    OFlag::O_NONBLOCK
                };
                let fd = openat(dir, name, fl, Mode::empty())
                    .with_context(|| format!("cannot open {shown}"))?;
                // What was opened is what gets recorded, should the file have been replaced.
                st = fstat(fd.as_fd()).with_context(|| format!("cannot stat {shown}"))?;
                Some(fd)
            }
            _ => None,
        };
        let flags = match &fd {
            Some(fd) => crate::fs::flags::get(fd.as_fd())
                .with_context(|| format!("cannot read the inode flags of {shown}"))?
                .unwrap_or(0),
            None => 0,
        };
        let mut m = meta_of(dir, name, &rel, &st, flags, &shown)?;
        if let Some(ids) = &mut self.subvols {
            let id = ids.of(st.st_dev, &proc_path(dir, name))?;
            m.inode = subvol::toc_inode(id, st.st_ino);
            if is_dir && st.st_ino == subvol::SUBVOL_ROOT_INO {
                m.subvol = Some(id);
            }
        }
        let prev = self.prev.remove(&rel);
        let mut fd = fd;
        if let Some(p) = prev.filter(|p| p.unchanged(&m)) {
            // Metadata-only changes (chmod, chown, xattrs, chattr) move ctime too, so an
            // unchanged ctime means the previous metadata still holds.
            m.data = p.data;
        } else {
            self.changed += 1;
            if m.kind == FileKind::File {
                m.data = match self.links.get(&m.inode).filter(|_| m.nlink > 1) {
                    Some(d) => d.clone(),
                    None => {
                        let f = File::from(fd.take().context("file not open")?);
                        store_file(self.repo, f, &shown, &mut self.comp, &mut self.stats)?
                    }
                };
            }
        }
        if m.kind == FileKind::File && m.nlink > 1 {
            self.links.entry(m.inode).or_insert_with(|| m.data.clone());
        }
        self.out.insert(rel, m);
        Ok(if is_dir { fd.map(|fd| (fd, st)) } else { None })
    }

    /// The new file list: what the walks found, plus the previous entries outside what they
    /// covered (`covered`: the walked directories). Ok(list, deleted).
    fn finish(mut self, covered: &[Vec<u8>]) -> Result<(Vec<FileMeta>, u64)> {
        let mut deleted = 0;
        for (path, p) in std::mem::take(&mut self.prev) {
            // The most specific walked or skipped directory above the entry decides.
            let walked = covered
                .iter()
                .filter(|c| under(&path, c))
                .map(|c| c.len())
                .max();
            let skipped = self
                .skipped
                .iter()
                .filter(|c| under(&path, c))
                .map(|c| c.len())
                .max();
            match (walked, skipped) {
                (Some(w), s) if s.is_none_or(|s| s < w) => deleted += 1,
                _ => {
                    self.out.entry(path).or_insert(p);
                }
            }
        }
        for path in self.out.keys() {
            if path.is_empty() {
                continue;
            }
            let parent = path
                .iter()
                .rposition(|&c| c == b'/')
                .map_or(&path[..0], |i| &path[..i]);
            if !self.out.contains_key(parent) {
                bail!(
                    "{} is in no directory of the image's file list: take a new image backup",
                    crate::util::text::elide_path(path)
                );
            }
        }
        Ok((self.out.into_values().collect(), deleted))
    }
}

/// A named mount point: where its filesystem is, and what is walked for it.
struct Cover {
    mp: PathBuf,
    /// The mounted device.
    source: String,
    uuid: String,
    /// The mounted directory's path in the filesystem ("" = its root).
    prefix: Vec<u8>,
    btrfs: bool,
}

pub fn run(
    repo_path: &Path,
    host: &str,
    mountpoints: &[PathBuf],
    differential: bool,
    snapshot: Option<super::SnapshotMode>,
) -> Result<IncSummary> {
    let start = std::time::Instant::now();
    let snapshot_btrfs = match snapshot {
        None => false,
        Some(super::SnapshotMode::Btrfs) => true,
        Some(super::SnapshotMode::Lvm) => bail!(
            "--snapshot lvm is for image backups; an incremental reads mounted filesystems (btrfs ones can use --snapshot btrfs)"
        ),
    };
    crate::repo::check_host_name(host)?;
    let repo = crate::repo::open_write(repo_path, false)?;
    let repo = repo.as_ref();
    let sw = SnapshotWriter::begin(repo, host)?;
    let idx = crate::repo::manifest::read_host_index(repo, host)?;
    let base_sum = idx
        .snapshots
        .iter()
        .filter(|s| s.kind == Kind::Image)
        .enumerate()
        .max_by_key(|(i, s)| (s.unix_time, *i))
        .map(|(_, s)| s)
        .with_context(|| {
            format!("host {host} has no image backup yet: take one with bmr backup first")
        })?;
    let base = crate::repo::manifest::read_manifest(repo, host, &base_sum.id)?;
    // The newest backup of any kind on this base: the parent, unless --differential.
    let latest = idx
        .snapshots
        .iter()
        .filter(|s| s.id == base.id || s.base.as_deref() == Some(&base.id))
        .enumerate()
        .max_by_key(|(i, s)| (s.unix_time, *i))
        .map(|(_, s)| s)
        .map_or(base.id.clone(), |s| s.id.clone());
    let parent_id = if differential {
        base.id.clone()
    } else {
        latest.clone()
    };
    // Which filesystem of the image each mount point holds, before anything is stored.
    // Mount points of one filesystem (btrfs subvolumes) share its file list.
    let mut areas: BTreeMap<FsKey, Vec<Cover>> = BTreeMap::new();
    for mp in mountpoints {
        let mp =
            std::fs::canonicalize(mp).with_context(|| format!("cannot find {}", mp.display()))?;
        let mnt = mount_of(&mp)?;
        let dev = File::open(&mnt.source)
            .with_context(|| format!("cannot open {} (mounted on {})", mnt.source, mp.display()))?;
        let uuid = crate::fs::map::probe_uuid(&dev).with_context(|| {
            format!(
                "cannot read the filesystem UUID of {} (mounted on {})",
                mnt.source,
                mp.display()
            )
        })?;
        let Some(base_toc) = base
            .tocs
            .iter()
            .find(|t| t.uuid.as_deref() == Some(uuid.as_str()))
        else {
            let found = base.areas.iter().find_map(|a| {
                a.volumes
                    .iter()
                    .find(|v| v.fs.as_ref().and_then(|f| f.uuid.as_deref()) == Some(uuid.as_str()))
                    .map(|v| (a, v))
            });
            if let Some((a, lv)) = found
                && a.luks.as_ref().is_some_and(|l| !l.plaintext)
            {
                bail!(
                    "{} is in LUKS volume {}, whose file list image {} of host {host} did not store (it would be plaintext in the repository): take the image with --allow-plaintext-luks if the repository may hold this volume's files in the clear, then incrementals work",
                    mp.display(),
                    lv.name,
                    base.id
                );
            }
            if let Some((_, lv)) = found {
                bail!(
                    "{} is logical volume {} of image {} of host {host}, which has no file list of it (an image from an older bmr, or its tree could not be read: see its warnings in bmr list --json): take a new image backup of the disk, then incrementals work",
                    mp.display(),
                    lv.name,
                    base.id
                );
            }
            bail!(
                "{} holds filesystem {uuid}, which has no file list in image {} of host {host}: take a new image backup",
                mp.display(),
                base.id
            );
        };
        let btrfs = mnt.fstype == "btrfs";
        if snapshot_btrfs && !btrfs {
            bail!(
                "--snapshot btrfs: {} is {}, not btrfs: back it up in a separate run without --snapshot",
                mp.display(),
                mnt.fstype
            );
        }
        let covers = areas.entry(base_toc.key()).or_default();
        if covers.iter().any(|c| c.prefix == mnt.root) {
            bail!(
                "{} is the same directory of filesystem {uuid} as another mount point named: name it once",
                mp.display()
            );
        }
        covers.push(Cover {
            mp,
            source: mnt.source,
            uuid,
            prefix: mnt.root,
            btrfs,
        });
    }
    // A restore to this point applies only the filesystems named here: one the newest backup
    // also covered would silently go back to the image's state.
    if latest != base.id {
        let newest = crate::repo::manifest::read_inc_manifest(repo, host, &latest)?;
        if let Some(f) = newest
            .filesystems
            .iter()
            .find(|f| !areas.contains_key(&f.toc.key()))
        {
            bail!(
                "incremental {latest} also covered {}: name it too (a restore to this point would lose its changes), or take a new image backup",
                f.mountpoint
            );
        }
    }
    let parent_tocs: Vec<(TocRef, String)> = if parent_id == base.id {
        base.tocs
            .iter()
            .map(|t| (t.clone(), base.id.clone()))
            .collect()
    } else {
        let p = crate::repo::manifest::read_inc_manifest(repo, host, &parent_id)?;
        p.filesystems
            .iter()
            .map(|f| (f.toc.clone(), p.id.clone()))
            .collect()
    };
    let id = sw.id.clone();
    let mut filesystems = Vec::new();
    let mut stats = Stats::default();
    let (mut changed, mut deleted, mut files) = (0, 0, 0);
    for (key, mut covers) in areas {
        let base_toc = base
            .tocs
            .iter()
            .find(|t| t.key() == key)
            .context("image file list vanished")?;
        let area = key.0;
        let volume = match &key.1 {
            Some(v) => Some(
                base.volume(area, v)
                    .with_context(|| format!("image {} has no logical volume {v}", base.id))?
                    .0,
            ),
            None => None,
        };
        let prev: HashMap<Vec<u8>, FileMeta> =
            match parent_tocs.iter().find(|(t, _)| t.key() == key) {
                Some((t, sid)) => crate::repo::manifest::read_toc(repo, host, sid, t)?
                    .into_iter()
                    .map(|m| (m.path.to_vec(), m))
                    .collect(),
                None => HashMap::new(),
            };
        // The whole filesystem first, then its subvolumes: the most specific walk of a
        // directory has the last word.
        covers.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        let mut w = Walker {
            repo,
            prev,
            out: BTreeMap::new(),
            skipped: Vec::new(),
            dev: 0,
            subvols: covers[0].btrfs.then(SubvolIds::default),
            comp: zstd::bulk::Compressor::new(3)?,
            stats: Stats::default(),
            changed: 0,
            links: HashMap::new(),
            mp: Vec::new(),
            prefix_len: 0,
        };
        for c in &covers {
            let snap = if snapshot_btrfs {
                Some(Snapshot::take(&c.mp, &c.source, &c.prefix)?)
            } else {
                None
            };
            let dir = snap.as_ref().map_or(c.mp.as_path(), |s| s.path.as_path());
            w.dev = std::fs::metadata(dir)
                .with_context(|| format!("cannot stat {}", dir.display()))?
                .dev();
            if let (Some(s), Some(ids)) = (&snap, &mut w.subvols) {
                ids.set(w.dev, s.source_id);
            }
            w.walk(dir, c.prefix.clone())?;
            // A directory walked explicitly is not skipped by the walk of its parent.
            w.skipped.retain(|s| s != &c.prefix);
        }
        let ch = w.changed;
        let ws = w.stats.clone();
        let covered: Vec<Vec<u8>> = covers.iter().map(|c| c.prefix.clone()).collect();
        let (list, del) = w.finish(&covered)?;
        let mut out = TocWriter::new(sw.toc_file(area, volume)?)?;
        for m in &list {
            out.push(m)?;
        }
        let (f, count) = out.finish()?;
        // Chunks first, then the file list that names them.
        let (sha256, len) = sw.commit_file(f)?;
        filesystems.push(IncFs {
            mountpoint: covers
                .iter()
                .map(|c| c.mp.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            toc: TocRef {
                area,
                volume: key.1.clone(),
                system: base_toc.system,
                fstype: base_toc.fstype.clone(),
                uuid: Some(covers[0].uuid.clone()),
                file: crate::repo::paths::toc_name(&id, area, volume),
                sha256,
                len,
                entries: count,
            },
            changed: ch,
            deleted: del,
        });
        files += count;
        changed += ch;
        deleted += del;
        stats.used_bytes += ws.used_bytes;
        stats.chunks += ws.chunks;
        stats.new_chunks += ws.new_chunks;
        stats.new_bytes += ws.new_bytes;
    }
    let m = IncManifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        id: id.clone(),
        host: host.to_string(),
        kind: Kind::Incremental,
        time: sw.time.clone(),
        unix_time: sw.unix_time,
        bmr_version: env!("CARGO_PKG_VERSION").into(),
        base: base.id.clone(),
        parent: parent_id,
        differential,
        filesystems,
        stats: stats.clone(),
    };
    sw.commit_incremental(&m, base.disk.size)?;
    Ok(IncSummary {
        id,
        changed,
        deleted,
        files,
        new_bytes: stats.new_bytes,
        elapsed: start.elapsed(),
    })
}

pub fn print_summary(s: &IncSummary) {
    println!(
        "incremental {}: {} files, {} changed, {} deleted, {} new in the repository, {:.1}s",
        s.id,
        s.files,
        s.changed,
        s.deleted,
        human_bytes(s.new_bytes),
        s.elapsed.as_secs_f64()
    );
}
