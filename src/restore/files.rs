//! File level access to snapshots: `bmr ls` and `bmr restore-files`, from images (through the
//! table of contents and only the chunks that hold the wanted files) and incrementals.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::repo::chunkindex::{ChunkRef, Record};
use crate::repo::manifest::{Manifest, TocRef};
use crate::repo::reader::{ChunkReader, Stored};
use crate::repo::toc::{FileKind, FileMeta};
use crate::repo::{CHUNK_SIZE, RepoRead};

#[derive(Debug, Clone, clap::Args)]
pub struct SelectOptions {
    #[command(flatten)]
    pub point: crate::restore::PointArgs,
    /// The filesystem: a partition number, or a logical volume as VG/LV [default: the root
    /// filesystem (the one holding /etc/fstab), else the largest with a file list].
    #[arg(long, value_name = "N | VG/LV")]
    pub part: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LsOptions {
    #[command(flatten)]
    pub select: SelectOptions,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Directory or file to list [default: /].
    pub path: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreFilesOptions {
    #[command(flatten)]
    pub select: SelectOptions,
    /// Directory to restore into (paths keep their place below it).
    #[arg(long)]
    pub to: PathBuf,
    /// Key file (or passphrase file) of the LUKS volume the files are in: the image holds its
    /// ciphertext only. At a terminal, bmr asks for the passphrase instead.
    #[arg(long, value_name = "FILE")]
    pub luks_keyfile: Option<PathBuf>,
    /// Files or directories (whole trees) to restore.
    #[arg(required = true)]
    pub paths: Vec<String>,
}

/// The file list of one filesystem at a point, with its base image.
pub struct Selected {
    /// Bytes of the file list read.
    pub toc_bytes: u64,
    pub image: Manifest,
    pub index: Vec<u8>,
    pub snapshot: String,
    pub area: u32,
    /// The logical volume in the area, for a filesystem inside LVM.
    pub volume: Option<crate::repo::manifest::LvMeta>,
    pub files: Vec<FileMeta>,
}

pub fn select(src: &dyn RepoRead, o: &SelectOptions) -> Result<Selected> {
    let crate::repo::snapshot::Point { image: l, inc } =
        crate::repo::snapshot::resolve(src, &o.point.host, &o.point.at)?;
    let snapshot = inc.as_ref().map_or(l.manifest.id.clone(), |i| i.id.clone());
    let tocs: Vec<(TocRef, String)> = inc
        .iter()
        .flat_map(|i| i.filesystems.iter().map(|f| (f.toc.clone(), i.id.clone())))
        .collect();
    let image = l.manifest;
    let tocs = if tocs.is_empty() {
        image
            .tocs
            .iter()
            .map(|t| (t.clone(), image.id.clone()))
            .collect()
    } else {
        tocs
    };
    let names = || {
        tocs.iter()
            .map(|(t, _)| match &t.volume {
                Some(v) => format!("--part {v} ({})", t.fstype),
                None => match image.areas.get(t.area as usize).and_then(|a| a.partition) {
                    Some(n) => format!("--part {n} ({})", t.fstype),
                    None => format!("the whole disk ({})", t.fstype),
                },
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let size = |t: &TocRef| match &t.volume {
        Some(v) => image.volume(t.area, v).map_or(0, |(_, lv)| lv.size),
        None => image.areas.get(t.area as usize).map_or(0, |a| a.len),
    };
    let pick = match o.part.as_deref() {
        Some(p) if p.contains('/') => tocs
            .iter()
            .find(|(t, _)| t.volume.as_deref() == Some(p))
            .with_context(|| {
                format!(
                    "snapshot {snapshot} has no file list for logical volume {}; it has: {}",
                    crate::util::text::elide_path(p.as_bytes()),
                    names()
                )
            })?,
        Some(p) => {
            let n: u32 = p.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--part {}: give a partition number or a logical volume as VG/LV",
                    crate::util::text::elide_path(p.as_bytes())
                )
            })?;
            tocs.iter()
                .find(|(t, _)| {
                    t.volume.is_none()
                        && image.areas.get(t.area as usize).and_then(|a| a.partition) == Some(n)
                })
                .with_context(|| {
                    format!(
                        "snapshot {snapshot} has no file list for partition {n}; it has: {}",
                        names()
                    )
                })?
        }
        None => {
            let p = tocs
                .iter()
                .max_by_key(|(t, _)| (t.system, size(t)))
                .with_context(|| {
                    format!(
                        "snapshot {} has no file lists (no ext, FAT, XFS or btrfs filesystem it could read)",
                        snapshot
                    )
                })?;
            if tocs.len() > 1 {
                eprintln!(
                    "{} ({}{}); the snapshot's filesystems: {}",
                    image.fs_name(&p.0),
                    p.0.fstype,
                    if p.0.system {
                        ", the root: it holds /etc/fstab"
                    } else {
                        ", the largest"
                    },
                    names()
                );
            }
            p
        }
    };
    let files = crate::repo::manifest::read_toc(src, &o.point.host, &pick.1, &pick.0)?;
    let volume = match &pick.0.volume {
        Some(v) => Some(
            image
                .volume(pick.0.area, v)
                .with_context(|| format!("image {} has no logical volume {v}", image.id))?
                .1
                .clone(),
        ),
        None => None,
    };
    Ok(Selected {
        toc_bytes: pick.0.len,
        area: pick.0.area,
        volume,
        image,
        index: l.index,
        snapshot,
        files,
    })
}

fn norm(p: &str) -> Vec<u8> {
    p.trim_matches('/').as_bytes().to_vec()
}

fn under(path: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.get(prefix.len()) == Some(&b'/'))
}

fn perms(kind: FileKind, mode: u32) -> String {
    let mut s = String::new();
    s.push(kind.ls_char());
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (0o400 >> i) != 0 { c } else { '-' });
    }
    s
}

