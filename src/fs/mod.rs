//! Filesystems, read from their own on-disk structures without mounting: identification
//! ([`id`]), allocation maps for used-blocks-only images ([`map`]) and file trees for the
//! file lists ([`read`]). Nothing here knows about repositories or disks beyond a byte source.

pub mod flags;
pub mod id;
pub mod map;
pub mod read;
