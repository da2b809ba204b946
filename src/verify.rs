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
    stored_len: u32,
    stored_sha: [u8; 32],
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
            let loaded = crate::restore::load_snapshot(src, host, &s.id);
            let l = match loaded {
                Ok(l) => l,
                Err(e) => {
                    report.problems.push(format!("snapshot {name}: {e:#}"));
                    continue;
                }
            };
            let si = names.len();
            names.push(name.clone());
            let reader = IndexReader::new(&l.index[..], &s.id);
            let res = reader.and_then(|rd| {
                for r in rd {
                    let r = r?;
                    if let ChunkRef::Data {
                        digest,
                        stored_len,
                        stored_sha,
                    } = r.chunk
                    {
                        let n = needed.entry(digest).or_insert(Needed {
                            stored_len,
                            stored_sha,
                            plain_len: r.len,
                            users: Vec::new(),
                        });
                        if n.users.last() != Some(&si) {
                            n.users.push(si);
                        }
                    }
                }
                Ok(())
            });
            if let Err(e) = res {
                report.problems.push(format!("snapshot {name}: {e:#}"));
            }
        }
    }
    report.chunks = needed.len();
    let total: u64 = needed.values().map(|n| u64::from(n.stored_len)).sum();
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
                    progress.add(u64::from(n.stored_len));
                    let why = match src.chunk_len(d) {
                        Ok(None) => Some("missing".to_string()),
                        Err(e) => Some(format!("unreadable ({e:#})")),
                        Ok(Some(_)) => match src.read_chunk(d) {
                            Err(e) => Some(format!("unreadable ({e:#})")),
                            Ok(b) if b.len() as u64 != u64::from(n.stored_len) => Some(format!(
                                "wrong size ({} bytes, expected {})",
                                b.len(),
                                n.stored_len
                            )),
                            Ok(b) => match crate::repo::check_stored(&b, &n.stored_sha) {
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
                            },
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
