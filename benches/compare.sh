#!/usr/bin/env bash
# Side-by-side load comparison on loopback: edgeslice against nginx (proxy_cache + slice 1m,
# buffered access log) and against bare Pingora answering a fixed body (the framework's ceiling),
# all in front of the same static origin (nginx serving files). Rounds rotate between the
# targets so that machine noise hits all of them alike; each figure is the median of the rounds.
#
# Workloads (wrk, 2 threads each; req/s, throughput, p50/p99):
#   hit_4k      4 KiB range hits of one object, 64 connections
#   hit_1m      1 MiB range hits of one object, 16 connections
#   disk        1 MiB range hits spread over a working set 4x the memory tier (64 MiB)
#   cold        misses: every request a new object (unique query string), 16 connections
#   flash       32 clients at once on one cold 64 MiB object; also reports origin bytes
#   tls_4k      4 KiB range hits over HTTPS/1.1 (wrk), 64 connections
#   tls_1m      1 MiB range hits over HTTPS/1.1 (wrk), 16 connections
#   h2_4k       4 KiB range hits over h2 (h2load), 16 connections x 8 streams
#   h2_1m       1 MiB range hits over h2 (h2load), 8 connections x 2 streams
#   handshake   4 KiB hits over HTTPS, a new connection (full TLS handshake) per request (wrk,
#               Connection: close), 32 connections
# The TLS workloads use one certificate (ECDSA P-256, made here by openssl) and the same
# protocols (TLS 1.2 + 1.3) and cipher list (Mozilla intermediate) on edgeslice and nginx.
#
# Usage: benches/compare.sh            (DUR=10 ROUNDS=3 by default; DUR=3 ROUNDS=1 for a quick look)
# Needs nginx (nginx-light), wrk, h2load (nghttp2-client) and openssl from Debian's packages;
# installed when missing (root).
# Not part of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

DUR=${DUR:-10}
ROUNDS=${ROUNDS:-3}
MEMORY_MIB=${MEMORY_MIB:-64}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk || ! need curl || ! need h2load || ! need openssl; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq nginx-light wrk curl nghttp2-client openssl >/dev/null
fi
NGINX=$(command -v nginx)

echo "building (release)..." >&2
cargo build --release --quiet --bin edgeslice
BARE=$(cargo build --release --quiet --bench bare_pingora --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "bare_pingora" and m.get("executable"):
        print(m["executable"])' | tail -1)
EDGE=target/release/edgeslice
[ -x "$BARE" ] || { echo "bare_pingora binary not found" >&2; exit 1; }

WORK=$(mktemp -d /tmp/edgeslice-compare.XXXXXX)
chmod 755 "$WORK"   # nginx workers (nobody) read the files and write their cache here
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/origin.pid" ] && kill "$(cat "$WORK/origin.pid")" 2>/dev/null || true
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  sleep 0.5
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ORIGIN_PORT=$(free_port); NGINX_PORT=$(free_port); EDGE_PORT=$(free_port); ADMIN_PORT=$(free_port)
BARE4K_PORT=$(free_port); BARE1M_PORT=$(free_port)
NGINX_TLS_PORT=$(free_port); EDGE_TLS_PORT=$(free_port)

# --- content --------------------------------------------------------------------------------
mkdir -p "$WORK/www/d" "$WORK/www/cold" "$WORK/nginx-cache" "$WORK/edge-cache" "$WORK/logs"
head -c $((16 << 20)) /dev/urandom > "$WORK/www/hot.bin"
head -c $((64 << 20)) /dev/urandom > "$WORK/www/flash.bin"
head -c $((1 << 20)) /dev/urandom > "$WORK/www/cold/obj.bin"
DISK_FILES=$((MEMORY_MIB * 4 / 4))   # 4 MiB objects, 4x the memory tier in all
for i in $(seq 1 "$DISK_FILES"); do head -c $((4 << 20)) /dev/urandom > "$WORK/www/d/$i.bin"; done
# One certificate for both TLS listeners.
mkdir -p "$WORK/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$WORK/tls/site.key" -out "$WORK/tls/site.pem" 2>/dev/null
# Mozilla's "intermediate" profile, as edgeslice's TLS listeners use it.
CIPHERS=ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305
chmod -R a+rwX "$WORK"
# Every answer must be a 2xx: a misconfigured origin would make every figure meaningless.
check_200() { local code; code=$(curl -s -o /dev/null -w '%{http_code}' -H "Range: bytes=0-0" "$@"); case $code in 2*) ;; *) echo "$1 answered $code" >&2; exit 1 ;; esac; }

