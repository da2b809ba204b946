//! LUKS1 and LUKS2 volumes: the header (where the encrypted data lies and how it is
//! encrypted), the volume key through cryptsetup (from a key file or a passphrase), and a
//! reader that decrypts aes-xts-plain64 sectors in process.
//!
//! A backup needs the plaintext only to map the filesystem inside (and, if the user allows
//! it, to list its files): it stores the header as it is and the *ciphertext* of the used
//! sectors, so the repository holds no plaintext, the restored volume opens with the old
//! passphrase, and writing the image back needs no key. Decrypting in process keeps this
//! working where there is no device-mapper (an image file on a build host); the volume key
//! itself comes from cryptsetup, which knows every key-derivation function and keyslot format.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aes::cipher::KeyInit;
use anyhow::{Context, Result, bail};
use sha2::Digest;
use xts_mode::Xts128;
use zeroize::Zeroizing;

use crate::fs::map::{be16, be64};
use crate::fs::read::ReadAt;

pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// The one cipher bmr decrypts in process: the default of cryptsetup since 1.6.
pub const XTS: &str = "aes-xts-plain64";
/// LUKS2 binary header (the JSON area follows it).
const BIN_HDR: usize = 4096;
/// A key file bigger than cryptsetup's default limit (8 MiB) is not one.
const KEYFILE_MAX: u64 = 8 << 20;
/// Header and keyslots cryptsetup is given to unlock a volume: LUKS2's default is 16 MiB.
pub const HEADER_MAX: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// 1 or 2.
    pub version: u16,
    pub uuid: String,
    /// LUKS2's label, if set.
    pub label: Option<String>,
    /// As dm-crypt names it: `aes-xts-plain64`.
    pub cipher: String,
    /// Encryption sector size in bytes (512 for LUKS1).
    pub sector_size: u32,
    /// Bytes from the partition's start to the encrypted data: the header and keyslots.
    pub data_offset: u64,
    /// Bytes of encrypted data; `None`: to the end of the partition.
    pub data_size: Option<u64>,
    /// Added to the 512-byte sector number for the IV.
    pub iv_tweak: u64,
    /// Why bmr cannot decrypt this volume in process, if it cannot (authenticated
    /// encryption, a reencryption in progress, another cipher).
    pub unsupported: Option<String>,
}

impl LuksHeader {
    /// Bytes of encrypted data in a partition of `len` bytes.
    pub fn data_len(&self, len: u64) -> u64 {
        self.data_size
            .unwrap_or_else(|| len.saturating_sub(self.data_offset))
    }
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim().to_string()
}

/// The LUKS header at the start of `[start, start+len)` of `dev`, if there is one. Err: a
/// LUKS header bmr cannot trust (bad checksum, sizes outside the format or the partition).
pub fn probe(dev: &dyn ReadAt, start: u64, len: u64) -> Result<Option<LuksHeader>> {
    if len < BIN_HDR as u64 {
        return Ok(None);
    }
    let mut head = vec![0u8; BIN_HDR];
    dev.read_at(&mut head, start)
        .with_context(|| format!("cannot read the partition at offset {start}"))?;
    if !head.starts_with(MAGIC) {
        return Ok(None);
    }
    let h = match be16(&head, 6) {
        1 => parse_v1(&head)?,
        2 => {
            let size = be64(&head, 8);
            // The format allows 16 KiB to 4 MiB, powers of two (JSON area included).
            if !(16384..=4 << 20).contains(&size) || !size.is_power_of_two() || size > len {
                bail!(
                    "LUKS2 header declares a size of {size} bytes, which the format does not allow"
                );
            }
            let mut hdr = vec![0u8; size as usize];
            dev.read_at(&mut hdr, start)
                .context("cannot read the LUKS2 header")?;
            parse_v2(&hdr)?
        }
        v => bail!("LUKS version {v}: bmr reads LUKS1 and LUKS2"),
    };
    if h.data_offset < BIN_HDR as u64 || !h.data_offset.is_multiple_of(512) || h.data_offset >= len
    {
        bail!(
            "LUKS{} header puts the data at byte {}, outside the partition's {len} bytes",
            h.version,
            h.data_offset
        );
    }
    if h.data_offset
        .checked_add(h.data_len(len))
        .is_none_or(|e| e > len)
    {
        bail!(
            "LUKS{} data segment runs past the end of the partition",
            h.version
        );
    }
    Ok(Some(h))
}

