#!/usr/bin/env python3
"""One LoRA per task with real PEFT on the rebuilt base, then `d2c-gguf convert` to a GGUF adapter.

Loss: cross-entropy on the completion tokens plus one terminating "\n" token (so greedy generation
in llama.cpp stops at the newline), none on the prompt. prompt + completion + "\n" is tokenised in
one piece, as llama.cpp tokenises a prompt (no BOS: the GGUF says tokenizer.ggml.add_bos_token =
false; base_model.py checks the tokenizer against llama-server's). The logits are computed only at
the positions that carry loss: the tied 49152 x 576 output layer would otherwise cost as much as a
third of the model on every prompt token.

Resumable and idempotent: a task whose adapters/<task>.gguf exists is skipped; a task whose PEFT
directory is complete is only converted. Every task draws batches from its own seeded RNG, and the
LoRA initialisation is seeded per task, so a rerun trains the same adapter.

After training, a sanity check greedily decodes --sanity held-out test examples in torch and records
the exact-match accuracy in peft/<task>/train_meta.json (the benchmark's own numbers come from
llama.cpp through `d2c-gguf eval`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

from common import ADAPTERS, BASE_GGUF, HF_BASE, PEFT, TASKS, log, read_jsonl, task_names, write_atomic

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
D2C = Path(__file__).resolve().parents[2] / "target" / "release" / "d2c-gguf"


def seed_of(task: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{task}".encode(), digest_size=4).digest(), "little")


def encode(tok, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion + "\n", number of prompt tokens) per example."""
    out = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=True).input_ids
        full = tok(r["prompt"] + r["completion"] + "\n", add_special_tokens=True).input_ids
        if full[:len(p)] != p:
            raise SystemExit(f"prompt tokens are not a prefix of prompt+completion: {r}")
        out.append((full, len(p)))
    return out


def batch_loss(model, lm_head, batch, pad_id: int):
    import torch
    import torch.nn.functional as F

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (seq, n_prompt) in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        for t in range(n_prompt, len(seq)):  # position t-1 predicts token t
            rows.append(i)
            cols.append(t - 1)
            targets.append(seq[t])
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
    return F.cross_entropy(logits, torch.tensor(targets))


def greedy_accuracy(peft_model, tok, rows: list[dict], max_new: int = 12) -> tuple[float, list]:
    import torch

    correct, shown = 0, []
    with torch.no_grad():
        for r in rows:
            ids = tok(r["prompt"], return_tensors="pt").input_ids
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id or 2,
                                      eos_token_id=tok.convert_tokens_to_ids("Ċ"))
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
            ok = text == r["completion"].strip()
            correct += ok
            if len(shown) < 3:
                shown.append((r["completion"].strip(), text))
    return correct / max(1, len(rows)), shown


def convert(task: str) -> None:
    out = ADAPTERS / f"{task}.gguf"
    ADAPTERS.mkdir(parents=True, exist_ok=True)
    part = ADAPTERS / f".{task}.gguf.part"
    part.unlink(missing_ok=True)
    subprocess.run([str(D2C), "convert", "--peft", str(PEFT / task), "--base", str(BASE_GGUF), "-o", str(part),
                    "--dtype", "f16"], check=True)
    part.replace(out)


def train_task(base, tok, task: str, args) -> dict:
    import random

    import torch
    from peft import LoraConfig, get_peft_model

    seed = seed_of(task, args.seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train = encode(tok, read_jsonl(TASKS / "train" / f"{task}.jsonl"))
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup))))
    inner = peft_model.base_model.model.model  # the LlamaModel (decoder stack) with LoRA layers
    lm_head = peft_model.base_model.model.lm_head
    order: list = []
    losses = []
    t0 = time.perf_counter()
    peft_model.train()
    for step in range(args.steps):
        if len(order) < args.batch:
            block = list(range(len(train)))
            rng.shuffle(block)
            order += block
        batch = [train[i] for i in order[:args.batch]]
        del order[:args.batch]
        loss = batch_loss(inner, lm_head, batch, tok.pad_token_id or 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step == 0 or (step + 1) % max(1, args.steps // 5) == 0:
            log(f"{task}: step {step + 1}/{args.steps} loss {loss.item():.3f} ({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    train_s = time.perf_counter() - t0
    peft_model.eval()
    sanity = read_jsonl(TASKS / "test" / f"{task}.jsonl")[:args.sanity]
    acc, shown = greedy_accuracy(peft_model, tok, sanity) if sanity else (None, [])
    meta = {"task": task, "seed": seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "rank": args.rank,
            "alpha": args.alpha, "targets": TARGETS, "train_examples": len(train), "train_seconds": round(train_s, 1),
            "seconds_per_step": round(train_s / args.steps, 3), "loss_first": losses[0],
            "loss_last5": sum(losses[-5:]) / len(losses[-5:]), "torch_sanity_accuracy": acc,
            "torch_sanity_examples": len(sanity), "torch_sanity_shown": shown}
    stage = PEFT / f".{task}.part"
    shutil.rmtree(stage, ignore_errors=True)
    peft_model.save_pretrained(stage)
    write_atomic(stage / "train_meta.json", json.dumps(meta, indent=1))
    shutil.rmtree(PEFT / task, ignore_errors=True)
    stage.replace(PEFT / task)
    peft_model.unload()  # puts the plain base modules back for the next task
    log(f"{task}: trained in {train_s:.0f} s, loss {meta['loss_first']:.3f} -> {meta['loss_last5']:.3f}, "
        f"torch sanity accuracy {acc if acc is None else f'{acc:.0%}'} on {len(sanity)} test examples {shown}")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: all in tasks.json)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--sanity", type=int, default=10, help="held-out test examples decoded in torch per task")
    # One thread: on this shared 2-core machine a 2-thread step was ~10x slower in wall time (15-20 s
    # against 2-4 s for batch 4-8), the OpenMP threads waiting on each other whenever one is descheduled.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    if not D2C.is_file():
        raise SystemExit(f"{D2C} missing: cargo build --release --bin d2c-gguf")
    tasks = args.tasks.split(",") if args.tasks else task_names()
    todo = [t for t in tasks if not (ADAPTERS / f"{t}.gguf").is_file()]
    log(f"{len(tasks) - len(todo)} of {len(tasks)} adapters already exist; {len(todo)} to do")
    if not todo:
        return
    tok = AutoTokenizer.from_pretrained(HF_BASE)
    base = AutoModelForCausalLM.from_pretrained(HF_BASE, dtype=torch.float32)
    base.config.use_cache = False
    t_all = time.perf_counter()
    for i, task in enumerate(todo):
        if not (PEFT / task / "adapter_model.safetensors").is_file():
            train_task(base, tok, task, args)
        convert(task)
        log(f"[{i + 1}/{len(todo)}] {task} done; {time.perf_counter() - t_all:.0f} s elapsed")


if __name__ == "__main__":
    main()
