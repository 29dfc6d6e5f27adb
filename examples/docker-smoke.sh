#!/usr/bin/env bash
# End-to-end smoke test of the Docker path, run as an operator would: builds the gatehouse
# image (../Dockerfile) and the example app (mysite/Dockerfile: Django + Channels), brings
# up docker-compose.yml (gatehouse; web: Gunicorn on TCP; channels: Daphne on a Unix socket
# shared with gatehouse; Redis) with a dev certificate for example.com, and checks from the host:
#
#   - `gatehouse check` in the container accepts the mounted config (docs' step 5)
#   - HTTPS through the gateway reaches Django, which sees https and the client's Host
#   - plain HTTP is redirected to HTTPS
#   - a static file is served by gatehouse from the app's volume
#   - a WebSocket message goes through the Redis channel layer (group_send) to a second
#     connection
#   - the image's HEALTHCHECK turns the container healthy
#   - a certificate renewed on the host (renamed into the mounted directory) is served by
#     the running container: new serial, same container start, no restart
#   - `docker stop` drains: an in-flight request completes, an open WebSocket gets Close
#     1001, and the process exits 0 by itself within the stop grace period (no SIGKILL)
#
# One PASS/FAIL line per check; exits 1 if any check failed, 2 if the stack could not be
# set up. Everything it creates (compose project "gatehouse-smoke" with its volumes and
# networks, temporary files, secrets it had to create) is removed on exit; KEEP=1 leaves
# the stack running for a look. It is not part of .ci/test: it needs a Docker engine and
# a release build in Docker takes minutes.
#
#   examples/docker-smoke.sh
#
# Environment (all optional):
#   RUST_IMAGE, RUNTIME_IMAGE   base images of ../Dockerfile (default: the Dockerfile's)
#   PYTHON_IMAGE                base image of mysite/Dockerfile (default python:3.12-slim)
#   REDIS_IMAGE                 the compose file's Redis image (default redis:7-alpine)
#   HTTP_PORT, HTTPS_PORT       host ports, bound on 127.0.0.1 (default 18080, 18443)
#   SKIP_BUILD=1                use the existing gatehouse:latest and mysite image
#   KEEP=1                      leave the stack up (remove it with the printed command)
#
# No registry (offline, air-gapped)? examples/make-local-base-images.sh builds local
# stand-ins from Debian packages and prints the variables to pass here.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
project=gatehouse-smoke
http_port=${HTTP_PORT:-18080}
https_port=${HTTPS_PORT:-18443}
django_image=${DJANGO_IMAGE:-gatehouse-smoke/mysite:latest}
host=example.com

failures=0
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; failures=$((failures + 1)); }
step() { echo "----  $*"; }
die() { echo "FAIL  $*"; echo "SETUP FAILED"; exit 2; }

if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose_cmd=(docker-compose)
else
    die "neither 'docker compose' nor 'docker-compose' found"
fi
compose() { (cd "$here" && "${compose_cmd[@]}" -p "$project" "$@"); }
docker info >/dev/null 2>&1 || die "no Docker engine answers (is dockerd running?)"
command -v openssl >/dev/null || die "openssl not found"
command -v curl >/dev/null || die "curl not found"
command -v python3 >/dev/null || die "python3 not found (the WebSocket client)"

