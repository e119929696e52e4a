# The two set-up commands of README.md: `make run` and `make test`.
.PHONY: deps run test lint

deps:
	bash scripts/install-deps.sh

## Build and run a node on the embedded default (standalone, no etcd, no message server).
run: deps
	cargo run --release --locked --bin comet

## Run the whole test suite (unit tests and end-to-end tests against the real binary).
test: deps
	cargo test --locked

lint:
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings
