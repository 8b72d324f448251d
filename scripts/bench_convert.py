#!/usr/bin/env python3
"""Conversion time and peak memory of `d2c-gguf convert` against llama.cpp's convert_lora_to_gguf.py
on a 1B-class adapter (Llama-3.2-1B shape: hidden 2048, 16 layers, 32 heads / 8 KV heads,
ffn 8192, vocab 128256; rank 16 on all 7 projections, made by real PEFT).

Run through scripts/bench-convert.sh. Neither converter needs real weights: the adapter comes from
PEFT on a zero-initialised model of that config, the reference converter reads only config.json
from --base, and ours reads only the header (shapes, head counts) of a base GGUF made by
llama.cpp's convert_hf_to_gguf.py from that same model. Those inputs are made once and cached.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                    bos_token_id=128000, eos_token_id=128001)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def make_inputs(work: Path, llama_cpp: Path, fixtures_script: Path) -> None:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    hf_dir, peft_dir, base_gguf = work / "hf", work / "peft", work / "base-q8_0.gguf"
    if base_gguf.is_file() and (peft_dir / "adapter_model.safetensors").is_file() and (hf_dir / "config.json").is_file():
        return
    shutil.rmtree(hf_dir, ignore_errors=True)
    shutil.rmtree(peft_dir, ignore_errors=True)
    cfg = transformers.LlamaConfig(**LLAMA_3_2_1B)
    cfg.architectures = ["LlamaForCausalLM"]
    log("making a zero-initialised Llama-3.2-1B-shaped model")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(hf_dir)
    # A tiny tokenizer: the GGUF needs a vocabulary, nothing here reads it.
    sys.path.insert(0, str(fixtures_script.parent))
    from make_convert_fixtures import make_tokenizer
    make_tokenizer(hf_dir)

    log("making the PEFT adapter (rank 16, all 7 projections)")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
    peft_model.save_pretrained(peft_dir)
    del peft_model, model

    log("converting the base with convert_hf_to_gguf.py (q8_0; only its header is used)")
    subprocess.run([sys.executable, fixtures_script, "--hf-to-gguf", llama_cpp, hf_dir, base_gguf, "q8_0"], check=True,
                   stdout=subprocess.DEVNULL)
    # The reference converter needs config.json only; the weights were for convert_hf_to_gguf.
    for f in hf_dir.glob("*.safetensors*"):
        f.unlink()


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of `cmd`, measured from a fresh child process."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *map(str, cmd)], check=True, capture_output=True, text=True)
    wall, rss_kib = out.stdout.split()
    return float(wall), int(rss_kib) / 1024


def same_tensors(a: Path, b: Path, llama_cpp: Path) -> bool:
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    import gguf
    import numpy as np

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    if ta.keys() != tb.keys():
        return False
    return all(np.array_equal(ta[n].data, tb[n].data) for n in ta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d2c", type=Path, required=True, help="the d2c-gguf release binary")
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--runs", type=int, default=3, help="runs of each tool (best time, highest peak memory)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    fixtures_script = Path(__file__).resolve().parent / "make_convert_fixtures.py"
    make_inputs(args.work, args.llama_cpp, fixtures_script)

    peft_dir, base_gguf, hf_dir = args.work / "peft", args.work / "base-q8_0.gguf", args.work / "hf"
    ours_out, ref_out = args.work / "ours.gguf", args.work / "reference.gguf"
    ours = [args.d2c, "convert", "--peft", peft_dir, "--base", base_gguf, "-o", ours_out, "--dtype", args.dtype]
    ref = [sys.executable, args.llama_cpp / "convert_lora_to_gguf.py", "--base", hf_dir, "--outtype", args.dtype,
           "--outfile", ref_out, peft_dir]
    results = {}
    for name, cmd in [("d2c-gguf convert", ours), ("convert_lora_to_gguf.py", ref)]:
        runs = [measure(cmd) for _ in range(args.runs)]
        results[name] = (min(r[0] for r in runs), max(r[1] for r in runs))
        log(f"{name}: {results[name][0]:.2f} s, {results[name][1]:.0f} MiB")

    adapter_mib = (peft_dir / "adapter_model.safetensors").stat().st_size / 2**20
    (t_ours, m_ours), (t_ref, m_ref) = results["d2c-gguf convert"], results["convert_lora_to_gguf.py"]
    print(f"adapter: Llama-3.2-1B shape, rank 16 x 7 projections x 16 layers, {adapter_mib:.1f} MiB safetensors, output {args.dtype}")
    print(f"{'tool':<26} {'wall s (best of ' + str(args.runs) + ')':>20} {'peak RSS MiB':>14}")
    for name, (t, m) in results.items():
        print(f"{name:<26} {t:>20.2f} {m:>14.0f}")
    print(f"ratio (reference / ours): time {t_ref / t_ours:.1f}x, memory {m_ref / m_ours:.1f}x")
    if args.dtype in ("f32", "f16", "bf16"):
        print(f"outputs have identical tensors: {same_tensors(ours_out, ref_out, args.llama_cpp)}")


if __name__ == "__main__":
    main()
