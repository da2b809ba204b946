//! `--reinstall-bootloader`: for what the other steps cannot fix (a boot sector the new
//! firmware rejects, a GRUB that looks for a disk that is gone), run the restored system's own
//! grub-install and grub-mkconfig inside it, as its admin would from a rescue shell.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Mounts made for the chroot, unmounted in reverse order on drop.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn bind(&mut self, from: &str, to: &Path) -> Result<()> {
        std::fs::create_dir_all(to).ok();
        mount(
            Some(from),
            to,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("cannot bind {from} into the restored system"))?;
        self.0.push(to.to_path_buf());
        Ok(())
    }

    fn fs(&mut self, dev: &Path, to: &Path, fstype: &str) -> Result<()> {
        std::fs::create_dir_all(to).ok();
        mount(Some(dev), to, Some(fstype), MsFlags::empty(), None::<&str>).with_context(|| {
            format!(
                "cannot mount {} ({fstype}) at {}",
                dev.display(),
                to.display()
            )
        })?;
        self.0.push(to.to_path_buf());
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
}

/// The GRUB commands of the restored system: Debian's names, else Fedora/SUSE's grub2-*.
fn grub_tools(root: &Path) -> Option<(&'static str, &'static str, &'static str)> {
    let has = |p: &str| root.join(p.trim_start_matches('/')).exists();
    if has("/usr/sbin/grub-install") {
        Some(("grub-install", "grub-mkconfig", "/boot/grub/grub.cfg"))
    } else if has("/usr/sbin/grub2-install") {
        Some(("grub2-install", "grub2-mkconfig", "/boot/grub2/grub.cfg"))
    } else {
        None
    }
}

fn chroot(root: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("chroot")
        .arg(root)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .with_context(|| format!("cannot run chroot {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{} failed in the restored system: {}",
            args.join(" "),
            text.trim().lines().last().unwrap_or("no output")
        );
    }
    Ok(text)
}

/// Reinstall GRUB from inside the restored root mounted at `root`, onto `disk`; `boot` is a
/// separate /boot's device and type, `esp` the restored ESP's device when the system boots by
/// UEFI.
pub fn reinstall(
    root: &Path,
    disk: &Path,
    boot: Option<(&Path, &str)>,
    esp: Option<&Path>,
    uefi: bool,
) -> Result<Vec<String>> {
    let Some((install, mkconfig, cfg)) = grub_tools(root) else {
        bail!(
            "--reinstall-bootloader: the restored system has no grub-install or grub2-install; reinstall its boot loader by hand"
        );
    };
    let mut m = Mounts(Vec::new());
    if let Some((dev, fstype)) = boot {
        m.fs(dev, &root.join("boot"), fstype)?;
    }
    for d in ["/dev", "/proc", "/sys", "/run"] {
        m.bind(d, &root.join(d.trim_start_matches('/')))?;
    }
    let efivars = root.join("sys/firmware/efi/efivars");
    if uefi && efivars.is_dir() {
        // A recursive bind of /sys carries efivarfs only if it was mounted there already.
        let _ = mount(
            Some("efivarfs"),
            &efivars,
            Some("efivarfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map(|_| m.0.push(efivars.clone()));
    }
    let mut done = Vec::new();
    let disk_s = disk.to_string_lossy().to_string();
    let out = if uefi {
        let Some(esp) = esp else {
            bail!("--reinstall-bootloader: UEFI needs an ESP and the restored disk has none");
        };
        m.fs(esp, &root.join("boot/efi"), "vfat")?;
        chroot(
            root,
            &[
                install,
                "--target=x86_64-efi",
                "--efi-directory=/boot/efi",
                "--recheck",
            ],
        )?
    } else {
        chroot(root, &[install, "--target=i386-pc", "--recheck", &disk_s])?
    };
    done.push(format!(
        "{install} ({}): {}",
        if uefi { "UEFI" } else { "BIOS" },
        out.trim().lines().last().unwrap_or("done")
    ));
    chroot(root, &[mkconfig, "-o", cfg])?;
    done.push(format!("{mkconfig} wrote {cfg}"));
    Ok(done)
}
