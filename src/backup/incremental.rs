//! File-level incremental backups of the mounted filesystems of a host's last image.
//!
//! Each incremental records the complete list of paths present (so deletions are known) with
//! full metadata; data is stored only for files that changed (mtime, ctime, size, inode or
//! type differ from the previous backup), chunked and deduplicated like image data. Files
//! unchanged since the image keep pointing at the image's blocks.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_bytes::ByteBuf;

use crate::repo::manifest::{
    IncFs, IncManifest, Kind, MANIFEST_FORMAT, MANIFEST_VERSION, Stats, TocRef,
};
use crate::repo::snapshot::{HashedFile, SnapshotWriter};
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

/// The mount covering `mp` exactly: (source device, fs type).
fn mount_source(mp: &Path) -> Result<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let want = mp.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let point = f
            .get(4)
            .map(|p| p.replace("\\040", " "))
            .unwrap_or_default();
        if point == want {
            // The last matching line is the visible mount.
            found = Some((
                f.get(sep + 2).copied().unwrap_or("").to_string(),
                f.get(sep + 1).copied().unwrap_or("").to_string(),
            ));
        }
    }
    found.with_context(|| {
        format!(
            "{} is not a mount point: name the mount point of a filesystem of the image",
            mp.display()
        )
    })
}

fn kind_of(ft: &std::fs::FileType) -> FileKind {
    if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_char_device() {
        FileKind::CharDev
    } else if ft.is_block_device() {
        FileKind::BlockDev
    } else if ft.is_fifo() {
        FileKind::Fifo
    } else if ft.is_socket() {
        FileKind::Socket
    } else {
        FileKind::File
    }
}

fn meta_of(path: &Path, rel: &[u8], md: &std::fs::Metadata) -> Result<FileMeta> {
    let kind = kind_of(&md.file_type());
    let symlink = if kind == FileKind::Symlink {
        use std::os::unix::ffi::OsStrExt;
        let t = std::fs::read_link(path)
            .with_context(|| format!("cannot read link {}", path.display()))?;
        Some(ByteBuf::from(t.as_os_str().as_bytes().to_vec()))
    } else {
        None
    };
    let mut xattrs = Vec::new();
    // Symlinks: the l* calls; sockets and fifos too (no open needed).
    if let Ok(names) = xattr::list(path) {
        use std::os::unix::ffi::OsStrExt;
        for n in names {
            if let Ok(Some(v)) = xattr::get(path, &n) {
                xattrs.push((ByteBuf::from(n.as_bytes().to_vec()), ByteBuf::from(v)));
            }
        }
    }
    xattrs.sort();
    let rdev = md.rdev();
    Ok(FileMeta {
        path: ByteBuf::from(rel.to_vec()),
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: md.size(),
        mtime: (md.mtime(), md.mtime_nsec() as u32),
        ctime: (md.ctime(), md.ctime_nsec() as u32),
        atime: (md.atime(), md.atime_nsec() as u32),
        inode: md.ino(),
        nlink: md.nlink() as u32,
        rdev: if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
            (libc::major(rdev), libc::minor(rdev))
        } else {
            (0, 0)
        },
        symlink,
        xattrs,
        data: Data::None,
        subvol: None,
    })
}

/// Store a file's content as chunks; all-zero pieces are holes (empty digest).
fn store_file(
    repo: &dyn RepoWrite,
    path: &Path,
    comp: &mut zstd::bulk::Compressor,
    stats: &mut Stats,
) -> Result<Data> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = f
                .read(&mut buf[n..])
                .with_context(|| format!("cannot read {}", path.display()))?;
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
            if repo.chunk_info(&d).is_none() {
                let z = comp.compress(piece).context("zstd compression failed")?;
                let (len, _, new) = repo.put_chunk(&d, &z)?;
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

struct Walker<'a> {
    repo: &'a dyn RepoWrite,
    prev: HashMap<Vec<u8>, FileMeta>,
    dev: u64,
    out: TocWriter<HashedFile>,
    comp: zstd::bulk::Compressor<'static>,
    stats: Stats,
    changed: u64,
    links: HashMap<u64, Data>,
}

