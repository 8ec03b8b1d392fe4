#!/usr/bin/env bash
# One cache across many nodes (issue 24, point 7): the same workload against NODES independent
# nodes (no `cluster` section: each fills from the origin alone) and against NODES clustered
# nodes (peers on one ring, each shard filled by its owner only), and for each:
#
#   origin bytes     what nginx sent ($body_bytes_sent), and over the distinct bytes the
#                    workload touched at most (the objects' sizes)
#   byte hit ratio   1 - origin bytes / client bytes
#   hit ratio        client requests whose answering node said `hit` in Cache-Status (its own,
#                    last entry), and over every request the nodes' metrics counted
#                    (edgeslice_http_requests_total{cache}: in a cluster this includes the
#                    peers' requests to an owner)
#   fills            edgeslice_fill_requests_total{to} summed over the nodes (clustered only)
#   req/s, p50, p99  of the client requests
#
# Workload (benches/cluster_load.py): CONCURRENCY clients, each with a connection to every node,
# send REQUESTS GETs to random nodes: Zipf-popular objects, random ranges of at most MAX_RANGE,
# WHOLE of them the whole object; every body is checked. The origin is nginx behind a relay
# holding every piece DELAY_MS each way. Both runs start cold, with the same seed.
#
# Usage: benches/cluster.sh                          (3 nodes, 24 objects of 16 MiB)
#        NODES=5 OBJECTS=48 REQUESTS=6000 benches/cluster.sh
#        EDGE=/path/to/edgeslice benches/cluster.sh  (that binary, no build)
# Needs nginx (nginx-light), python3 and curl: nginx and curl installed when missing (root).
# Not part of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-3}
OBJECTS=${OBJECTS:-24}
OBJECT_MIB=${OBJECT_MIB:-16}
REQUESTS=${REQUESTS:-3000}
CONCURRENCY=${CONCURRENCY:-48}
MAX_RANGE=${MAX_RANGE:-$((4 << 20))}
WHOLE=${WHOLE:-0.02}
ZIPF=${ZIPF:-0.8}
SEED=${SEED:-1}
DELAY_MS=${DELAY_MS:-20}
CHUNK=${CHUNK:-1MiB}
SHARD=${SHARD:-4MiB}
# Per node: a memory tier smaller than the objects together, a disk tier that holds them all
# (so independent nodes miss each object once each, and a cluster once in all).
MEMORY=${MEMORY:-64MiB}
DISK=${DISK:-1GiB}
KEEP_COPIES=${KEEP_COPIES:-memory}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need curl; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq nginx-light curl >/dev/null
fi
NGINX=$(command -v nginx)

if [ -z "${EDGE:-}" ]; then
  echo "building (release)..." >&2
  cargo build --release --quiet --bin edgeslice
  EDGE=${CARGO_TARGET_DIR:-$PWD/target}/release/edgeslice
fi

WORK=${WORK:-$(mktemp -d /tmp/edgeslice-cluster.XXXXXX)}
mkdir -p "$WORK"/{www/o,logs,tmp}
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do { kill -9 "$p" && wait "$p"; } 2>/dev/null || true; done
  [ -f "$WORK/origin.pid" ] && kill "$(cat "$WORK/origin.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('$1',0)); print(s.getsockname()[1])"; }
LOAD="python3 benches/cluster_load.py"

# --- origin: nginx over OBJECTS random files, a month old, behind the delaying relay ----------
for i in $(seq 0 $((OBJECTS - 1))); do
  head -c $((OBJECT_MIB << 20)) /dev/urandom > "$WORK/www/o/$i.bin"
