#!/usr/bin/env bash
# Runs the bench protocol's scenarios (../shared/bench/README.md) against two
# servers, alternating which goes first, server on core 0 and load generator
# on core 1. Prints one JSON line per run and writes them to
# target/bench/<compare>.jsonl, then the medians. Against Node and uWS, the
# medians also come as one Markdown table, with server CPU per delivery (and
# the kernel's part of it) and how busy each process kept its core (at 100 %
# that process is the bound).
#
#   bench/run.sh [runs=3] [scenario…]                e.g. bench/run.sh 3 s1 s2
#       tower-ws's bench_server against the original Node.js system
#   COMPARE=uws bench/run.sh [runs=3] [scenario…]
#       tower-ws's bench_server against uWebSockets.js (../shared/bench/uws,
#       its native topic pub/sub), copied out and installed like the Node peer
#   COMPARE=all bench/run.sh [runs=3] [scenario…]
#       the three side by side (the order rotating each run)
#   COMPARE=backplane bench/run.sh [runs=3] [scenario…]
#       bench_server in-process against the same with a Redis backplane (a
#       redis-server of this script's own, no persistence, also on core 0);
#       REDIS_SERVER_BIN runs another build of bench_server for the Redis
#       side (an A/B of a backplane change)
#   COMPARE=rollup bench/run.sh [runs=3]
#       bench_server through Redis without and with DELTA_ROLLUP_MS=50, on
#       1,000 streams of 50 tokens a second (s5t)
#   COMPARE=redis-ab REDIS_B_BIN=path bench/run.sh [runs=3] [scenario…]
#       bench_server through Redis against another build of it (an A/B of a
#       backplane change: build the other commit with its own --target-dir)
#   COMPARE=cluster bench/run.sh [runs=3] [scenario…]
#       bench_server through one Redis against the same through a Redis
#       Cluster of three primaries of this script's own (all on core 0, so
#       this shows what the cluster costs, not what three machines give)
#   COMPARE=sse bench/run.sh [runs=3] [scenario…]
#       bench_server's subscribers over WebSocket against the same over
#       Server-Sent Events (loadgen --transport sse)
#   COMPARE=deflate bench/run.sh [runs=3] [scenario…]
#       bench_server padding with prose, without compression against the
#       same with COMPRESSION and clients offering permessage-deflate
#       (loadgen --deflate); adds wire_bytes, the bytes the loopback
#       interface carried during the run
#   B_BIN=path COMPARE=uws|node|all bench/run.sh [runs=3] [scenario…]
#       adds tower-ws-b, another build of bench_server (built with its own
#       --target-dir), to the servers: an A/B of a change beside the peers
#   COMPARE=uws-deflate bench/run.sh [runs=3] [scenario…]
#       the same with compression against uWebSockets.js with its
#       SHARED_COMPRESSOR (a copy of ../shared/bench/uws with that setting
#       and compress=true on its publishes), both padding with x's, clients
#       offering deflate
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
shift || true
compare=${COMPARE:-node}
case $compare in
  node) servers=(tower-ws node); default_scenarios="s1 s1x s2 s3 s4 s5 s5x" ;;
  uws) servers=(tower-ws uws); default_scenarios="s1 s1x s2 s3 s4 s5 s5x" ;;
  all) servers=(tower-ws uws node); default_scenarios="s1 s1x s2 s3 s4 s5 s5x" ;;
  backplane) servers=(in-process redis); default_scenarios="s1 s2 s5" ;;
  sse) servers=(websocket sse); default_scenarios="s1 s1x" ;;
  deflate) servers=(plain deflate); default_scenarios="s1k s1 s3" ;;
  uws-deflate) servers=(deflate-x uws-deflate); default_scenarios="s1k" ;;
  rollup) servers=(redis redis-rollup); default_scenarios="s5t" ;;
  cluster) servers=(redis redis-cluster); default_scenarios="s1 s2 s5" ;;
  redis-ab) servers=(redis redis-b); default_scenarios="s1 s2 s5" ;;
  *) echo "COMPARE is node, uws, all, uws-deflate, backplane, cluster, redis-ab, sse, deflate or rollup" >&2; exit 2 ;;
