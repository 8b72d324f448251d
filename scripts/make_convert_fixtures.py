#!/usr/bin/env python3
"""Builds the golden fixtures of `d2c-gguf convert` (tests/fixtures/convert/).

For every family a tiny random Hugging Face model is made from its transformers config, converted to
GGUF by llama.cpp's own convert_hf_to_gguf.py, and given LoRA adapters made by real PEFT
(init_lora_weights=False, so lora_B is not zero). Each adapter that llama.cpp's converter can handle
is converted by its own convert_lora_to_gguf.py: that file is the reference our converter must equal.
`peft_scaling.json` records the scale PEFT itself applies to every module (read from the live PEFT
layers), because the reference ignores use_rslora, rank_pattern and alpha_pattern.

Run through scripts/make-convert-fixtures.sh, which provides the interpreter and llama.cpp's scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SEED = 7
VOCAB = 320
# Tokens the tiny tokenizer is trained on: only its size matters (llama.cpp needs a real vocab to
# load the tiny bases; the tests feed token ids directly).
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "lora adapters for small language models on device",
    "convert peft safetensors to gguf without python",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?",
] * 50

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# hf architecture, transformers config class, tiny hyper-parameters, LoRA target modules.
# Shapes differ between families on purpose, so that a base of the wrong family is caught by shape.
FAMILIES = {
    "llama": dict(
        hf_arch="LlamaForCausalLM", config="LlamaConfig",
        params=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False),
        targets=ATTN + MLP,
    ),
    "qwen2": dict(
        hf_arch="Qwen2ForCausalLM", config="Qwen2Config",
        params=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True),
        targets=ATTN + MLP,
    ),
    "qwen3": dict(
        hf_arch="Qwen3ForCausalLM", config="Qwen3Config",
        params=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
        targets=ATTN + MLP,
    ),
    "gemma2": dict(
        hf_arch="Gemma2ForCausalLM", config="Gemma2Config",
        params=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, sliding_window=32, tie_word_embeddings=True),
        targets=ATTN + MLP,
    ),
    "gemma3": dict(
        hf_arch="Gemma3ForCausalLM", config="Gemma3TextConfig",
        params=dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=16, sliding_window=32, tie_word_embeddings=True),
        targets=ATTN + MLP,
    ),
    "phi3": dict(
        hf_arch="Phi3ForCausalLM", config="Phi3Config",
        params=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, tie_word_embeddings=False, original_max_position_embeddings=4096),
        targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
}

# SmolLM2-135M-Instruct as in the cached Q4_1 GGUF; only the config matters for the adapter.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
               rope_theta=100000.0, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)


def log(msg: str) -> None:
    print(f"[fixtures] {msg}", flush=True)


def make_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<eos>", "<bos>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(out)


def make_hf_model(family: str, out: Path):
    import torch
    import transformers

    spec = FAMILIES[family]
    cfg_cls = getattr(transformers, spec["config"])
    cfg = cfg_cls(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  max_position_embeddings=256, **spec["params"])
    cfg.architectures = [spec["hf_arch"]]
    torch.manual_seed(SEED)
    model = getattr(transformers, spec["hf_arch"])(cfg).eval()
    model.save_pretrained(out)
    make_tokenizer(out)
    return model


def run(cmd: list[str], **kw) -> None:
    log(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def hf_to_gguf(llama_cpp: Path, hf_dir: Path, out: Path, outtype: str) -> None:
    # Self-invocation: see `patched_hf_to_gguf` below.
    run([sys.executable, __file__, "--hf-to-gguf", llama_cpp, hf_dir, out, outtype])


def patched_hf_to_gguf(llama_cpp: Path, hf_dir: Path, out: Path, outtype: str) -> None:
    """Runs llama.cpp's convert_hf_to_gguf.py unchanged for every tensor; only the vocabulary step
    is pointed at the plain GPT-2 BPE path, because the converter recognises pre-tokenizers by a
    hash of known public tokenizers and a tiny trained one is none of them. The vocabulary is not
    part of what the LoRA tests check."""
    import runpy

    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(1, str(llama_cpp / "gguf-py"))
    import conversion
    from conversion.base import TextModel

    import transformers

    arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    # transformers picks a tokenizer class by model type (Qwen2's adds <|endoftext|>); the tiny
    # tokenizer is a plain one.
    transformers.AutoTokenizer = transformers.PreTrainedTokenizerFast
    conversion.get_model_class(arch).set_vocab = TextModel._set_vocab_gpt2
    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    runpy.run_path(str(llama_cpp / "convert_hf_to_gguf.py"), run_name="__main__")


def lora_to_gguf(llama_cpp: Path, base_dir: Path, peft_dir: Path, out: Path, outtype: str = "f32") -> None:
    run([sys.executable, llama_cpp / "convert_lora_to_gguf.py", "--base", base_dir, "--outtype", outtype,
         "--outfile", out, peft_dir])


def make_adapter(model, out: Path, *, save_dtype: str | None = None, seed: int = SEED, **lora_kw) -> dict:
    """Wraps `model` in a fresh PEFT LoRA, saves it to `out`, returns PEFT's scale per module."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kw)
    peft_model = get_peft_model(model, cfg)
    scaling = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "scaling") and ("default" in getattr(module, "lora_A", {}) or "default" in getattr(module, "lora_embedding_A", {})):
            scaling[name] = float(module.scaling["default"])
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    if save_dtype is not None:
        # Users' adapters often come in half precision; store this one that way.
        from safetensors.torch import load_file, save_file
        path = out / "adapter_model.safetensors"
        tensors = {k: v.to(getattr(torch, save_dtype)).contiguous() for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    (out / "README.md").unlink(missing_ok=True)
    # Unwrap so that the next adapter starts from the plain model again.
    peft_model.unload()
    return scaling


def write_case(case_dir: Path, scaling: dict, family: str, n_layers: int) -> None:
    """peft_scaling.json: for every LoRA module, PEFT's own scale and the GGUF tensor that
    llama.cpp's name map (gguf-py) gives it, so the tests do not rely on our name table."""
    import gguf

    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.upper()), n_layers)
    rows = []
    for module, scale in sorted(scaling.items()):
        gguf_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        assert gguf_name is not None, module
        rows.append({"module": module, "gguf": gguf_name, "scale": scale})
    (case_dir / "peft_scaling.json").write_text(json.dumps(rows, indent=1) + "\n")


