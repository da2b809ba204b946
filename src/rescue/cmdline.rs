//! Kernel command-line parameters (`bmr.*`) that drive the rescue system. Parsing is strict: an
//! unknown `bmr.` key or a bad value fails an unattended restore before anything is touched,
//! because a typo like `bmr.tagret=` must not silently fall back to a default.

use std::time::Duration;

use anyhow::{Result, bail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Poweroff,
    Reboot,
    Shell,
}

impl After {
    pub fn name(self) -> &'static str {
        match self {
            After::Poweroff => "poweroff",
            After::Reboot => "reboot",
            After::Shell => "shell",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub repo: Option<String>,
    pub host: Option<String>,
    pub at: Option<String>,
    pub target: Option<String>,
    pub yes: bool,
    pub verify: bool,
    /// Grow the last partition and its ext filesystem to the end of a bigger target.
    pub grow: bool,
    /// `bmr.grow-lv=VG/LV`: the logical volume the grow extends (default: the root's).
    pub grow_lv: Option<String>,
    /// `bmr.mirror-disk=/dev/sdb`: the second disk of a RAID1 (restore --mirror-disk).
    pub mirror_disk: Option<String>,
    /// `bmr.luks-keyfile=label:KEYS:/bmr/root.key`: where the LUKS key file is (a medium,
    /// never the key itself: /proc/cmdline is world-readable).
    pub luks_keyfile: Option<String>,
    /// `bmr.bootloader=reinstall`: run the restored system's grub-install in a chroot.
    pub reinstall_bootloader: bool,
    pub after: After,
    pub report: Option<String>,
    pub ip: Option<String>,
    pub ca: Vec<String>,
    /// How long to wait for disks, media and the network.
    pub wait: Duration,
    /// `bmr.*` keys this version does not know, or values it cannot parse.
    pub errors: Vec<String>,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            repo: None,
            host: None,
            at: None,
            target: None,
            yes: false,
            verify: false,
            grow: false,
            grow_lv: None,
            luks_keyfile: None,
            mirror_disk: None,
            reinstall_bootloader: false,
            after: After::Poweroff,
            report: None,
            ip: None,
            ca: Vec::new(),
            wait: Duration::from_secs(60),
            errors: Vec::new(),
        }
    }
}

impl Params {
    /// Any restore parameter means nobody is expected at the keyboard.
    pub fn unattended(&self) -> bool {
        self.repo.is_some() || self.target.is_some() || self.host.is_some() || self.at.is_some()
    }
}

/// Split like the kernel does: whitespace separates, double quotes group.
pub fn split(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn flag(key: &str, value: Option<&str>) -> Result<bool> {
    match value.map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("1" | "yes" | "true" | "on") => Ok(true),
        Some("0" | "no" | "false" | "off") => Ok(false),
        Some(v) => bail!("bmr.{key}={v}: use bmr.{key} or bmr.{key}=0"),
    }
}

fn text(key: &str, value: Option<&str>) -> Result<String> {
    match value {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => bail!("bmr.{key} needs a value (bmr.{key}=...)"),
    }
}

