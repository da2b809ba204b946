//! Where everything lives inside a repository. Every path string is built here.
//!
//! ```text
//! bmr-repo.json                       marker and format version
//! hosts.json                          the hosts with backups
//! hosts/HOST/snapshots.json           a host's snapshot index
//! hosts/HOST/snapshots/ID.json        a snapshot's manifest
//! hosts/HOST/snapshots/ID.idx         an image's chunk index
//! hosts/HOST/snapshots/ID.tocN        the file list of area N
//! hosts/HOST/snapshots/ID.tocN-K      the file list of logical volume K of area N (an LVM PV)
//! chunks/XX/DIGEST                    a chunk (XX: first byte of its digest)
//! locks/NAME                          advisory locks (local repositories)
//! ```

use super::chunk::Digest;

pub const REPO_FILE: &str = "bmr-repo.json";
pub const HOSTS_FILE: &str = "hosts.json";
pub const CHUNKS_DIR: &str = "chunks";
pub const HOSTS_DIR: &str = "hosts";
pub const LOCKS_DIR: &str = "locks";

pub fn host_index(host: &str) -> String {
    format!("{HOSTS_DIR}/{host}/snapshots.json")
}

pub fn snapshot_dir(host: &str) -> String {
    format!("{HOSTS_DIR}/{host}/snapshots")
}

pub fn manifest(host: &str, id: &str) -> String {
    format!("{}/{id}.json", snapshot_dir(host))
}

/// The chunk index's file name beside the manifest.
pub fn index_name(id: &str) -> String {
    format!("{id}.idx")
}

pub fn index(host: &str, id: &str) -> String {
    format!("{}/{}", snapshot_dir(host), index_name(id))
}

/// The file list's name beside the manifest: of a partition area, or of logical volume
/// `volume` (its index in the area's volumes) inside it.
pub fn toc_name(id: &str, area: u32, volume: Option<usize>) -> String {
    match volume {
        None => format!("{id}.toc{area}"),
        Some(k) => format!("{id}.toc{area}-{k}"),
    }
}

/// Whether `name` is a file list name of snapshot `id` for `area` (either form).
pub fn is_toc_name(name: &str, id: &str, area: u32) -> bool {
    let base = toc_name(id, area, None);
    name == base
        || name.strip_prefix(&base).is_some_and(|r| {
            r.strip_prefix('-').is_some_and(|k| {
                !k.is_empty() && k.len() <= 6 && k.bytes().all(|b| b.is_ascii_digit())
            })
        })
}

pub fn toc(host: &str, id: &str, area: u32, volume: Option<usize>) -> String {
    format!("{}/{}", snapshot_dir(host), toc_name(id, area, volume))
}

pub fn chunk_dir(prefix: u8) -> String {
    format!("{CHUNKS_DIR}/{prefix:02x}")
}

pub fn chunk(d: &Digest) -> String {
    format!("{}/{}", chunk_dir(d.0[0]), d.hex())
}

/// Whether a file in a snapshot directory belongs to snapshot `id` (its manifest, index or
/// file lists).
pub fn belongs_to(name: &str, id: &str) -> bool {
    name.strip_prefix(id).is_some_and(|r| r.starts_with('.'))
}