# --- origin: nginx serving files ------------------------------------------------------------
cat > "$WORK/origin.conf" <<EOF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/logs/origin-error.log;
events { worker_connections 4096; }
http {
  access_log $WORK/logs/origin-access.log combined buffer=64k flush=1s;
  log_format bytes '\$request_uri \$body_bytes_sent';
  access_log $WORK/logs/origin-bytes.log bytes;
  server { listen 127.0.0.1:$ORIGIN_PORT; root $WORK/www; etag on; add_header Cache-Control "max-age=3600"; }
}
EOF
"$NGINX" -c "$WORK/origin.conf" -p "$WORK" 2>/dev/null

# --- nginx as the caching proxy: proxy_cache + slice 1m, buffered access log ----------------
cat > "$WORK/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/logs/nginx-error.log;
events { worker_connections 8192; }
http {
  access_log $WORK/logs/nginx-access.log combined buffer=64k flush=1s;
  proxy_cache_path $WORK/nginx-cache levels=1:2 keys_zone=c:64m max_size=4g inactive=1h use_temp_path=off;
  ssl_certificate $WORK/tls/site.pem;
  ssl_certificate_key $WORK/tls/site.key;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_ciphers $CIPHERS;
  ssl_prefer_server_ciphers off;
  ssl_session_cache shared:SSL:10m;
  ssl_session_tickets on;
  # Keep-alive and HTTP/2 connections are never closed for their request count (nginx's default
  # 1000 would make wrk and h2load reconnect, and h2load count the streams a GOAWAY cut).
  keepalive_requests 10000000;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    listen 127.0.0.1:$NGINX_TLS_PORT ssl http2;
    location / {
      slice 1m;
      proxy_cache c;
      proxy_cache_key \$uri\$is_args\$args\$slice_range;
      proxy_set_header Range \$slice_range;
      proxy_cache_valid 200 206 1h;
      proxy_cache_lock on;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://127.0.0.1:$ORIGIN_PORT;
    }
  }
}
EOF
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK" 2>/dev/null

# --- edgeslice --------------------------------------------------------------------------------
cat > "$WORK/edgeslice.yaml" <<EOF
server:
  threads: 2
  pid_file: $WORK/edgeslice.pid
  upgrade_sock: $WORK/edgeslice-upgrade.sock
listen:
  - 127.0.0.1:$EDGE_PORT
  - address: 127.0.0.1:$EDGE_TLS_PORT
    tls:
      certificates:
        - {cert: $WORK/tls/site.pem, key: $WORK/tls/site.key}
admin:
  listen: 127.0.0.1:$ADMIN_PORT
cache:
  chunk_size: 1MiB
  memory:
    capacity: ${MEMORY_MIB}MiB
  disk:
    path: $WORK/edge-cache
    capacity: 4GiB
upstreams:
  origin:
    servers: ["127.0.0.1:$ORIGIN_PORT"]
routes:
  - path_prefix: /
    upstream: origin
EOF
RUST_LOG=info "$EDGE" -c "$WORK/edgeslice.yaml" 2> "$WORK/logs/edgeslice.log" &
PIDS+=($!)
"$BARE" --listen "127.0.0.1:$BARE4K_PORT" --body 4096 > /dev/null 2>&1 &
PIDS+=($!)
"$BARE" --listen "127.0.0.1:$BARE1M_PORT" --body $((1 << 20)) > /dev/null 2>&1 &
PIDS+=($!)

wait_port() { for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }
for p in $ORIGIN_PORT $NGINX_PORT $EDGE_PORT $BARE4K_PORT $BARE1M_PORT; do wait_port "$p"; done
for p in $ORIGIN_PORT $NGINX_PORT $EDGE_PORT; do check_200 "http://127.0.0.1:$p/hot.bin"; done
for p in $NGINX_TLS_PORT $EDGE_TLS_PORT; do check_200 "https://127.0.0.1:$p/hot.bin" --cacert "$WORK/tls/site.pem"; done

# --- wrk helpers -------------------------------------------------------------------------------
cat > "$WORK/disk.lua" <<EOF
local n = $DISK_FILES
request = function()
  local f = math.random(1, n)
  local c = math.random(0, 3)
  return wrk.format("GET", "/d/" .. f .. ".bin", { Range = "bytes=" .. (c * 1048576) .. "-" .. (c * 1048576 + 1048575) })