esac
if [ -n "${B_BIN:-}" ]; then
  case $compare in
    uws | node | all) servers=(tower-ws tower-ws-b "${servers[@]:1}") ;;
    *) echo "B_BIN goes with COMPARE=uws, node or all" >&2; exit 2 ;;
  esac
fi
scenarios=("${@:-$default_scenarios}")
read -r -a scenarios <<<"${scenarios[*]}"

shared=${SHARED:-../shared}
node_dir=target/bench/node-ws-seed
uws_dir=target/bench/uws
out=target/bench/$compare.jsonl
mkdir -p target/bench
: >"$out"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ "$compare" = sse ] || [ "$compare" = node ] || [ "$compare" = uws ] || [ "$compare" = all ] ||
  [ "$compare" = deflate ] || [ "$compare" = uws-deflate ]; then
  cargo build --release --example bench_server --example loadgen
fi
if { [ "$compare" = uws ] || [ "$compare" = all ]; } && [ ! -d "$uws_dir/node_modules" ]; then
  rm -rf "$uws_dir" && cp -r "$shared/bench/uws" "$uws_dir" && chmod -R u+w "$uws_dir"
  (cd "$uws_dir" && ./build.sh)
fi
if [ "$compare" = uws-deflate ] && [ ! -d "$uws_dir-deflate/node_modules" ]; then
  rm -rf "$uws_dir-deflate" && cp -r "$shared/bench/uws" "$uws_dir-deflate" && chmod -R u+w "$uws_dir-deflate"
  # Compression on, and asked for on every publish (its fourth argument).
  sed -i -e 's/compression: uWS.DISABLED/compression: uWS.SHARED_COMPRESSOR/' \
    -e 's/\(app\.publish(.*\), false);/\1, false, true);/' "$uws_dir-deflate/server.js"
  grep -q 'compression: uWS.SHARED_COMPRESSOR' "$uws_dir-deflate/server.js"
  [ "$(grep -c 'false, true);' "$uws_dir-deflate/server.js")" -eq 2 ]
  (cd "$uws_dir-deflate" && ./build.sh)
fi
if [ "$compare" = node ] || [ "$compare" = all ]; then
  if [ ! -d "$node_dir/node_modules" ]; then
    rm -rf "$node_dir" && cp -r "$shared/bench/node-ws-seed" "$node_dir" && chmod -R u+w "$node_dir"
    (cd "$node_dir" && ./build.sh)
  fi
fi
redis_pids=()
redis_ports=()
cluster_ports=()
trap 'kill "${redis_pids[@]}" 2>/dev/null || true; rm -rf target/bench/cluster' EXIT
start_redis() { # port [cluster flags…]
  local port=$1
  shift
  taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no "$@" >/dev/null 2>&1 &
  redis_pids+=($!)
  redis_ports+=("$port")
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
}
if [ "$compare" = backplane ] || [ "$compare" = rollup ] || [ "$compare" = cluster ] || [ "$compare" = redis-ab ]; then
  cargo build --release --features redis --example bench_server --example loadgen
  redis_port=$(free_port)
  start_redis "$redis_port"
fi
if [ "$compare" = cluster ]; then
  mkdir -p target/bench/cluster
  for _ in 1 2 3; do
    port=$(free_port)
    while [ "$port" -ge 55000 ]; do port=$(free_port); done
    cluster_ports+=("$port")
    start_redis "$port" --cluster-enabled yes --cluster-config-file "$PWD/target/bench/cluster/$port.conf" --dir target/bench/cluster
  done
  redis-cli --cluster create "${cluster_ports[@]/#/127.0.0.1:}" --cluster-yes >/dev/null
  for _ in $(seq 200); do
    redis-cli -p "${cluster_ports[0]}" CLUSTER INFO | grep -q cluster_state:ok && break
    sleep 0.05
  done
  sleep 1
fi
cluster_urls=$(for port in "${cluster_ports[@]}"; do printf 'redis://127.0.0.1:%s,' "$port"; done)

redis_ports_of() { # server → the ports of the Redis servers it uses
  case $1 in
    redis-cluster) echo "${cluster_ports[@]}" ;;
    *) echo "$redis_port" ;;
  esac
}

redis_cpu() { # seconds of CPU the server's Redis servers have used
  for port in $(redis_ports_of "$1"); do redis-cli -p "$port" INFO cpu; done | tr -d '\r' |
    awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'
}

