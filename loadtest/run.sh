#!/usr/bin/env bash
# Gatehouse vs nginx and a bare hyper + rustls server, side by side on one machine (issues 8
# and 16). See loadtest/README.md.
#
#   loadtest/run.sh            # quick mode: 2 rounds of 4 s per measurement (~3 min after the build)
#   loadtest/run.sh full       # 5 rounds of 10 s (~20 min)
#
# Environment:
#   LOADTEST_REV=HEAD      measure a committed revision (git archive into a temp dir) instead
#                          of the working tree (default: the working tree, marked -dirty if so)
#   LOADTEST_NO_INSTALL=1  do not apt-get/pip install missing tools
#   LOADTEST_OUT=DIR       where the results go (default loadtest/results)
#   LOADTEST_KEEP=1        keep the temp dir (configs, logs, raw outputs)
#   LOADTEST_WORKERS=N     workers per server (default 1): Gatehouse worker_threads, nginx
#                          worker_processes, loadtest-bare --workers; with N > 1 the servers
#                          are pinned to CPUs 0-1 instead of CPU 0
#
# Layout: origin + proxies (and the bare server) pinned to CPU 0, every load generator to
# CPU 1 (taskset). Each server gets one worker (LOADTEST_WORKERS above). Everything listens
# on 127.0.0.1 only.
set -euo pipefail

MODE=${1:-quick}
case "$MODE" in
quick) ROUNDS=2 DUR=4 CEILING_ROUNDS=1 ;;
full) ROUNDS=5 DUR=10 CEILING_ROUNDS=5 ;;
*)
  echo "usage: $0 [quick|full]" >&2
  exit 2
  ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT=${LOADTEST_OUT:-$HERE/results}
