//! The unattended restore: every decision comes from kernel parameters, nothing prompts, and
//! anything ambiguous (two candidate disks, several hosts, a disk holding data without
//! `bmr.yes`) fails with the reason before a byte is written.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::media::{self, Media};
use super::{Outcome, Params, net};
use crate::device::disks::{self, DiskInfo};
use crate::restore::{RestoreHow, RestorePlan};
use crate::util::progress::human_bytes;

pub fn run(p: &Params) -> Outcome {
    let start = Instant::now();
    let mut o = Outcome::default();
    let mut mounts = Media::default();
    let r = steps(p, &mut o, &mut mounts);
    o.seconds = start.elapsed().as_secs_f64();
    match r {
        Ok(msg) => {
            o.ok = true;
            o.message = msg;
        }
        Err(e) => o.message = format!("{e:#}"),
    }
    o
}

/// Mount the rescue medium (CD, or the stick the ISO was written to) for files such as CAs.
pub fn mount_boot_medium(m: &mut Media) -> Option<PathBuf> {
    let mut devs: Vec<PathBuf> = std::fs::read_dir("/dev")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("sr"))
        })
        .collect();
    devs.extend(
        disks::list()
            .into_iter()
            .filter(|d| d.rescue_medium)
            .map(|d| d.path),
    );
    let dev = devs.into_iter().find(|d| disks::holds_rescue_iso(d))?;
    m.mount(&media::Fs {
        dev: dev.to_string_lossy().to_string(),
        fstype: "iso9660".into(),
        ..Default::default()
    })
}

/// Whether any filesystem of the disk is mounted.
fn in_use(d: &DiskInfo) -> bool {
    crate::device::safety::mounts_on(&crate::device::safety::disk_devnums(&d.path))
        .map(|u| !u.is_empty())
        .unwrap_or(true)
}

