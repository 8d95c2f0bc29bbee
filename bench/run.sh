#!/usr/bin/env bash
# The benchmark: builds the release binary and the harness (benches/dispatch.rs),
# measures on this machine and prints one markdown table (BENCHMARKS.md).
# Usage: bench/run.sh [--quick] [--only receiver|drain|nofork|forkpost|steps|scale|enqueue|route|sustained|latency|adaptive|postgres|postgres-scale|postgres-latency]
# Full: about 15 minutes on 2 cores (each figure the median of 3 runs);
# --quick: a smoke run of a minute or so, one run each at smaller sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --bench dispatch -- "$@"
