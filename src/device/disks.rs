//! Disks as the rescue system sees them, read from sysfs (no udev runs there): size, model,
//! serial, bus, partitions, the names udev would give under /dev/disk/by-id, and which disk is
//! the boot medium, so it is never offered as a target.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::device::layout::Partition;
use crate::util::progress::human_bytes;

/// ISO 9660 volume id of the rescue medium (iso-build/build.sh).
pub const RESCUE_VOLID: &str = "BMR_RESCUE";

#[derive(Debug, Clone)]
pub struct DiskInfo {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub model: String,
    pub serial: String,
    pub bus: String,
    pub removable: bool,
    pub read_only: bool,
    /// Its partitions as the kernel sees them (with their kernel names).
    pub parts: Vec<Partition>,
    /// Names as udev would create them under /dev/disk/by-id.
    pub ids: Vec<String>,
    pub rescue_medium: bool,
}

impl DiskInfo {
    /// One line for plans and menus: `vda  20.0 GiB  virtio  QEMU disk (serial T1), 2 partitions`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{:<8} {:>10}  {:<6}",
            self.name,
            human_bytes(self.size),
            self.bus
        );
        let model = self.model.trim();
        if !model.is_empty() {
            s.push_str(&format!("  {model}"));
        }
        if !self.serial.is_empty() {
            s.push_str(&format!(" (serial {})", self.serial));
        }
        match self.parts.len() {
            0 => {}
            1 => s.push_str(", 1 partition"),
            n => s.push_str(&format!(", {n} partitions")),
        }
        s
    }
}

fn read_trim(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The unit-serial VPD page (SCSI/SATA): 4 header bytes, then the serial.
fn vpd_serial(dev: &Path) -> String {
    let mut b = Vec::new();
    if fs::File::open(dev.join("vpd_pg80"))
        .and_then(|mut f| f.read_to_end(&mut b))
        .is_err()
        || b.len() <= 4
    {
        return String::new();
    }
    String::from_utf8_lossy(&b[4..])
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_string()
}

/// udev's encoding in by-id names: runs of blanks become one '_'.
fn id_part(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join("_")
}

fn is_candidate_name(name: &str) -> bool {
    !["loop", "ram", "zram", "fd", "sr", "dm-", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Whether an ISO 9660 volume with the rescue volume id starts at this device's first byte.
pub fn holds_rescue_iso(path: &Path) -> bool {
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    let mut pvd = [0u8; 72];
    if f.read_exact_at(&mut pvd, 32768).is_err() {
        return false;
    }
    &pvd[1..6] == b"CD001" && String::from_utf8_lossy(&pvd[40..72]).trim() == RESCUE_VOLID
}

fn disk_info(name: &str) -> Option<DiskInfo> {
    let sys = Path::new("/sys/block").join(name);
    let size = read_trim(sys.join("size")).parse::<u64>().ok()? * 512;
    if size == 0 {
        return None;
    }
    let real = fs::canonicalize(&sys)
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let bus = if name.starts_with("nvme") {
        "nvme"
    } else if real.contains("/usb") {
        "usb"
    } else if real.contains("/virtio") {
        "virtio"
    } else if real.contains("/ata") {
        "sata"
    } else if name.starts_with("mmcblk") {
        "mmc"
    } else {
        "scsi"
    };
    let dev = sys.join("device");
    let model = read_trim(dev.join("model"));
    let vendor = read_trim(dev.join("vendor"));
    let mut serial = read_trim(sys.join("serial"));
    if serial.is_empty() {
        serial = read_trim(dev.join("serial"));
    }
    if serial.is_empty() {
        serial = vpd_serial(&dev);
    }
    let mut ids = Vec::new();
    if !serial.is_empty() {
        match bus {
            "virtio" => ids.push(format!("virtio-{}", id_part(&serial))),
            "nvme" => ids.push(format!("nvme-{}_{}", id_part(&model), id_part(&serial))),
            "sata" => ids.push(format!("ata-{}_{}", id_part(&model), id_part(&serial))),
            "usb" => ids.push(format!(
                "usb-{}_{}_{}",
                id_part(&vendor),
                id_part(&model),
                id_part(&serial)
            )),
            _ => ids.push(format!("scsi-{}_{}", id_part(&vendor), id_part(&serial))),
        }
    }
    let wwid = [read_trim(sys.join("wwid")), read_trim(dev.join("wwid"))]
        .into_iter()
        .find(|w| w.starts_with("naa.") || w.starts_with("eui."));
    if let Some(w) = wwid {
        ids.push(format!("wwn-0x{}", &w[4..]));
    }
    let mut parts: Vec<Partition> = fs::read_dir(&sys)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let number = read_trim(p.join("partition")).parse().ok()?;
            // sysfs counts 512-byte sectors whatever the disk's sector size.
            Some(Partition {
                number,
                start: read_trim(p.join("start")).parse::<u64>().ok()? * 512,
                len: read_trim(p.join("size")).parse::<u64>().ok()? * 512,
                kernel_name: e.file_name().to_string_lossy().to_string(),
                ..Default::default()
            })
        })
        .collect();
    parts.sort_by_key(|p| p.number);
    let path = Path::new("/dev").join(name);
    Some(DiskInfo {
        name: name.to_string(),
        rescue_medium: holds_rescue_iso(&path),
        path,
        size,
        model: if vendor.is_empty() || bus == "nvme" || bus == "virtio" {
            model
        } else {
            format!("{vendor} {model}")
        },
        serial,
        bus: bus.to_string(),
        removable: read_trim(sys.join("removable")) == "1",
        read_only: read_trim(sys.join("ro")) == "1",
        parts,
        ids,
    })
}

/// The names udev would give disk `name` (a kernel name) under /dev/disk/by-id.
pub fn udev_ids(name: &str) -> Vec<String> {
    disk_info(name).map(|d| d.ids).unwrap_or_default()
}

/// Every whole disk that could hold data (no loop, RAM, optical or device-mapper devices).
pub fn list() -> Vec<DiskInfo> {
    let mut names: Vec<String> = fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| is_candidate_name(n))
        .collect();
    names.sort();
    names.iter().filter_map(|n| disk_info(n)).collect()
}

