//! bmr: bare-metal recovery. See README.md and docs/.

pub mod apply;
pub mod backup;
pub mod chunkindex;
pub mod cli;
pub mod device;
pub mod files;
pub mod fixup;
pub mod fsid;
pub mod fsmap;
pub mod fsread;
pub mod incremental;
pub mod layout;
pub mod list;
pub mod lvm;
pub mod manifest;
pub mod progress;
pub mod repo;
pub mod rescue;
pub mod restore;
pub mod retention;
pub mod safety;
pub mod timefmt;
pub mod toc;
pub mod tui;
pub mod verify;
