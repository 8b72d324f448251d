"""Dense baseline of the merge benchmark: for every target form the averaged delta
sum_i w_i s_i B_i A_i (out x in) and take numpy's thin SVD, keep the top `rank`.

usage: bench_merge_numpy.py INPUT_DIR OUT.gguf RANK
"""

import sys
import time

import numpy as np

from bench_merge_common import read_inputs, report, scale, write_merged


def main():
    directory, out, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
    arch, inputs = read_inputs(directory)
    n = len(inputs)
    names = sorted({t for _, targets in inputs for t in targets})
    t0 = time.perf_counter()
    merged = {}
    for name in names:
        delta = None
        for alpha, targets in inputs:
            if name not in targets:
                continue
            a, b = targets[name]
            d = (scale(alpha, a.shape[0]) / n) * (b @ a)
            delta = d if delta is None else delta + d
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        merged[name] = (vt[:rank], u[:, :rank] * s[:rank])
    secs = time.perf_counter() - t0
    write_merged(out, arch, merged, rank)
    report(merge_seconds=secs, targets=len(names))


if __name__ == "__main__":
    main()
