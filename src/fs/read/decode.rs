//! Decoders for extents a filesystem stores compressed (btrfs: zlib, LZO in btrfs's framing,
//! zstd). Bounded: never more than the caller's `out_len` bytes, an error (never a panic) on
//! garbage.

use std::io::Read;

use anyhow::{Context, Result, bail};

use super::Compression;

/// btrfs compresses at most 128 KiB of file data into one extent, and stores at most as much.
pub const MAX_ENCODED: u64 = 128 << 10;
/// The unit of btrfs's LZO framing: one segment per sector of input, and a segment header
/// never crosses a sector boundary. 4 KiB on every filesystem bmr reads.
const LZO_SECTOR: usize = 4096;
/// lzo1x_worst_compress(4096): what one compressed segment can take.
const LZO_MAX_SEGMENT: usize = LZO_SECTOR + LZO_SECTOR / 16 + 64 + 3;

/// Decode `input` into exactly `out_len` bytes: a stream that ends early is padded with zeros
/// (btrfs reads the rest of a compressed extent's last sector as zeros), decoding stops after
/// `out_len` bytes.
pub fn decode(c: Compression, input: &[u8], out_len: usize) -> Result<Vec<u8>> {
    if out_len as u64 > MAX_ENCODED {
        bail!("{out_len} bytes to decode, more than an encoded extent holds (damaged)");
    }
    let mut out = match c {
        Compression::Zlib => zlib(input, out_len)?,
        Compression::Zstd => {
            let d = zstd::stream::read::Decoder::with_buffer(input)
                .context("zstd decoder")?
                .single_frame();
            read_bounded(d, out_len).context("zstd data does not decode (damaged)")?
        }
        Compression::Lzo => lzo(input, out_len)?,
    };
    out.resize(out_len, 0);
    Ok(out)
}

/// A zlib stream: decoding stops when `out_len` bytes are out; short output is accepted only
/// from a stream that ended (flate2's reader would take a truncated one for a short one).
fn zlib(input: &[u8], out_len: usize) -> Result<Vec<u8>> {
    let mut d = flate2::Decompress::new(true);
    let mut out = vec![0u8; out_len];
    let status = d
        .decompress(input, &mut out, flate2::FlushDecompress::Finish)
        .context("zlib data does not decode (damaged)")?;
    let n = d.total_out() as usize;
    if n < out_len && status != flate2::Status::StreamEnd {
        bail!("zlib data ends after {n} bytes, inside its stream (damaged)");
    }
    out.truncate(n);
    Ok(out)
}

fn read_bounded(r: impl Read, out_len: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(out_len);
    r.take(out_len as u64).read_to_end(&mut out)?;
    Ok(out)
}

fn le32(b: &[u8], o: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?) as usize)
}

/// btrfs's LZO framing: a 4-byte little-endian total length (header included), then segments
/// of a 4-byte length and LZO1X data decoding to one sector (the last one to less); when fewer
/// than 4 bytes are left in a sector, the next header starts at the next sector.
fn lzo(input: &[u8], out_len: usize) -> Result<Vec<u8>> {
    let total = le32(input, 0).context("LZO data shorter than its header (damaged)")?;
    if total < 4 || total > input.len() {
        bail!(
            "LZO data says it is {total} bytes, {} are stored (damaged)",
            input.len()
        );
    }
    let mut out = Vec::with_capacity(out_len);
    let mut pos = 4;
    let mut seg = vec![0u8; LZO_SECTOR];
    while out.len() < out_len && pos < total {
        let left = LZO_SECTOR - pos % LZO_SECTOR;
        if left < 4 {
            pos += left;
            continue;
        }
        let Some(n) = le32(&input[..total], pos) else {
            bail!("LZO segment header past the end of the data (damaged)");
        };
        pos += 4;
        if n == 0 || n > LZO_MAX_SEGMENT || n > total - pos {
            bail!("LZO segment of {n} bytes at offset {pos} does not fit (damaged)");
        }
        let src = &input[pos..pos + n];
        pos += n;
        let got = lzo_segment(src, &mut seg).with_context(|| {
            format!(
                "LZO segment at offset {} does not decode (damaged)",
                pos - n
            )
        })?;
        out.extend_from_slice(&seg[..got]);
        let left = LZO_SECTOR - pos % LZO_SECTOR;
        if left < 4 {
            pos += left;
        }
    }
    out.truncate(out_len);
    Ok(out)
}

