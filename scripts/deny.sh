#!/usr/bin/env bash
# Checks every dependency's license, duplicates and source with cargo-deny (deny.toml).
# Installs cargo-deny from crates.io when missing (a few minutes, once per machine).
# The RustSec advisories check needs the advisory database from GitHub, which the build
# machines cannot reach: it runs only where that works (`--advisories`).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "deny.sh: installing cargo-deny from crates.io"
    cargo install cargo-deny --locked --quiet
fi
checks=(licenses bans sources)
if [[ "${1:-}" == "--advisories" ]]; then
    checks+=(advisories)
fi
cargo deny check "${checks[@]}"
