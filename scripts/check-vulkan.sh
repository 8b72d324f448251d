#!/usr/bin/env bash
# The Vulkan backend, really run: builds d2c-gguf with `--features vulkan` and runs it on Mesa's
# software Vulkan device (lavapipe, a CPU implementation of Vulkan, so no GPU is needed), then
# compares it with the default CPU build on the demo set:
#   score: every demo task's examples under the base and under each task's adapter, mean NLL per
#          file; the two backends must agree within TOL nats per token (default 0.02).
#   eval:  greedy answers on the held-out tests of two tasks; differing answers are listed.
# Not part of CI (the Vulkan build compiles ~190 shaders: about 20 minutes on 2 cores).
#   scripts/check-vulkan.sh [TOL]
# Output: target/vulkan-check/{score-cpu,score-vulkan,eval-cpu,eval-vulkan}.json and a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
TOL="${1:-0.02}"
. scripts/setup-env.sh
d2c_setup_env

need=()
dpkg -s mesa-vulkan-drivers >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
dpkg -s libvulkan-dev >/dev/null 2>&1 || need+=(libvulkan-dev)
dpkg -s spirv-headers >/dev/null 2>&1 || need+=(spirv-headers)
command -v glslc >/dev/null || need+=(glslc)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "check-vulkan: installing ${need[*]}" >&2
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null; } \
    || { echo "check-vulkan: install ${need[*]} by hand" >&2; exit 1; }
fi

# The vendored ggml-vulkan uses VK_EXT_layer_settings (vk::LayerSettingEXT), which the Vulkan
# headers have from 1.3.261 on. Debian 12 ships 1.3.239: there the build fails in
# ggml-vulkan.cpp ("'LayerSettingEXT' is not a member of 'vk'"). Say so before 20 minutes of
# compiling; Debian 13 (trixie) and Ubuntu 24.04 ship new enough headers.
header_version=$(sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\).*/\1/p' /usr/include/vulkan/vulkan_core.h 2>/dev/null | head -1)
if [ -z "$header_version" ] || [ "$header_version" -lt 261 ]; then
  echo "check-vulkan: Vulkan headers 1.3.${header_version:-?} are too old for ggml-vulkan (needs >= 1.3.261, VK_EXT_layer_settings);" >&2
  echo "check-vulkan: install libvulkan-dev >= 1.3.261 (Debian 13, Ubuntu 24.04) or point VULKAN_SDK at a newer SDK" >&2
  [ -n "${VULKAN_SDK:-}" ] || exit 1
fi

OUT=target/vulkan-check
mkdir -p "$OUT"
t0=$SECONDS
cargo build --release --locked --bin d2c-gguf
echo "check-vulkan: CPU build ready ($((SECONDS - t0)) s)" >&2
t0=$SECONDS
# A separate target dir: the Vulkan build is a second llama.cpp. Its CPU side (the ops Vulkan
# leaves to the CPU) is built for this machine; portability is not what is checked here.
CARGO_TARGET_DIR=target/vulkan RUSTFLAGS="-C target-cpu=native" \
  cargo build --release --locked --no-default-features --features openmp,vulkan --bin d2c-gguf
echo "check-vulkan: Vulkan build ready ($((SECONDS - t0)) s)" >&2
CPU_BIN=target/release/d2c-gguf
VK_BIN=target/vulkan/release/d2c-gguf

SET=scripts/demo-set
# lavapipe is a CPU device, which ggml-vulkan skips unless it is named explicitly.
export GGML_VK_VISIBLE_DEVICES=0
# The device llama.cpp really used, from its own log.
D2C_LLAMA_LOG=1 "$VK_BIN" score --base "$D2C_BASE_MODEL" --samples "$SET/samples/arith-add.jsonl" \
  >"$OUT/device.log" 2>&1 || { tail -30 "$OUT/device.log" >&2; exit 1; }
grep -iE "ggml_vulkan: [0-9]+ = |using device|offloaded" "$OUT/device.log" | head -5 >&2 || true
grep -qiE "llvmpipe|lavapipe" "$OUT/device.log" \
  || { echo "check-vulkan: llama.cpp did not report the lavapipe device (see $OUT/device.log)" >&2; exit 1; }

samples=("$SET"/samples/*.jsonl)
adapters=("$SET"/adapters/*.gguf)
for b in cpu vulkan; do
  bin=$CPU_BIN; [ $b = vulkan ] && bin=$VK_BIN
  t0=$SECONDS
  "$bin" score --base "$D2C_BASE_MODEL" --samples "${samples[@]}" --adapter "${adapters[@]}" --json >"$OUT/score-$b.json"
  echo "check-vulkan: score on $b: $((SECONDS - t0)) s" >&2
  t0=$SECONDS
  mkdir -p "$OUT/tests"
  cp "$SET/test/arith-add.jsonl" "$SET/test/case-snake.jsonl" "$OUT/tests/"
  "$bin" eval --base "$D2C_BASE_MODEL" --tests "$OUT/tests" --adapters "$SET/adapters" --max-tokens 12 \
    --predictions --json >"$OUT/eval-$b.json"
  echo "check-vulkan: eval on $b: $((SECONDS - t0)) s" >&2
done

"$D2C_PYTHON" - "$OUT" "$TOL" <<'PY'
import json, sys
out, tol = sys.argv[1], float(sys.argv[2])
def load(name): return json.load(open(f"{out}/{name}.json"))
cpu, vk = load("score-cpu")["results"], load("score-vulkan")["results"]
worst = 0.0
print(f"{'adapter':<28} {'samples':<20} {'cpu nll':>9} {'vulkan nll':>10} {'diff':>8}")
for c, v in zip(cpu, vk):
    assert (c["adapter"], c["samples_file"]) == (v["adapter"], v["samples_file"])
    d = abs(c["mean_nll"] - v["mean_nll"])
    worst = max(worst, d)
    name = (c["adapter"] or "base").split("/")[-1]
    print(f"{name:<28} {c['samples_file'].split('/')[-1]:<20} {c['mean_nll']:9.4f} {v['mean_nll']:10.4f} {d:8.4f}")
ec, ev = load("eval-cpu"), load("eval-vulkan")
differ = []
for task in ec["tasks"]:
    for i, (a, b) in enumerate(zip(ec["tasks"][task]["predictions"], ev["tasks"][task]["predictions"])):
        if a != b:
            differ.append((task, i, a, b))
n = sum(len(t["predictions"]) for t in ec["tasks"].values())
print(f"score: {len(cpu)} (adapter, samples) pairs, largest |NLL difference| {worst:.4f} nats/token (tolerance {tol})")
print(f"eval: {n - len(differ)}/{n} greedy answers identical; accuracy cpu {ec['mean_accuracy']:.3f}, vulkan {ev['mean_accuracy']:.3f}")
for task, i, a, b in differ:
    print(f"  differs: {task} #{i}: cpu {a!r} vulkan {b!r}")
sys.exit(0 if worst <= tol else 1)
PY
