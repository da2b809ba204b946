//! Guards that keep bmr from reading an inconsistent disk or destroying the wrong one.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::device::Disk;

/// A mounted filesystem (or active swap) that lives on a disk we were asked to use.
#[derive(Debug, Clone)]
pub struct MountUse {
    /// The mounted (or swapped-on) device: the disk, a partition, or a device stacked on
    /// them such as an LVM logical volume.
    pub devnum: u64,
    pub source: String,
    pub mountpoint: String,
    pub read_write: bool,
}

fn parse_devnum(s: &str) -> Option<u64> {
    let (maj, min) = s.trim().split_once(':')?;
    Some(libc::makedev(maj.parse().ok()?, min.parse().ok()?))
}

/// Device numbers of a block device, its partitions and what is stacked on them (LVM logical
/// volumes, dm-crypt, MD arrays: the `holders` in sysfs), since a filesystem mounted from an LV
/// is in use of the disk under it.
fn devnums_of_block(dev: u64) -> HashSet<u64> {
    let mut set = partitions_of(dev);
    let mut todo: Vec<u64> = set.iter().copied().collect();
    while let Some(d) = todo.pop() {
        for h in holders(d) {
            if set.insert(h) {
                todo.push(h);
            }
        }
    }
    set
}

fn holders(dev: u64) -> Vec<u64> {
    let dir = format!(
        "/sys/dev/block/{}:{}/holders",
        libc::major(dev),
        libc::minor(dev)
    );
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let dev = Path::new("/sys/class/block")
                .join(e.file_name())
                .join("dev");
            parse_devnum(&std::fs::read_to_string(dev).ok()?)
        })
        .collect()
}

fn partitions_of(dev: u64) -> HashSet<u64> {
    let mut set = HashSet::from([dev]);
    let sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(dev),
        libc::minor(dev)
    ));
    if let Ok(entries) = std::fs::read_dir(&sys) {
        for e in entries.flatten() {
            let p = e.path();
            if p.join("partition").exists()
                && let Some(n) = std::fs::read_to_string(p.join("dev"))
                    .ok()
                    .and_then(|s| parse_devnum(&s))
            {
                set.insert(n);
            }
        }
    }
    set
}

/// Every device number through which the kernel may be using this disk: the device and its
/// partitions, or for an image file the loop devices backed by it (and their partitions).
pub fn disk_devnums(path: &Path) -> HashSet<u64> {
    if let Some(dev) = crate::device::block_devnum(path) {
        return devnums_of_block(dev);
    }
    let mut set = HashSet::new();
    let Ok(canon) = std::fs::canonicalize(path) else {
        return set;
    };
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let backing = e.path().join("loop/backing_file");
            let Ok(b) = std::fs::read_to_string(&backing) else {
                continue;
            };
            if Path::new(b.trim()) == canon
                && let Some(n) = std::fs::read_to_string(e.path().join("dev"))
                    .ok()
                    .and_then(|s| parse_devnum(&s))
            {
                set.extend(devnums_of_block(n));
            }
        }
    }
    set
}

