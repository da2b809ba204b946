//! The last fix-up: would the restored system find what its /etc/fstab mounts? systemd waits
//! 90 s for a device that never comes, then drops to emergency mode: a restore that leaves such
//! an entry has not given the machine back, whatever else went right. Each entry's device
//! (UUID=, LABEL=, PARTUUID=, /dev/disk/by-*/, /dev/mapper/VG-LV, /dev/VG/LV, a kernel name)
//! is looked up among the volumes of the restored disk.

use std::collections::BTreeSet;

/// What the restored disk holds, for the lookup.
#[derive(Debug, Default)]
pub struct Known {
    /// Filesystem and swap UUIDs, lower case.
    pub uuids: BTreeSet<String>,
    pub labels: BTreeSet<String>,
    /// GPT partition GUIDs, lower case.
    pub partuuids: BTreeSet<String>,
    /// `vg/lv` of the logical volumes, `md/NAME` of the md arrays.
    pub lvs: BTreeSet<String>,
    /// Whether every volume's filesystem is known: else a UUID or label not found may be
    /// inside a volume bmr cannot look into (LUKS, md), and is only a warning.
    pub complete: bool,
    /// Whether a /dev path can be checked against this machine's devices (a block device
    /// target): `is_ours` answers it.
    pub devices: bool,
}

/// One fstab entry the restored system would not find.
#[derive(Debug, PartialEq)]
pub struct Missing {
    pub spec: String,
    pub mountpoint: String,
    /// systemd goes on without it (swap, nofail): a warning only.
    pub soft: bool,
    /// Certainly absent (else: bmr cannot look inside some volume).
    pub certain: bool,
}

/// `/dev/mapper/` names escape a dash inside a VG or LV name by doubling it.
pub fn mapper_to_lv(name: &str) -> Option<String> {
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'-' {
            if b.get(i + 1) == Some(&b'-') {
                i += 2;
                continue;
            }
            let (vg, lv) = (&name[..i], &name[i + 1..]);
            if vg.is_empty() || lv.is_empty() {
                return None;
            }
            return Some(format!(
                "{}/{}",
                vg.replace("--", "-"),
                lv.replace("--", "-")
            ));
        }
        i += 1;
    }
    None
}

/// fstab's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            let oct: String = it.clone().take(3).collect();
            if oct.len() == 3
                && let Ok(v) = u8::from_str_radix(&oct, 8)
            {
                out.push(v as char);
                it.nth(2);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Whether the device `spec` names is on the restored disk: Some(true/false), or None when
/// bmr cannot tell (a network filesystem, a name of another kind).
fn found(spec: &str, k: &Known, is_ours: &dyn Fn(&str) -> Option<bool>) -> Option<bool> {
    let (key, val) = match spec.split_once('=') {
        Some((key, val)) if !spec.starts_with('/') => (key.to_ascii_uppercase(), val),
        _ => {
            for (dir, key) in [
                ("/dev/disk/by-uuid/", "UUID"),
                ("/dev/disk/by-label/", "LABEL"),
                ("/dev/disk/by-partuuid/", "PARTUUID"),
                ("/dev/disk/by-partlabel/", "PARTLABEL"),
            ] {
                if let Some(v) = spec.strip_prefix(dir) {
                    return found(&format!("{key}={v}"), k, is_ours);
                }
            }
            if let Some(m) = spec.strip_prefix("/dev/mapper/") {
                return match mapper_to_lv(m) {
                    Some(lv) if k.lvs.contains(&lv) => Some(true),
                    // Another kind of mapping (LUKS, multipath): not bmr's to judge.
                    _ => None,
                };
            }
            let rest = spec.strip_prefix("/dev/")?;
            // /dev/mdN: numbers are handed out at assembly, not recorded; /dev/md/NAME is
            // judged below with the arrays' names.
            if rest
                .strip_prefix("md")
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                return None;
            }
            let parts: Vec<&str> = rest.split('/').collect();
            if let [vg, lv] = parts[..]
                && k.lvs.iter().any(|l| l.split('/').next() == Some(vg))
            {
                return Some(k.lvs.contains(&format!("{vg}/{lv}")));
            }
            // A partition's kernel, by-id or by-path name: on a disk target, does it name
            // one of its partitions now? Anything else (md, another mapping) is not judged.
            return match crate::device::names::parse_partition(spec) {
                Some(_) if k.devices => is_ours(spec),
                _ => None,
            };
        }
    };
    let val = val.trim_matches('"');
    match key.as_str() {
        "UUID" => Some(k.uuids.contains(&val.to_ascii_lowercase())),
        "LABEL" => Some(k.labels.contains(val)),
        // An MBR's PARTUUID (disk signature-number) is not recorded: not judged.
        "PARTUUID" if k.partuuids.is_empty() => None,
        "PARTUUID" => Some(k.partuuids.contains(&val.to_ascii_lowercase())),
        "PARTLABEL" => None,
        _ => None,
    }
}

/// The fstab entries whose devices the restored system would not find.
pub fn check_fstab(text: &str, k: &Known, is_ours: &dyn Fn(&str) -> Option<bool>) -> Vec<Missing> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(spec), Some(mp)) = (f.first(), f.get(1)) else {
            continue;
        };
        let vfstype = f.get(2).copied().unwrap_or("auto");
        let opts: Vec<&str> = f.get(3).map_or(Vec::new(), |o| o.split(',').collect());
        if opts.contains(&"noauto") || opts.iter().any(|o| o.starts_with("x-systemd.automount")) {
            continue;
        }
        // Network and virtual filesystems are not on any disk.
        if matches!(
            vfstype,
            "nfs"
                | "nfs4"
                | "cifs"
                | "smb3"
                | "sshfs"
                | "fuse.sshfs"
                | "ceph"
                | "glusterfs"
                | "tmpfs"
                | "proc"
                | "sysfs"
                | "devpts"
                | "devtmpfs"
                | "none"
                | "bind"
                | "overlay"
                | "iso9660"
                | "udf"
        ) || opts.contains(&"bind")
            || opts.contains(&"_netdev")
        {
            continue;
        }
        let spec = unescape(spec);
        match found(&spec, k, is_ours) {
            Some(false) => {
                let certain = k.complete || spec.starts_with('/');
                out.push(Missing {
                    spec,
                    mountpoint: unescape(mp),
                    soft: vfstype == "swap" || opts.contains(&"nofail"),
                    certain,
                });
            }
            _ => continue,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Known {
        Known {
            uuids: ["6d1f5a2e-0c3b-4d8e-9a71-2b5c8e4f3a10", "b3e1-a7c2"]
                .map(String::from)
                .into(),
            labels: ["root".to_string()].into(),
            partuuids: ["1b1a1b1a-0000-4000-8000-000000000004".to_string()].into(),
            lvs: ["vg0/root", "vg0/swap", "my-vg/lv-a"]
                .map(String::from)
                .into(),
            complete: true,
            devices: true,
        }
    }

    #[test]
    fn entries_are_found_or_named() {
        let fstab = "# a comment\n\
            /dev/mapper/vg0-root / ext4 errors=remount-ro 0 1\n\
            UUID=B3E1-A7C2 /boot/efi vfat umask=0077 0 1\n\
            /dev/sda2 /boot ext4 defaults 0 2\n\
            /dev/mapper/vg0-swap none swap sw 0 0\n\
            /dev/vg0/gone /srv ext4 defaults 0 2\n\
            /dev/mapper/my--vg-lv--a /a ext4 defaults 0 2\n\
            UUID=0000 /data ext4 nofail 0 2\n\
            LABEL=root /r ext4 defaults 0 0\n\
            server:/x /mnt/x nfs defaults 0 0\n\
            tmpfs /tmp tmpfs defaults 0 0\n\
            /dev/sdb1 /usb ext4 noauto 0 0\n\
            /dev/mapper/cryptdata /c ext4 defaults 0 2\n";
        let ours = |p: &str| Some(p == "/dev/nvme0n1p3");
        let m = check_fstab(fstab, &known(), &ours);
        let got: Vec<(&str, bool)> = m.iter().map(|m| (m.spec.as_str(), m.soft)).collect();
        assert_eq!(
            got,
            [
                ("/dev/sda2", false),
                ("/dev/vg0/gone", false),
                ("UUID=0000", true)
            ]
        );
    }

    #[test]
    fn image_targets_do_not_judge_kernel_names() {
        let k = Known {
            devices: false,
            ..known()
        };
        assert!(check_fstab("/dev/sda2 /boot ext4 defaults 0 2\n", &k, &|_| None).is_empty());
    }

    #[test]
    fn mapper_names() {
        assert_eq!(mapper_to_lv("vg0-root").as_deref(), Some("vg0/root"));
        assert_eq!(mapper_to_lv("my--vg-lv--a").as_deref(), Some("my-vg/lv-a"));
        assert_eq!(mapper_to_lv("cryptroot"), None);
        assert_eq!(unescape("/mnt/my\\040disk"), "/mnt/my disk");
    }
}
