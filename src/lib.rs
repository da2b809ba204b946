//! bmr: bare-metal recovery. See README.md, and docs/architecture.md for the map of these
//! modules.

pub mod backup;
pub mod cli;
pub mod device;
pub mod fixup;
pub mod fs;
pub mod fuzz;
pub mod manage;
pub mod repo;
pub mod rescue;
pub mod restore;
pub mod util;
