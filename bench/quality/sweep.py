"""The quality benchmark's evaluation (issue 8, part 2): merge the task adapters with every
strategy at several budgets, judge each result on the held-out tests by greedy generation
through llama.cpp (`d2c-gguf eval`), and write the table and plot of docs/results.md.

    python sweep.py run [--ks 1,2,4,8,n/4,n/2] [--strategies single,random,kmeans,d2c] ...
    python sweep.py report [--out-dir ../../docs]
    python sweep.py check-objective [--out-dir ../../docs]

Every configuration's result is appended to $D2C_CACHE/quality/sweep/results.jsonl as soon as
it exists, keyed by its settings, so an interrupted sweep resumes where it stopped and a
second run with the same settings does nothing. Scores go through one shared --cache, so the
examples of a task are scored under its own adapter and the base only once for the whole sweep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ADAPTERS, BASE_GGUF, QUALITY, TASKS, log, read_jsonl, task_names, write_atomic

ROOT = Path(__file__).resolve().parents[2]
# D2C_BIN: a copy of the binary, so that the tree can be rebuilt while a long sweep runs.
BIN = Path(os.environ.get("D2C_BIN", ROOT / "target" / "release" / "d2c-gguf"))
SWEEP = QUALITY / "sweep"
RESULTS = SWEEP / "results.jsonl"
# Greedy exact match of each result on the clustering examples (not the tests), for check-objective.
EXAMPLES = SWEEP / "examples.jsonl"
# Own-adapter accuracy from which a task's normalised score is also reported on its own.
SOLID_CEILING = 0.5
# Strategies run at byte budgets (--fractions) rather than at counts K.
BYTE_STRATEGIES = ("truncate", "truncate-energy", "allocate")
# Bumped when the allocator's choices change, so that its rows are measured again while the
# other strategies' results (same settings) stay: 2 = energy sizes below rank 1 in the lower-bit
# storage types too.
ALLOCATOR_REVISION = 2
# Bumped when D2C's search changes (its d2c* rows are measured again, the others stay):
# 2 = the moves judged picked by the activation model, every start polished under it (session
# 9's first try); 3 = the N x K scored screen on each task's first 3 examples (merge
# --screen-examples 3, the default), the --init start also polished by the activation model.
# "d2c-activations" is revision 3 with `--screen activations`. 4 = clusters judged cross-fitted
# (merge --judge cross-fit, the default: each half of a member's examples scored under the regmean
# fit on the other half); "d2c-insample" is revision 4 with `--judge in-sample`, revision 3's search.
# 5 = a round takes every judged move that helps, each judged after the ones taken before it
# (revision 4 took only moves between clusters no better move of the round had touched).
# 6 = the tuning (operator x multiplier) and the serve scales chosen by the cross-fitted judge
# too (revision 5 chose them in sample, on the fit to all examples). 7 = a round takes the best
# judged move, then each other one that helped, best first, judged again where a taken move
# changed its clusters (revision 5's order of the screen stopped at a higher objective).
# 8 (measured, not kept: commit bfe7254) = a round whose page of the screen found nothing judged
# the next page; its rows stay in results.jsonl under /d8, so the next revision is 9.
# 9 = D2C starts from weight-space anticlusters (merge's default --init anticluster); those
# rows were measured as "d2c-anti" under revision 7, the same binary and flags. 10 = that
# start is the best of 256 exchange optima (lowest within-cluster similarity) instead of one,
# and the restarts take the next best of them instead of other seeds' single exchanges.
D2C_REVISION = 10
# Bumped when the "anticluster" strategy's partition changes: 2 = the best of 256 exchanges.
ANTICLUSTER_REVISION = 2
# Bumped when the tuning of merged clusters (operator x multiplier, serve scales) changes, for
# the partitions that do not follow D2C_REVISION (random, k-means, single): 2 = chosen by the
# cross-fitted judge (merge --judge cross-fit) instead of in sample.
TUNING_REVISION = 2
TUNED_STRATEGIES = ("random", "kmeans", "single", "anticluster")
# "d2c-soft" is d2c with `--objective soft` (each example counted by its margin), "d2c-margin"
# with `--objective exact-margin` (exact match, the margins breaking its ties).
# "d2c-anti" starts from weight-space anticlusters (`--init anticluster`, the default since
# revision 9); "d2c-kinit" from k-medoids (`--init kmeans`: revision 7's starts).
# "d2c-own" judges each task's examples against its own adapter's answers (`--targets own`).
D2C_STRATEGIES = ("d2c", "d2c-activations", "d2c-bytes", "d2c-rinit", "d2c-nl", "d2c-insample", "d2c-soft", "d2c-margin", "d2c-anti", "d2c-kinit", "d2c-own")
# The merge flags each D2C variant adds to d2c's ("d2c-rinit": from a seeded random partition).
D2C_VARIANT_FLAGS = {
    "d2c-rinit": ["--init", "random"],
    "d2c-activations": ["--screen", "activations"],
    "d2c-insample": ["--judge", "in-sample"],
    "d2c-soft": ["--objective", "soft"],
    "d2c-margin": ["--objective", "exact-margin"],
    "d2c-anti": ["--init", "anticluster"],
    "d2c-kinit": ["--init", "kmeans"],
    "d2c-own": ["--targets", "own"],
}


def sh(args: list[str]) -> str:
    log(" ".join(str(a) for a in args))
    done = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"sweep: command failed ({done.returncode}): {' '.join(str(a) for a in args)}")
    return done.stdout


def evaluate(tests: Path, extra: list[str], threads: int) -> dict:
    out = sh([BIN, "eval", "--base", BASE_GGUF, "--tests", tests, "--threads", threads, "--json", *extra])
    return json.loads(out)


def task_set(families: str | None, extra_samples: int = 0, extra_seen: bool = True) -> tuple[str, list[str], Path]:
    """The tasks of the benchmark (or of some of its families) as a directory of links
    `adapters/`, `samples/`, `test/`, and the set's name ("all" or the families joined).

    With `extra_samples` N the last N tests of each task leave the tests (set "<name>-t<rest>"),
    and where `extra_seen` they join the examples the merge sees ("<name>-t<rest>-x<N>"): the
    same held-out tests with 10 or 10 + N examples, fresh inputs the adapters never trained on
    (the train split holds every input of the small tasks), to measure what more evidence buys."""
    info = json.loads((TASKS / "tasks.json").read_text())["tasks"]
    chosen = sorted(families.split(",")) if families else None
    tasks = [t for t in task_names() if chosen is None or info[t]["family"] in chosen]
    if not tasks:
        sys.exit(f"sweep: no task in families {families}")
    name = "all" if chosen is None else "+".join(chosen)
    if extra_samples:
        short = [t for t in tasks if info[t]["test"] <= extra_samples]
        if short:
            sys.exit(f"sweep: --extra-samples {extra_samples} would leave no tests for {short}")
        tests_left = {t: info[t]["test"] - extra_samples for t in tasks}
        name += f"-t{min(tests_left.values())}" + (f"-x{extra_samples}" if extra_seen else "")
    root = SWEEP / "sets" / name
    if extra_samples:
        for t in tasks:
            test = read_jsonl(TASKS / "test" / f"{t}.jsonl")
            kept, moved = test[: tests_left[t]], test[tests_left[t]:]
            samples = read_jsonl(TASKS / "samples" / f"{t}.jsonl") + (moved if extra_seen else [])
            for sub, rows in (("test", kept), ("samples", samples)):
                dest = root / sub / f"{t}.jsonl"
                if not dest.is_file():
                    write_atomic(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    linked = [("adapters", ADAPTERS, "gguf")]
    if not extra_samples:
        linked += [("samples", TASKS / "samples", "jsonl"), ("test", TASKS / "test", "jsonl")]
    for sub, src, ext in linked:
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        for t in tasks:
            link = d / f"{t}.{ext}"
            if not link.is_symlink():
                link.symlink_to(src / f"{t}.{ext}")
    # The same examples with the newline that ends every answer (the adapters were trained to
    # emit it and `eval` stops on it): scoring it makes the merge see answers that run on. This
    # scores exactly what `merge --score-end newline` scores (tests/score.rs checks that), and is
    # how the d2c-nl results were measured.
    nl = root / "samples-nl"
    nl.mkdir(exist_ok=True)
    for t in tasks:
        dest = nl / f"{t}.jsonl"
        if not dest.is_file():
            rows = read_jsonl(root / "samples" / f"{t}.jsonl")
            write_atomic(dest, "".join(json.dumps({**r, "completion": r["completion"] + "\n"}) + "\n" for r in rows))
    return name, tasks, root


def merged_dir(key: str) -> Path:
    """Where `run` writes the merge of the result `key`."""
    return SWEEP / "merged" / key.replace("/", "-")


def load_results() -> dict[str, dict]:
    if not RESULTS.is_file():
        return {}
    return {r["key"]: r for r in read_jsonl(RESULTS)}


def append_result(row: dict) -> None:
    SWEEP.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def parse_ks(spec: str, n: int) -> list[int]:
    ks = []
    for part in spec.split(","):
        part = part.strip().lower()
        k = n // int(part[2:]) if part.startswith("n/") else int(part)
        if 1 <= k < n and k not in ks:
            ks.append(k)
    return sorted(ks)


def run(args: argparse.Namespace) -> None:
    set_name, tasks, root = task_set(args.families, args.extra_samples, not args.extra_samples_unseen)
    n = len(tasks)
    missing = [t for t in tasks if not (ADAPTERS / f"{t}.gguf").is_file()]
    if missing:
        sys.exit(f"sweep: {len(missing)} task adapters missing in {ADAPTERS} (run scripts/quality-build.sh): {missing[:5]}")
    done = load_results()
    merge_settings = {
        # The merge's defaults that change what it picks (older results are other keys).
        "objective": "exact",
        "restarts": 4,
        "rounds": args.rounds,
        "tune_methods": args.tune_methods,
        "tune_scales": args.tune_scales,
        "max_tokens": args.max_tokens,
    }
    if args.method != "svd":
        # The operator D2C's rounds merge with (rows without the key used svd).
        merge_settings["method"] = args.method
    if args.serve_scales != "1":
        # Rows without the key were merged before per-task serve scales (or with them off).
        merge_settings["serve_scales"] = args.serve_scales

    def once(key: str, make) -> None:
        if key in done:
            return
        row = make()
        row["key"] = key
        append_result(row)
        done[key] = row

    # Ceilings and floor: every task under its own adapter, and the base model.
    def reference(kind: str) -> dict:
        t = time.time()
        extra = ["--adapters", root / "adapters"] if kind == "own" else []
        ev = evaluate(root / "test", [*extra, "--max-tokens", str(args.max_tokens)], args.threads)
        return {"set": set_name, "strategy": kind, "k": n if kind == "own" else 0, "eval": ev, "eval_seconds": time.time() - t}

    once(f"{set_name}/own/{args.max_tokens}", lambda: reference("own"))
    once(f"{set_name}/base/{args.max_tokens}", lambda: reference("base"))

    def evaluate_set(out: Path) -> tuple[dict, dict, float]:
        """A merged set's manifest, its held-out evaluation, and the seconds that took."""
        t = time.time()
        ev = evaluate(root / "test", ["--manifest", out / "manifest.json", "--max-tokens", str(args.max_tokens)], args.threads)
        return json.loads((out / "manifest.json").read_text()), ev, time.time() - t

    configs = []
    for k in parse_ks(args.ks, n):
        for strategy in args.strategies.split(","):
            if strategy in BYTE_STRATEGIES or strategy == "d2c-add":
                continue  # by --fractions, and after the others
            if strategy == "single":
                if k == 1:
                    configs.append(("single", 1, 0))
            elif strategy in ("random", "anticluster"):
                configs += [(strategy, k, s) for s in range(args.random_seeds)]
            elif strategy == "d2c-rinit":
                configs += [("d2c-rinit", k, s) for s in range(args.random_seeds)] if k > 1 else []
            elif strategy == "d2c" and k > 1:
                configs += [("d2c", k, s) for s in range(args.d2c_seeds)]
            elif k > 1 or strategy == "kmeans":
                configs.append((strategy, k, 0))
    settings_id = hashlib.blake2s(json.dumps(merge_settings, sort_keys=True).encode(), digest_size=4).hexdigest()
    # Byte-budget mode: D2C given the bytes that D2C at K used at full rank, free to spend them
    # on K (or 2K, ...) clusters with per-cluster ranks ("d2c-bytes", k = number of clusters).
    if args.byte_budget:
        for k in parse_ks(args.ks, n):
            for clusters in (int(m) * k for m in args.byte_budget.split(",")):
                if clusters < n:
                    configs.append(("d2c-bytes", clusters, k))
    # Byte budgets (issue 16): the truncation baselines (every task keeps its own adapter, cut
    # to 1/F of the input bytes) and the allocator at the same bytes; `seed` carries F. Their K in the report is N / F, the count of full-rank adapters
    # the same bytes would hold, so that they line up with merging at that K.
    truncations = [s for s in args.strategies.split(",") if s in BYTE_STRATEGIES]
    input_bytes = sum((root / "adapters" / f"{t}.gguf").stat().st_size for t in tasks)
    for f in [int(x) for x in args.fractions.split(",")] if args.fractions else []:
        configs += [(s, n, f) for s in truncations]
    for strategy, k, seed in configs:
        # For d2c-bytes `seed` names the count-mode K whose bytes are the budget; for the
        # truncations, the fraction of the input bytes (1/seed).
        tag = "of" if strategy == "d2c-bytes" else "f" if strategy in truncations else "s"
        key = f"{set_name}/{strategy}/k{k}/{tag}{seed}/{settings_id}"
        if strategy == "allocate" and ALLOCATOR_REVISION > 1:
            key += f"/a{ALLOCATOR_REVISION}"
        if strategy in D2C_STRATEGIES and D2C_REVISION > 1:
            key += f"/d{D2C_REVISION}"
        if strategy in TUNED_STRATEGIES and TUNING_REVISION > 1:
            key += f"/t{TUNING_REVISION}"
        if strategy == "anticluster" and ANTICLUSTER_REVISION > 1:
            key += f"/x{ANTICLUSTER_REVISION}"

        def make(strategy=strategy, k=k, seed=seed) -> dict:
            out = merged_dir(key)
            extra: list = []
            if strategy == "d2c-bytes":
                ref = done.get(f"{set_name}/d2c/k{seed}/s0/{settings_id}" + (f"/d{D2C_REVISION}" if D2C_REVISION > 1 else ""))
                if ref is None:
                    sys.exit(f"sweep: d2c-bytes at K={k} needs the d2c result at K={seed} first (put d2c in --strategies)")
                extra = ["--budget-bytes", ref["storage"]["bytes"]]
            if strategy in truncations:
                extra = ["--budget-bytes", input_bytes // seed]
            extra += D2C_VARIANT_FLAGS.get(strategy, [])
            samples = root / ("samples-nl" if strategy == "d2c-nl" else "samples")
            t = time.time()
            sh([BIN, "merge", "--base", BASE_GGUF, "--adapters", root / "adapters", "--samples", samples,
                "--budget", k, "--strategy", "d2c" if strategy in D2C_STRATEGIES else strategy,
                "--seed", 0 if strategy == "d2c-bytes" else seed, "--rounds", args.rounds,
                "--method", args.method, "--tune-methods", args.tune_methods, "--tune-scales", args.tune_scales, "--serve-scales", args.serve_scales, *extra,
                "--threads", args.threads, "--cache", SWEEP / "score-cache", "--out", out, "--force"])
            merge_seconds = time.time() - t
            manifest, ev, eval_seconds = evaluate_set(out)
            return {
                "set": set_name,
                "strategy": strategy,
                "k": n / seed if strategy in truncations else k,
                "seed": seed,
                "settings": merge_settings,
                "merge_seconds": merge_seconds,
                "eval_seconds": eval_seconds,
                "storage": manifest["storage"],
                "objective": manifest["objective"],
                "rounds": [{"objective": r["objective"], "scored_sequences": r["scored_sequences"]} for r in manifest["rounds"]],
                "clusters": [a["tasks"] for a in manifest["adapters"]],
                "ranks": [a.get("rank") for a in manifest["adapters"]],
                "scoring": manifest["scoring"],
                "eval": ev,
            }

        once(key, make)

    # Issue 19: D2C on every task but one, then `add` of that one, against the full rerun (the
    # d2c row at the same K). Its own score cache, so that neither step reuses the full run's
    # scores: the times are what a user updating a deployed set would see.
    def add_one(held: str) -> None:
        if held not in tasks:
            sys.exit(f"sweep: --add-task {held} is not a task of the set")
        rest = root.parent / f"{set_name}-without-{held}"
        for sub, ext in (("adapters", "gguf"), ("samples", "jsonl")):
            (rest / sub).mkdir(parents=True, exist_ok=True)
            for t in tasks:
                link = rest / sub / f"{t}.{ext}"
                if t != held and not link.is_symlink():
                    link.symlink_to(root / sub / f"{t}.{ext}")
        for k in [k for k in parse_ks(args.ks, n) if k > 1]:
            key = f"{set_name}/d2c-add/k{k}/{held}/{settings_id}/d{D2C_REVISION}"

            def make_add(k=k, key=key) -> dict:
                cache = SWEEP / "score-cache-add" / key.replace("/", "-")
                before, after = merged_dir(key + "/before"), merged_dir(key)
                t = time.time()
                sh([BIN, "merge", "--base", BASE_GGUF, "--adapters", rest / "adapters", "--samples", rest / "samples",
                    "--budget", k, "--strategy", "d2c", "--seed", 0, "--rounds", args.rounds,
                    "--method", args.method, "--tune-methods", args.tune_methods, "--tune-scales", args.tune_scales, "--serve-scales", args.serve_scales,
                    "--threads", args.threads, "--cache", cache, "--out", before, "--force"])
                before_seconds = time.time() - t
                t = time.time()
                sh([BIN, "add", "--manifest", before / "manifest.json", "--adapter", root / "adapters" / f"{held}.gguf",
                    "--samples", root / "samples" / f"{held}.jsonl", "--threads", args.threads, "--cache", cache, "--out", after, "--force"])
                add_seconds = time.time() - t
                manifest, ev, eval_seconds = evaluate_set(after)
                return {
                    "set": set_name,
                    "strategy": "d2c-add",
                    "k": k,
                    "seed": 0,
                    "added": held,
                    "settings": merge_settings,
                    # The update's cost; the merge of the other tasks it started from apart.
                    "merge_seconds": add_seconds,
                    "before_merge_seconds": before_seconds,
                    "eval_seconds": eval_seconds,
                    "storage": manifest["storage"],
                    "objective": manifest["objective"],
                    "lineage": manifest["lineage"],
                    "clusters": [a["tasks"] for a in manifest["adapters"]],
                    "scoring": manifest["scoring"],
                    "eval": ev,
                }

            once(key, make_add)
    if "d2c-add" in args.strategies.split(","):
        for held in args.add_task.split(","):
            add_one(held)
    log(f"sweep: {len(done)} results in {RESULTS}")


def normalised(ev: dict, own: dict, min_ceiling: float = 0.0) -> tuple[float, int]:
    """Mean over tasks of accuracy / own-adapter accuracy; tasks the own adapter never gets
    right carry no information and are left out (their count is returned), as are tasks whose
    own accuracy is below `min_ceiling` (a ratio over 3/40 right mostly measures noise)."""
    ratios = []
    skipped = 0
    for task, r in ev["tasks"].items():
        ceiling = own["tasks"][task]["accuracy"]
        if ceiling <= 0 or ceiling < min_ceiling:
            skipped += 1
            continue
        ratios.append(r["accuracy"] / ceiling)
    return sum(ratios) / max(len(ratios), 1), skipped


def report(args: argparse.Namespace) -> None:
    set_name = "all" if not args.families else "+".join(sorted(args.families.split(",")))
    rows = [r for r in load_results().values() if r.get("set") == set_name]
    keys = {r["key"] for r in rows}
    own = next((r for r in rows if r["strategy"] == "own"), None)
    base = next((r for r in rows if r["strategy"] == "base"), None)
    if own is None:
        sys.exit(f"sweep: no own-adapter result in {RESULTS}; run `sweep.py run` first")
    n = len(own["eval"]["tasks"])
    families = json.loads((TASKS / "tasks.json").read_text())["tasks"]

    # Group random seeds: mean and spread.
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["strategy"] in ("own", "base"):
            continue
        label = r["strategy"]
        if label == "d2c-bytes":
            m = r["k"] // r["seed"]
            label = f"d2c-bytes ({'' if m == 1 else m}K)"
        if label == "allocate":
            parts = r["key"].split("/")  # set/strategy/k/f/settings[/aREVISION]
            revision = int(parts[5][1:]) if len(parts) > 5 else 1
            label = "allocate" if revision == ALLOCATOR_REVISION else f"allocate (revision {revision})"
        if label == "d2c-add":
            label += f" {r['added']}"
        if r["strategy"] in (*D2C_STRATEGIES, "d2c-add"):
            parts = r["key"].split("/")  # set/strategy/k/seed (d2c-add: task)/settings[/dREVISION]
            revision = int(parts[5][1:]) if len(parts) > 5 and parts[5].startswith("d") else 1
            if (label, revision) == ("d2c-anti", 7):
                # Revision 9 was first measured under this name (above); a d2c row of revision 9
                # at the same K and seed is the same search run again, counted once.
                if f"{set_name}/d2c/k{r['k']}/s{r['seed']}/{parts[4]}/d9" in keys:
                    continue
                label, revision = "d2c", 9
            if revision != D2C_REVISION:
                label += f" (revision {revision})"
        if r["strategy"] in TUNED_STRATEGIES:
            parts = r["key"].split("/")  # set/strategy/k/seed/settings[/tREVISION]
            revision = int(parts[5][1:]) if len(parts) > 5 and parts[5].startswith("t") else 1
            if revision != TUNING_REVISION:
                label += f" (tuning {revision})"
        if r["strategy"] == "anticluster":
            last = r["key"].split("/")[-1]
            revision = int(last[1:]) if last.startswith("x") else 1
            if revision != ANTICLUSTER_REVISION:
                label += f" (one exchange, revision {revision})"
        if r.get("settings", {}).get("serve_scales", "1") != "1":
            label += " + serve scales"
        groups.setdefault((label, r["k"]), []).append(r)
    order = {"single": 0, "random": 1, "kmeans": 2, "anticluster": 2.5, "d2c-activations": 3.4, "d2c": 3.6, "d2c-insample": 3.7, "d2c-soft": 3.75, "d2c-margin": 3.76, "d2c-anti": 3.77, "d2c-kinit": 3.78, "d2c-own": 3.79, "d2c-add": 3.8, "d2c-nl": 4, "d2c-rinit": 5, "d2c-bytes": 6, "truncate": 8, "truncate-energy": 9, "allocate": 11}
    ordered = sorted(groups.items(), key=lambda g: (g[0][1], order.get(g[0][0].split(" ")[0], 9), g[0][0]))
    lines = []
    points: dict[str, list[tuple[float, float]]] = {}
    for (strategy, k), rs in ordered:
        scores = [normalised(r["eval"], own["eval"])[0] for r in rs]
        solid = [normalised(r["eval"], own["eval"], SOLID_CEILING)[0] for r in rs]
        acc = [r["eval"]["mean_accuracy"] for r in rs]
        frac = sum(r["storage"]["byte_fraction"] for r in rs) / len(rs)
        mean = sum(scores) / len(scores)
        spread = f" ± {(max(scores) - min(scores)) / 2:.3f}" if len(scores) > 1 else ""
        minutes = sum(r["merge_seconds"] for r in rs) / len(rs) / 60
        lines.append(
            f"| {strategy}{f' ({len(rs)} seeds)' if len(rs) > 1 else ''} | {k} | {frac:.3f} | "
            f"{mean:.3f}{spread} | {sum(solid) / len(solid):.3f} | {sum(acc) / len(acc):.3f} | {minutes:.1f} |"
        )
        points.setdefault(strategy, []).append((frac, mean))
    own_acc = own["eval"]["mean_accuracy"]
    base_norm = normalised(base["eval"], own["eval"])[0] if base else float("nan")
    base_solid = normalised(base["eval"], own["eval"], SOLID_CEILING)[0] if base else float("nan")
    n_solid = sum(1 for t in own["eval"]["tasks"].values() if t["accuracy"] >= SOLID_CEILING)
    _, skipped = normalised(own["eval"], own["eval"])
    table = "\n".join(
        [
            f"| strategy | K | storage (fraction of the N adapters' bytes) | mean normalised score | normalised, tasks with own >= {SOLID_CEILING} ({n_solid}) | mean accuracy | merge time (min) |",
            "|---|---|---|---|---|---|---|",
            f"| own adapters | {n} | 1.000 | 1.000 | 1.000 | {own_acc:.3f} | - |",
            *lines,
            f"| base model | 0 | 0.000 | {base_norm:.3f} | {base_solid:.3f} | {base['eval']['mean_accuracy'] if base else float('nan'):.3f} | - |",
        ]
    )
    per_task = "\n".join(
        f"| {t} | {families[t]['family']} | {own['eval']['tasks'][t]['accuracy']:.2f} | "
        f"{base['eval']['tasks'][t]['accuracy'] if base else float('nan'):.2f} |"
        for t in sorted(own["eval"]["tasks"])
    )
    # Mean accuracy per family: where merging hurts, and which grouping hurts it.
    fams = sorted({families[t]["family"] for t in own["eval"]["tasks"]})

    def by_family(ev: dict) -> str:
        cells = []
        for f in fams:
            accs = [v["accuracy"] for t, v in ev["tasks"].items() if families[t]["family"] == f]
            cells.append(f"{sum(accs) / len(accs):.2f}")
        return " | ".join(cells)

    family_rows = [f"| own adapters | {n} | {by_family(own['eval'])} |"]
    for (strategy, k), rs in ordered:
        for r in sorted(rs, key=lambda r: r["seed"]):
            seed = f" (seed {r['seed']})" if len(rs) > 1 else ""
            family_rows.append(f"| {strategy}{seed} | {k} | {by_family(r['eval'])} |")
    if base:
        family_rows.append(f"| base model | 0 | {by_family(base['eval'])} |")
    family_table = "\n".join([f"| strategy | K | {' | '.join(fams)} |", "|---|---|" + "---|" * len(fams), *family_rows])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "" if set_name == "all" else f"-{set_name.replace('+', '-')}"
    plot(points, own_acc, base_norm, out_dir / f"quality-vs-storage{stem}.png", f"{n} tasks ({set_name})")
    write_atomic(out_dir / f"results-table{stem}.md", f"{table}\n\n{skipped} task(s) left out of the normalised score (own adapter accuracy 0).\n\nMean accuracy per family:\n\n{family_table}\n\n| task | family | own accuracy | base accuracy |\n|---|---|---|---|\n{per_task}\n")
    log(f"wrote {out_dir}/results-table{stem}.md and {out_dir}/quality-vs-storage{stem}.png")
    print(table)


def check_objective(args: argparse.Namespace) -> None:
    """Does the merge's example objective rank partitions as the held-out tests do? For every
    merged result at one K, compare the objective the merge minimised (mean normalised NLL regret
    on the 10 examples per task) and greedy exact match on those same examples with the test
    score, by Spearman rank correlation over the results at that K. Exact match on the
    examples is computed here (`d2c-gguf eval` on the samples) and cached in examples.jsonl."""
    import numpy as np

    set_name, _, root = task_set(args.families)
    rows = [r for r in load_results().values() if r.get("set") == set_name]
    own = next((r for r in rows if r["strategy"] == "own"), None)
    if own is None:
        sys.exit(f"sweep: no own-adapter result in {RESULTS}; run `sweep.py run` first")
    on_examples = {r["key"]: r for r in read_jsonl(EXAMPLES)} if EXAMPLES.is_file() else {}

    # The examples are decoded as the tests were (same --max-tokens as the own-adapter result).
    max_tokens = own["key"].rsplit("/", 1)[1]

    def examples_eval(key: str, extra: list) -> dict:
        if key not in on_examples:
            row = {"key": key, "eval": evaluate(root / "samples", [*extra, "--max-tokens", max_tokens], args.threads)}
            with open(EXAMPLES, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            on_examples[key] = row
        return on_examples[key]["eval"]

    own_examples = examples_eval(own["key"], ["--adapters", root / "adapters"])
    ks = {int(k) for k in args.ks.split(",")} if args.ks else None
    # d2c-nl's objective is measured on other examples (with the newline), so it is not compared;
    # d2c-bytes at the same bytes repeats d2c's adapters and would count them twice.
    merged = [r for r in rows if r["strategy"] not in ("own", "base", "single", "d2c-nl", "d2c-bytes") and (ks is None or r["k"] in ks) and (merged_dir(r["key"]) / "manifest.json").is_file()]
    points = []
    for r in sorted(merged, key=lambda r: (r["k"], r["key"])):
        ev = examples_eval(r["key"], ["--manifest", merged_dir(r["key"]) / "manifest.json"])
        label = r["strategy"] if r["strategy"] not in ("random", "anticluster", "d2c-rinit") else f"{r['strategy']} s{r['seed']}"
        points.append((r["k"], label, r["objective"]["best"], normalised(ev, own_examples)[0], normalised(r["eval"], own["eval"])[0]))

    def spearman(x: list[float], y: list[float]) -> float:
        rank = lambda v: np.argsort(np.argsort(v)).astype(float)
        return float(np.corrcoef(rank(np.array(x)), rank(np.array(y)))[0, 1])

    lines = ["| K | result | example objective (NLL regret, lower is better) | normalised exact match on the examples | normalised exact match on the tests |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {label} | {obj:.3f} | {ex:.3f} | {test:.3f} |" for k, label, obj, ex, test in points]
    corr = ["", "| K | results | Spearman(-objective, test) | Spearman(examples exact match, test) |", "|---|---|---|---|"]
    for k in sorted({p[0] for p in points}):
        at = [p for p in points if p[0] == k]
        if len(at) >= 3:
            tests = [p[4] for p in at]
            corr.append(f"| {k} | {len(at)} | {spearman([-p[2] for p in at], tests):.2f} | {spearman([p[3] for p in at], tests):.2f} |")
    text = "\n".join(lines + corr) + "\n"
    stem = "" if set_name == "all" else f"-{set_name.replace('+', '-')}"
    write_atomic(Path(args.out_dir) / f"objective-check{stem}.md", text)
    print(text)


def plot(points: dict[str, list[tuple[float, float]]], own_acc: float, base_norm: float, path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    markers = {"single": "s", "random": "x", "kmeans": "^", "d2c": "o", "d2c-nl": "*", "d2c-rinit": "P", "d2c-bytes": "D", "truncate": "<", "truncate-energy": ">", "allocate": "X"}
    # Earlier revisions and the add runs are in the table only; the plot shows what runs today.
    current = {k: v for k, v in points.items() if "(revision" not in k and "(tuning" not in k and not k.startswith("d2c-add")}
    for strategy, pts in sorted(current.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(strategy.split(" ")[0], "."), label=strategy)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="own adapters")
    if base_norm == base_norm:
        ax.axhline(base_norm, color="grey", lw=0.8, ls=":", label="base model")
    ax.set_xlabel("storage: fraction of the task adapters' bytes")
    ax.set_ylabel("mean normalised score (accuracy / own)")
    ax.set_xscale("log")
    # Ticks at the measured storage fractions; log-axis minor labels would overlap them.
    fracs: list[float] = []
    for x in sorted({round(x, 3) for pts in points.values() for x, _ in pts}):
        if not fracs or x / fracs[-1] > 1.3:
            fracs.append(x)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(fracs, [f"{x:g}" for x in fracs], fontsize=8)
    ax.set_title(f"SmolLM2-135M, {what}, held-out exact match", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--ks", default="1,2,4,8,n/4,n/2", help="budgets; n/4 and n/2 follow the task count")
    r.add_argument("--strategies", default="single,random,kmeans,d2c", help="also d2c-add: d2c on every task but --add-task, then `add` of it; d2c-activations: d2c with merge --screen activations; d2c-rinit: d2c from a random partition, over --random-seeds; d2c-nl: d2c scoring each example's closing newline too; anticluster: weight-space anticlusters, over --random-seeds; d2c-anti / d2c-kinit: d2c with merge --init anticluster / kmeans; d2c-own: d2c with merge --targets own")
    r.add_argument("--random-seeds", type=int, default=3)
    r.add_argument("--d2c-seeds", type=int, default=1, help="d2c over merge --seed 0..N-1 (other starts: anticlusters of seeds s..s+2 and k-medoids of seed s), to see how far one run's result moves")
    r.add_argument("--add-task", default="case-snake", help="with --strategies d2c-add: the task merged last, by `d2c-gguf add` (comma-separated: one such run each)")
    r.add_argument("--rounds", type=int, default=6)
    r.add_argument("--method", default="svd", help="merge --method: the operator the rounds merge with")
    r.add_argument("--tune-methods", default="svd,ties,dare")
    r.add_argument("--tune-scales", default="1,1.25,1.5")
    r.add_argument("--serve-scales", default="0.5,1,1.5,2,3", help="merge --serve-scales; 1 = off (the rows before per-task scales)")
    r.add_argument("--max-tokens", type=int, default=12)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--families", help="only the tasks of these families (comma-separated)")
    r.add_argument("--fractions", metavar="F,F", help="with --strategies truncate,truncate-energy,allocate: the byte budgets, as 1/F of the input adapters' bytes (e.g. 2,4,8,16,32)")
    r.add_argument("--extra-samples", type=int, default=0, metavar="N", help="move the last N tests of each task into the examples the merge sees (a set of its own: fewer tests, 10 + N examples)")
    r.add_argument("--extra-samples-unseen", action="store_true", help="with --extra-samples: drop those tests but keep the merge on the 10 examples (the same tests, to compare with)")
    r.add_argument("--byte-budget", metavar="MULTIPLIERS", help="also d2c with --budget-bytes set to the bytes of d2c at each K, with K times each multiplier clusters (e.g. 1,2)")
    rep = sub.add_parser("report")
    rep.add_argument("--families")
    rep.add_argument("--out-dir", default=str(ROOT / "docs"))
    chk = sub.add_parser("check-objective", help="rank agreement of the example objective and example exact match with the test score")
    chk.add_argument("--families")
    chk.add_argument("--ks", help="only the results at these K (comma-separated numbers)")
    chk.add_argument("--threads", type=int, default=2)
    chk.add_argument("--out-dir", default=str(ROOT / "docs"))
    args = p.parse_args()
    {"run": run, "report": report, "check-objective": check_objective}[args.cmd](args)


if __name__ == "__main__":
    main()
