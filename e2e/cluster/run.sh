#!/usr/bin/env bash
# Walden's cluster suite (e2e/cluster/suite.py) against a real Kubernetes
# cluster: this machine's single node (e2e/cluster/node.sh) or any cluster a
# user points KUBECONFIG at (kind, EKS, ...). Installs the operator in the
# cluster from charts/walden with the PyPI helm-python-sdk (no helm binary
# needed), then protects a PostgreSQL StatefulSet, forks, follows and breaks
# things; prints one line per step and `cluster: N passed, M failed`.
#
#   KUBECONFIG=$(e2e/cluster/node.sh up | sed -n 's/^KUBECONFIG=//p') e2e/cluster/run.sh
#   KUBECONFIG=~/.kube/config WALDEN_E2E_IMAGES=kind e2e/cluster/run.sh
#
# Settings (environment):
#   KUBECONFIG / WALDEN_E2E_KUBECONFIG   the cluster; without one the suite is
#                               skipped (and fails with CI=true)
#   WALDEN_E2E_IMAGES           how the walden images reach the cluster:
#                               node (default when KUBECONFIG is node.sh's): built
#                                 into the node's docker by images.sh from the
#                                 workspace's binaries;
#                               kind: `docker build` of the release Dockerfile and
#                                 `kind load` (KIND_CLUSTER_NAME, default kind);
#                               none: already pullable as $WALDEN_E2E_REGISTRY/...:$WALDEN_E2E_TAG
#   WALDEN_E2E_REGISTRY         image repository prefix (default walden)
#   WALDEN_E2E_TAG              image tag (default e2e-<hash of the binaries> / e2e-<git sha>)
#   WALDEN_E2E_UPGRADE_TAG      tag the upgrade step moves the operator to (node: <tag>-upgrade)
#   WALDEN_E2E_POSTGRES_IMAGE   default postgres:15
#   WALDEN_E2E_S3_IMAGE         an image with s3s-fs on PATH (default local/s3s-fs:0.14.1;
#                               e2e/cluster/images.sh node builds it)
#   WALDEN_E2E_STEPS            a regular expression: run only matching steps
#   WALDEN_E2E_KEEP=1           keep what the suite created, for inspection
#   WALDEN_E2E_TIMEOUT          seconds for each wait (default 300)
#   WALDEN_E2E_VENV             Python environment with helm-python-sdk
#                               (default /var/tmp/walden-ci/helm-venv; created once)
set -euo pipefail
cd "$(dirname "$0")/../.."

NODE_KUBECONFIG="${WALDEN_NODE_DIR:-/var/tmp/walden-ci/node}/kubeconfig"
fail_or_skip() {
    if [[ "${CI:-}" == true ]]; then echo "cluster suite: $*" >&2; exit 1; fi
    echo "SKIP cluster suite: $*"
    exit 0
}

export KUBECONFIG=${WALDEN_E2E_KUBECONFIG:-${KUBECONFIG:-}}
[[ -n "$KUBECONFIG" ]] || fail_or_skip "no KUBECONFIG (e2e/cluster/node.sh up prints one; or kind create cluster)"
export KUBECONFIG
if [[ "$(readlink -f "$KUBECONFIG")" == "$(readlink -f "$NODE_KUBECONFIG" 2>/dev/null)" ]]; then
    default_images=node
    # The node's own kubectl (v1.20.2, built with it): no version skew.
    export PATH="${WALDEN_KUBE_CACHE:-/var/tmp/walden-ci/kube}/bin:$PATH"
else
    default_images=none
fi
command -v kubectl >/dev/null || fail_or_skip "kubectl is required"
kubectl version --request-timeout=10s >/dev/null 2>&1 || fail_or_skip "the cluster of $KUBECONFIG does not answer"

# helm-python-sdk wraps Helm 4 (libhelm_c) with ctypes: pinned, installed once.
VENV=${WALDEN_E2E_VENV:-/var/tmp/walden-ci/helm-venv}
PY_DEPS=(helm-python-sdk==0.2.2 PyYAML==6.0.2)
if ! "$VENV/bin/python" -c 'import helm_python, yaml' 2>/dev/null; then
    echo "cluster suite: installing ${PY_DEPS[*]} into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "${PY_DEPS[@]}"
fi

IMAGES=${WALDEN_E2E_IMAGES:-$default_images}
export WALDEN_E2E_REGISTRY=${WALDEN_E2E_REGISTRY:-walden}
bins=${WALDEN_BIN_DIR:-${CARGO_TARGET_DIR:-/var/tmp/walden-ci/target}/debug}
case "$IMAGES" in
    node)
        default_tag=e2e-$(cat "$bins/walden" "$bins/walden-operator" | sha256sum | cut -c1-12)
        export WALDEN_E2E_TAG=${WALDEN_E2E_TAG:-$default_tag}
        WALDEN_BIN_DIR="$bins" bash e2e/cluster/images.sh walden "$WALDEN_E2E_TAG"
        # The upgrade step moves the operator to a second tag (same binaries:
        # what an upgrade changes in the cluster is the image reference).
        export WALDEN_E2E_UPGRADE_TAG=${WALDEN_E2E_UPGRADE_TAG:-$WALDEN_E2E_TAG-upgrade}
        WALDEN_BIN_DIR="$bins" bash e2e/cluster/images.sh walden "$WALDEN_E2E_UPGRADE_TAG"
        ;;
    kind)
        export WALDEN_E2E_TAG=${WALDEN_E2E_TAG:-e2e-$(git rev-parse --short HEAD)}
        for target in walden walden-operator; do
            docker build --target "$target" --build-arg "REVISION=$WALDEN_E2E_TAG" \
                -t "$WALDEN_E2E_REGISTRY/$target:$WALDEN_E2E_TAG" .
            kind load docker-image --name "${KIND_CLUSTER_NAME:-kind}" "$WALDEN_E2E_REGISTRY/$target:$WALDEN_E2E_TAG"
        done
        ;;
    none) export WALDEN_E2E_TAG=${WALDEN_E2E_TAG:?set WALDEN_E2E_TAG to the images pushed to $WALDEN_E2E_REGISTRY} ;;
    *) echo "WALDEN_E2E_IMAGES must be node, kind or none" >&2; exit 2 ;;
esac

exec "$VENV/bin/python" e2e/cluster/suite.py
