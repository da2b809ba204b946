//! The device layer: disks (block devices and raw image files behind one type, [`Disk`]),
//! their partition tables ([`layout`]), the disks of this machine ([`disks`]), their names
//! ([`names`]), partition nodes, loop devices and mounts ([`mount`]), and the guards that
//! keep bmr from reading an inconsistent disk or overwriting the wrong one ([`safety`]).

pub mod disks;
pub mod layout;
pub mod luks;
pub mod lvm;
pub mod md;
pub mod mount;
pub mod names;
pub mod safety;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The output of a finished storage tool (lvm, mdadm): stdout on success, else an error with
/// the command and the last line it printed on stderr (where these tools say why).
pub(crate) fn tool_output(tool: &str, args: &[&str], out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!("{tool} {} failed: {}", args.join(" "), last.trim());
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("{tool} printed something that is not UTF-8"))
}

// nix has no wrappers for the block-device ioctls we need.
nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_sszget, 0x1268, libc::c_int);
nix::ioctl_none!(blk_rrpart, 0x12, 95);
nix::ioctl_write_ptr!(blk_zeroout, 0x12, 127, [u64; 2]);

/// A disk (block device or image file) opened for reading or writing.
pub struct Disk {
    pub path: PathBuf,
    pub file: File,
    /// Second handle with O_DIRECT for large aligned writes (page cache bypass).
    pub direct: Option<File>,
    pub size: u64,
    pub sector_size: u64,
    pub is_block: bool,
}

impl Disk {
    pub fn open_read(path: &Path) -> Result<Disk> {
        let file = File::open(path)
            .with_context(|| format!("cannot open {} for reading", path.display()))?;
        Self::from_file(path, file, None)
    }

    /// Open a restore target. Block devices are opened O_EXCL so the kernel refuses a disk that is
    /// mounted or otherwise held (device-mapper, md, swap).
    pub fn open_write(path: &Path) -> Result<Disk> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot access target {}", path.display()))?;
        let block = meta.file_type().is_block_device();
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if block {
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts.open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                anyhow::anyhow!(
                    "target {} is in use (mounted, swap, LVM or RAID member): stop using it or choose another disk",
                    path.display()
                )
            } else {
                anyhow::Error::new(e).context(format!("cannot open target {}", path.display()))
            }
        })?;
        // Not O_EXCL: the kernel refuses a second exclusive open even to the holder, and the
        // claim taken above already keeps others off the disk.
        let direct = opts.custom_flags(libc::O_DIRECT).open(path).ok();
        Self::from_file(path, file, direct)
    }

    /// Give up the exclusive claim on a block device (keeping it open) so its restored
    /// partitions can be mounted: the kernel refuses to mount a partition of a disk that is
    /// held with O_EXCL.
    pub fn release_exclusive(&mut self) -> Result<()> {
        if !self.is_block {
            return Ok(());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .with_context(|| format!("cannot reopen {}", self.path.display()))?;
        self.direct = None;
        self.file = file;
        Ok(())
    }

    fn from_file(path: &Path, file: File, direct: Option<File>) -> Result<Disk> {
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        let is_block = meta.file_type().is_block_device();
        let (size, sector_size) = if is_block {
            let mut size = 0u64;
            // SAFETY: the ioctl writes one u64 into `size`; the fd is a block device.
            unsafe { blk_getsize64(file.as_raw_fd(), &mut size) }
                .with_context(|| format!("cannot read the size of {}", path.display()))?;
            let mut ss: libc::c_int = 0;
            // SAFETY: the ioctl writes one int.
            unsafe { blk_sszget(file.as_raw_fd(), &mut ss) }
                .with_context(|| format!("cannot read the sector size of {}", path.display()))?;
            (size, u64::try_from(ss).unwrap_or(512).max(512))
        } else if meta.is_file() {
            (meta.len(), 512)
        } else {
            bail!(
                "{} is neither a block device nor a disk image file",
                path.display()
            );
        };
        Ok(Disk {
            path: path.to_path_buf(),
            file,
            direct,
            size,
            sector_size,
            is_block,
        })
    }

    /// Ask the kernel to re-read the partition table (best effort: loop devices without partscan
    /// and image files have nothing to re-read).
    pub fn reread_partitions(&self) {
        if self.is_block {
            // SAFETY: argument-less ioctl on an owned fd.
            let _ = unsafe { blk_rrpart(self.file.as_raw_fd()) };
        }
    }

    /// Forget cached pages of `[offset, offset+len)` (0: to the end): another device (an md
    /// array, a partition node) wrote there behind this handle's page cache.
    pub fn forget_cached(&self, offset: u64, len: u64) {
        let _ = nix::fcntl::posix_fadvise(
            &self.file,
            offset as i64,
            len as i64,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }

    /// Make `len` bytes at `offset` read back as zeros, cheaply where possible.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.is_block {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads a [u64; 2] range.
            if unsafe { blk_zeroout(self.file.as_raw_fd(), &range) }.is_ok() {
                return Ok(());
            }
        } else {
            let r = nix::fcntl::fallocate(
                &self.file,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            );
            if r.is_ok() {
                return Ok(());
            }
        }
        write_zeros(&self.file, offset, len).map_err(|e| self.io_error("zero", offset, len, e))
    }

    /// The one line for a failed read or write on this disk: the sectors, what the kernel
    /// said, and what to do. A failing disk and a vanished one (unplugged, its device-mapper
    /// table removed) read differently to the person at the console.
    pub fn io_error(&self, op: &str, offset: u64, len: u64, e: std::io::Error) -> anyhow::Error {
        let ss = self.sector_size.max(1);
        let first = offset / ss;
        let last = (offset + len.max(1)).div_ceil(ss) - 1;
        let hint = match e.raw_os_error() {
            Some(libc::ENODEV | libc::ENXIO) => {
                "the disk has disappeared: check its cable or controller, then run the restore again (it resumes)"
            }
            Some(libc::ENOSPC) => "the target is smaller than it said: use another disk",
            _ => {
                "the disk refuses it and may be failing: see the kernel log (dmesg), then run the restore again (it resumes) or use another disk"
            }
        };
        anyhow::anyhow!(
            "cannot {op} sectors {first}-{last} of {} ({len} bytes at offset {offset}): {e}: {hint}",
            self.path.display()
        )
    }

    /// Flush what was written; a failure means some writes never reached the disk, and the
    /// kernel alone knows which sectors.
    pub fn flush(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| {
            anyhow::anyhow!(
                "cannot flush {}: {e}: some writes did not reach the disk; see the kernel log (dmesg) for the sectors, then run the restore again (it resumes) or use another disk",
                self.path.display()
            )
        })
    }
}

fn write_zeros(file: &File, mut offset: u64, mut len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    while len > 0 {
        let n = len.min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Device number (major, minor) of a block device path, if it is one.
pub fn block_devnum(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type().is_block_device().then(|| meta.rdev())
}
