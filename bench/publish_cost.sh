#!/usr/bin/env bash
# What the Redis backplane's publish function costs Redis, counted in
# instructions (callgrind), so that a change to it can be compared without
# the noise of a shared VM. A redis-server of this script's own runs under
# valgrind; a bench_server build loads its function library into it and
# is stopped; then S5's shape is replayed: calls of RUNS_PER_CALL runs of
# one message each (default 20, what S5's batches hold) over 1,000 topics,
# with a subscriber to every topic's channel, as an instance has.
#
#   bench/publish_cost.sh [bench_server…]   (default: this tree's release build)
#
# Prints one JSON line per build: instructions per message, counted from
# the first call to the last reply (the kernel's work is not counted).
set -euo pipefail
cd "$(dirname "$0")/.."
per_call=${RUNS_PER_CALL:-20}
messages=${MESSAGES:-20000}
topics=1000
if [ $# -eq 0 ]; then
  cargo build --release --features redis --example bench_server
  set -- target/release/examples/bench_server
fi
command -v valgrind >/dev/null || { echo "publish_cost.sh needs valgrind" >&2; exit 2; }
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# RESP calls: `calls.py FUNCTION CALLS RUNS_PER_CALL TOPICS` writes CALLS calls.
cat >"$work/calls.py" <<'EOF'
import sys, time
function, calls, per_call, topics = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = sys.stdout.buffer
def command(args):
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)
body = b'{"type":"stream.delta","requestId":"t","delta":"' + b"x" * 20 + b'","ts":1764547200000}'
now = int(time.time() * 1000)
n = 0
for c in range(calls):
    keys, args = [], []
    for _ in range(per_call):
        topic = "bench-%d" % (n % topics)
        n += 1
        keys += ["tower-ws:{%s}:history" % topic, "tower-ws:{%s}:meta" % topic]
        args += ["tower-ws:{%s}" % topic, 1, 0, body]
    # kept seqs (256 messages and a run), history age, grace (ms), now,
    # broadcast: what the layer's defaults give, as the bench server has them
    out.write(command(["FCALL", function, len(keys)] + keys + [319, 300000, 30000, now, "PUBLISH"] + args))
EOF

for server in "$@"; do
  port=$(free_port)
  valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  for _ in $(seq 300); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  http_port=$(free_port)
  REDIS_URL="redis://127.0.0.1:$port" PORT=$http_port WORKERS=1 "$server" >/dev/null 2>&1 &
  server_pid=$!
  for _ in $(seq 300); do curl -fsS "http://127.0.0.1:$http_port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  function=$(redis-cli -p "$port" FUNCTION LIST | grep -o 'tower_ws_publish_[0-9a-f]*' | head -1)
  [ -n "$function" ] || { echo "$server loaded no publish function" >&2; exit 1; }
  # shellcheck disable=SC2046
  redis-cli -p "$port" subscribe $(for i in $(seq 0 $((topics - 1))); do printf 'tower-ws:{bench-%d} ' "$i"; done) >/dev/null 2>&1 &
  subscriber_pid=$!
  pids+=("$subscriber_pid")
  python3 "$work/calls.py" "$function" $((topics / per_call)) "$per_call" "$topics" | redis-cli -p "$port" --pipe >/dev/null
  python3 "$work/calls.py" "$function" $((messages / per_call)) "$per_call" "$topics" >"$work/calls.resp"
  callgrind_control -z "$redis_pid" >/dev/null 2>&1
  replies=$(redis-cli -p "$port" --pipe <"$work/calls.resp" | tail -1)
  callgrind_control -d "$redis_pid" >/dev/null 2>&1
  kill "$subscriber_pid"
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  wait "$redis_pid" 2>/dev/null || true
  case $replies in "errors: 0,"*) ;; *) echo "$server: $replies" >&2; exit 1 ;; esac
  total=$(callgrind_annotate "$work/callgrind.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
  echo "{\"server\":\"$server\",\"runs_per_call\":$per_call,\"messages\":$messages,\"instructions_per_msg\":$((total / messages))}"
  rm -f "$work"/callgrind.out*
done
