//! UEFI after a restore: a new machine's NVRAM has no entry for the restored system, so its
//! firmware boots only `EFI/BOOT/BOOTX64.EFI` (the removable-media path). Make sure that fallback
//! exists, and when bmr runs on the machine itself, create a boot entry and put it first.
//! The ESP is read and written in place with the fatfs crate: no mount, no vfat driver needed.

use std::fs::File;
use std::io::{Cursor, Read};

use anyhow::{Context, Result, anyhow, bail};
use fscommon::{BufStream, StreamSlice};
use virtfw_libefi::efivar::boot::{BootEntry, BootIndex, BootOrder};
use virtfw_libefi::efivar::devpath::{DevPath, DevPathMediaHd, DevPathNode};
use virtfw_libefi::efivar::io::{ReadEfiExt, WriteEfiExt};
use virtfw_libefi::efivar::types::{EfiVar, EfiVarAttr, EfiVarId};
use virtfw_libefi::guids::EfiGlobalVariable;
use virtfw_libefi::nocasestr::NoCaseString;
use virtfw_libefi::varstore::sysfs;

pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
const EFIVARS: &str = "/sys/firmware/efi/efivars";
const FALLBACK_DIR: &str = "EFI/BOOT";
const FALLBACK: &str = "EFI/BOOT/BOOTX64.EFI";

pub use crate::repo::manifest::BootRecord;

/// The restored ESP: where it is on the target and which partition it is.
#[derive(Debug, Clone)]
pub struct Esp {
    pub slot: u32,
    pub guid: String,
    pub first_lba: u64,
    pub sectors: u64,
    pub sector_size: u64,
}

impl Esp {
    fn start(&self) -> u64 {
        self.first_lba * self.sector_size
    }
}

/// A loader found on the ESP: its path and the description for its boot entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Loader {
    pub path: String,
    pub description: String,
}

pub fn firmware_is_uefi() -> bool {
    std::path::Path::new(EFIVARS).is_dir()
}

fn efi_path(p: &str) -> String {
    format!("\\{}", p.replace('/', "\\"))
}

fn slash_path(p: &str) -> String {
    p.trim_start_matches('\\').replace('\\', "/")
}

/// Every `Boot####` entry in this machine's NVRAM (none when not booted by UEFI).
fn read_entries() -> Vec<(u16, BootEntry)> {
    let Ok(rd) = std::fs::read_dir(EFIVARS) else {
        return Vec::new();
    };
    let suffix = format!("-{EfiGlobalVariable}");
    let mut v = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(var) = name.strip_suffix(&suffix) else {
            continue;
        };
        let Some(hex) = var.strip_prefix("Boot").filter(|h| h.len() == 4) else {
            continue;
        };
        let Ok(idx) = u16::from_str_radix(hex, 16) else {
            continue;
        };
        let Some(var) = sysfs::varstore_read(var, &EfiGlobalVariable) else {
            continue;
        };
        if let Ok(entry) = Cursor::new(var.data()).read_boot_entry() {
            v.push((idx, entry));
        }
    }
    v.sort_by_key(|(i, _)| *i);
    v
}

/// The partition GUID and loader path of an entry that boots a file from a GPT partition.
fn hd_and_file(e: &BootEntry) -> Option<(String, String)> {
    let mut guid = None;
    let mut file = None;
    for n in &e.devpath.nodes {
        match n {
            DevPathNode::MediaHd(hd) if hd.sigtype == 2 => {
                guid = Some(hd.signature.to_string().to_lowercase())
            }
            DevPathNode::MediaFilePath(p) => file = Some(slash_path(&p.0)),
            _ => {}
        }
    }
    Some((guid?, file?))
}

/// The source machine's boot entries that start a loader from one of `partition_guids`.
pub fn record(partition_guids: &[String]) -> Vec<BootRecord> {
    read_entries()
        .into_iter()
        .filter_map(|(_, e)| {
            let (guid, loader) = hd_and_file(&e)?;
            partition_guids
                .iter()
                .any(|g| g.eq_ignore_ascii_case(&guid))
                .then(|| BootRecord {
                    description: e.title.clone(),
                    partition_guid: guid,
                    loader,
                })
        })
        .collect()
}

type Fat<'a> = fatfs::FileSystem<BufStream<StreamSlice<&'a File>>>;