end
EOF
cat > "$WORK/cold.lua" <<'EOF'
local counter = 0
local tid = 0
setup = function(thread) tid = tid + 1; thread:set("tid", tid) end
request = function()
  counter = counter + 1
  return wrk.format("GET", "/cold/obj.bin?t=" .. tid .. "-" .. counter .. "-" .. math.random(1, 1e9))
end
EOF

# wrk output -> "req_s bytes_s p50_ms p99_ms"
parse_wrk() {
  python3 -c '
import re, sys
t = sys.stdin.read()
def num(pat, conv):
    m = re.search(pat, t)
    return conv(m.group(1), m.group(2) if m.lastindex > 1 else "") if m else 0.0
def size(v, u):
    return float(v) * {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}.get(u, 1)
def ms(v, u):
    return float(v) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}.get(u, 1)
rps = num(r"Requests/sec:\s+([\d.]+)()", lambda v, u: float(v))
bps = num(r"Transfer/sec:\s+([\d.]+)(\w+)", size)
p50 = num(r"\s50%\s+([\d.]+)(\w+)", ms)
p99 = num(r"\s99%\s+([\d.]+)(\w+)", ms)
errors = num(r"Non-2xx or 3xx responses:\s+(\d+)()", lambda v, u: float(v))
print(f"{rps:.1f} {bps:.0f} {p50:.3f} {p99:.3f} {errors:.0f}")
'
}

RESULTS="$WORK/results.txt"
: > "$RESULTS"
run() { # workload target url conns [extra wrk args...]
  local workload=$1 target=$2 url=$3 conns=$4; shift 4
  local out
  out=$(wrk -t2 -c"$conns" -d"${DUR}s" --latency "$@" "$url" 2>&1 | parse_wrk)
  echo "$workload $target $out" >> "$RESULTS"
}

# h2load -> the same "req_s bytes_s p50_ms p99_ms non2xx" (percentiles from its per-request log)
run_h2() { # workload target url clients streams [range]
  local workload=$1 target=$2 url=$3 clients=$4 streams=$5 range=$6
  local log="$WORK/h2load.log" out
  rm -f "$log"
  out=$(h2load -D "$DUR" -c "$clients" -m "$streams" -t 2 -H "range: $range" --log-file="$log" "$url" 2>&1)
  python3 - "$log" "$DUR" <<PY >> "$RESULTS"
import re, statistics, sys
t = '''$out'''
log, dur = sys.argv[1], float(sys.argv[2])
lat = []
non2xx = 0
for line in open(log):
    f = line.split()
    if len(f) >= 3:
        lat.append(int(f[2]) / 1000.0)
        if not f[1].startswith("2"):
            non2xx += 1
lat.sort()
def pct(p):
    return lat[min(len(lat) - 1, int(len(lat) * p))] if lat else 0.0
m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s, ([\d.]+)(\w+)/s", t)
rps = float(m.group(1)) if m else 0.0
unit = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}.get(m.group(3), 1) if m else 1
bps = float(m.group(2)) * unit if m else 0.0
print(f"$workload $target {rps:.1f} {bps:.0f} {pct(0.5):.3f} {pct(0.99):.3f} {non2xx}")
PY
}

warm() { # url [range [curl args...]]
  if [ $# -gt 1 ]; then curl -s -o /dev/null -H "Range: $2" "${@:3}" "$1"; else curl -s -o /dev/null "$1"; fi
}

tls_round() { # target tls-port
  local t=$1 base="https://127.0.0.1:$2"
  run tls_4k "$t" "$base/hot.bin" 64 -H "Range: bytes=0-4095"
  run tls_1m "$t" "$base/hot.bin" 16 -H "Range: bytes=1048576-2097151"
  run_h2 h2_4k "$t" "$base/hot.bin" 16 8 "bytes=0-4095"
  run_h2 h2_1m "$t" "$base/hot.bin" 8 2 "bytes=1048576-2097151"
  run handshake "$t" "$base/hot.bin" 32 -H "Range: bytes=0-4095" -H "Connection: close"
}

echo "warming caches..." >&2
for port in $EDGE_PORT $NGINX_PORT; do
  for _ in 1 2; do
    warm "http://127.0.0.1:$port/hot.bin" "bytes=0-4095"
    warm "http://127.0.0.1:$port/hot.bin" "bytes=1048576-2097151"
    for i in $(seq 1 "$DISK_FILES"); do warm "http://127.0.0.1:$port/d/$i.bin"; done
  done
done
# The TLS workloads' objects (edgeslice keys https apart from http, as nginx's default key does).
for port in $EDGE_TLS_PORT $NGINX_TLS_PORT; do
  for _ in 1 2; do
    warm "https://127.0.0.1:$port/hot.bin" "bytes=0-4095" --cacert "$WORK/tls/site.pem"
    warm "https://127.0.0.1:$port/hot.bin" "bytes=1048576-2097151" --cacert "$WORK/tls/site.pem"
  done
done

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS..." >&2
  for t in edgeslice nginx bare; do
    case $t in
      edgeslice) base="http://127.0.0.1:$EDGE_PORT" ;;
      nginx) base="http://127.0.0.1:$NGINX_PORT" ;;
      bare) base="" ;;
    esac
    if [ "$t" = bare ]; then
      run hit_4k bare "http://127.0.0.1:$BARE4K_PORT/hot.bin" 64
      run hit_1m bare "http://127.0.0.1:$BARE1M_PORT/hot.bin" 16
      continue
    fi
    run hit_4k "$t" "$base/hot.bin" 64 -H "Range: bytes=0-4095"
    run hit_1m "$t" "$base/hot.bin" 16 -H "Range: bytes=1048576-2097151"
    run disk "$t" "$base/" 16 -s "$WORK/disk.lua"
    run cold "$t" "$base/" 16 -s "$WORK/cold.lua"
  done
  tls_round edgeslice "$EDGE_TLS_PORT"
  tls_round nginx "$NGINX_TLS_PORT"
