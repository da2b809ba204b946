//! The interactive rescue: repository, host, point in time, target disk, plan, typed
//! confirmation, progress, result. Menus are plain dialoguer prompts so they work the same on a
//! screen and on a serial console (ASCII only, arrow keys or j/k).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use console::{Term, style};
use dialoguer::theme::ColorfulTheme;
use dialoguer::{Confirm, Input, Select};

use crate::device::disks::{self, DiskInfo};
use crate::repo::RepoRead;
use crate::repo::manifest::{HostIndex, Kind};
use crate::rescue::media::{self, Media};
use crate::rescue::{After, Params, net};
use crate::restore::{RestoreHow, RestorePlan};
use crate::util::progress::human_bytes;

fn theme() -> ColorfulTheme {
    // Serial consoles and the kernel's VGA font show ASCII reliably.
    ColorfulTheme {
        prompt_prefix: style("?".to_string()).yellow(),
        success_prefix: style("+".to_string()).green(),
        error_prefix: style("!".to_string()).red(),
        active_item_prefix: style(">".to_string()).green(),
        inactive_item_prefix: style(" ".to_string()),
        picked_item_prefix: style(">".to_string()).green(),
        unpicked_item_prefix: style(" ".to_string()),
        ..ColorfulTheme::default()
    }
}

struct Ui {
    term: Term,
    theme: ColorfulTheme,
    media: Media,
    net: Arc<Mutex<Option<String>>>,
    rescue: bool,
}

/// An opened repository and the disks it lives on.
type ChosenRepo = (Box<dyn RepoRead>, Vec<String>);

/// What the user chose when leaving a menu early.
enum Step<T> {
    Go(T),
    Back,
}

impl Ui {
    fn select(&self, prompt: &str, items: &[String], default: usize) -> Result<Option<usize>> {
        Select::with_theme(&self.theme)
            .with_prompt(prompt)
            .items(items)
            .default(default.min(items.len().saturating_sub(1)))
            .max_length(15)
            .interact_on_opt(&self.term)
            .context("cannot read from the terminal")
    }

    fn input(&self, prompt: &str) -> Result<String> {
        let s: String = Input::with_theme(&self.theme)
            .with_prompt(prompt)
            .allow_empty(true)
            .interact_text_on(&self.term)
            .context("cannot read from the terminal")?;
        Ok(s.trim().to_string())
    }

    fn say(&self, s: &str) {
        let _ = self.term.write_line(s);
    }

    fn fail(&self, e: &anyhow::Error) {
        self.say(&format!("{} {e:#}", style("error:").red().bold()));
    }

