#!/usr/bin/env bash
# The quality benchmark's evaluation (issue 8, part 2) as run for docs/results.md: merges the 36
# task adapters built by scripts/quality-build.sh with every strategy, judges each result on the
# held-out tests with `d2c-gguf eval`, then writes docs/results-table.md and
# docs/quality-vs-storage.png.
#
#   scripts/quality-sweep.sh            the runs behind docs/results.md (about 6 h on 2 cores)
#   scripts/quality-sweep.sh --full     also 3 random seeds and d2c-rinit at every K, 2K-cluster byte budgets (many hours)
#
# Resumable: every result is appended to $D2C_CACHE/quality/sweep/results.jsonl as it completes and
# skipped when present; scores are shared through one --cache. Run heavy jobs one at a time: llama.cpp
# slows down 5-10x when anything else competes for the two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
CACHE="${D2C_CACHE:-$HOME/.cache/d2c-gguf}"
export D2C_CACHE="$CACHE" PYTHONUNBUFFERED=1
PY="${D2C_QUALITY_VENV:-$CACHE/bench-venv}/bin/python"

[ -s "$CACHE/quality/adapters/unit-m-cm.gguf" ] || scripts/quality-build.sh
cargo build -q --release --bin d2c-gguf

# The first search's merge settings (part of each result's key), for every run but README's
# table: 4 reassignment rounds at most, and per cluster the best of svd/ties at 1x or 1.5x the
# average, chosen on the examples.
SETTINGS=(--rounds 4 --tune-methods svd,ties --tune-scales 1,1.5)
cd bench/quality
sweep() { "$PY" sweep.py run "$@" "${SETTINGS[@]}"; }

# Byte budgets first (issue 16): the allocator against the truncation baselines at the same bytes.
sweep --strategies allocate,truncate-energy --fractions 2,4,8,16,32,64
sweep --strategies truncate --fractions 2,4      # rank 1 is 0.133 of the bytes: nothing fits 1/8
# README's count-mode table: the current search (regmean in the rounds and the tuning, from
# anticlusters) against three random seeds, k-means and anticlusters tuned the same way, and
# the search from k-medoids (revision 7's starts), at K = 4, N/4 and N/2 (about 80 min each).
# (Called directly: sweep() appends the first search's settings, which would override these.)
CURRENT=(--rounds 4 --method regmean --tune-methods svd,ties,regmean --tune-scales 1,1.5)
for k in 4 n/4 n/2; do
  "$PY" sweep.py run --ks "$k" --strategies d2c,random,kmeans,anticluster,d2c-kinit --random-seeds 3 "${CURRENT[@]}"
done
# How far one D2C run moves with its seed (K = N/4, merge --seed 0 and 1); issue 19's `add`
# against a full rerun (D2C on the 35 other tasks, then `add case-snake`); and a second problem,
# six of the nine families (24 tasks), at K = 4 and 6.
"$PY" sweep.py run --ks n/4 --strategies d2c --d2c-seeds 2 --random-seeds 3 "${CURRENT[@]}"
"$PY" sweep.py run --ks 4,n/4 --strategies d2c-add --add-task case-snake "${CURRENT[@]}"
"$PY" sweep.py run --families arith,case,classify,date,extract,str --ks 4,6 --strategies d2c,random,kmeans --random-seeds 3 "${CURRENT[@]}"
"$PY" sweep.py run --families arith,case,classify,date,extract,str --ks 6 --strategies d2c-kinit "${CURRENT[@]}"
# The first search's rows (svd/ties merges), kept for the history in docs/results.md.
sweep --ks n/4 --strategies d2c,kmeans,random --random-seeds 3   # K = N/4 = 9: the target budget
sweep --ks 1 --strategies single                                 # one adapter for everything
sweep --ks n/4 --strategies d2c --byte-budget 1                  # byte budget at d2c's bytes
sweep --ks 4 --strategies d2c,kmeans,random --random-seeds 3
sweep --ks n/4 --strategies d2c-rinit --random-seeds 1           # d2c from a random partition
sweep --ks 2 --strategies d2c,kmeans,random --random-seeds 1
sweep --ks n/2 --strategies d2c,kmeans,random --random-seeds 1   # K = N/2 = 18
sweep --ks 8 --strategies d2c,kmeans,random --random-seeds 1
sweep --ks n/4 --strategies d2c-nl                               # d2c scoring each answer's newline
if [ "${1:-}" = --full ]; then
  sweep --ks 1,2,4,8,n/4,n/2 --strategies single,d2c,kmeans,random,d2c-rinit --random-seeds 3 --byte-budget 1,2
fi
"$PY" sweep.py report --out-dir "$ROOT/docs"
"$PY" sweep.py report --families arith,case,classify,date,extract,str --out-dir "$ROOT/docs"
# Does the example objective rank partitions as the tests do? (greedy exact match on the examples, ~1 min each)
"$PY" sweep.py check-objective --ks 9,18 --out-dir "$ROOT/docs"