def build_family(family: str, llama_cpp: Path, fixtures: Path, work: Path) -> None:
    spec = FAMILIES[family]
    fam_dir = fixtures / family
    hf_dir = work / family / "hf"
    shutil.rmtree(fam_dir, ignore_errors=True)
    shutil.rmtree(hf_dir, ignore_errors=True)
    fam_dir.mkdir(parents=True)
    model = make_hf_model(family, hf_dir)
    hf_to_gguf(llama_cpp, hf_dir, fam_dir / "base.gguf", "q8_0")

    def case(name: str, reference: bool = True, **kw) -> None:
        case_dir = fam_dir / name
        scaling = make_adapter(model, case_dir / "peft", **kw)
        write_case(case_dir, scaling, family, spec["params"]["num_hidden_layers"])
        if reference:
            lora_to_gguf(llama_cpp, hf_dir, case_dir / "peft", case_dir / "reference.gguf")

    targets = spec["targets"]
    # The plain case: every projection, one rank, one alpha; qwen3's is stored in bf16.
    case("lora", r=4, lora_alpha=8, target_modules=targets, save_dtype="bfloat16" if family == "qwen3" else None)
    if family == "llama":
        case("rslora", r=4, lora_alpha=4, use_rslora=True, target_modules=targets, seed=SEED + 1)
        case("patterns", r=4, lora_alpha=8, target_modules=targets, seed=SEED + 2,
             rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
             alpha_pattern={"v_proj": 3.0, "layers.0.self_attn.o_proj": 5.0})
        # Untied model: token_embd and output LoRA are valid here. PEFT also stores the (frozen)
        # full embedding and lm_head weights because embeddings are targeted.
        case("embed", r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"], seed=SEED + 3,
             save_dtype="bfloat16")
        case("f16", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=SEED + 4, save_dtype="float16")
        # Inputs that must be refused.
        case("dora", reference=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
        case("lora-bias", reference=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
        case("modules-to-save", reference=False, r=4, lora_alpha=8, target_modules=["q_proj"],
             modules_to_save=["lm_head"], save_dtype="bfloat16")
    if family == "qwen2":
        # Tied embeddings: a token_embd LoRA would abort llama.cpp, so it must be refused.
        case("embed-tied", reference=False, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
             save_dtype="bfloat16")


def build_smollm2(llama_cpp: Path, fixtures: Path, work: Path) -> None:
    """A rank-2 q/k/v adapter on every other layer of SmolLM2-135M (half the layers keeps the
    fixture small). PEFT only needs the module shapes, so a randomly initialised model of the same
    config stands in for the real weights."""
    import torch
    import transformers

    out_dir = fixtures / "smollm2"
    cfg_dir = work / "smollm2" / "hf"
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(cfg_dir, ignore_errors=True)
    cfg = transformers.LlamaConfig(**SMOLLM2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg_dir.mkdir(parents=True)
    cfg.save_pretrained(cfg_dir)  # config.json only: all the reference converter needs
    torch.manual_seed(SEED)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    scaling = make_adapter(model, out_dir / "peft", r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                           layers_to_transform=list(range(0, SMOLLM2["num_hidden_layers"], 2)), save_dtype="float16")
    write_case(out_dir, scaling, "llama", SMOLLM2["num_hidden_layers"])
    lora_to_gguf(llama_cpp, cfg_dir, out_dir / "peft", out_dir / "reference.gguf", outtype="f16")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hf-to-gguf":
        patched_hf_to_gguf(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source dir with convert_*.py and gguf-py")
    ap.add_argument("--out", type=Path, required=True, help="tests/fixtures/convert")
    ap.add_argument("--work", type=Path, required=True, help="scratch dir for the tiny HF models")
    ap.add_argument("--only", nargs="*", help="families to rebuild (default: all, and smollm2)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(args.llama_cpp / "gguf-py"))
    import torch
    torch.set_num_threads(2)
    names = args.only or [*FAMILIES, "smollm2"]
    for name in names:
        log(f"== {name}")
        if name == "smollm2":
            build_smollm2(args.llama_cpp, args.out, args.work)
        else:
            build_family(name, args.llama_cpp, args.out, args.work)


if __name__ == "__main__":
    main()