fn supported(cipher: &str, sector_size: u32, data_offset: u64) -> Option<String> {
    if cipher != XTS {
        return Some(format!(
            "cipher {cipher} (bmr decrypts {XTS}, cryptsetup's default)"
        ));
    }
    if ![512, 1024, 2048, 4096].contains(&sector_size)
        || !data_offset.is_multiple_of(u64::from(sector_size))
    {
        return Some(format!(
            "encryption sector size {sector_size} with data at byte {data_offset}"
        ));
    }
    None
}

/// The LUKS1 header (`phdr`): names are NUL-padded, numbers big-endian.
pub fn parse_v1(b: &[u8]) -> Result<LuksHeader> {
    if b.len() < 592 {
        bail!("LUKS1 header is cut short");
    }
    let cipher = format!("{}-{}", text(&b[8..40]), text(&b[40..72]));
    let payload = u64::from(crate::fs::map::be32(b, 104));
    let data_offset = payload * 512;
    Ok(LuksHeader {
        version: 1,
        uuid: text(&b[168..208]),
        label: None,
        unsupported: supported(&cipher, 512, data_offset),
        cipher,
        sector_size: 512,
        data_offset,
        data_size: None,
        iv_tweak: 0,
    })
}

fn num(v: &serde_json::Value, what: &str) -> Result<u64> {
    match v {
        // LUKS2 writes 64-bit numbers as strings (JSON numbers lose precision past 2^53).
        serde_json::Value::String(s) => s.parse().ok(),
        serde_json::Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .with_context(|| format!("LUKS2 metadata: {what} is not a number"))
}

/// A LUKS2 header: the binary header (its checksum covers the JSON area too) and the JSON
/// metadata's one data segment.
pub fn parse_v2(hdr: &[u8]) -> Result<LuksHeader> {
    if hdr.len() <= BIN_HDR {
        bail!("LUKS2 header is cut short");
    }
    let alg = text(&hdr[72..104]);
    let mut zeroed = hdr.to_vec();
    zeroed[448..512].fill(0);
    let sum: Vec<u8> = match alg.as_str() {
        "sha256" => sha2::Sha256::digest(&zeroed).to_vec(),
        "sha512" => sha2::Sha512::digest(&zeroed).to_vec(),
        a => bail!("LUKS2 header checksum {a}: bmr checks sha256 and sha512"),
    };
    if hdr[448..448 + sum.len()] != sum[..] {
        bail!("LUKS2 header checksum does not match: the header is damaged");
    }
    let json = &hdr[BIN_HDR..];
    let end = json.iter().position(|&c| c == 0).unwrap_or(json.len());
    let meta: serde_json::Value =
        serde_json::from_slice(&json[..end]).context("LUKS2 metadata is not valid JSON")?;
    let label = Some(text(&hdr[24..72])).filter(|l| !l.is_empty());
    let uuid = text(&hdr[168..208]);
    let mut unsupported = None;
    if let Some(req) = meta["config"]["requirements"]["mandatory"].as_array()
        && !req.is_empty()
    {
        let names: Vec<String> = req.iter().map(|r| r.to_string()).collect();
        unsupported = Some(format!("it requires {}", names.join(", ")));
    }
    let segs = meta["segments"]
        .as_object()
        .context("LUKS2 metadata has no segments")?;
    let seg = match segs.values().collect::<Vec<_>>().as_slice() {
        [s] => *s,
        s => {
            // Several segments: a reencryption is in progress. Its layout is cryptsetup's to know.
            let first = s.first().context("LUKS2 metadata has no data segment")?;
            unsupported.get_or_insert_with(|| {
                format!("{} data segments (a reencryption in progress)", s.len())
            });
            first
        }
    };
    if seg["type"].as_str() != Some("crypt") {
        bail!("LUKS2 data segment of type {}, not crypt", seg["type"]);
    }
    let data_offset = num(&seg["offset"], "the segment offset")?;
    let data_size = match &seg["size"] {
        serde_json::Value::String(s) if s == "dynamic" => None,
        v => Some(num(v, "the segment size")?),
    };
    let iv_tweak = num(&seg["iv_tweak"], "the segment's iv_tweak")?;
    let sector_size = u32::try_from(num(&seg["sector_size"], "the segment's sector size")?)
        .context("LUKS2 sector size out of range")?;
    let cipher = seg["encryption"]
        .as_str()
        .context("LUKS2 segment names no cipher")?
        .to_string();
    if !seg["integrity"].is_null() {
        unsupported.get_or_insert_with(|| "authenticated encryption (dm-integrity)".into());
    }
    if unsupported.is_none() {
        unsupported = supported(&cipher, sector_size, data_offset);
    }
    Ok(LuksHeader {
        version: 2,
        uuid,
        label,
        cipher,
        sector_size,
        data_offset,
        data_size,
        iv_tweak,
        unsupported,
    })
}

/// What opens a LUKS volume: a key file's bytes or a typed passphrase (cryptsetup reads
/// either whole from `--key-file -`). Wiped from memory when dropped, never printed.
pub struct Secret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn from_file(path: &Path) -> Result<Secret> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("LUKS key file {}", path.display()))?
            .len();
        if len > KEYFILE_MAX {
            bail!(
                "LUKS key file {} holds {len} bytes: a key file is at most 8 MiB",
                path.display()
            );
        }
        let b = std::fs::read(path).with_context(|| format!("LUKS key file {}", path.display()))?;
        if b.is_empty() {
            bail!("LUKS key file {} is empty", path.display());
        }
        Ok(Secret(Zeroizing::new(b)))
    }

    pub fn from_passphrase(p: &str) -> Secret {
        Secret(Zeroizing::new(p.as_bytes().to_vec()))
    }

    /// Run cryptsetup with the secret on its stdin (`--key-file -`).
    pub fn cryptsetup(&self, args: &[&str]) -> Result<String> {
        let mut child = Command::new("cryptsetup")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run cryptsetup (install cryptsetup-bin)")?;
        if let Some(mut i) = child.stdin.take() {
            // cryptsetup may exit before reading it all (a wrong header): its status says why.
            let _ = i.write_all(&self.0);
        }
        let out = child.wait_with_output().context("cryptsetup")?;
        crate::device::tool_output("cryptsetup", args, out)
    }
}

