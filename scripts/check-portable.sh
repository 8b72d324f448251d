#!/usr/bin/env bash
# Shows that the default release binary is portable: it runs on an x86-64 CPU without AVX,
# AVX2 or AVX-512, picking ggml's matching CPU variant at run time, and that the scorer's
# guarantee (any batching gives bit-identical scores) holds for the variant chosen there too.
#   1. natively: which CPU variant llama.cpp loads on this machine (its own log line);
#   2. under qemu-x86_64 -cpu MODEL (default Nehalem: SSE4.2, no AVX), the same binary, the
#      same command: which variant it loads, and the per-example NLL at two batch sizes
#      (must be identical) against the native run: each file's mean NLL must agree within TOL
#      nats/token (the variants sum in other orders; single examples move more, reported too).
#   scripts/check-portable.sh [MODEL] [TOL]      (about 13 minutes: qemu emulates every instruction)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-Nehalem}"
TOL="${2:-0.03}"
. scripts/setup-env.sh
d2c_setup_env
if ! command -v qemu-x86_64 >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-user >/dev/null; } \
    || { echo "check-portable: install qemu-user by hand" >&2; exit 1; }
fi
cargo build --release --locked --bin d2c-gguf
BIN=target/release/d2c-gguf
OUT=target/portable-check
mkdir -p "$OUT"
# Two short tasks keep the emulated run to minutes.
S=(scripts/demo-set/samples/arith-add.jsonl scripts/demo-set/samples/case-snake.jsonl)
A=scripts/demo-set/adapters/case-snake.gguf
score() {  # score LABEL BATCH [qemu args...]
  local label="$1" batch="$2"; shift 2
  D2C_LLAMA_LOG=1 "$@" "$BIN" score --base "$D2C_BASE_MODEL" --samples "${S[@]}" --adapter "$A" \
    --threads 2 --batch "$batch" --json >"$OUT/$label.json" 2>"$OUT/$label.log" \
    || { tail -20 "$OUT/$label.log" >&2; exit 1; }
  echo "$label: $(grep -o 'loaded CPU backend from [^ ]*' "$OUT/$label.log" | head -1)"
}
score native 256
score "qemu-$MODEL" 256 qemu-x86_64 -cpu "$MODEL"
score "qemu-$MODEL-batch7" 7 qemu-x86_64 -cpu "$MODEL"
grep -q "libggml-cpu-sse42\|libggml-cpu-x64" "$OUT/qemu-$MODEL.log" \
  || { echo "check-portable: under $MODEL llama.cpp did not pick a pre-AVX variant" >&2; exit 1; }

"$D2C_PYTHON" - "$OUT" "$MODEL" "$TOL" <<'PY'
import json, sys
out, model, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
def per_sample(label):
    r = json.load(open(f"{out}/{label}.json"))["results"]
    return [(x["adapter"], x["samples_file"], x["mean_nll"], [s["nll"] for s in x["per_sample"]]) for x in r]
nat, emu, emu7 = per_sample("native"), per_sample(f"qemu-{model}"), per_sample(f"qemu-{model}-batch7")
same = all(a[3] == b[3] for a, b in zip(emu, emu7))
file_diff = max(abs(a[2] - b[2]) for a, b in zip(nat, emu))
example_diff = max(abs(x - y) for a, b in zip(nat, emu) for x, y in zip(a[3], b[3]))
n = sum(len(a[3]) for a in nat)
print(f"{model}: batch 256 vs batch 7 bit-identical over {n} examples: {same}")
print(f"{model} vs native: largest difference of a file's mean NLL {file_diff:.4f} nats/token (tolerance {tol}); of one example's {example_diff:.4f}")
sys.exit(0 if same and file_diff <= tol else 1)
PY