work=$(mktemp -d /tmp/gatehouse-smoke.XXXXXX)
created_secrets=()
cleanup() {
    local rc=$?
    if [ "${KEEP:-}" = 1 ]; then
        echo "KEEP=1: stack left up; remove it with:"
        echo "  (cd $here && ${compose_cmd[*]} -p $project down -v) && rm -rf $work"
        return
    fi
    if [ "$rc" -ne 0 ] && compose ps -q 2>/dev/null | grep -q .; then
        echo "---- last log lines of the stack (for the failure above) ----"
        compose logs --no-color --tail 40 2>&1 | sed 's/^/    /'
    fi
    compose down -v --remove-orphans >/dev/null 2>&1
    for file in "${created_secrets[@]}"; do rm -f "$file"; done
    rmdir "$here/secrets" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "docker-smoke: $(docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'), $("${compose_cmd[@]}" version --short 2>/dev/null || "${compose_cmd[@]}" version | head -1)"
echo "base images: RUST_IMAGE=${RUST_IMAGE:-(Dockerfile default)} RUNTIME_IMAGE=${RUNTIME_IMAGE:-(Dockerfile default)} PYTHON_IMAGE=${PYTHON_IMAGE:-(default)} REDIS_IMAGE=${REDIS_IMAGE:-(default)}"

# ---- images -------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-}" != 1 ]; then
    build_args=()
    [ -n "${RUST_IMAGE:-}" ] && build_args+=(--build-arg "RUST_IMAGE=$RUST_IMAGE")
    [ -n "${RUNTIME_IMAGE:-}" ] && build_args+=(--build-arg "RUNTIME_IMAGE=$RUNTIME_IMAGE")
    step "docker build gatehouse:latest (a release build: minutes) ..."
    started=$SECONDS
    docker build "${build_args[@]}" -t gatehouse:latest "$repo" >"$work/build-gatehouse.log" 2>&1 \
        || { tail -30 "$work/build-gatehouse.log"; die "docker build of the gatehouse image (log above)"; }
    pass "gatehouse image built in $((SECONDS - started)) s ($(docker image inspect -f '{{.Size}}' gatehouse:latest | awk '{printf "%.0f MB", $1/1e6}'))"

    app_args=()
    [ -n "${PYTHON_IMAGE:-}" ] && app_args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
    step "docker build $django_image (examples/mysite) ..."
    started=$SECONDS
    docker build "${app_args[@]}" -f "$here/mysite/Dockerfile" -t "$django_image" "$here" \
        >"$work/build-mysite.log" 2>&1 \
        || { tail -30 "$work/build-mysite.log"; die "docker build of the example app (log above)"; }
    pass "example app image built in $((SECONDS - started)) s"
fi

# ---- secrets, certificates, environment ---------------------------------------------------
for name in gatehouse_redis_password django_redis_password redis_users.acl; do
    [ -e "$here/secrets/$name" ] || created_secrets+=("$here/secrets/$name")
done
(cd "$here" && ./make-secrets.sh) >/dev/null || die "examples/make-secrets.sh"

# A dev certificate for the config's names from the repo's local dev CA (mkcert-style,
# certs/local-ca/, created on first use). The mounted directory is the "host's" /etc/gatehouse/certs.
certs=$work/certs
mkdir -p "$certs" "$work/acme/.well-known/acme-challenge"
chmod 0755 "$work" "$certs" "$work/acme" "$work/acme/.well-known" "$work/acme/.well-known/acme-challenge"
issue() { # -> fullchain.pem + privkey.pem renamed into $certs (as certbot's deploy would)
    "$repo/certs/generate-dev-certs.sh" "$host" "www.$host" >"$work/issue.log" 2>&1 || { cat "$work/issue.log"; return 1; }
    install -m 0644 "$repo/certs/local/$host.crt" "$certs/.fullchain.pem.new"
    # The container runs as 65532: the key is readable by its group only (docs/operations.md).
    install -m 0640 -g 65532 "$repo/certs/local/$host.key" "$certs/.privkey.pem.new"
    mv "$certs/.privkey.pem.new" "$certs/privkey.pem"
    mv "$certs/.fullchain.pem.new" "$certs/fullchain.pem"
}
serial_of_file() { openssl x509 -noout -serial -in "$certs/fullchain.pem" | cut -d= -f2; }
served_serial() {
    openssl s_client -connect "127.0.0.1:$https_port" -servername "$host" </dev/null 2>/dev/null \
        | openssl x509 -noout -serial 2>/dev/null | cut -d= -f2
}
issue || die "certs/generate-dev-certs.sh $host www.$host"
cacert=$repo/certs/local-ca/root.crt

export GATEHOUSE_CERT_DIR=$certs
export ACME_WEBROOT=$work/acme
export DJANGO_IMAGE=$django_image
export GATEHOUSE_HTTP_PUBLISH=127.0.0.1:$http_port
export GATEHOUSE_HTTPS_PUBLISH=127.0.0.1:$https_port
[ -n "${REDIS_IMAGE:-}" ] && export REDIS_IMAGE

https_curl() { curl -sS --max-time 20 --cacert "$cacert" --resolve "$host:$https_port:127.0.0.1" "$@"; }

# ---- check, then up -----------------------------------------------------------------------
step "compose run --rm --no-deps gatehouse check"
if out=$(compose run --rm --no-deps gatehouse check 2>&1); then
    pass "gatehouse check accepts the mounted config: $(echo "$out" | grep -v '^\s*$' | tail -1)"
else
    echo "$out" | sed 's/^/    /'
    fail "gatehouse check refused the mounted config"
fi

step "compose up -d"
compose up -d >"$work/up.log" 2>&1 || { cat "$work/up.log"; die "compose up"; }
gatehouse_id=$(compose ps -q gatehouse)
[ -n "$gatehouse_id" ] || die "no gatehouse container after compose up"

# Wait for the first proxied answer (daphne and Redis start in parallel with the gateway).
deadline=$((SECONDS + 90))
until [ "$(https_curl -o /dev/null -w '%{http_code}' "https://$host:$https_port/" 2>/dev/null)" = 200 ]; do
    [ "$(docker inspect -f '{{.State.Running}}' "$gatehouse_id")" = true ] \
        || die "the gatehouse container exited: $(docker logs --tail 5 "$gatehouse_id" 2>&1)"
    [ $SECONDS -lt $deadline ] || die "no 200 through https://$host:$https_port/ within 90 s"
    sleep 1
done

# ---- HTTPS, redirect, static ---------------------------------------------------------------
body=$(https_curl -D "$work/headers" "https://$host:$https_port/")
if python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(not (d["is_secure"] is True and d["host"].split(":")[0]==sys.argv[2]))' "$body" "$host" 2>/dev/null; then
    pass "HTTPS through the gateway: Django answered $body"
else
    fail "HTTPS through the gateway: unexpected answer: $body"
fi
if grep -qi '^strict-transport-security:' "$work/headers"; then
    pass "HSTS header: $(grep -i '^strict-transport-security:' "$work/headers" | tr -d '\r')"
else
    fail "no Strict-Transport-Security header on the HTTPS answer"
fi

redirect=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code} %{redirect_url}' \
    -H "Host: $host" "http://127.0.0.1:$http_port/path/?q=1")
if [[ "$redirect" =~ ^30[18]\ https://$host/path/\?q=1$ ]]; then
    pass "HTTP -> HTTPS redirect: $redirect"
else
    fail "HTTP -> HTTPS redirect: got '$redirect', want 301/308 to https://$host/path/?q=1"
fi

static=$(https_curl "https://$host:$https_port/static/smoke.txt")
if [ "$static" = "served by gatehouse from the static volume" ]; then
    pass "static file served from the app's volume: /static/smoke.txt"
else
    fail "static file /static/smoke.txt: got '$static'"
fi

# ---- WebSocket through the Redis channel layer --------------------------------------------
# A standard-library client (no packages on the host): TLS, the RFC 6455 handshake with the
# Origin a browser would send, masked text frames.
cat >"$work/ws.py" <<'PY'
import base64, hashlib, json, os, socket, ssl, struct, sys

HOST, PORT, CAFILE, MODE = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

class WebSocket:
    def __init__(self, path):
        ctx = ssl.create_default_context(cafile=CAFILE)
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", PORT), timeout=20),
                                    server_hostname=HOST)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\nOrigin: https://{HOST}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                sys.exit(f"connection closed during the handshake: {head!r}")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            sys.exit(f"handshake refused: {lines[0]}")
        want = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        if not any(l.lower() == f"sec-websocket-accept: {want}".lower() for l in lines[1:]):
            sys.exit(f"handshake: wrong or missing Sec-WebSocket-Accept (want {want}): {lines}")

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0xFE]) + struct.pack("!H", n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self):
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b0 & 0x0F, self._read(n)