/// Where the key that opens a disk's LUKS volumes comes from: `--luks-keyfile`, or a
/// passphrase asked at the terminal (once, on the first volume), or nowhere.
pub struct KeySource {
    file: Option<PathBuf>,
    secret: Option<Secret>,
    asked: bool,
}

impl KeySource {
    pub fn new(file: Option<PathBuf>) -> KeySource {
        KeySource {
            file,
            secret: None,
            asked: false,
        }
    }

    pub fn get(&mut self, what: &str) -> Result<Option<&Secret>> {
        use std::io::IsTerminal;
        if self.secret.is_none() {
            if let Some(f) = &self.file {
                self.secret = Some(Secret::from_file(f)?);
            } else if !self.asked
                && std::io::stdin().is_terminal()
                && std::io::stderr().is_terminal()
            {
                self.asked = true;
                let p = dialoguer::Password::new()
                    .with_prompt(format!(
                        "Passphrase of the LUKS volume on {what} (empty: go on without it)"
                    ))
                    .allow_empty_password(true)
                    .interact()
                    .context("cannot read the passphrase")?;
                if !p.is_empty() {
                    self.secret = Some(Secret::from_passphrase(&p));
                }
            }
        }
        Ok(self.secret.as_ref())
    }
}

/// A volume key: wiped when dropped.
pub struct VolumeKey(Zeroizing<Vec<u8>>);

/// A temporary copy of a header, for cryptsetup to read (it wants a file or a device, and an
/// image file's partition is neither). Removed on drop.
struct HeaderCopy {
    dir: PathBuf,
    file: PathBuf,
}

