#!/bin/bash
# Run the fuzz targets (fuzz/fuzz_targets, entry points in src/fuzz.rs) for a bounded time
# each; fails if any input crashes a parser, hangs it, or makes it take more than 256 MiB.
# docs/testing.md explains the targets, the long runs and what to do with a crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      default: 20 s each, every target
#
# Environment: BMR_CARGO_FUZZ_ROOT  where cargo-fuzz is installed once and reused
#                                   (default /var/cache/bmr-ci/cargo-fuzz)
#              BMR_FUZZ_TARGET_DIR  build directory (default $CARGO_TARGET_DIR/fuzz)
#              BMR_FUZZ_ARGS        more libFuzzer options, e.g. "-fork=2"
# Corpora grow in fuzz/corpus/TARGET (kept between runs, not committed), starting from the
# generated seeds (fuzz/seeds, scripts/fuzz-seeds.sh) and the committed fuzz/regressions.
# A crashing input is left in fuzz/artifacts/TARGET/ (crash-*, oom-*, timeout-*).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${1:-20}
shift || true
all=1
if (($#)); then
    targets=("$@")
    all=0
else
    mapfile -t targets < <(ls fuzz/fuzz_targets | sed 's/\.rs$//')
fi

# cargo-fuzz from crates.io, built once per machine outside the repository. It drives the
# stable toolchain: RUSTC_BOOTSTRAP lets stable take the -Z flags it passes (sanitizer
# coverage), so no nightly toolchain is needed.
fuzz_root=${BMR_CARGO_FUZZ_ROOT:-/var/cache/bmr-ci/cargo-fuzz}
if ! [ -x "$fuzz_root/bin/cargo-fuzz" ]; then
    echo "fuzz: installing cargo-fuzz into $fuzz_root" >&2
    CARGO_TARGET_DIR=$(mktemp -d) cargo install cargo-fuzz --version 0.13.2 --locked \
        --root "$fuzz_root" --quiet
fi
export PATH="$fuzz_root/bin:$PATH"
export RUSTC_BOOTSTRAP=1
tdir=${BMR_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}/fuzz}

if ! [ -e fuzz/seeds/.complete ]; then
    cargo build --release --quiet
    scripts/fuzz-seeds.sh fuzz/seeds >/dev/null
fi

# Release build as shipped (-O: no overflow checks, like the rescue binary); no sanitizer
# (the code is safe Rust; the capped allocator in fuzz/src/lib.rs bounds memory).
build=(-O -s none --target-dir "$tdir")
if ((all)); then
    cargo fuzz build "${build[@]}"
else
    for t in "${targets[@]}"; do cargo fuzz build "${build[@]}" "$t"; done
fi

failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "fuzz/logs"
    dirs=("fuzz/corpus/$t")
    for d in "fuzz/seeds/$t" "fuzz/regressions/$t"; do [ -d "$d" ] && dirs+=("$d"); done
    log=fuzz/logs/$t.log
    # -rss_limit_mb is a backstop for what the allocator cannot see (libFuzzer's own corpus).
    # shellcheck disable=SC2086
    if cargo fuzz run "${build[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=25 -rss_limit_mb=2048 \
        -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 ${BMR_FUZZ_ARGS:-} \
        >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        echo "fuzz: $t: ${runs:-?} inputs in ${secs}s, no crash"
    else
        failed+=("$t")
        echo "fuzz: $t FAILED; last lines of $log:" >&2
        grep -v '^#' "$log" | tail -25 >&2
        echo "fuzz: the input is in fuzz/artifacts/$t/: reproduce with" >&2
        echo "  RUSTC_BOOTSTRAP=1 cargo fuzz run ${build[*]} $t fuzz/artifacts/$t/FILE" >&2
        echo "  then minimize (cargo fuzz tmin), add it to fuzz/regressions/$t/ and fix the parser" >&2
    fi
done
if ((${#failed[@]})); then
    echo "fuzz: failed: ${failed[*]}" >&2
    exit 1
fi
