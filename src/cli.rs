//! Command-line interface: option structs live with their commands (they double as library
//! options); this file only wires them to subcommands.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bmr",
    version,
    about = "Bare-metal recovery: image backups of whole disks, restored bootable"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Extra CA certificate (PEM) to trust for https:// repositories; repeatable.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Vec<std::path::PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Image backup of a whole disk (block device or image file) into a repository.
    Backup(crate::backup::BackupOptions),
    /// Restore a snapshot onto a disk or image file.
    Restore(crate::restore::RestoreOptions),
    /// List snapshots.
    List(crate::manage::list::ListOptions),
    /// Check that every chunk every snapshot needs is present and intact.
    Verify(crate::manage::verify::VerifyOptions),
    /// List files of a snapshot like ls -l.
    Ls(crate::restore::files::LsOptions),
    /// Restore files and trees from a snapshot into a directory.
    RestoreFiles(crate::restore::files::RestoreFilesOptions),
    /// Remove snapshots by a retention policy (images stay while a kept incremental needs them).
    Forget(crate::manage::retention::ForgetOptions),
    /// Delete chunks that no snapshot references.
    Prune(crate::manage::retention::PruneOptions),
    /// The rescue system's entry point: unattended restore from kernel parameters, or the TUI.
    Rescue(crate::rescue::RescueOptions),
}

/// Run a command; Ok(exit code).
pub fn run(cli: Cli) -> Result<i32> {
    crate::repo::http::add_ca_files(cli.ca);
    match cli.command {
        Command::Backup(o) if o.incremental || o.differential => {
            let host = match &o.host {
                Some(h) => h.clone(),
                None => crate::backup::default_host()?,
            };
            let s = crate::backup::incremental::run(
                &o.repo,
                &host,
                &o.paths,
                o.differential,
                o.snapshot,
            )?;
            crate::backup::incremental::print_summary(&s);
        }
        Command::Backup(o) => {
            let s = crate::backup::run(&o)?;
            crate::backup::print_summary(&s);
        }
        Command::Restore(o) => {
            if let Some(s) = crate::restore::run(&o)? {
                crate::restore::print_summary(&s);
            }
        }
        Command::List(o) => crate::manage::list::run(&o)?,
        Command::Ls(o) => crate::restore::files::ls(&o)?,
        Command::RestoreFiles(o) => crate::restore::files::restore_files(&o)?,
        Command::Forget(o) => crate::manage::retention::forget(&o)?,
        Command::Prune(o) => crate::manage::retention::prune(&o)?,
        Command::Rescue(o) => return crate::rescue::run(&o),
        Command::Verify(o) => {
            let r = crate::manage::verify::run(&o)?;
            crate::manage::verify::print_report(&r);
            if !r.problems.is_empty() {
                return Ok(2);
            }
        }
    }
    Ok(0)
}
