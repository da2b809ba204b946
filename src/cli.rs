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
}

#[derive(Subcommand)]
pub enum Command {
    /// Image backup of a whole disk (block device or image file) into a repository.
    Backup(crate::backup::BackupOptions),
    /// Restore a snapshot onto a disk or image file.
    Restore(crate::restore::RestoreOptions),
    /// List snapshots.
    List(crate::list::ListOptions),
    /// Check that every chunk every snapshot needs is present and intact.
    Verify(crate::verify::VerifyOptions),
}

/// Run a command; Ok(exit code).
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Backup(o) => {
            let s = crate::backup::run(&o)?;
            crate::backup::print_summary(&s);
        }
        Command::Restore(o) => {
            let s = crate::restore::run(&o)?;
            crate::restore::print_summary(&s);
        }
        Command::List(o) => crate::list::run(&o)?,
        Command::Verify(o) => {
            let r = crate::verify::run(&o)?;
            crate::verify::print_report(&r);
            if !r.problems.is_empty() {
                return Ok(2);
            }
        }
    }
    Ok(0)
}
