"""PEFT contender of the merge benchmark: load the input adapters into a PEFT LoRA model whose
base layers have the targets' shapes (uninitialised weights: the merge never reads them), then
time `add_weighted_adapter(combination_type="svd")` with PEFT's defaults, as its users call it.

usage: bench_merge_peft.py INPUT_DIR OUT.gguf RANK
"""

import sys
import time

import numpy as np
import torch
from torch import nn
from peft import LoraConfig, get_peft_model

from bench_merge_common import read_inputs, report, write_merged

# llama.cpp name -> (HF parent, HF module)
MODULES = {
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}


def parse(name):
    # blk.L.attn_q.weight -> (L, attn_q)
    parts = name.split(".")
    return int(parts[1]), parts[2]


class Block(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        for mod, (n_out, n_in) in shapes.items():
            parent, child = MODULES[mod]
            setattr(getattr(self, parent), child, torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=False))


class Model(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList([Block(s) for s in layers])


def main():
    directory, out, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t_setup = time.perf_counter()
    arch, inputs = read_inputs(directory)
    n_layers = 1 + max(parse(t)[0] for _, targets in inputs for t in targets)
    layers = [dict() for _ in range(n_layers)]
    for _, targets in inputs:
        for name, (a, b) in targets.items():
            layer, mod = parse(name)
            layers[layer][mod] = (b.shape[0], a.shape[1])
    model = Model(layers)
    hf_targets = sorted({MODULES[m][1] for l in layers for m in l})

    names = [f"a{k}" for k in range(len(inputs))]
    peft_model = None
    for adapter_name, (alpha, targets) in zip(names, inputs):
        r = next(iter(targets.values()))[0].shape[0]
        config = LoraConfig(r=r, lora_alpha=alpha if alpha != 0 else r, target_modules=hf_targets, lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        else:
            peft_model.add_adapter(adapter_name, config)
        base = peft_model.base_model.model
        with torch.no_grad():
            for name, (a, b) in targets.items():
                layer, mod = parse(name)
                parent, child = MODULES[mod]
                m = getattr(getattr(base.layers[layer], parent), child)
                m.lora_A[adapter_name].weight.copy_(torch.from_numpy(a))
                m.lora_B[adapter_name].weight.copy_(torch.from_numpy(b))
    setup = time.perf_counter() - t_setup

    t0 = time.perf_counter()
    with torch.no_grad():
        peft_model.add_weighted_adapter(
            adapters=names,
            weights=[1.0 / len(names)] * len(names),
            adapter_name="merged",
            combination_type="svd",
            svd_rank=rank,
        )
    secs = time.perf_counter() - t0

    merged = {}
    base = peft_model.base_model.model
    for layer, shapes in enumerate(layers):
        for mod in shapes:
            parent, child = MODULES[mod]
            m = getattr(getattr(base.layers[layer], parent), child)
            assert m.scaling["merged"] == 1.0
            merged[f"blk.{layer}.{mod}.weight"] = (
                m.lora_A["merged"].weight.detach().numpy(),
                m.lora_B["merged"].weight.detach().numpy(),
            )
    write_merged(out, arch, merged, rank)
    report(merge_seconds=secs, setup_seconds=setup, targets=len(merged), torch_threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
