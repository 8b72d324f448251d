#!/usr/bin/env bash
# Conversion time and peak memory: `d2c-gguf convert` against llama.cpp's convert_lora_to_gguf.py,
# side by side on a 1B-class PEFT adapter (Llama-3.2-1B shape, rank 16 on all 7 projections).
# See scripts/bench_convert.py. Inputs are made once under ~/.cache/d2c-gguf/convert-bench (about
# 4 GB while being made, 1.6 GB kept: the Q8_0 base GGUF whose header our converter reads).
#
# Python: torch, peft and transformers from ~/.cache/d2c-gguf/convert-venv (made by
# scripts/make-convert-fixtures.sh) unless PYTHON is set. Usage: scripts/bench-convert.sh [--dtype f16] [--runs N]
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${D2C_CACHE:-$HOME/.cache/d2c-gguf}"
sdist_version="0.3.36"
llama_cpp="$cache/convert-work/llama_cpp_python-$sdist_version/vendor/llama.cpp"
PYTHON="${PYTHON:-$cache/convert-venv/bin/python}"
if [[ ! -x "$PYTHON" || ! -f "$llama_cpp/convert_lora_to_gguf.py" ]]; then
    echo "missing Python with torch/peft or llama.cpp's converter: run scripts/make-convert-fixtures.sh first (or set PYTHON)" >&2
    exit 1
fi
(cd "$repo" && cargo build --release --quiet --bin d2c-gguf)
"$PYTHON" "$repo/scripts/bench_convert.py" --d2c "$repo/target/release/d2c-gguf" --llama-cpp "$llama_cpp" \
    --work "$cache/convert-bench" "$@"
