#!/usr/bin/env bash
# Merge speed: d2c-gguf's `svd` merge against PEFT's add_weighted_adapter(combination_type="svd")
# and a dense numpy SVD of each summed delta, on the same inputs, one run on one machine.
# Prints a markdown table: merge time, process wall time, max RSS, relative Frobenius error
# against the exact average of the inputs (and the Eckart-Young optimum), speed-up of d2c-gguf.
#
#   scripts/bench-merge.sh [--threads N] [--configs smollm2,1b] [--layers-1b N]
#                          [--layers-smollm2 N] [--contenders d2c,numpy,peft]
#
# Inputs: 8 random rank-16 adapters (alpha 32) on all 7 projections, f32 GGUF, made by
# `cargo bench --bench merge -- gen`: SmolLM2-135M's shapes (from the cached base GGUF) and a
# 1B-class shape (hidden 2048, ffn 8192, k/v out 512, 16 layers). Every contender runs with the
# same thread count (RAYON/OMP/OPENBLAS/MKL_NUM_THREADS; default: all cores).
# PEFT and torch go into their own venv, $D2C_CACHE/bench-venv (torch is ~2.9 GB).
set -euo pipefail
cd "$(dirname "$0")/.."

CORES="$(getconf _NPROCESSORS_ONLN)"
THREADS="$CORES"
CONFIGS="smollm2,1b"
LAYERS_1B=16
LAYERS_SMOL=""
CONTENDERS="d2c,numpy,peft"
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2 ;;
    --configs) CONFIGS="$2"; shift 2 ;;
    --layers-1b) LAYERS_1B="$2"; shift 2 ;;
    --layers-smollm2) LAYERS_SMOL="$2"; shift 2 ;;
    --contenders) CONTENDERS="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
RANK=16

CACHE="${D2C_CACHE:-$HOME/.cache/d2c-gguf}"
VENV="$CACHE/bench-venv"
if [[ ",$CONTENDERS," == *,numpy,* || ",$CONTENDERS," == *,peft,* ]]; then
  if ! "$VENV/bin/python" -c 'import peft, torch, numpy, gguf' >/dev/null 2>&1; then
    echo "bench-merge: installing peft, torch, numpy, gguf into $VENV (torch is large)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check peft torch numpy "gguf==0.19.0"
  fi
fi

cargo build -q --release --bin d2c-gguf
cargo bench -q --bench merge --no-run 2>/dev/null
BENCH=(cargo bench -q --bench merge --)
D2C=target/release/d2c-gguf

export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
export PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "machine: $CORES cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads per contender: $THREADS; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| shape | contender | merge time (s) | process wall (s) | max RSS (MB) | relative error | optimal error | d2c-gguf speed-up (merge time) |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"

for config in ${CONFIGS//,/ }; do
  layers_arg=()
  label="$config"
  if [ "$config" = 1b ]; then
    layers_arg=(--layers "$LAYERS_1B"); label="1B-class, $LAYERS_1B of 16 layers"
  elif [ -n "$LAYERS_SMOL" ]; then
    layers_arg=(--layers "$LAYERS_SMOL"); label="SmolLM2-135M, $LAYERS_SMOL of 30 layers"
  else
    label="SmolLM2-135M, 30 layers"
  fi
  dir="$WORK/$config"
  "${BENCH[@]}" gen "$config" "$dir" "${layers_arg[@]}" 2>/dev/null
  in_mb=$(du -sm "$dir" | cut -f1)
  d2c_secs=""
  for who in ${CONTENDERS//,/ }; do
    out="$WORK/$config-$who.gguf"
    log="$WORK/$config-$who.log"
    case "$who" in
      d2c) cmd=("$D2C" merge-adapters --method svd --rank "$RANK" "$dir"/input_*.gguf -o "$out") ;;
      numpy) cmd=("$VENV/bin/python" scripts/bench_merge_numpy.py "$dir" "$out" "$RANK") ;;
      peft) cmd=("$VENV/bin/python" scripts/bench_merge_peft.py "$dir" "$out" "$RANK") ;;
      *) echo "unknown contender $who" >&2; exit 2 ;;
    esac
    /usr/bin/time -f '%e %M' -o "$WORK/time" "${cmd[@]}" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    read -r wall rss_kb <"$WORK/time"
    if [ "$who" = d2c ]; then
      secs=$(sed -n 's/.*merge \([0-9.]*\) s;.*/\1/p' "$log")
      d2c_secs="$secs"
    else
      secs=$(sed -n 's/^RESULT .*"merge_seconds": \([0-9.e-]*\).*/\1/p' "$log")
    fi
    err_json=$("${BENCH[@]}" error "$dir" "$out" 2>/dev/null)
    err=$(echo "$err_json" | sed -n 's/.*"relative_error": \([0-9.e+-]*\),.*/\1/p')
    opt=$(echo "$err_json" | sed -n 's/.*"optimal_relative_error": \([0-9.e+-]*\),.*/\1/p')
    speedup="—"
    if [ "$who" != d2c ] && [ -n "$d2c_secs" ]; then
      speedup=$(awk -v a="$secs" -v b="$d2c_secs" 'BEGIN { printf "%.0fx", a / b }')
    fi
    name=$([ "$who" = d2c ] && echo "d2c-gguf svd" || ([ "$who" = peft ] && echo "PEFT svd" || echo "numpy dense SVD"))
    printf '| %s (inputs %s MB) | %s | %.3f | %.1f | %d | %.6f | %.6f | %s |\n' \
      "$label" "$in_mb" "$name" "$secs" "$wall" $((rss_kb / 1024)) "$err" "$opt" "$speedup"
  done
done
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
