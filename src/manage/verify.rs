//! `bmr verify`: every chunk every snapshot needs is present and hashes right.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Result;

use crate::repo::chunk::{DAMAGED_SUFFIX, check_stored};
use crate::repo::chunkindex::ChunkRef;
use crate::repo::reader::{ChunkError, ChunkReader, Stored};
use crate::repo::{CHUNK_SIZE, Digest};
use crate::util::progress::{Progress, human_bytes};

#[derive(Debug, Clone, clap::Args)]
pub struct VerifyOptions {
    /// Repository: a directory.
    #[arg(long)]
    pub repo: String,
    /// Only this host's snapshots.
    #[arg(long)]
    pub host: Option<String>,
    /// Worker threads [default: number of CPUs].
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub snapshots: usize,
    pub chunks: usize,
    pub bytes: u64,
    /// One line per problem.
    pub problems: Vec<String>,
}

struct Needed {
    /// Image chunks come with their stored size and payload hash; file chunks of incrementals
    /// only with their name and plain length (the header's payload hash is checked instead).
    stored: Option<Stored>,
    plain_len: u32,
    users: Vec<usize>,
}

pub fn run(opts: &VerifyOptions) -> Result<VerifyReport> {
    let src = crate::repo::open(&opts.repo)?;
    let src = src.as_ref();
    let hosts = match &opts.host {
        Some(h) => vec![h.clone()],
        None => crate::repo::manifest::read_hosts(src)?,
    };
    let mut report = VerifyReport::default();
    let mut names: Vec<String> = Vec::new();
    let mut needed: HashMap<Digest, Needed> = HashMap::new();
    for host in &hosts {
        let idx = match crate::repo::manifest::read_host_index(src, host) {
            Ok(i) => i,
            Err(e) => {
                report.problems.push(format!("{e:#}"));
                continue;
            }
        };
        for s in &idx.snapshots {
            report.snapshots += 1;
            let name = format!("{} (host {host})", s.id);
            let si = names.len();
            names.push(name.clone());
            let mut need = |digest: Digest, stored: Option<Stored>, plain_len: u32| {
                let n = needed.entry(digest).or_insert(Needed {
                    stored,
                    plain_len,
                    users: Vec::new(),
                });
                if n.stored.is_none() {
                    n.stored = stored;
                }
                if n.users.last() != Some(&si) {
                    n.users.push(si);
                }
            };
            let res = (|| -> Result<()> {
                if s.kind == crate::repo::manifest::Kind::Incremental {
                    let m = crate::repo::manifest::read_inc_manifest(src, host, &s.id)?;
                    for f in &m.filesystems {
                        for e in crate::repo::manifest::read_toc(src, host, &m.id, &f.toc)? {
                            if let crate::repo::toc::Data::Chunks(c) = &e.data {
                                for (d, len) in c.iter().filter(|(d, _)| !d.is_empty()) {
                                    let d = Digest::from_slice(d)
                                        .ok_or_else(|| anyhow::anyhow!("bad digest"))?;
                                    need(d, None, *len);
                                }
                            }
                        }
                    }
                    return Ok(());
                }
                let l = crate::repo::snapshot::load_image(src, host, &s.id)?;
                for t in &l.manifest.tocs {
                    crate::repo::manifest::read_toc(src, host, &s.id, t)?;
                }
                for r in l.records()? {
                    let r = r?;
                    if let ChunkRef::Data {
                        digest,
                        stored_len,
                        stored_sha,
                    } = r.chunk
                    {
                        need(
                            digest,
                            Some(Stored {
                                len: stored_len,
                                sha: stored_sha,
                            }),
                            r.len,
                        );
                    }
                }
                Ok(())
            })();
            if let Err(e) = res {
                report.problems.push(format!("snapshot {name}: {e:#}"));
            }
        }
    }
    report.chunks = needed.len();
    let total: u64 = needed
        .values()
        .map(|n| u64::from(n.stored.map_or(n.plain_len, |s| s.len)))
        .sum();
    report.bytes = total;
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let guard = Progress::start("verify", total, opts.quiet);
    let progress = guard.handle();
    // (chunk, why, damaged in itself rather than missing or unreadable)
    let damaged: Mutex<Vec<(Digest, String, bool)>> = Mutex::new(Vec::new());
    // Every damaged chunk is reported, so no worker ever fails the pipeline.
    crate::util::pool::for_each(
        threads,
        || Ok((ChunkReader::new()?, vec![0u8; CHUNK_SIZE as usize])),
        |(reader, buf), (d, n): (&Digest, &Needed)| {
            progress.add(u64::from(n.stored.map_or(n.plain_len, |s| s.len)));
            if let Err(e) = reader.read(src, d, n.stored, n.plain_len as usize, buf) {
                let bad = match &e {
                    ChunkError::Missing | ChunkError::Unreadable(_) => false,
                    ChunkError::BadContent => true,
                    // Against what an index recorded: is the chunk also wrong in itself?
                    ChunkError::WrongSize { .. } | ChunkError::ChecksumMismatch => {
                        let mut stored = Vec::new();
                        src.read_chunk_into(d, &mut stored).is_ok()
                            && crate::repo::chunk::parse_chunk(&stored)
                                .is_none_or(|(sum, _)| check_stored(&stored, &sum).is_none())
                    }
                };
                damaged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((*d, e.to_string(), bad));
            }
            Ok(())
        },
        |f| {
            for item in &needed {
                if !f.send(item) {
                    break;
                }
            }
            Ok(())
        },
    )?;
    drop(guard);
    let mut damaged = damaged.into_inner().unwrap_or_else(|p| p.into_inner());
    damaged.sort_by_key(|(d, ..)| *d);
    let aside = set_aside(src, &damaged);
    for (d, why, _) in damaged {
        let users: Vec<&str> = needed
            .get(&d)
            .map(|n| {
                n.users
                    .iter()
                    .filter_map(|&i| names.get(i).map(String::as_str))
                    .collect()
            })
            .unwrap_or_default();
        report.problems.push(format!(
            "chunk {d}: {why}; breaks snapshot(s) {}{}",
            users.join(", "),
            match aside.get(&d) {
                Some(Ok(())) => format!(
                    "; moved aside to {}{DAMAGED_SUFFIX}: the next backup holding its data stores it again",
                    crate::repo::paths::chunk(&d)
                ),
                Some(Err(e)) => format!("; could not move it aside ({e:#})"),
                None => String::new(),
            }
        ));
    }
    Ok(report)
}

