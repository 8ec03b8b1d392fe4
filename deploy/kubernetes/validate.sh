#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/kubernetes offline (no cluster, no kubectl):
#   1. every manifest against the Kubernetes API's JSON schemas shipped in the PyPI package
#      kubernetes-validate (pinned below), strictly (an unknown or misspelled field is an
#      error), for each Kubernetes version in K8S_VERSIONS. A kind without a schema is an error
#      too (kubernetes-validate only warns), except the Prometheus Operator's ServiceMonitor, a
#      CRD whose schema the package does not ship: validate.py checks its fields instead;
#   2. validate.py: the kustomizations (every listed resource exists, every manifest is listed),
#      the ConfigMap's edgeslice YAML parses, and the manifests agree with each other and with
#      that configuration (see validate.py's docstring);
#   3. where kubectl is installed: `kubectl kustomize` renders each kustomization (offline), and
#      the rendered resources are validated as in 1 (for the newest version);
#   4. with EDGESLICE_BIN set to a built edgeslice binary: `edgeslice -t` on the ConfigMap's
#      configuration as shipped (the disk path replaced by a temporary directory); the origin
#      placeholder does not resolve here, which `-t` warns about and accepts.
# Exits non-zero on any failure. The tools are installed with pip (pinned) into a cache
# directory outside the repository the first time, then reused.
set -euo pipefail
start_dir=$PWD
cd "$(dirname "$0")"

KV_VERSION=1.37.0      # kubernetes-validate on PyPI; ships schemas for Kubernetes 1.25 to 1.37
PYYAML_VERSION=6.0.3   # PyYAML, for validate.py (kubernetes-validate needs it too)
# The newest Kubernetes the package ships, and 1.30, still run by clusters on extended support.
K8S_VERSIONS="1.30.0 1.37.0"

TOOLS="${EDGESLICE_TOOLS_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/edgeslice}/k8s-validate-$KV_VERSION"
export PYTHONPATH="$TOOLS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

if ! python3 -c "import kubernetes_validate.version as v, yaml, sys
sys.exit(v.__version__ != '$KV_VERSION' or yaml.__version__ != '$PYYAML_VERSION')" 2>/dev/null; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 300 apt-get install -y -qq python3-pip >/dev/null
  fi
  # --target: a directory of its own, outside the system's site-packages (which Debian marks
  # as externally managed).
  rm -rf "$TOOLS"
  mkdir -p "$TOOLS"
  timeout 300 python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$TOOLS" "kubernetes-validate==$KV_VERSION" "PyYAML==$PYYAML_VERSION"
fi

# Every manifest: the YAML files here and in prometheus-operator/, kustomizations aside.
manifests=()
shopt -s nullglob
for f in *.yaml *.yml prometheus-operator/*.yaml prometheus-operator/*.yml; do
  case "$(basename "$f")" in kustomization.yaml) ;; *) manifests+=("$f") ;; esac
done

status=0
for version in $K8S_VERSIONS; do
  # kubernetes-validate exits 1 on an invalid resource; it only warns on a kind it has no
  # schema for, so a WARN line is a failure here unless it is about a ServiceMonitor.
  if ! out=$(timeout 120 python3 -m kubernetes_validate --strict --quiet -k "$version" "${manifests[@]}" 2>&1); then
    status=1
  fi
  out=$(printf '%s\n' "$out" | grep -v '^WARN .*kind ServiceMonitor with api version monitoring.coreos.com/v1 ' || true)
  if [ -n "$out" ]; then
    printf '%s\n' "$out"
  fi
  if printf '%s\n' "$out" | grep -q '^WARN'; then
    echo "validate.sh: a manifest of a kind kubernetes-validate has no schema for (above)" >&2
    status=1
  fi
done

if ! timeout 60 python3 validate.py "${manifests[@]}"; then
  status=1
fi

# kubectl, where there is one (it is not installed for this): `kubectl kustomize` renders each
# kustomization offline as `kubectl apply -k` would, and the rendered resources are validated.
if command -v kubectl >/dev/null 2>&1; then
  for dir in . prometheus-operator; do
    if ! rendered=$(timeout 60 kubectl kustomize "$dir" 2>&1); then
      printf '%s\n' "$rendered"
      echo "validate.sh: kubectl kustomize $dir fails" >&2
      status=1
    elif [ "$dir" = . ] && ! printf '%s\n' "$rendered" \
      | timeout 60 python3 -m kubernetes_validate --strict --quiet -k "${K8S_VERSIONS##* }" -; then
      echo "validate.sh: the resources kubectl kustomize renders do not validate" >&2
      status=1
    fi
  done
else
  echo "validate.sh: no kubectl here: kustomizations checked by validate.py only, not rendered"
fi

if [ -n "${EDGESLICE_BIN:-}" ]; then
  bin=$(cd "$start_dir" && realpath "$EDGESLICE_BIN")
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  python3 - "$scratch" <<'EOF'
import sys, yaml
scratch = sys.argv[1]
cm = yaml.safe_load(open("configmap.yaml"))
text = cm["data"]["edgeslice.yaml"]
text = text.replace("/var/cache/edgeslice", scratch + "/cache")
open(scratch + "/edgeslice.yaml", "w").write(text)
EOF
  if ! timeout 60 "$bin" -t -c "$scratch/edgeslice.yaml"; then
    echo "validate.sh: edgeslice -t rejects the ConfigMap's configuration (configmap.yaml)" >&2
    status=1
  fi
fi

if [ "$status" -ne 0 ]; then
  echo "validate.sh: deploy/kubernetes: INVALID" >&2
  exit 1
fi
echo "validate.sh: deploy/kubernetes: ${#manifests[@]} manifests valid (Kubernetes $K8S_VERSIONS, kubernetes-validate $KV_VERSION)"
