#!/usr/bin/env bash
# The disk tier at edge scale (issue 23): fill it with ENTRIES entry files through the proxy
# (small chunks, so a million entries take minutes, not terabytes), then restart it twice and
# report what an operator waits for:
#
#   restart after SIGTERM   (a clean shutdown writes the index snapshot; the start loads it)
#   restart after SIGKILL   (no snapshot: the index is rebuilt by a scan of the files)
#
# For each: the time from exec to the first served request (a hit on an object on disk, 200
# with its exact bytes), the time to the full index (/readyz 200), and the hit throughput right
# after the start with the page cache dropped (the index cold: loading or just loaded, files
# not in memory) and once warm. Also: how long the snapshot took to write, the index's resident
# bytes per entry (/stats), and the process's RSS.
#
# Usage: benches/disk_scale.sh                  (ENTRIES=1000000 by default)
#        ENTRIES=4000000 benches/disk_scale.sh  (about 17 GB of disk, 4 KiB file blocks)
#        WORK=/big/disk/dir benches/disk_scale.sh
#        EDGE=/path/to/edgeslice benches/disk_scale.sh     (that binary, no build)
# Needs nginx (nginx-light), h2load (nghttp2-client), wrk and curl: installed when missing
# (root). Dropping the page cache needs root; without it the "cold" figures are warm ones.
# Not part of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

ENTRIES=${ENTRIES:-1000000}
DUR=${DUR:-5}
CHUNK_KIB=4
OBJECT_KIB=64
PER_OBJECT=$((OBJECT_KIB / CHUNK_KIB + 1)) # chunks and the metadata entry
OBJECTS=$(((ENTRIES + PER_OBJECT - 1) / PER_OBJECT))

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need h2load || ! need wrk || ! need curl; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq nginx-light nghttp2-client wrk curl >/dev/null
fi
NGINX=$(command -v nginx)

if [ -z "${EDGE:-}" ]; then
  echo "building (release)..." >&2
  cargo build --release --quiet --bin edgeslice
  EDGE=$PWD/target/release/edgeslice
fi

WORK=${WORK:-$(mktemp -d /tmp/edgeslice-disk-scale.XXXXXX)}
mkdir -p "$WORK"
chmod 755 "$WORK"
EDGE_PID=
cleanup() {
  [ -n "$EDGE_PID" ] && kill -9 "$EDGE_PID" 2>/dev/null || true
  [ -f "$WORK/origin.pid" ] && kill "$(cat "$WORK/origin.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ORIGIN_PORT=$(free_port); EDGE_PORT=$(free_port); ADMIN_PORT=$(free_port)
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.3f}')"; }

# --- origin: nginx answering every /o/ path with the same 64 KiB -----------------------------
mkdir -p "$WORK/www" "$WORK/logs" "$WORK/cache"
head -c $((OBJECT_KIB << 10)) /dev/urandom > "$WORK/www/blob.bin"
chmod -R a+rX "$WORK/www"
cat > "$WORK/origin.conf" <<EOF
worker_processes 1;
pid $WORK/origin.pid;
error_log $WORK/logs/origin-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$ORIGIN_PORT;
    root $WORK/www;
    etag on;
    add_header Cache-Control "max-age=86400";
    location /o/ { try_files /blob.bin =404; }
  }
}
EOF
"$NGINX" -c "$WORK/origin.conf" -p "$WORK" 2>/dev/null

cat > "$WORK/edgeslice.yaml" <<EOF
server:
  threads: 2
  pid_file: $WORK/edgeslice.pid
  upgrade_sock: $WORK/upgrade.sock
  graceful_shutdown_timeout: 5s
listen:
  - 127.0.0.1:$EDGE_PORT
admin:
  listen: 127.0.0.1:$ADMIN_PORT
cache:
  chunk_size: ${CHUNK_KIB}KiB
  max_concurrent_fills: 64
  memory:
    capacity: 16MiB
  disk:
    path: $WORK/cache
    capacity: 1TiB
    index_capacity: 1GiB
upstreams:
  origin:
    servers: ["127.0.0.1:$ORIGIN_PORT"]
routes:
  - path_prefix: /
    upstream: origin
EOF

stat_of() { curl -s "http://127.0.0.1:$ADMIN_PORT/stats" | awk -v k="$1" '$1 == k { print $2 }'; }
start_edge() {
  T0=$(now)
  "$EDGE" -c "$WORK/edgeslice.yaml" >> "$WORK/logs/edgeslice.log" 2>&1 &
  EDGE_PID=$!
}
# The first object, asked until it is served whole with the right bytes (a hit or a miss).
wait_first_request() {
  while :; do
    if curl -s -o "$WORK/first.bin" --max-time 2 "http://127.0.0.1:$EDGE_PORT/o/0.bin" 2>/dev/null &&
       cmp -s "$WORK/first.bin" "$WORK/www/blob.bin"; then
      since "$T0"; return
    fi
    kill -0 "$EDGE_PID" 2>/dev/null || { echo "edgeslice exited:" >&2; tail "$WORK/logs/edgeslice.log" >&2; exit 1; }
    sleep 0.005
  done
}
wait_ready() {
  while [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/readyz")" != 200 ]; do
    sleep 0.02
  done
  since "$T0"
}
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
# Hits spread over every object: 4 KiB ranges, a random object each (wrk, 32 connections).
cat > "$WORK/hits.lua" <<EOF
math.randomseed(os.time())
request = function()
  local i = math.random(0, $OBJECTS - 1)
  local c = math.random(0, $((OBJECT_KIB / CHUNK_KIB - 1)))
  return wrk.format("GET", "/o/" .. i .. ".bin", { Range = "bytes=" .. (c * 4096) .. "-" .. (c * 4096 + 4095) })
end
EOF
hit_rps() { wrk -t2 -c32 -d"${DUR}s" -s "$WORK/hits.lua" "http://127.0.0.1:$EDGE_PORT" | awk '/Requests\/sec/ { print $2 }'; }

# --- fill ------------------------------------------------------------------------------------
start_edge
wait_ready > /dev/null
echo "filling $OBJECTS objects of $OBJECT_KIB KiB in $CHUNK_KIB KiB chunks ($ENTRIES entries)..." >&2
seq 0 $((OBJECTS - 1)) | sed "s|.*|http://127.0.0.1:$EDGE_PORT/o/&.bin|" > "$WORK/uris.txt"
# h2load's clients each walk the whole URI list: 16 processes of one client, a slice each.
split -n l/16 -d "$WORK/uris.txt" "$WORK/uris."
F0=$(now)
fill_pass() {
  local fillers=()
  for f in "$WORK"/uris.[0-9][0-9]; do
    h2load --h1 -c 1 -n "$(wc -l < "$f")" -i "$f" > "$f.out" 2>&1 &
    fillers+=($!)
  done
  wait "${fillers[@]}"
  cat "$WORK"/uris.*.out >> "$WORK/logs/fill.txt"
}
# Disk writes are in the background, and skipped when the disk is behind (counted): wait for
# them, and ask again for the objects whose chunks were skipped (a partial hit fills them).
for pass in 1 2 3 4; do
  fill_pass
  before=-1
  while :; do
    have=$(stat_of cache_disk_entries)
    [ "$have" -ge "$((OBJECTS * PER_OBJECT))" ] && break 2
    [ "$have" = "$before" ] && break # no more writes in flight: go again
    before=$have
    sleep 2
  done
  echo "pass $pass: $have entries, asking again for the rest" >&2
done
FILL_S=$(since "$F0")
HAVE=$(stat_of cache_disk_entries)
RESIDENT=$(stat_of cache_disk_index_resident_bytes)
PER_ENTRY=$(python3 -c "print(f'{$RESIDENT / max($HAVE, 1):.1f}')")
RSS_FULL=$(awk '/VmRSS/ { print int($2 / 1024) }' "/proc/$EDGE_PID/status")
WARM_BEFORE=$(hit_rps)
DISK_GB=$(du -s --block-size=1M "$WORK/cache" | awk '{ printf "%.1f", $1 / 1024 }')

# --- clean restart: SIGTERM, snapshot, start from it ----------------------------------------
S0=$(now)
kill -TERM "$EDGE_PID"; wait "$EDGE_PID" 2>/dev/null || true
STOP_S=$(since "$S0")
SNAP_LINE=$(grep -o 'index snapshot written: [^"]*' "$WORK/logs/edgeslice.log" | tail -1)
SNAP_BYTES=$(stat -c %s "$WORK/cache/EDGESLICE-CACHE.index" 2>/dev/null || echo 0)
drop_caches
start_edge
CLEAN_FIRST=$(wait_first_request)
CLEAN_READY=$(wait_ready)
CLEAN_FROM=$(grep -o 'index loaded from [a-z ]* in [0-9.]* s' "$WORK/logs/edgeslice.log" | tail -1)
drop_caches
CLEAN_COLD=$(hit_rps)
CLEAN_WARM=$(hit_rps)

# --- crash: SIGKILL, a scan -----------------------------------------------------------------
kill -9 "$EDGE_PID"; wait "$EDGE_PID" 2>/dev/null || true
drop_caches
start_edge
KILL_FIRST=$(wait_first_request)
KILL_COLD=$(hit_rps) # while the scan runs (or just after)
KILL_READY=$(wait_ready)
KILL_FROM=$(grep -o 'index loaded from [a-z ]* in [0-9.]* s' "$WORK/logs/edgeslice.log" | tail -1)
KILL_WARM=$(hit_rps)
KILL_HAVE=$(stat_of cache_disk_entries)

cat <<EOF

disk tier at scale: $HAVE entries ($OBJECTS objects of $OBJECT_KIB KiB, $CHUNK_KIB KiB chunks), $DISK_GB GiB on disk, filled in ${FILL_S} s
index: $RESIDENT bytes resident, $PER_ENTRY bytes per entry; proxy RSS with the full index $RSS_FULL MiB
warm hits before any restart: $WARM_BEFORE req/s (4 KiB ranges over every object, 32 connections)

                               after SIGTERM (snapshot)   after SIGKILL (scan)
first request served (s)       $(printf '%-26s %s' "$CLEAN_FIRST" "$KILL_FIRST")
full index, /readyz 200 (s)    $(printf '%-26s %s' "$CLEAN_READY" "$KILL_READY")
hits, cold (req/s)             $(printf '%-26s %s' "$CLEAN_COLD" "$KILL_COLD")
hits, warm (req/s)             $(printf '%-26s %s' "$CLEAN_WARM" "$KILL_WARM")
loaded from                    $(printf '%-26s %s' "${CLEAN_FROM#index loaded from }" "${KILL_FROM#index loaded from }")

shutdown (SIGTERM to exit) ${STOP_S} s; ${SNAP_LINE:-no snapshot line}; snapshot file $SNAP_BYTES bytes
entries after the scan: $KILL_HAVE
EOF
