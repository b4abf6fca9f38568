#!/usr/bin/env bash
# Images for the single-node cluster and the cluster suite, built without a
# registry into the node's docker (e2e/cluster/node.sh starts it):
#
#   images.sh node           local/pause:3.4, local/debian:bookworm,
#                            postgres:15 (= local/postgres:15), local/s3s-fs:0.14.1
#   images.sh walden TAG     walden/walden:TAG and walden/walden-operator:TAG from
#                            the workspace's binaries in $WALDEN_BIN_DIR
#                            (default $CARGO_TARGET_DIR/debug: the build CI already has)
#
# Each image carries a label with the hash of what it is made of and is only
# rebuilt when that changes. Debian's packages come from the machine's own
# apt sources (debootstrap and a chroot on the host; image builds need no
# network). The release Dockerfile at the repository root (static musl,
# distroless, multi-arch) is for published images; it needs a registry
# (rust:, distroless bases) and BuildKit, neither of which exists here.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${WALDEN_NODE_DIR:-/var/tmp/walden-ci/node}"
WORK="$DIR/images"
DOCKER=/usr/bin/docker
MIRROR=http://deb.debian.org/debian
started=$SECONDS

log() { echo "images.sh: $*" >&2; }

key_of() { cat "$@" | sha256sum | cut -c1-16; }

# True when image $1 exists with key $2.
current() {
    [ "$($DOCKER image inspect -f '{{index .Config.Labels "walden.key"}}' "$1" 2>/dev/null)" = "$2" ]
}

pause_image() {
    local key
    key=$(key_of "$HERE/node/pause.c")
    current local/pause:3.4 "$key" && return 0
    log "local/pause:3.4"
    local d="$WORK/pause"
    rm -rf "$d" && mkdir -p "$d"
    gcc -Os -static -o "$d/pause" "$HERE/node/pause.c"
    tar -C "$d" -c pause | $DOCKER import --change 'ENTRYPOINT ["/pause"]' \
        --change "LABEL walden.key=$key" - local/pause:3.4 >/dev/null
}

# A minimal bookworm root file system, debootstrapped once.
debian_rootfs() {
    local root="$WORK/rootfs/debian"
    [ -f "$root/.done" ] && return 0
    log "debootstrap bookworm (minbase) from $MIRROR"
    rm -rf "$root" && mkdir -p "$(dirname "$root")"
    debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
    cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/debian.sources"
    rm -f "$root/etc/apt/sources.list"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    touch "$root/.done"
}

debian_image() {
    debian_rootfs
    local key
    key=$(echo "bookworm minbase $MIRROR" | key_of)
    current local/debian:bookworm "$key" && return 0
    log "local/debian:bookworm"
    tar --numeric-owner --exclude=./.done -C "$WORK/rootfs/debian" -c . |
        $DOCKER import --change "LABEL walden.key=$key" - local/debian:bookworm >/dev/null
}

