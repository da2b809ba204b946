//! bmr: bare-metal recovery. See README.md and docs/.

pub mod backup;
pub mod chunkindex;
pub mod cli;
pub mod device;
pub mod fsmap;
pub mod layout;
pub mod list;
pub mod manifest;
pub mod progress;
pub mod repo;
pub mod restore;
pub mod safety;
pub mod timefmt;
pub mod verify;
