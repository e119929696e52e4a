#!/usr/bin/env bash
# Runs the end-to-end tests against a LeakSanitizer build of `comet` and fails if any
# node or monitor process reports a leak when it exits.
#   bash scripts/leak-check.sh [TEST ...]     (default: every test file but the long
#                                              chaos and soak ones, whose memory bounds
#                                              assume the production allocator)
# The sanitizer needs nightly compiler flags; RUSTC_BOOTSTRAP=1 enables them on the
# stable toolchain. mimalloc is left out so that every allocation goes through malloc,
# where the leak detector sees it. Processes a test SIGKILLs report nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$(rustc -vV | sed -n 's/^host: //p')"
tests=("$@")
if ((${#tests[@]} == 0)); then
    tests=(connect push rpc operations protocols examples cluster restart reliability recovery)
fi
RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=leak -Cforce-frame-pointers=yes" \
    cargo build --locked --bin comet --no-default-features --target "$target" --target-dir target/lsan
reports="$(mktemp -d)"
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
COMET_BIN="$PWD/target/lsan/$target/debug/comet" \
LSAN_OPTIONS="log_path=$reports/lsan:fast_unwind_on_malloc=0" \
    cargo test --locked "${args[@]}"
if compgen -G "$reports/lsan.*" >/dev/null; then
    cat "$reports"/lsan.*
    echo "LeakSanitizer found leaks (reports above, in $reports)" >&2
    exit 1
fi
echo "LeakSanitizer: no leaks in ${#tests[@]} test files"
