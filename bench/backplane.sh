#!/usr/bin/env bash
# The cost of the Redis backplane: the same scenarios against bench_server
# in-process and with REDIS_URL (a redis-server of this script's own, no
# persistence), alternating which goes first. Server and Redis on core 0,
# load generator on core 1. Prints one JSON line per run, then medians.
#
#   bench/backplane.sh [runs=3] [scenario…]      e.g. bench/backplane.sh 3 s1 s5
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
shift || true
scenarios=("${@:-s1 s2 s5}")
read -r -a scenarios <<<"${scenarios[*]}"
out=target/bench/backplane.jsonl
mkdir -p target/bench
: >"$out"

cargo build --release --features redis --example bench_server --example loadgen

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done

start_server() { # mode port → pid
  case $1 in
    in-process) PORT=$2 WORKERS=1 taskset -c 0 target/release/examples/bench_server >/dev/null 2>&1 & ;;
    redis) REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$2 WORKERS=1 taskset -c 0 \
      target/release/examples/bench_server >/dev/null 2>&1 & ;;
  esac
  local pid=$!
  for _ in $(seq 200); do
    curl -fsS "http://127.0.0.1:$2/healthz" >/dev/null 2>&1 && break
    sleep 0.05
  done
  echo "$pid"
}

args_for() {
  case $1 in
    s1) echo "s1 --clients 1000 --count 2000 --size 128" ;;
    s2) echo "s2 --topics 1000 --count 200 --size 64" ;;
    s5) echo "s5 --topics 1000 --per-topic 1 --rate 20000 --duration 5 --size 64" ;;
  esac
}

for scenario in "${scenarios[@]}"; do
  for run in $(seq "$runs"); do
    if [ $((run % 2)) -eq 1 ]; then order=(in-process redis); else order=(redis in-process); fi
    for mode in "${order[@]}"; do
      redis-cli -p "$redis_port" flushall >/dev/null
      port=$(free_port)
      pid=$(start_server "$mode" "$port")
      # shellcheck disable=SC2046
      result=$(taskset -c 1 target/release/examples/loadgen $(args_for "$scenario" | sed "s/^\(s[0-9]\) /\1 127.0.0.1:$port /") --pid "$pid")
      kill "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
      line="{\"scenario\":\"$scenario\",\"server\":\"$mode\",\"run\":$run,\"result\":$result}"
      echo "$line" | tee -a "$out"
    done
  done
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = ["msgs_per_s", "p50_us", "p99_us", "lost", "server_cpu_s"]
by = {}
for r in rows:
    by.setdefault((r["scenario"], r["server"]), []).append(r["result"])
print("\nmedians:")
for (scenario, server), results in sorted(by.items()):
    med = {k: statistics.median(x[k] for x in results) for k in keys if k in results[0]}
    print(f"{scenario:4} {server:10} {json.dumps(med)}")
PY
