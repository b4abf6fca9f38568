#!/usr/bin/env bash
# Builds Kubernetes v1.20.2 from Debian's `kubernetes` source package and
# installs etcd: the kube-apiserver for the operator's integration tests, and
# the other five binaries of a single node (kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy, kubectl) for the cluster suite
# (e2e/cluster/node.sh). All six come from one `go build`, version-stamped
# (Helm's kubeVersion checks and kubectl's skew logic read the version), with
# the kubelet change of e2e/cluster/node/kubelet-oom.sh applied as a build
# overlay (the source tree itself is never modified).
#
# Idempotent: every step is skipped when its result already exists; the
# binaries are cached under $WALDEN_KUBE_CACHE (default /var/tmp/walden-ci/kube)
# with a cache key (source package, overlay, flags, Go version) in bin/.key.
#
# Prints the binary paths and records them in $WALDEN_KUBE_CACHE/paths.env,
# which the tests read when WALDEN_KUBE_APISERVER / WALDEN_ETCD are not set.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${WALDEN_KUBE_CACHE:-/var/tmp/walden-ci/kube}"
BIN="$CACHE/bin"
APISERVER="$BIN/kube-apiserver"
SRC_LIST=/etc/apt/sources.list.d/walden-debian-src.sources
CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
VERSION=v1.20.2
OVERLAY_SCRIPT="$HERE/../e2e/cluster/node/kubelet-oom.sh"
started=$(date +%s)

log() { echo "kube-apiserver.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

mkdir -p "$BIN"

# The cache key: what the binaries are made of. A binary set built from
# anything else (an older script, an unstamped build) is rebuilt.
cache_key() {
    {
        echo "$VERSION ${CMDS[*]}"
        cat "$OVERLAY_SCRIPT"
        ls "$CACHE"/source/kubernetes_*.dsc 2>/dev/null | xargs -r -n1 basename
        command -v go >/dev/null && go version
    } | sha256sum | cut -d' ' -f1
}

all_built() {
    for c in "${CMDS[@]}"; do [ -x "$BIN/$c" ] || return 1; done
    [ -f "$BIN/.key" ] && [ "$(cat "$BIN/.key")" = "$(cache_key)" ]
}

# etcd and the Go toolchain come from Debian; rsync is needed by the
# kubernetes Makefile; reflect2 1.0.2 replaces the vendored 1.0.1, which
# crashes on the first custom-resource create under Go >= 1.18.
need_pkgs=()
for p in golang-go etcd-server rsync golang-github-modern-go-reflect2-dev dpkg-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done

if ! all_built || [ "${#need_pkgs[@]}" -gt 0 ]; then
    # A deb822 twin of the machine's bookworm stanza with Types: deb-src. A
    # one-line deb-src entry would conflict on Signed-By and break apt.
    if [ ! -f "$SRC_LIST" ]; then
        # The first stanza of the machine's own Debian sources, as Types: deb-src
        # (same URIs and Signed-By), limited to the release suite.
        log "adding $SRC_LIST"
        awk 'BEGIN{RS=""; ORS="\n"} NR==1 {
               n = split($0, lines, "\n")
               for (i = 1; i <= n; i++) {
                 if (lines[i] ~ /^Types:/) print "Types: deb-src"
                 else if (lines[i] ~ /^Suites:/) { split(lines[i], w, " "); print "Suites: " w[2] }
                 else if (lines[i] !~ /^#/) print lines[i]
               }
             }' /etc/apt/sources.list.d/debian.sources | as_root tee "$SRC_LIST" >/dev/null
        as_root apt-get update -qq
    fi
    if [ "${#need_pkgs[@]}" -gt 0 ]; then
        log "installing ${need_pkgs[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
    fi
fi

if ! all_built; then
    GOPATH="$CACHE/gopath"
    TREE="$GOPATH/src/k8s.io/kubernetes"
    mkdir -p "$CACHE/source" "$GOPATH/src/k8s.io"
    if [ ! -d "$CACHE/source/tree" ]; then
        log "downloading the kubernetes source package"
        ( cd "$CACHE/source" && apt-get source --download-only kubernetes >/dev/null )
        dsc=$(ls "$CACHE"/source/kubernetes_*.dsc | head -n1)
        rm -rf "$CACHE/source/tree.tmp"
        dpkg-source --no-check -x "$dsc" "$CACHE/source/tree.tmp" >/dev/null
        mv "$CACHE/source/tree.tmp" "$CACHE/source/tree"
    fi
    ln -sfn "$CACHE/source/tree" "$TREE"

    reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
    vendored="$TREE/vendor/github.com/modern-go/reflect2"
    if [ -d "$reflect2" ] && ! cmp -s "$reflect2/reflect2.go" "$vendored/reflect2.go"; then
        log "replacing vendored reflect2 with Debian's copy"
        rm -rf "$vendored"
        cp -rL "$reflect2" "$vendored"
    fi

    # GOPATH mode: the 1.20 tree predates a usable go.mod for this build.
    export GOPATH GO111MODULE=off GOCACHE="$CACHE/gocache"
    cd "$TREE"
    if [ ! -f "$CACHE/.generated" ]; then
        log "make generated_files"
        make generated_files >"$CACHE/generated_files.log" 2>&1 || {
            tail -n 50 "$CACHE/generated_files.log" >&2; exit 1; }
        touch "$CACHE/.generated"
    fi

    # The kubelet change, as replacement files named in an overlay.json.
    overlay="$CACHE/overlay"
    bash "$OVERLAY_SCRIPT" "$TREE" "$overlay"

    vpkg=k8s.io/kubernetes/vendor/k8s.io
    ldflags="-s -w"
    for p in "$vpkg/component-base/version" "$vpkg/client-go/pkg/version"; do
        ldflags+=" -X $p.gitVersion=$VERSION -X $p.gitMajor=1 -X $p.gitMinor=20"
        ldflags+=" -X $p.gitTreeState=archive -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    key=$(cache_key)
    log "go build ${CMDS[*]} ($VERSION)"
    rm -rf "$BIN/.new" && mkdir -p "$BIN/.new"
    pkgs=()
    for c in "${CMDS[@]}"; do pkgs+=("./cmd/$c"); done
    go build -overlay "$overlay/overlay.json" -ldflags "$ldflags" -o "$BIN/.new/" "${pkgs[@]}"
    # Replace each binary atomically: running processes keep their copy.
    for c in "${CMDS[@]}"; do mv "$BIN/.new/$c" "$BIN/$c"; done
    rmdir "$BIN/.new"
    echo "$key" >"$BIN/.key"
else
    log "cached: ${CMDS[*]} in $BIN"
fi

ETCD=$(command -v etcd || echo /usr/bin/etcd)
cat >"$CACHE/paths.env" <<PATHS
WALDEN_KUBE_APISERVER=$APISERVER
WALDEN_KUBE_BIN=$BIN
WALDEN_ETCD=$ETCD
PATHS
log "done in $(( $(date +%s) - started ))s"
cat "$CACHE/paths.env"
