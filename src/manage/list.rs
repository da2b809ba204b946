//! `bmr list`: the snapshots of one or all hosts.

use anyhow::Result;
use serde::Serialize;

use crate::repo::manifest::SnapshotSummary;
use crate::util::progress::human_bytes;

#[derive(Debug, Clone, clap::Args)]
pub struct ListOptions {
    /// Repository: a directory.
    #[arg(long)]
    pub repo: String,
    /// Only this host [default: all hosts].
    #[arg(long)]
    pub host: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct HostSnapshots {
    host: String,
    snapshots: Vec<SnapshotSummary>,
}

pub fn run(opts: &ListOptions) -> Result<()> {
    let src = crate::repo::open(&opts.repo)?;
    let src = src.as_ref();
    let hosts = match &opts.host {
        Some(h) => vec![h.clone()],
        None => crate::repo::manifest::read_hosts(src)?,
    };
    let mut out = Vec::new();
    for host in hosts {
        let mut idx = crate::repo::manifest::read_host_index(src, &host)?;
        // Stable: same-second snapshots keep their creation (index) order.
        idx.snapshots.sort_by_key(|s| s.unix_time);
        out.push(HostSnapshots {
            host,
            snapshots: idx.snapshots,
        });
    }
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if out.is_empty() {
        println!("no snapshots in {}", src.location());
        return Ok(());
    }
    println!(
        "{:<16} {:<24} {:<6} {:<25} {:>10} {:>10} {:>10}",
        "HOST", "ID", "KIND", "TIME", "DISK", "USED", "NEW"
    );
    for h in &out {
        for s in &h.snapshots {
            println!(
                "{:<16} {:<24} {:<6} {:<25} {:>10} {:>10} {:>10}",
                h.host,
                s.id,
                s.kind.to_string(),
                crate::util::timefmt::display(s.unix_time),
                human_bytes(s.disk_size),
                human_bytes(s.used_bytes),
                human_bytes(s.new_bytes)
            );
        }
    }
    Ok(())
}