/// Names of every block device and partition: what appears while drivers probe.
fn snapshot() -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    for e in fs::read_dir("/sys/class/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        s.insert(e.file_name().to_string_lossy().to_string());
    }
    s
}

/// Wait until no block device has appeared for `quiet` (USB sticks show up seconds after
/// their controller), but no longer than `max`.
pub fn settle(quiet: Duration, max: Duration) {
    let start = Instant::now();
    let mut last = snapshot();
    let mut since = Instant::now();
    while start.elapsed() < max && since.elapsed() < quiet {
        std::thread::sleep(Duration::from_millis(250));
        let now = snapshot();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

/// Wait up to `max` for `f` to give a value, polling while devices appear.
pub fn wait_for<T>(max: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= max {
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Find a disk by `/dev/NAME`, `NAME`, `/dev/disk/by-id/ID` or `ID` (matched against the names
/// udev would give, or a unique serial number in them, since no udev runs here).
pub fn find<'a>(disks: &'a [DiskInfo], spec: &str) -> Result<&'a DiskInfo> {
    let by_id = spec.strip_prefix("/dev/disk/by-id/");
    if let Some(id) = by_id
        && let Ok(real) = fs::canonicalize(spec)
        && let Some(d) = disks.iter().find(|d| d.path == real)
    {
        let _ = id;
        return Ok(d);
    }
    let name = spec.strip_prefix("/dev/").unwrap_or(spec);
    if let Some(d) = disks.iter().find(|d| d.name == name) {
        return Ok(d);
    }
    let id = by_id.unwrap_or(spec);
    let exact: Vec<&DiskInfo> = disks
        .iter()
        .filter(|d| d.ids.iter().any(|i| i == id))
        .collect();
    if let [d] = exact.as_slice() {
        return Ok(d);
    }
    let tokens: Vec<&str> = id.split(['_', '-']).collect();
    let by_serial: Vec<&DiskInfo> = disks
        .iter()
        .filter(|d| d.serial.len() >= 4 && tokens.contains(&d.serial.as_str()))
        .collect();
    if let [d] = by_serial.as_slice() {
        return Ok(d);
    }
    let known: Vec<String> = disks
        .iter()
        .map(|d| {
            let mut s = format!("/dev/{}", d.name);
            for i in &d.ids {
                s.push_str(&format!(" = {i}"));
            }
            s
        })
        .collect();
    if Path::new(spec).exists() && !spec.starts_with("/dev/disk/") {
        bail!(
            "{spec} is not a whole disk: name a disk, not a partition ({})",
            known.join(", ")
        );
    }
    bail!(
        "no disk {spec}: disks here are {}",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, serial: &str, ids: &[&str]) -> DiskInfo {
        DiskInfo {
            name: name.into(),
            path: PathBuf::from(format!("/dev/{name}")),
            size: 1 << 30,
            model: "QEMU HARDDISK".into(),
            serial: serial.into(),
            bus: "sata".into(),
            removable: false,
            read_only: false,
            parts: Vec::new(),
            ids: ids.iter().map(|s| s.to_string()).collect(),
            rescue_medium: false,
        }
    }

    #[test]
    fn finds_disks_by_name_id_and_serial() {
        let d = [
            disk("sda", "QM00001", &["ata-QEMU_HARDDISK_QM00001"]),
            disk("vdb", "TARGET7", &["virtio-TARGET7"]),
        ];
        assert_eq!(find(&d, "/dev/sda").unwrap().name, "sda");
        assert_eq!(find(&d, "vdb").unwrap().name, "vdb");
        assert_eq!(
            find(&d, "/dev/disk/by-id/virtio-TARGET7").unwrap().name,
            "vdb"
        );
        assert_eq!(find(&d, "ata-QEMU_HARDDISK_QM00001").unwrap().name, "sda");
        // A by-id name with a model string that sysfs truncates still matches by serial.
        assert_eq!(
            find(&d, "/dev/disk/by-id/ata-QEMU_HARDDISK_LONG_MODEL_QM00001")
                .unwrap()
                .name,
            "sda"
        );
        let e = find(&d, "/dev/disk/by-id/virtio-NOPE")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no disk") && e.contains("virtio-TARGET7"), "{e}");
    }

    #[test]
    fn id_parts_collapse_blanks() {
        assert_eq!(id_part("  Samsung SSD  970 "), "Samsung_SSD_970");
    }
}