if MODE == "broadcast":
    sender, listener = WebSocket("/ws/broadcast/"), WebSocket("/ws/broadcast/")
    text = "smoke-" + os.urandom(4).hex()
    sender.send(0x1, text.encode())
    opcode, payload = listener.recv()
    print(payload.decode())
    message = json.loads(payload)
    sys.exit(0 if opcode == 1 and message["text"] == text else f"unexpected frame {opcode} {payload!r}")
elif MODE == "hold":
    ws = WebSocket("/ws/broadcast/")
    print("open", flush=True)
    ws.sock.settimeout(60)
    while True:
        opcode, payload = ws.recv()
        if opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            print(f"close {code} {payload[2:].decode(errors='replace')}", flush=True)
            sys.exit(0)
PY
if ws=$(python3 "$work/ws.py" "$host" "$https_port" "$cacert" broadcast 2>&1) \
    && [[ "$ws" == *'"channel_layer": "RedisChannelLayer"'* ]]; then
    pass "WebSocket: a message sent on one connection reached another through group_send on the Redis channel layer: $ws"
else
    fail "WebSocket broadcast through the Redis channel layer: $ws"
fi

# ---- HEALTHCHECK --------------------------------------------------------------------------
step "waiting for the HEALTHCHECK (interval 15 s) ..."
deadline=$((SECONDS + 120))
while health=$(docker inspect -f '{{.State.Health.Status}}' "$gatehouse_id"); [ "$health" != healthy ]; do
    [ $SECONDS -lt $deadline ] || break
    sleep 2
done
if [ "$health" = healthy ]; then
    pass "HEALTHCHECK: healthy ($(docker inspect -f '{{(index .State.Health.Log 0).Output}}' "$gatehouse_id" | head -c 200 | tr '\n' ' '))"
