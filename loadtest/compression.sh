#!/usr/bin/env bash
# The CPU cost of [compression]: a 32 KiB HTML page (loadtest-origin's /page) fetched over
# HTTPS HTTP/1.1 keep-alive through four Gatehouse instances: compression off, and each
# of gzip, br and zstd alone. ROUNDS rounds of DUR seconds, instances in rotating order.
#
#   loadtest/compression.sh      # after cargo build --release -p gatehouse -p gatehouse-loadtest-origin
#   ROUNDS=5 DUR=10 loadtest/compression.sh
#
# Same layout as run.sh: origin and proxies on CPU 0 (one worker each), wrk on CPU 1,
# loopback only, the repository's throw-away localhost certificate. The proxy's CPU per
# request comes from /proc/PID/stat (user + system) over each run; the cost of compressing
# is the difference to the uncompressed instance, divided by the page's size in KiB. Prints
# a Markdown table (medians over rounds) and the raw rows.
set -euo pipefail

ROUNDS=${ROUNDS:-3} DUR=${DUR:-5} CONNS=${CONNS:-50}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
GH=$REPO/target/release/gatehouse
ORIGIN=$REPO/target/release/loadtest-origin
for tool in wrk taskset curl "$GH" "$ORIGIN"; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (see loadtest/README.md)" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/gatehouse-compression.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

MODES=(off gzip br zstd)
P_ORIGIN=18110
declare -A PORT=([off]=18611 [gzip]=18612 [br]=18613 [zstd]=18614) PID
taskset -c 0 "$ORIGIN" --listen 127.0.0.1:$P_ORIGIN >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
for mode in "${MODES[@]}"; do
  section=""
  [ "$mode" = off ] || section=$'[compression]\nalgorithms = ["'"$mode"$'"]'
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
[server]
worker_threads = 1
[log]
access_log = false
level = "warn"
$section
EOF
  taskset -c 0 "$GH" run --config "$WORK/$mode.toml" >"$WORK/$mode.log" 2>&1 &
  PID[$mode]=$!
  PIDS+=($!)
done
ACCEPT="Accept-Encoding: gzip, br, zstd"
declare -A BYTES
for mode in "${MODES[@]}"; do
  for _ in $(seq 100); do
    curl -sk -o /dev/null "https://127.0.0.1:${PORT[$mode]}/page" && break
    sleep 0.1
  done
  BYTES[$mode]=$(curl -sk -H "$ACCEPT" -o /dev/null -w '%{size_download}' "https://127.0.0.1:${PORT[$mode]}/page")
  got=$(curl -sk -H "$ACCEPT" -o /dev/null -D - "https://127.0.0.1:${PORT[$mode]}/page" | tr -d '\r' | awk -F': ' 'tolower($1)=="content-encoding"{print $2}')
  [ "$mode" = off ] && [ -z "$got" ] || [ "$got" = "$mode" ] || { echo "$mode instance answered content-encoding '$got'" >&2; exit 1; }
done

ticks() { local f; read -r -a f <"/proc/$1/stat"; echo $((f[13] + f[14])); }
cpu0_busy() { awk '/^cpu0 /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
HZ=$(getconf CLK_TCK)

echo "# raw rows (mode round req/s p50 p99 proxy-µs/req cpu0-other-%)"
declare -A RPS CPU P50 P99 OTHER
for round in $(seq "$ROUNDS"); do
  order=("${MODES[@]:round % 4}" "${MODES[@]:0:round % 4}")
  for mode in "${order[@]}"; do
    t0=$(ticks "${PID[$mode]}"); o0=$(ticks "$(pgrep -f "loadtest-origin --listen 127.0.0.1:$P_ORIGIN" | head -1)")
    read -r b0 a0 < <(cpu0_busy)
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DUR}s" --latency -H "$ACCEPT" "https://127.0.0.1:${PORT[$mode]}/page")
    t1=$(ticks "${PID[$mode]}"); o1=$(ticks "$(pgrep -f "loadtest-origin --listen 127.0.0.1:$P_ORIGIN" | head -1)")
    read -r b1 a1 < <(cpu0_busy)
    reqs=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
    p50=$(awk '$1=="50%"{print $2}' <<<"$out")
    p99=$(awk '$1=="99%"{print $2}' <<<"$out")
    cpu=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v n="$reqs" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}')
    # CPU 0 busy time not spent by this proxy or the origin: other work on the core.
    other=$(awk -v busy=$((b1 - b0)) -v all=$((a1 - a0)) -v mine=$((t1 - t0 + o1 - o0)) \
      'BEGIN{ if (all > 0) printf "%.0f", (busy - mine) * 100 / all; else print "?" }')
    echo "$mode $round $rps $p50 $p99 $cpu $other"
    RPS[$mode]+="$rps " CPU[$mode]+="$cpu " P50[$mode]+="$p50 " P99[$mode]+="$p99 " OTHER[$mode]+="$other "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR]=$1} END{ if (NR%2) print v[(NR+1)/2]; else printf "%.1f\n", (v[NR/2]+v[NR/2+1])/2 }'; }
median_ms() { tr ' ' '\n' | grep -v '^$' | awk '/us$/{sub("us","");print $1/1000;next} /ms$/{sub("ms","");print $1;next} /s$/{sub("s","");print $1*1000;next}' | median; }
page_kib=$(awk -v b="${BYTES[off]}" 'BEGIN{printf "%.1f", b / 1024}')
base=$(median <<<"${CPU[off]}")
echo
echo "| encoding | response bytes | ratio | req/s | p50 ms | p99 ms | proxy CPU µs/req | extra µs/req | µs per KiB compressed | other load on CPU 0 % |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for mode in "${MODES[@]}"; do
  cpu=$(median <<<"${CPU[$mode]}")
  extra=$(awk -v c="$cpu" -v b="$base" 'BEGIN{printf "%.1f", c - b}')
  per_kib=$(awk -v e="$extra" -v k="$page_kib" -v m="$mode" 'BEGIN{ if (m == "off") print "-"; else printf "%.2f", e / k }')
  ratio=$(awk -v a="${BYTES[off]}" -v b="${BYTES[$mode]}" 'BEGIN{printf "%.1f:1", a / b}')
  echo "| $mode | ${BYTES[$mode]} | $ratio | $(median <<<"${RPS[$mode]}") | $(median_ms <<<"${P50[$mode]}") | $(median_ms <<<"${P99[$mode]}") | $cpu | $extra | $per_kib | $(median <<<"${OTHER[$mode]}") |"
done
echo
echo "page: ${BYTES[off]} bytes ($page_kib KiB) of HTML; $ROUNDS rounds × ${DUR}s; wrk -t1 -c$CONNS; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
