#!/usr/bin/env bash
# Builds the Docker image and runs it, without Docker and without a registry:
#   1. a debian:bookworm-slim stand-in made with mmdebstrap from this machine's Debian mirror
#      (minbase, docs and locales left out as in the official slim image), cached as a tarball
#      for the day and imported as localhost/debian:bookworm-slim;
#   2. the Dockerfile's runtime stage built on it with buildah (chroot isolation), with the
#      binary in $EDGESLICE_BIN instead of the cargo build stage (BINARY_FROM=prebuilt);
#   3. in the image: ldd finds every library the binary needs, the CA bundle is there, and
#      `edgeslice -t` accepts the shipped configuration;
#   4. the image's entrypoint and command, run as the image's user (uid 10001) with the shipped
#      configuration, in a network namespace of its own (so the fixed ports of that
#      configuration, 8080 and 9180, and its origin 127.0.0.1:8000, clash with nothing here),
#      beside a python3 http.server origin on 127.0.0.1:8000: /healthz, /readyz and the image's
#      HEALTHCHECK answer; a range across chunk boundaries is a byte-exact miss, then a
#      byte-exact hit that asks the origin nothing; the disk tier writes its files into the
#      volume /var/cache/edgeslice, owned by uid 10001; SIGTERM ends it with status 0;
#   5. a second start, on the same volume, with a configuration of one's own mounted over
#      /etc/edgeslice/edgeslice.yaml (as the README's `docker run -v` does) that adds a TLS
#      listener: the same range is a byte-exact hit that asks the origin nothing (the memory
#      tier starts empty: the disk tier served it), and a GET over HTTPS is a miss, then a hit.
# Exits 1 naming the first check that failed (with the container's log); 0 with a SKIP line
# only where buildah cannot run at all here (not root, no usable container storage, no chroot).
# Every wait is bounded; containers, processes, the network namespace and temporary files are
# removed on exit (EDGESLICE_IMAGE_CHECK_KEEP=1 keeps the temporary directory, with the logs).
# Images live in a container storage of the check's own (under the cache directory below),
# never in the system's.
#
# Usage: EDGESLICE_BIN=target/debug/edgeslice deploy/image/check.sh
# Needs (as root): buildah, mmdebstrap, iproute2, curl, openssl, python3.
set -euo pipefail

started=$SECONDS
say() { printf '[image check %3ds] %s\n' "$((SECONDS - started))" "$*"; }
skip() { say "SKIP: $*"; exit 0; }
fail() {
  say "FAILED: $*" >&2
  if [ -n "${es_log:-}" ] && [ -s "$es_log" ]; then
    echo "--- the container's last output ($es_log):" >&2
    tail -n 30 "$es_log" >&2
  fi
  exit 1
}

repo=$(cd "$(dirname "$0")/../.." && pwd)
[ -n "${EDGESLICE_BIN:-}" ] || fail "set EDGESLICE_BIN to the edgeslice binary to put in the image"
bin=$(cd "$(dirname "$EDGESLICE_BIN")" && pwd)/$(basename "$EDGESLICE_BIN")
[ -x "$bin" ] || fail "EDGESLICE_BIN=$EDGESLICE_BIN is not an executable file"

SUITE=bookworm                           # the Dockerfile's debian:bookworm-slim
BASE_IMAGE=localhost/debian:$SUITE-slim
CACHE="${EDGESLICE_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/edgeslice}/image"
# The ports conf/edgeslice.docker.yaml listens on (the Dockerfile's EXPOSE) and its origin.
PROXY=127.0.0.1:8080
ADMIN=127.0.0.1:9180
TLS=127.0.0.1:8443                       # the second start's TLS listener
ORIGIN_PORT=8000

# --- Can buildah run here at all? (the only reasons to skip)
for tool in buildah mmdebstrap ip curl openssl python3; do
  command -v "$tool" >/dev/null 2>&1 \
    || fail "$tool is not installed (.ci/run installs buildah mmdebstrap iproute2 when missing)"
done
[ "$(id -u)" -eq 0 ] || skip "not root: this check runs buildah with chroot isolation, mmdebstrap and a network namespace as root"
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"   # one check at a time: the storage below is the check's own
flock -w 900 9 || fail "another image check held $CACHE/lock for 15 minutes"
# The check's own container storage, for every buildah command (also under timeout, nsenter):
# overlay where the kernel allows it, else vfs (copies, slower).
export CONTAINERS_STORAGE_CONF=$CACHE/storage.conf
for driver in overlay vfs; do
  printf '[storage]\ndriver = "%s"\ngraphroot = "%s"\nrunroot = "%s"\n' \
    "$driver" "$CACHE/storage-$driver" /run/edgeslice-image-check-$driver >"$CONTAINERS_STORAGE_CONF"
  if err=$(buildah info 2>&1 >/dev/null); then break; fi
  [ "$driver" = vfs ] && skip "buildah cannot use a container storage here: $err"
done

tmp=$(mktemp -d /tmp/edgeslice-image-check.XXXXXX)
id=edgeslice-check-$$
image=localhost/$id:latest
netns=$id
es_log=
cleanup() {
  local status=$?
  set +e
  if ip netns list 2>/dev/null | grep -qw "$netns"; then
    # Everything started in the namespace: the origin, `buildah run`, edgeslice.
    local pids
    pids=$(ip netns pids "$netns" 2>/dev/null)
    [ -n "$pids" ] && kill -TERM $pids 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(ip netns pids "$netns" 2>/dev/null)
      [ -z "$pids" ] && break
      sleep 0.5
    done
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    ip netns del "$netns" 2>/dev/null
  fi
  # The check's own storage: every container (the build leaves one per stage it reuses), the
  # image, and the stage images the build left; the base image stays for the next run.
  buildah rm --all >/dev/null 2>&1
  buildah rmi "$image" >/dev/null 2>&1
  buildah rmi --prune >/dev/null 2>&1
  if [ -n "${EDGESLICE_IMAGE_CHECK_KEEP:-}" ]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. The base image: today's tarball, imported once.
day=$(date -u +%Y%m%d)
tarball=$CACHE/debian-$SUITE-minbase-$day.tar
if [ ! -s "$tarball" ]; then
  # The machine's Debian mirror (a deb822 file of Debian's own entries if there is one),
  # else deb.debian.org; EDGESLICE_DEBIAN_MIRROR overrides.
  mirror=${EDGESLICE_DEBIAN_MIRROR:-}
  if [ -z "$mirror" ]; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
      mirror=/etc/apt/sources.list.d/debian.sources
    else
      mirror=http://deb.debian.org/debian
    fi
  fi
  say "making the $SUITE base with mmdebstrap from $mirror"
  rm -f "$CACHE"/debian-"$SUITE"-minbase-*.tar
  timeout 600 mmdebstrap --quiet --variant=minbase --format=tar \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$tarball.part" "$mirror" || fail "mmdebstrap could not make the $SUITE base"
  mv "$tarball.part" "$tarball"
fi
base_tag=$BASE_IMAGE-$day
if ! buildah inspect --type image "$base_tag" >/dev/null 2>&1; then
  say "importing $(basename "$tarball") as $BASE_IMAGE"
  for old in $(buildah images --format '{{.Name}}:{{.Tag}}' | grep "^$BASE_IMAGE-" || true); do
    buildah rmi "$old" >/dev/null 2>&1 || true
  done
  c=$(buildah from scratch)
  timeout 300 buildah add --quiet "$c" "$tarball" / >/dev/null || fail "could not import $tarball"
  buildah config --cmd bash "$c"
  buildah commit --quiet --rm "$c" "$BASE_IMAGE" >/dev/null || fail "could not commit $BASE_IMAGE"
  buildah tag "$BASE_IMAGE" "$base_tag"
fi

# Chroot isolation at all? (/bin/true of the Debian base; nothing of edgeslice's yet)
c=$(buildah from --pull=never "$BASE_IMAGE")
if ! err=$(timeout 60 buildah run --isolation chroot "$c" -- /bin/true 2>&1); then
  skip "buildah cannot run a container with chroot isolation here: $err"
fi

# --- 2. The runtime stage, with the binary built here.
say "building the image (runtime stage on $BASE_IMAGE, binary $EDGESLICE_BIN)"
context=$tmp/context
mkdir -p "$context/conf"
cp "$repo/Dockerfile" "$context/"
cp "$repo/conf/edgeslice.docker.yaml" "$context/conf/"
ln "$bin" "$context/edgeslice" 2>/dev/null || cp "$bin" "$context/edgeslice"
timeout 600 buildah build --quiet --isolation chroot --format docker --pull=never \
  --build-arg RUNTIME_IMAGE="$BASE_IMAGE" --build-arg BINARY_FROM=prebuilt \
  --build-arg EDGESLICE_BINARY=edgeslice -t "$image" "$context" >"$tmp/build.log" 2>&1 \
  || { tail -n 30 "$tmp/build.log" >&2; fail "buildah could not build the Dockerfile's runtime stage"; }

# The image's own configuration: what `docker run` would start, as whom, with which volume.
buildah inspect --type image "$image" >"$tmp/inspect.json"
read_config() {
  python3 - "$tmp/inspect.json" "$1" <<'EOF'
import json, shlex, sys
config = json.load(open(sys.argv[1]))["Docker"]["config"]
key = sys.argv[2]
if key == "command":
    print(shlex.join((config.get("Entrypoint") or []) + (config.get("Cmd") or [])))
elif key == "healthcheck":
    test = (config.get("Healthcheck") or {}).get("Test") or []
    print(test[1] if test[:1] == ["CMD-SHELL"] else shlex.join(test[1:]))
elif key == "volumes":
    print(" ".join(sorted(config.get("Volumes") or {})))
else:
    print(config.get(key) or "")
EOF
}
command=$(read_config command)
user=$(read_config User)
healthcheck=$(read_config healthcheck)
volumes=$(read_config volumes)
[ "$command" = "/usr/local/bin/edgeslice -c /etc/edgeslice/edgeslice.yaml" ] \
  || fail "the image's entrypoint and command are '$command'"
[ -n "$user" ] && [ "$user" != root ] && [ "$user" != 0 ] || fail "the image runs as '${user:-root}', not a user of its own"
[ "$volumes" = /var/cache/edgeslice ] || fail "the image's volumes are '$volumes', not /var/cache/edgeslice"
[ -n "$healthcheck" ] || fail "the image has no HEALTHCHECK"
read -r -a argv <<<"$command"

ctr=$(buildah from --pull=never --name "$id" "$image")
run() { timeout 60 buildah run --isolation chroot "$@"; }

# --- 3. What the binary needs is in the image.
ldd_out=$(run "$ctr" -- ldd "${argv[0]}" 2>&1) || fail "ldd ${argv[0]} failed in the image: $ldd_out"
if grep -q 'not found' <<<"$ldd_out"; then
  fail "libraries missing in the image: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t' ' ')"
fi
say "libraries: $(awk '/=>/ {print $1}' <<<"$ldd_out" | tr '\n' ' ')"
# The TLS library: OpenSSL is compiled into the binary (pingora-openssl builds it from source)
# unless ldd lists libssl; either way the second start below makes a TLS handshake.
if ! grep -q 'libssl' <<<"$ldd_out"; then
  strings_out=$(grep -a -o -m1 'OpenSSL 3\.[0-9.]*[a-z]* *[0-9]* [A-Z][a-z]* [0-9]*' "$bin" || true)
  [ -n "$strings_out" ] || fail "the binary neither links libssl nor has OpenSSL compiled in"
  say "TLS library: ${strings_out} (compiled in)"
fi
run "$ctr" -- test -s /etc/ssl/certs/ca-certificates.crt \
  || fail "no CA bundle (/etc/ssl/certs/ca-certificates.crt) for HTTPS origins in the image"
t_out=$(run "$ctr" -- "${argv[0]}" -t "${argv[@]:1}" 2>&1) \
  || fail "edgeslice -t rejects the shipped configuration in the image: $t_out"

# --- 4. The image as `docker run` starts it, in a network namespace of its own.
ip netns add "$netns" || fail "could not create a network namespace"
ip -n "$netns" link set lo up
# nsenter, not `ip netns exec`: that one would also give the command a mount namespace of its
# own, where buildah's mounts of the container would not be seen by the buildah commands outside.
in_ns=(nsenter --net="/run/netns/$netns")

www=$tmp/www
mkdir -p "$www"
head -c $((3 * 1024 * 1024 + 12345)) /dev/urandom >"$www/object.bin"   # 4 chunks (1 MiB)
size=$(wc -c <"$www/object.bin")
touch -d '2020-01-01 00:00:00 UTC' "$www/object.bin"   # old enough to be heuristically fresh
origin_log=$tmp/origin.log
"${in_ns[@]}" python3 -m http.server "$ORIGIN_PORT" --bind 127.0.0.1 --directory "$www" >"$origin_log" 2>&1 &
origin_requests() { grep -c '"GET /object.bin' "$origin_log" || true; }

# wait_for URL SECONDS [PID]: until it answers 200; fails at once when PID has exited.
wait_for() {
  local deadline=$((SECONDS + $2))
  until "${in_ns[@]}" curl -fsS -m 2 -o /dev/null "$1" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then
      local status=0
      wait "$3" || status=$?
      fail "the container exited with status $status before $1 answered"
    fi
    sleep 0.2
  done
}
wait_for "http://127.0.0.1:$ORIGIN_PORT/" 20 || fail "the test origin did not start"

# start_edgeslice LOG [buildah run options]: the image's command, as the image's user.
es_pid=
start_edgeslice() {
  es_log=$1
  shift
  "${in_ns[@]}" timeout 600 buildah run --isolation chroot "$@" "$ctr" -- "${argv[@]}" >"$es_log" 2>&1 &
  run_pid=$!
  wait_for "http://$ADMIN/healthz" 60 "$run_pid" || fail "no 200 from /healthz on $ADMIN within 60 s"
  wait_for "http://$ADMIN/readyz" 60 "$run_pid" || fail "no 200 from /readyz on $ADMIN within 60 s"
  es_pid=
  for p in $(ip netns pids "$netns"); do
    if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = edgeslice ]; then es_pid=$p; fi
  done
  [ -n "$es_pid" ] || fail "no edgeslice process in the network namespace"
  local uids cmdline
  uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$es_pid/status")
  [ "$uids" = "10001 10001 10001 10001" ] || fail "edgeslice runs with uids $uids, not 10001 (user $user)"
  cmdline=$(tr '\0' ' ' <"/proc/$es_pid/cmdline")
  [ "$cmdline" = "$command " ] || fail "edgeslice runs as '$cmdline', not the image's '$command'"
}

# stop_edgeslice: SIGTERM, as `docker stop`; edgeslice must exit 0 within 30 s.
stop_edgeslice() {
  kill -TERM "$es_pid"
  local deadline=$((SECONDS + 30))
  while kill -0 "$es_pid" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || fail "edgeslice did not exit within 30 s of SIGTERM"
    sleep 0.2
  done
  local status=0
  wait "$run_pid" || status=$?
  [ "$status" -eq 0 ] || fail "edgeslice exited with status $status after SIGTERM"
}

# fetch NAME URL [curl options]: the body into $tmp/NAME, the headers into $tmp/NAME.headers.
fetch() {
  local name=$1 url=$2
  shift 2
  "${in_ns[@]}" curl -sS -m 20 -o "$tmp/$name" -D "$tmp/$name.headers" -w '%{http_code}' "$@" "$url" \
    >"$tmp/$name.status" || fail "$name: curl $url failed"
}
status_of() { cat "$tmp/$1.status"; }
cache_status() { grep -i '^cache-status:' "$tmp/$1.headers" | cut -d: -f2- | tr -d '\r' | sed 's/^ *//'; }
# expect NAME STATUS CACHE-STATUS-PATTERN FIRST LAST: status, Cache-Status and exact bytes.
expect() {
  local name=$1 status=$2 pattern=$3 first=$4 last=$5
  [ "$(status_of "$name")" = "$status" ] || fail "$name: status $(status_of "$name"), expected $status"
  [[ "$(cache_status "$name")" =~ $pattern ]] \
    || fail "$name: Cache-Status '$(cache_status "$name")', expected /$pattern/"
  dd if="$www/object.bin" of="$tmp/expected" iflag=skip_bytes,count_bytes skip="$first" \
    count=$((last - first + 1)) status=none
  cmp -s "$tmp/expected" "$tmp/$name" \
    || fail "$name: the body ($(wc -c <"$tmp/$name") bytes) differs from bytes $first-$last of the object"
  say "$name: $status, Cache-Status: $(cache_status "$name"), $((last - first + 1)) bytes exact"
}

