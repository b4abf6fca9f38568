# syntax=docker/dockerfile:1
#
# Images of Walden, one file with two targets:
#   docker build --target walden          -t walden:0.1.0 .
#   docker build --target walden-operator -t walden-operator:0.1.0 .
#
# Both binaries are linked statically (musl), so the final images are
# distroless "static" ones (no shell, no libc), run as a non-root user, and the
# walden binary also runs inside any postgres image (Debian or Alpine) after the
# operator's init container copies it to /walden/bin.
#
# Reproducible builds: pin the base images (by digest in release builds), build
# from Cargo.lock (--locked), pass SOURCE_DATE_EPOCH (e.g. the commit time) and
# VERSION/REVISION; paths are remapped so the build directory leaves no trace.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# musl for static binaries; cmake and clang for the C parts of the crypto and
# zstd crates.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools cmake clang \
 && rm -rf /var/lib/apt/lists/*
ARG TARGETARCH
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl > /rust-target ;; \
      arm64) echo aarch64-unknown-linux-musl > /rust-target ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY . .
ARG SOURCE_DATE_EPOCH=0
ENV SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH} \
    CARGO_INCREMENTAL=0 \
    CARGO_TERM_COLOR=never \
    RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=/src=/walden --remap-path-prefix=/usr/local/cargo=/cargo"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(cat /rust-target)" \
 && cargo build --release --locked --target "$target" -p walden -p walden-operator --bins \
 && mkdir -p /out \
 && install -m 0755 "target/$target/release/walden" "target/$target/release/walden-operator" /out/ \
 && /out/walden --version && /out/walden-operator --version

# The engine and sidecar. The operator's init containers run
# `/usr/local/bin/walden install /walden/bin`; sidecars run `walden daemon`.
FROM gcr.io/distroless/static-${DEBIAN_RELEASE}12:nonroot AS walden
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="walden" \
      org.opencontainers.image.description="Walden engine and sidecar: WAL archiving, base backups, restore" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/walden /usr/local/bin/walden
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/walden"]

# The operator. The chart passes `run` and its flags as args.
FROM gcr.io/distroless/static-${DEBIAN_RELEASE}12:nonroot AS walden-operator
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="walden-operator" \
      org.opencontainers.image.description="Walden operator: ContinuousBackup, Fork, Follower" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/walden-operator /usr/local/bin/walden-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/walden-operator"]
