//! Small helpers every layer may use: progress display, time formats, the worker pool.

pub mod pool;
pub mod progress;
pub mod timefmt;
