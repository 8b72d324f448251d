#!/usr/bin/env bash
# Runs every test on a fresh Debian/Ubuntu machine: installs what is missing (scripts/setup.sh),
# builds once in release (llama.cpp is compiled once per cargo profile), runs the workspace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
setup_out="$(mktemp)"
bash scripts/setup.sh > "$setup_out"   # fails the script if setup fails
eval "$(grep '^D2C_' "$setup_out" | sed 's/^/export /')"
rm -f "$setup_out"
# Formatting first (rustfmt.toml): a cheap check that fails before the long build.
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all --check
else
  echo "test: rustfmt is not installed (rustup component add rustfmt); formatting not checked" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --release --workspace --all-targets --locked -- -D warnings
else
  echo "test: clippy is not installed (rustup component add clippy); lints not checked" >&2
fi
# One test at a time: llama.cpp already uses every core, and its spinning thread pools slow
# to a crawl when several tests oversubscribe the CPU.
cargo test --release --workspace --locked -- --test-threads=1 "$@"
