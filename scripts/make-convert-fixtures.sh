#!/usr/bin/env bash
# Rebuilds tests/fixtures/convert/: tiny random HF models of every supported family, their GGUF made
# by llama.cpp's convert_hf_to_gguf.py, LoRA adapters made by real PEFT, and the reference adapter
# GGUFs made by llama.cpp's convert_lora_to_gguf.py (see scripts/make_convert_fixtures.py).
#
# Needs: python3 and PyPI. torch (the PyPI wheel is a large CUDA build that runs on CPU), peft and
# transformers go into a venv under ~/.cache/d2c-gguf/convert-venv unless PYTHON names an
# interpreter that has them already. llama.cpp's converters and gguf-py come from the sdist of
# llama-cpp-python==0.3.36 (the llama.cpp it vendors).
#
# Usage: scripts/make-convert-fixtures.sh [family ...]   (default: all families and smollm2)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${D2C_CACHE:-$HOME/.cache/d2c-gguf}"
work="$cache/convert-work"
sdist_version="0.3.36"
mkdir -p "$work"

if [[ -z "${PYTHON:-}" ]]; then
    venv="$cache/convert-venv"
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import torch, peft, transformers, safetensors" 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q "torch" "peft==0.21.*" "transformers==5.*" "safetensors" "tokenizers" \
            "numpy" "pyyaml" "tqdm" "requests"
    fi
    PYTHON="$venv/bin/python"
fi

llama_cpp="$work/llama_cpp_python-$sdist_version/vendor/llama.cpp"
if [[ ! -f "$llama_cpp/convert_lora_to_gguf.py" ]]; then
    (cd "$work" && "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$sdist_version" -d .)
    tar -xzf "$work/llama_cpp_python-$sdist_version.tar.gz" -C "$work" \
        "llama_cpp_python-$sdist_version/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$sdist_version/vendor/llama.cpp/convert_lora_to_gguf.py" \
        "llama_cpp_python-$sdist_version/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$sdist_version/vendor/llama.cpp/gguf-py"
fi

only=()
if [[ $# -gt 0 ]]; then
    only=(--only "$@")
fi
HF_HUB_OFFLINE=1 "$PYTHON" "$repo/scripts/make_convert_fixtures.py" \
    --llama-cpp "$llama_cpp" --out "$repo/tests/fixtures/convert" --work "$work/models" "${only[@]}"
du -sh "$repo/tests/fixtures/convert"
