//! Progress reporting: a bar on a terminal, a plain line every few seconds elsewhere (serial
//! consoles and logs cannot render a bar).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

struct Shared {
    done: AtomicU64,
    stop: AtomicBool,
}

/// Counts bytes processed towards a known total. Cheap to clone into worker threads.
#[derive(Clone)]
pub struct Progress {
    shared: Arc<Shared>,
    bar: Option<ProgressBar>,
}

pub struct ProgressGuard {
    progress: Progress,
    ticker: Option<JoinHandle<()>>,
    start: Instant,
    label: String,
}

impl Progress {
    /// Start reporting. `quiet` suppresses all output (tests, JSON output).
    pub fn start(label: &str, total: u64, quiet: bool) -> ProgressGuard {
        let shared = Arc::new(Shared {
            done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let tty = console::Term::stderr().is_term();
        let bar = (tty && !quiet).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        let progress = Progress { shared, bar };
        let ticker = (!tty && !quiet).then(|| {
            let p = progress.clone();
            let label = label.to_string();
            std::thread::spawn(move || p.plain_ticker(&label, total))
        });
        ProgressGuard {
            progress,
            ticker,
            start: Instant::now(),
            label: label.to_string(),
        }
    }

    pub fn add(&self, n: u64) {
        self.shared.done.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    fn plain_ticker(&self, label: &str, total: u64) {
        let start = Instant::now();
        let mut last = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if last.elapsed() < Duration::from_secs(5) {
                continue;
            }
            last = Instant::now();
            let done = self.shared.done.load(Ordering::Relaxed);
            let secs = start.elapsed().as_secs_f64().max(0.001);
            let rate = done as f64 / secs;
            let eta = if rate > 0.0 && total > done {
                format!("{:.0}s", (total - done) as f64 / rate)
            } else {
                "-".into()
            };
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            eprintln!(
                "{label}: {} of {} ({pct}%), {}/s, ETA {eta}",
                human_bytes(done),
                human_bytes(total),
                human_bytes(rate as u64)
            );
        }
    }
}

impl ProgressGuard {
    pub fn handle(&self) -> Progress {
        self.progress.clone()
    }

    pub fn done(&self) -> u64 {
        self.progress.shared.done.load(Ordering::Relaxed)
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        self.progress.shared.stop.store(true, Ordering::Relaxed);
        if let Some(bar) = &self.progress.bar {
            bar.finish_and_clear();
        }
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}
