#!/usr/bin/env python3
"""The base model as a Hugging Face LlamaForCausalLM, rebuilt from the llama.cpp GGUF, and its check.

`build`: transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`) dequantises every tensor
with gguf-py, undoes llama.cpp's q/k row permutation and ties the output to token_embd; the
tokenizer comes from the GGUF metadata the same way (gpt2 BPE, the smollm pre-tokenizer, no BOS since
tokenizer.ggml.add_bos_token is false). The result is saved as float32 safetensors so that training
loads it in seconds.

`check`: the rebuilt model must agree with llama.cpp. On held-out prompts (none of them a task
example) we compare (1) the token ids of the HF tokenizer with llama-server's /tokenize and (2) the
top-1 next token of the HF model with llama-server's (-fa off, n_probs) on the same token ids.
Also every samples/test text of the task suite is tokenised by both (they must be identical), and
tasks/token_stats.json records prompt/completion token counts. Writes base-hf/agreement.json and fails
below --min-agreement unless every disagreement is a near-tie (HF top-2 margin < TIE_MARGIN): on the
Q4_1 base llama.cpp rounds activations to 8 bits inside its quantised matmuls, which flips near-ties.
`--server-model` points llama-server at another GGUF, e.g. an F32 GGUF of base-hf made by llama.cpp's
convert_hf_to_gguf.py, which isolates the rebuild itself from llama.cpp's quantised arithmetic.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from common import BASE_GGUF, HF_BASE, SPLITS, TASKS, LlamaServer, log, read_jsonl, task_names, write_atomic

TIE_MARGIN = 0.25  # logits (nats): below this, a top-1 flip is rounding, not a wrong weight

HELD_OUT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    if n <",
    "The three primary colors are red, blue and",
    "Water boils at 100 degrees",
    "Translate to French: cat =",
    "Question: What is 2 + 2?\nAnswer:",
    "The quick brown fox jumps over the lazy",
    "In 1969, Neil Armstrong became the first person to walk on the",
    "Monday, Tuesday, Wednesday,",
    "import numpy as",
    "The opposite of hot is",
    "My favourite fruit is the",
    "Spell the word backwards.\nWord: table\nAnswer:",
    "List: 3, 8, 1\nLargest:",
    "Paris is to France as Berlin is to",
    "The sun rises in the",
    "A group of lions is called a",
    "1, 2, 3, 4, 5,",
    "The chemical symbol for gold is",
    "She opened the door and saw",
    "HTTP status code 404 means",
    "Convert to uppercase.\nInput: river\nOutput:",
    "January, February, March,",
    "The largest planet in our solar system is",
    "Ich heiße Anna und ich komme aus",
    "El perro es",
    "Roses are red, violets are",
    "SELECT * FROM users WHERE",
    "Photosynthesis converts sunlight into",
    "The Great Wall of China was built to",
    "Python is a programming language that",
    "To make a cup of tea, first boil the",
    "The moon orbits the",
    "Shakespeare wrote the play Romeo and",
    "A triangle has three",
    "The speed of light is about",
    "Dogs are known for being loyal and",
    "The Amazon rainforest is located in South",
    "for i in range(10):\n    print(",
    "The freezing point of water is",
    "Mount Everest is the highest mountain in the",
    "An apple a day keeps the",
    "The Eiffel Tower is located in",
    "Bonjour, comment",
    "The human heart has four",
    "Once the rain stopped, the children went",
    "Albert Einstein is famous for the theory of",
    "Sort the numbers.\nList: 5 2 9\nAnswer:",
    "The first letter of the alphabet is",
    "Cats like to chase",
    "The Pacific Ocean is the largest",
    "Summer, autumn, winter and",
    "Breakfast is the first meal of the",
    "The color of the sky on a clear day is",
    "Water is made of hydrogen and",
    "The Statue of Liberty stands in New York",
    "A haiku is a short poem with",
    "Thank you very much for your",
    "Twelve divided by three equals",
]


def build() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if (HF_BASE / "model.safetensors").is_file() and (HF_BASE / "tokenizer.json").is_file():
        log(f"base model already rebuilt in {HF_BASE}")
        return
    stage = HF_BASE.with_name(HF_BASE.name + ".part")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    shutil.copy(BASE_GGUF, stage / BASE_GGUF.name)
    log("rebuilding the HF model from the GGUF (dequantising every tensor)")
    tok = AutoTokenizer.from_pretrained(stage, gguf_file=BASE_GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(stage, gguf_file=BASE_GGUF.name, dtype=torch.float32)
    assert model.config.tie_word_embeddings, "SmolLM2 ties its output to the token embedding"
    # The weights are plain dequantised floats now, but the loaded model still counts as a GGUF-quantised
    # one (not serialisable): copy them into a fresh model whose config does not point back at the GGUF.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    (stage / BASE_GGUF.name).unlink()
    plain.save_pretrained(stage)
    tok.save_pretrained(stage)
    shutil.rmtree(HF_BASE, ignore_errors=True)
    stage.replace(HF_BASE)
    log(f"saved {HF_BASE}")


def check_task_tokens(tok, server) -> tuple[list[str], int]:
    """Every samples/test text tokenised by HF and by llama.cpp; also writes tasks/token_stats.json."""
    if not (TASKS / "tasks.json").is_file():
        return [], 0
    mismatches, checked, stats = [], 0, {}
    for task in task_names():
        n_prompt, n_completion = [], []
        for split in SPLITS:
            for r in read_jsonl(TASKS / split / f"{task}.jsonl"):
                p = tok(r["prompt"]).input_ids
                full = tok(r["prompt"] + r["completion"] + "\n").input_ids
                n_prompt.append(len(p))
                n_completion.append(len(full) - len(p) - 1)
                if split == "train":
                    continue
                for text, ids in ((r["prompt"], p), (r["prompt"] + r["completion"] + "\n", full)):
                    checked += 1
                    if server.tokenize(text) != ids:
                        mismatches.append(text)
        stats[task] = {"mean_prompt_tokens": round(sum(n_prompt) / len(n_prompt), 2),
                       "max_prompt_tokens": max(n_prompt),
                       "mean_completion_tokens": round(sum(n_completion) / len(n_completion), 2),
                       "max_completion_tokens": max(n_completion)}
    write_atomic(TASKS / "token_stats.json", json.dumps(stats, indent=1))
    return mismatches, checked


def check(min_agreement: float, server_model=BASE_GGUF) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(HF_BASE)
    model = AutoModelForCausalLM.from_pretrained(HF_BASE, dtype=torch.float32).eval()
    rows = []
    with LlamaServer(server_model) as server:
        for prompt in HELD_OUT_PROMPTS:
            ids_cpp = server.tokenize(prompt)
            ids_hf = tok(prompt, add_special_tokens=True).input_ids
            res = server.post("/completion", {"prompt": ids_cpp, "n_predict": 1, "n_probs": 5, "temperature": 0,
                                              "cache_prompt": False})
            top_cpp = res["completion_probabilities"][0]["top_logprobs"]
            with torch.no_grad():
                logits = model(torch.tensor([ids_cpp])).logits[0, -1]
            logprobs = torch.log_softmax(logits, -1)
            top_hf = int(logits.argmax())
            top2 = logits.topk(2).values
            rows.append({"prompt": prompt, "tokens_equal": ids_cpp == ids_hf, "top1_llama_cpp": top_cpp[0]["id"],
                         "top1_hf": top_hf, "agree": top_cpp[0]["id"] == top_hf,
                         "hf_margin": float(top2[0] - top2[1]),
                         # llama.cpp's top-5 log-probabilities against HF's for the same tokens
                         "max_abs_logprob_diff": max(abs(float(logprobs[t["id"]]) - t["logprob"]) for t in top_cpp)})
        task_mismatches, task_checked = check_task_tokens(tok, server) if server_model == BASE_GGUF else ([], 0)
    agree = sum(r["agree"] for r in rows) / len(rows)
    tokens_equal = sum(r["tokens_equal"] for r in rows) / len(rows)
    logprob_diff = sum(r["max_abs_logprob_diff"] for r in rows) / len(rows)
    report = {"server_model": str(server_model), "near_tie_margin": TIE_MARGIN, "prompts": len(rows),
              "top1_agreement": agree, "tokenizer_agreement": tokens_equal,
              "mean_max_abs_top5_logprob_diff": logprob_diff,
              "task_texts_tokenized": task_checked, "task_token_mismatches": task_mismatches, "rows": rows}
    name = "agreement.json" if server_model == BASE_GGUF else f"agreement-{server_model.stem}.json"
    for r in rows:
        if not r["agree"] or not r["tokens_equal"]:
            log(f"disagreement: {r}")
    log(f"HF vs llama.cpp: top-1 agreement {agree:.1%} on {len(rows)} held-out prompts, tokenizer agreement "
        f"{tokens_equal:.1%}, top-5 log-probabilities differ by {logprob_diff:.3f} nats on average (max over the 5)")
    log(f"task texts (samples + test, prompt and prompt+completion+newline): {task_checked} tokenised, "
        f"{len(task_mismatches)} differ from llama.cpp")
    # llama.cpp multiplies Q4_1/Q8_0 weights with activations rounded to 8 bits, so on a quantised base a
    # near-tie can flip; a disagreement is only tolerated when HF's own top-2 margin is that small.
    # (Against an F32 GGUF of base-hf the two agree on every prompt: see --server-model.)
    real = [r for r in rows if not r["agree"] and r["hf_margin"] >= TIE_MARGIN]
    if real:
        log(f"{len(real)} disagreements are not near-ties (HF top-2 margin >= {TIE_MARGIN} nats)")
    passed = not ((agree < min_agreement and (real or agree < 0.85)) or tokens_equal < 1.0 or task_mismatches)
    report["passed"] = passed
    write_atomic(HF_BASE / name, json.dumps(report, indent=1))
    if not passed:
        sys.exit(f"the rebuilt base disagrees with llama.cpp (top-1 {agree:.1%}, tokens {tokens_equal:.1%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["build", "check", "all"])
    ap.add_argument("--min-agreement", type=float, default=0.95)
    ap.add_argument("--server-model", type=Path, default=BASE_GGUF,
                    help="GGUF that llama-server runs (default: the base; e.g. an F32 GGUF of base-hf isolates "
                         "the rebuild from llama.cpp's quantised arithmetic)")
    args = ap.parse_args()
    if args.step in ("build", "all"):
        build()
    if args.step in ("check", "all"):
        done = HF_BASE / "agreement.json"
        if args.step == "all" and done.is_file() and json.loads(done.read_text()).get("passed"):
            log(f"agreement already checked: {json.loads(done.read_text())['top1_agreement']:.1%}")
            return
        check(args.min_agreement, args.server_model)


if __name__ == "__main__":
    main()
