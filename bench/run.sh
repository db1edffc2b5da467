#!/usr/bin/env bash
# Runs the bench protocol's scenarios (../shared/bench/README.md) against two
# servers, alternating which goes first, server on core 0 and load generator
# on core 1. Prints one JSON line per run and writes them to
# target/bench/<compare>.jsonl, then the medians.
#
#   bench/run.sh [runs=3] [scenario…]                e.g. bench/run.sh 3 s1 s2
#       tower-ws's bench_server against the original Node.js system
#   COMPARE=backplane bench/run.sh [runs=3] [scenario…]
#       bench_server in-process against the same with a Redis backplane (a
#       redis-server of this script's own, no persistence, also on core 0);
#       REDIS_SERVER_BIN runs another build of bench_server for the Redis
#       side (an A/B of a backplane change)
#   COMPARE=rollup bench/run.sh [runs=3]
#       bench_server through Redis without and with DELTA_ROLLUP_MS=50, on
#       1,000 streams of 50 tokens a second (s5t)
#   COMPARE=sse bench/run.sh [runs=3] [scenario…]
#       bench_server's subscribers over WebSocket against the same over
#       Server-Sent Events (loadgen --transport sse)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
shift || true
compare=${COMPARE:-node}
case $compare in
  node) servers=(tower-ws node); default_scenarios="s1 s1x s2 s3 s4 s5 s5x" ;;
  backplane) servers=(in-process redis); default_scenarios="s1 s2 s5" ;;
  sse) servers=(websocket sse); default_scenarios="s1 s1x" ;;
  rollup) servers=(redis redis-rollup); default_scenarios="s5t" ;;
  *) echo "COMPARE is node, backplane, sse or rollup" >&2; exit 2 ;;
esac
scenarios=("${@:-$default_scenarios}")
read -r -a scenarios <<<"${scenarios[*]}"

shared=${SHARED:-../shared}
node_dir=target/bench/node-ws-seed
out=target/bench/$compare.jsonl
mkdir -p target/bench
: >"$out"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ "$compare" = sse ] || [ "$compare" = node ]; then
  cargo build --release --example bench_server --example loadgen
fi
if [ "$compare" = node ]; then
  if [ ! -d "$node_dir/node_modules" ]; then
    rm -rf "$node_dir" && cp -r "$shared/bench/node-ws-seed" "$node_dir" && chmod -R u+w "$node_dir"
    (cd "$node_dir" && ./build.sh)
  fi
fi
if [ "$compare" = backplane ] || [ "$compare" = rollup ]; then
  cargo build --release --features redis --example bench_server --example loadgen
  redis_port=$(free_port)
  taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
  redis_pid=$!
  trap 'kill $redis_pid 2>/dev/null || true' EXIT
  for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
fi

redis_cpu() { # seconds of CPU the Redis server has used
  redis-cli -p "$redis_port" INFO cpu | tr -d '\r' |
    awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'
}

redis_xadds() { # XADD calls the Redis server has run
  redis-cli -p "$redis_port" INFO commandstats | tr -d '\r' |
    awk -F'[=,]' '/^cmdstat_xadd:/ { print $2; found = 1 } END { if (!found) print 0 }'
}

start_server() { # name port → pid
  case $1 in
    tower-ws | in-process | websocket | sse) PORT=$2 WORKERS=1 taskset -c 0 target/release/examples/bench_server >/dev/null 2>&1 & ;;
    redis-rollup) DELTA_ROLLUP_MS=50 REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$2 WORKERS=1 taskset -c 0 \
      "${REDIS_SERVER_BIN:-target/release/examples/bench_server}" >/dev/null 2>&1 & ;;
    redis) REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$2 WORKERS=1 taskset -c 0 \
      "${REDIS_SERVER_BIN:-target/release/examples/bench_server}" >/dev/null 2>&1 & ;;
    node) (cd "$node_dir" && PORT=$2 exec taskset -c 0 ./start.sh >/dev/null 2>&1) & ;;
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
    s1x) echo "s1 --clients 10000 --count 200 --size 128" ;;
    s2) echo "s2 --topics 1000 --count 200 --size 64" ;;
    s3) echo "s3 --clients 10000" ;;
    s4) echo "s4 --clients 5000 --inflight 64" ;;
    s5) echo "s5 --topics 1000 --per-topic 1 --rate 20000 --duration 5 --size 64" ;;
    s5x) echo "s5 --topics 10 --per-topic 100 --rate 2000 --duration 5 --size 64" ;;
    s5t) echo "s5 --topics 1000 --per-topic 1 --rate 50000 --duration 5 --size 16" ;;
  esac
}

for scenario in "${scenarios[@]}"; do
  for run in $(seq "$runs"); do
    if [ $((run % 2)) -eq 1 ]; then order=("${servers[@]}"); else order=("${servers[1]}" "${servers[0]}"); fi
    for server in "${order[@]}"; do
      case $server in redis*) redis-cli -p "$redis_port" flushall >/dev/null ;; esac
      port=$(free_port)
      pid=$(start_server "$server" "$port")
      # shellcheck disable=SC2046
      transport=()
      if [ "$server" = sse ]; then transport=(--transport sse); fi
      case $server in redis*) redis_before=$(redis_cpu) xadds_before=$(redis_xadds) ;; esac
      result=$(taskset -c 1 target/release/examples/loadgen $(args_for "$scenario" | sed "s/^\(s[0-9]\) /\1 127.0.0.1:$port /") --pid "$pid" "${transport[@]}")
      case $server in redis*)
        # Redis's own CPU (INFO cpu, user + system) per message the
        # application published, and how many entries Redis appended.
        result=$(python3 -c 'import json, sys; r = json.loads(sys.argv[1]); n = r["server"].get("published") or 0; r["redis_cpu_us_per_msg"] = round((float(sys.argv[3]) - float(sys.argv[2])) * 1e6 / max(n, 1), 2); r["redis_xadds"] = int(sys.argv[5]) - int(sys.argv[4]); print(json.dumps(r, separators=(",", ":")))' "$result" "$redis_before" "$(redis_cpu)" "$xadds_before" "$(redis_xadds)")
      ;; esac
      kill "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
      line="{\"scenario\":\"$scenario\",\"server\":\"$server\",\"run\":$run,\"result\":$result}"
      echo "$line" | tee -a "$out"
    done
  done
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = ["msgs_per_s", "p50_us", "p99_us", "p999_us", "lost", "server_rss_kib", "server_cpu_s", "redis_cpu_us_per_msg", "redis_xadds", "merged_frames", "delivered",
        "bytes_per_conn", "conns_per_s", "handshake_p50_us", "handshake_p99_us"]
by = {}
for r in rows:
    by.setdefault((r["scenario"], r["server"]), []).append(r["result"])
print("\nmedians:")
for (scenario, server), results in sorted(by.items()):
    med = {k: statistics.median(x[k] for x in results) for k in keys if k in results[0]}
    print(scenario, server, json.dumps(med))
PY
