#!/usr/bin/env bash
# Runs every test on a fresh Debian/Ubuntu machine: installs what is missing (scripts/setup.sh),
# builds once in release (llama.cpp is compiled once per cargo profile), runs the workspace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup.sh | grep '^D2C_' | sed 's/^/export /')"
# One test at a time: llama.cpp already uses every core, and its spinning thread pools slow
# to a crawl when several tests oversubscribe the CPU.
cargo test --release --workspace --locked -- --test-threads=1 "$@"
