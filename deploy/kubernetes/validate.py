"""Checks of deploy/kubernetes that schemas cannot make (run by validate.sh, from this directory,
with the manifest files as arguments; exits 1 on any failure, printing every one):

- the kustomizations: each lists only files (or kustomization directories) that exist, none twice,
  no directory that contains it (kustomize refuses that), and every manifest file beside it;
  every manifest given is in one of them;
- the ConfigMap's edgeslice configuration (data: edgeslice.yaml) parses as a YAML mapping;
- the manifests agree with each other: the StatefulSet's serviceName is a headless Service,
  every selector (Services, PodDisruptionBudget, StatefulSet) matches the pod template's labels,
  named ports exist on the container, the ConfigMap mounted is the one defined, with the key
  the container's `-c` reads;
- and with that configuration: the proxy and admin ports are the container's, the cache volume
  is mounted at cache.disk.path and its claim holds cache.disk.capacity, server.pid_file and
  server.upgrade_sock are on a writable mount (the root file system is read-only),
  terminationGracePeriodSeconds covers drain_delay + grace_period + graceful_shutdown_timeout, and
  the memory limit covers README.md's memory bound (server.max_connections must be set);
- the security context and the probes this directory's README.md promises are there;
- the ServiceMonitor (a CRD: kubernetes-validate has no schema for it): its known fields only,
  and its selector finds a Service with the port it scrapes.
"""

import os
import re
import sys

import yaml

errors = []


def fail(msg):
    errors.append(msg)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


SIZE_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
QUANTITY_UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
                  "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
DURATION_UNITS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_unit(text, units, what):
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2) not in units:
        raise ValueError(f"{what}: cannot read {text!r}")
    return float(m.group(1)) * units[m.group(2)]


def size(text, what):
    return int(parse_unit(text, SIZE_UNITS, what))


def quantity(text, what):
    return int(parse_unit(text, QUANTITY_UNITS, what))


def duration(text, what):
    return parse_unit(text, DURATION_UNITS, what)


