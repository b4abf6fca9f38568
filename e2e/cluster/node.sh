#!/usr/bin/env bash
# A real single-node Kubernetes (v1.20.2) on this machine, for the cluster
# suite (e2e/cluster/run.sh):
#
#   e2e/cluster/node.sh up            start (idempotent); prints KUBECONFIG=<path>
#   e2e/cluster/node.sh down          stop everything `up` started, undo its host
#                                     changes (iptables rules, sysctls); keep state
#   e2e/cluster/node.sh down --purge  also delete the cluster's state (etcd, volumes,
#                                     PKI); images, binaries and caches stay
#   e2e/cluster/node.sh status
#
# Pieces: Debian's docker.io (dockershim runtime, pods on docker0), etcd, the
# six binaries built by .ci/kube-apiserver.sh, a DNS server for Services and a
# hostPath provisioner for the default StorageClass "standard" (both small
# stdlib Python programs in e2e/cluster/node/). Images are local (images.sh);
# registry pulls go to a dead proxy and pods cannot send anything off the
# machine (an iptables rule). Needs root. Settings: WALDEN_NODE_DIR (default
# /var/tmp/walden-ci/node), WALDEN_KUBE_CACHE (see .ci/kube-apiserver.sh).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="${WALDEN_NODE_DIR:-/var/tmp/walden-ci/node}"
KUBE_CACHE="${WALDEN_KUBE_CACHE:-/var/tmp/walden-ci/kube}"
KBIN="$KUBE_CACHE/bin"
PKI="$DIR/pki" STATE="$DIR/state" LOGS="$DIR/logs" RUN="$DIR/run" CONF="$DIR/conf"
KUBECONFIG_OUT="$DIR/kubeconfig"
NODE_IP=172.17.0.1
NODE_NAME=walden-node
SERVICE_CIDR=10.0.0.0/24
ETCD_PORT=12379
GUARD=(-i docker0 ! -o docker0 -m comment --comment walden-node-guard -j DROP)
SYSCTLS=(net.ipv4.conf.all.route_localnet net.ipv4.ip_forward net.netfilter.nf_conntrack_tcp_timeout_established)
started=$SECONDS

log() { echo "node.sh: $*" >&2; }
die() { echo "node.sh: $*" >&2; exit 1; }

# --- processes -----------------------------------------------------------

# pid of a daemon this script started, if it still runs.
running_pid() { # name
    local f="$RUN/$1.pid" pid
    [ -f "$f" ] || return 1
    pid=$(cat "$f")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    # The pid must still be the program we started (pids are reused).
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$(cat "$RUN/$1.cmd")" || return 1
    echo "$pid"
}

start_daemon() { # name program args...
    local name=$1; shift
    if running_pid "$name" >/dev/null; then return 0; fi
    log "starting $name"
    echo "$1 ${2:-}" >"$RUN/$name.cmd"
    setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
}

stop_daemon() { # name [seconds]
    local name=$1 wait=${2:-30} pid
    pid=$(running_pid "$name") || { rm -f "$RUN/$name.pid"; return 0; }
    log "stopping $name ($pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + wait))
    while [ -d "/proc/$pid" ] && ((SECONDS < deadline)); do sleep 0.2; done
    if [ -d "/proc/$pid" ]; then
        log "$name did not stop in ${wait}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        while [ -d "/proc/$pid" ]; do sleep 0.1; done
    fi
    rm -f "$RUN/$name.pid"
}

# until <seconds> <what> <command...>: polls a condition, fails with its name.
until_ok() {
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what (logs: $LOGS)"
        sleep 0.5
    done
}

# Writes stdin to a file only when the content differs: kube-proxy exits when
# its config file is rewritten, even unchanged.
write_if_changed() { # file
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

# --- PKI -----------------------------------------------------------------

cert() { # name CN O [extensions]
    local name=$1 cn=$2 org=$3 ext=${4:-}
    [ -f "$PKI/$name.crt" ] && return 0
    local subj="/CN=$cn"
    [ -n "$org" ] && subj="/O=$org$subj"
    openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
    chmod 600 "$PKI/$name.key"
    openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
    local extfile="$PKI/$name.ext"
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        if [ -n "$ext" ]; then
            echo "extendedKeyUsage=serverAuth,clientAuth"
            echo "subjectAltName=$ext"
        else
            echo "extendedKeyUsage=clientAuth"
        fi
    } >"$extfile"
    openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days 3650 -sha256 -extfile "$extfile" -out "$PKI/$name.crt" 2>/dev/null
    rm -f "$PKI/$name.csr" "$extfile"
}

