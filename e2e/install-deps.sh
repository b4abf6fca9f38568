#!/usr/bin/env bash
# Installs what Walden's tests need, idempotently: PostgreSQL 15 (Debian's
# postgresql-15), strace, and the S3-compatible test server s3s-fs (built from
# crates.io once, cached under /var/tmp/walden-ci/tools), and the PostgreSQL 14,
# 16, 17 and 18 servers of the version matrix (install-pg-versions.sh).
# WALDEN_DEPS=postgres installs PostgreSQL 15 only (enough for the local demo).
set -euo pipefail

TOOLS=${WALDEN_TOOLS:-/var/tmp/walden-ci/tools}
need=()
for pkg in postgresql-15 postgresql-client-15 strace; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "install-deps: installing ${need[*]}"
  if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

for tool in cargo rustfmt cargo-clippy; do
  command -v "$tool" >/dev/null || { echo "install-deps: $tool is missing (install Rust with rustfmt and clippy)" >&2; exit 1; }
done

if [ "${WALDEN_DEPS:-all}" = postgres ]; then exit 0; fi
if [ ! -x "$TOOLS/bin/s3s-fs" ]; then
  echo "install-deps: building s3s-fs 0.14.1 into $TOOLS"
  cargo install s3s-fs --version 0.14.1 --features binary --locked --root "$TOOLS"
fi
bash "$(dirname "$0")/install-pg-versions.sh"
echo "install-deps: PostgreSQL $(/usr/lib/postgresql/15/bin/postgres --version | awk '{print $3}'), $("$TOOLS/bin/s3s-fs" --version)"
