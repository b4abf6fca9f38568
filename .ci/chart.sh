#!/usr/bin/env bash
# Chart checks: lint charts/walden strictly and render it with Helm's own Go
# library (PyPI helm-python-sdk, no helm binary needed), validate every rendered
# manifest offline against the Kubernetes schemas (PyPI kubernetes-validate,
# --strict), and check that the chart ships exactly operator/deploy/rbac.yaml's
# rules and crds/walden.dev.yaml. Prints "chart: N passed, M failed"; exits
# non-zero on any failure.
#
# Tools are installed once into a virtualenv under /var/tmp/walden-ci
# (override with WALDEN_CHART_VENV) and reused afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${WALDEN_CHART_VENV:-/var/tmp/walden-ci/chart-venv}
# Pinned: a new release of either must not change CI results silently.
REQS=("helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0" "PyYAML==6.0.3")
STAMP="$VENV/.walden-reqs"

if [[ ! -x "$VENV/bin/python" || "$(cat "$STAMP" 2>/dev/null)" != "${REQS[*]}" ]]; then
    echo "chart: installing ${REQS[*]} into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${REQS[@]}"
    echo "${REQS[*]}" > "$STAMP"
fi

# The operator binary, to check the Deployment's flags parse (built by .ci/run
# before this script; skipped with a message when absent, unless CI=true).
TARGET=${CARGO_TARGET_DIR:-target}
export WALDEN_OPERATOR_BIN=${WALDEN_OPERATOR_BIN:-$TARGET/debug/walden-operator}

exec "$VENV/bin/python" .ci/chart_check.py "$@"
