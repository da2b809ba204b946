//! Partition nodes, loop devices and mounts of a restored disk: each undoes itself on drop
//! (unmount, detach), so an error path never leaves a mount or a loop device behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::sys::stat::{Mode, SFlag};

use super::Disk;
use super::layout::Partition;

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
pub fn partition_node(disk: &Path, number: u32) -> Result<PathBuf> {
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
    let fstype = crate::fs::id::identify_at(&disk.file, start).map(|f| f.fstype);
    let (dev, loop_opt) = if disk.is_block {
        let n = partition.context("an unpartitioned disk on a block device")?;
        (partition_node(&disk.path, n)?, None)
    } else {
        (
            disk.path.clone(),
            Some(format!("loop,offset={start},sizelimit={len}")),
        )
    };
    mount_device(&dev, fstype.as_deref(), loop_opt, tag, read_only)
        .with_context(|| format!("cannot mount the restored filesystem at offset {start}"))
}

/// Mount a device holding a filesystem of type `fstype` (as `fs::id` names it) under /run/bmr.
pub fn mount_device(
    dev: &Path,
    fstype: Option<&str>,
    extra: Option<String>,
    tag: &str,
    read_only: bool,
) -> Result<MountGuard> {
    let dir = PathBuf::from(format!("/run/bmr/mnt-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Command::new("mount");
    // A read-only mount leaves a clean filesystem byte for byte as restored.
    let mut opts: Vec<String> = Vec::new();
    if read_only {
        opts.push("ro".into());
    }
    match fstype {
        // The top-level subvolume, whatever the default one is: file lists start there.
        Some("btrfs") => {
            opts.push("subvolid=5".into());
            // Even a read-only mount replays a log: a look must not write.
            if read_only {
                opts.push("rescue=nologreplay".into());
            }
        }
        // The source of a restore to an image file may be mounted here with the same UUID.
        Some("xfs") => {
            opts.push("nouuid".into());
            if read_only {
                opts.push("norecovery".into());
            }
        }
        _ => {}
    }
    opts.extend(extra);
    cmd.arg(dev);
    if !opts.is_empty() {
        cmd.arg("-o").arg(opts.join(","));
    }
    let out = cmd.arg(&dir).output().context("cannot run mount")?;
    if !out.status.success() {
        let _ = std::fs::remove_dir(&dir);
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(MountGuard { dir })
}

/// A logical volume of a restored disk as a block device, without activating its volume
/// group (whose name may be taken on the machine running bmr): a device-mapper linear device
/// over its pieces, or for an image file in one piece a loop device over that stretch.
/// Removed on drop.
pub struct LvDev {
    pub path: PathBuf,
    dm: Option<String>,
    loops: Vec<PathBuf>,
}

fn losetup(args: &[&str], file: &Path) -> Result<PathBuf> {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .args(args)
        .arg(file)
        .output()
        .context("cannot run losetup")?;
    if !out.status.success() {
        bail!(
            "cannot set up a loop device over {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

impl LvDev {
    /// `pieces`: (disk offset, length) in the volume's order, whole sectors.
    pub fn open(disk: &Disk, name: &str, pieces: &[(u64, u64)], read_only: bool) -> Result<LvDev> {
        let ro: &[&str] = if read_only { &["-r"] } else { &[] };
        // An image file's one stretch: a loop device (what the host has). A disk's: always
        // device-mapper, as the rescue system's busybox losetup knows no --sizelimit.
        if let (false, [(start, len)]) = (disk.is_block, pieces) {
            let mut args = ro.to_vec();
            let (s, l) = (start.to_string(), len.to_string());
            args.extend(["-o", &s, "--sizelimit", &l]);
            let path =
                losetup(&args, &disk.path).with_context(|| format!("logical volume {name}"))?;
            return Ok(LvDev {
                path: path.clone(),
                dm: None,
                loops: vec![path],
            });
        }
        let mut me = LvDev {
            path: PathBuf::new(),
            dm: None,
            loops: Vec::new(),
        };
        let base = if disk.is_block {
            disk.path.clone()
        } else {
            let l = losetup(ro, &disk.path).with_context(|| format!("logical volume {name}"))?;
            me.loops.push(l.clone());
            l
        };
        let mut table = String::new();
        let mut pos = 0;
        for &(start, len) in pieces {
            table.push_str(&format!(
                "{} {} linear {} {}\n",
                pos / 512,
                len / 512,
                base.display(),
                start / 512
            ));
            pos += len;
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dm = format!(
            "bmr-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut cmd = Command::new("dmsetup");
        cmd.args(["create", &dm]);
        if read_only {
            cmd.arg("--readonly");
        }
        let out = cmd
            .args(["--table", table.trim_end()])
            .env("DM_DISABLE_UDEV", "1")
            .output()
            .with_context(|| {
                format!("logical volume {name} needs device-mapper here: cannot run dmsetup")
            })?;
        if !out.status.success() {
            bail!(
                "logical volume {name} needs device-mapper here: dmsetup create failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        me.dm = Some(dm.clone());
        me.path = PathBuf::from(format!("/dev/mapper/{dm}"));
        if !me.path.exists() {
            // Without udev, dmsetup makes the node itself (DM_DISABLE_UDEV); check anyway.
            let _ = Command::new("dmsetup").args(["mknodes", &dm]).status();
        }
        Ok(me)
    }
}

impl Drop for LvDev {
    fn drop(&mut self) {
        if let Some(dm) = &self.dm {
            let _ = Command::new("dmsetup")
                .args(["remove", dm])
                .env("DM_DISABLE_UDEV", "1")
                .status();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
    }
}

/// A partition of the target as a device path: its node on a block device, or a loop device
/// over the range of an image file (detached on drop).
pub struct PartDev {
    pub path: PathBuf,
    is_loop: bool,
}

impl PartDev {
    pub fn open(disk: &Disk, p: &Partition) -> Result<PartDev> {
        Self::open_as(disk, p, false)
    }

    /// The same, a loop device read-only (for a backup).
    pub fn open_read_only(disk: &Disk, p: &Partition) -> Result<PartDev> {
        Self::open_as(disk, p, true)
    }

    fn open_as(disk: &Disk, p: &Partition, read_only: bool) -> Result<PartDev> {
        if disk.is_block {
            return Ok(PartDev {
                path: partition_node(&disk.path, p.number)?,
                is_loop: false,
            });
        }
        let out = Command::new("losetup")
            .args(if read_only { &["-r"][..] } else { &[][..] })
            .args(["-f", "--show", "-o", &p.start.to_string(), "--sizelimit"])
            .arg(p.len.to_string())
            .arg(&disk.path)
            .output()
            .context("cannot run losetup")?;
        if !out.status.success() {
            bail!(
                "cannot set up a loop device over partition {} of {}: {}",
                p.number,
                disk.path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(PartDev {
            path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
            is_loop: true,
        })
    }
}

impl Drop for PartDev {
    fn drop(&mut self) {
        if self.is_loop {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
    }
}
