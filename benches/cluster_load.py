#!/usr/bin/env python3
"""The workload of benches/cluster.sh, and its origin relay.

  cluster_load.py load  --nodes A,B,C --docroot DIR --objects N ...   (prints one JSON line)
  cluster_load.py relay --listen PORT --upstream PORT --delay-ms 20 --counts FILE

load: CONCURRENCY workers, each with a keep-alive HTTP/1.1 connection to every node, send
REQUESTS GETs in all, each to a random node: a Zipf-popular object (s = ZIPF), a random
range of at most MAX_RANGE bytes (WHOLE of them the whole object). Every body is compared
with the file in the docroot. The seed makes two runs ask the same things in the same order.

relay: a TCP relay in front of the origin holding every piece of bytes DELAY ms in each
direction (the origin "20 ms away"), writing the bytes it forwarded origin -> nodes to FILE.
Standard library only.
"""
import argparse
import asyncio
import json
import mmap
import os
import random
import sys
import time


# --- load -----------------------------------------------------------------------------------

async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip().lower(), []).append(v.strip())
    if "content-length" in fields:
        body = await reader.readexactly(int(fields["content-length"][0]))
    elif "chunked" in ",".join(fields.get("transfer-encoding", [])).lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return status, fields, body


def cache_result(fields):
    """The answering node's own Cache-Status entry (the last one, RFC 9211), as one word:
    hit, or the fwd= reason (miss, partial, stale, ...)."""
    entries = ",".join(fields.get("cache-status", [])).split(",")
    last = entries[-1].strip() if entries else ""
    params = [p.strip() for p in last.split(";")[1:]]
    if "hit" in params:
        return "hit"
    for p in params:
        if p.startswith("fwd="):
            return p[4:]
    return last or "none"


async def load(args):
    rng = random.Random(args.seed)
    nodes = args.nodes.split(",")
    files = []
    for i in range(args.objects):
        with open(os.path.join(args.docroot, f"o/{i}.bin"), "rb") as f:
            files.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    weights = [1.0 / (i + 1) ** args.zipf for i in range(args.objects)]
    # The whole plan first, from the seed alone: both runs of the bench ask the same things.
    plan = []
    for _ in range(args.requests):
        o = rng.choices(range(args.objects), weights)[0]
        size = len(files[o])
        if rng.random() < args.whole:
            a, b = None, None
        else:
            n = rng.randint(1, min(args.max_range, size))
            a = rng.randint(0, size - n)
            b = a + n - 1
        plan.append((rng.randrange(len(nodes)), o, a, b))
    stats = {"requests": 0, "errors": 0, "bytes": 0, "results": {}, "latencies": []}
    queue = iter(plan)

    async def worker():
        conns = {}
        for node, o, a, b in queue:
            t0 = time.monotonic()
            rng_hdr = "" if a is None else f"Range: bytes={a}-{b}\r\n"
            req = f"GET /o/{o}.bin HTTP/1.1\r\nHost: {args.host}\r\n{rng_hdr}\r\n".encode()
            try:
                if node not in conns:
                    host, port = nodes[node].rsplit(":", 1)
                    conns[node] = await asyncio.open_connection(host, int(port))
                reader, writer = conns[node]
                writer.write(req)
                status, fields, body = await read_response(reader)
                want = files[o][:] if a is None else files[o][a : b + 1]
                if status != (200 if a is None else 206) or body != want:
                    raise ValueError(f"status {status}, {len(body)} bytes, want {len(want)}")
            except Exception as e:  # noqa: BLE001 - counted and reported
                stats["errors"] += 1
                if stats["errors"] <= 3:
                    print(f"error: node {nodes[node]} /o/{o}.bin {a}-{b}: {e!r}", file=sys.stderr)
                conn = conns.pop(node, None)
                if conn:
                    conn[1].close()
                continue
            stats["requests"] += 1
            stats["bytes"] += len(body)
            r = cache_result(fields)
            stats["results"][r] = stats["results"].get(r, 0) + 1
            stats["latencies"].append(time.monotonic() - t0)
        for _, w in conns.values():
            w.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.monotonic() - t0
    lat = sorted(stats.pop("latencies")) or [0.0]
    stats["elapsed"] = elapsed
    stats["p50_ms"] = 1000 * lat[len(lat) // 2]
    stats["p99_ms"] = 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(json.dumps(stats))


# --- relay ----------------------------------------------------------------------------------

async def relay(args):
    delay = args.delay_ms / 1000.0
    down = [0]

    async def pipe(reader, writer, count):
        q = asyncio.Queue(maxsize=64)

        async def read():
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    await q.put((time.monotonic() + delay, data))
            except OSError:
                pass
            await q.put(None)

        async def write():
            try:
                while True:
                    item = await q.get()
                    if item is None:
                        break
                    at, data = item
                    wait = at - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()
                    if count:
                        down[0] += len(data)
                writer.write_eof()
            except OSError:
                writer.close()

        await asyncio.gather(read(), write())

    async def serve(creader, cwriter):
        try:
            ureader, uwriter = await asyncio.open_connection("127.0.0.1", args.upstream)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pipe(creader, uwriter, False), pipe(ureader, cwriter, True))
        cwriter.close()
        uwriter.close()

    async def report():
        while True:
            with open(args.counts + ".tmp", "w") as f:
                f.write(f"{down[0]}\n")
            os.replace(args.counts + ".tmp", args.counts)
            await asyncio.sleep(0.2)

    server = await asyncio.start_server(serve, "127.0.0.1", args.listen)
    asyncio.get_running_loop().create_task(report())
    async with server:
        await server.serve_forever()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    l = sub.add_parser("load")
    l.add_argument("--nodes", required=True)
    l.add_argument("--docroot", required=True)
    l.add_argument("--objects", type=int, required=True)
    l.add_argument("--requests", type=int, default=3000)
    l.add_argument("--concurrency", type=int, default=48)
    l.add_argument("--max-range", type=int, default=4 << 20)
    l.add_argument("--whole", type=float, default=0.02)
    l.add_argument("--zipf", type=float, default=0.8)
    l.add_argument("--seed", type=int, default=1)
    l.add_argument("--host", default="media.example")
    r = sub.add_parser("relay")
    r.add_argument("--listen", type=int, required=True)
    r.add_argument("--upstream", type=int, required=True)
    r.add_argument("--delay-ms", type=float, default=20)
    r.add_argument("--counts", required=True)
    a = p.parse_args()
    asyncio.run(load(a) if a.cmd == "load" else relay(a))


if __name__ == "__main__":
    main()
