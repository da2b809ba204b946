//! The fuzz targets under plain `cargo test`: every seed (scripts/fuzz-seeds.sh, made with
//! real tools) and every minimized crash in fuzz/regressions/TARGET/ goes through the same
//! entry points the fuzzers use (src/fuzz.rs), then a few hundred seeded random mutations of
//! them per target. None may panic, and none may make the parser hold more than 256 MiB (a
//! per-thread count in this binary's allocator), so a fixed crash stays fixed and a parser
//! that starts trusting a size is caught without cargo-fuzz.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

/// Live and peak heap bytes of the current thread (each test runs in its own thread).
struct PerThread;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn count(grow: usize, shrink: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get().saturating_add(grow).saturating_sub(shrink);
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

unsafe impl GlobalAlloc for PerThread {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size(), 0);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size(), 0);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(0, l.size());
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new.saturating_sub(l.size()), l.size().saturating_sub(new));
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: PerThread = PerThread;

const LIMIT: usize = 256 << 20;
/// Mutations per target (11 targets: a few thousand in all); BMR_FUZZ_MUTATIONS for more.
fn mutations() -> u32 {
    std::env::var("BMR_FUZZ_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// xorshift64*: the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(8) {
        match rng.below(6) {
            _ if v.is_empty() => v.push(rng.next() as u8),
            0 => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            // Interesting values where sizes and counts live.
            2 => {
                let i = rng.below(v.len());
                let x = [0u64, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, u64::MAX][rng.below(7)];
                for (k, b) in x.to_le_bytes().iter().take(1 << rng.below(4)).enumerate() {
                    if let Some(t) = v.get_mut(i + k) {
                        *t = *b;
                    }
                }
            }
            3 => v.truncate(rng.below(v.len())),
            4 => {
                let (a, n) = (rng.below(v.len()), 1 + rng.below(64));
                let chunk: Vec<u8> = v[a..(a + n).min(v.len())].to_vec();
                let at = rng.below(v.len());
                v.splice(at..at, chunk);
            }
            _ => {
                let a = rng.below(v.len());
                v.drain(a..(a + 1 + rng.below(64)).min(v.len()));
            }
        }
    }
    v
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The generated seeds in fuzz/seeds (not committed): made once by scripts/fuzz-seeds.sh if
/// scripts/fuzz.sh or an earlier run has not made them.
fn seeds() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = root().join("fuzz/seeds");
        if !dir.join(".complete").exists() {
            common::sh(&format!(
                "BMR={} {}/scripts/fuzz-seeds.sh {}",
                env!("CARGO_BIN_EXE_bmr"),
                root().display(),
                dir.display()
            ));
        }
        dir
    })
    .clone()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Run `f` on `data`; a panic or more than LIMIT bytes held is a failure, described.
fn check(f: fn(&[u8]), data: &[u8], what: &str, failures: &mut Vec<String>) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let r = std::panic::catch_unwind(|| f(data));
    let peak = PEAK.with(Cell::get) - before;
    if r.is_err() {
        failures.push(format!("{what}: panicked"));
    } else if peak > LIMIT {
        failures.push(format!("{what}: held {} MiB", peak >> 20));
    }
}

fn replay(target: &str) {
    let f = bmr::fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no entry point for {target}"));
    let mut inputs = files(&seeds().join(target));
    assert!(!inputs.is_empty(), "no seeds for {target} in {:?}", seeds());
    inputs.extend(files(&root().join("fuzz/regressions").join(target)));
    let mut failures = Vec::new();
    let data: Vec<Vec<u8>> = inputs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for (p, d) in inputs.iter().zip(&data) {
        check(f, d, &p.display().to_string(), &mut failures);
    }
    let mut rng = Rng(0x0bad_5eed ^ (target.len() as u64 * 0x9e37_79b9));
    let keep = std::env::temp_dir().join(format!("bmr-fuzz-failed-{target}"));
    let current = std::env::temp_dir().join(format!("bmr-fuzz-current-{target}"));
    let rounds = mutations();
    for i in 0..rounds {
        let base = &data[rng.below(data.len())];
        let m = mutate(&mut rng, base);
        // An allocation the system refuses aborts the process: the input is kept here first.
        std::fs::write(&current, &m).unwrap();
        let n = failures.len();
        check(f, &m, &format!("{target} mutation {i}"), &mut failures);
        if failures.len() > n {
            std::fs::create_dir_all(&keep).unwrap();
            let p = keep.join(format!("mutation-{i}"));
            std::fs::write(&p, &m).unwrap();
            failures
                .last_mut()
                .unwrap()
                .push_str(&format!(" (input saved as {p:?})"));
        }
    }
    let _ = std::fs::remove_file(&current);
    assert!(
        failures.is_empty(),
        "{target}: {} of {} inputs failed:\n{}",
        failures.len(),
        data.len() + rounds as usize,
        failures.join("\n")
    );
    eprintln!(
        "{target}: {} seeds, {rounds} mutations, no failure",
        data.len()
    );
}

macro_rules! targets {
    ($($name:ident),*) => {
        $(#[test] fn $name() { replay(stringify!($name)); })*

        /// Every entry point has a test here, and every test an entry point and a fuzz target.
        #[test]
        fn every_target_is_replayed() {
            let mine = [$(stringify!($name)),*];
            let lib: Vec<&str> = bmr::fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
            assert_eq!(lib, mine);
            for t in mine {
                let p = root().join(format!("fuzz/fuzz_targets/{t}.rs"));
                let src = std::fs::read_to_string(&p).unwrap_or_default();
                assert!(src.contains(&format!("bmr::fuzz::{t})")), "{p:?}");
            }
        }
    };
}

targets!(
    manifest,
    host_index,
    chunk,
    chunk_index,
    toc,
    layout,
    ext,
    fat,
    xfs,
    btrfs,
    cmdline
);
