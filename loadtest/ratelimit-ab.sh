#!/usr/bin/env bash
# Rate limiting A/B: the cost of limiting (local, and through Redis) against limiting off,
# measured as run.sh's scenario 6 does (one worker, wrk -c50, limits never reached) but in
# many short interleaved rounds, each compared with its neighbour: on a machine whose speed
# drifts by ±30% over minutes (this one, some days), medians of per-round ratios hold
# where medians of 10-second runs do not.
#
#   loadtest/ratelimit-ab.sh    # after cargo build --release -p gatehouse -p gatehouse-loadtest-origin
#   ROUNDS=30 SECS=2 loadtest/ratelimit-ab.sh
set -euo pipefail

ROUNDS=${ROUNDS:-16} SECS=${SECS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
GH=$REPO/target/release/gatehouse
ORIGIN=$REPO/target/release/loadtest-origin
for tool in wrk taskset openssl redis-server redis-cli "$GH" "$ORIGIN"; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (see loadtest/README.md)" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/gatehouse-ratelimit-ab.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# A throw-away certificate for 127.0.0.1 (never committed).
(
  cd "$WORK"
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out key.pem
  openssl req -x509 -new -key key.pem -sha256 -days 2 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -out cert.pem
) 2>/dev/null

P_ORIGIN=18100 P_REDIS=18179
declare -A PORT=([off]=18451 [local]=18452 [redis]=18453)
LIMIT=$'\n[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\n'
declare -A EXTRA=([off]="" [local]="$LIMIT" [redis]=$'\n[redis]\nurl = "redis://127.0.0.1:'$P_REDIS'"'"$LIMIT")
for t in off local redis; do
  cat >"$WORK/$t.toml" <<EOF
[listen]
https = "127.0.0.1:${PORT[$t]}"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
names = ["localhost", "127.0.0.1"]
[upstream]
url = "http://127.0.0.1:$P_ORIGIN"
pool_max_idle = 512
[server]
worker_threads = 1
[log]
level = "warn"
access_log = false
${EXTRA[$t]}
EOF
done

# Redis on the load generators' core, as in run.sh (in production it is on another host).
taskset -c 1 redis-server --port $P_REDIS --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "$ORIGIN" --listen 127.0.0.1:$P_ORIGIN >/dev/null &
PIDS+=($!)
until redis-cli -p $P_REDIS ping >/dev/null 2>&1; do sleep 0.1; done
declare -A PID
for t in off local redis; do
  taskset -c 0 "$GH" run --config "$WORK/$t.toml" >"$WORK/$t.log" 2>&1 &
  PID[$t]=$!
  PIDS+=($!)
done
for t in off local redis; do
  until curl -skf "https://127.0.0.1:${PORT[$t]}/" -o /dev/null; do sleep 0.2; done
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
echo "round target req_per_s cpu_us_per_request"
for round in $(seq 1 "$ROUNDS"); do
  order=(off local redis)
  ((round % 2)) || order=(redis local off)
  for t in "${order[@]}"; do
    before=$(ticks "${PID[$t]}")
    out=$(taskset -c 1 wrk -t1 -c50 -d"${SECS}s" "https://127.0.0.1:${PORT[$t]}/")
    after=$(ticks "${PID[$t]}")
    if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
      echo "round $round $t: errors, the run is invalid:" >&2
      echo "$out" >&2
      exit 1
    fi
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    echo "$round $t $rate $(awk -v t=$((after - before)) -v r="$requests" -v hz="$HZ" 'BEGIN {printf "%.2f", t * 1e6 / hz / r}')"
  done
done | tee "$WORK/rounds.txt"

python3 - "$WORK/rounds.txt" "$(redis-cli -p $P_REDIS info commandstats | grep evalsha || true)" <<'EOF'
import statistics, sys
rounds = {}
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) == 4 and parts[0].isdigit():
        rounds.setdefault(parts[0], {})[parts[1]] = (float(parts[2]), float(parts[3]))
for target in ("local", "redis"):
    rate = [r[target][0] / r["off"][0] for r in rounds.values()]
    cpu = [r["off"][1] / r[target][1] for r in rounds.values()]
    print(f"{target} / off, median of {len(rate)} per-round ratios: req/s {statistics.median(rate):.3f}, "
          f"share of throughput per core kept (CPU off/on) {statistics.median(cpu):.3f}")
print("Redis:", sys.argv[2] or "no EVALSHA")
EOF
