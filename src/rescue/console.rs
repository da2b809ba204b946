//! Consoles of the rescue system. The kernel gives `/dev/console` to the last `console=` only,
//! so output is copied to every active console (screen and serial alike), and the TUI runs on
//! whichever console someone presses Enter on.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// Device nodes of the active kernel consoles (`tty0 ttyS0` -> /dev/tty0, /dev/ttyS0).
pub fn active() -> Vec<PathBuf> {
    std::fs::read_to_string("/sys/class/tty/console/active")
        .unwrap_or_default()
        .split_whitespace()
        .map(|n| PathBuf::from("/dev").join(n))
        .filter(|p| p.exists())
        .collect()
}

fn open_tty(p: &PathBuf, read: bool) -> Option<File> {
    OpenOptions::new()
        .read(read)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(p)
        .ok()
}

/// Copies stdout and stderr to every console until `finish`.
pub struct Tee {
    thread: Option<JoinHandle<()>>,
}

impl Tee {
    /// None when there is at most one console (stdout already is it).
    pub fn start() -> Option<Tee> {
        let mut outs: Vec<File> = active().iter().filter_map(|p| open_tty(p, false)).collect();
        if outs.len() < 2 {
            return None;
        }
        let (r, w) = nix::unistd::pipe().ok()?;
        std::io::stdout().flush().ok()?;
        // SAFETY: dup2 on owned, open descriptors; 1 and 2 are replaced atomically.
        unsafe {
            libc::dup2(w.as_raw_fd(), 1);
            libc::dup2(w.as_raw_fd(), 2);
        }
        drop(w);
        let thread = std::thread::spawn(move || {
            let mut r = File::from(r);
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                for o in outs.iter_mut() {
                    let _ = o.write_all(&buf[..n]);
                }
            }
        });
        Some(Tee {
            thread: Some(thread),
        })
    }

    /// Flush everything written so far to the consoles.
    pub fn finish(mut self) {
        let _ = std::io::stdout().flush();
        if let Ok(null) = File::options().write(true).open("/dev/null") {
            // SAFETY: as above; closing the pipe's last writers ends the copying thread.
            unsafe {
                libc::dup2(null.as_raw_fd(), 1);
                libc::dup2(null.as_raw_fd(), 2);
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Ask on every console for Enter and make the first one answered this process's terminal.
/// With one console (or none known) the current terminal is used as it is.
pub fn claim_interactive() -> Result<()> {
    let consoles = active();
    if consoles.len() >= 2 {
        let (tx, rx) = crossbeam_channel::bounded::<PathBuf>(consoles.len());
        for p in consoles {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let Some(mut f) = open_tty(&p, true) else {
                    return;
                };
                let _ = writeln!(
                    f,
                    "\r\nbmr rescue: press Enter to start on this console ({}).\r",
                    p.display()
                );
                let mut line = String::new();
                if BufReader::new(f).read_line(&mut line).is_ok() {
                    let _ = tx.send(p);
                }
            });
        }
        drop(tx);
        let chosen = rx.recv().context("no console answered")?;
        let f =
            open_tty(&chosen, true).with_context(|| format!("cannot open {}", chosen.display()))?;
        // SAFETY: plain descriptor calls on a terminal we just opened.
        unsafe {
            libc::dup2(f.as_raw_fd(), 0);
            libc::dup2(f.as_raw_fd(), 1);
            libc::dup2(f.as_raw_fd(), 2);
        }
    }
    // Keys are read from /dev/tty, which needs a controlling terminal; PID 1's children have
    // none.
    // SAFETY: session calls on fd 0, a terminal.
    unsafe {
        libc::setsid();
        libc::ioctl(0, libc::TIOCSCTTY, 0);
    }
    // A serial line reports no size; menus need one.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ/TIOCSWINSZ with a valid winsize on fd 0.
    unsafe {
        if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 && (ws.ws_row == 0 || ws.ws_col == 0) {
            ws.ws_row = 24;
            ws.ws_col = 80;
            libc::ioctl(0, libc::TIOCSWINSZ, &ws);
        }
    }
    if std::env::var_os("TERM").is_none_or(|t| t == "dumb") {
        // SAFETY: the other threads (waiting on consoles) never read the environment.
        unsafe { std::env::set_var("TERM", "linux") };
    }
    Ok(())
}
