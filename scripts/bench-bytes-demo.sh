#!/usr/bin/env bash
# Quality per byte on the demo set (4 real PEFT adapters, 40 held-out tests each): every task's
# own adapter cut to 1/F of the bytes (truncate, truncate-energy), the allocator (sizes chosen on
# the examples, merging only where nothing else fits) and merging at about the same bytes (d2c at
# K = 2 and 1). A quick look, not the 36-task benchmark
# (bench/quality/sweep.py run --strategies truncate,truncate-energy --fractions ... is that).
#   scripts/bench-bytes-demo.sh [F,F,...]          (default 2,4,8,16,32,64; about 15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
FRACS="${1:-2,4,8,16,32,64}"
. scripts/setup-env.sh
d2c_setup_env
cargo build -q --release --locked --bin d2c-gguf
BIN=target/release/d2c-gguf
SET=scripts/demo-set
OUT="$D2C_CACHE/bench-bytes-demo"
mkdir -p "$OUT"
input=$(cat "$SET"/adapters/*.gguf | wc -c)
row() {  # row LABEL EVAL-ARGS...   (EVAL_KEY: what was evaluated; the same key reuses the result)
  local label="$1"; shift
  local t=$SECONDS
  if [ -z "${EVAL_KEY:-}" ] || [ "$(cat "$OUT/$label.eval.key" 2>/dev/null)" != "$EVAL_KEY" ] || [ ! -s "$OUT/$label.eval.json" ]; then
    "$BIN" eval --base "$D2C_BASE_MODEL" --tests "$SET/test" --max-tokens 12 --json "$@" >"$OUT/$label.eval.json.part"
    mv "$OUT/$label.eval.json.part" "$OUT/$label.eval.json"
    if [ -n "${EVAL_KEY:-}" ]; then printf '%s' "$EVAL_KEY" >"$OUT/$label.eval.key"; fi
  fi
  "$D2C_PYTHON" - "$OUT/$label.eval.json" "$OUT/own.eval.json" "$label" "${bytes:-$input}" "$input" "${merge_s:-0}" "$((SECONDS - t))" <<'PY'
import json, sys
ev, own = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
label, nbytes, total, merge_s, eval_s = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7]
# As sweep.py's normalised score: accuracy / own accuracy per task (not capped), averaged.
norm = [t["accuracy"] / own["tasks"][k]["accuracy"] for k, t in ev["tasks"].items() if own["tasks"][k]["accuracy"] > 0]
acc = " | ".join(f"{t['correct']}/{t['total']}" for t in ev["tasks"].values())
print(f"| {label} | {nbytes / total:.3f} | {acc} | {ev['mean_accuracy']:.3f} | {sum(norm) / len(norm):.3f} | {merge_s} s |")
PY
}
echo "| stored | byte fraction | $(ls "$SET/test" | sed 's/.jsonl//' | paste -sd'|' | sed 's/|/ | /g') | mean accuracy | normalised | merge time |"
echo "|---|---|---|---|---|---|---|---|---|"
bytes=$input merge_s=0 row own --adapters "$SET/adapters"
merged() {  # merged LABEL MERGE-ARGS...
  local label="$1"; shift
  local t=$SECONDS
  "$BIN" merge --base "$D2C_BASE_MODEL" --adapters "$SET/adapters" --samples "$SET/samples" \
    --out "$OUT/$label" --force --cache "$OUT/score-cache" "$@" >/dev/null 2>"$OUT/$label.err" || return 1
  merge_s=$((SECONDS - t))
  bytes=$("$D2C_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["storage"]["bytes"])' "$OUT/$label/manifest.json")
  # The held-out result depends only on the shipped bytes and which task uses which file.
  EVAL_KEY=$("$D2C_PYTHON" -c 'import json,sys; m=json.load(open(sys.argv[1])); print(json.dumps([[a["blake3"] for a in m["adapters"]], m["tasks"]]))' "$OUT/$label/manifest.json") \
    row "$label" --manifest "$OUT/$label/manifest.json"
}
for f in ${FRACS//,/ }; do
  for s in truncate truncate-energy allocate; do
    merged "$s-1of$f" --strategy "$s" --budget-bytes $((input / f)) || echo "| $s-1of$f | does not fit: $(tail -1 "$OUT/$s-1of$f.err") |"
  done
done
merged d2c-K2 --budget 2
merged d2c-K1 --budget 1
bytes=0 merge_s=0 row base