/// In a local repository, move chunks that are damaged in themselves aside, so backups stop
/// reusing them (their dedup check reads only a chunk's header) and store them afresh. Under
/// the repository lock, like prune: no backup is between checking a chunk and referencing it.
fn set_aside(
    src: &dyn crate::repo::RepoRead,
    damaged: &[(Digest, String, bool)],
) -> HashMap<Digest, Result<()>> {
    let mut out = HashMap::new();
    let Some(path) = src.local_path() else {
        return out;
    };
    let bad: Vec<Digest> = damaged.iter().filter(|x| x.2).map(|x| x.0).collect();
    if bad.is_empty() {
        return out;
    }
    let repo = match crate::repo::open_write(path, false) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("{e:#}");
            for d in bad {
                out.insert(d, Err(anyhow::anyhow!("{msg}")));
            }
            return out;
        }
    };
    let lock = repo.lock("repo", true);
    for d in bad {
        out.insert(
            d,
            match &lock {
                Ok(_) => repo.set_aside_chunk(&d),
                Err(e) => Err(anyhow::anyhow!("{e:#}")),
            },
        );
    }
    out
}

pub fn print_report(r: &VerifyReport) {
    for p in &r.problems {
        println!("DAMAGED: {p}");
    }
    println!(
        "checked {} snapshot(s), {} chunk(s), {}: {}",
        r.snapshots,
        r.chunks,
        human_bytes(r.bytes),
        if r.problems.is_empty() {
            "all intact".to_string()
        } else {
            format!("{} problem(s)", r.problems.len())
        }
    );
}
