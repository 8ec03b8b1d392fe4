#!/usr/bin/env bash
# Runs the public HTTP caching test suite (http-tests/cache-tests, the one behind cache-tests.fyi)
# against edgeslice as a reverse proxy, and prints how many REQUIRED tests pass plus every failing
# required test with its failure message.
#
#   benches/cache_tests.sh [--min N] [--id TEST_ID] [--json FILE] [--disk] [--https]
#
#   --min N        exit 3 when fewer than N required tests pass (a CI gate)
#   --id TEST_ID   run only that test and print the suite's request/response dump (debugging)
#   --json FILE    where to save the suite's raw results (default target/cache-tests/results.json)
#   --disk         give edgeslice a disk tier (in the run's temp dir) besides the default memory
#   --https        the client talks HTTPS to edgeslice (a TLS listener with a certificate made
#                  for the run by openssl; the client trusts it through NODE_EXTRA_CA_CERTS)
#
# Environment:
#   EDGESLICE_BIN           use this binary instead of `cargo build --release`
#   CACHE_TESTS_DIR         use this checkout of github.com/http-tests/cache-tests instead of the
#                           vendored copy in benches/cache-tests (default; b55b8bd)
#   CACHE_TESTS_NPM_VERSION use the npm package http-cache-tests at this version instead (e.g.
#                           0.4.5; the npm release lags the repository: see README.md)
#   CACHE_TESTS_TIMEOUT     seconds the whole client run may take (default 600)
#
# edgeslice runs with the default configuration and one route (path_prefix /) to the suite's
# test server, both on free loopback ports. The suite is installed under target/cache-tests and
# reused; the logs of the last run are kept in target/cache-tests/last-run/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CT_HOME="$ROOT/target/cache-tests"
NPM_VERSION=${CACHE_TESTS_NPM_VERSION:-}
UNDICI_VERSION=7.30.2   # for a checkout (vendored or not): its client imports undici (interim tests)
if [[ -z "$NPM_VERSION" && -z "${CACHE_TESTS_DIR:-}" ]]; then
  CACHE_TESTS_DIR="$ROOT/benches/cache-tests"   # the vendored copy (see its README.md)
fi
RUN_TIMEOUT=${CACHE_TESTS_TIMEOUT:-600}

MIN=""
TEST_ID=""
JSON_OUT="$CT_HOME/results.json"
DISK=0
HTTPS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --min) MIN=${2:?--min needs a number}; shift 2 ;;
    --id) TEST_ID=${2:?--id needs a test id}; shift 2 ;;
    --json) JSON_OUT=${2:?--json needs a file}; shift 2 ;;
    --disk) DISK=1; shift ;;
    --https) HTTPS=1; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -z "$MIN" || "$MIN" =~ ^[0-9]+$ ]] || { echo "--min takes a number" >&2; exit 2; }

log() { echo "cache-tests: $*" >&2; }
command -v node >/dev/null || { log "node (>= 18) is required"; exit 2; }
command -v npm >/dev/null || { log "npm is required"; exit 2; }