done

# --- flash crowd: 32 clients at once on one cold object ---------------------------------------
flash() { # target port
  local target=$1 port=$2 path="/flash.bin?crowd=$1"
  sleep 1.2   # let the origin's buffered log flush
  local before
  before=$(awk -v p="$path" '$1 == p { s += $2 } END { print s + 0 }' "$WORK/logs/origin-bytes.log")
  local start end
  start=$(date +%s.%N)
  local crowd=()
  for _ in $(seq 1 32); do curl -s -o /dev/null "http://127.0.0.1:$port$path" & crowd+=($!); done
  wait "${crowd[@]}"
  end=$(date +%s.%N)
  sleep 1.2
  local after
  after=$(awk -v p="$path" '$1 == p { s += $2 } END { print s + 0 }' "$WORK/logs/origin-bytes.log")
  python3 -c "
start, end, origin = $start, $end, $after - $before
size = 64 << 20
secs = end - start
print(f'flash $target {32 / secs:.1f} {32 * size / secs:.0f} {secs * 1000:.1f} {secs * 1000:.1f} 0 {origin / size:.3f}')
" >> "$RESULTS"
}
flash edgeslice "$EDGE_PORT"
flash nginx "$NGINX_PORT"

# --- report -----------------------------------------------------------------------------------
python3 - "$RESULTS" "$(nproc)" "$(uname -r)" "$DUR" "$ROUNDS" <<'EOF'
import statistics, sys
path, cores, kernel, dur, rounds = sys.argv[1:]
rows = {}
for line in open(path):
    f = line.split()
    key = (f[0], f[1])
    rows.setdefault(key, []).append([float(x) for x in f[2:]])
med = {k: [statistics.median(col) for col in zip(*v)] for k, v in rows.items()}
ORDER = ["hit_4k", "hit_1m", "disk", "cold", "flash", "tls_4k", "tls_1m", "h2_4k", "h2_1m", "handshake"]
print(f"\nedgeslice vs nginx vs bare Pingora - {cores} cores, kernel {kernel}, {dur}s x {rounds} rounds (median)")
print(f"{'workload':<8} {'target':<10} {'req/s':>10} {'MB/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'origin x':>9}")
for (w, t), v in sorted(med.items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1])):
    extra = f"{v[5]:>9.3f}" if len(v) > 5 else f"{'':>9}"
    print(f"{w:<9} {t:<10} {v[0]:>10.1f} {v[1] / 1e6:>9.1f} {v[2]:>8.2f} {v[3]:>8.2f} {v[4]:>8.0f} {extra}")
print("\nratios (edgeslice / peer)")
def ratio(w, peer, col):
    a, b = med.get((w, "edgeslice")), med.get((w, peer))
    return a[col] / b[col] if a and b and b[col] else float("nan")
for w in ORDER:
    parts = [f"req/s vs nginx {ratio(w, 'nginx', 0):.2f}x", f"GB/s vs nginx {ratio(w, 'nginx', 1):.2f}x",
             f"p99 vs nginx {ratio(w, 'nginx', 3):.2f}x"]
    if (w, "bare") in med:
        parts.append(f"req/s vs bare Pingora {ratio(w, 'bare', 0):.2f}x")
    print(f"{w:<9} " + ", ".join(parts))
EOF
