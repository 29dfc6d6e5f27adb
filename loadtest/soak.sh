#!/usr/bin/env bash
# Soak test (not in CI): Gatehouse under mixed legitimate traffic (HTTP/1.1, HTTP/2,
# WebSocket) and hostile clients (silent sockets, slow readers, connection floods) while
# certificates rotate, Redis restarts and the upstream instances restart one at a time.
# Samples RSS, open file descriptors, threads and open connections, then writes
# loadtest/results/DATE-soak.md with the curves (PNG) and a verdict.
#
#   loadtest/soak.sh                 # 30 minutes
#   SOAK_SECONDS=300 loadtest/soak.sh
#
# Everything listens on 127.0.0.1; every loop is bounded by SOAK_SECONDS.
set -euo pipefail

SECS=${SOAK_SECONDS:-1800}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${SOAK_OUT:-$HERE/results}
WORK=$(mktemp -d /tmp/gatehouse-soak.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}" ${ORIGIN_A:-} ${ORIGIN_B:-} ${REDIS:-} ${GH_PID:-}; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  [[ -n ${SOAK_KEEP:-} ]] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- tools
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v redis-server >/dev/null || need+=(redis-server)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -c 'import matplotlib' 2>/dev/null ||
  python3 -m pip install --quiet matplotlib 2>/dev/null ||
  python3 -m pip install --quiet --break-system-packages matplotlib 2>/dev/null ||
  log "matplotlib unavailable: no PNG"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log "building (release)"