say "starting the image's command as $user with the shipped configuration"
start_edgeslice "$tmp/edgeslice-1.log"
say "edgeslice runs as uid 10001 (pid $es_pid): /healthz and /readyz answer"
"${in_ns[@]}" timeout 30 buildah run --isolation chroot "$ctr" -- sh -c "$healthcheck" >/dev/null 2>&1 || fail "the image's HEALTHCHECK ($healthcheck) fails"

first=1000000 last=2100000   # across the boundaries of chunks 0, 1 and 2
fetch miss "http://$PROXY/object.bin" -r "$first-$last"
expect miss 206 'fwd=miss' "$first" "$last"
asked=$(origin_requests)
[ "$asked" -ge 1 ] || fail "the miss asked the origin nothing"
fetch hit "http://$PROXY/object.bin" -r "$first-$last"
expect hit 206 '^edgeslice; hit$' "$first" "$last"
[ "$(origin_requests)" -eq "$asked" ] || fail "the hit asked the origin again"
# The whole object: a hit here (python's http.server ignores Range: the miss stored it all).
fetch whole "http://$PROXY/object.bin"
expect whole 200 '' 0 $((size - 1))

# The disk tier: chunk files in the volume, written by uid 10001 (writes are queued: wait).
deadline=$((SECONDS + 30))
until [ "$("${in_ns[@]}" curl -fsS -m 2 "http://$ADMIN/stats" | awk '$1 == "cache_disk_entries" {print $2}')" -ge 1 ] 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || fail "no disk entries (cache_disk_entries in /stats) 30 s after the fill"
  sleep 0.2
done
run --user 0:0 "$ctr" -- sh -c \
  'grep -q " /var/cache/edgeslice " /proc/self/mountinfo && find /var/cache/edgeslice -type f -printf "%U %s %P\n"' \
  >"$tmp/volume.txt" || fail "/var/cache/edgeslice is not a volume in the container"
entries=$(grep -vc ' EDGESLICE-CACHE' "$tmp/volume.txt" || true)
[ "$entries" -ge 1 ] || fail "no cache files in /var/cache/edgeslice: $(tr '\n' ';' <"$tmp/volume.txt")"
if awk '$1 != 10001 {found = 1} END {exit !found}' "$tmp/volume.txt"; then
  fail "files in /var/cache/edgeslice not owned by uid 10001: $(awk '$1 != 10001' "$tmp/volume.txt" | tr '\n' ';')"
fi
say "disk tier: $entries cache files in the volume /var/cache/edgeslice, owned by uid 10001"
stop_edgeslice
say "SIGTERM: edgeslice exited with status 0"

# --- 5. A configuration mounted over the shipped one, with a TLS listener.
mine=$tmp/mine
mkdir -p "$mine/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$mine/tls/site.key" \
  -out "$mine/tls/site.pem" 2>/dev/null || fail "openssl could not make a test certificate"
chmod 0644 "$mine/tls/site.key"   # a throwaway key, readable by the image's user
cat >"$mine/edgeslice.yaml" <<EOF
listen:
  - 0.0.0.0:${PROXY##*:}
  - address: 0.0.0.0:${TLS##*:}
    tls:
      certificates:
        - {cert: /etc/edgeslice/tls/site.pem, key: /etc/edgeslice/tls/site.key}
admin:
  listen: 0.0.0.0:${ADMIN##*:}
cache:
  memory:
    capacity: 64MiB
  disk:
    path: /var/cache/edgeslice
    capacity: 1GiB
upstreams:
  origin:
    servers: ["127.0.0.1:$ORIGIN_PORT"]
routes:
  - path_prefix: /
    upstream: origin
    cache: true
EOF

say "starting again with a configuration mounted over the shipped one (a TLS listener added)"
start_edgeslice "$tmp/edgeslice-2.log" \
  -v "$mine/edgeslice.yaml:/etc/edgeslice/edgeslice.yaml:ro" -v "$mine/tls:/etc/edgeslice/tls:ro"
# The memory tier starts empty: a hit that asks the origin nothing comes from the disk tier.
asked=$(origin_requests)
fetch disk-hit "http://$PROXY/object.bin" -r "$first-$last"
expect disk-hit 206 '^edgeslice; hit$' "$first" "$last"
[ "$(origin_requests)" -eq "$asked" ] || fail "the hit after the restart asked the origin"
# TLS in the image (the scheme is part of the cache key: a miss, then a hit).
fetch https-miss "https://$TLS/object.bin" --cacert "$mine/tls/site.pem"
expect https-miss 200 'fwd=miss' 0 $((size - 1))
fetch https-hit "https://$TLS/object.bin" --cacert "$mine/tls/site.pem"
expect https-hit 200 '^edgeslice; hit$' 0 $((size - 1))
stop_edgeslice

say "passed in $((SECONDS - started)) s"
