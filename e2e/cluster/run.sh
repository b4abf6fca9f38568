#!/usr/bin/env bash
# The end-to-end suite on a real Kubernetes cluster (e.g. kind):
#   build the walden and walden-operator images and load them into the
#   cluster, helm install charts/walden, start MinIO and a PostgreSQL
#   StatefulSet, apply a ContinuousBackup, wait for archiving and a base
#   backup, write rows, fork at a recorded time and check the fork's rows,
#   run a Follower and check it follows, promote it and write to it.
#
# Usage:
#   KUBECONFIG=~/.kube/config e2e/cluster/run.sh
# Settings (environment):
#   KUBECONFIG / WALDEN_E2E_KUBECONFIG   the cluster; without one the suite is skipped (exit 0)
#   WALDEN_E2E_LOAD=kind|none            how images reach the nodes (default: kind if `kind` exists)
#   KIND_CLUSTER_NAME                    kind cluster to load into (default: kind)
#   WALDEN_E2E_REGISTRY                  image repository prefix (default: walden.local; with
#                                        WALDEN_E2E_LOAD=none, images are pushed there)
#   WALDEN_E2E_TAG                       image tag (default: e2e-<git short sha>)
#   WALDEN_E2E_SKIP_BUILD=1              use images already present
#   WALDEN_E2E_KEEP=1                    keep the namespaces afterwards for inspection
#   WALDEN_E2E_TIMEOUT                   seconds for each wait (default 600)
set -euo pipefail
cd "$(dirname "$0")/../.."

export KUBECONFIG=${WALDEN_E2E_KUBECONFIG:-${KUBECONFIG:-}}
if [[ -z "$KUBECONFIG" ]]; then
    echo "SKIP cluster suite: no kubeconfig (set KUBECONFIG or WALDEN_E2E_KUBECONFIG, e.g. after 'kind create cluster')"
    exit 0
fi
for tool in kubectl helm; do
    command -v "$tool" >/dev/null || { echo "cluster suite: $tool is required" >&2; exit 1; }
done
if ! kubectl version --request-timeout=10s >/dev/null 2>&1; then
    echo "cluster suite: the cluster of $KUBECONFIG does not answer" >&2
    exit 1
fi

NS=walden-e2e
OP_NS=walden-system
TIMEOUT=${WALDEN_E2E_TIMEOUT:-600}
REGISTRY=${WALDEN_E2E_REGISTRY:-walden.local}
TAG=${WALDEN_E2E_TAG:-e2e-$(git rev-parse --short HEAD 2>/dev/null || echo dev)}
LOAD=${WALDEN_E2E_LOAD:-$(command -v kind >/dev/null && echo kind || echo none)}
PASS=0

step() { echo; echo "== $*"; }
ok() { PASS=$((PASS + 1)); echo "ok: $*"; }
fail() {
    echo "FAIL: $*" >&2
    echo "--- diagnostics" >&2
    kubectl -n "$NS" get all,cb,fork,follower -o wide >&2 || true
    kubectl -n "$NS" get events --sort-by=.lastTimestamp 2>/dev/null | tail -40 >&2 || true
    kubectl -n "$OP_NS" logs deploy/walden-operator --tail=100 >&2 || true
    echo "cluster: $PASS passed, 1 failed" >&2
    exit 1
}
# until TIMEOUT "what" command...: polls every 5 s.
until_ok() {
    local what=$1; shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out after ${TIMEOUT}s waiting for $what"
        sleep 5
    done
}
psql_in() { # pod sql
    kubectl -n "$NS" exec "$1" -c postgres -- psql -U postgres -Atqc "$2"
}
rows_equal() { # pod expected-digest
    [[ "$(psql_in "$1" "SELECT count(*) || ':' || md5(string_agg(id::text, ',' ORDER BY id)) FROM t")" == "$2" ]]
}
jsonpath() { # kind name path
    kubectl -n "$NS" get "$1" "$2" -o "jsonpath=$3"
}
out_of_recovery() { [[ "$(psql_in "$1" "SELECT pg_is_in_recovery()")" == f ]]; }
nonempty() { [[ -n "$(jsonpath "$@")" ]]; }
equals() { # expected kind name path
    local want=$1; shift
    [[ "$(jsonpath "$@")" == "$want" ]]
}
cleanup() {
    if [[ "${WALDEN_E2E_KEEP:-}" != 1 ]]; then
        kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
        helm uninstall walden -n "$OP_NS" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

step "images $REGISTRY/walden:$TAG and $REGISTRY/walden-operator:$TAG (load: $LOAD)"
if [[ "${WALDEN_E2E_SKIP_BUILD:-}" != 1 ]]; then
    command -v docker >/dev/null || { echo "cluster suite: docker is required to build images" >&2; exit 1; }
    for target in walden walden-operator; do
        docker build --target "$target" --build-arg "REVISION=$TAG" -t "$REGISTRY/$target:$TAG" .
    done
fi
case "$LOAD" in
    kind)
        for target in walden walden-operator; do
            kind load docker-image --name "${KIND_CLUSTER_NAME:-kind}" "$REGISTRY/$target:$TAG"
        done ;;
    none)
        if [[ "${WALDEN_E2E_SKIP_BUILD:-}" != 1 ]]; then
            for target in walden walden-operator; do docker push "$REGISTRY/$target:$TAG"; done
        fi ;;
    *) echo "WALDEN_E2E_LOAD must be kind or none" >&2; exit 1 ;;