WORK=$(mktemp -d /tmp/gatehouse-loadtest.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -n ${LOADTEST_KEEP:-} ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

SERVER_CPU=0
LOAD_CPU=1
if [[ $(nproc) -lt 2 ]]; then
  log "only one CPU: proxies and load generators share it (numbers will say little)"
  LOAD_CPU=0
fi
WORKERS=${LOADTEST_WORKERS:-1}
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || { echo "LOADTEST_WORKERS must be a number >= 1" >&2; exit 2; }
# The CPUs the servers under test (Gatehouse, nginx, bare) are pinned to. With more than one
# worker each they get CPUs 0-1: they then share the generators' core, so req/s and latency
# are bounded by that; CPU per request stays comparable. The origin stays on CPU 0.
PROXY_CPUS=$SERVER_CPU
((WORKERS == 1)) || PROXY_CPUS=$SERVER_CPU,$LOAD_CPU

# Ports (loopback only).
P_ORIGIN=18000
P_GH=18443 P_GH_LOCAL=18444 P_GH_REDIS=18445 P_GH_FRESH=18446
P_NGINX=19443 P_NGINX_FRESH=19446
P_BARE=18447 P_BARE_FRESH=18448

# ---------------------------------------------------------------- tools
install_missing() {
  local apt=()
  command -v wrk >/dev/null || apt+=(wrk)
  command -v h2load >/dev/null || apt+=(nghttp2-client)
  command -v nginx >/dev/null || apt+=(nginx-light)
  command -v openssl >/dev/null || apt+=(openssl)
  command -v taskset >/dev/null || apt+=(util-linux)
  command -v redis-server >/dev/null || apt+=(redis-server)
  if ((${#apt[@]})); then
    if [[ -n ${LOADTEST_NO_INSTALL:-} ]]; then
      log "missing: ${apt[*]} (LOADTEST_NO_INSTALL set)"
      exit 1
    fi
    log "installing ${apt[*]}"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${apt[@]}" >/dev/null
  fi
  if ! python3 -c 'import matplotlib' 2>/dev/null && [[ -z ${LOADTEST_NO_INSTALL:-} ]]; then
    log "installing matplotlib (pip) for the chart"
    python3 -m pip install --quiet matplotlib 2>/dev/null ||
      python3 -m pip install --quiet --break-system-packages matplotlib 2>/dev/null ||
      log "matplotlib unavailable: the results will have no PNG"
  fi
}
install_missing

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
# The proxy holds two descriptors per WebSocket (client + upstream).
IDLE_TLS=$((NOFILE - 500 < 10000 ? NOFILE - 500 : 10000))
IDLE_WS=$(((NOFILE - 2000) / 2 < 10000 ? (NOFILE - 2000) / 2 : 10000))

# ---------------------------------------------------------------- build
SRC=$REPO
REV_LABEL=$(git -C "$REPO" rev-parse HEAD)
if [[ -n ${LOADTEST_REV:-} ]]; then
  REV_LABEL=$(git -C "$REPO" rev-parse "$LOADTEST_REV")
  # A fixed place, re-extracted only when the revision changes, so cargo can reuse builds.
  SRC=$REPO/target/loadtest-src
  if [[ $(cat "$SRC/.loadtest-rev" 2>/dev/null) != "$REV_LABEL" ]]; then
    rm -rf "$SRC"
    mkdir -p "$SRC"
    # --touch: files newer than any earlier build, so cargo rebuilds what changed.
    git -C "$REPO" archive "$REV_LABEL" | tar -x --touch -C "$SRC"
    echo "$REV_LABEL" >"$SRC/.loadtest-rev"
  fi
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target/loadtest-rev}
  DIRTY=""
else
  DIRTY=$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock | head -c1)
  [[ -z $DIRTY ]] || DIRTY="-dirty"
fi
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
log "building gatehouse and the origin (release) from ${LOADTEST_REV:-working tree} $REV_LABEL$DIRTY"
(cd "$SRC" && cargo build --release --locked -p gatehouse -p gatehouse-loadtest-origin) >&2
GH=$TARGET/release/gatehouse
ORIGIN=$TARGET/release/loadtest-origin
CLIENT=$TARGET/release/loadtest-client
# The bare hyper + rustls server (issue 16's floor). A revision older than the kit's bare
# server has none: skip it rather than run a binary left over from another build.
BARE=""
if [[ -f $SRC/loadtest/origin/src/bin/loadtest-bare.rs ]]; then
  BARE=$TARGET/release/loadtest-bare
else
  log "${LOADTEST_REV:-the working tree} has no loadtest-bare: the bare target is skipped"
fi

# ---------------------------------------------------------------- PKI (temp dir, never committed)
PKI=$WORK/pki
mkdir -p "$PKI"
(
  cd "$PKI"
  openssl ecparam -name prime256v1 -genkey -noout -out root.key
  openssl req -x509 -new -key root.key -sha256 -days 2 -subj "/O=Gatehouse loadtest/CN=loadtest root" \
    -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign" -out root.pem
  openssl ecparam -name prime256v1 -genkey -noout -out int.key
  openssl req -new -key int.key -subj "/O=Gatehouse loadtest/CN=loadtest intermediate" -out int.csr
  printf 'basicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n' >int.ext
  openssl x509 -req -in int.csr -CA root.pem -CAkey root.key -CAcreateserial -days 2 -sha256 -extfile int.ext -out int.pem
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out leaf.key
  openssl req -new -key leaf.key -subj "/O=Gatehouse loadtest/CN=localhost" -out leaf.csr
  printf 'basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' >leaf.ext
  openssl x509 -req -in leaf.csr -CA int.pem -CAkey int.key -CAcreateserial -days 2 -sha256 -extfile leaf.ext -out leaf.pem
  cat leaf.pem int.pem >chain.pem
) 2>/dev/null

# ---------------------------------------------------------------- configs
POOL=512
gh_config() { # PORT FILE [rate-limit lines]
  cat >"$2" <<EOF
# Gatehouse load-test configuration (written by loadtest/run.sh)
[listen]
https = "127.0.0.1:$1"

[tls]
cert = "$PKI/chain.pem"
key = "$PKI/leaf.key"
names = ["localhost", "127.0.0.1"]   # the load generators send Host: 127.0.0.1 (unknown hosts get 421)
min_version = "1.3"

[upstream]
url = "http://127.0.0.1:$P_ORIGIN"
pool_max_idle = $POOL

[proxy]
max_concurrent_streams = 256
header_read_timeout = "300s"   # the idle-connection scenario holds connections open
keepalive_timeout = "300s"     # as nginx keepalive_timeout below

[server]
worker_threads = $WORKERS

[log]
level = "warn"
access_log = false
${3:-}
EOF
}
gh_config $P_GH "$WORK/gh.toml"
gh_config $P_GH_FRESH "$WORK/gh-fresh.toml"
gh_config $P_GH_LOCAL "$WORK/gh-local.toml" $'\n[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000'
gh_config $P_GH_REDIS "$WORK/gh-redis.toml" $'\n[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\nredis_url = "redis://127.0.0.1:6379"'

nginx_config() { # PORT DIR
  mkdir -p "$2"
  cat >"$2/nginx.conf" <<EOF
# nginx configured like Gatehouse (written by loadtest/run.sh)
worker_processes $WORKERS;
worker_rlimit_nofile $NOFILE;
user root;
pid $2/nginx.pid;
error_log $2/error.log warn;
events { worker_connections $((NOFILE - 100)); }
http {
  access_log off;
  client_body_temp_path $2/body;
  proxy_temp_path $2/proxy;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  http2_max_concurrent_streams 256;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
  upstream origin {
    server 127.0.0.1:$P_ORIGIN;
    keepalive $POOL;
    keepalive_requests 100000000;
    keepalive_timeout 60s;
  }
  server {
    listen 127.0.0.1:$1 ssl http2;
    ssl_certificate $PKI/chain.pem;
    ssl_certificate_key $PKI/leaf.key;
    ssl_protocols TLSv1.3;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Host \$host;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_read_timeout 600s;
      proxy_send_timeout 600s;
    }
  }
}
EOF
}
nginx_config $P_NGINX "$WORK/nginx"
nginx_config $P_NGINX_FRESH "$WORK/nginx-fresh"

# ---------------------------------------------------------------- processes
wait_port() {
  local i
  for i in $(seq 1 100); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "nothing listens on port $1"
  return 1
}
start_origin() {
  taskset -c $SERVER_CPU "$ORIGIN" --listen 127.0.0.1:$P_ORIGIN >"$WORK/origin.log" 2>&1 &
  ORIGIN_PID=$!
  PIDS+=("$ORIGIN_PID")
  wait_port $P_ORIGIN
}
start_gh() { # CONFIG PORT -> GH_PID (empty if the config is refused)
  GH_PID=""
  if ! "$GH" check --config "$1" >"$1.check" 2>&1; then
    log "gatehouse refuses $1: $(grep -m1 -E '^  - ' "$1.check" || head -1 "$1.check")"
    return 0
  fi
  taskset -c "$PROXY_CPUS" "$GH" run --config "$1" >"$1.log" 2>&1 &
  GH_PID=$!
  PIDS+=("$GH_PID")
  wait_port "$2"
}
start_nginx() { # DIR PORT -> NGINX_PIDS (master workers...)
  taskset -c "$PROXY_CPUS" nginx -p "$1" -c "$1/nginx.conf" -g 'daemon off;' 2>>"$1/error.log" &
  local master=$!
  PIDS+=("$master")
  wait_port "$2"
  # The master listens before it forks the workers: wait until all of them exist, or their
  # CPU time would be missed.
  local workers=""
  for _ in $(seq 1 50); do
    workers=$(pgrep -P "$master" | tr '\n' ' ' || true) # none yet: pgrep fails (pipefail)
    (($(wc -w <<<"$workers") >= WORKERS)) && break
    sleep 0.1
  done
  NGINX_PIDS="$master ${workers% }"
}
start_bare() { # PORT -> BARE_PID
  taskset -c "$PROXY_CPUS" "$BARE" --cert "$PKI/chain.pem" --key "$PKI/leaf.key" \
    --listen "127.0.0.1:$1" --workers "$WORKERS" >"$WORK/bare-$1.log" 2>&1 &
  BARE_PID=$!
  PIDS+=("$BARE_PID")
  wait_port "$1"
}
stop_pids() {
  local pid
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

# CPU ticks (utime + stime) of PIDS, and busy ticks of the server CPU.
ticks() {
  local t=0 pid f
  for pid in "$@"; do
    read -r -a f <"/proc/$pid/stat"
    t=$((t + f[13] + f[14]))
  done
  echo $t
}
# user + nice + system only: interrupts and softirqs (the loopback network stack) are not
# "other processes".
cpu_busy() { awk -v c="cpu$SERVER_CPU" '$1==c{print $2+$3+$4}' /proc/stat; }

RAW=$WORK/raw
mkdir -p "$RAW"
echo -e "scenario\ttarget\tround\tkind\tfile\tproxy_ticks\torigin_ticks\twall_s\tcpu_busy_ticks\textra_ticks" >"$RAW/index.tsv"
# measure SCENARIO TARGET ROUND KIND "PROXY PIDS" CMD...: runs CMD on the load CPU and records
# its output and the CPU time the proxy and the origin (and EXTRA_PIDS: Redis) spent meanwhile.
EXTRA_PIDS=""
measure() {
  local scenario=$1 target=$2 round=$3 kind=$4 pids=$5
  shift 5
  local file="$RAW/$scenario.$target.$round.out" p0 o0 b0 t0 p1 o1 b1 t1 x0 x1
  # shellcheck disable=SC2086
  p0=$(ticks $pids) o0=$(ticks "$ORIGIN_PID") b0=$(cpu_busy) t0=$(date +%s.%N) x0=$(ticks $EXTRA_PIDS)
  taskset -c $LOAD_CPU "$@" >"$file" 2>"$file.err" || log "$scenario $target: load generator exited $? ($(tail -1 "$file.err"))"
  # shellcheck disable=SC2086
  p1=$(ticks $pids) o1=$(ticks "$ORIGIN_PID") b1=$(cpu_busy) t1=$(date +%s.%N) x1=$(ticks $EXTRA_PIDS)
  echo "$*" >"$file.cmd"
  echo -e "$scenario\t$target\t$round\t$kind\t$file\t$((p1 - p0))\t$((o1 - o0))\t$(awk "BEGIN{print $t1 - $t0}")\t$((b1 - b0))\t$((x1 - x0))" >>"$RAW/index.tsv"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date +%s)
log "mode $MODE: $ROUNDS rounds x ${DUR}s; $WORKERS worker(s) per server on CPU $PROXY_CPUS; idle connections: $IDLE_TLS TLS, $IDLE_WS WebSockets (open-file limit $NOFILE)"

start_origin
start_gh "$WORK/gh.toml" $P_GH
MAIN_GH=$GH_PID
[[ -n $MAIN_GH ]] || { log "gatehouse did not start; see $WORK/gh.toml.check"; exit 1; }
start_nginx "$WORK/nginx" $P_NGINX
MAIN_NGINX=$NGINX_PIDS
with_bare=()
if [[ -n $BARE ]]; then
  start_bare $P_BARE
  with_bare=(bare)
fi

declare -A URL=([gatehouse]=https://127.0.0.1:$P_GH [nginx]=https://127.0.0.1:$P_NGINX [origin]=http://127.0.0.1:$P_ORIGIN [bare]=https://127.0.0.1:$P_BARE)
declare -A PROC=([gatehouse]=$MAIN_GH [nginx]=$MAIN_NGINX [origin]=$ORIGIN_PID [bare]=${BARE_PID:-})

# Warm up both proxies (pools, caches) and the bare server.
for t in gatehouse nginx "${with_bare[@]}"; do
  taskset -c $LOAD_CPU wrk -t1 -c64 -d1s "${URL[$t]}/" >/dev/null 2>&1 || true
done

for round in $(seq 1 "$ROUNDS"); do
  log "round $round/$ROUNDS"
  # Order alternates per round (A B, then B A) so neither proxy always runs first. The
  # bare server (the floor, not a contender) follows the pair in every round.
  if ((round % 2)); then order=(gatehouse nginx); else order=(nginx gatehouse); fi
  targets=("${order[@]}" "${with_bare[@]}")
  ((round <= CEILING_ROUNDS)) && with_origin=(origin) || with_origin=()

  # 1. HTTP/1.1 keep-alive
  for c in 50 256; do
    for t in "${targets[@]}" "${with_origin[@]}"; do
      measure "h1-c$c" "$t" "$round" wrk "${PROC[$t]}" wrk -t1 -c$c -d${DUR}s --latency "${URL[$t]}/"
    done
  done
  # 2. HTTP/2 multiplexed: 500 streams (10 connections x 50) and 32 (4 x 8)
  for cm in "10 50" "4 8"; do
    read -r c m <<<"$cm"
    for t in "${targets[@]}"; do
      measure "h2-c${c}m$m" "$t" "$round" h2load "${PROC[$t]}" \
        h2load -t1 -c"$c" -m"$m" -D "$DUR" --log-file="$RAW/h2-c${c}m$m.$t.$round.log" "${URL[$t]}/"
    done
  done
  # 3. a new TLS 1.3 connection (full handshake) per request
  for t in "${targets[@]}" "${with_origin[@]}"; do
    measure handshake "$t" "$round" client "${PROC[$t]}" \
      "$CLIENT" handshake --url "${URL[$t]}/" --conns 32 --duration "$DUR"
  done
  # 5. WebSocket echo round trips (the bare server has no WebSocket)
  for t in "${order[@]}" "${with_origin[@]}"; do
    url=${URL[$t]/https:/wss:}
    url=${url/http:/ws:}
    measure ws-echo "$t" "$round" client "${PROC[$t]}" \
      "$CLIENT" ws-echo --url "$url/ws" --conns 50 --duration "$DUR"
  done
done

# 6. rate limiting: off / local / Redis, Gatehouse only, interleaved
start_gh "$WORK/gh-local.toml" $P_GH_LOCAL
GH_LOCAL=$GH_PID
# A Redis of our own (no keys shared with anyone else's tests), pinned to the load-generator
# core: in production Redis runs on another host, not on the gateway's core. Its CPU per
# request is reported separately. Without redis-server, a Redis already on 6379 is used.
REDIS_OK="" REDIS_PID="" REDIS_PORT=16379
if command -v redis-server >/dev/null; then
  taskset -c $LOAD_CPU redis-server --bind 127.0.0.1 --port $REDIS_PORT --save '' --appendonly no \
    --daemonize no >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  wait_port $REDIS_PORT && REDIS_OK=1
elif redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  REDIS_OK=1 REDIS_PORT=6379
fi
sed -i "s/127.0.0.1:6379/127.0.0.1:$REDIS_PORT/" "$WORK/gh-redis.toml"
GH_REDIS=""
if [[ -n $REDIS_OK ]]; then
  start_gh "$WORK/gh-redis.toml" $P_GH_REDIS
  GH_REDIS=$GH_PID
fi
URL[gatehouse-local]=https://127.0.0.1:$P_GH_LOCAL
URL[gatehouse-redis]=https://127.0.0.1:$P_GH_REDIS
PROC[gatehouse-local]=$GH_LOCAL
PROC[gatehouse-redis]=$GH_REDIS
rl_targets=(gatehouse)
[[ -n $GH_LOCAL ]] && rl_targets+=(gatehouse-local)
[[ -n $GH_REDIS ]] && rl_targets+=(gatehouse-redis)
for t in "${rl_targets[@]:1}"; do taskset -c $LOAD_CPU wrk -t1 -c50 -d1s "${URL[$t]}/" >/dev/null 2>&1 || true; done
EXTRA_PIDS=$REDIS_PID
for round in $(seq 1 "$ROUNDS"); do
  for t in "${rl_targets[@]}"; do
    measure ratelimit "$t" "$round" wrk "${PROC[$t]}" wrk -t1 -c50 -d${DUR}s --latency "${URL[$t]}/"
  done
done
EXTRA_PIDS=""
# shellcheck disable=SC2086
stop_pids $GH_LOCAL $GH_REDIS

# 4. memory: fresh processes, RSS before and after holding idle connections (the bare server
# for TLS only: it has no WebSocket)
for kind in tls ws; do
  idle_targets=(gatehouse nginx)
  [[ $kind == tls ]] && idle_targets+=("${with_bare[@]}")
  for t in "${idle_targets[@]}"; do
    if [[ $t == gatehouse ]]; then
      start_gh "$WORK/gh-fresh.toml" $P_GH_FRESH
      pids=$GH_PID url=https://127.0.0.1:$P_GH_FRESH
    elif [[ $t == nginx ]]; then
      start_nginx "$WORK/nginx-fresh" $P_NGINX_FRESH
      pids=$NGINX_PIDS url=https://127.0.0.1:$P_NGINX_FRESH
    else
      start_bare $P_BARE_FRESH
      pids=$BARE_PID url=https://127.0.0.1:$P_BARE_FRESH
    fi
    sleep 0.5
    args=(--conns "$IDLE_TLS")
    [[ $kind == ws ]] && args=(--conns "$IDLE_WS" --ws) && url=${url/https:/wss:}/ws
    pid_args=()
    for p in $pids; do pid_args+=(--pid "$p"); done
    log "idle $kind through $t: ${args[1]} connections"
    measure "idle-$kind" "$t" 1 client "$pids" \
      "$CLIENT" idle --url "$url" --ca "$PKI/root.pem" "${args[@]}" "${pid_args[@]}" --settle 2
    # shellcheck disable=SC2086
    stop_pids $pids
  done
done

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$(($(date +%s) - STARTED))

# ---------------------------------------------------------------- report
CODE_REV=$(git -C "$REPO" log -1 --format=%H -- src Cargo.lock)
cat >"$RAW/meta.env" <<EOF
MODE=$MODE
ROUNDS=$ROUNDS
DUR=$DUR
REV=$REV_LABEL$DIRTY
CODE_REV=$CODE_REV
DATE=$(date -u +%Y-%m-%d)
DATETIME=$(date -u '+%Y-%m-%d %H:%M UTC')
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
CORES=$(nproc)
KERNEL=$(uname -r)
OS=$(. /etc/os-release && echo "$PRETTY_NAME")
NGINX_VERSION=$(nginx -v 2>&1 | sed 's/.*nginx\///')
OPENSSL_VERSION=$(openssl version | cut -d' ' -f1-2)
RUSTC=$(rustc --version)
WRK=$(wrk -v 2>&1 | head -1 | cut -d' ' -f2)
H2LOAD=$(h2load --version | head -1 | sed 's/.*nghttp2\///')
LOAD_BEFORE=$LOAD_BEFORE
LOAD_AFTER=$LOAD_AFTER
ELAPSED=$ELAPSED
IDLE_TLS=$IDLE_TLS
IDLE_WS=$IDLE_WS
NOFILE=$NOFILE
CLK_TCK=$(getconf CLK_TCK)
SERVER_CPU=$SERVER_CPU
LOAD_CPU=$LOAD_CPU
WORKERS=$WORKERS
PROXY_CPUS=$PROXY_CPUS
BARE=${BARE:+yes}
BARE_CMD=${BARE:+loadtest-bare --cert chain.pem --key leaf.key --listen 127.0.0.1:$P_BARE --workers $WORKERS}
RL_LOCAL=${GH_LOCAL:+yes}
REDIS_PORT=$REDIS_PORT
REDIS_VERSION=$(redis-server --version 2>/dev/null | grep -o 'v=[0-9.]*' | cut -c3-)
RL_REDIS=${GH_REDIS:+yes}
RL_REDIS_REFUSED=$(grep -m1 -E '^  - ' "$WORK/gh-redis.toml.check" 2>/dev/null | sed 's/^ *- //' || true)
EOF
cp "$WORK/gh.toml" "$RAW/gatehouse.toml"
cp "$WORK/nginx/nginx.conf" "$RAW/nginx.conf"
mkdir -p "$OUT"
python3 "$HERE/report.py" "$RAW" "$OUT"
python3 "$HERE/report.py" --mark-stale "$OUT" "$REPO"
log "done in ${ELAPSED}s"
