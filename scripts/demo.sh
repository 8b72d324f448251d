#!/usr/bin/env bash
# The main job on a default that needs nothing from the user: installs what is missing, builds
# d2c-gguf, makes a small task set with known structure on SmolLM2-135M (3 prototype adapters,
# 3 noisy task copies of each, 10 examples per task decoded greedily under its prototype),
# then clusters the 9 task adapters into a budget of 3 with D2C and prints the report.
# Outputs land in $D2C_CACHE/demo (default ~/.cache/d2c-gguf/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
setup_out="$(mktemp)"
bash scripts/setup.sh > "$setup_out"   # fails the script if setup fails
eval "$(grep '^D2C_' "$setup_out" | sed 's/^/export /')"
rm -f "$setup_out"
cargo build --release --locked --bin d2c-gguf
BIN=target/release/d2c-gguf
DEMO="$D2C_CACHE/demo"
SET="$DEMO/tasks-v1"
if [ ! -f "$SET/.complete" ]; then
  rm -rf "$SET"
  "$BIN" synth-tasks --base "$D2C_BASE_MODEL" --out "$SET" --groups 3 --tasks-per-group 3 --examples 10 --seed 7
  touch "$SET/.complete"
fi
echo "== inspect one task adapter"
"$BIN" inspect "$SET/adapters/g0-t0.gguf" | sed -n 1,6p   # sed reads to the end: no SIGPIPE under pipefail
echo "== validate all task adapters against the base"
"$BIN" validate --base "$D2C_BASE_MODEL" "$SET"/adapters/*.gguf
echo "== merge 9 task adapters into 3 (D2C)"
"$BIN" merge --base "$D2C_BASE_MODEL" --adapters "$SET/adapters" --samples "$SET/samples" \
  --budget 3 --out "$DEMO/merged" --force --cache "$DEMO/score-cache" "$@"
echo
echo "manifest: $DEMO/merged/manifest.json  (report again: $BIN report $DEMO/merged/manifest.json)"