redis_xadds() { # XADD calls the server's Redis servers have run
  for port in $(redis_ports_of "$1"); do redis-cli -p "$port" INFO commandstats; done | tr -d '\r' |
    awk -F'[=,]' '/^cmdstat_xadd:/ { s += $2 } END { print s + 0 }'
}

lo_bytes() { # bytes the loopback interface has received
  awk -F'[: ]+' '/^ *lo:/ { print $3 }' /proc/net/dev
}

start_server() { # name port → pid
  case $1 in
    tower-ws | in-process | websocket | sse) PORT=$2 WORKERS=1 taskset -c 0 target/release/examples/bench_server >/dev/null 2>&1 & ;;
    tower-ws-b) PORT=$2 WORKERS=1 taskset -c 0 "$B_BIN" >/dev/null 2>&1 & ;;
    plain) PADDING=prose PORT=$2 WORKERS=1 taskset -c 0 target/release/examples/bench_server >/dev/null 2>&1 & ;;
    deflate) COMPRESSION=1 PADDING=prose PORT=$2 WORKERS=1 taskset -c 0 target/release/examples/bench_server >/dev/null 2>&1 & ;;
    deflate-x) COMPRESSION=1 PORT=$2 WORKERS=1 taskset -c 0 target/release/examples/bench_server >/dev/null 2>&1 & ;;
    uws-deflate) (cd "$uws_dir-deflate" && PORT=$2 exec taskset -c 0 ./start.sh >/dev/null 2>&1) & ;;
    redis-rollup) DELTA_ROLLUP_MS=50 REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$2 WORKERS=1 taskset -c 0 \
      "${REDIS_SERVER_BIN:-target/release/examples/bench_server}" >/dev/null 2>&1 & ;;
    redis) REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$2 WORKERS=1 taskset -c 0 \
      "${REDIS_SERVER_BIN:-target/release/examples/bench_server}" >/dev/null 2>&1 & ;;
    redis-b) REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$2 WORKERS=1 taskset -c 0 \
      "$REDIS_B_BIN" >/dev/null 2>&1 & ;;
    redis-cluster) REDIS_CLUSTER_URLS="$cluster_urls" PORT=$2 WORKERS=1 taskset -c 0 \
      target/release/examples/bench_server >/dev/null 2>&1 & ;;
    node) (cd "$node_dir" && PORT=$2 exec taskset -c 0 ./start.sh >/dev/null 2>&1) & ;;
    uws) (cd "$uws_dir" && PORT=$2 exec taskset -c 0 ./start.sh >/dev/null 2>&1) & ;;
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
    s1k) echo "s1 --clients 1000 --count 200 --size 2048" ;;
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
    # Each server goes first in turn: run r starts with server r-1 (mod n).
    first=$(((run - 1) % ${#servers[@]}))
    order=("${servers[@]:first}" "${servers[@]:0:first}")
    for server in "${order[@]}"; do
      case $server in redis*) for p in $(redis_ports_of "$server"); do redis-cli -p "$p" flushall >/dev/null; done ;; esac
      port=$(free_port)
      pid=$(start_server "$server" "$port")
      # shellcheck disable=SC2046
      transport=()
      if [ "$server" = sse ]; then transport=(--transport sse); fi
      case $server in *deflate*) transport=(--deflate) ;; esac
      lo_before=$(lo_bytes)
      case $server in redis*) redis_before=$(redis_cpu "$server") xadds_before=$(redis_xadds "$server") ;; esac
      result=$(taskset -c 1 target/release/examples/loadgen $(args_for "$scenario" | sed "s/^\(s[0-9]\) /\1 127.0.0.1:$port /") --pid "$pid" "${transport[@]}")
      case $server in redis*)
        # Redis's own CPU (INFO cpu, user + system) per message the
        # application published, and how many entries Redis appended.
        result=$(python3 -c 'import json, sys; r = json.loads(sys.argv[1]); n = r["server"].get("published") or 0; r["redis_cpu_us_per_msg"] = round((float(sys.argv[3]) - float(sys.argv[2])) * 1e6 / max(n, 1), 2); r["redis_xadds"] = int(sys.argv[5]) - int(sys.argv[4]); print(json.dumps(r, separators=(",", ":")))' "$result" "$redis_before" "$(redis_cpu "$server")" "$xadds_before" "$(redis_xadds "$server")")
      ;; esac
      if [ "$compare" = deflate ] || [ "$compare" = uws-deflate ]; then
        result=$(python3 -c 'import json, sys; r = json.loads(sys.argv[1]); r["wire_bytes"] = int(sys.argv[3]) - int(sys.argv[2]); print(json.dumps(r, separators=(",", ":")))' "$result" "$lo_before" "$(lo_bytes)")
      fi
      kill "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
      line="{\"scenario\":\"$scenario\",\"server\":\"$server\",\"run\":$run,\"result\":$result}"
      echo "$line" | tee -a "$out"
    done
  done