else
    fail "HEALTHCHECK: $health after 120 s: $(docker inspect -f '{{json .State.Health}}' "$gatehouse_id" | head -c 600)"
fi

# ---- certificate rotation on the host -----------------------------------------------------
before_start=$(docker inspect -f '{{.State.StartedAt}} restarts={{.RestartCount}}' "$gatehouse_id")
old_serial=$(served_serial)
issue || fail "renewing the certificate on the host"
new_serial=$(serial_of_file)
step "renewed on the host: serial $old_serial -> $new_serial; waiting for the container to serve it ..."
started=$SECONDS
deadline=$((SECONDS + 90))
while serial=$(served_serial); [ "$serial" != "$new_serial" ] && [ $SECONDS -lt $deadline ]; do
    sleep 1
done
after_start=$(docker inspect -f '{{.State.StartedAt}} restarts={{.RestartCount}}' "$gatehouse_id")
if [ "$serial" = "$new_serial" ] && [ "$old_serial" != "$new_serial" ] && [ "$before_start" = "$after_start" ]; then
    pass "certificate rotation: new serial $new_serial served after $((SECONDS - started)) s, container not restarted ($after_start)"
    docker logs "$gatehouse_id" 2>&1 | grep -i 'certificate' | grep -i 'reload' | tail -1 | sed 's/^/      log: /'
else
    fail "certificate rotation: served $serial, want $new_serial (was $old_serial); container $before_start -> $after_start"
fi
https_curl -o /dev/null -w '' "https://$host:$https_port/" \
    || fail "HTTPS with the rotated certificate"

# ---- docker stop drains -------------------------------------------------------------------
grace=$(docker inspect -f '{{.Config.StopTimeout}}' "$gatehouse_id")
[ -n "$grace" ] && [ "$grace" != "<nil>" ] || grace=10
python3 "$work/ws.py" "$host" "$https_port" "$cacert" hold >"$work/hold.out" 2>&1 &
hold_pid=$!
web_id=$(compose ps -q web)
slow_since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
https_curl -o "$work/slow.out" -w '%{http_code}' "https://$host:$https_port/slow/?seconds=4" >"$work/slow.code" 2>&1 &
slow_pid=$!
# Wait until both are in flight: the WebSocket is open and Django logged the slow request.
deadline=$((SECONDS + 20))
until grep -q '^open' "$work/hold.out" && docker logs --since "$slow_since" "$web_id" 2>&1 | grep -q 'slow request started'; do
    [ $SECONDS -lt $deadline ] || break
    sleep 0.2
done
if kill -0 "$slow_pid" 2>/dev/null && kill -0 "$hold_pid" 2>/dev/null && grep -q '^open' "$work/hold.out"; then
    in_flight=yes
else
    in_flight=no
    fail "drain setup: the 4 s request and the WebSocket were not both in flight: $(cat "$work/hold.out" "$work/slow.code" 2>/dev/null | tr '\n' ' ')"
fi
step "docker stop (StopTimeout ${grace} s) with a 4 s request and a WebSocket in flight ..."
started=$(date +%s.%N)
docker stop "$gatehouse_id" >/dev/null
elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$started" "$(date +%s.%N)")
wait "$slow_pid"
wait "$hold_pid"
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$gatehouse_id")
slow_code=$(cat "$work/slow.code")
hold=$(grep '^close' "$work/hold.out")
if [ "$exit_code" = 0 ] && python3 -c "import sys; sys.exit(not float(sys.argv[1]) < float(sys.argv[2]))" "$elapsed" "$grace"; then
    pass "docker stop: exited 0 by itself after ${elapsed} s (< ${grace} s, no SIGKILL)"
else
    fail "docker stop: exit code $exit_code after ${elapsed} s (grace ${grace} s; 137 = SIGKILL)"
fi
if [ "$in_flight" = yes ] && [ "$slow_code" = 200 ] && grep -q '"slept": 4.0' "$work/slow.out"; then
    pass "drain: the in-flight request completed: 200 $(cat "$work/slow.out")"
else
    fail "drain: the in-flight request got '$slow_code' $(cat "$work/slow.out" 2>/dev/null)"
fi
if [ "$in_flight" = yes ] && [[ "$hold" == "close 1001"* ]]; then
    pass "drain: the open WebSocket got $hold"
else
    fail "drain: the open WebSocket got '$(cat "$work/hold.out")', want Close 1001"
fi
docker logs "$gatehouse_id" 2>&1 | grep -i -E 'drain|shut' | tail -3 | sed 's/^/      log: /'

echo
if [ "$failures" -eq 0 ]; then
    echo "ALL CHECKS PASSED"
    exit 0
fi
echo "$failures CHECK(S) FAILED"
exit 1
