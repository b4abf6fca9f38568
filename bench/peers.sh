#!/usr/bin/env bash
# Runs the peer harness (../shared/bench/peers.sh: pgBackRest, barman-cloud,
# WAL-E, pg_basebackup, raw tar|zstd on the same data and S3 server) with
# Walden as extra columns: walden_file (file://) and walden_s3 (s3:// on the
# harness's s3s-fs). Arguments go to peers.sh, e.g.
#   bash bench/peers.sh all
#   TOOLSET="raw_zstd1 pgbr_posix_z1_p2 pgbr_s3_z1_p2" SKIP_WAL=1 REPEATS=2 bash bench/peers.sh bench
# Everything runs on 127.0.0.1 (ports from 19100). Run as root.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/bench/peers.sh}
[ -f "$PEERS" ] || { echo "peer harness not found at $PEERS (set PEERS=...)" >&2; exit 1; }

# WALDEN_BIN: a walden binary to measure; by default a release build of this tree.
BIN=${WALDEN_BIN:-}
if [ -z "$BIN" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/walden-ci/target}
  (cd "$ROOT" && cargo build --release -q -p walden)
  BIN=$CARGO_TARGET_DIR/release/walden
  chmod o+rx "$CARGO_TARGET_DIR" "$CARGO_TARGET_DIR/release" 2>/dev/null || true
fi

# The harness archives its own WAL with cp, so Walden's backups skip the
# check that their WAL reached Walden's archive (like pgBackRest's archive-check=n).
common='WALDEN_BACKUP_NO_ARCHIVE_CHECK=1 WALDEN_LOG=warn'
export EXTRA_TOOLS="${EXTRA_TOOLS:-walden_file walden_s3}"

export walden_file_LABEL="Walden file zstd1 p2"
export walden_file_ENV="export $common WALDEN_STORAGE=file://\$W/repo/\$ID"
export walden_file_CLEAN='rm -rf "$W/repo/$ID"'
export walden_file_SIZE='du -sb "$W/repo/$ID" | cut -f1'

export walden_s3_LABEL="Walden s3 zstd1 p2"
export walden_s3_ENV="export $common WALDEN_STORAGE=s3://\$BUCKET/\$ID WALDEN_S3_ENDPOINT=\$S3_ENDPOINT WALDEN_S3_PATH_STYLE=true AWS_EC2_METADATA_DISABLED=true"
export walden_s3_CLEAN='rm -rf "$W/s3/$BUCKET/$ID"'

for id in walden_file walden_s3; do
  export "${id}_BACKUP_PUSH=$BIN backup-push --pgdata \"\$PGDATA\""
  export "${id}_BACKUP_FETCH=$BIN restore \"\$DEST\""
  export "${id}_WAL_PUSH=$BIN wal-push %p"
  export "${id}_WAL_FETCH=$BIN wal-fetch %f %p"
  export "${id}_NOOP=$BIN --version"
done

exec bash "$PEERS" "$@"
