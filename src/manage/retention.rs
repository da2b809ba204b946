//! `bmr forget` (drop snapshots by a retention policy) and `bmr prune` (delete chunks no
//! snapshot references).

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::repo::RepoRead;
use crate::repo::chunk::DAMAGED_SUFFIX;
use crate::repo::chunkindex::ChunkRef;
use crate::repo::manifest::{Kind, SnapshotSummary};
use crate::repo::snapshot::write_host_index;
use crate::repo::{Digest, paths};
use crate::util::progress::human_bytes;

#[derive(Debug, Clone, clap::Args)]
pub struct ForgetOptions {
    /// Repository directory.
    #[arg(long)]
    pub repo: PathBuf,
    /// Host whose snapshots to thin out.
    #[arg(long)]
    pub host: String,
    /// Keep the newest N snapshots.
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, default_value_t = 0)]
    pub keep_daily: usize,
    /// Keep the newest snapshot of each of the last N weeks that have one.
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: usize,
    /// Show what would be removed without removing it.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PruneOptions {
    /// Repository directory.
    #[arg(long)]
    pub repo: PathBuf,
    /// Show what would be deleted without deleting it.
    #[arg(long)]
    pub dry_run: bool,
}

/// Which snapshots a policy keeps; images that kept incrementals build on are kept too.
pub fn keep_set(snaps: &[SnapshotSummary], o: &ForgetOptions) -> BTreeSet<String> {
    // Newest first; the index is in creation order, which breaks same-second ties.
    let mut sorted: Vec<(usize, &SnapshotSummary)> = snaps.iter().enumerate().collect();
    sorted.sort_by_key(|(i, s)| std::cmp::Reverse((s.unix_time, *i)));
    let sorted: Vec<&SnapshotSummary> = sorted.into_iter().map(|(_, s)| s).collect();
    let mut keep: BTreeSet<String> = sorted
        .iter()
        .take(o.keep_last)
        .map(|s| s.id.clone())
        .collect();
    let mut bucket = |n: usize, key: &dyn Fn(i64) -> i64| {
        let mut seen = HashSet::new();
        for s in &sorted {
            if seen.len() >= n {
                break;
            }
            if seen.insert(key(s.unix_time)) {
                keep.insert(s.id.clone());
            }
        }
    };
    bucket(o.keep_daily, &|t| t.div_euclid(86_400));
    // Weeks starting on Monday (1970-01-01 was a Thursday).
    bucket(o.keep_weekly, &|t| (t.div_euclid(86_400) + 3).div_euclid(7));
    let bases: Vec<String> = snaps
        .iter()
        .filter(|s| keep.contains(&s.id))
        .filter_map(|s| s.base.clone())
        .collect();
    keep.extend(bases);
    keep
}

pub fn forget(o: &ForgetOptions) -> Result<()> {
    if o.keep_last == 0 && o.keep_daily == 0 && o.keep_weekly == 0 {
        bail!("no retention policy given: add --keep-last, --keep-daily or --keep-weekly");
    }
    let repo = crate::repo::open_write(&o.repo, false)?;
    let repo = repo.as_ref();
    let _host = repo.lock(&format!("host-{}", o.host), true)?;
    let mut idx = crate::repo::manifest::read_host_index(repo, &o.host)?;
    let keep = keep_set(&idx.snapshots, o);
    let (kept, gone): (Vec<_>, Vec<_>) = idx
        .snapshots
        .iter()
        .cloned()
        .partition(|s| keep.contains(&s.id));
    for s in &kept {
        println!(
            "keep   {} {} {}",
            s.id,
            s.kind,
            crate::util::timefmt::display(s.unix_time)
        );
    }
    for s in &gone {
        println!(
            "forget {} {} {}",
            s.id,
            s.kind,
            crate::util::timefmt::display(s.unix_time)
        );
    }
    if o.dry_run || gone.is_empty() {
        return Ok(());
    }
    // The index goes first: a crash leaves unreferenced files, never a listed snapshot without
    // its manifest.
    idx.snapshots = kept;
    write_host_index(repo, &idx)?;
    let dir = paths::snapshot_dir(&o.host);
    let files = repo.list_files(&dir)?;
    for s in &gone {
        for name in files.iter().filter(|n| paths::belongs_to(n, &s.id)) {
            repo.remove_file(&format!("{dir}/{name}"))?;
        }
    }
    println!(
        "forgot {} snapshot(s); run bmr prune to free their chunks",
        gone.len()
    );
    Ok(())
}

