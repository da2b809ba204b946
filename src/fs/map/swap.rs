//! Linux swap (mkswap's v1 header): only the header page is in use. Writing it back gives the
//! area exactly what `mkswap -U UUID -L LABEL` would (the UUID and label the restored system's
//! fstab and resume= name, the size), and the swapped-out pages are of no use after a restore.

use crate::fs::read::ReadAt;

use anyhow::Result;

use super::{FsInfo, UsedMap, le32, uuid_text};

/// Page sizes mkswap may have used: the signature ends the header page.
const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];

/// The header of a swap area in [offset, offset+len) of `dev`, if it is one.
pub fn probe(dev: &dyn ReadAt, offset: u64, len: u64) -> Result<Option<FsInfo>> {
    for ps in PAGE_SIZES {
        if len < 2 * ps {
            break;
        }
        let mut sig = [0u8; 10];
        if dev.read_at(&mut sig, offset + ps - 10).is_err() {
            return Ok(None);
        }
        if &sig != b"SWAPSPACE2" {
            continue;
        }
        let mut h = vec![0u8; 1024 + 64];
        dev.read_at(&mut h, offset)?;
        // Version 1 is the only one Linux has written since 2.2.
        if le32(&h, 1024) != 1 {
            return Ok(None);
        }
        let label: Vec<u8> = h[1052..1068]
            .iter()
            .copied()
            .take_while(|&b| b != 0)
            .collect();
        let mut used = UsedMap::new(ps, len);
        used.mark_range(0, ps);
        return Ok(Some(FsInfo {
            fstype: "swap".into(),
            variant: None,
            uuid: Some(uuid_text(&h[1036..1052])),
            label: (!label.is_empty()).then(|| String::from_utf8_lossy(&label).into_owned()),
            block_size: ps,
            used,
            warnings: Vec::new(),
        }));
    }
    Ok(None)
}