mkdir -p "$CT_HOME"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/edgeslice-cache-tests.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$CT_HOME/last-run"
  mkdir -p "$CT_HOME/last-run"
  cp "$TMP"/*.log "$TMP"/edgeslice.yaml "$CT_HOME/last-run/" 2>/dev/null || true
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the suite ---------------------------------------------------------------------------------
if [[ -n "${CACHE_TESTS_DIR:-}" ]]; then
  # A checkout of the repository (test-engine/ layout). Copied under target/ (the checkout is left
  # untouched) next to a pinned undici, the one dependency its command-line client needs.
  [[ -f "$CACHE_TESTS_DIR/tests/index.mjs" ]] || { log "$CACHE_TESTS_DIR has no tests/index.mjs"; exit 2; }
  SUITE="$CT_HOME/checkout"
  rm -rf "$SUITE/tests" "$SUITE/test-engine"
  mkdir -p "$SUITE"
  cp -r "$CACHE_TESTS_DIR/tests" "$CACHE_TESTS_DIR/test-engine" "$SUITE/"
  if [[ "$CACHE_TESTS_DIR" == "$ROOT/benches/cache-tests" ]]; then
    SUITE_DESC="vendored benches/cache-tests (http-tests/cache-tests b55b8bd)"
  else
    SUITE_DESC="checkout $CACHE_TESTS_DIR ($(git -C "$CACHE_TESTS_DIR" log -1 --format='%h %cs' 2>/dev/null || echo 'not a git checkout'))"
  fi
  if [[ ! -f "$SUITE/node_modules/undici/package.json" ]]; then
    log "installing undici@$UNDICI_VERSION for the checkout's client"
    echo '{"private": true}' > "$SUITE/package.json"
    timeout 300 npm install --prefix "$SUITE" --no-audit --no-fund --loglevel=error "undici@$UNDICI_VERSION" >&2
  fi
else
  NPM_DIR="$CT_HOME/npm-$NPM_VERSION"
  SUITE="$NPM_DIR/node_modules/http-cache-tests"
  if [[ "$(node -p "require('$SUITE/package.json').version" 2>/dev/null)" != "$NPM_VERSION" ]]; then
    log "installing http-cache-tests@$NPM_VERSION from npm into $NPM_DIR"
    rm -rf "$NPM_DIR"
    mkdir -p "$NPM_DIR"
    echo '{"private": true}' > "$NPM_DIR/package.json"
    timeout 300 npm install --prefix "$NPM_DIR" --no-audit --no-fund --loglevel=error \
      "http-cache-tests@$NPM_VERSION" >&2
  fi
  SUITE_DESC="npm http-cache-tests@$NPM_VERSION"
fi
if [[ -f "$SUITE/test-engine/cli.mjs" ]]; then       # the repository's current layout
  SERVER_JS="$SUITE/test-engine/server/server.mjs"; CLI_JS="$SUITE/test-engine/cli.mjs"
elif [[ -f "$SUITE/cli.mjs" ]]; then                 # the npm 0.4.x layout
  SERVER_JS="$SUITE/server/server.mjs"; CLI_JS="$SUITE/cli.mjs"
else
  log "no test-engine/cli.mjs or cli.mjs in $SUITE"; exit 2
fi

# --- edgeslice ---------------------------------------------------------------------------------
if [[ -n "${EDGESLICE_BIN:-}" ]]; then
  BIN=$EDGESLICE_BIN
else
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --bin edgeslice >&2)
  BIN="$ROOT/target/release/edgeslice"
fi
[[ -x "$BIN" ]] || { log "no edgeslice binary at $BIN"; exit 2; }

read -r ORIGIN_PORT PROXY_PORT < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)

wait_port() { # wait_port PORT PID NAME: up to 30 s for PORT to accept, while PID lives
  local i
  for i in $(seq 300); do
    if ! kill -0 "$2" 2>/dev/null; then log "$3 exited early; its log:"; cat "$TMP/$3.log" >&2; exit 1; fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "$3 did not listen on 127.0.0.1:$1 within 30 s; its log:"; cat "$TMP/$3.log" >&2; exit 1
}

# The suite's test server (the origin). It reads its settings from npm_config_* variables.
npm_config_protocol=http npm_config_port=$ORIGIN_PORT npm_config_pidfile="$TMP/origin.pid" \
  node "$SERVER_JS" >"$TMP/origin.log" 2>&1 &
PIDS+=($!)
wait_port "$ORIGIN_PORT" "${PIDS[-1]}" origin

if [[ $HTTPS == 1 ]]; then
  command -v openssl >/dev/null || { log "--https needs openssl"; exit 2; }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$TMP/site.key" -out "$TMP/site.pem" 2>/dev/null
  export NODE_EXTRA_CA_CERTS="$TMP/site.pem"
fi

# The default configuration, plus the keys a configuration cannot do without: where to listen, the
# one upstream and the one route. pid_file/upgrade_sock only keep this run's files in $TMP.
{
  cat <<EOF
# generated by benches/cache_tests.sh: default configuration, one route to the cache-tests server
server:
  pid_file: $TMP/edgeslice.pid
  upgrade_sock: $TMP/edgeslice_upgrade.sock
EOF
  if [[ $HTTPS == 1 ]]; then
    printf 'listen:\n  - address: 127.0.0.1:%s\n    tls:\n      certificates:\n        - {cert: %s, key: %s}\n' \
      "$PROXY_PORT" "$TMP/site.pem" "$TMP/site.key"
  else
    printf 'listen:\n  - 127.0.0.1:%s\n' "$PROXY_PORT"
  fi
  if [[ $DISK == 1 ]]; then
    printf 'cache:\n  disk:\n    path: %s\n    capacity: 1GiB\n' "$TMP/cache"
  fi
  cat <<EOF
upstreams:
  origin:
    servers: ["127.0.0.1:$ORIGIN_PORT"]
routes:
  - upstream: origin
EOF
} > "$TMP/edgeslice.yaml"
"$BIN" -t -c "$TMP/edgeslice.yaml" >&2
RUST_LOG=${RUST_LOG:-info} "$BIN" -c "$TMP/edgeslice.yaml" >"$TMP/edgeslice.log" 2>&1 &
PIDS+=($!)
wait_port "$PROXY_PORT" "${PIDS[-1]}" edgeslice

if [[ $HTTPS == 1 ]]; then BASE="https://localhost:$PROXY_PORT"; else BASE="http://127.0.0.1:$PROXY_PORT"; fi
log "suite: $SUITE_DESC; origin 127.0.0.1:$ORIGIN_PORT; edgeslice $BASE ($BIN)"

# --- the client --------------------------------------------------------------------------------
# The client sends every request to the base URL, i.e. through edgeslice: the PUT /config/<uuid>
# that sets a test up, the GETs (and other methods) of /test/<uuid>, and GET /state/<uuid>, which
# reads back what the server saw.
if [[ -n "$TEST_ID" ]]; then
  npm_config_base=$BASE npm_config_id=$TEST_ID npm_package_config_id=$TEST_ID \
    timeout "$RUN_TIMEOUT" node --no-warnings "$CLI_JS"
  exit 0
fi
log "running the suite (takes a minute or two)"
mkdir -p "$(dirname "$JSON_OUT")"
if ! npm_config_base=$BASE npm_config_id="" npm_package_config_id="" \
  timeout "$RUN_TIMEOUT" node --no-warnings "$CLI_JS" >"$TMP/results.json.part" 2>"$TMP/client.log"; then
  log "the suite's client failed or timed out; its log:"; tail -n 30 "$TMP/client.log" >&2; exit 1
fi
node -e 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))' "$TMP/results.json.part" 2>/dev/null || {
  log "the client printed no results JSON; its output:"; tail -n 30 "$TMP/results.json.part" "$TMP/client.log" >&2; exit 1
}
mv "$TMP/results.json.part" "$JSON_OUT"
log "results saved to $JSON_OUT"

echo "cache-tests ($SUITE_DESC) against $("$BIN" --version 2>/dev/null | head -n 1 || true) as a reverse proxy, default configuration$([[ $DISK == 1 ]] && echo ' + disk tier')$([[ $HTTPS == 1 ]] && echo ', over HTTPS')"
node "$ROOT/benches/cache_tests_report.mjs" "$SUITE" "$JSON_OUT" "$MIN"