# Debian's postgresql-15 in a copy of the rootfs, user postgres = 999:999 as
# in the official image.
postgres_image() {
    local key
    key=$(key_of "$HERE/images/postgres/Dockerfile" "$HERE/images/postgres/docker-entrypoint.sh" "$0")
    current postgres:15 "$key" && current local/postgres:15 "$key" && return 0
    local root="$WORK/rootfs/postgres"
    if [ ! -f "$root/.done" ]; then
        log "installing postgresql-15 into $root"
        rm -rf "$root"
        cp -a "$WORK/rootfs/debian" "$root"
        rm -f "$root/.done"
        cp /etc/resolv.conf "$root/etc/resolv.conf"
        printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
        chmod +x "$root/usr/sbin/policy-rc.d"
        mkdir -p "$root/etc/postgresql-common"
        echo "create_main_cluster = false" >"$root/etc/postgresql-common/createcluster.conf"
        mount -t proc proc "$root/proc"
        # shellcheck disable=SC2064 # the path is fixed now
        trap "umount '$root/proc' 2>/dev/null || true" EXIT
        chroot "$root" /bin/sh -ec '
            groupadd -r postgres --gid=999
            useradd -r -g postgres --uid=999 --home-dir=/var/lib/postgresql --shell=/bin/bash postgres
            mkdir -p /var/lib/postgresql && chown postgres:postgres /var/lib/postgresql
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                postgresql-15 postgresql-client-15 ca-certificates >/dev/null
            sed -ri "s/^#?(listen_addresses)\s*=\s*\S+.*/\1 = '"'"'*'"'"'/" \
                /usr/share/postgresql/15/postgresql.conf.sample
            grep -q "^listen_addresses = '"'"'\*'"'"'" /usr/share/postgresql/15/postgresql.conf.sample
            mkdir -p /var/run/postgresql /var/lib/postgresql/data /docker-entrypoint-initdb.d
            chown -R postgres:postgres /var/run/postgresql /var/lib/postgresql
            chmod 3777 /var/run/postgresql
            chmod 1777 /var/lib/postgresql/data
            apt-get clean
            rm -rf /var/lib/apt/lists/*' >"$WORK/postgres-chroot.log" 2>&1 || {
            umount "$root/proc"; tail -n 30 "$WORK/postgres-chroot.log" >&2; exit 1; }
        umount "$root/proc"
        trap - EXIT
        rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
        touch "$root/.done"
    fi
    log "postgres:15"
    tar --numeric-owner --exclude=./.done --exclude=./proc/* -C "$root" -c . |
        $DOCKER import - local/postgres-rootfs:15 >/dev/null
    DOCKER_BUILDKIT=0 $DOCKER build -q --label "walden.key=$key" -t local/postgres:15 \
        "$HERE/images/postgres" >/dev/null
    $DOCKER tag local/postgres:15 postgres:15
}

# A small image of one binary on local/debian:bookworm.
binary_image() { # tag binary user entrypoint-args...
    local tag=$1 bin=$2 user=$3; shift 3
    local key
    local roots="$WORK/rootfs/postgres/etc/ssl/certs/ca-certificates.crt"
    [ -f "$roots" ] || { log "$roots is missing (images.sh node builds it)"; exit 1; }
    key=$(key_of "$bin" "$roots" <(echo "$user $*"))
    current "$tag" "$key" && return 0
    log "$tag from $bin"
    local ctx
    ctx=$(mktemp -d)
    cp "$bin" "$ctx/"
    # Debian's CA roots (from the postgres rootfs), as the distroless release
    # base has them: the AWS SDK refuses to start without any, even for an
    # http:// endpoint.
    cp "$roots" "$ctx/"
    local entry
    entry=$(printf '"%s",' "/usr/local/bin/$(basename "$bin")" "$@")
    cat >"$ctx/Dockerfile" <<EOF
FROM local/debian:bookworm
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY $(basename "$bin") /usr/local/bin/$(basename "$bin")
USER $user
ENTRYPOINT [${entry%,}]
EOF
    DOCKER_BUILDKIT=0 $DOCKER build -q --label "walden.key=$key" -t "$tag" "$ctx" >/dev/null
    rm -rf "$ctx"
}

mkdir -p "$WORK"
case "${1:-}" in
    node)
        pause_image
        debian_image
        postgres_image
        s3s=${WALDEN_S3S_FS:-/var/tmp/walden-ci/tools/bin/s3s-fs}
        [ -x "$s3s" ] || { log "s3s-fs is missing at $s3s (e2e/install-deps.sh builds it)"; exit 1; }
        binary_image local/s3s-fs:0.14.1 "$s3s" 65532:65532
        ;;
    walden)
        tag=${2:?usage: images.sh walden TAG}
        bins=${WALDEN_BIN_DIR:-${CARGO_TARGET_DIR:-/var/tmp/walden-ci/target}/debug}
        for b in walden walden-operator; do
            [ -x "$bins/$b" ] || { log "$bins/$b is missing (cargo build -p walden -p walden-operator --bins)"; exit 1; }
        done
        binary_image "walden/walden:$tag" "$bins/walden" 65532:65532
        binary_image "walden/walden-operator:$tag" "$bins/walden-operator" 65532:65532
        ;;
    *) echo "usage: $0 node | walden TAG" >&2; exit 2 ;;
esac
log "images ready in $((SECONDS - started))s"
