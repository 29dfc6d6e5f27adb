#!/usr/bin/env bash
# What one Redis (one shard) can decide for the shared rate limit: Gatehouse's own limiter
# (its Lua GCRA script over EVALSHA) driven by real requests, clients spread over many
# addresses (X-Forwarded-For from a trusted peer, a random 10.x.y.z per request), against
# a redis-server of our own. Reports the Redis CPU per decision (from /proc and from
# Redis's commandstats), the decisions/s one Redis core would sustain at that cost, and
# the memory per client key (keys live burst / rate seconds after their last request). INSTANCES gateways (default 2) share the Redis, as replicas do.
#
#   loadtest/redis-limiter.sh    # after cargo build --release -p gatehouse -p gatehouse-loadtest-origin
#   DUR=20 INSTANCES=2 loadtest/redis-limiter.sh
set -euo pipefail

DUR=${DUR:-10} INSTANCES=${INSTANCES:-2} CONNS=${CONNS:-50}
# A GCRA key lives while its client is ahead of the rate (its theoretical arrival time is
# in the future): 1 r/s with a large burst, and SUBNETS × 254 clients (10.0.S.H) each
# sending several requests per second, keeps every client's key alive to be counted.
RATE=${RATE:-1} BURST=${BURST:-100000} SUBNETS=${SUBNETS:-16}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
GH=$REPO/target/release/gatehouse
ORIGIN=$REPO/target/release/loadtest-origin
for tool in wrk taskset curl redis-server redis-cli "$GH" "$ORIGIN"; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (see loadtest/README.md)" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/gatehouse-redis-limiter.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

P_ORIGIN=18120 P_REDIS=18379
redis-server --port $P_REDIS --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=($!)
taskset -c 0 "$ORIGIN" --listen 127.0.0.1:$P_ORIGIN >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do redis-cli -p $P_REDIS ping >/dev/null 2>&1 && break; sleep 0.1; done
GW_PIDS=() URLS=() ADMINS=()
for i in $(seq "$INSTANCES"); do
  port=$((18620 + i)) admin=$((18640 + i))
  cat >"$WORK/gw$i.toml" <<EOF
[listen]
https = "127.0.0.1:$port"
[tls]
cert = "$REPO/certs/localhost.crt"
key = "$REPO/certs/localhost.key"
ca_bundle = "$REPO/certs/dev-ca-bundle.crt"
[upstream]
url = "http://127.0.0.1:$P_ORIGIN"
pool_max_idle = 512
[proxy]
trusted_proxies = ["127.0.0.1"]
[rate_limit]
requests_per_second = $RATE
burst = $BURST
redis_url = "redis://127.0.0.1:$P_REDIS"
decision_timeout = "50ms"
[admin]
listen = "127.0.0.1:$admin"
[server]
worker_threads = 1
[log]
access_log = false
level = "warn"
EOF
  taskset -c 0 "$GH" run --config "$WORK/gw$i.toml" >"$WORK/gw$i.log" 2>&1 &
  GW_PIDS+=($!) PIDS+=($!) URLS+=("https://127.0.0.1:$port/") ADMINS+=("http://127.0.0.1:$admin/metrics")
done
for url in "${URLS[@]}"; do
  for _ in $(seq 100); do curl -sk -o /dev/null "$url" && break; sleep 0.1; done
done
cat >"$WORK/clients.lua" <<EOF
math.randomseed(os.time())
request = function()
  local ip = string.format("10.0.%d.%d", math.random(0, $SUBNETS - 1), math.random(1, 254))
  return wrk.format("GET", "/", { ["X-Forwarded-For"] = ip })
end
EOF

ticks() { local f; read -r -a f <"/proc/$1/stat"; echo $((f[13] + f[14])); }
decisions() {
  local total=0 url n
  for url in "${ADMINS[@]}"; do
    n=$(curl -s "$url" | awk '/^gatehouse_rate_limit_decisions_total\{backend="redis"/{s+=$2} END{print s+0}')
    total=$((total + n))
  done
  echo "$total"
}
fallbacks() {
  local total=0 url n
  for url in "${ADMINS[@]}"; do
    n=$(curl -s "$url" | awk '/^gatehouse_rate_limit_decisions_total\{backend="fallback"/{s+=$2} END{print s+0}')
    total=$((total + n))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)
redis-cli -p $P_REDIS config resetstat >/dev/null
d0=$(decisions) r0=$(ticks $REDIS_PID)
for url in "${URLS[@]}"; do
  taskset -c 1 wrk -t1 -c"$CONNS" -d"${DUR}s" -s "$WORK/clients.lua" "$url" >"$WORK/wrk-$(basename "$url").txt" 2>&1 &
done
wait_wrk() { while pgrep -f "wrk -t1 -c$CONNS -d${DUR}s" >/dev/null; do sleep 0.5; done; }
wait_wrk
d1=$(decisions) r1=$(ticks $REDIS_PID)
n=$((d1 - d0))
redis_us=$(awk -v t=$((r1 - r0)) -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.2f", t / hz * 1e6 / n}')
per_call=$(redis-cli -p $P_REDIS info commandstats | tr -d '\r' | awk -F'[=,]' '/^cmdstat_evalsha:/{print $6}')
keys=$(redis-cli -p $P_REDIS dbsize)
mem=$(redis-cli -p $P_REDIS info memory | tr -d '\r' | awk -F: '/^used_memory:/{print $2}')
sample_key=$(redis-cli -p $P_REDIS randomkey)
key_bytes=$(redis-cli -p $P_REDIS memory usage "$sample_key")
echo "| measure | value |"
echo "|---|---|"
echo "| policy | $RATE r/s, burst $BURST; clients: $((SUBNETS * 254)) addresses, one at random per request |"
echo "| gateways | $INSTANCES (one worker thread each, CPU 0), wrk -c$CONNS each on CPU 1, ${DUR}s |"
echo "| decisions in Redis | $n ($(awk -v n="$n" -v d="$DUR" 'BEGIN{printf "%.0f", n / d}')/s; fallbacks $(fallbacks)) |"
echo "| redis-server CPU per decision (/proc, user+system) | $redis_us µs |"
echo "| EVALSHA time per call (Redis commandstats, script execution only) | $per_call µs |"
echo "| decisions/s one Redis core sustains at that CPU cost | $(awk -v u="$redis_us" 'BEGIN{printf "%.0f", 1e6 / u}') |"
echo "| client keys live at the end | $keys |"
echo "| memory: used_memory / keys; MEMORY USAGE of one key | $(awk -v m="$mem" -v k="$keys" 'BEGIN{ if (k > 0) printf "%.0f", m / k; else print "-" }') B; $key_bytes B |"
echo "| load average at the end | $(cut -d' ' -f1-3 /proc/loadavg) |"