impl HeaderCopy {
    fn new(dev: &dyn ReadAt, start: u64, len: u64) -> Result<HeaderCopy> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("bmr-luks-{}-{n}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let copy = HeaderCopy {
            file: dir.join("header"),
            dir,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&copy.file)
            .with_context(|| format!("cannot create {}", copy.file.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            dev.read_at(&mut buf[..n], start + off)
                .context("cannot read the LUKS header")?;
            f.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", copy.file.display()))?;
            off += n as u64;
        }
        Ok(copy)
    }
}

impl Drop for HeaderCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl VolumeKey {
    /// The volume key of the LUKS volume at `start` of `dev`, unlocked with `secret` by
    /// cryptsetup from a copy of its header. Err: no keyslot opens with it (one line).
    pub fn unlock(
        dev: &dyn ReadAt,
        start: u64,
        h: &LuksHeader,
        secret: &Secret,
    ) -> Result<VolumeKey> {
        let copy = HeaderCopy::new(dev, start, h.data_offset.min(HEADER_MAX))?;
        let path = copy.file.to_string_lossy().to_string();
        let out = secret
            .cryptsetup(&[
                "luksDump",
                "--dump-volume-key",
                "--batch-mode",
                "--key-file",
                "-",
                &path,
            ])
            .map_err(|e| {
                let e = format!("{e:#}");
                let e = e.rsplit(": ").next().unwrap_or(&e).to_string();
                anyhow::anyhow!("LUKS volume {}: the key does not open it ({e})", h.uuid)
            })?;
        let out = Zeroizing::new(out);
        let mut hex = Zeroizing::new(String::new());
        let mut inside = false;
        for line in out.lines() {
            let rest = ["MK dump:", "Volume key:"]
                .iter()
                .find_map(|p| line.strip_prefix(p));
            match rest {
                Some(r) => {
                    inside = true;
                    hex.push_str(r);
                }
                None if inside && line.starts_with(char::is_whitespace) => hex.push_str(line),
                None => inside = false,
            }
        }
        let digits: Zeroizing<String> =
            Zeroizing::new(hex.chars().filter(|c| !c.is_whitespace()).collect());
        let key = Zeroizing::new(
            hex::decode(digits.as_bytes())
                .ok()
                .filter(|k| !k.is_empty())
                .with_context(|| {
                    format!(
                        "LUKS volume {}: cryptsetup printed no volume key bmr can read",
                        h.uuid
                    )
                })?,
        );
        Ok(VolumeKey(key))
    }
}

/// Bytes in memory, read like a device (a header read from an image).
pub struct Bytes(pub Vec<u8>);

impl ReadAt for Bytes {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let s = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(s);
        Ok(())
    }
}

enum Xts {
    A128(Box<Xts128<aes::Aes128>>),
    A256(Box<Xts128<aes::Aes256>>),
}

/// A volume's data cipher: aes-xts-plain64 over its encryption sectors.
pub struct Cipher {
    sector: u64,
    iv_tweak: u64,
    xts: Xts,
}

impl Cipher {
    pub fn new(h: &LuksHeader, key: &VolumeKey) -> Result<Cipher> {
        if let Some(why) = &h.unsupported {
            bail!("LUKS volume {}: bmr cannot decrypt it: {why}", h.uuid);
        }
        let k = &key.0;
        let half = k.len() / 2;
        let bad = || {
            anyhow::anyhow!(
                "LUKS volume {}: a {}-byte volume key is not AES-XTS's",
                h.uuid,
                k.len()
            )
        };
        let xts = match k.len() {
            32 => Xts::A128(Box::new(Xts128::new(
                aes::Aes128::new_from_slice(&k[..half]).map_err(|_| bad())?,
                aes::Aes128::new_from_slice(&k[half..]).map_err(|_| bad())?,
            ))),
            64 => Xts::A256(Box::new(Xts128::new(
                aes::Aes256::new_from_slice(&k[..half]).map_err(|_| bad())?,
                aes::Aes256::new_from_slice(&k[half..]).map_err(|_| bad())?,
            ))),
            _ => return Err(bad()),
        };
        Ok(Cipher {
            sector: u64::from(h.sector_size),
            iv_tweak: h.iv_tweak,
            xts,
        })
    }

