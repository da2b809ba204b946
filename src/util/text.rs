//! Paths and names from file lists and filesystems, made fit for one line of an error or a
//! warning: control bytes and invalid UTF-8 escaped, long ones cut in the middle.

/// Longest result of [`elide_path`], in characters (about two terminal lines).
pub const MAX_SHOWN: usize = 200;

/// `p` quoted for a message: printable UTF-8 as is, `"` and `\` and control characters and
/// bytes that are not UTF-8 escaped (`\n`, `\x1b`, `\xff`), and when longer than
/// [`MAX_SHOWN`] characters its start and end with `…` between, so a 100,000-level deep path
/// still gives a readable line. The root directory (empty) shows as `/`.
pub fn elide_path(p: &[u8]) -> String {
    if p.is_empty() {
        return "\"/\"".into();
    }
    if p.len() <= MAX_SHOWN - 2
        && p.iter()
            .all(|&b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        // The common case, without the work below.
        return format!("\"{}\"", String::from_utf8_lossy(p));
    }
    // A piece becomes at most 10 characters, and takes at least one byte: only this many bytes
    // at either end can be shown.
    let window = MAX_SHOWN * 4;
    let half = (MAX_SHOWN - 3) / 2;
    if p.len() <= 2 * window {
        let (text, ends) = escaped(p);
        if ends.len() <= MAX_SHOWN - 2 && text.chars().count() <= MAX_SHOWN - 2 {
            return format!("\"{text}\"");
        }
        return format!(
            "\"{}…{}\"",
            head(&text, &ends, half),
            tail(&text, &ends, half)
        );
    }
    let (ht, he) = escaped(&p[..window]);
    let (tt, te) = escaped(&p[p.len() - window..]);
    format!("\"{}…{}\"", head(&ht, &he, half), tail(&tt, &te, half))
}

/// The escaped form of `p`, and where each piece (a character or an escape) ends in it.
fn escaped(p: &[u8]) -> (String, Vec<usize>) {
    use std::fmt::Write;
    let mut out = String::with_capacity(p.len());
    let mut ends = Vec::with_capacity(p.len());
    for c in p.utf8_chunks() {
        for ch in c.valid().chars() {
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => {
                    let _ = write!(out, "{}", c.escape_unicode());
                }
                c => out.push(c),
            }
            ends.push(out.len());
        }
        for b in c.invalid() {
            let _ = write!(out, "\\x{b:02x}");
            ends.push(out.len());
        }
    }
    (out, ends)
}

/// The longest run of whole pieces from the start of `text` within `max` characters.
fn head<'a>(text: &'a str, ends: &[usize], max: usize) -> &'a str {
    let (mut cut, mut n) = (0, 0);
    for &e in ends {
        n += text[cut..e].chars().count();
        if n > max {
            break;
        }
        cut = e;
    }
    &text[..cut]
}

/// The longest run of whole pieces at the end of `text` within `max` characters.
fn tail<'a>(text: &'a str, ends: &[usize], max: usize) -> &'a str {
    let (mut cut, mut n) = (text.len(), 0);
    // A piece starts where the one before ends.
    for &s in std::iter::once(&0).chain(ends.iter()).rev().skip(1) {
        n += text[s..cut].chars().count();
        if n > max {
            break;
        }
        cut = s;
    }
    &text[cut..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_paths_are_quoted_and_escaped() {
        assert_eq!(elide_path(b"etc/fstab"), "\"etc/fstab\"");
        assert_eq!(elide_path(b""), "\"/\"");
        assert_eq!(
            elide_path(b"a\nb\x1b[31m\xff\"c"),
            "\"a\\nb\\u{1b}[31m\\xff\\\"c\""
        );
        assert_eq!(elide_path("grüße".as_bytes()), "\"grüße\"");
    }

    #[test]
    fn long_paths_keep_start_and_end() {
        let mut deep = b"start/".to_vec();
        for _ in 0..100_000 {
            deep.extend_from_slice(b"d/");
        }
        deep.extend_from_slice(b"the-end\n");
        let s = elide_path(&deep);
        assert!(s.chars().count() <= MAX_SHOWN, "{}", s.len());
        assert!(s.starts_with("\"start/d/"), "{s}");
        assert!(s.ends_with("d/the-end\\n\""), "{s}");
        assert!(s.contains('…'));
        // Exactly at the limit: nothing cut.
        let edge = vec![b'x'; MAX_SHOWN - 2];
        assert!(!elide_path(&edge).contains('…'));
        assert!(elide_path(&[b'x'; MAX_SHOWN]).contains('…'));
        // Escapes are never cut in half.
        let bin = vec![0xffu8; 1000];
        let s = elide_path(&bin);
        assert!(
            s.trim_matches('"').split('…').all(|h| h.len() % 4 == 0),
            "{s}"
        );
    }
}
