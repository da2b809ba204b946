//! Repository maintenance commands: `bmr list`, `bmr verify`, `bmr forget`, `bmr prune`.

pub mod list;
pub mod retention;
pub mod verify;