fn open_fat<'a>(disk: &'a File, esp: &Esp) -> Result<Fat<'a>> {
    let slice = StreamSlice::new(
        disk,
        esp.start(),
        esp.start() + esp.sectors * esp.sector_size,
    )
    .context("cannot reach the ESP on the target")?;
    fatfs::FileSystem::new(BufStream::new(slice), fatfs::FsOptions::new()).map_err(|e| {
        anyhow!(
            "the ESP (partition {}) holds no readable FAT filesystem ({e}): the restored image may be damaged, run bmr verify",
            esp.slot
        )
    })
}

fn exists(fs: &Fat, path: &str) -> bool {
    fs.root_dir().open_file(path).is_ok()
}

fn read_file(fs: &Fat, path: &str) -> Result<Vec<u8>> {
    let mut f = fs
        .root_dir()
        .open_file(path)
        .with_context(|| format!("cannot open {path} on the ESP"))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .with_context(|| format!("cannot read {path} on the ESP"))?;
    Ok(v)
}

/// Writes go through mtools: fatfs 0.3 writes long-name entries for "." and "..", which
/// fsck.fat rightly calls corrupt.
fn mtools(
    tool: &str,
    target: &std::path::Path,
    esp: &Esp,
    args: &[&std::ffi::OsStr],
) -> Result<()> {
    let out = std::process::Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", target.display(), esp.start()))
        .args(args)
        .output()
        .with_context(|| format!("cannot run {tool}: is mtools installed?"))?;
    if !out.status.success() {
        bail!(
            "{tool} failed on the ESP: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn write_file(target: &std::path::Path, esp: &Esp, path: &str, data: &[u8]) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("bmr-esp-{}", std::process::id()));
    std::fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    let r = mtools(
        "mcopy",
        target,
        esp,
        &[
            "-o".as_ref(),
            "-D".as_ref(),
            "o".as_ref(),
            tmp.as_os_str(),
            format!("::/{path}").as_ref(),
        ],
    )
    .with_context(|| format!("cannot write {path} on the ESP (is it full?)"));
    let _ = std::fs::remove_file(&tmp);
    r
}

/// The system's loader: a recorded entry's if its file is there, else the first of
/// EFI/<dir>/shimx64.efi, grubx64.efi, systemd-bootx64.efi (EFI/BOOT itself excluded).
fn find_loader(fs: &Fat, esp: &Esp, recorded: &[BootRecord]) -> Option<Loader> {
    for r in recorded {
        if r.partition_guid.eq_ignore_ascii_case(&esp.guid) && exists(fs, &r.loader) {
            return Some(Loader {
                path: r.loader.clone(),
                description: r.description.clone(),
            });
        }
    }
    let efi = fs.root_dir().open_dir("EFI").ok()?;
    let mut dirs: Vec<String> = efi
        .iter()
        .flatten()
        .filter(|e| e.is_dir())
        .map(|e| e.file_name())
        .filter(|n| !n.starts_with('.') && !n.eq_ignore_ascii_case("BOOT"))
        .collect();
    dirs.sort();
    for file in ["shimx64.efi", "grubx64.efi", "systemd-bootx64.efi"] {
        for d in &dirs {
            let path = format!("EFI/{d}/{file}");
            if exists(fs, &path) {
                return Some(Loader {
                    path,
                    description: d.clone(),
                });
            }
        }
    }
    None
}

/// What the ESP holds, for the restore plan and the steps.
pub struct EspState {
    pub loader: Option<Loader>,
    pub has_fallback: bool,
}

pub fn inspect(disk: &File, esp: &Esp, recorded: &[BootRecord]) -> Result<EspState> {
    let fs = open_fat(disk, esp)?;
    Ok(EspState {
        loader: find_loader(&fs, esp, recorded),
        has_fallback: exists(&fs, FALLBACK),
    })
}

/// Copy the loader to EFI/BOOT/BOOTX64.EFI if there is none. A shim loads grubx64.efi (and
/// mmx64.efi) from its own directory, and Debian's GRUB reads grub.cfg from there: those
/// come along.
pub fn ensure_fallback(
    disk: &File,
    target: &std::path::Path,
    esp: &Esp,
    loader: &Loader,
) -> Result<String> {
    let fs = open_fat(disk, esp)?;
    if exists(&fs, FALLBACK) {
        return Ok(format!("{FALLBACK} is there; left as it is"));
    }
    let dir = loader.path.rsplit_once('/').map_or("", |(d, _)| d);
    let mut files = vec![(FALLBACK.to_string(), read_file(&fs, &loader.path)?)];
    for extra in ["grubx64.efi", "mmx64.efi", "grub.cfg"] {
        let from = format!("{dir}/{extra}");
        let to = format!("{FALLBACK_DIR}/{extra}");
        if from != loader.path && exists(&fs, &from) && !exists(&fs, &to) {
            files.push((to, read_file(&fs, &from)?));
        }
    }
    let has_dir = fs.root_dir().open_dir(FALLBACK_DIR).is_ok();
    drop(fs);
    if !has_dir {
        mtools("mmd", target, esp, &[format!("::/{FALLBACK_DIR}").as_ref()])
            .context("cannot create EFI/BOOT on the ESP")?;
    }
    for (path, data) in &files {
        write_file(target, esp, path, data)?;
    }
    Ok(format!(
        "copied {} to {}",
        loader.path,
        files
            .iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn write_var(name: &str, data: Vec<u8>) -> Result<()> {
    let var = EfiVar::new_with_vec(
        EfiVarId::new(name.to_string(), EfiGlobalVariable),
        EfiVarAttr::new_nv_bs_rt(),
        data,
    );
    sysfs::varstore_write(&var)
        .with_context(|| format!("cannot write the EFI variable {name} (efivarfs)"))
}

/// Create (or reuse) the boot entry for `loader` on the ESP and put it first in BootOrder.
pub fn nvram_entry(esp: &Esp, loader: &Loader) -> Result<String> {
    let guid = uguid::Guid::try_parse(&esp.guid)
        .map_err(|_| anyhow!("the ESP's partition GUID {} is not valid", esp.guid))?;
    let mut dp = DevPath::new();
    dp.push(DevPathNode::MediaHd(DevPathMediaHd {
        nr: esp.slot,
        start: esp.first_lba,
        size: esp.sectors,
        signature: guid,
        mbrtype: 2,
        sigtype: 2,
    }));
    dp.push(DevPathNode::MediaFilePath(NoCaseString::new(&efi_path(
        &loader.path,
    ))));
    dp.push(DevPathNode::End { subtype: 0xff });
    let entry = BootEntry::new_boot(&loader.description, dp, None);

    let existing = read_entries();
    let same = existing.iter().find(|(_, e)| {
        hd_and_file(e).is_some_and(|(g, f)| {
            g.eq_ignore_ascii_case(&esp.guid) && f.eq_ignore_ascii_case(&loader.path)
        })
    });
    let (idx, created) = match same {
        Some((i, _)) => (*i, false),
        None => {
            let Some(free) = (0..=0xffffu16).find(|i| existing.iter().all(|(x, _)| x != i)) else {
                bail!(
                    "the NVRAM has no free boot entry number: remove old entries in the firmware setup"
                );
            };
            let mut data = Vec::new();
            data.write_boot_entry(&entry)
                .context("cannot encode the boot entry")?;
            write_var(&format!("Boot{free:04X}"), data)?;
            (free, true)
        }
    };
    let order = sysfs::varstore_read("BootOrder", &EfiGlobalVariable)
        .and_then(|v| Cursor::new(v.data()).read_boot_order().ok())
        .unwrap_or_else(BootOrder::empty);
    let me = BootIndex(idx);
    let order = order.remove_elem(&me).insert(0, &me);
    write_var("BootOrder", Vec::from(&order))?;
    Ok(format!(
        "{} Boot{idx:04X} \"{}\" -> {} on partition {}; BootOrder is now {}",
        if created { "created" } else { "kept" },
        loader.description,
        efi_path(&loader.path),
        esp.slot,
        order
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A boot entry survives encode/decode with what `record` and `nvram_entry` rely on.
    #[test]
    fn boot_entry_round_trip() {
        let guid = "0fc63daf-8483-4772-8e79-3d69d8477de4";
        let mut dp = DevPath::new();
        dp.push(DevPathNode::MediaHd(DevPathMediaHd {
            nr: 2,
            start: 4096,
            size: 131072,
            signature: uguid::Guid::try_parse(guid).expect("guid"),
            mbrtype: 2,
            sigtype: 2,
        }));
        dp.push(DevPathNode::MediaFilePath(NoCaseString::new(
            "\\EFI\\debian\\shimx64.efi",
        )));
        dp.push(DevPathNode::End { subtype: 0xff });
        let e = BootEntry::new_boot("debian", dp, None);
        let mut data = Vec::new();
        data.write_boot_entry(&e).expect("encode");
        let back = Cursor::new(&data).read_boot_entry().expect("decode");
        assert_eq!(back.title, "debian");
        assert_eq!(
            hd_and_file(&back),
            Some((guid.to_string(), "EFI/debian/shimx64.efi".to_string()))
        );
    }
}