    /// Decrypt `buf` in place: whole sectors, the first at byte `first` of the volume.
    pub fn decrypt(&self, buf: &mut [u8], first: u64) {
        for (i, s) in buf.chunks_mut(self.sector as usize).enumerate() {
            // plain64: the IV is the 512-byte sector number, whatever the encryption sector
            // size (dm-crypt without iv_large_sectors, as cryptsetup sets up LUKS).
            let iv = self.iv_tweak + (first + i as u64 * self.sector) / 512;
            let tweak = u128::from(iv).to_le_bytes();
            match &self.xts {
                Xts::A128(x) => x.decrypt_sector(s, tweak),
                Xts::A256(x) => x.decrypt_sector(s, tweak),
            }
        }
    }

    /// Read `buf` at byte `offset` of the volume through `read_raw` (ciphertext by volume
    /// offset), decrypting the whole sectors that cover it.
    pub fn read_with<E>(
        &self,
        buf: &mut [u8],
        offset: u64,
        mut read_raw: impl FnMut(&mut [u8], u64) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let end = offset + buf.len() as u64;
        let first = offset / self.sector * self.sector;
        let last = end.div_ceil(self.sector) * self.sector;
        if first == offset && last == end {
            read_raw(buf, first)?;
            self.decrypt(buf, first);
            return Ok(());
        }
        let mut tmp = vec![0u8; (last - first) as usize];
        read_raw(&mut tmp, first)?;
        self.decrypt(&mut tmp, first);
        let skip = (offset - first) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }
}

/// The plaintext of a LUKS volume's data segment, decrypted sector by sector from `raw`
/// (offsets relative to the partition's start). Offset 0 is the first byte of the volume.
pub struct Decrypt<'a> {
    raw: &'a dyn ReadAt,
    data_offset: u64,
    len: u64,
    cipher: Cipher,
}

impl<'a> Decrypt<'a> {
    pub fn new(
        raw: &'a dyn ReadAt,
        h: &LuksHeader,
        part_len: u64,
        key: &VolumeKey,
    ) -> Result<Decrypt<'a>> {
        Ok(Decrypt {
            raw,
            data_offset: h.data_offset,
            len: h.data_len(part_len),
            cipher: Cipher::new(h, key)?,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl ReadAt for Decrypt<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read beyond the end of the LUKS volume",
            ));
        }
        self.cipher.read_with(buf, offset, |b, o| {
            self.raw.read_at(b, self.data_offset + o)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1_header(cipher: &str, mode: &str, payload: u32) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[8..8 + cipher.len()].copy_from_slice(cipher.as_bytes());
        b[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
        b[104..108].copy_from_slice(&payload.to_be_bytes());
        b[168..172].copy_from_slice(b"abcd");
        b
    }

    #[test]
    fn luks1_fields() {
        let h = parse_v1(&v1_header("aes", "xts-plain64", 4096)).unwrap();
        assert_eq!(h.cipher, XTS);
        assert_eq!(h.data_offset, 2 << 20);
        assert_eq!(h.uuid, "abcd");
        assert!(h.unsupported.is_none());
        let h = parse_v1(&v1_header("aes", "cbc-essiv:sha256", 4096)).unwrap();
        assert!(h.unsupported.unwrap().contains("cbc-essiv"));
    }

    #[test]
    fn payload_outside_the_partition_is_refused() {
        let b = v1_header("aes", "xts-plain64", 1 << 20);
        let mut b = b;
        b.resize(4096 * 4, 0);
        let e = probe(&Bytes(b), 0, 4096 * 4).unwrap_err();
        assert!(format!("{e}").contains("outside the partition"), "{e}");
    }

    #[test]
    fn mutated_headers_never_panic() {
        let mut rng = 0x1234_5678_u64;
        let base = v1_header("aes", "xts-plain64", 8);
        for _ in 0..5000 {
            let mut b = base.clone();
            for _ in 0..4 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng % 600) as usize;
                b[i] = (rng >> 32) as u8;
            }
            // A LUKS2 header made of the same bytes: the checksum must refuse it, not panic.
            b[6..8].copy_from_slice(&(1 + (rng % 2) as u16).to_be_bytes());
            b[8..16].copy_from_slice(&16384u64.to_be_bytes());
            let mut img = b.clone();
            img.resize(65536, 0);
            let _ = probe(&Bytes(img), 0, 65536);
        }
    }
}