kubeconfig() { # name cert [server]
    local server=${3:-https://$NODE_IP:6443}
    write_if_changed "$CONF/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: walden-node
  cluster: {server: "$server", certificate-authority: "$PKI/ca.crt"}
users:
- name: $2
  user: {client-certificate: "$PKI/$2.crt", client-key: "$PKI/$2.key"}
contexts:
- name: walden-node
  context: {cluster: walden-node, user: $2}
current-context: walden-node
EOF
}

pki() {
    mkdir -p "$PKI"
    if [ ! -f "$PKI/ca.crt" ]; then
        log "creating the CA and certificates in $PKI"
        openssl genrsa -out "$PKI/ca.key" 2048 2>/dev/null
        chmod 600 "$PKI/ca.key"
        openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=walden-node-ca" -days 3650 -sha256 \
            -out "$PKI/ca.crt" 2>/dev/null
    fi
    cert apiserver kube-apiserver "" \
        "IP:$NODE_IP,IP:127.0.0.1,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
    cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
    cert admin walden-admin system:masters
    cert kubelet "system:node:$NODE_NAME" system:nodes
    cert kubelet-serving "system:node:$NODE_NAME" system:nodes "IP:$NODE_IP,DNS:$NODE_NAME"
    cert controller-manager system:kube-controller-manager ""
    cert scheduler system:kube-scheduler ""
    cert kube-proxy system:kube-proxy ""
    cert dns walden-dns ""
    cert storage walden-storage ""
    if [ ! -f "$PKI/sa.key" ]; then
        openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
        chmod 600 "$PKI/sa.key"
        openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
    fi
    kubeconfig admin admin
    kubeconfig kubelet kubelet
    kubeconfig controller-manager controller-manager
    kubeconfig scheduler scheduler
    kubeconfig kube-proxy kube-proxy
    # Readable by the suite (which may run unprivileged): admin credentials.
    cp "$CONF/admin.kubeconfig" "$KUBECONFIG_OUT"
}

# --- host changes ----------------------------------------------------------

record_sysctls() {
    [ -f "$STATE/sysctl.orig" ] && return 0
    for s in "${SYSCTLS[@]}"; do
        local f="/proc/sys/${s//.//}"
        [ -f "$f" ] && echo "$s=$(cat "$f")"
    done >"$STATE/sysctl.orig"
}

restore_sysctls() {
    [ -f "$STATE/sysctl.orig" ] || return 0
    while IFS='=' read -r s v; do
        echo "$v" >"/proc/sys/${s//.//}" 2>/dev/null || log "could not restore $s=$v"
    done <"$STATE/sysctl.orig"
    rm -f "$STATE/sysctl.orig"
}

guard_on() {
    iptables -t mangle -C FORWARD "${GUARD[@]}" 2>/dev/null || iptables -t mangle -I FORWARD "${GUARD[@]}"
}

guard_off() {
    while iptables -t mangle -C FORWARD "${GUARD[@]}" 2>/dev/null; do
        iptables -t mangle -D FORWARD "${GUARD[@]}"
    done
}

# --- up ------------------------------------------------------------------

packages() {
    local need=()
    for p in docker.io debootstrap socat conntrack iptables gcc libc6-dev openssl curl iproute2 python3; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if ((${#need[@]})); then
        log "installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
}

docker_up() {
    if running_pid dockerd >/dev/null; then return 0; fi
    if [ -S /var/run/docker.sock ] && /usr/bin/docker info >/dev/null 2>&1; then
        die "a docker daemon not started by node.sh already runs; stop it or use another cluster"
    fi
    mkdir -p "$STATE/docker"
    # Every registry pull goes to a dead local proxy: nothing is fetched from outside.
    start_daemon dockerd env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
        NO_PROXY=localhost,127.0.0.1 /usr/sbin/dockerd --data-root "$STATE/docker" \
        --pidfile "$RUN/dockerd.docker-pid" --storage-driver overlay2 \
        --exec-opt native.cgroupdriver=cgroupfs --bip "$NODE_IP/16" --userland-proxy=false
    # env execs dockerd: the process to recognise is dockerd.
    echo "/usr/sbin/dockerd --data-root" >"$RUN/dockerd.cmd"
    until_ok 60 "dockerd" /usr/bin/docker info
}

control_plane_up() {
    mkdir -p "$STATE/etcd"
    start_daemon etcd /usr/bin/etcd --name walden-node --data-dir "$STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
        --initial-cluster walden-node=http://127.0.0.1:12380 --listen-metrics-urls http://127.0.0.1:12381
    start_daemon kube-apiserver "$KBIN/kube-apiserver" \
        --advertise-address="$NODE_IP" --bind-address="$NODE_IP" --secure-port=6443 --insecure-port=0 \
        --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
        --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
        --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
        --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
        --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction --allow-privileged=true \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key"
    until_ok 120 "kube-apiserver /readyz" curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" \
        --key "$PKI/admin.key" "https://$NODE_IP:6443/readyz"
    kctl apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: walden-node-dns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kube-dns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: walden-dns}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: walden-node-storage}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:persistent-volume-provisioner"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: walden-storage}]
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: walden.local/hostpath
reclaimPolicy: Delete
volumeBindingMode: WaitForFirstConsumer
EOF
    start_daemon kube-controller-manager "$KBIN/kube-controller-manager" \
        --kubeconfig="$CONF/controller-manager.kubeconfig" \
        --authentication-kubeconfig="$CONF/controller-manager.kubeconfig" \
        --authorization-kubeconfig="$CONF/controller-manager.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port=10257 --port=0 --leader-elect=false \
        --use-service-account-credentials --service-account-private-key-file="$PKI/sa.key" \
        --root-ca-file="$PKI/ca.crt" --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
        --controllers='*,bootstrapsigner,tokencleaner'
    start_daemon kube-scheduler "$KBIN/kube-scheduler" --kubeconfig="$CONF/scheduler.kubeconfig" \
        --authentication-kubeconfig="$CONF/scheduler.kubeconfig" --authorization-kubeconfig="$CONF/scheduler.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port=10259 --port=0 --leader-elect=false
}

helpers_up() {
    mkdir -p "$STATE/pv"
    start_daemon dns python3 "$HERE/node/dns.py" --listen "$NODE_IP" --server "https://$NODE_IP:6443" \
        --ca "$PKI/ca.crt" --cert "$PKI/dns.crt" --key "$PKI/dns.key"
    start_daemon provisioner python3 "$HERE/node/provisioner.py" --root "$STATE/pv" \
        --server "https://$NODE_IP:6443" --ca "$PKI/ca.crt" --cert "$PKI/storage.crt" --key "$PKI/storage.key"
}

node_up() {
    write_if_changed "$CONF/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$CONF/kube-proxy.kubeconfig"}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: 172.17.0.0/16
nodePortAddresses: ["$NODE_IP/32"]
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0}
EOF
    start_daemon kube-proxy "$KBIN/kube-proxy" --config="$CONF/kube-proxy.yaml"
    echo "nameserver $NODE_IP" | write_if_changed "$CONF/resolv.conf"
    write_if_changed "$CONF/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
tlsCertFile: "$PKI/kubelet-serving.crt"
tlsPrivateKeyFile: "$PKI/kubelet-serving.key"
cgroupDriver: cgroupfs
failSwapOn: false
clusterDNS: ["$NODE_IP"]
clusterDomain: cluster.local
resolvConf: "$CONF/resolv.conf"
# Local images can never be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {nodefs.available: "1%", imagefs.available: "1%", memory.available: 100Mi}
EOF
    mkdir -p "$STATE/kubelet"
    start_daemon kubelet "$KBIN/kubelet" --config="$CONF/kubelet.yaml" --kubeconfig="$CONF/kubelet.kubeconfig" \
        --container-runtime=docker --pod-infra-container-image=local/pause:3.4 \
        --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --root-dir="$STATE/kubelet"
    until_ok 60 "kubelet healthz" curl -sf http://127.0.0.1:10248/healthz
    until_ok 120 "node $NODE_NAME Ready" node_ready
    until_ok 60 "the default ServiceAccount" kctl -n default get serviceaccount default
}

kctl() { "$KBIN/kubectl" --kubeconfig "$CONF/admin.kubeconfig" "$@"; }

node_ready() {
    [ "$(kctl get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

up() {
    [ "$(id -u)" = 0 ] || die "needs root (dockerd, kubelet and iptables)"
    mkdir -p "$STATE" "$LOGS" "$RUN" "$CONF"
    packages
    bash "$REPO/.ci/kube-apiserver.sh" >/dev/null
    pki
    record_sysctls
    docker_up
    guard_on
    WALDEN_NODE_DIR="$DIR" bash "$HERE/images.sh" node
    control_plane_up
    helpers_up
    node_up
    log "up in $((SECONDS - started))s"
    echo "KUBECONFIG=$KUBECONFIG_OUT"
}

# --- down ----------------------------------------------------------------

down() {
    [ "$(id -u)" = 0 ] || die "needs root"
    local purge=${1:-}
    mkdir -p "$RUN"
    stop_daemon kubelet
    if running_pid dockerd >/dev/null; then
        # Pod containers (kubelet labels them); other containers are left alone.
        local ids
        ids=$(/usr/bin/docker ps -aq --filter label=io.kubernetes.docker.type)
        [ -z "$ids" ] || /usr/bin/docker rm -f $ids >/dev/null
    fi
    if running_pid kube-proxy >/dev/null; then
        stop_daemon kube-proxy
        "$KBIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
    fi
    # Chains kubelet creates for its own use.
    for table in filter nat; do
        for chain in KUBE-FIREWALL KUBE-MARK-DROP KUBE-MARK-MASQ KUBE-POSTROUTING KUBE-KUBELET-CANARY KUBE-PROXY-CANARY; do
            { iptables -t "$table" -S 2>/dev/null || true; } | { grep -- "-j $chain\b" || true; } |
                sed 's/^-A /-D /' | while read -r rule; do
                    eval iptables -t "$table" "$rule" 2>/dev/null || true
                done
            iptables -t "$table" -F "$chain" 2>/dev/null && iptables -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
    for name in provisioner dns kube-scheduler kube-controller-manager kube-apiserver etcd; do
        stop_daemon "$name"
    done
    stop_daemon dockerd 60
    guard_off
    restore_sysctls
    if [ "$purge" = --purge ]; then
        log "purging the cluster's state"
        if [ -d "$STATE/kubelet" ]; then
            # Pod volumes under the kubelet's root, then the root itself (deepest first).
            { grep -E " $STATE/kubelet(/| )" /proc/mounts || true; } | cut -d' ' -f2 | sort -r |
                while read -r m; do
                    umount "$m" 2>/dev/null || umount -l "$m"
                done
        fi
        rm -rf "$STATE/etcd" "$STATE/kubelet" "$STATE/pv" "$PKI" "$CONF" "$KUBECONFIG_OUT"
    fi
    log "down in $((SECONDS - started))s"
}

status() {
    for name in dockerd etcd kube-apiserver kube-controller-manager kube-scheduler dns provisioner kube-proxy kubelet; do
        if pid=$(running_pid "$name"); then echo "$name running ($pid)"; else echo "$name stopped"; fi
    done
}

case "${1:-}" in
    up) up ;;
    # dockerd and the node's images only (e.g. while the binaries still build).
    images) mkdir -p "$STATE" "$LOGS" "$RUN" "$CONF"; packages; record_sysctls; docker_up; guard_on
            WALDEN_NODE_DIR="$DIR" bash "$HERE/images.sh" node ;;
    down) down "${2:-}" ;;
    status) status ;;
    *) echo "usage: $0 up|down [--purge]|status" >&2; exit 2 ;;
esac
