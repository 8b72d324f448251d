#!/usr/bin/env bash
# Builds the quality benchmark's inputs (issue 8, part 1), everything cached under $D2C_CACHE/quality:
#   tasks/{train,samples,test}/<task>.jsonl + tasks.json   36 tasks in 9 families (bench/quality/tasks.py)
#   base-hf/                                                SmolLM2-135M rebuilt from the GGUF, checked against llama-server
#   peft/<task>/, adapters/<task>.gguf                      one LoRA per task (PEFT), converted by d2c-gguf convert (f16)
#   accuracy-{base,own}.json                                `d2c-gguf eval` on the test sets: base model, own adapters
#
#   scripts/quality-build.sh [--tasks a,b] [--steps N] [--batch N] [--lr X] ...   (options go to train.py)
#
# Idempotent and resumable: each step skips what already exists (delete a file to redo it).
# Seeds are fixed, so a rebuild makes the same tasks and the same adapters on the same machine.
# Python comes from $D2C_QUALITY_VENV (default: $D2C_CACHE/bench-venv, shared with scripts/bench-merge.sh),
# created with the pins of bench/quality/requirements.txt when it lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

CACHE="${D2C_CACHE:-$HOME/.cache/d2c-gguf}"
export D2C_CACHE="$CACHE"
VENV="${D2C_QUALITY_VENV:-$CACHE/bench-venv}"
REQ="$ROOT/bench/quality/requirements.txt"
PY="$VENV/bin/python"

[ -s "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" ] && [ -x "$CACHE/llama-server/llama-server" ] \
  || scripts/setup.sh

pins_ok() {
  "$PY" - "$REQ" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, want = line.split("==")
        assert version(name) == want, (name, version(name), want)
PYEOF
}
if ! pins_ok; then
  echo "quality-build: installing bench/quality/requirements.txt into $VENV (torch is large)" >&2
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
  pins_ok || { echo "quality-build: $VENV does not match $REQ" >&2; exit 1; }
fi

# Only `convert` is needed here, which any recent build has; build when missing.
[ -x target/release/d2c-gguf ] || cargo build -q --release --bin d2c-gguf

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT/bench/quality"
[ -s "$CACHE/quality/tasks/tasks.json" ] || "$PY" tasks.py
nice -n 5 "$PY" base_model.py all
nice -n 5 "$PY" train.py "$@"

# Per-task test accuracy (greedy, exact match, through llama.cpp) of the base and of every task's own
# adapter: the floor and the ceiling of the benchmark. Needs `d2c-gguf eval`.
Q="$CACHE/quality"
D2C="$ROOT/target/release/d2c-gguf"
if "$D2C" eval --help >/dev/null 2>&1; then
  for mode in base own; do
    out="$Q/accuracy-$mode.json"
    # Redone whenever an adapter is newer than the result.
    if [ -s "$out" ] && [ -z "$(find "$Q/adapters" -name '*.gguf' -newer "$out")" ]; then continue; fi
    args=(); [ "$mode" = own ] && args=(--adapters "$Q/adapters")
    echo "quality-build: evaluating the $mode model on $Q/tasks/test" >&2
    nice -n 5 "$D2C" eval --base "$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" --tests "$Q/tasks/test" \
      "${args[@]}" --threads 1 --max-tokens 16 --json > "$out.part"
    mv "$out.part" "$out"
  done
else
  echo "quality-build: this d2c-gguf has no eval command; skipped base/own accuracy" >&2
fi
"$PY" - <<'PYEOF'
import json
from common import ADAPTERS, PEFT, task_names
done = [t for t in task_names() if (ADAPTERS / f"{t}.gguf").is_file()]
print(f"quality-build: {len(done)}/{len(task_names())} adapters in {ADAPTERS}")
q = ADAPTERS.parent
for mode in ("base", "own"):
    p = q / f"accuracy-{mode}.json"
    if p.is_file():
        print(f"quality-build: {mode} mean test accuracy (llama.cpp) {json.loads(p.read_text())['mean_accuracy']:.1%} ({p})")
rows = [json.loads((PEFT / t / "train_meta.json").read_text()) for t in done if (PEFT / t / "train_meta.json").is_file()]
acc = [r["torch_sanity_accuracy"] for r in rows if r["torch_sanity_accuracy"] is not None]
if acc:
    print(f"quality-build: mean torch sanity accuracy {sum(acc) / len(acc):.1%} over {len(acc)} tasks")
PYEOF
