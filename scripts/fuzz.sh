#!/usr/bin/env bash
# Fuzzes the untrusted-input readers with cargo-fuzz (libFuzzer), each for a fixed time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    (default: 300 s, every target)
#
# Needs a nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz from
# crates.io if it is missing. Working corpora live in fuzz/corpus/<target> (git-ignored) and
# start from the small seed sets in fuzz/seeds/<target>. A crash stops that target, leaves the
# input in fuzz/artifacts/<target>/ and makes the script exit non-zero: copy it to
# tests/fixtures/fuzz/ and add it to tests/fuzz_regressions.rs once fixed.
# Set FUZZ_JOBS=N to run N libFuzzer workers per target (default 1), FUZZ_NICE to change the
# niceness (default 19: this shares machines with builds and benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-300}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(gguf_adapter peft samples)
fi
jobs="${FUZZ_JOBS:-1}"
nice_level="${FUZZ_NICE:-19}"

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: a nightly toolchain is needed: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    nice -n "$nice_level" cargo install cargo-fuzz --locked
fi

# The sanitizer build compiles llama.cpp once more (fuzz/target), a few minutes the first time.
nice -n "$nice_level" cargo +nightly fuzz build -O
status=0
mkdir -p fuzz/logs
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
    log="fuzz/logs/$t.log"
    echo "== $t: ${seconds}s"
    # -rss_limit_mb: a reader that needs more than 2 GiB for a fuzz-sized input is a bug.
    # -timeout: the readers are linear; seconds on one small input is a hang.
    parallel=()
    if [ "$jobs" -gt 1 ]; then
        parallel=(-jobs="$jobs" -workers="$jobs")
    fi
    if ! nice -n "$nice_level" cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 "${parallel[@]}" \
        -print_final_stats=1 >"$log" 2>&1; then
        echo "   FAILED: see $log and fuzz/artifacts/$t/" >&2
        status=1
    fi
    # libFuzzer's final stats: executions and speed of the (last) worker.
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" | sed 's/^/   /' || true
    if [ "$jobs" -gt 1 ]; then
        cat fuzz-*.log 2>/dev/null | grep -E '^stat::number_of_executed_units' | sed 's/^/   worker /' || true
        rm -f fuzz-*.log
    fi
done
exit "$status"
