#!/usr/bin/env bash
# Copies the default demo set (scripts/demo-set/) out of the quality benchmark's build
# ($D2C_CACHE/quality, made by scripts/quality-build.sh): four real PEFT-trained task adapters
# on SmolLM2-135M in two families (arithmetic, string casing), converted to f16 GGUF, with each
# task's 10 clustering examples and 40 held-out tests. Rerun after a rebuild to refresh it.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${D2C_CACHE:-$HOME/.cache/d2c-gguf}"
Q="$CACHE/quality"
TASKS=(arith-add arith-mul case-kebab case-snake)
OUT=scripts/demo-set
for t in "${TASKS[@]}"; do
  for f in "$Q/adapters/$t.gguf" "$Q/tasks/samples/$t.jsonl" "$Q/tasks/test/$t.jsonl"; do
    [ -s "$f" ] || { echo "make-demo-set: missing $f (run scripts/quality-build.sh)" >&2; exit 1; }
  done
done
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp/adapters" "$OUT.tmp/samples" "$OUT.tmp/test"
for t in "${TASKS[@]}"; do
  cp "$Q/adapters/$t.gguf" "$OUT.tmp/adapters/"
  cp "$Q/tasks/samples/$t.jsonl" "$OUT.tmp/samples/"
  cp "$Q/tasks/test/$t.jsonl" "$OUT.tmp/test/"
done
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
du -sh "$OUT"
