#!/usr/bin/env bash
# The cost of reading small request bodies whole before the app is contacted
# (proxy.request_buffer_size, the default) against streaming them (request_buffer_size = 0):
# POSTs of BODY bytes (default 4096) over HTTP/1.1 (wrk) and HTTP/2 (h2load), two Gatehouse
# instances measured alternately, ROUNDS rounds of DUR seconds each.
#
#   loadtest/upload.sh                 # after cargo build --release -p gatehouse -p gatehouse-loadtest-origin
#   BODY=65536 ROUNDS=3 DUR=5 loadtest/upload.sh
#
# Same layout as run.sh: origin and proxies on CPU 0 (one worker each), load generators on
# CPU 1, loopback only, the repository's throw-away localhost certificate. Prints one
# table row per (protocol, mode, round): req/s, latency (wrk: p50/p99; h2load: mean), and
# the proxy's CPU time per request.
set -euo pipefail

BODY=${BODY:-4096} ROUNDS=${ROUNDS:-3} DUR=${DUR:-5}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
GH=$REPO/target/release/gatehouse
ORIGIN=$REPO/target/release/loadtest-origin
for tool in wrk h2load taskset "$GH" "$ORIGIN"; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (see loadtest/README.md)" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/gatehouse-upload.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

P_ORIGIN=18100
declare -A PORT=([buffered]=18601 [streamed]=18602) SIZE=([buffered]='"1MiB"' [streamed]=0) PID
taskset -c 0 "$ORIGIN" --listen 127.0.0.1:$P_ORIGIN >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
for mode in buffered streamed; do
  cat >"$WORK/$mode.toml" <<EOF
[listen]
https = "127.0.0.1:${PORT[$mode]}"
[tls]
cert = "$REPO/certs/localhost.crt"
key = "$REPO/certs/localhost.key"
ca_bundle = "$REPO/certs/dev-ca-bundle.crt"
[upstream]
url = "http://127.0.0.1:$P_ORIGIN"
pool_max_idle = 512
[proxy]
request_buffer_size = ${SIZE[$mode]}
[server]
worker_threads = 1
[log]
access_log = false
level = "warn"
EOF
  taskset -c 0 "$GH" run --config "$WORK/$mode.toml" >"$WORK/$mode.log" 2>&1 &
  PID[$mode]=$!
  PIDS+=($!)
done
for mode in buffered streamed; do
  for _ in $(seq 50); do
    curl -sk -o /dev/null "https://127.0.0.1:${PORT[$mode]}/" && break
    sleep 0.1
  done
done

head -c "$BODY" /dev/zero | tr '\0' 'x' >"$WORK/body"
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
local f = io.open("$WORK/body", "rb")
wrk.body = f:read("*a")
f:close()
EOF

ticks() { local f; read -r -a f <"/proc/$1/stat"; echo $((f[13] + f[14])); }
HZ=$(getconf CLK_TCK)

printf '%-8s %-9s %-5s %10s %12s %12s %14s\n' proto mode round req/s p50/mean p99 "proxy µs/req"
for round in $(seq "$ROUNDS"); do
  order=(buffered streamed)
  ((round % 2 == 0)) && order=(streamed buffered)
  for mode in "${order[@]}"; do
    url="https://127.0.0.1:${PORT[$mode]}/upload"
    t0=$(ticks "${PID[$mode]}")
    out=$(taskset -c 1 wrk -t1 -c50 -d"${DUR}s" --latency -s "$WORK/post.lua" "$url")
    t1=$(ticks "${PID[$mode]}")
    reqs=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
    p50=$(awk '$1=="50%"{print $2}' <<<"$out")
    p99=$(awk '$1=="99%"{print $2}' <<<"$out")
    cpu=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v n="$reqs" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}')
    printf '%-8s %-9s %-5s %10s %12s %12s %14s\n' h1 "$mode" "$round" "$rps" "$p50" "$p99" "$cpu"

    t0=$(ticks "${PID[$mode]}")
    out=$(taskset -c 1 h2load -t1 -c10 -m10 -D "$DUR" -d "$WORK/body" "$url" 2>&1)
    t1=$(ticks "${PID[$mode]}")
    reqs=$(awk '/^requests:/{print $8}' <<<"$out")
    rps=$(awk '/^finished in/{print $4}' <<<"$out")
    mean=$(awk '/^time for request:/{print $6}' <<<"$out")
    cpu=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v n="$reqs" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}')
    printf '%-8s %-9s %-5s %10s %12s %12s %14s\n' h2 "$mode" "$round" "$rps" "$mean" "-" "$cpu"
  done
done
for mode in buffered streamed; do
  echo "$mode: $(curl -sk "https://127.0.0.1:${PORT[$mode]}/" -o /dev/null -w '%{http_code}') (gateway still answering)"
done
