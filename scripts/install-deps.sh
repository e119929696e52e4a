#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and run Comet, and with --test
# what the test suite needs too (etcd, Redis clients, Chromium, PHP, ...).
# Idempotent: installs only missing packages. Uses sudo when not root.
#   bash scripts/install-deps.sh          # build and run (make run)
#   bash scripts/install-deps.sh --test   # and test (make test, CI)
set -euo pipefail

with_tests=false
[[ "${1:-}" == "--test" ]] && with_tests=true

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)   # etcd-client's build
# protoc's well-known types (descriptor.proto, struct.proto): only a "Recommends" of
# protobuf-compiler, so --no-install-recommends would leave etcd-client unbuildable.
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || need+=(libprotobuf-dev)
command -v cc >/dev/null 2>&1 || need+=(build-essential)         # mimalloc's C code
command -v nc >/dev/null 2>&1 || need+=(netcat-openbsd)          # README quickstart
if $with_tests; then
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)           # tests: a real etcd
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)         # tests: descriptor limits
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)      # tests: stock Redis clients
[[ -x /usr/bin/python3 ]] || need+=(python3)                     # tests: example signer
/usr/bin/python3 -c 'import redis' >/dev/null 2>&1 || need+=(python3-redis)
command -v npm >/dev/null 2>&1 || need+=(npm)                    # tests: ioredis, node-redis
/usr/bin/python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)  # tests: redis-py, coredis
command -v chromium >/dev/null 2>&1 || need+=(chromium)          # tests: the browser example
command -v php >/dev/null 2>&1 || need+=(php-cli)                # tests: the PHP token signer
command -v openssl >/dev/null 2>&1 || need+=(openssl)            # tests: public-key tokens (tests/tokens.rs)
command -v curl >/dev/null 2>&1 || need+=(curl)                  # tests: curl -N on the event stream (tests/sse.rs)
command -v ip >/dev/null 2>&1 || need+=(iproute2)                # tests: network namespaces (tests/partition.rs)
[[ -x /bin/kill || -x /usr/bin/kill ]] || need+=(procps)         # tests: signals to the node
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)    # tests: the unit's security rating
fi

if ((${#need[@]})); then
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
    echo "installing: ${need[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi
