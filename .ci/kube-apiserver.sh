#!/usr/bin/env bash
# Builds a real kube-apiserver (Debian's kubernetes 1.20.2 source package) and
# installs etcd, for the operator's integration tests. Idempotent: every step
# is skipped when its result already exists, and the built binary is cached
# under $WALDEN_KUBE_CACHE (default /var/tmp/walden-ci/kube).
#
# Prints the binary paths and records them in $WALDEN_KUBE_CACHE/paths.env,
# which the tests read when WALDEN_KUBE_APISERVER / WALDEN_ETCD are not set.
set -euo pipefail

CACHE="${WALDEN_KUBE_CACHE:-/var/tmp/walden-ci/kube}"
APISERVER="$CACHE/bin/kube-apiserver"
SRC_LIST=/etc/apt/sources.list.d/walden-debian-src.sources
started=$(date +%s)

log() { echo "kube-apiserver.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

mkdir -p "$CACHE/bin"

# etcd and the Go toolchain come from Debian; rsync is needed by the
# kubernetes Makefile; reflect2 1.0.2 replaces the vendored 1.0.1, which
# crashes on the first custom-resource create under Go >= 1.18.
need_pkgs=()
for p in golang-go etcd-server rsync golang-github-modern-go-reflect2-dev dpkg-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done

if [ ! -x "$APISERVER" ] || [ "${#need_pkgs[@]}" -gt 0 ]; then
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

if [ ! -x "$APISERVER" ]; then
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
    log "go build ./cmd/kube-apiserver"
    go build -o "$APISERVER.tmp" ./cmd/kube-apiserver
    mv "$APISERVER.tmp" "$APISERVER"
else
    log "cached: $APISERVER"
fi

ETCD=$(command -v etcd || echo /usr/bin/etcd)
cat >"$CACHE/paths.env" <<PATHS
WALDEN_KUBE_APISERVER=$APISERVER
WALDEN_ETCD=$ETCD
PATHS
log "done in $(( $(date +%s) - started ))s"
cat "$CACHE/paths.env"
