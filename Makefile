# The two set-up commands of README.md: `make run` and `make test`.
.PHONY: deps test-deps run test check lint bench

## What building and running needs (protoc and its well-known types, a C compiler).
deps:
	bash scripts/install-deps.sh

## And what the tests need (etcd, Redis clients, Chromium, PHP, ...).
test-deps:
	bash scripts/install-deps.sh --test

## Build and run a node on the embedded default (standalone, no etcd, no message server).
run: deps
	cargo run --release --locked --bin comet

## Run the whole test suite (unit tests and end-to-end tests against the real binary).
## --show-output prints the figures the chaos and soak tests measure.
test: test-deps
	cargo test --locked -- --show-output

## The edit-test loop (about 2 minutes): lint, unit tests, and the fast end-to-end
## files. `make test` runs everything (about 15 minutes, 5 of them the soak).
FAST_TESTS = cli conformance connect dashboard examples logging protocols push rpc watchdog
check: test-deps lint
	cargo test --locked --lib
	cargo test --locked $(addprefix --test ,$(FAST_TESTS))

lint:
	cargo fmt --all --check
	cargo clippy --locked --workspace --all-targets -- -D warnings

## A short benchmark suite (a few minutes): results in bench/results, report in bench/RESULTS.md;
## then Comet, the floor and Bun (npm package `bun`, into target/bun) side by side.
bench: test-deps
	cargo build --release --locked --workspace
	./target/release/comet-bench run --n 19000 --churn 20000
	npm install --prefix target/bun --no-save bun || echo "bun did not install: compare skips it"
	./target/release/comet-bench compare --n 19000