pub fn ls(o: &LsOptions) -> Result<()> {
    let src = crate::repo::open(&o.select.point.repo)?;
    let s = select(src.as_ref(), &o.select)?;
    let want = norm(o.path.as_deref().unwrap_or("/"));
    let Some(target) = s
        .files
        .iter()
        .find(|f| f.path.as_slice() == want.as_slice())
    else {
        bail!(
            "{:?} is not in snapshot {}",
            o.path.as_deref().unwrap_or("/"),
            s.snapshot
        );
    };
    let list: Vec<&FileMeta> = if target.kind == FileKind::Dir {
        s.files
            .iter()
            .filter(|f| {
                !f.path.is_empty() && f.path.len() > want.len() && under(&f.path, &want) && {
                    let rest = &f.path[want.len() + usize::from(!want.is_empty())..];
                    !rest.contains(&b'/')
                }
            })
            .collect()
    } else {
        vec![target]
    };
    if o.json {
        let v: Vec<serde_json::Value> = list
            .iter()
            .map(|f| {
                serde_json::json!({
                    "path": format!("/{}", String::from_utf8_lossy(&f.path)),
                    "kind": f.kind, "mode": f.mode, "uid": f.uid, "gid": f.gid, "size": f.size,
                    "mtime": f.mtime.0, "inode": f.inode, "nlink": f.nlink,
                    "symlink": f.symlink.as_ref().map(|t| String::from_utf8_lossy(t).into_owned()),
                    "subvol": f.subvol,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for f in list {
        let name = String::from_utf8_lossy(
            &f.path[f.path.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1)..],
        )
        .into_owned();
        let link = f
            .symlink
            .as_ref()
            .map(|t| format!(" -> {}", String::from_utf8_lossy(t)))
            .unwrap_or_default();
        // btrfs subvolume and snapshot roots, like `btrfs subvolume list` names them.
        let subvol = f
            .subvol
            .map(|id| format!(" [subvolume {id}]"))
            .unwrap_or_default();
        println!(
            "{} {:>3} {:>6} {:>6} {:>12} {} {:?}{link}{subvol}",
            perms(f.kind, f.mode),
            f.nlink,
            f.uid,
            f.gid,
            f.size,
            crate::util::timefmt::display(f.mtime.0),
            name
        );
    }
    Ok(())
}

/// Reads an image's filesystem through its chunk index: only the chunks holding the requested
/// bytes are fetched. Counts what it fetched.
pub struct ImageReader<'a> {
    src: &'a dyn RepoRead,
    /// A logical volume's extents: its offsets are mapped to the area's.
    volume: Option<crate::repo::manifest::LvMeta>,
    snapshot: String,
    windows: BTreeMap<u64, Record>,
    cache: Option<(u64, Vec<u8>)>,
    chunks: ChunkReader,
    /// A LUKS volume's cipher and data offset: the area holds ciphertext.
    luks: Option<(crate::device::luks::Cipher, u64)>,
}

impl<'a> ImageReader<'a> {
    pub fn new(src: &'a dyn RepoRead, image: &Manifest, index: &[u8], area: u32) -> Result<Self> {
        let mut windows = BTreeMap::new();
        for r in crate::repo::chunkindex::IndexReader::new(index, &image.id)? {
            let r = r?;
            if r.area == area {
                windows.insert(r.offset, r);
            }
        }
        Ok(ImageReader {
            src,
            volume: None,
            snapshot: image.id.clone(),
            windows,
            cache: None,
            chunks: ChunkReader::new()?,
            luks: None,
        })
    }

    /// Stored bytes of chunks fetched so far.
    pub fn fetched(&self) -> u64 {
        self.chunks.fetched
    }

    fn window(&mut self, off: u64) -> Result<Option<(u64, &[u8])>> {
        let Some((&start, rec)) = self.windows.range(..=off).next_back() else {
            return Ok(None);
        };
        if off >= start + u64::from(rec.len) {
            return Ok(None);
        }
        if self.cache.as_ref().is_none_or(|(s, _)| *s != start) {
            // One window is cached: its buffer is reused for the next.
            let mut plain = self.cache.take().map(|(_, b)| b).unwrap_or_default();
            plain.clear();
            plain.resize(rec.len as usize, 0);
            if let ChunkRef::Data {
                digest,
                stored_len,
                stored_sha,
            } = &rec.chunk
            {
                let stored = Stored {
                    len: *stored_len,
                    sha: *stored_sha,
                };
                self.chunks
                    .read(self.src, digest, Some(stored), rec.len as usize, &mut plain)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "chunk {digest} of snapshot {} is {e}: run bmr verify",
                            self.snapshot
                        )
                    })?;
            }
            self.cache = Some((start, plain));
        }
        Ok(self.cache.as_ref().map(|(s, p)| (*s, p.as_slice())))
    }
}

