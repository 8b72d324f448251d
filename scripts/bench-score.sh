#!/usr/bin/env bash
# Scoring speed against the raw llama_decode rate of the same model, threads and batch size,
# and the adapter switch time. Arguments go to the benchmark, e.g.
#   scripts/bench-score.sh --threads 2 --batch 512 --samples 96
# Needs the assets of scripts/setup.sh (or D2C_BASE_MODEL / D2C_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --bench score -- "$@"
