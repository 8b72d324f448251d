#!/usr/bin/env bash
# The main job on a default that needs nothing from the user: installs what is missing, builds
# d2c-gguf, then merges the four real task adapters of scripts/demo-set (SmolLM2-135M, trained
# with PEFT: two arithmetic tasks, two string-casing tasks) into a budget of 2 with D2C, prints
# the report, and checks the result on the held-out tests: accuracy under each task's own
# adapter, under the merged adapter the manifest gives it, and under the base model; then fits
# the same tasks into an eighth of their bytes (the allocator) and checks that too.
# Outputs land in $D2C_CACHE/demo (default ~/.cache/d2c-gguf/demo). Extra arguments go to merge.
set -euo pipefail
cd "$(dirname "$0")/.."
setup_out="$(mktemp)"
bash scripts/setup.sh > "$setup_out"   # fails the script if setup fails
eval "$(grep '^D2C_' "$setup_out" | sed 's/^/export /')"
rm -f "$setup_out"
cargo build --release --locked --bin d2c-gguf
BIN=target/release/d2c-gguf
SET=scripts/demo-set
DEMO="$D2C_CACHE/demo"
echo "== inspect one task adapter"
"$BIN" inspect "$SET/adapters/case-snake.gguf" | sed -n 1,4p   # sed reads to the end: no SIGPIPE under pipefail
echo "== validate all task adapters against the base"
"$BIN" validate --base "$D2C_BASE_MODEL" "$SET"/adapters/*.gguf
echo "== merge 4 task adapters into 2 (D2C)"
"$BIN" merge --base "$D2C_BASE_MODEL" --adapters "$SET/adapters" --samples "$SET/samples" \
  --budget 2 --out "$DEMO/merged" --force --cache "$DEMO/score-cache" "$@"
for mode in own merged base; do
  case $mode in
    own) args=(--adapters "$SET/adapters") ;;
    merged) args=(--manifest "$DEMO/merged/manifest.json") ;;
    base) args=() ;;
  esac
  echo "== held-out exact match, $mode"
  "$BIN" eval --base "$D2C_BASE_MODEL" --tests "$SET/test" --max-tokens 12 "${args[@]}"
done
# The product's main mode: a budget in bytes. Every task keeps its own adapter, made smaller
# where its examples say that costs nothing; merging only where nothing else fits.
input_bytes=$(cat "$SET"/adapters/*.gguf | wc -c)
echo "== fit the 4 task adapters into an eighth of their bytes ($((input_bytes / 8)) of $input_bytes; allocator)"
"$BIN" merge --base "$D2C_BASE_MODEL" --adapters "$SET/adapters" --samples "$SET/samples" \
  --budget-bytes $((input_bytes / 8)) --out "$DEMO/eighth" --force --cache "$DEMO/score-cache"
echo "== held-out exact match, an eighth of the bytes"
"$BIN" eval --base "$D2C_BASE_MODEL" --tests "$SET/test" --max-tokens 12 --manifest "$DEMO/eighth/manifest.json"
echo
echo "manifests: $DEMO/merged/manifest.json, $DEMO/eighth/manifest.json  (report again: $BIN report MANIFEST)"