    /// Wait for the background network set-up before a URL is used.
    fn network(&self) -> String {
        for _ in 0..600 {
            if let Some(s) = self.net.lock().ok().and_then(|g| g.clone()) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        "still waiting for DHCP".into()
    }

    fn choose_repo(&mut self) -> Result<Step<ChosenRepo>> {
        let mut found: Vec<media::Found> = Vec::new();
        let mut scanned = false;
        loop {
            if self.rescue && !scanned {
                self.say("Looking for repositories on attached disks ...");
                found = self.media.discover();
                scanned = true;
            }
            let mut items: Vec<String> = found.iter().map(|f| f.describe()).collect();
            let actions = [
                "Enter a URL (http:// or https://)",
                "Enter a local path",
                "Scan attached disks again",
            ];
            items.extend(actions.iter().map(|s| s.to_string()));
            let Some(i) = self.select("Repository", &items, 0)? else {
                return Ok(Step::Back);
            };
            let spec = if i < found.len() {
                found[i].path.display().to_string()
            } else {
                match i - found.len() {
                    0 => {
                        let n = self.network();
                        self.say(&format!("network: {n}"));
                        self.input("Repository URL")?
                    }
                    1 => self
                        .input("Repository path (a directory, or label:NAME / dev:/dev/X:/path)")?,
                    _ => {
                        scanned = false;
                        self.rescue = true;
                        continue;
                    }
                }
            };
            if spec.is_empty() {
                continue;
            }
            let spec = if spec.starts_with("label:")
                || spec.starts_with("uuid:")
                || spec.starts_with("dev:")
            {
                match media::resolve(&mut self.media, &spec) {
                    Ok(Some(f)) => f.path.display().to_string(),
                    Ok(None) => {
                        self.say(&format!(
                            "{} {spec} not found",
                            style("error:").red().bold()
                        ));
                        continue;
                    }
                    Err(e) => {
                        self.fail(&e);
                        continue;
                    }
                }
            } else {
                spec
            };
            let repo_disks: Vec<String> = self
                .media
                .devices()
                .iter()
                .map(|d| media::disk_of(d))
                .collect();
            match crate::repo::open(&spec) {
                Ok(src) => return Ok(Step::Go((src, repo_disks))),
                Err(e) => self.fail(&e),
            }
        }
    }

    fn choose_point(&self, src: &dyn RepoRead) -> Result<Step<(HostIndex, String)>> {
        let hosts = crate::repo::manifest::read_hosts(src)?;
        if hosts.is_empty() {
            bail!("repository {} holds no backups", src.location());
        }
        let host = if let [h] = hosts.as_slice() {
            h.clone()
        } else {
            let items: Vec<String> = hosts
                .iter()
                .map(|h| match crate::repo::manifest::read_host_index(src, h) {
                    Ok(idx) => format!(
                        "{h:<24} {} snapshot(s), newest {}",
                        idx.snapshots.len(),
                        idx.snapshots
                            .iter()
                            .map(|s| s.unix_time)
                            .max()
                            .map(crate::util::timefmt::display)
                            .unwrap_or_default()
                    ),
                    Err(_) => h.clone(),
                })
                .collect();
            let Some(i) = self.select("Host", &items, 0)? else {
                return Ok(Step::Back);
            };
            hosts[i].clone()
        };
        let idx = crate::repo::manifest::read_host_index(src, &host)?;
        let mut snaps = idx.snapshots.clone();
        snaps.reverse();
        snaps.sort_by_key(|s| std::cmp::Reverse(s.unix_time));
        let items: Vec<String> = snaps
            .iter()
            .map(|s| {
                let kind = match s.kind {
                    Kind::Image => "image",
                    _ => "incremental",
                };
                format!(
                    "{}  {:<11}  {}  used {}, new {}",
                    crate::util::timefmt::display(s.unix_time),
                    kind,
                    s.id,
                    human_bytes(s.used_bytes),
                    human_bytes(s.new_bytes)
                )
            })
            .collect();
        let Some(i) = self.select(
            &format!("Point in time for {host} (newest first)"),
            &items,
            0,
        )?
        else {
            return Ok(Step::Back);
        };
        Ok(Step::Go((idx, snaps[i].id.clone())))
    }

    fn choose_target(&self, need: u64, repo_disks: &[String]) -> Result<Step<PathBuf>> {
        self.choose_disk(
            "Target disk (everything on it will be replaced)",
            need,
            repo_disks,
        )
    }

    /// A disk from this machine's, except the rescue medium and `exclude` (kernel names).
    fn choose_disk(&self, prompt: &str, need: u64, exclude: &[String]) -> Result<Step<PathBuf>> {
        loop {
            let all: Vec<DiskInfo> = disks::list()
                .into_iter()
                .filter(|d| !d.rescue_medium && !exclude.contains(&d.name))
                .collect();
            let fs = media::blkid();
            let mut items: Vec<String> = all
                .iter()
                .map(|d| {
                    let mut s = d.describe();
                    let parts: Vec<String> = d
                        .parts
                        .iter()
                        .map(|p| {
                            let f = fs
                                .iter()
                                .find(|f| f.dev.ends_with(&format!("/{}", p.kernel_name)));
                            let mut t = format!("{} {}", p.kernel_name, human_bytes(p.len));
                            if let Some(f) = f {
                                t.push_str(&format!(" {}", f.fstype));
                                if !f.label.is_empty() {
                                    t.push_str(&format!(" \"{}\"", f.label));
                                }
                            }
                            t
                        })
                        .collect();
                    if !parts.is_empty() {
                        s.push_str(&format!(": {}", parts.join(", ")));
                    }
                    if d.size < need {
                        s.push_str(&format!("  [too small: needs {}]", human_bytes(need)));
                    }
                    s
                })
                .collect();
            items.push("Enter a device path (or an image file)".into());
            items.push("Look for disks again".into());
            let Some(i) = self.select(prompt, &items, 0)? else {
                return Ok(Step::Back);
            };
            if i == all.len() + 1 {
                continue;
            }
            let path = if i == all.len() {
                let p = self.input("Device path")?;
                if p.is_empty() {
                    continue;
                }
                PathBuf::from(p)
            } else {
                if all[i].size < need {
                    self.say(&format!(
                        "{} /dev/{} is too small: the backup needs {}",
                        style("error:").red().bold(),
                        all[i].name,
                        human_bytes(need)
                    ));
                    continue;
                }
                all[i].path.clone()
            };
            return Ok(Step::Go(path));
        }
    }

    /// One pass through the menus; Ok(false) when the user backed out.
    fn restore(&mut self) -> Result<bool> {
        let Step::Go((src, repo_disks)) = self.choose_repo()? else {
            return Ok(false);
        };
        let src = src.as_ref();
        let Step::Go((idx, id)) = self.choose_point(src)? else {
            return Ok(false);
        };
        let point = crate::repo::snapshot::resolve_in(src, &idx, &id)?;
        let Step::Go(target) = self.choose_target(
            crate::restore::min_target_size(&point.image.manifest),
            &repo_disks,
        )?
        else {
            return Ok(false);
        };
        // A mirror in the snapshot: its second disk, or a degraded array on the target alone.
        let m = &point.image.manifest;
        let arrays: Vec<String> = m.mirrors().into_iter().map(|r| r.volume_name()).collect();
        let mut mirror_disk = None;
        if !arrays.is_empty() {
            let q = format!(
                "The snapshot holds the md RAID1 {}. Restore its mirror onto a second disk too?",
                arrays.join(", ")
            );
            let items = vec![
                "Yes: choose the second disk".to_string(),
                "No: the array comes back degraded, on the target alone".to_string(),
            ];
            if self.select(&q, &items, 0)? == Some(0) {
                let mut exclude = repo_disks.clone();
                if let Some(n) = target.file_name() {
                    exclude.push(n.to_string_lossy().into_owned());
                }
                let need = crate::restore::min_target_size(m);
                let Step::Go(d) = self.choose_disk(
                    "Mirror disk (everything on it will be replaced)",
                    need,
                    &exclude,
                )?
                else {
                    return Ok(false);
                };
                mirror_disk = Some(d);
            }
        }
        let how = RestoreHow {
            mirror_disk: mirror_disk.clone(),
            fixups: crate::fixup::FixupOptions {
                efi_boot_entry: self.rescue,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut plan = RestorePlan::prepare(src, point, &target, how)?;
        self.say("");
        let shown = plan.lines();
        for l in &shown {
            self.say(l);
        }
        let (size, src_size) = (plan.target.size, plan.manifest().disk.size);
        plan.how.verify = Confirm::with_theme(&self.theme)
            .with_prompt("Read everything back afterwards to verify it?")
            .default(false)
            .interact_on(&self.term)?;
        plan.how.fixups.grow = size > src_size
            && Confirm::with_theme(&self.theme)
                .with_prompt(format!(
                    "The target is {} bigger: grow the last partition and its filesystem to fill it?",
                    human_bytes(size - src_size)
                ))
                .default(false)
                .interact_on(&self.term)?;
        let lines = plan.lines();
        if lines != shown {
            self.say("");
            for l in &lines {
                self.say(l);
            }
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let disks = match &mirror_disk {
            Some(d) => format!("{} and {}", target.display(), d.display()),
            None => target.display().to_string(),
        };
        let typed = self.input(&format!(
            "Everything on {disks} will be replaced. Type {name} to start (empty: start over)"
        ))?;
        if typed != name {
            self.say("Not confirmed: nothing was written.");
            return Ok(false);
        }
        let host = plan.manifest().host.clone();
        let s = plan.execute(true)?;
        crate::restore::print_summary(&s);
        self.say(&format!(
            "{} restored {host} {} to {}",
            style("Done:").green().bold(),
            s.id,
            target.display()
        ));
        Ok(true)
    }
}

/// Run the TUI until the user picks what happens next.
pub fn run(p: &Params) -> Result<After> {
    let term = Term::stderr();
    if !term.is_term() {
        bail!(
            "no terminal for the interactive rescue: set bmr.repo and bmr.target for an unattended restore"
        );
    }
    let rescue = crate::rescue::in_rescue_system();
    let net = Arc::new(Mutex::new(None));
    {
        let net = net.clone();
        let ip = p.ip.clone();
        let wait = p.wait;
        std::thread::spawn(move || {
            let s = match net::up(ip.as_deref(), wait) {
                Ok(s) => s,
                Err(e) => format!("{e:#}"),
            };
            if let Ok(mut g) = net.lock() {
                *g = Some(s);
            }
        });
    }
    if rescue {
        crate::device::disks::settle(Duration::from_secs(3), Duration::from_secs(20));
    }
    let mut ui = Ui {
        term,
        theme: theme(),
        media: Media::default(),
        net,
        rescue,
    };
    let medium = if rescue {
        crate::rescue::unattended::mount_boot_medium(&mut ui.media)
    } else {
        None
    };
    crate::repo::http::add_ca_files(crate::rescue::resolve_ca(&p.ca, medium.as_deref()));
    ui.say(&format!(
        "{} {}: restore a machine from its backups. Esc goes back.",
        style("bmr rescue").bold(),
        env!("CARGO_PKG_VERSION")
    ));
    loop {
        match ui.restore() {
            Ok(true) => println!("BMR-RESULT: ok restored"),
            Ok(false) => {}
            Err(e) => {
                ui.fail(&e);
                println!("BMR-RESULT: failed {e:#}");
            }
        }
        let items: Vec<String> = [
            "Restore (again or another disk)",
            "Reboot",
            "Power off",
            "Shell",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match ui.select("Next", &items, 1)? {
            Some(1) => return Ok(After::Reboot),
            Some(2) => return Ok(After::Poweroff),
            Some(3) => return Ok(After::Shell),
            _ => {}
        }
    }
}
