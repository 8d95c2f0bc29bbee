#!/usr/bin/env bash
# Noisy-account benchmark: 5,000 messages from one account enqueued before
# 10 x 20 from ten quiet accounts, drained by back-to-back `cronpost run`s
# (max_children 8) against a local `cronpost receive`. Prints the p50/p95
# latency (enqueue -> received) of the quiet accounts' messages with the
# noisy account's budget at 50/s, and with no budget (plain FIFO).
# Usage: bench/noisy.sh [NOISY=5000]
set -euo pipefail
NOISY=${1:-5000}
cd "$(dirname "$0")/.."
cargo build --release -q
BIN=$PWD/target/release/cronpost
WORK=$(mktemp -d)
RX_PID=""
trap '[ -n "$RX_PID" ] && kill $RX_PID 2>/dev/null; rm -rf "$WORK"' EXIT

python3 - "$NOISY" > "$WORK/m.ndjson" <<'PY'
import sys
n = int(sys.argv[1])
for i in range(n):
    print('{"topic":"t","account":"noisy","payload":{"n":%d}}' % i)
for i in range(200):
    print('{"topic":"t","account":"quiet%d","payload":{"n":%d}}' % (i % 10, i))
PY

measure() {  # $1: label, $2: extra config
    rm -rf "$WORK"/q.db* "$WORK/rx.log"
    "$BIN" receive --port 0 > "$WORK/rx.log" &
    RX_PID=$!
    for _ in $(seq 100); do grep -q listening "$WORK/rx.log" 2>/dev/null && break; sleep 0.05; done
    URL=$(head -1 "$WORK/rx.log" | sed 's/listening on //')
    cat > "$WORK/c.toml" <<TOML
database = "q.db"
[run]
max_children = 8
max_messages = 100000
$2
[endpoints.e]
url = "$URL/hook"
topics = ["t"]
secret = "whsec_YmVuY2g="
TOML
    export CRONPOST_CONFIG="$WORK/c.toml" RUST_LOG=warn
    "$BIN" enqueue --ndjson < "$WORK/m.ndjson" > /dev/null
    until [ "$(sqlite3 "$WORK/q.db" "SELECT count(*) FROM deliveries WHERE state = 'delivered' AND account LIKE 'quiet%'")" = 200 ]; do
        "$BIN" run
    done
    sqlite3 -separator ' ' "$WORK/q.db" "SELECT uid, created_at FROM messages WHERE account LIKE 'quiet%'" > "$WORK/created.txt"
    python3 - "$1" "$WORK/created.txt" "$WORK/rx.log" <<'PY'
import re, statistics, sys
label, created_path, log_path = sys.argv[1:]
created = dict(line.split() for line in open(created_path))
lat = []
for line in open(log_path):
    m = re.search(r"id=(\S+) .* received_ms=(\d+)", line)
    if m and m.group(1) in created:
        lat.append(int(m.group(2)) - int(created[m.group(1)]))
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"| {label} | {len(lat)} | {p(0.50)} | {p(0.95)} | {lat[-1]} |")
PY
    kill $RX_PID; wait $RX_PID 2>/dev/null || true; RX_PID=""
}

echo "noisy-account scenario: $NOISY noisy messages enqueued before 200 quiet ones (10 accounts), max_children 8"
echo
echo "| noisy budget | quiet delivered | p50 ms | p95 ms | max ms |"
echo "|---|---|---|---|---|"
measure "50/s (account_budget)" $'[account_budget.overrides]\nnoisy = { rate = 50 }'
measure "off (plain FIFO)" ""
