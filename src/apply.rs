//! Bring a restored filesystem from its image state to the exact state of an incremental:
//! delete what was gone, write what changed, set metadata. Every operation is relative to a
//! directory fd opened without following symlinks, so a restored `etc -> /` symlink can never
//! redirect a write out of the filesystem being restored.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};

use crate::device::Disk;
use crate::manifest::Area;
use crate::repo::{Digest, RepoSource};
use crate::toc::{Data, FileKind, FileMeta};

/// A filesystem mounted for the duration of a restore step; unmounted on drop.
pub struct MountGuard {
    pub dir: PathBuf,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount(&self.dir);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The partition node of a block device (created under /run/bmr if udev has not made it).
pub(crate) fn partition_node(disk: &Path, number: u32) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(disk)?;
    let sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(md.rdev()),
        libc::minor(md.rdev())
    ));
    for e in std::fs::read_dir(&sys)
        .with_context(|| format!("cannot read {}", sys.display()))?
        .flatten()
    {
        let p = e.path();
        let n = std::fs::read_to_string(p.join("partition"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if n != Some(number) {
            continue;
        }
        let name = e.file_name();
        let node = Path::new("/dev").join(&name);
        if node.exists() {
            return Ok(node);
        }
        let dev = std::fs::read_to_string(p.join("dev"))?;
        let (maj, min) = dev.trim().split_once(':').context("bad sysfs dev")?;
        let node = Path::new("/run/bmr").join(&name);
        std::fs::create_dir_all("/run/bmr")?;
        let _ = std::fs::remove_file(&node);
        nix::sys::stat::mknod(
            &node,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            libc::makedev(maj.parse()?, min.parse()?),
        )?;
        return Ok(node);
    }
    bail!(
        "partition {number} of {} did not appear: re-run the restore",
        disk.display()
    )
}

pub fn mount_area(disk: &Disk, area: &Area, tag: &str) -> Result<MountGuard> {
    mount_range(disk, area.start, area.len, area.partition, tag, false)
}

/// Mount the filesystem in [start, start+len) of a restored disk: its partition node on a
/// block device, a loop mount over the range of an image file.
pub fn mount_range(
    disk: &Disk,
    start: u64,
    len: u64,
    partition: Option<u32>,
    tag: &str,
    read_only: bool,
) -> Result<MountGuard> {
    let dir = PathBuf::from(format!("/run/bmr/mnt-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Command::new("mount");
    // A read-only mount leaves a clean filesystem byte for byte as restored.
    let ro = if read_only { "ro," } else { "" };
    if disk.is_block {
        let n = partition.context("an unpartitioned disk on a block device")?;
        if read_only {
            cmd.args(["-o", "ro"]);
        }
        cmd.arg(partition_node(&disk.path, n)?);
    } else {
        cmd.arg("-o")
            .arg(format!("{ro}loop,offset={start},sizelimit={len}"))
            .arg(&disk.path);
    }
    let out = cmd.arg(&dir).output().context("cannot run mount")?;
    if !out.status.success() {
        let _ = std::fs::remove_dir(&dir);
        bail!(
            "cannot mount the restored filesystem at offset {}: {}",
            start,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(MountGuard { dir })
}

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
    fetched: u64,
    src: &'a dyn RepoSource,
    image: Option<&'i mut dyn ImageData>,
    snapshot: &'a str,
    dirs: Dirs,
    dec: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
}

impl Applier<'_, '_> {
    fn write_content(&mut self, f: &File, m: &FileMeta) -> Result<()> {
        let name = String::from_utf8_lossy(&m.path).into_owned();
        let chunks = match &m.data {
            Data::Chunks(c) => c,
            Data::Image { extents, inline } => {
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
                f.set_len(m.size)
                    .with_context(|| format!("cannot size {name:?}"))?;
                return Ok(());
            }
            Data::None => return Ok(()),
        };
        let mut off = 0u64;
        for (d, len) in chunks {
            if !d.is_empty() {
                let digest = Digest(d.as_slice().try_into().context("bad digest")?);
                let bad = || {
                    anyhow::anyhow!(
                        "file {name:?} of snapshot {}: chunk {digest} is damaged: run bmr verify",
                        self.snapshot
                    )
                };
                let stored = self.src.read_chunk(&digest).map_err(|e| {
                    anyhow::anyhow!("file {name:?} of snapshot {}: chunk {digest} is missing or unreadable ({e:#})", self.snapshot)
                })?;
                self.fetched += stored.len() as u64;
                let (_, payload) = crate::repo::parse_chunk(&stored).ok_or_else(bad)?;
                let n = self
                    .dec
                    .decompress_to_buffer(payload, &mut self.buf[..])
                    .map_err(|_| bad())?;
                if n != *len as usize || Digest::of(&self.buf[..n]) != digest {
                    return Err(bad());
                }
                f.write_all_at(&self.buf[..n], off)
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
    src: &dyn RepoSource,
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
        fetched: 0,
        src,
        image,
        snapshot,
        dirs: Dirs {
            root: rootfd,
            last: None,
        },
        dec: zstd::bulk::Decompressor::new()?,
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
        } else if d.kind == FileKind::File && d.nlink > 1 {
            links.entry(d.inode).or_insert_with(|| d.path.to_vec());
        }
    }
    // Creating and removing entries changed directory times: set them last, deepest first.
    for d in desired.iter().rev().filter(|d| d.kind == FileKind::Dir) {
        let (parent, name) = split(&d.path);
        let name_os = OsStr::from_bytes(if name.is_empty() { b"." } else { name });
        let dir = a.dirs.open(parent)?;
        utimensat(
            dir.as_fd(),
            name_os,
            &ts(d.atime),
            &ts(d.mtime),
            UtimensatFlags::NoFollowSymlink,
        )?;
    }
    stats.chunk_bytes = a.fetched;
    Ok(stats)
}
