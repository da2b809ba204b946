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

use anyhow::{Context, Result, bail};
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};

use crate::repo::reader::ChunkReader;
use crate::repo::toc::{Data, FileKind, FileMeta};
use crate::repo::{Digest, RepoRead};

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// Opens directories below the root without ever following a symlink.
struct Dirs {
    root: OwnedFd,
    last: Option<(Vec<u8>, OwnedFd)>,
}

impl Dirs {
    fn open(&mut self, path: &[u8]) -> Result<&OwnedFd> {
        if path.is_empty() {
            return Ok(&self.root);
        }
        if self.last.as_ref().is_none_or(|(p, _)| p != path) {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let mut fd = openat(self.root.as_fd(), ".", flags, Mode::empty())?;
            for c in path.split(|&b| b == b'/') {
                fd = openat(fd.as_fd(), OsStr::from_bytes(c), flags, Mode::empty()).with_context(
                    || {
                        format!(
                            "cannot open directory {:?} without following links",
                            String::from_utf8_lossy(path)
                        )
                    },
                )?;
            }
            self.last = Some((path.to_vec(), fd));
        }
        Ok(&self.last.as_ref().context("directory cache")?.1)
    }
}

#[derive(Debug, Default)]
pub struct ApplyStats {
    /// Stored chunk bytes fetched for files kept by incrementals.
    pub chunk_bytes: u64,
    pub removed: u64,
    pub written: u64,
    pub updated: u64,
}

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
}

impl Applier<'_, '_> {
    fn write_content(&mut self, f: &File, m: &FileMeta) -> Result<()> {
        let name = String::from_utf8_lossy(&m.path).into_owned();
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
                    .with_context(|| format!("file {name:?}: no image to read it from"))?;
                if let Some(data) = inline {
                    let n = data.len().min(m.size as usize);
                    f.write_all_at(&data[..n], 0)
                        .with_context(|| format!("cannot write {name:?}"))?;
                }
                for &(file_off, disk_off, len) in extents {
                    let len = len.min(m.size.saturating_sub(file_off));
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(self.buf.len() as u64) as usize;
                        image.read_at(&mut self.buf[..n], disk_off + done)?;
                        f.write_all_at(&self.buf[..n], file_off + done)
                            .with_context(|| format!("cannot write {name:?}"))?;
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
                            "file {name:?}: compression {other:?} in the file list is unknown to this bmr"
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
                                "file {name:?}: its {} compressed bytes at file offset {} (image offset {}) do not decode",
                                r.compression, r.file_off, r.disk_off
                            )
                        })?;
                    f.write_all_at(&plain, r.file_off)
                        .with_context(|| format!("cannot write {name:?}"))?;
                }
                f.set_len(m.size)
                    .with_context(|| format!("cannot size {name:?}"))?;
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
                            "file {name:?} of snapshot {}: chunk {digest} is {}: run bmr verify",
                            self.snapshot,
                            if e.is_missing() {
                                "missing".to_string()
                            } else {
                                format!("damaged ({e})")
                            }
                        )
                    })?;
                f.write_all_at(&self.buf[..*len as usize], off)
                    .with_context(|| format!("cannot write {name:?}"))?;
            }
            off += u64::from(*len);
        }
        f.set_len(m.size)
            .with_context(|| format!("cannot size {name:?}"))?;
        Ok(())
    }

    fn set_meta(&mut self, m: &FileMeta) -> Result<()> {
        let (parent, name) = split(&m.path);
        let name_os = OsStr::from_bytes(if name.is_empty() { b"." } else { name });
        let shown = String::from_utf8_lossy(&m.path).into_owned();
        let dir = self.dirs.open(parent)?;
        fchownat(
            dir.as_fd(),
            name_os,
            Some(Uid::from_raw(m.uid)),
            Some(Gid::from_raw(m.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("cannot chown {shown:?}"))?;
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
            .with_context(|| format!("cannot open {shown:?}"))?;
            let p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m.mode))
                .with_context(|| format!("cannot chmod {shown:?}"))?;
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
            let k = OsStr::from_bytes(k);
            let r = if follow {
                xattr::set_deref(&xpath, k, v)
            } else {
                xattr::set(&xpath, k, v)
            };
            r.with_context(|| format!("cannot set extended attribute {k:?} on {shown:?}"))?;
        }
        drop(opath);
        let dir = self.dirs.open(parent)?;
        utimensat(
            dir.as_fd(),
            name_os,
            &ts(m.atime),
            &ts(m.mtime),
            UtimensatFlags::NoFollowSymlink,
        )
        .with_context(|| format!("cannot set the times of {shown:?}"))?;
        Ok(())
    }
}