done

python3 - "$out" "$compare" "${servers[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
compare, servers = sys.argv[2], sys.argv[3:]
keys = ["wire_bytes", "msgs_per_s", "p50_us", "p99_us", "p999_us", "lost", "server_rss_kib", "server_cpu_s", "redis_cpu_us_per_msg", "redis_xadds", "merged_frames", "delivered",
        "bytes_per_conn", "conns_per_s", "loadgen_cpu_s", "handshake_p50_us", "handshake_p99_us",
        "server_cpu_us_per_delivery", "server_cpu_us_per_conn", "server_kernel_us_per_delivery",
        "server_kernel_us_per_conn", "server_busy", "loadgen_busy"]
by = {}
for r in rows:
    result = r["result"]
    # The server's CPU per message delivered (S1, S2, S5) or per connection opened (S4).
    # The kernel's part (system time: the sends and the network stack's
    # work in them) is what no server's own code can save.
    for what, total in (("cpu", "server_cpu_s"), ("kernel", "server_kernel_s")):
        if result.get("delivered") and total in result:
            result[f"server_{what}_us_per_delivery"] = result[total] * 1e6 / result["delivered"]
        if result.get("conns_per_s") and total in result:
            result[f"server_{what}_us_per_conn"] = result[total] * 1e6 / result["clients"]
    # Each process's share of its core over the timed run: at 1.0 that
    # process is the bound, whatever the other one could do.
    for side in ("server", "loadgen"):
        if result.get("elapsed_s") and f"{side}_cpu_s" in result:
            result[f"{side}_busy"] = round(result[f"{side}_cpu_s"] / result["elapsed_s"], 2)
    by.setdefault((r["scenario"], r["server"]), []).append(result)
print("\nmedians:")
medians = {}
for (scenario, server), results in sorted(by.items()):
    med = {k: statistics.median(x[k] for x in results) for k in keys if k in results[0]}
    medians[(scenario, server)] = med
    print(scenario, server, json.dumps(med))
if compare in ("all", "uws", "node"):
    figures = [
        ("msgs_per_s", "delivered msgs/s", "{:,.0f}"),
        ("p50_us", "p50", "{:,.0f} µs"),
        ("p99_us", "p99", "{:,.0f} µs"),
        ("server_cpu_us_per_delivery", "server CPU per delivery", "{:.2f} µs"),
        ("server_kernel_us_per_delivery", "of which in the kernel", "{:.2f} µs"),
        ("bytes_per_conn", "RSS per idle connection", "{:,.0f} B"),
        ("conns_per_s", "connections/s", "{:,.0f}"),
        ("server_cpu_us_per_conn", "server CPU per connection", "{:.0f} µs"),
        ("server_kernel_us_per_conn", "of which in the kernel", "{:.0f} µs"),
        ("server_busy", "server's core busy", "{:.0%}"),
        ("loadgen_busy", "load generator's core busy", "{:.0%}"),
        ("lost", "lost", "{:.0f}"),
    ]
    print("\n| scenario | figure | " + " | ".join(servers) + " |")
    print("|---|---|" + "---:|" * len(servers))
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        first = True
        for key, label, fmt in figures:
            cells = [medians.get((scenario, s), {}).get(key) for s in servers]
            if all(c is None for c in cells):
                continue
            shown = [fmt.format(c) if c is not None else "" for c in cells]
            print(f"| {scenario if first else ''} | {label} | " + " | ".join(shown) + " |")
            first = False
PY
