//! `bmr rescue`: the entry point of the rescue system (started by initramfs/init). It waits for
//! disks, brings up the network, then restores unattended from kernel parameters or runs the
//! TUI, prints one `BMR-RESULT:` line on every console and does what `bmr.after` says.

pub mod cmdline;
pub mod console;
pub mod media;
pub mod net;
pub mod tui;
pub mod unattended;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

pub use cmdline::{After, Params};

#[derive(Args, Debug)]
pub struct RescueOptions {
    /// Act on this kernel command line instead of /proc/cmdline (for trying parameters out).
    #[arg(long)]
    pub cmdline: Option<String>,
}

/// How a rescue run ended, for the result line and `bmr.report`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The restore plan, once it was made (see `RestorePlan::to_json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<serde_json::Value>,
    pub bytes_written: u64,
    pub seconds: f64,
    pub verified: bool,
}

pub use crate::util::in_rescue_system;

/// `bmr.ca=` names: absolute paths, or files in the initramfs or on the boot medium.
pub fn resolve_ca(names: &[String], medium: Option<&Path>) -> Vec<PathBuf> {
    names
        .iter()
        .map(|n| {
            let p = Path::new(n);
            if p.is_absolute() {
                return p.to_path_buf();
            }
            let mut candidates = vec![Path::new("/etc/bmr/ca").join(n)];
            if let Some(m) = medium {
                candidates.push(m.join("bmr/ca").join(n));
                candidates.push(m.join(n));
            }
            candidates
                .iter()
                .find(|c| c.is_file())
                .cloned()
                .unwrap_or_else(|| candidates[0].clone())
        })
        .collect()
}

fn machine() -> serde_json::Value {
    let dmi = |f: &str| {
        std::fs::read_to_string(Path::new("/sys/class/dmi/id").join(f))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    serde_json::json!({
        "vendor": dmi("sys_vendor"),
        "product": dmi("product_name"),
        "serial": dmi("product_serial"),
    })
}

/// POST the outcome as JSON; a failed report is a warning, never a different result.
fn report(url: &str, o: &Outcome) {
    let mut body = serde_json::to_value(o).unwrap_or_default();
    body["result"] = if o.ok { "ok" } else { "failed" }.into();
    body["bmr_version"] = env!("CARGO_PKG_VERSION").into();
    body["machine"] = machine();
    let r = crate::repo::http::client().and_then(|c| {
        c.post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("cannot send the report to {url}"))
    });
    match r {
        Ok(_) => println!("report sent to {url}"),
        Err(e) => println!("warning: {e:#}"),
    }
}

fn power(after: After) {
    nix::unistd::sync();
    let how = match after {
        After::Poweroff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
        After::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
        After::Shell => return,
    };
    let _ = nix::sys::reboot::reboot(how);
}

pub fn run(o: &RescueOptions) -> Result<i32> {
    let line = match &o.cmdline {
        Some(c) => c.clone(),
        None => std::fs::read_to_string("/proc/cmdline").context("cannot read /proc/cmdline")?,
    };
    let p = cmdline::parse(&line);
    let rescue = in_rescue_system();
    if !p.unattended() && p.errors.is_empty() {
        return tui_session(&p, rescue);
    }
    let tee = if rescue { console::Tee::start() } else { None };
    println!(
        "bmr {} rescue: unattended restore (kernel parameters)",
        env!("CARGO_PKG_VERSION")
    );
    let outcome = unattended::run(&p);
    // The one line a person or a test harness looks for.
    if outcome.ok {
        println!("BMR-RESULT: ok {}", outcome.message);
    } else {
        println!("BMR-RESULT: failed {}", outcome.message);
    }
    if let Some(url) = &p.report {
        report(url, &outcome);
    }
    let code = if outcome.ok { 0 } else { 1 };
    if rescue {
        if p.after != After::Shell {
            println!("bmr.after={}: {} in 3 s", p.after.name(), p.after.name());
            std::thread::sleep(Duration::from_secs(3));
        }
        if let Some(t) = tee {
            t.finish();
        }
        power(p.after);
    } else if p.after != After::Shell {
        println!(
            "(not in the rescue system: bmr.after={} not carried out)",
            p.after.name()
        );
    }
    Ok(code)
}

fn tui_session(p: &Params, rescue: bool) -> Result<i32> {
    if rescue {
        console::claim_interactive()?;
    }
    let after = tui::run(p)?;
    if rescue {
        power(after);
    }
    Ok(0)
}
