//! Small helpers every layer may use: progress display, time formats, the worker pool, paths
//! shown in messages.

pub mod pool;
pub mod progress;
pub mod text;
pub mod timefmt;

/// Whether this process runs inside the rescue system (the init script sets BMR_RESCUE=1):
/// only there may it power the machine off or write the firmware's boot entries unasked.
pub fn in_rescue_system() -> bool {
    std::env::var_os("BMR_RESCUE").is_some_and(|v| v == "1")
}
