# columns.sh - Walden's columns for the peer harness; sourced by bench/peers.sh.
# Needs BIN (the walden binary) and HERE (this folder). Every value is a template that
# the harness expands later, as the postgres user, after the column's ID_ENV (so $W, $ID,
# $BUCKET, $S3_ENDPOINT, $S3_PORT stay literal here).
#
#   walden_file, walden_s3               one walden process per call, as documented for
#                                        archive_command / restore_command
#   walden_file_daemon, walden_s3_daemon the thin client (`walden wal-push|wal-fetch` with
#                                        WALDEN_SOCKET) handing each call to `walden daemon`:
#                                        parallel archiving of .ready files, prefetch on fetch.
#                                        WAL rows only (backups do not go through the socket).
#
# The daemon of a column is not a child of the harness's archiver loop, so bench/daemon.sh
# starts it (ID_SETUP), stops it (ID_CLEAN) and books its own CPU and peak RSS per phase:
# backlog push, trickle push, fetch (the fetch command marks the phase change on its
# first call and stops the daemon after the last segment; two cheap `test -e` per call).
# shellcheck shell=bash disable=SC2016  # single quotes: expanded later by the harness

# The harness archives its own WAL with cp, so Walden's backups skip the check that
# their WAL reached Walden's archive (like pgBackRest's archive-check=n).
common='WALDEN_BACKUP_NO_ARCHIVE_CHECK=1 WALDEN_LOG=warn'
file_storage='WALDEN_STORAGE=file://$W/repo/$ID'
s3_storage='WALDEN_STORAGE=s3://$BUCKET/$ID WALDEN_S3_ENDPOINT=$S3_ENDPOINT WALDEN_S3_PATH_STYLE=true AWS_EC2_METADATA_DISABLED=true'
daemon_vars='WALDEN_BENCH_D=$W/walden-daemon/$ID WALDEN_SOCKET=$W/walden-daemon/$ID/sock WALDEN_STATE_DIR=$W/walden-daemon/$ID/state'
DAEMON="bash $HERE/daemon.sh"

export walden_file_LABEL="Walden file zstd1 p2"
export walden_file_ENV="export $common $file_storage"
export walden_file_CLEAN='rm -rf "$W/repo/$ID"'
export walden_file_SIZE='du -sb "$W/repo/$ID" | cut -f1'

export walden_s3_LABEL="Walden s3 zstd1 p2"
export walden_s3_ENV="export $common $s3_storage"
export walden_s3_CLEAN='rm -rf "$W/s3/$BUCKET/$ID"'

for id in walden_file walden_s3; do
  export "${id}_BACKUP_PUSH=$BIN backup-push --pgdata \"\$PGDATA\""
  export "${id}_BACKUP_FETCH=$BIN restore \"\$DEST\""
  export "${id}_WAL_PUSH=$BIN wal-push %p"
  export "${id}_WAL_FETCH=$BIN wal-fetch %f %p"
  export "${id}_NOOP=$BIN --version"
done

# daemon columns: HTTP API on S3_PORT+11 / +12 (127.0.0.1), socket and state under $W/walden-daemon/$ID
export walden_file_daemon_LABEL="Walden file daemon (p4, prefetch 8)"
export walden_file_daemon_ENV="export $common $file_storage $daemon_vars WALDEN_BENCH_BIN=$BIN WALDEN_LISTEN=127.0.0.1:\$((S3_PORT + 11))"
export walden_file_daemon_CLEAN="$DAEMON stop; rm -rf \"\$W/repo/\$ID\""
export walden_s3_daemon_LABEL="Walden s3 daemon (p4, prefetch 8)"
export walden_s3_daemon_ENV="export $common $s3_storage $daemon_vars WALDEN_BENCH_BIN=$BIN WALDEN_LISTEN=127.0.0.1:\$((S3_PORT + 12))"
export walden_s3_daemon_CLEAN="$DAEMON stop; rm -rf \"\$W/s3/\$BUCKET/\$ID\""

for id in walden_file_daemon walden_s3_daemon; do
  export "${id}_SETUP=$DAEMON start"
  export "${id}_WAL_BACKLOG=1"
  export "${id}_WAL_PUSH=$BIN wal-push %p"
  # walloop.py runs this through sh -c with %f/%p replaced; no single quotes allowed here
  export "${id}_WAL_FETCH=[ -e \"\$WALDEN_BENCH_D/mark.walfetch\" ] || $DAEMON mark walfetch; \
$BIN wal-fetch %f %p && { [ ! -e \"\$WALDEN_BENCH_D/last.%f\" ] || $DAEMON stop --nowait; }"
done

WALDEN_IDS="walden_file walden_s3 walden_file_daemon walden_s3_daemon"
export WALDEN_IDS
