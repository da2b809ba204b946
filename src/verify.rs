//! `bmr verify`: every chunk every snapshot needs is present and hashes right.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Result;

use crossbeam_channel::bounded;

use crate::chunkindex::{ChunkRef, IndexReader};
use crate::progress::{Progress, human_bytes};
use crate::repo::{CHUNK_SIZE, Digest};

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
    stored: Option<(u32, [u8; 32])>,
    plain_len: u32,
    users: Vec<usize>,
}

pub fn run(opts: &VerifyOptions) -> Result<VerifyReport> {
    let src = crate::repo::open_source(&opts.repo)?;
    let src = src.as_ref();
    crate::repo::check_config(src)?;
    let hosts = match &opts.host {
        Some(h) => vec![h.clone()],
        None => crate::manifest::read_hosts(src)?,
    };
    let mut report = VerifyReport::default();
    let mut names: Vec<String> = Vec::new();
    let mut needed: HashMap<Digest, Needed> = HashMap::new();
    for host in &hosts {
        let idx = match crate::manifest::read_host_index(src, host) {
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
            let mut need = |digest: Digest, stored: Option<(u32, [u8; 32])>, plain_len: u32| {
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
                if s.kind == crate::manifest::Kind::Incremental {
                    let m = crate::manifest::read_inc_manifest(src, host, &s.id)?;
                    for f in &m.filesystems {
                        for e in crate::manifest::read_toc(src, host, &m.id, &f.toc)? {
                            if let crate::toc::Data::Chunks(c) = &e.data {
                                for (d, len) in c.iter().filter(|(d, _)| !d.is_empty()) {
                                    let arr: [u8; 32] = d
                                        .as_slice()
                                        .try_into()
                                        .map_err(|_| anyhow::anyhow!("bad digest"))?;
                                    need(Digest(arr), None, *len);
                                }
                            }
                        }
                    }
                    return Ok(());
                }
                let l = crate::restore::load_snapshot(src, host, &s.id)?;
                for t in &l.manifest.tocs {
                    crate::manifest::read_toc(src, host, &s.id, t)?;
                }
                for r in IndexReader::new(&l.index[..], &s.id)? {
                    let r = r?;
                    if let ChunkRef::Data {
                        digest,
                        stored_len,
                        stored_sha,
                    } = r.chunk
                    {
                        need(digest, Some((stored_len, stored_sha)), r.len);
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
        .map(|n| u64::from(n.stored.map_or(n.plain_len, |s| s.0)))
        .sum();
    report.bytes = total;
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let guard = Progress::start("verify", total, opts.quiet);
    let progress = guard.handle();
    let damaged: Mutex<Vec<(Digest, String)>> = Mutex::new(Vec::new());
    let (tx, rx) = bounded::<(&Digest, &Needed)>(threads * 2);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let rx = rx.clone();
            let (damaged, progress) = (&damaged, progress.clone());
            s.spawn(move || {
                let mut dec = zstd::bulk::Decompressor::new().ok();
                let mut buf = vec![0u8; CHUNK_SIZE as usize];
                for (d, n) in rx.iter() {
                    progress.add(u64::from(n.stored.map_or(n.plain_len, |s| s.0)));
                    let why = match src.read_chunk(d) {
                        Err(_) if matches!(src.chunk_len(d), Ok(None)) => {
                            Some("missing".to_string())
                        }
                        Err(e) => Some(format!("unreadable ({e:#})")),
                        Ok(b) => match n.stored {
                            Some((len, _)) if b.len() as u64 != u64::from(len) => {
                                Some(format!("wrong size ({} bytes, expected {len})", b.len()))
                            }
                            _ => {
                                let checked = match n.stored {
                                    Some((_, sha)) => crate::repo::check_stored(&b, &sha),
                                    None => crate::repo::parse_chunk(&b)
                                        .and_then(|(sum, _)| crate::repo::check_stored(&b, &sum)),
                                };
                                match checked {
                                    None => Some("checksum mismatch".into()),
                                    Some(payload) => {
                                        let plain = dec.as_mut().and_then(|dec| {
                                            dec.decompress_to_buffer(payload, &mut buf[..]).ok()
                                        });
                                        match plain {
                                            Some(len)
                                                if len == n.plain_len as usize
                                                    && Digest::of(&buf[..len]) == *d =>
                                            {
                                                None
                                            }
                                            _ => Some("content does not match its name".into()),
                                        }
                                    }
                                }
                            }
                        },
                    };
                    if let Some(w) = why {
                        damaged
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((*d, w));
                    }
                }
            });
        }
        drop(rx);
        for (d, n) in &needed {
            if tx.send((d, n)).is_err() {
                break;
            }
        }
        drop(tx);
    });
    drop(guard);
    let mut damaged = damaged.into_inner().unwrap_or_else(|p| p.into_inner());
    damaged.sort();
    for (d, why) in damaged {
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
            "chunk {d}: {why}; breaks snapshot(s) {}",
            users.join(", ")
        ));
    }
    Ok(report)
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