/// Every chunk any snapshot of any host references.
fn referenced(repo: &dyn RepoRead) -> Result<HashSet<Digest>> {
    let mut set = HashSet::new();
    for host in crate::repo::manifest::read_hosts(repo)? {
        let idx = crate::repo::manifest::read_host_index(repo, &host)?;
        for s in &idx.snapshots {
            match s.kind {
                Kind::Image => {
                    let l = crate::repo::snapshot::load_image(repo, &host, &s.id).with_context(
                        || {
                            format!(
                                "cannot prune: snapshot {} is unreadable; fix or forget it first",
                                s.id
                            )
                        },
                    )?;
                    for r in l.records()? {
                        if let ChunkRef::Data { digest, .. } = r?.chunk {
                            set.insert(digest);
                        }
                    }
                }
                Kind::Incremental => {
                    let m = crate::repo::manifest::read_inc_manifest(repo, &host, &s.id)?;
                    for f in &m.filesystems {
                        for e in crate::repo::manifest::read_toc(repo, &host, &m.id, &f.toc)? {
                            for d in e.chunk_digests() {
                                set.insert(d?);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(set)
}

pub fn prune(o: &PruneOptions) -> Result<()> {
    let repo = crate::repo::open_write(&o.repo, false)?;
    let repo = repo.as_ref();
    // Exclusive: waits for running backups (they hold it shared), so a chunk a backup just
    // stored but has not referenced yet is never deleted.
    let _lock = repo.lock("repo", true)?;
    let used = referenced(repo)?;
    let (staged, staged_bytes) = remove_staged(repo, o.dry_run)?;
    let (mut n, mut bytes, mut kept) = (0u64, 0u64, 0u64);
    for prefix in 0..=255u8 {
        for e in repo.list_chunks(prefix)? {
            // Unfinished uploads, and damaged chunks bmr verify moved aside.
            let stale_tmp = e.name.starts_with(".tmp.") || e.name.ends_with(DAMAGED_SUFFIX);
            // A name that is not a digest is not ours to delete.
            if !stale_tmp && e.digest.is_none_or(|d| used.contains(&d)) {
                kept += 1;
                continue;
            }
            n += 1;
            bytes += e.len;
            if !o.dry_run {
                repo.remove_chunk(prefix, &e.name)?;
            }
        }
    }
    let verb = if o.dry_run { "would delete" } else { "deleted" };
    println!(
        "{verb} {staged} staged file(s) left by interrupted backups, {}",
        human_bytes(staged_bytes)
    );
    println!(
        "{verb} {n} unreferenced chunk(s), {}; {kept} chunk(s) in use",
        human_bytes(bytes)
    );
    Ok(())
}

/// Staged files (`.tmp.*`) in the metadata directories: what a killed backup, forget or
/// write left behind. The caller holds the repository lock exclusive, so no backup is
/// running; each host's lock is taken too, for a forget of that host. (files, bytes).
fn remove_staged(repo: &dyn crate::repo::RepoWrite, dry_run: bool) -> Result<(u64, u64)> {
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut sweep = |dir: &str| -> Result<()> {
        for name in repo.list_files(dir)? {
            if !name.starts_with(".tmp.") {
                continue;
            }
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            n += 1;
            bytes += repo.file_len(&rel).unwrap_or(0);
            if !dry_run {
                repo.remove_file(&rel)?;
            }
        }
        Ok(())
    };
    sweep("")?;
    sweep(paths::HOSTS_DIR)?;
    // From the directory, not hosts.json: a host's first backup may have died before it was
    // listed there.
    for host in repo.list_files(paths::HOSTS_DIR)? {
        if crate::repo::check_host_name(&host).is_err() {
            continue;
        }
        let _host = repo.lock(&format!("host-{host}"), true)?;
        sweep(&format!("{}/{host}", paths::HOSTS_DIR))?;
        sweep(&paths::snapshot_dir(&host))?;
    }
    Ok((n, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, t: i64, kind: Kind, base: Option<&str>) -> SnapshotSummary {
        SnapshotSummary {
            id: id.into(),
            kind,
            time: String::new(),
            unix_time: t,
            disk_size: 0,
            used_bytes: 0,
            new_bytes: 0,
            base: base.map(String::from),
        }
    }

    fn opts(last: usize, daily: usize, weekly: usize) -> ForgetOptions {
        ForgetOptions {
            repo: PathBuf::new(),
            host: "h".into(),
            keep_last: last,
            keep_daily: daily,
            keep_weekly: weekly,
            dry_run: false,
        }
    }

    #[test]
    fn policies_and_bases() {
        const DAY: i64 = 86_400;
        // 2026-11-02 is a Monday. Two snapshots a day for 14 days; incrementals on odd days.
        let monday = 1_793_577_600;
        let mut s = Vec::new();
        for d in 0..14 {
            for h in [6, 18] {
                let id = format!("d{d:02}h{h}");
                let t = monday + d * DAY + h * 3600;
                if d % 2 == 1 {
                    s.push(snap(
                        &id,
                        t,
                        Kind::Incremental,
                        Some(&format!("d{:02}h6", d - 1)),
                    ));
                } else {
                    s.push(snap(&id, t, Kind::Image, None));
                }
            }
        }
        let k = keep_set(&s, &opts(1, 0, 0));
        assert_eq!(k.into_iter().collect::<Vec<_>>(), ["d12h6", "d13h18"]);
        let k = keep_set(&s, &opts(0, 3, 0));
        assert_eq!(
            k.into_iter().collect::<Vec<_>>(),
            ["d10h6", "d11h18", "d12h18", "d13h18", "d12h6"]
                .iter()
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        let k = keep_set(&s, &opts(0, 0, 2));
        // The newest of each of the two weeks (Sunday 18:00 of week 2, Sunday of week 1).
        assert!(k.contains("d13h18") && k.contains("d06h18") && k.contains("d12h6"));
        assert_eq!(k.len(), 3);
    }
}
