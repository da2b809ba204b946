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
    let pieces: Vec<String> = escaped(p).collect();
    let total: usize = pieces.iter().map(|x| x.chars().count()).sum();
    if total <= MAX_SHOWN - 2 {
        return format!("\"{}\"", pieces.concat());
    }
    let half = (MAX_SHOWN - 3) / 2;
    fn take<'a>(it: impl Iterator<Item = &'a String>, half: usize) -> Vec<&'a str> {
        let mut n = 0;
        let mut kept = Vec::new();
        for x in it {
            n += x.chars().count();
            if n > half {
                break;
            }
            kept.push(x.as_str());
        }
        kept
    }
    let head = take(pieces.iter(), half).concat();
    let mut tail = take(pieces.iter().rev(), half);
    tail.reverse();
    format!("\"{head}…{}\"", tail.concat())
}

/// The escaped form of `p`, one piece per character or escaped byte.
fn escaped(p: &[u8]) -> impl Iterator<Item = String> + '_ {
    p.utf8_chunks().flat_map(|c| {
        let valid = c.valid().chars().map(|ch| match ch {
            '"' => "\\\"".to_string(),
            '\\' => "\\\\".to_string(),
            '\n' => "\\n".to_string(),
            '\t' => "\\t".to_string(),
            '\r' => "\\r".to_string(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        });
        let invalid = c.invalid().iter().map(|b| format!("\\x{b:02x}"));
        valid.chain(invalid)
    })
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
        assert!(s.trim_matches('"').split('…').all(|h| h.len() % 4 == 0), "{s}");
    }
}
