#!/usr/bin/env bash
# What a burst to many subscribers costs the layer in user space, counted
# in instructions (callgrind) so that a change to the publish or write path
# can be compared without the noise of a shared VM: examples/fanout_cost
# publishes S1's burst (1,000 subscribers, 128-byte texts) over in-memory
# pipes on one thread, and only the burst is counted, the clients' reads
# included, not the kernel's work (S1 measures that).
#
#   bench/fanout_cost.sh [fanout_cost build…]   (default: this tree's release build)
#   SUBSCRIBERS=10000 MESSAGES=20 bench/fanout_cost.sh
#   TOPICS=1000 SUBSCRIBERS=1 bench/fanout_cost.sh   (S2's shape, round-robin)
#
# Prints one JSON line per build: instructions per delivery. For an A/B,
# build the other commit's example with its own --target-dir.
set -euo pipefail
cd "$(dirname "$0")/.."
subscribers=${SUBSCRIBERS:-1000}
messages=${MESSAGES:-200}
topics=${TOPICS:-1}
if [ $# -eq 0 ]; then
  cargo build --release --example fanout_cost
  set -- target/release/examples/fanout_cost
fi
command -v valgrind >/dev/null || { echo "fanout_cost.sh needs valgrind" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for build in "$@"; do
  out=$(valgrind --tool=callgrind --callgrind-out-file="$work/out" \
    --toggle-collect='fanout_cost::burst' "$build" "$subscribers" "$messages" "$topics" 2>"$work/log")
  instructions=$(sed -n 's/^summary: //p' "$work/out")
  python3 -c 'import json, sys
r = json.loads(sys.argv[1])
r["build"] = sys.argv[3]
r["instructions_per_delivery"] = round(int(sys.argv[2]) / r["deliveries"])
print(json.dumps(r))' "$out" "$instructions" "$build"
done