impl Walker<'_> {
    fn visit(&mut self, path: &Path, rel: Vec<u8>) -> Result<()> {
        let md = std::fs::symlink_metadata(path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        let mut m = meta_of(path, &rel, &md)?;
        // What is left in `prev` after the walk was deleted.
        let prev = self.prev.remove(&rel);
        if let Some(p) = prev.filter(|p| p.unchanged(&m)) {
            // Metadata-only changes (chmod, chown, xattrs) move ctime too, so an unchanged
            // ctime means the previous metadata still holds.
            m.data = p.data;
        } else {
            self.changed += 1;
            if m.kind == FileKind::File {
                m.data = match self.links.get(&m.inode).filter(|_| m.nlink > 1) {
                    Some(d) => d.clone(),
                    None => store_file(self.repo, path, &mut self.comp, &mut self.stats)?,
                };
            }
        }
        if m.kind == FileKind::File && m.nlink > 1 {
            self.links.entry(m.inode).or_insert_with(|| m.data.clone());
        }
        self.out.push(&m)?;
        // Stay on this filesystem: a directory that is another mount point is recorded, not entered.
        if m.kind == FileKind::Dir && md.dev() == self.dev {
            let mut names: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("cannot list {}", path.display()))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("cannot list {}", path.display()))?;
            names.sort();
            for n in names {
                use std::os::unix::ffi::OsStrExt;
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(n.as_bytes());
                self.visit(&path.join(&n), r)?;
            }
        }
        Ok(())
    }
}

pub fn run(
    repo_path: &Path,
    host: &str,
    mountpoints: &[PathBuf],
    differential: bool,
) -> Result<IncSummary> {
    let start = std::time::Instant::now();
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
    let mut targets = Vec::new();
    for mp in mountpoints {
        let mp =
            std::fs::canonicalize(mp).with_context(|| format!("cannot find {}", mp.display()))?;
        let (source, _fstype) = mount_source(&mp)?;
        let dev = File::open(&source)
            .with_context(|| format!("cannot open {source} (mounted on {})", mp.display()))?;
        let uuid = crate::fs::map::probe_uuid(&dev).with_context(|| {
            format!(
                "cannot read the filesystem UUID of {source} (mounted on {})",
                mp.display()
            )
        })?;
        let Some(base_toc) = base
            .tocs
            .iter()
            .find(|t| t.uuid.as_deref() == Some(uuid.as_str()))
        else {
            bail!(
                "{} holds filesystem {uuid}, which is not in image {} of host {host}: take a new image backup",
                mp.display(),
                base.id
            );
        };
        targets.push((mp, uuid, base_toc));
    }
    // A restore to this point applies only the filesystems named here: one the newest backup
    // also covered would silently go back to the image's state.
    if latest != base.id {
        let newest = crate::repo::manifest::read_inc_manifest(repo, host, &latest)?;
        if let Some(f) = newest
            .filesystems
            .iter()
            .find(|f| !targets.iter().any(|(_, _, t)| t.area == f.toc.area))
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
    for (mp, uuid, base_toc) in targets {
        let area = base_toc.area;
        let prev: HashMap<Vec<u8>, FileMeta> =
            match parent_tocs.iter().find(|(t, _)| t.area == area) {
                Some((t, sid)) => crate::repo::manifest::read_toc(repo, host, sid, t)?
                    .into_iter()
                    .map(|m| (m.path.to_vec(), m))
                    .collect(),
                None => HashMap::new(),
            };
        let out = TocWriter::new(sw.toc_file(area)?)?;
        let root_dev = std::fs::metadata(&mp)?.dev();
        let mut w = Walker {
            repo,
            prev,
            dev: root_dev,
            out,
            comp: zstd::bulk::Compressor::new(3)?,
            stats: Stats::default(),
            changed: 0,
            links: HashMap::new(),
        };
        w.visit(&mp, Vec::new())?;
        let Walker {
            out,
            prev,
            stats: ws,
            changed: ch,
            ..
        } = w;
        let (f, count) = out.finish()?;
        // Chunks first, then the file list that names them.
        let (sha256, len) = sw.commit_file(f)?;
        let del = prev.len() as u64;
        filesystems.push(IncFs {
            mountpoint: mp.display().to_string(),
            toc: TocRef {
                area,
                fstype: base_toc.fstype.clone(),
                uuid: Some(uuid.clone()),
                file: crate::repo::paths::toc_name(&id, area),
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
