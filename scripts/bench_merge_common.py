"""Shared I/O of the merge benchmark's Python contenders: read the input adapters (GGUF, via
gguf-py) and write a merged adapter that d2c-gguf reads back to measure its error."""

import glob
import json
import os
import sys

import numpy as np
import gguf


def read_inputs(directory):
    """[(alpha, {target: (A (r x in), B (out x r))})] for DIR/input_*.gguf, in name order."""
    out = []
    files = sorted(glob.glob(os.path.join(directory, "input_*.gguf")))
    if not files:
        sys.exit(f"no input_*.gguf in {directory}")
    arch = None
    for f in files:
        r = gguf.GGUFReader(f)
        alpha = float(r.fields["adapter.lora.alpha"].parts[-1][0]) if "adapter.lora.alpha" in r.fields else 0.0
        f_arch = r.fields["general.architecture"]
        arch = bytes(f_arch.parts[f_arch.data[0]]).decode()
        tensors = {}
        for t in r.tensors:
            # gguf-py gives numpy shapes in row-major order: lora_a (r, in), lora_b (out, r).
            base, half = t.name.rsplit(".", 1)
            tensors.setdefault(base, {})[half] = np.array(t.data, dtype=np.float32)
        out.append((alpha, {k: (v["lora_a"], v["lora_b"]) for k, v in tensors.items()}))
    return arch, out


def scale(alpha, rank):
    return 1.0 if alpha == 0 else alpha / rank


def write_merged(path, arch, targets, rank):
    """targets: {name: (A (r x in), B (out x r))} with delta = B A (alpha = r, so scale 1)."""
    w = gguf.GGUFWriter(path, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    for name in sorted(targets):
        a, b = targets[name]
        w.add_tensor(name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def report(**kv):
    print("RESULT " + json.dumps(kv), flush=True)
