#!/usr/bin/env bash
# Drain benchmark: enqueue N messages (20 accounts, one topic, one endpoint),
# drain them with one `cronpost run` at max_children=C against a local
# `cronpost receive`, and print deliveries per second. Repeats R times.
# Usage: bench/drain.sh [N=2000] [C=8] [R=3]
set -euo pipefail
N=${1:-2000}; C=${2:-8}; R=${3:-3}
cd "$(dirname "$0")/.."
cargo build --release -q
BIN=$PWD/target/release/cronpost
WORK=$(mktemp -d)
trap 'kill $RX_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$BIN" receive --port 0 > "$WORK/rx.log" &
RX_PID=$!
for _ in $(seq 100); do grep -q listening "$WORK/rx.log" 2>/dev/null && break; sleep 0.05; done
URL=$(head -1 "$WORK/rx.log" | sed 's/listening on //')
python3 -c "
import sys
for i in range($N): print('{\"topic\":\"t\",\"account\":\"a%d\",\"payload\":{\"n\":%d}}' % (i % 20, i))" > "$WORK/m.ndjson"
for r in $(seq "$R"); do
    rm -rf "$WORK"/q.db*
    cat > "$WORK/c.toml" <<TOML
database = "q.db"
[run]
max_children = $C
max_messages = $N
[endpoints.e]
url = "$URL/hook"
topics = ["t"]
secret = "whsec_YmVuY2g="
TOML
    export CRONPOST_CONFIG="$WORK/c.toml"
    "$BIN" enqueue --ndjson < "$WORK/m.ndjson" > /dev/null
    start=$(date +%s.%N)
    RUST_LOG=warn "$BIN" run
    end=$(date +%s.%N)
    delivered=$(RUST_LOG=warn "$BIN" stats --json | python3 -c "import json,sys; print(sum(e['delivered'] for e in json.load(sys.stdin)['endpoints']))")
    python3 -c "print(f'run $r: $N messages, max_children $C: {$delivered} delivered in {$end-$start:.2f}s = {$delivered/($end-$start):.0f} deliveries/s')"
done
