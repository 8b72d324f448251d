"""How far the anticluster start moves when one task is removed, by the number of exchanges
it is the best of (crates/d2c-merge/src/cluster.rs: ANTICLUSTER_STARTS).

    d2c-gguf similarity --json ADAPTERS/*.gguf > sim.json
    python anticluster_stability.py sim.json --k 9 --starts 1,64,256 [--every 3]

A model of the Rust exchange (same swaps and stopping rule; Python's random draws, so not the
same partitions): for each removed task, the Jaccard agreement of the pairs sharing a cluster
in the start found without it and in the start of all N restricted to the others. 1 = the
same partition, 0 = no pair kept. Pure Python, minutes at N = 36 and 256 starts.
"""
import argparse
import json
import random


def exchange(sim, idx, k, seed):
    order = list(idx)
    random.Random(seed).shuffle(order)
    a = {t: p % k for p, t in enumerate(order)}
    pull = {i: [0.0] * k for i in idx}
    for i in idx:
        for j in idx:
            if j != i:
                pull[i][a[j]] += sim[i][j]
    for _ in range(100):
        swapped = False
        for i in idx:
            ca, best = a[i], None
            for j in idx:
                cb = a[j]
                if cb == ca:
                    continue
                d = (pull[i][cb] - sim[i][j]) + (pull[j][ca] - sim[i][j]) - pull[i][ca] - pull[j][cb]
                if best is None or d < best[0]:
                    best = (d, j)
            if best is None or best[0] >= -1e-12:
                continue
            j = best[1]
            cb = a[j]
            for t in idx:
                if t != i:
                    pull[t][ca] -= sim[t][i]
                    pull[t][cb] += sim[t][i]
                if t != j:
                    pull[t][cb] -= sim[t][j]
                    pull[t][ca] += sim[t][j]
            a[i], a[j] = cb, ca
            swapped = True
        if not swapped:
            break
    return a


def within(sim, a):
    ks = list(a)
    return sum(sim[i][j] for x, i in enumerate(ks) for j in ks[x + 1:] if a[i] == a[j])


def shared_pairs(a, keep):
    return {(i, j) for x, i in enumerate(keep) for j in keep[x + 1:] if a[i] == a[j]}


def best_of(sim, idx, k, starts):
    return min((exchange(sim, idx, k, s) for s in range(starts)), key=lambda a: within(sim, a))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("similarity")
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--starts", default="1,64,256")
    p.add_argument("--every", type=int, default=1, help="remove every n-th task only")
    args = p.parse_args()
    sim = json.load(open(args.similarity))["matrix"]
    idx = list(range(len(sim)))
    for starts in (int(s) for s in args.starts.split(",")):
        full = best_of(sim, idx, args.k, starts)
        agree = []
        for t in idx[:: args.every]:
            rest = [i for i in idx if i != t]
            without = best_of(sim, rest, args.k, starts)
            a, b = shared_pairs(without, rest), shared_pairs(full, rest)
            agree.append(len(a & b) / max(1, len(a | b)))
        print(f"K={args.k} starts={starts}: within-cluster similarity {within(sim, full):.4f}; "
              f"agreement after removing a task: mean {sum(agree) / len(agree):.2f}, min {min(agree):.2f} ({len(agree)} removals)", flush=True)


if __name__ == "__main__":
    main()
