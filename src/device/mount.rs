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
    let dir = PathBuf::from(format!("/run/bmr/mnt-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Command::new("mount");
    // A read-only mount leaves a clean filesystem byte for byte as restored.
    let mut opts: Vec<String> = Vec::new();
    if read_only {
        opts.push("ro".into());
    }
    match crate::fs::id::identify_at(&disk.file, start).map(|f| f.fstype) {
        // The top-level subvolume, whatever the default one is: file lists start there.
        Some(t) if t == "btrfs" => {
            opts.push("subvolid=5".into());
            // Even a read-only mount replays a log: a look must not write.
            if read_only {
                opts.push("rescue=nologreplay".into());
            }
        }
        // The source of a restore to an image file may be mounted here with the same UUID.
        Some(t) if t == "xfs" => {
            opts.push("nouuid".into());
            if read_only {
                opts.push("norecovery".into());
            }
        }
        _ => {}
    }
    if disk.is_block {
        let n = partition.context("an unpartitioned disk on a block device")?;
        cmd.arg(partition_node(&disk.path, n)?);
    } else {
        opts.push(format!("loop,offset={start},sizelimit={len}"));
        cmd.arg(&disk.path);
    }
    if !opts.is_empty() {
        cmd.arg("-o").arg(opts.join(","));
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

/// A partition of the target as a device path: its node on a block device, or a loop device
/// over the range of an image file (detached on drop).
pub struct PartDev {
    pub path: PathBuf,
    is_loop: bool,
}

impl PartDev {
    pub fn open(disk: &Disk, p: &Partition) -> Result<PartDev> {
        if disk.is_block {
            return Ok(PartDev {
                path: partition_node(&disk.path, p.number)?,
                is_loop: false,
            });
        }
        let out = Command::new("losetup")
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