/// `current`: the file list of the image (what the mounted filesystem holds now);
/// `desired`: the incremental's complete list.
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
            last: None,
        },
        buf: vec![0u8; crate::repo::CHUNK_SIZE as usize],
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
    let mut stats = ApplyStats::default();
    // Directories whose entries or metadata this changes; no other is written to (a read-only
    // btrfs snapshot in the filesystem stays untouched).
    let mut touched: HashSet<Vec<u8>> = HashSet::new();
    // Children come after parents in the list: remove in reverse order.
    for t in current.iter().rev() {
        if t.path.is_empty() || keep(t) {
            continue;
        }
        let (parent, name) = split(&t.path);
        let dir = a.dirs.open(parent)?;
        let flag = if t.kind == FileKind::Dir {
            UnlinkatFlags::RemoveDir
        } else {
            UnlinkatFlags::NoRemoveDir
        };
        unlinkat(dir.as_fd(), OsStr::from_bytes(name), flag)
            .with_context(|| format!("cannot remove {:?}", String::from_utf8_lossy(&t.path)))?;
        stats.removed += 1;
        touched.insert(parent.to_vec());
    }
    let mut links: HashMap<u64, Vec<u8>> = HashMap::new();
    for d in desired {
        let shown = String::from_utf8_lossy(&d.path).into_owned();
        let kept = have.get(d.path.as_slice()).filter(|t| keep(t));
        if d.path.is_empty() {
            if kept.is_none_or(|t| !same_meta(t, d)) {
                a.set_meta(d)?;
            }
            continue;
        }
        let (parent, name) = split(&d.path);
        let name_os = OsStr::from_bytes(name);
        if kept.is_none() {
            touched.insert(parent.to_vec());
            if d.kind == FileKind::Dir {
                touched.insert(d.path.to_vec());
            }
            let dir = a.dirs.open(parent)?;
            let mode = Mode::from_bits_truncate(0o600);
            match d.kind {
                FileKind::Dir => {
                    match mkdirat(dir.as_fd(), name_os, Mode::from_bits_truncate(0o700)) {
                        Err(nix::errno::Errno::EEXIST) => {
                            // Restoring files into a directory that already has this subdirectory.
                            openat(
                                dir.as_fd(),
                                name_os,
                                OFlag::O_RDONLY
                                    | OFlag::O_DIRECTORY
                                    | OFlag::O_NOFOLLOW
                                    | OFlag::O_CLOEXEC,
                                Mode::empty(),
                            )
                            .with_context(|| format!("{shown:?} exists and is not a directory"))?;
                        }
                        r => r.with_context(|| format!("cannot create directory {shown:?}"))?,
                    }
                }
                FileKind::Symlink => {
                    let target = d.symlink.as_deref().map(|v| v.as_slice()).unwrap_or(b"");
                    symlinkat(OsStr::from_bytes(target), dir.as_fd(), name_os)?;
                }
                FileKind::File => {
                    if let Some(first) = links.get(&d.inode).filter(|_| d.nlink > 1).cloned() {
                        let (fp, fname) = split(&first);
                        let fdir = openat(
                            a.dirs.open(fp)?.as_fd(),
                            ".",
                            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                            Mode::empty(),
                        )?;
                        let dir = a.dirs.open(parent)?;
                        linkat(
                            fdir.as_fd(),
                            OsStr::from_bytes(fname),
                            dir.as_fd(),
                            name_os,
                            nix::fcntl::AtFlags::empty(),
                        )
                        .with_context(|| format!("cannot link {shown:?}"))?;
                        continue;
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
                        format!("cannot create {shown:?} (restore into an empty directory)")
                    })?;
                    let f = File::from(fd);
                    if matches!(d.data, Data::Image { .. }) && a.image.is_none() {
                        bail!(
                            "file {shown:?}: its data should come from the image but the image does not hold it: the backup is inconsistent"
                        );
                    }
                    a.write_content(&f, d)?;
                    stats.written += 1;
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
                    )?;
                }
            }
            a.set_meta(d)?;
        } else if kept.is_some_and(|t| !same_meta(t, d)) {
            a.set_meta(d)?;
            stats.updated += 1;
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
        let (parent, name) = split(&d.path);
        let name_os = OsStr::from_bytes(if name.is_empty() { b"." } else { name });
        let dir = a.dirs.open(parent)?;
        utimensat(
            dir.as_fd(),
            name_os,
            &ts(d.atime),
            &ts(d.mtime),
            UtimensatFlags::NoFollowSymlink,
        )
        .with_context(|| {
            format!(
                "cannot set the times of {:?}",
                String::from_utf8_lossy(&d.path)
            )
        })?;
    }
    stats.chunk_bytes = a.chunks.fetched;
    Ok(stats)
}