/// Mounts and swap areas on the given device numbers.
pub fn mounts_on(devs: &HashSet<u64>) -> Result<Vec<MountUse>> {
    let mut uses = Vec::new();
    if devs.is_empty() {
        return Ok(uses);
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-");
        let source = sep
            .and_then(|i| fields.get(i + 2))
            .copied()
            .unwrap_or("?")
            .to_string();
        // btrfs shows an anonymous device number (0:NN) for each subvolume: its source names
        // the block device it is on.
        let by_number = fields.get(2).and_then(|s| parse_devnum(s));
        let dev = by_number.filter(|d| devs.contains(d)).or_else(|| {
            source
                .starts_with('/')
                .then(|| crate::device::block_devnum(Path::new(&unescape_mount(&source))))
                .flatten()
                .filter(|d| devs.contains(d))
        });
        let Some(dev) = dev else {
            continue;
        };
        let opts = fields.get(5).copied().unwrap_or("");
        uses.push(MountUse {
            devnum: dev,
            source,
            mountpoint: unescape_mount(fields.get(4).copied().unwrap_or("?")),
            read_write: opts.split(',').any(|o| o == "rw"),
        });
    }
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let Some(p) = line.split_whitespace().next() else {
                continue;
            };
            if let Some(d) = crate::device::block_devnum(Path::new(p))
                && devs.contains(&d)
            {
                uses.push(MountUse {
                    devnum: d,
                    source: p.to_string(),
                    mountpoint: "[swap]".into(),
                    read_write: true,
                });
            }
        }
    }
    Ok(uses)
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
pub fn mount_field(f: &str) -> Vec<u8> {
    let b = f.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn unescape_mount(s: &str) -> String {
    String::from_utf8_lossy(&mount_field(s)).into_owned()
}

/// Refuse a restore target that is mounted, runs this system, or holds the repository. The
/// target may not exist yet (an image file to create): then only where it would be counts.
pub fn check_restore_target(target: &Path, repo_local: Option<&Path>) -> Result<()> {
    let devs = disk_devnums(target);
    let uses = mounts_on(&devs)?;
    if let Some(root) = uses.iter().find(|u| u.mountpoint == "/") {
        bail!(
            "target {} holds the running system ({} is mounted on /): choose another disk",
            target.display(),
            root.source
        );
    }
    let repo_canon = repo_local.and_then(|r| std::fs::canonicalize(r).ok());
    if let (Some(repo), Some(canon)) = (repo_local, &repo_canon)
        && let Some(u) = uses
            .iter()
            .find(|u| canon.starts_with(Path::new(&u.mountpoint)))
    {
        bail!(
            "target {} holds the repository {} ({} is mounted on {}): restore onto a different disk",
            target.display(),
            repo.display(),
            u.source,
            u.mountpoint
        );
    }
    if let Some(u) = uses.first() {
        bail!(
            "target {} is in use: {} is mounted on {}: unmount it or choose another disk",
            target.display(),
            u.source,
            u.mountpoint
        );
    }
    if let Some(repo) = repo_local {
        check_not_in_repo(target, repo, &devs)?;
    }
    Ok(())
}

/// The repository must not be written through the target: not a disk it lives on, not a file
/// inside it by any name (symlinks, bind mounts, `..`), not a hard link to one of its files.
fn check_not_in_repo(target: &Path, repo: &Path, devs: &HashSet<u64>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(rm) = std::fs::metadata(repo) else {
        return Ok(());
    };
    if devs.contains(&rm.dev()) {
        bail!(
            "target {} holds the repository {}: restore onto a different disk",
            target.display(),
            repo.display()
        );
    }
    let inside = || {
        anyhow::anyhow!(
            "target {} is inside the repository {}: write the image somewhere else",
            target.display(),
            repo.display()
        )
    };
    // Where the target is (or would be): itself if it exists, symlinks followed, else its
    // directory. Each directory up to / is compared with the repository's by device and inode,
    // which sees through every alias a path can have.
    let meta = std::fs::metadata(target).ok();
    let dir = match &meta {
        Some(_) => std::fs::canonicalize(target).ok(),
        None => target
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .and_then(|p| std::fs::canonicalize(p).ok()),
    };
    let mut at = dir.as_deref();
    while let Some(d) = at {
        if let Ok(dm) = std::fs::metadata(d)
            && (dm.dev(), dm.ino()) == (rm.dev(), rm.ino())
        {
            return Err(inside());
        }
        at = d.parent();
    }
    // A regular file with more than one name on the repository's filesystem may be one of its
    // files (chunk files are only ever written once, so a link to one is never harmless).
    if let Some(m) = meta
        && m.file_type().is_file()
        && m.nlink() > 1
        && m.dev() == rm.dev()
    {
        bail!(
            "target {} has {} hard links and lies on the filesystem of the repository {}: it may be a file of the repository; restore to a new file",
            target.display(),
            m.nlink(),
            repo.display()
        );
    }
    Ok(())
}

/// Describe what a disk already holds, or None when it looks blank (first and last MiB zero).
pub fn existing_content(disk: &Disk) -> Result<Option<String>> {
    if disk.size == 0 {
        return Ok(None);
    }
    if let Ok(layout) =
        crate::device::layout::DiskLayout::read(&disk.file, disk.size, disk.sector_size)
    {
        match &layout.table {
            crate::device::layout::Table::Gpt(g) => {
                return Ok(Some(format!(
                    "a GPT partition table with {} partition(s)",
                    g.partitions.len()
                )));
            }
            crate::device::layout::Table::Mbr(m) => {
                return Ok(Some(format!(
                    "an MBR partition table with {} partition(s)",
                    m.partitions.len()
                )));
            }
            crate::device::layout::Table::None => {}
        }
    }
    if let Ok(Some(fs)) = crate::fs::map::probe(&disk.file, 0, disk.size) {
        return Ok(Some(format!("a {} filesystem", fs.fstype)));
    }
    let window = disk.size.min(1 << 20);
    let mut buf = vec![0u8; window as usize];
    for off in [0, disk.size - window] {
        disk.file
            .read_exact_at(&mut buf, off)
            .with_context(|| format!("cannot read {}", disk.path.display()))?;
        if buf.iter().any(|&b| b != 0) {
            return Ok(Some("data (its first or last MiB is not blank)".into()));
        }
    }
    Ok(None)
}
