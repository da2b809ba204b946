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
    /// Show what one snapshot holds (needs --host): the disk's partitions, the logical
    /// volumes inside LVM physical volumes, each filesystem and what is stored of it; for an
    /// incremental, also the filesystems it covers. A snapshot id, `latest`, or a time.
    #[arg(long, requires = "host", value_name = "POINT")]
    pub at: Option<String>,
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
    if let (Some(at), Some(host)) = (&opts.at, &opts.host) {
        return show(src, host, at, opts.json);
    }
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

/// One snapshot's stack and file lists.
fn show(src: &dyn crate::repo::RepoRead, host: &str, at: &str, json: bool) -> Result<()> {
    let p = crate::repo::snapshot::resolve(src, host, at)?;
    let m = &p.image.manifest;
    if json {
        let v = serde_json::json!({
            "id": p.id(),
            "image": m.id,
            "disk": m.disk,
            "areas": m.areas,
            "tocs": m.tocs,
            "incremental": p.inc.as_ref().map(|i| &i.filesystems),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "snapshot {} of host {host}, {}",
        p.id(),
        crate::util::timefmt::display(p.inc.as_ref().map_or(m.unix_time, |i| i.unix_time))
    );
    println!(
        "  image {} of {} ({}), {}",
        m.id,
        m.source,
        human_bytes(m.disk.size),
        match &m.disk.table {
            crate::device::layout::Table::Gpt(_) => "GPT",
            crate::device::layout::Table::Mbr(_) => "MBR",
            crate::device::layout::Table::None => "no partition table",
        }
    );
    for l in crate::restore::plan::area_lines(m) {
        println!("{l}");
    }
    if let Some(i) = &p.inc {
        for f in &i.filesystems {
            println!(
                "  incremental: {} ({}): {} entries, {} changed, {} deleted",
                m.fs_name(&f.toc),
                f.mountpoint,
                f.toc.entries,
                f.changed,
                f.deleted
            );
        }
    }
    Ok(())
}