done
touch -d '30 days ago' "$WORK"/www/o/*.bin # heuristic freshness: fresh for the whole run
chmod -R a+rX "$WORK/www"
ORIGIN_PORT=$(free_port 127.0.0.1)
RELAY_PORT=$(free_port 127.0.0.1)
cat > "$WORK/origin.conf" <<EOF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/logs/origin-error.log;
events { worker_connections 4096; }
http {
  log_format counted '\$status \$body_bytes_sent';
  access_log $WORK/logs/origin.log counted;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  sendfile on;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:$ORIGIN_PORT;
    root $WORK/www;
    etag on;
  }
}
EOF
"$NGINX" -c "$WORK/origin.conf" -p "$WORK" 2>/dev/null
$LOAD relay --listen "$RELAY_PORT" --upstream "$ORIGIN_PORT" --delay-ms "$DELAY_MS" \
  --counts "$WORK/relay.count" &
PIDS+=($!)
disown $! # killed by cleanup, without a job notice

origin_body() { awk '{ s += $2 } END { printf "%.0f\n", s }' "$WORK/logs/origin.log"; }
relay_bytes() { cat "$WORK/relay.count" 2>/dev/null || echo 0; }
# Sum of metric samples with all of the given label="value" pairs, over the nodes' admin ports.
metric_sum() {
  local name=$1 filter=$2 sum=0 v
  for admin in "${ADMINS[@]}"; do
    v=$(curl -s "http://$admin/metrics" | awk -v n="$name" -v f="$filter" '
      index($0, n "{") == 1 || index($0, n " ") == 1 {
        ok = 1; m = split(f, want, ",")
        for (i = 1; i <= m; i++) if (want[i] != "" && index($0, want[i]) == 0) ok = 0
        if (ok) s += $NF
      } END { printf "%.0f\n", s }')
    sum=$(python3 -c "print($sum + $v)")
  done
  echo "$sum"
}

# run MODE: start NODES nodes (clustered or independent), run the workload, report, stop them.
run() {
  local mode=$1 i
  local -a addrs=() admins=() pids=()
  for i in $(seq 0 $((NODES - 1))); do
    local ip=127.0.0.$((11 + i))
    addrs+=("$ip:$(free_port "$ip")")
    admins+=("$ip:$(free_port "$ip")")
  done
  local peers
  peers=$(printf '"%s", ' "${addrs[@]}")
  peers="[${peers%, }]"
  for i in $(seq 0 $((NODES - 1))); do
    local dir=$WORK/$mode-$i cluster=""
    mkdir -p "$dir"
    if [ "$mode" = clustered ]; then
      cluster="cluster:
  self: \"${addrs[$i]}\"
  peers: $peers
  shard_size: $SHARD
  keep_copies: $KEEP_COPIES
  peer_timeout: 2s"
    fi
    cat > "$dir/edgeslice.yaml" <<EOF
server:
  threads: 2
  pid_file: $dir/edgeslice.pid
  upgrade_sock: $dir/upgrade.sock
  graceful_shutdown_timeout: 1s
listen:
  - ${addrs[$i]}
admin:
  listen: ${admins[$i]}
cache:
  chunk_size: $CHUNK
  memory:
    capacity: $MEMORY
  disk:
    path: $dir/cache
    capacity: $DISK
$cluster
upstreams:
  origin:
    servers: ["127.0.0.1:$RELAY_PORT"]
    connect_timeout: 1s
    read_timeout: 10s
routes:
  - path_prefix: /
    upstream: origin
EOF
    "$EDGE" -c "$dir/edgeslice.yaml" > "$WORK/logs/$mode-$i.log" 2>&1 &
    pids+=($!)
    PIDS+=($!)
  done
  for admin in "${admins[@]}"; do
    for _ in $(seq 1 200); do
      curl -sf "http://$admin/healthz" >/dev/null 2>&1 && break
      sleep 0.05
    done
  done
  local origin0 relay0 # (the origin log and relay count are shared by both runs)
  origin0=$(origin_body)
  relay0=$(relay_bytes)
  local out
  out=$($LOAD load --nodes "$(IFS=,; echo "${addrs[*]}")" --docroot "$WORK/www" \
    --objects "$OBJECTS" --requests "$REQUESTS" --concurrency "$CONCURRENCY" \
    --max-range "$MAX_RANGE" --whole "$WHOLE" --zipf "$ZIPF" --seed "$SEED")
  sleep 0.5 # nginx logs a response when it completes
  ADMINS=("${admins[@]}")
  local hits all peer_f parent_f origin_f
  hits=$(metric_sum edgeslice_http_requests_total 'cache="hit"')
  all=0
  for r in hit stale revalidated partial miss; do
    all=$(python3 -c "print($all + $(metric_sum edgeslice_http_requests_total "cache=\"$r\""))")
  done
  peer_f=$(metric_sum edgeslice_fill_requests_total 'to="peer"')
  parent_f=$(metric_sum edgeslice_fill_requests_total 'to="parent"')
  origin_f=$(metric_sum edgeslice_fill_requests_total 'to="origin"')
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  python3 - "$mode" "$out" "$(($(origin_body) - origin0))" "$(($(relay_bytes) - relay0))" \
    "$hits" "$all" "$peer_f" "$parent_f" "$origin_f" "$((OBJECTS * (OBJECT_MIB << 20)))" <<'EOF' | tee -a "$WORK/results"
import json, sys
mode, out, origin, relay, hits, allreq, peer, parent, orig_f, objects = sys.argv[1:]
s = json.loads(out)
origin, relay, objects = int(origin), int(relay), int(objects)
hits, allreq = float(hits), float(allreq)
client_hits = s["results"].get("hit", 0)
print(f"{mode:<12} {s['requests']:>8} {s['errors']:>6} {s['bytes'] / 2**20:>10.0f} "
      f"{origin / 2**20:>10.0f} {origin / objects:>8.2f}x {1 - origin / max(s['bytes'], 1):>8.1%} "
      f"{client_hits / max(s['requests'], 1):>8.1%} {hits / max(allreq, 1):>8.1%} "
      f"{s['requests'] / s['elapsed']:>7.0f} {s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f}   "
      f"peer {float(peer):.0f} parent {float(parent):.0f} origin {float(orig_f):.0f}; "
      f"relay {relay / 2**20:.0f} MiB; Cache-Status {dict(sorted(s['results'].items()))}")
EOF
}

echo "edgeslice: $EDGE"
echo "$NODES nodes, $OBJECTS objects of $OBJECT_MIB MiB ($((OBJECTS * OBJECT_MIB)) MiB), chunk $CHUNK, shard $SHARD, memory $MEMORY and disk $DISK a node, keep_copies $KEEP_COPIES; $REQUESTS requests by $CONCURRENCY clients (ranges <= $MAX_RANGE bytes, $WHOLE whole, Zipf $ZIPF, seed $SEED); origin $DELAY_MS ms away"
echo
printf '%-12s %8s %6s %10s %10s %9s %9s %8s %8s %7s %7s %7s   %s\n' mode requests errors "client MiB" "origin MiB" "/objects" "byte hit" "hit" "hit(all)" "req/s" "p50 ms" "p99 ms" "fills; relay; Cache-Status"
run independent
run clustered
