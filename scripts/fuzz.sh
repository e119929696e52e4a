#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time; a crash fails the run
# and leaves its input in fuzz/artifacts/<target>/ (turn it into a regression test).
# fuzz/seeds/<target>/, where present, holds well-formed inputs (an upgrade request, a
# frame sequence) the run starts from, so that a short run gets past the first parse.
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]
# cargo fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 enables them on the stable
# toolchain this project builds with.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-30}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
log="$(mktemp)"
for target in $(cargo fuzz list); do
    echo "fuzzing $target for ${seconds}s"
    corpora=("corpus/$target")
    mkdir -p "corpus/$target"
    [ -d "seeds/$target" ] && corpora+=("seeds/$target")
    if ! cargo fuzz run "$target" "${corpora[@]}" -- -max_total_time="$seconds" >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz target $target found a crash" >&2
        exit 1
    fi
    grep -E "^Done" "$log" || true
done