pub fn parse(cmdline: &str) -> Params {
    let mut p = Params::default();
    for word in split(cmdline) {
        let Some(rest) = word.strip_prefix("bmr.") else {
            continue;
        };
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (rest, None),
        };
        let r: Result<()> = (|| {
            match key {
                "repo" => p.repo = Some(text(key, value)?),
                "host" => p.host = Some(text(key, value)?),
                "at" => p.at = Some(text(key, value)?),
                "target" => p.target = Some(text(key, value)?),
                "report" => p.report = Some(text(key, value)?),
                "ip" => p.ip = Some(text(key, value)?),
                "ca" => p.ca.push(text(key, value)?),
                "yes" => p.yes = flag(key, value)?,
                "verify" => p.verify = flag(key, value)?,
                "grow" => p.grow = flag(key, value)?,
                "grow-lv" => p.grow_lv = Some(text(key, value)?),
                "mirror-disk" => p.mirror_disk = Some(text(key, value)?),
                "luks-keyfile" => p.luks_keyfile = Some(text(key, value)?),
                // A secret on the kernel command line is readable by every user of the rescue
                // system and travels in the clear in PXE configs: refused, whatever its value.
                "luks-key" | "luks-passphrase" | "passphrase" | "key" => bail!(
                    "bmr.{key}= would put a secret on the kernel command line (world-readable in /proc/cmdline, sent in the clear by PXE): put the key in a file on a medium and give bmr.luks-keyfile=label:NAME:/path"
                ),
                "bootloader" => match value {
                    Some("reinstall") => p.reinstall_bootloader = true,
                    Some("keep") => p.reinstall_bootloader = false,
                    _ => bail!(
                        "bmr.bootloader={}: use reinstall or keep",
                        value.unwrap_or("")
                    ),
                },
                "after" => {
                    p.after = match text(key, value)?.as_str() {
                        "poweroff" => After::Poweroff,
                        "reboot" => After::Reboot,
                        "shell" => After::Shell,
                        v => bail!("bmr.after={v}: use poweroff, reboot or shell"),
                    }
                }
                "wait" => {
                    let v = text(key, value)?;
                    let secs: u64 = v.parse().map_err(|_| {
                        anyhow::anyhow!("bmr.wait={v}: give seconds, e.g. bmr.wait=120")
                    })?;
                    p.wait = Duration::from_secs(secs);
                }
                // Read by the init script, not by bmr.
                "break" => {}
                _ => bail!("unknown kernel parameter bmr.{key}: see docs/kernel-parameters.md"),
            }
            Ok(())
        })();
        if let Err(e) = r {
            p.errors.push(e.to_string());
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_on_the_command_line_are_refused() {
        let p = parse("bmr.luks-keyfile=label:KEYS:/bmr/root.key bmr.luks-passphrase=hunter2");
        assert_eq!(p.luks_keyfile.as_deref(), Some("label:KEYS:/bmr/root.key"));
        assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
        assert!(p.errors[0].contains("bmr.luks-keyfile=label:NAME:/path"));
        // The refusal names the parameter, never its value.
        assert!(!p.errors[0].contains("hunter2"));
    }

    #[test]
    fn parses_a_full_unattended_line() {
        let p = parse(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 bmr.repo=https://10.0.2.2:8443/repo bmr.host=web1 \
             bmr.at=\"2026-11-20 18:00\" bmr.target=auto bmr.yes bmr.verify=1 bmr.after=reboot \
             bmr.report=http://h/r bmr.ip=10.0.0.5/24:10.0.0.1 bmr.ca=corp.pem bmr.wait=5 bmr.grow \
             bmr.bootloader=reinstall quiet",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.repo.as_deref(), Some("https://10.0.2.2:8443/repo"));
        assert_eq!(p.host.as_deref(), Some("web1"));
        assert_eq!(p.at.as_deref(), Some("2026-11-20 18:00"));
        assert_eq!(p.target.as_deref(), Some("auto"));
        assert!(p.yes && p.verify && p.grow && p.reinstall_bootloader);
        assert_eq!(p.after, After::Reboot);
        assert_eq!(p.ca, vec!["corp.pem".to_string()]);
        assert_eq!(p.wait, Duration::from_secs(5));
        assert!(p.unattended());
    }

    #[test]
    fn defaults_are_safe() {
        let p = parse("console=tty0 bmr.break");
        assert!(p.errors.is_empty());
        assert!(!p.unattended());
        assert!(!p.yes);
        assert_eq!(p.after, After::Poweroff);
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        let p = parse("bmr.tagret=/dev/sda bmr.after=halt bmr.yes=maybe bmr.repo= bmr.wait=x");
        assert_eq!(p.errors.len(), 5, "{:?}", p.errors);
        assert!(p.errors[0].contains("bmr.tagret"));
        assert!(!p.yes);
    }
}