fn list_names(v: &[&DiskInfo]) -> String {
    v.iter()
        .map(|d| format!("{} {}", d.name, human_bytes(d.size)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The target disk from `bmr.target`: a name, a by-id name, or `auto`.
pub fn choose_target<'a>(
    spec: &str,
    all: &'a [DiskInfo],
    repo_disks: &[String],
    need: u64,
) -> Result<&'a DiskInfo> {
    if spec != "auto" {
        let d = disks::find(all, spec)?;
        if d.rescue_medium {
            bail!(
                "bmr.target={spec}: /dev/{} is the rescue medium this system booted from: name another disk",
                d.name
            );
        }
        if repo_disks.contains(&d.name) {
            bail!(
                "bmr.target={spec}: /dev/{} holds the repository: name another disk",
                d.name
            );
        }
        return Ok(d);
    }
    let usable: Vec<&DiskInfo> = all
        .iter()
        .filter(|d| !d.rescue_medium && !d.read_only && !repo_disks.contains(&d.name) && !in_use(d))
        .collect();
    let fits: Vec<&DiskInfo> = usable.iter().copied().filter(|d| d.size >= need).collect();
    match fits.as_slice() {
        [d] => Ok(d),
        [] if usable.is_empty() => bail!(
            "bmr.target=auto: no disk to restore to (the boot medium and the repository's disk are never used): attach a disk"
        ),
        [] => bail!(
            "bmr.target=auto: no disk is big enough: the backup needs {}, the disks are {}: attach a bigger disk",
            human_bytes(need),
            list_names(&usable)
        ),
        many => bail!(
            "bmr.target=auto: {} disks fit ({}): name one with bmr.target=/dev/{} or a /dev/disk/by-id name",
            many.len(),
            list_names(many),
            many[0].name
        ),
    }
}

/// Find the local repository, waiting for its medium to appear (USB disks are slow).
fn local_repo(
    spec: &str,
    host: Option<&str>,
    m: &mut Media,
    wait: Duration,
) -> Result<media::Found> {
    if spec == "auto" {
        let start = Instant::now();
        loop {
            let found: Vec<media::Found> = m
                .discover()
                .into_iter()
                .filter(|f| host.is_none_or(|h| f.hosts.iter().any(|x| x == h)))
                .collect();
            match found.as_slice() {
                [f] => return Ok(f.clone()),
                [] if start.elapsed() < wait => std::thread::sleep(Duration::from_secs(2)),
                [] => bail!(
                    "bmr.repo=auto: no repository{} found on any disk within {} s: attach the backup disk or set bmr.repo",
                    host.map(|h| format!(" with host {h}")).unwrap_or_default(),
                    wait.as_secs()
                ),
                many => bail!(
                    "bmr.repo=auto: {} repositories found ({}): name one, e.g. bmr.repo=dev:{}:{}",
                    many.len(),
                    many.iter()
                        .map(|f| f.describe())
                        .collect::<Vec<_>>()
                        .join("; "),
                    many[0].fs.dev,
                    many[0].path.display()
                ),
            }
        }
    }
    let mut err = None;
    let found = disks::wait_for(wait, || match media::resolve(m, spec) {
        Ok(f) => f,
        Err(e) => {
            err = Some(e);
            Some(media::Found {
                path: PathBuf::new(),
                fs: media::Fs::default(),
                hosts: Vec::new(),
            })
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    found.with_context(|| {
        let seen: Vec<String> = media::blkid()
            .iter()
            .map(|f| format!("{} {} {:?}", f.dev, f.fstype, f.label))
            .collect();
        format!(
            "repository {spec} not found within {} s (filesystems seen: {}): check bmr.repo and that the backup disk is attached",
            wait.as_secs(),
            if seen.is_empty() { "none".into() } else { seen.join(", ") }
        )
    })
}

fn steps(p: &Params, o: &mut Outcome, mounts: &mut Media) -> Result<String> {
    if !p.errors.is_empty() {
        bail!("{}", p.errors.join("; "));
    }
    let repo_spec = p
        .repo
        .as_deref()
        .context("bmr.repo is missing: add bmr.repo=https://server/path, bmr.repo=label:NAME or bmr.repo=auto")?;
    let target_spec = p.target.as_deref().context(
        "bmr.target is missing: add bmr.target=auto or a disk, e.g. bmr.target=/dev/sda",
    )?;
    let http = repo_spec.starts_with("http://") || repo_spec.starts_with("https://");

    println!("waiting for disks to settle ...");
    disks::settle(Duration::from_secs(3), p.wait.min(Duration::from_secs(20)));
    let medium = mount_boot_medium(mounts);
    crate::repo::http::add_ca_files(super::resolve_ca(&p.ca, medium.as_deref()));

    if http || p.report.is_some() || p.ip.is_some() {
        match net::up(p.ip.as_deref(), p.wait) {
            Ok(d) => println!("network: {d}"),
            Err(e) if http => return Err(e),
            Err(e) => println!("warning: {e:#}"),
        }
    }
    let (repo, repo_disks) = if http {
        (repo_spec.to_string(), Vec::new())
    } else {
        let f = local_repo(repo_spec, p.host.as_deref(), mounts, p.wait)?;
        println!("repository: {}", f.describe());
        let mut d: Vec<String> = mounts.devices().iter().map(|d| media::disk_of(d)).collect();
        if !f.fs.dev.is_empty() {
            d.push(media::disk_of(&f.fs.dev));
        }
        (f.path.to_string_lossy().to_string(), d)
    };
    o.repository = Some(repo.clone());
    let src = crate::repo::open(&repo)?;
    let src = src.as_ref();
    let host = match &p.host {
        Some(h) => h.clone(),
        None => match crate::repo::manifest::read_hosts(src)?.as_slice() {
            [h] => h.clone(),
            [] => bail!("repository {repo} holds no backups: check bmr.repo"),
            many => bail!(
                "bmr.host is missing and repository {repo} holds {} hosts ({}): add bmr.host=NAME",
                many.len(),
                many.join(", ")
            ),
        },
    };
    o.host = Some(host.clone());
    let at = p.at.as_deref().unwrap_or("latest");
    let point = crate::repo::snapshot::resolve(src, &host, at)?;
    let (id, when) = (point.id().to_string(), point.unix_time());
    o.snapshot = Some(id.clone());
    println!(
        "snapshot: {id} of host {host}, taken {} (bmr.at={at})",
        crate::util::timefmt::display(when)
    );

    let mut all = disks::list();
    // An image file (a disk on a mounted medium, or a trial run on a workstation).
    let file = std::path::Path::new(target_spec);
    if file.is_absolute() && file.is_file() {
        all.push(DiskInfo {
            name: target_spec.to_string(),
            path: file.to_path_buf(),
            size: file.metadata().map(|m| m.len()).unwrap_or(0),
            model: "image file".into(),
            serial: String::new(),
            bus: "file".into(),
            removable: false,
            read_only: false,
            parts: Vec::new(),
            ids: Vec::new(),
            rescue_medium: false,
        });
    }
    for d in &all {
        println!(
            "disk: {}{}",
            d.describe(),
            if d.rescue_medium {
                "  [rescue medium]"
            } else {
                ""
            }
        );
    }
    let target = choose_target(
        target_spec,
        &all,
        &repo_disks,
        crate::restore::min_target_size(&point.image.manifest),
    )?;
    println!("target: {}", target.describe());
    o.target = Some(target.path.display().to_string());
    let luks_keyfile = match &p.luks_keyfile {
        None => None,
        Some(spec) => {
            let mut err = None;
            let f = disks::wait_for(p.wait, || {
                match media::resolve_file(mounts, spec, "bmr.luks-keyfile") {
                    Ok(f) => f,
                    Err(e) => {
                        err = Some(e);
                        Some(PathBuf::new())
                    }
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
            Some(f.with_context(|| {
                format!(
                    "bmr.luks-keyfile={spec}: the medium did not appear within {} s: attach it or check its label",
                    p.wait.as_secs()
                )
            })?)
        }
    };
    let how = RestoreHow {
        verify: p.verify,
        mirror_disk: p.mirror_disk.as_ref().map(std::path::PathBuf::from),
        fixups: crate::fixup::FixupOptions {
            grow: p.grow || p.grow_lv.is_some(),
            grow_lv: p.grow_lv.clone(),
            reinstall_bootloader: p.reinstall_bootloader,
            luks_keyfile,
            efi_boot_entry: super::in_rescue_system(),
            ..Default::default()
        },
        ..Default::default()
    };
    let plan = RestorePlan::prepare(src, point, &target.path, how)?;
    for l in plan.lines() {
        println!("{l}");
    }
    o.plan = Some(plan.to_json());
    if let Some(what) = &plan.target.holds
        && !p.yes
    {
        bail!(
            "target {} holds {what}: add bmr.yes to the kernel command line to overwrite it",
            target.path.display()
        );
    }
    if let Some(mt) = &plan.mirror
        && let Some(what) = &mt.holds
        && !p.yes
    {
        bail!(
            "mirror disk {} holds {what}: add bmr.yes to the kernel command line to overwrite it",
            mt.path.display()
        );
    }
    let arrays: Vec<String> = plan
        .manifest()
        .mirrors()
        .into_iter()
        .map(|r| r.volume_name())
        .collect();
    let stack = match (&plan.mirror, arrays.is_empty()) {
        (_, true) => String::new(),
        (Some(mt), false) => format!(
            ", {} mirrored onto {}",
            arrays.join(", "),
            mt.path.display()
        ),
        (None, false) => format!(", {} degraded (1 disk)", arrays.join(", ")),
    };
    let s = plan.execute(true)?;
    crate::restore::print_summary(&s);
    o.bytes_written = s.written;
    o.verified = s.verified;
    Ok(format!(
        "restored host {host} snapshot {id} ({}) to {}: {} written in {:.0} s{}{stack}",
        crate::util::timefmt::display(when),
        target.path.display(),
        human_bytes(s.written),
        s.elapsed.as_secs_f64(),
        if s.verified { ", verified" } else { "" }
    ))
}
