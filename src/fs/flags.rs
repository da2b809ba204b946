//! Inode flags as `lsattr` and `chattr` show and set them: the FS_*_FL bits of the
//! FS_IOC_GETFLAGS / FS_IOC_SETFLAGS ioctls (include/uapi/linux/fs.h). ext2/3/4 store these
//! bits as they are; XFS and btrfs keep their own and the kernel maps them (xfs_ioctl.c,
//! btrfs/ioctl.c), and so do the readers here, so a file list holds the same number whether it
//! came from an image or from a mounted filesystem.

use std::os::fd::{AsRawFd, BorrowedFd};

pub const SECRM: u32 = 0x0000_0001;
pub const UNRM: u32 = 0x0000_0002;
pub const COMPR: u32 = 0x0000_0004;
pub const SYNC: u32 = 0x0000_0008;
pub const IMMUTABLE: u32 = 0x0000_0010;
pub const APPEND: u32 = 0x0000_0020;
pub const NODUMP: u32 = 0x0000_0040;
pub const NOATIME: u32 = 0x0000_0080;
pub const NOCOMP: u32 = 0x0000_0400;
pub const JOURNAL_DATA: u32 = 0x0000_4000;
pub const NOTAIL: u32 = 0x0000_8000;
pub const DIRSYNC: u32 = 0x0001_0000;
pub const TOPDIR: u32 = 0x0002_0000;
pub const NOCOW: u32 = 0x0080_0000;
pub const DAX: u32 = 0x0200_0000;
pub const PROJINHERIT: u32 = 0x2000_0000;

/// What a file list records and a restore sets: the flags chattr(1) can set. Left out: what
/// the filesystem manages itself (extents, inline data, htree index, encryption, verity) and
/// casefold (settable only on an empty directory, before its entries exist).
pub const SETTABLE: u32 = SECRM
    | UNRM
    | COMPR
    | SYNC
    | IMMUTABLE
    | APPEND
    | NODUMP
    | NOATIME
    | NOCOMP
    | JOURNAL_DATA
    | NOTAIL
    | DIRSYNC
    | TOPDIR
    | NOCOW
    | DAX
    | PROJINHERIT;

/// Flags that forbid changing, renaming or deleting the file (or, on a directory, its
/// entries): cleared before a restore changes it, set again last.
pub const LOCKING: u32 = IMMUTABLE | APPEND;

/// Flags that only take effect on an empty file (btrfs ignores +C on one with data): set on a
/// new file before its data is written.
pub const BEFORE_DATA: u32 = NOCOW | COMPR | NOCOMP;

/// XFS di_flags and di_flags2 as FS_IOC_GETFLAGS reports them (xfs_ip2xflags, then
/// fileattr_fill_xflags).
pub fn from_xfs(di_flags: u16, di_flags2: u64) -> u32 {
    const MAP: [(u16, u32); 6] = [
        (0x0008, IMMUTABLE),
        (0x0010, APPEND),
        (0x0020, SYNC),
        (0x0040, NOATIME),
        (0x0080, NODUMP),
        (0x0200, PROJINHERIT),
    ];
    let mut f = MAP
        .iter()
        .filter(|(x, _)| di_flags & x != 0)
        .fold(0, |a, (_, fl)| a | fl);
    if di_flags2 & 0x1 != 0 {
        f |= DAX;
    }
    f
}

/// btrfs inode item flags as FS_IOC_GETFLAGS reports them (btrfs_inode_flags_to_fsflags).
pub fn from_btrfs(flags: u64) -> u32 {
    const MAP: [(u64, u32); 9] = [
        (1 << 1, NOCOW),
        (1 << 3, NOCOMP),
        (1 << 5, SYNC),
        (1 << 6, IMMUTABLE),
        (1 << 7, APPEND),
        (1 << 8, NODUMP),
        (1 << 9, NOATIME),
        (1 << 10, DIRSYNC),
        (1 << 11, COMPR),
    ];
    MAP.iter()
        .filter(|(x, _)| flags & x != 0)
        .fold(0, |a, (_, fl)| a | fl)
}

// The ioctls take a pointer to an int (the kernel reads 32 bits, whatever the number says).
nix::ioctl_read!(getflags, b'f', 1, libc::c_long);
nix::ioctl_write_ptr!(setflags, b'f', 2, libc::c_long);

/// The settable flags of an open file or directory; `Ok(None)` where the filesystem has none
/// (FAT, tmpfs without them: ENOTTY, EOPNOTSUPP, EINVAL).
pub fn get(fd: BorrowedFd<'_>) -> nix::Result<Option<u32>> {
    let mut v: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, which points at `v`.
    match unsafe { getflags(fd.as_raw_fd(), (&raw mut v).cast()) } {
        Ok(_) => Ok(Some(v as u32 & SETTABLE)),
        Err(e) if unsupported(e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Give an open file or directory the settable flags `want`, keeping the bits the filesystem
/// manages (a read, then a write only if something differs, as chattr does).
pub fn set(fd: BorrowedFd<'_>, want: u32) -> nix::Result<()> {
    update(fd, SETTABLE, want & SETTABLE)
}

/// Clear the bits `clear`, then set the bits `add`.
pub fn update(fd: BorrowedFd<'_>, clear: u32, add: u32) -> nix::Result<()> {
    let mut cur: libc::c_int = 0;
    // SAFETY: as in `get`.
    unsafe { getflags(fd.as_raw_fd(), (&raw mut cur).cast()) }?;
    let new = (cur as u32 & !clear) | add;
    if new == cur as u32 {
        return Ok(());
    }
    let v = new as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, which points at `v`.
    unsafe { setflags(fd.as_raw_fd(), (&raw const v).cast()) }?;
    Ok(())
}

/// The errors of a filesystem that has no inode flags.
pub fn unsupported(e: nix::errno::Errno) -> bool {
    use nix::errno::Errno;
    matches!(e, Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL)
}

/// `lsattr`'s letters, for messages.
pub fn letters(f: u32) -> String {
    const L: [(u32, char); 16] = [
        (SECRM, 's'),
        (UNRM, 'u'),
        (SYNC, 'S'),
        (DIRSYNC, 'D'),
        (IMMUTABLE, 'i'),
        (APPEND, 'a'),
        (NODUMP, 'd'),
        (NOATIME, 'A'),
        (COMPR, 'c'),
        (NOCOMP, 'm'),
        (JOURNAL_DATA, 'j'),
        (NOTAIL, 't'),
        (TOPDIR, 'T'),
        (NOCOW, 'C'),
        (DAX, 'x'),
        (PROJINHERIT, 'P'),
    ];
    L.iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, c)| c)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfs_and_btrfs_map_like_the_kernel() {
        // XFS: immutable | append | nodump | projinherit, and DAX in di_flags2.
        assert_eq!(
            from_xfs(0x0008 | 0x0010 | 0x0080 | 0x0200 | 0x0002, 0x1 | 0x8),
            IMMUTABLE | APPEND | NODUMP | PROJINHERIT | DAX
        );
        // btrfs: nodatacow (+C) and nodatasum, immutable, compress; READONLY is internal.
        assert_eq!(
            from_btrfs(1 | 2 | 4 | (1 << 6) | (1 << 11)),
            NOCOW | IMMUTABLE | COMPR
        );
        assert_eq!(letters(IMMUTABLE | APPEND | NOCOW), "iaC");
    }
}