def check_kustomization(directory, manifest_set):
    """The resources of the kustomization in `directory`, as (path, document) pairs."""
    path = os.path.join(directory, "kustomization.yaml")
    if not os.path.isfile(path):
        fail(f"{path}: missing")
        return []
    k = yaml.safe_load(open(path)) or {}
    if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
        fail(f"{path}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    listed = k.get("resources") or []
    if len(set(listed)) != len(listed):
        fail(f"{path}: a resource is listed twice: {listed}")
    docs = []
    for entry in listed:
        target = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(target) and \
                os.path.commonpath([os.path.abspath(target), os.path.abspath(directory)]) == os.path.abspath(target):
            fail(f"{path}: resource {entry!r} contains this kustomization: kustomize refuses it "
                 "(cycle detected)")
        elif os.path.isdir(target):
            docs += check_kustomization(target, manifest_set)
        elif os.path.isfile(target):
            docs += [(target, d) for d in load_all(target)]
        else:
            fail(f"{path}: resource {entry!r} does not exist")
    here = sorted(
        f for f in os.listdir(directory)
        if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml"
    )
    for f in here:
        if f not in listed:
            fail(f"{path}: {f} is a manifest beside it but is not in its resources")
        manifest_set.discard(os.path.normpath(os.path.join(directory, f)))
    return docs


def memory_bound(conf):
    """README.md "Memory": a node's memory bound for this configuration, in bytes, itemised."""
    server = conf.get("server") or {}
    cache = conf.get("cache") or {}
    chunk = size(cache.get("chunk_size", "1MiB"), "cache.chunk_size")
    memory = size((cache.get("memory") or {}).get("capacity", "256MiB"), "cache.memory.capacity")
    meta = (size(cache["metadata_capacity"], "cache.metadata_capacity")
            if "metadata_capacity" in cache else max(memory // 4, 1 << 20))
    disk = cache.get("disk")
    index = 0
    if disk:
        cap = size(disk["capacity"], "cache.disk.capacity")
        index = (size(disk["index_capacity"], "cache.disk.index_capacity")
                 if "index_capacity" in disk else max(cap // 1024, 16 << 20))
    fills = int(cache.get("max_concurrent_fills", 16))
    budget = (size(cache["response_budget"], "cache.response_budget")
              if "response_budget" in cache else max(64 << 20, 8 * chunk))
    shaping = conf.get("shaping")
    clients = int(shaping.get("max_clients", 100000)) if shaping else 0
    if "max_connections" not in server:
        fail("configmap.yaml: server.max_connections is not set: without it the memory of idle "
             "connections is bounded only by the file-descriptor limit")
    conns = int(server.get("max_connections", 0))
    items = [
        ("cache.memory.capacity", memory),
        ("cache.metadata_capacity", meta),
        ("cache.disk.index_capacity", index),
        ("fill buffers", fills * 2 * chunk),
        ("cache.response_budget", budget),
        ("chunks ahead of readers", 16 << 20),
        ("disk write queue", 32 << 20),
        ("access-log queue", 4 << 20),
        ("shaping clients", clients * 700),
        ("idle connections", conns * 12 * 1024),
        ("process", 20 << 20),
        ("disk I/O threads", (12 << 20) if disk else 0),
    ]
    return items


def main(argv):
    manifest_set = {os.path.normpath(p) for p in argv}
    docs = check_kustomization(".", manifest_set)
    extra = check_kustomization("prometheus-operator", manifest_set)
    for p in sorted(manifest_set):
        fail(f"{p}: in no kustomization")

    by_kind = {}
    for path, d in docs:
        by_kind.setdefault(d.get("kind"), []).append((path, d))
    for kind in ("ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget"):
        if kind not in by_kind:
            fail(f"kustomization.yaml: no {kind}")
    if "ServiceMonitor" in by_kind:
        fail("kustomization.yaml: lists a ServiceMonitor, a CRD a cluster without the Prometheus "
             "Operator rejects: keep it in prometheus-operator/")
    if errors:
        return

    configmaps = {d["metadata"]["name"]: d for _, d in by_kind["ConfigMap"]}
    services = {d["metadata"]["name"]: d for _, d in by_kind["Service"]}
    (sts_path, sts), = by_kind["StatefulSet"]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels") or {}
    annotations = spec["template"]["metadata"].get("annotations") or {}
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {c["metadata"]["name"]: c for c in spec.get("volumeClaimTemplates", [])}

    # Selectors and the headless Service.
    if not labels_match(spec["selector"].get("matchLabels"), labels):
        fail(f"{sts_path}: spec.selector does not match the pod template's labels")
    peers = services.get(spec.get("serviceName"))
    if not peers or peers["spec"].get("clusterIP") != "None":
        fail(f"{sts_path}: serviceName {spec.get('serviceName')!r} is not a headless Service")
    elif not peers["spec"].get("publishNotReadyAddresses"):
        fail(f"service {peers['metadata']['name']}: publishNotReadyAddresses is not true "
             "(peers must resolve while their disk index loads)")
    for name, svc in services.items():
        if not labels_match(svc["spec"].get("selector"), labels):
            fail(f"service {name}: its selector does not match the pod template's labels")
        for p in svc["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            if target not in ports and target not in ports.values():
                fail(f"service {name}: targetPort {target!r} is not a container port")
    for _, pdb in by_kind["PodDisruptionBudget"]:
        if not labels_match(pdb["spec"]["selector"].get("matchLabels"), labels):
            fail(f"poddisruptionbudget {pdb['metadata']['name']}: selector does not match the pods")

    # The configuration: mounted from the ConfigMap, at the path `-c` reads.
    cmdline = container.get("command", []) + container.get("args", [])
    conf_path = cmdline[cmdline.index("-c") + 1] if "-c" in cmdline else "/etc/edgeslice/edgeslice.yaml"
    conf_mount = mounts.get(os.path.dirname(conf_path))
    conf_volume = volumes.get(conf_mount["name"]) if conf_mount else None
    if not conf_volume or "configMap" not in conf_volume:
        fail(f"{sts_path}: no ConfigMap volume mounted at {os.path.dirname(conf_path)}")
        return
    if not conf_mount.get("readOnly"):
        fail(f"{sts_path}: the configuration's mount is not readOnly")
    cm = configmaps.get(conf_volume["configMap"]["name"])
    if not cm:
        fail(f"{sts_path}: ConfigMap {conf_volume['configMap']['name']!r} is not defined")
        return
    key = os.path.basename(conf_path)
    for item in conf_volume["configMap"].get("items", []):
        if item["path"] == key:
            key = item["key"]
    try:
        conf = yaml.safe_load(cm["data"][key])
    except KeyError:
        fail(f"configmap {cm['metadata']['name']}: no key {key!r} (read by -c {conf_path})")
        return
    except yaml.YAMLError as e:
        fail(f"configmap {cm['metadata']['name']}: {key} is not valid YAML: {e}")
        return
    if not isinstance(conf, dict):
        fail(f"configmap {cm['metadata']['name']}: {key} is not a YAML mapping")
        return

    # The configuration against the pod.
    def port_of(address):
        return int(str(address).rsplit(":", 1)[1])

    listen = [x if isinstance(x, str) else x["address"] for x in conf.get("listen", ["0.0.0.0:8080"])]
    admin = (conf.get("admin") or {}).get("listen")
    if not admin:
        fail("configmap.yaml: no admin.listen: the probes and /metrics need it")
        return
    for address in listen + [admin]:
        if port_of(address) not in ports.values():
            fail(f"{sts_path}: the configuration listens on {address}, not a container port")
        if not str(address).startswith(("0.0.0.0:", "[::]:")):
            fail(f"configmap.yaml: {address} is not on all interfaces: unreachable from outside the pod")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (container.get(probe) or {}).get("httpGet") or {}
        port = ports.get(get.get("port"), get.get("port"))
        if get.get("path") != path or port != port_of(admin):
            fail(f"{sts_path}: {probe} is not GET {path} on the admin port {port_of(admin)}")
    if annotations.get("prometheus.io/port") != str(port_of(admin)) or \
            annotations.get("prometheus.io/scrape") != "true" or \
            annotations.get("prometheus.io/path") != "/metrics":
        fail(f"{sts_path}: the prometheus.io annotations do not point at the admin port's /metrics")

    # The cluster: one peer per replica, named as the headless Service names the pods, and each
    # pod naming itself the same way.
    cluster = (conf.get("cluster") or {})
    if cluster.get("peers") is not None:
        service = spec.get("serviceName")
        port = port_of(listen[0])
        want = [f"{sts['metadata']['name']}-{i}.{service}:{port}" for i in range(spec.get("replicas", 1))]
        if cluster["peers"] != want:
            fail(f"configmap.yaml: cluster.peers {cluster['peers']} are not the StatefulSet's "
                 f"{spec.get('replicas', 1)} pods as {service} names them: {want}")
        env = {e["name"]: e for e in container.get("env", [])}
        own = env.get("EDGESLICE_CLUSTER_SELF", {}).get("value")
        pod_name = (env.get("POD_NAME", {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        if own != f"$(POD_NAME).{service}:{port}" or pod_name != "metadata.name":
            fail(f"{sts_path}: EDGESLICE_CLUSTER_SELF is not $(POD_NAME).{service}:{port} with "
                 "POD_NAME from metadata.name: every pod would take the ConfigMap's cluster.self")

    disk = (conf.get("cache") or {}).get("disk")
    if disk:
        mount = mounts.get(disk["path"])
        claim = claims.get(mount["name"]) if mount else None
        if not claim:
            fail(f"{sts_path}: no volumeClaimTemplate mounted at cache.disk.path {disk['path']}")
        else:
            storage = quantity(claim["spec"]["resources"]["requests"]["storage"], "storage")
            if storage <= size(disk["capacity"], "cache.disk.capacity"):
                fail(f"{sts_path}: the claim {claim['metadata']['name']} ({storage} B) does not "
                     f"hold cache.disk.capacity ({disk['capacity']}) and room beside it")
    server = conf.get("server") or {}
    for key, default in (("pid_file", "/tmp/edgeslice.pid"), ("upgrade_sock", "/tmp/edgeslice_upgrade.sock")):
        directory = os.path.dirname(server.get(key, default))
        if directory not in mounts or mounts[directory].get("readOnly"):
            fail(f"{sts_path}: server.{key}'s directory {directory} is not a writable mount "
                 "(the root file system is read-only)")

    # Termination: SIGTERM's drain, its grace period and the background work's timeout.
    needed = duration(server.get("drain_delay", "0s"), "server.drain_delay") + \
        duration(server.get("grace_period", "0s"), "server.grace_period") + \
        duration(server.get("graceful_shutdown_timeout", "5s"), "server.graceful_shutdown_timeout")
    if pod.get("terminationGracePeriodSeconds", 30) <= needed:
        fail(f"{sts_path}: terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds', 30)} "
             f"does not exceed drain_delay + grace_period + graceful_shutdown_timeout ({needed:g} s): "
             "the kubelet would SIGKILL before the disk index snapshot is written")

    # Memory: the limit covers README.md's bound.
    items = memory_bound(conf)
    bound = sum(v for _, v in items)
    limits = (container.get("resources") or {}).get("limits") or {}
    requests = (container.get("resources") or {}).get("requests") or {}
    if "memory" not in limits or "memory" not in requests:
        fail(f"{sts_path}: no memory request or limit")
    elif quantity(limits["memory"], "limits.memory") < bound:
        fail(f"{sts_path}: memory limit {limits['memory']} is below the configuration's bound "
             f"{bound / (1 << 20):.0f} MiB: " +
             ", ".join(f"{n} {v / (1 << 20):g}" for n, v in items if v))

    # Security context.
    psc = pod.get("securityContext") or {}
    csc = container.get("securityContext") or {}
    for where, ctx, want in (
        ("pod", psc, {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}),
        ("container", csc, {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}),
    ):
        for k, v in want.items():
            if ctx.get(k) != v:
                fail(f"{sts_path}: {where} securityContext.{k} is not {v}")
    if (psc.get("seccompProfile") or csc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        fail(f"{sts_path}: no RuntimeDefault seccompProfile")
    if (csc.get("capabilities") or {}).get("drop") != ["ALL"]:
        fail(f"{sts_path}: capabilities are not dropped (drop: [ALL])")

    # The ServiceMonitor.
    allowed_spec = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                    "podTargetLabels", "sampleLimit", "scrapeProtocols", "attachMetadata"}
    allowed_endpoint = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                        "params", "honorLabels", "honorTimestamps", "relabelings",
                        "metricRelabelings", "bearerTokenSecret", "authorization", "tlsConfig",
                        "followRedirects", "enableHttp2", "filterRunning"}
    monitors = [(p, d) for p, d in extra if d.get("kind") == "ServiceMonitor"]
    if not monitors:
        fail("prometheus-operator/kustomization.yaml: no ServiceMonitor")
    for path, sm in monitors:
        if sm.get("apiVersion") != "monitoring.coreos.com/v1":
            fail(f"{path}: apiVersion is not monitoring.coreos.com/v1")
        if not (sm.get("metadata") or {}).get("name"):
            fail(f"{path}: no metadata.name")
        sm_spec = sm.get("spec") or {}
        for k in set(sm_spec) - allowed_spec:
            fail(f"{path}: unknown field spec.{k}")
        selector = (sm_spec.get("selector") or {}).get("matchLabels")
        endpoints = sm_spec.get("endpoints") or []
        if not endpoints:
            fail(f"{path}: no spec.endpoints")
        for i, e in enumerate(endpoints):
            for k in set(e) - allowed_endpoint:
                fail(f"{path}: unknown field spec.endpoints[{i}].{k}")
            found = [n for n, s in services.items()
                     if labels_match(selector, s["metadata"].get("labels") or {})
                     and e.get("port") in [p.get("name") for p in s["spec"].get("ports", [])]]
            if not found:
                fail(f"{path}: spec.endpoints[{i}]: no Service matches the selector {selector} "
                     f"with a port named {e.get('port')!r}")
            if e.get("path", "/metrics") != "/metrics":
                fail(f"{path}: spec.endpoints[{i}].path is not /metrics")

    if not errors:
        print(f"validate.py: kustomizations, configuration and cross-references consistent "
              f"(memory bound {bound / (1 << 20):.0f} MiB, limit {limits['memory']})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (KeyError, TypeError, ValueError, IndexError, yaml.YAMLError) as e:
        fail(f"cannot check the manifests: {type(e).__name__}: {e}")
    for e in errors:
        print(f"validate.py: {e}", file=sys.stderr)
    sys.exit(1 if errors else 0)
