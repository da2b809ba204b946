//! The module structure docs/architecture.md describes, checked on the source: no import
//! circles between files, and no layer imports one above it (the repository layer never
//! reaches into restore, nothing below the rescue system imports it, no library layer
//! imports a command).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers from the bottom up; a module may import its own layer and the ones below.
const LAYERS: &[&[&str]] = &[
    &["util"],
    &["fs"],
    &["device"],
    &["repo"],
    &["fixup"],
    &["backup", "restore"],
    &["manage"],
    &["rescue"],
    &["cli", "fuzz"],
];

fn layer(top: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&top))
        .unwrap_or_else(|| panic!("module {top} is in no layer of tests/architecture.rs"))
}

/// Module path (`repo::chunk`) of every source file.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut todo = vec![src.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap();
            let mut parts: Vec<String> = rel
                .iter()
                .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                parts.clear();
            }
            out.insert(parts, p);
        }
    }
    out
}

/// The code of a file without comments, string contents and its trailing test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        let mut in_str = false;
        let mut prev = ' ';
        for c in line.chars() {
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                out.push(c);
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
        }
        out.push('\n');
    }
    out
}

/// Paths named after `crate::` or `super::` (groups in braces expanded), relative to the
/// crate root.
fn references(code: &str, me: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let rest = &code[i..];
        let (base, skip) = if rest.starts_with("crate::") && (i == 0 || !ident(b[i - 1])) {
            (Vec::new(), 7)
        } else if rest.starts_with("super::") && (i == 0 || !ident(b[i - 1])) {
            let mut base = me.to_vec();
            base.pop();
            (base, 7)
        } else {
            i += 1;
            continue;
        };
        let (paths, used) = parse_path(&code[i + skip..], base);
        out.extend(paths);
        i += skip + used.max(1);
    }
    out
}

/// Parse `a::b::{c, d::e}` after a `crate::`: every full path, and the bytes used.
fn parse_path(s: &str, mut base: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        if b.get(i) == Some(&b'{') {
            let mut depth = 0;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            let inner = &s[i + 1..j.min(s.len())];
            let mut out = Vec::new();
            let mut depth = 0;
            let mut start = 0;
            for (k, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.extend(parse_path(inner[start..k].trim(), base.clone()).0);
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            out.extend(parse_path(inner[start..].trim(), base.clone()).0);
            return (out, j + 1);
        }
        let end = s[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(s.len(), |n| i + n);
        let name = &s[i..end];
        if name == "self" {
            return (vec![base], end);
        }
        if !name.is_empty() {
            base.push(name.to_string());
        }
        if s[end..].starts_with("::") {
            i = end + 2;
        } else {
            return (vec![base], end);
        }
    }
}

/// The source file a path lives in: its longest prefix that is a module.
fn resolve(path: &[String], mods: &BTreeMap<Vec<String>, PathBuf>) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| mods.contains_key(p))
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let mut g = BTreeMap::new();
    for (m, file) in &mods {
        let text = std::fs::read_to_string(file).unwrap();
        let mut deps = BTreeSet::new();
        for r in references(&code(&text), m) {
            if let Some(t) = resolve(&r, &mods)
                // A module and the files below it form one unit (mod.rs re-exports, children
                // use what their mod.rs defines).
                && !t.starts_with(m)
                && !m.starts_with(&t)
            {
                deps.insert(t);
            }
        }
        g.insert(m.clone(), deps);
    }
    g
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_import_circles_between_files() {
    let g = graph();
    assert!(g.len() > 30, "found only {} modules", g.len());
    // Depth-first search for a back edge.
    fn visit(
        m: &Vec<String>,
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        state.insert(m.clone(), 1);
        stack.push(m.clone());
        for d in g.get(m).into_iter().flatten() {
            match state.get(d) {
                Some(1) => {
                    let i = stack.iter().position(|s| s == d).unwrap_or(0);
                    let mut c = stack[i..].to_vec();
                    c.push(d.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(d, g, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(m.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if !state.contains_key(m) {
            let mut stack = Vec::new();
            if let Some(c) = visit(m, &g, &mut state, &mut stack) {
                let c: Vec<String> = c.iter().map(|m| name(m)).collect();
                panic!("import circle: {}", c.join(" -> "));
            }
        }
    }
}

#[test]
fn layers_only_import_downwards() {
    let g = graph();
    let mut bad = Vec::new();
    for (m, deps) in &g {
        let Some(top) = m.first() else { continue };
        for d in deps {
            let Some(dtop) = d.first() else { continue };
            if dtop != top && layer(dtop) >= layer(top) {
                bad.push(format!("{} imports {}", name(m), name(d)));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the layers:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checker_sees_imports() {
    // The parser itself: grouped, nested and relative paths.
    let me = vec!["restore".to_string(), "plan".to_string()];
    let r = references(
        "use crate::repo::{chunk::{ChunkReader, Stored}, paths};\nuse super::blocks::Writer;\nlet x = crate::util::pool::for_each(1);",
        &me,
    );
    let r: Vec<String> = r.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        r,
        [
            "repo::chunk::ChunkReader",
            "repo::chunk::Stored",
            "repo::paths",
            "restore::blocks::Writer",
            "util::pool::for_each"
        ]
    );
    let g = graph();
    let plan = g
        .get(&vec!["restore".to_string(), "plan".to_string()])
        .expect("restore::plan is a module");
    assert!(plan.contains(&vec!["repo".to_string(), "snapshot".to_string()]));
}