/// One LZO1X segment into `buf` (one sector); returns how many bytes it decodes to. The lzo1x
/// crate wants the exact output length: a full sector first (every segment but a stream's
/// last); else the length is found by decoding into two over-long buffers with different
/// fill bytes (the decoder writes its output and fails only at the end), and confirmed by an
/// exact decode.
fn lzo_segment(src: &[u8], buf: &mut [u8]) -> Result<usize> {
    if lzo1x::decompress(src, buf).is_ok() {
        return Ok(buf.len());
    }
    let mut a = vec![0x00u8; buf.len()];
    let mut b = vec![0xffu8; buf.len()];
    let _ = lzo1x::decompress(src, &mut a);
    let _ = lzo1x::decompress(src, &mut b);
    let n = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if n == 0 || n == buf.len() {
        bail!("invalid LZO1X data");
    }
    lzo1x::decompress(src, &mut buf[..n]).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// btrfs's LZO framing, written the way the kernel writes it.
    fn lzo_frame(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 4];
        for sector in data.chunks(LZO_SECTOR) {
            let left = LZO_SECTOR - out.len() % LZO_SECTOR;
            if left < 4 {
                out.resize(out.len() + left, 0);
            }
            let c = lzo1x::compress(sector, lzo1x::CompressLevel::default());
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        let n = out.len() as u32;
        out[..4].copy_from_slice(&n.to_le_bytes());
        out
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut s = 7u64;
        (0..len)
            .map(|i| {
                if i % 700 < 500 {
                    b"compressible text "[i % 18]
                } else {
                    rng(&mut s) as u8
                }
            })
            .collect()
    }

    #[test]
    fn round_trips() {
        for len in [1usize, 100, 4096, 4097, 10_000, 65_536, 131_072] {
            let data = sample(len);
            let z = {
                use std::io::Write;
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&data).unwrap();
                e.finish().unwrap()
            };
            let zs = zstd::encode_all(&data[..], 3).unwrap();
            let l = lzo_frame(&data);
            for (c, enc) in [
                (Compression::Zlib, &z),
                (Compression::Zstd, &zs),
                (Compression::Lzo, &l),
            ] {
                assert_eq!(decode(c, enc, len).unwrap(), data, "{c:?} {len}");
                // Shorter: a prefix; longer: zero padded (the extent's last sector).
                assert_eq!(decode(c, enc, len / 2).unwrap(), data[..len / 2], "{c:?}");
                let mut padded = data.clone();
                padded.resize(len + 100, 0);
                if len + 100 <= MAX_ENCODED as usize {
                    assert_eq!(decode(c, enc, len + 100).unwrap(), padded, "{c:?}");
                }
            }
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let data = sample(20_000);
        let good = [
            (Compression::Zstd, zstd::encode_all(&data[..], 3).unwrap()),
            (Compression::Lzo, lzo_frame(&data)),
        ];
        let mut errors = 0;
        for round in 0..3000 {
            let c = [Compression::Zlib, Compression::Lzo, Compression::Zstd][round % 3];
            let mut input: Vec<u8> = match round % 4 {
                // Pure noise.
                0 => (0..rng(&mut seed) % 5000)
                    .map(|_| rng(&mut seed) as u8)
                    .collect(),
                // A valid stream with flipped bytes.
                _ => good[round % 2].1.clone(),
            };
            let c = if round % 4 == 0 { c } else { good[round % 2].0 };
            for _ in 0..1 + rng(&mut seed) % 8 {
                if input.is_empty() {
                    break;
                }
                let i = (rng(&mut seed) as usize) % input.len();
                input[i] ^= 1 << (rng(&mut seed) % 8);
            }
            let want = (rng(&mut seed) % 40_000) as usize;
            match decode(c, &input, want) {
                Ok(v) => assert_eq!(v.len(), want),
                Err(_) => errors += 1,
            }
        }
        assert!(errors > 1000, "only {errors} errors");
        for c in [Compression::Zlib, Compression::Lzo, Compression::Zstd] {
            assert!(decode(c, &[], 10).is_err(), "{c:?}");
            assert!(decode(c, &[0xff; 64], 4096).is_err(), "{c:?}");
            assert!(decode(c, &[0; 8], (MAX_ENCODED + 1) as usize).is_err());
        }
        // An LZO total length beyond the data, and a segment longer than the rest.
        assert!(decode(Compression::Lzo, &[200, 0, 0, 0, 1, 0, 0, 0], 10).is_err());
        assert!(decode(Compression::Lzo, &[12, 0, 0, 0, 9, 0, 0, 0, 1, 2, 3, 4], 10).is_err());
    }
}