impl ImageReader<'_> {
    /// Read a logical volume's filesystem rather than the area's.
    pub fn in_volume(mut self, lv: Option<crate::repo::manifest::LvMeta>) -> Self {
        self.volume = lv;
        self
    }

    /// Decrypt the LUKS volume of the area (its header is in the image) with `secret`: reads
    /// then go through its cipher.
    pub fn unlock(
        &mut self,
        l: &crate::repo::manifest::LuksMeta,
        secret: &crate::device::luks::Secret,
    ) -> Result<()> {
        let h = l.header();
        let mut hdr = vec![0u8; h.data_offset.min(crate::device::luks::HEADER_MAX) as usize];
        self.read_area(&mut hdr, 0)?;
        let key = crate::device::luks::VolumeKey::unlock(
            &crate::device::luks::Bytes(hdr),
            0,
            &h,
            secret,
        )?;
        self.luks = Some((crate::device::luks::Cipher::new(&h, &key)?, h.data_offset));
        Ok(())
    }

    fn read_area(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            match self.window(off)? {
                Some((start, plain)) => {
                    let i = (off - start) as usize;
                    let n = (plain.len() - i).min(buf.len() - done);
                    buf[done..done + n].copy_from_slice(&plain[i..i + n]);
                    done += n;
                }
                None => {
                    // Not stored: free space, reads as zeros up to the next window.
                    let next = self
                        .windows
                        .range(off + 1..)
                        .next()
                        .map_or(u64::MAX, |(s, _)| *s);
                    let n = ((next - off) as usize)
                        .min(buf.len() - done)
                        .min(CHUNK_SIZE as usize);
                    buf[done..done + n].fill(0);
                    done += n;
                }
            }
        }
        Ok(())
    }
}