esac
ok "images ready"

step "helm install charts/walden"
kubectl create namespace "$OP_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
helm upgrade --install walden charts/walden -n "$OP_NS" --wait --timeout "${TIMEOUT}s" \
    --set image.repository="$REGISTRY/walden-operator" --set image.tag="$TAG" --set image.pullPolicy=IfNotPresent \
    --set walden.image.repository="$REGISTRY/walden" --set walden.image.tag="$TAG" \
    --set logging.format=text
until_ok "the operator to lead" kubectl -n "$OP_NS" rollout status deploy/walden-operator --timeout=10s
for crd in continuousbackups forks followers; do
    kubectl get crd "$crd.walden.dev" >/dev/null || fail "CRD $crd.walden.dev missing"
done
ok "operator running, CRDs installed"

step "S3 server, PostgreSQL, ContinuousBackup"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" apply -f e2e/cluster/manifests/infra.yaml
until_ok "the bucket" kubectl -n "$NS" wait job/s3-bucket --for=condition=complete --timeout=10s
until_ok "the injected walden sidecar" equals "walden-install" statefulset pg '{.spec.template.spec.initContainers[0].name}'
until_ok "pg-0 with its sidecar ready" equals "true true" pod pg-0 '{.status.containerStatuses[*].ready}'
[[ "$(psql_in pg-0 "SHOW archive_command")" == "/walden/bin/walden wal-push %p" ]] || fail "archive_command not set"
ok "primary protected (archive_command set by the operator)"

step "archiving and a base backup"
psql_in pg-0 "CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 10000) g ON CONFLICT DO NOTHING" >/dev/null
psql_in pg-0 "SELECT pg_switch_wal()" >/dev/null
until_ok "WAL archived" nonempty cb pg '{.status.lastArchivedWal}'
until_ok "a base backup" nonempty cb pg '{.status.lastBackup.id}'
until_ok "ContinuousBackup Ready" equals True cb pg '{.status.conditions[?(@.type=="Ready")].status}'
ok "archived $(jsonpath cb pg '{.status.lastArchivedWal}'), backup $(jsonpath cb pg '{.status.lastBackup.id}')"

step "rows, a recorded time, more rows"
psql_in pg-0 "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(10001, 20000) g" >/dev/null
AT_TARGET=$(psql_in pg-0 "SELECT count(*) || ':' || md5(string_agg(id::text, ',' ORDER BY id)) FROM t")
TARGET=$(psql_in pg-0 "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
sleep 2 # the next commit lands strictly after the (second-resolution) target
psql_in pg-0 "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(20001, 30000) g" >/dev/null
psql_in pg-0 "SELECT pg_switch_wal()" >/dev/null
ok "target $TARGET with rows $AT_TARGET"

step "Fork at $TARGET"
kubectl -n "$NS" apply -f - <<EOF
apiVersion: walden.dev/v1alpha1
kind: Fork
metadata:
  name: pg-fork
spec:
  source:
    continuousBackup: pg
  target:
    time: "$TARGET"
  instance:
    image: postgres:15
    storageSize: 1Gi
EOF
until_ok "the fork Ready" equals Ready fork pg-fork '{.status.phase}'
until_ok "the fork's rows at the target" rows_equal pg-fork-0 "$AT_TARGET"
[[ "$(psql_in pg-fork-0 "SELECT pg_is_in_recovery()")" == f ]] || fail "the fork is still in recovery"
ok "fork has exactly the rows committed before $TARGET"

step "Follower"
kubectl -n "$NS" apply -f - <<EOF
apiVersion: walden.dev/v1alpha1
kind: Follower
metadata:
  name: pg-replicas
spec:
  source:
    continuousBackup: pg
  replicas: 1
  streaming:
    primaryConninfoSecret: pg-replication
  instance:
    image: postgres:15
    storageSize: 1Gi
EOF
until_ok "the follower ready" equals 1 follower pg-replicas '{.status.readyReplicas}'
psql_in pg-0 "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(30001, 40000) g" >/dev/null
psql_in pg-0 "SELECT pg_switch_wal()" >/dev/null
NOW_ROWS=$(psql_in pg-0 "SELECT count(*) || ':' || md5(string_agg(id::text, ',' ORDER BY id)) FROM t")
until_ok "the follower to follow" rows_equal pg-replicas-0 "$NOW_ROWS"
[[ "$(psql_in pg-replicas-0 "SELECT pg_is_in_recovery()")" == t ]] || fail "the follower is not a standby"
ok "follower follows the primary"

step "promote the follower"
kubectl -n "$NS" patch follower pg-replicas --type merge -p '{"spec":{"promote":true}}'
until_ok "the follower promoted" equals true follower pg-replicas '{.status.promoted}'
until_ok "the promoted follower out of recovery" out_of_recovery pg-replicas-0
psql_in pg-replicas-0 "INSERT INTO t VALUES (-1, 'promoted')" >/dev/null || fail "the promoted follower refuses writes"
ok "follower promoted and writable"

echo
echo "cluster: $PASS passed, 0 failed"
