//! btrfs subvolumes seen through a mount: which subvolume a directory is (the file lists'
//! inode numbers are `fs::read::btrfs::toc_inode`, as the image's file list has them), and
//! the read-only snapshots `--snapshot btrfs` walks instead of the live subvolumes.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The first inode of every subvolume (its root directory).
pub const SUBVOL_ROOT_INO: u64 = 256;
/// What a snapshot shows in place of a subvolume nested in the snapshotted one.
pub const EMPTY_SUBVOL_DIR_INO: u64 = 2;

#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

nix::ioctl_readwrite!(btrfs_ino_lookup, 0x94, 18, InoLookupArgs);

/// The subvolume id of the directory `dir` lives in (BTRFS_IOC_INO_LOOKUP with tree 0 answers
/// the id of the fd's own subvolume; no privilege needed).
pub fn subvol_id(dir: &Path) -> Result<u64> {
    let f = std::fs::File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: SUBVOL_ROOT_INO,
        name: [0; 4080],
    };
    // SAFETY: args is a properly sized, initialised struct the kernel fills in.
    unsafe { btrfs_ino_lookup(f.as_raw_fd(), &mut args) }
        .with_context(|| format!("cannot read the btrfs subvolume id of {}", dir.display()))?;
    Ok(args.treeid)
}

pub use crate::fs::read::btrfs::toc_inode;

/// Subvolume ids by device number: every subvolume has its own st_dev.
#[derive(Default)]
pub struct SubvolIds {
    by_dev: HashMap<u64, u64>,
}

impl SubvolIds {
    /// Record that `dev` is subvolume `id` (a snapshot walked in place of subvolume `id`).
    pub fn set(&mut self, dev: u64, id: u64) {
        self.by_dev.insert(dev, id);
    }

    /// The subvolume of `path` (a directory when `dev` is new: a subvolume's root comes first).
    pub fn of(&mut self, dev: u64, path: &Path) -> Result<u64> {
        if let Some(&id) = self.by_dev.get(&dev) {
            return Ok(id);
        }
        let id = subvol_id(path)?;
        self.by_dev.insert(dev, id);
        Ok(id)
    }
}

/// A read-only snapshot of the subvolume mounted at a mount point, deleted on drop. It is
/// made in the filesystem's top level, mounted apart for it, so the live subvolume's
/// directories are never touched (their times would count as changes next time).
pub struct Snapshot {
    pub path: PathBuf,
    /// The id of the snapshotted subvolume (what the file list calls its files).
    pub source_id: u64,
    top: PathBuf,
}

fn btrfs(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new("btrfs")
        .args(args)
        .output()
        .context("cannot run btrfs (install btrfs-progs)")?;
    if !out.status.success() {
        bail!(
            "btrfs {}: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Snapshot {
    /// `mp`: the mount point; `source`: its device; `prefix`: the mounted subvolume's path in
    /// the filesystem (from mountinfo).
    pub fn take(mp: &Path, source: &str, prefix: &[u8]) -> Result<Snapshot> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let source_id = subvol_id(mp)?;
        let top = PathBuf::from(format!(
            "/run/bmr/btrfs-top-{}-{source_id}",
            std::process::id()
        ));
        std::fs::create_dir_all(&top)
            .with_context(|| format!("cannot create {}", top.display()))?;
        let out = Command::new("mount")
            .args(["-t", "btrfs", "-o", "subvolid=5", source])
            .arg(&top)
            .output()
            .context("cannot run mount")?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&top);
            bail!(
                "--snapshot btrfs: cannot mount the top level of {source}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // From here on, drop undoes what was done.
        let snap = Snapshot {
            path: top.join(format!(".bmr-snapshot-{source_id}")),
            source_id,
            top,
        };
        if let Ok(md) = std::fs::symlink_metadata(&snap.path) {
            // Ours, left by an interrupted run: a subvolume root under our name.
            if md.is_dir() && md.ino() == SUBVOL_ROOT_INO {
                eprintln!(
                    "note: removing the snapshot {} left by an interrupted bmr run",
                    snap.path.display()
                );
                btrfs(&[
                    "subvolume".as_ref(),
                    "delete".as_ref(),
                    snap.path.as_os_str(),
                ])?;
            } else {
                bail!(
                    "--snapshot btrfs: {} exists in the top level of {source} and is not a snapshot bmr left: move it away",
                    snap.path.display()
                );
            }
        }
        let subvol = snap.top.join(std::ffi::OsStr::from_bytes(prefix));
        btrfs(&[
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            "-r".as_ref(),
            subvol.as_os_str(),
            snap.path.as_os_str(),
        ])
        .with_context(|| format!("--snapshot btrfs: cannot snapshot {}", mp.display()))?;
        Ok(snap)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if self.path.exists()
            && let Err(e) = btrfs(&[
                "subvolume".as_ref(),
                "delete".as_ref(),
                self.path.as_os_str(),
            ])
        {
            eprintln!(
                "warning: cannot remove the snapshot {}: {e:#}; remove it with btrfs subvolume delete",
                self.path.display()
            );
        }
        let _ = Command::new("umount").arg(&self.top).status();
        let _ = std::fs::remove_dir(&self.top);
    }
}