impl crate::restore::apply::ImageData for ImageReader<'_> {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some((cipher, base)) = self.luks.take() {
            let r = cipher.read_with(buf, offset, |b, o| self.read_area(b, base + o));
            self.luks = Some((cipher, base));
            return r;
        }
        let Some(lv) = &self.volume else {
            return self.read_area(buf, offset);
        };
        let pieces = lv.map(offset, buf.len() as u64).with_context(|| {
            format!(
                "a file's extent lies outside logical volume {} in snapshot {}",
                lv.name, self.snapshot
            )
        })?;
        let mut done = 0;
        for (a, l) in pieces {
            self.read_area(&mut buf[done..done + l as usize], a)?;
            done += l as usize;
        }
        Ok(())
    }
}

pub fn restore_files(o: &RestoreFilesOptions) -> Result<()> {
    let src = crate::repo::open(&o.select.point.repo)?;
    let src = src.as_ref();
    let s = select(src, &o.select)?;
    let wanted: Vec<Vec<u8>> = o.paths.iter().map(|p| norm(p)).collect();
    for (w, p) in wanted.iter().zip(&o.paths) {
        if !s.files.iter().any(|f| f.path.as_slice() == w.as_slice()) {
            bail!(
                "{} is not in snapshot {}: see bmr ls",
                crate::util::text::elide_path(p.as_bytes()),
                s.snapshot
            );
        }
    }
    // The selected trees plus their parent directories (with their metadata).
    let mut parents: HashSet<Vec<u8>> = HashSet::new();
    for w in &wanted {
        let mut p = w.as_slice();
        while let Some(i) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..i];
            parents.insert(p.to_vec());
        }
        if !w.is_empty() && !w.contains(&b'/') {
            parents.insert(Vec::new());
        }
    }
    let desired: Vec<FileMeta> = s
        .files
        .iter()
        .filter(|f| {
            !f.path.is_empty()
                && (parents.contains(f.path.as_slice()) || wanted.iter().any(|w| under(&f.path, w)))
        })
        .cloned()
        .collect();
    std::fs::create_dir_all(&o.to).with_context(|| format!("cannot create {}", o.to.display()))?;
    let mut reader = ImageReader::new(src, &s.image, &s.index, s.area)?.in_volume(s.volume.clone());
    if let Some(l) = s
        .image
        .areas
        .get(s.area as usize)
        .and_then(|a| a.luks.as_ref())
    {
        let mut secret = crate::device::luks::KeySource::new(o.luks_keyfile.clone());
        let what = s.volume.as_ref().map_or("the volume", |v| v.name.as_str());
        let Some(key) = secret.get(what)? else {
            bail!(
                "{what} is a LUKS volume, whose image holds only ciphertext: give --luks-keyfile FILE (a key file or a file holding the passphrase)"
            );
        };
        reader.unlock(l, key)?;
    }
    let st =
        crate::restore::apply::apply(src, &s.snapshot, &o.to, &[], &desired, Some(&mut reader))?;
    println!(
        "restored {} entries ({} files) from snapshot {} into {}; read {} bytes of chunks ({}) and {} of file list",
        (desired.len() as u64).saturating_sub(st.failed),
        st.written,
        s.snapshot,
        o.to.display(),
        reader.fetched() + st.chunk_bytes,
        crate::util::progress::human_bytes(reader.fetched() + st.chunk_bytes),
        crate::util::progress::human_bytes(s.toc_bytes)
    );
    st.check(desired.len(), &format!("snapshot {}", s.snapshot))
}