(cd "$REPO" && cargo build --release --locked -p gatehouse -p gatehouse-loadtest-origin) >&2
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
GH=$TARGET/release/gatehouse ORIGIN=$TARGET/release/loadtest-origin CLIENT=$TARGET/release/loadtest-client
REV=$(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" status --porcelain -- src | head -c1 | sed 's/./-dirty/')

# ---------------------------------------------------------------- ports, PKI, files
P_HTTPS=28443 P_HTTP=28080 P_ADMIN=28090 P_A=28001 P_B=28002 P_REDIS=28379
PKI=$WORK/pki STATIC=$WORK/static
mkdir -p "$PKI" "$STATIC"
head -c $((64 * 1024 * 1024)) /dev/zero >"$STATIC/big.bin"
openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/root.key" 2>/dev/null
openssl req -x509 -new -key "$PKI/root.key" -sha256 -days 90 -subj "/CN=soak root" \
  -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign" -out "$PKI/root.pem" 2>/dev/null
printf 'basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$PKI/leaf.ext"
ROTATIONS=0
new_leaf() { # writes a fresh key and chain next to the served ones, then renames them in
  openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$PKI/next.key"
  openssl req -new -key "$PKI/next.key" -subj "/CN=localhost" -out "$PKI/next.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/next.csr" -CA "$PKI/root.pem" -CAkey "$PKI/root.key" -CAcreateserial \
    -days 60 -sha256 -extfile "$PKI/leaf.ext" -out "$PKI/next.crt" 2>/dev/null
  mv "$PKI/next.key" "$PKI/site.key" && mv "$PKI/next.crt" "$PKI/site.crt"
}
new_leaf

start_origin() { # PORT -> PID
  "$ORIGIN" --listen "127.0.0.1:$1" >/dev/null 2>&1 &
  echo $!
}
start_redis() {
  redis-server --port "$P_REDIS" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
  REDIS=$!
}
ORIGIN_A=$(start_origin $P_A)
ORIGIN_B=$(start_origin $P_B)
start_redis

cat >"$WORK/gateway.toml" <<EOF
# Soak configuration (written by loadtest/soak.sh)
[listen]
https = "127.0.0.1:$P_HTTPS"
http = "127.0.0.1:$P_HTTP"

[tls]
cert = "$PKI/site.crt"
key = "$PKI/site.key"
ca_bundle = "$PKI/root.pem"

[upstream]
url = ["http://127.0.0.1:$P_A", "http://127.0.0.1:$P_B"]
unhealthy_for = "2s"

[proxy]
header_read_timeout = "10s"
keepalive_timeout = "30s"
send_timeout = "10s"

[[static]]
prefix = "/static/"
dir = "$STATIC"

[rate_limit]
requests_per_second = 1000000
burst = 1000000
redis_url = "redis://127.0.0.1:$P_REDIS"
allow = []

[admin]
listen = "127.0.0.1:$P_ADMIN"

[log]
level = "warn"
access_log = false
EOF
"$GH" --config "$WORK/gateway.toml" >"$WORK/gatehouse.log" 2>&1 &
GH_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$P_ADMIN/healthz" >/dev/null && break; sleep 0.1; done
log "gatehouse $REV pid $GH_PID; soak for ${SECS}s"

# ---------------------------------------------------------------- load
URL=https://127.0.0.1:$P_HTTPS/
wrk -t1 -c16 -d"${SECS}s" --timeout 10s "$URL" >"$WORK/wrk.txt" 2>&1 &
PIDS+=($!)
h2load -c4 -m8 -D "$SECS" "$URL" >"$WORK/h2load.txt" 2>&1 &
PIDS+=($!)
(
  # One-minute WebSocket rounds: a tunnel cut by an upstream restart is counted in its round.
  end=$((SECONDS + SECS))
  while ((SECONDS + 60 <= end)); do
    "$CLIENT" ws-echo --url "wss://127.0.0.1:$P_HTTPS/ws" --conns 16 --duration 60 2>>"$WORK/ws.err" >>"$WORK/ws.jsonl" || true
  done
) &
PIDS+=($!)
python3 "$HERE/soak_hostile.py" --https $P_HTTPS --http $P_HTTP --ca "$PKI/root.pem" \
  --seconds "$SECS" >"$WORK/hostile.json" 2>"$WORK/hostile.err" &
HOSTILE=$!
PIDS+=($HOSTILE)

# ---------------------------------------------------------------- events and samples
SAMPLES=$WORK/samples.csv
echo "t,rss_kib,fds,threads,connections_open,websockets_open,event" >"$SAMPLES"
metric() { curl -sf "http://127.0.0.1:$P_ADMIN/metrics" | awk -v n="$1" '$1 == n { print $2 }'; }
start=$SECONDS
next_origin=A
while ((SECONDS - start < SECS)); do
  sleep 10
  t=$((SECONDS - start))
  event=""
  if ((t % 60 < 10)); then new_leaf && ROTATIONS=$((ROTATIONS + 1)) && event="cert"; fi
  if ((t % 300 < 10 && t > 0)); then
    kill "$REDIS" 2>/dev/null || true
    wait "$REDIS" 2>/dev/null || true
    sleep 2
    start_redis
    event="$event redis"
  fi
  if ((t % 420 < 10 && t > 0)); then
    if [[ $next_origin == A ]]; then
      kill "$ORIGIN_A"; wait "$ORIGIN_A" 2>/dev/null || true; sleep 1; ORIGIN_A=$(start_origin $P_A); next_origin=B
    else
      kill "$ORIGIN_B"; wait "$ORIGIN_B" 2>/dev/null || true; sleep 1; ORIGIN_B=$(start_origin $P_B); next_origin=A
    fi
    event="$event upstream"
  fi
  kill -0 "$GH_PID" 2>/dev/null || { log "gatehouse died"; break; }
  rss=$(awk '/VmRSS/ { print $2 }' "/proc/$GH_PID/status")
  fds=$(ls "/proc/$GH_PID/fd" | wc -l)
  threads=$(ls "/proc/$GH_PID/task" | wc -l)
  echo "$t,$rss,$fds,$threads,$(metric gatehouse_connections_open),$(metric gatehouse_websockets_open),${event# }" >>"$SAMPLES"
done
wait "$HOSTILE" || true
for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
curl -sf "http://127.0.0.1:$P_ADMIN/metrics" >"$WORK/metrics.txt" || true

# ---------------------------------------------------------------- report
mkdir -p "$OUT"
NAME=${SOAK_NAME:-$(date +%Y-%m-%d)-soak}
python3 "$HERE/soak_report.py" --work "$WORK" --out "$OUT" --name "$NAME" --rev "$REV" \
  --seconds "$SECS" --rotations "$ROTATIONS" --log "$WORK/gatehouse.log"
log "wrote $OUT/$NAME.md"
