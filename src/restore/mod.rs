//! Restore: [`plan`] prepares a [`RestorePlan`] (what will be written where, checked before
//! anything is), [`blocks`] writes an image's blocks, [`apply`] brings a restored filesystem
//! to an incremental's state, [`files`] serves `bmr ls` and `bmr restore-files`. This file is
//! the `bmr restore` command: build the plan, show it, ask, execute.

pub mod apply;
pub mod blocks;
pub mod files;
pub mod mirror;
pub mod plan;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

pub use plan::{RestoreHow, RestorePlan, RestoreSummary, min_target_size, print_summary};

/// Which snapshot `--at` names, in which repository.
#[derive(Debug, Clone, clap::Args)]
pub struct PointArgs {
    /// Repository: a directory, or an http(s):// URL.
    #[arg(long)]
    pub repo: String,
    /// Host whose backups to use.
    #[arg(long)]
    pub host: String,
    /// Snapshot id, `latest`, or a time (newest snapshot at or before it).
    #[arg(long, default_value = "latest")]
    pub at: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreOptions {
    #[command(flatten)]
    pub point: PointArgs,
    /// Target disk: a block device, or an image file (created if missing).
    #[arg(long)]
    pub target: PathBuf,
    /// Overwrite a target that holds data without asking.
    #[arg(long)]
    pub yes: bool,
    /// Show the restore plan and stop: nothing is written.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: the plan as JSON.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    #[command(flatten)]
    pub how: RestoreHow,
}

/// Ask before overwriting a disk that holds data: on a terminal the user types the disk's
/// name; without one, `--yes` is required.
fn confirm_overwrite(plan: &RestorePlan, yes: bool) -> Result<bool> {
    if yes {
        return Ok(true);
    }
    for t in std::iter::once(&plan.target).chain(&plan.mirror) {
        confirm_one(t)?;
    }
    Ok(true)
}

/// The typed confirmation for one disk (the target, or `--mirror-disk`).
fn confirm_one(t: &crate::restore::plan::Target) -> Result<()> {
    let Some(what) = &t.holds else {
        return Ok(());
    };
    let name = t
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| t.path.display().to_string());
    let term = console::Term::stderr();
    if !console::user_attended() || !term.is_term() {
        bail!(
            "target {} holds {what}: add --yes to overwrite it",
            t.path.display()
        );
    }
    term.write_line(&format!(
        "Target {} ({}) holds {what}. Everything on it will be overwritten.",
        t.path.display(),
        crate::util::progress::human_bytes(t.size)
    ))?;
    term.write_str(&format!("Type {name} to continue: "))?;
    let answer = term.read_line().context("cannot read the confirmation")?;
    if answer.trim() != name {
        bail!("not confirmed: nothing was written to {}", t.path.display());
    }
    Ok(())
}

/// `bmr restore`.
pub fn run(o: &RestoreOptions) -> Result<Option<RestoreSummary>> {
    let src = crate::repo::open(&o.point.repo)?;
    let point = crate::repo::snapshot::resolve(src.as_ref(), &o.point.host, &o.point.at)?;
    let mut how = o.how.clone();
    // As the rescue system's own front ends do: there the firmware's boot entry is the one to fix.
    how.fixups.efi_boot_entry |= crate::util::in_rescue_system() && !how.fixups.no_fixups;
    let plan = RestorePlan::prepare(src.as_ref(), point, &o.target, how)?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&plan.to_json())?);
    } else {
        for l in plan.lines() {
            println!("{l}");
        }
    }
    if o.dry_run {
        return Ok(None);
    }
    let overwrite = confirm_overwrite(&plan, o.yes)?;
    Ok(Some(plan.execute(overwrite)?))
}
