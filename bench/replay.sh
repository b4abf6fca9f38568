#!/usr/bin/env bash
# replay.sh - how long PostgreSQL takes to replay the same WAL from local disk and through
# Walden, one walden process per segment and through `walden daemon` (prefetch).
#
#   replay.sh setup  the primary, its archive and the base backup (once per work dir and size)
#   replay.sh run    setup, then REPEATS interleaved rounds of every variant
#   replay.sh stop   stop what this script started (Postgres, s3s-fs, daemons)
#
# Set-up, once per work dir $WR: a primary on port $PORT archives each WAL file three ways
# (a plain copy into $WR/local, `walden wal-push` to file:// and to s3:// on its own s3s-fs
# on port PORT+10); pgbench -i -s $REPLAY_SCALE; a base backup with `walden backup-push`
# (file://, archive check on); then pgbench TPC-B until >= $REPLAY_NSEG more segments.
# Each variant restores that one backup (`walden restore`, untimed) and times PostgreSQL
# from `pg_ctl start` until it has replayed the whole archive, promoted and logged "ready to
# accept connections"; also from the log: "starting archive recovery" to that line (without
# PostgreSQL's start-up fsync of the data directory) and "redo done ... elapsed":
#   pg_wal             the WAL copied into pg_wal beforehand, restore_command = false (floor)
#   local_cp           restore_command = cp from the local copy
#   walden_file        restore_command = walden wal-fetch, file://, one process per segment
#   walden_s3          the same on s3://
#   walden_file_daemon restore_command = thin client through `walden daemon` (prefetch 8)
#   walden_s3_daemon   the same on s3://
# Results in $WR/results: results.tsv (tool metric rep value), columns, segments.
# Knobs: WR, PORT (19500), REPEATS (3), REPLAY_SCALE (100), REPLAY_NSEG (64), WALDEN_BIN, TOOLS.
# Runs as root; Postgres, s3s-fs and the daemons run as postgres, on 127.0.0.1 only.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${WR:=/var/tmp/walden-peerbench/run-replay}" "${PORT:=19500}" "${REPEATS:=3}"
: "${REPLAY_SCALE:=100}" "${REPLAY_NSEG:=64}" "${TOOLS:=/var/tmp/walden-peerbench/tools}"
BIN=${WALDEN_BIN:?set WALDEN_BIN to the walden binary}
PGBIN=/usr/lib/postgresql/15/bin
S3_PORT=$((PORT + 10))
RES=$WR/results
VARIANTS="pg_wal local_cp walden_file walden_s3 walden_file_daemon walden_s3_daemon"
# the replay's own S3 test server and its throwaway keys (127.0.0.1 only)
S3ENV=(AWS_ACCESS_KEY_ID=walden-replay AWS_SECRET_ACCESS_KEY=walden-replay-secret
  AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true)
FILE_STORAGE="WALDEN_STORAGE=file://$WR/repo"
S3_STORAGE="WALDEN_STORAGE=s3://replay/wal WALDEN_S3_ENDPOINT=http://127.0.0.1:$S3_PORT WALDEN_S3_PATH_STYLE=true"

log() { printf '[%s] replay: %s\n' "$(date +%T)" "$*" >&2; }
as_pg() { runuser -u postgres -- env PATH=/usr/local/bin:/usr/bin:/bin "${S3ENV[@]}" WALDEN_LOG=warn "$@"; }
psql_p() { as_pg "$PGBIN/psql" -h "$WR/sock" -p "$PORT" -U postgres -d postgres -XAtq -c "$1"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RES/results.tsv"; }
now() { date +%s.%N; }

start_s3() {
  if [ -s "$WR/s3s.pid" ] && kill -0 "$(cat "$WR/s3s.pid")" 2>/dev/null; then return; fi
  as_pg mkdir -p "$WR/s3/replay"
  touch "$WR/s3s.pid"; chown postgres: "$WR/s3s.pid"
  # shellcheck disable=SC2016  # $$ is the inner shell's, which execs s3s-fs
  as_pg setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' - "$WR/s3s.pid" "$TOOLS/bin/s3s-fs" \
    --host 127.0.0.1 --port "$S3_PORT" --access-key walden-replay --secret-key walden-replay-secret \
    "$WR/s3" </dev/null >>"$WR/s3s.log" 2>&1 &
  local i
  for ((i = 0; i < 50; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && return; sleep 0.2; done
  echo "s3s-fs did not start (see $WR/s3s.log)" >&2; return 1
}

pg_running() { [ -s "$1/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }
pg_stop() { if pg_running "$1"; then as_pg "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 120 stop >/dev/null; fi; }

is_daemon() { case $1 in *_daemon) return 0 ;; *) return 1 ;; esac; }

# the daemon of a *_daemon variant: bench/daemon.sh with this replay's settings
daemon() {  # VARIANT REP ACTION
  local storage=$FILE_STORAGE d=$WR/daemon/$1
  case $1 in walden_s3*) storage=$S3_STORAGE ;; esac
  # shellcheck disable=SC2086  # $storage is a list of VAR=value words
  as_pg ID="$1" W="$WR" WALDEN_BENCH_D="$d" WALDEN_BENCH_RECORDS="$WR/daemon/records.tsv" \
    WALDEN_BENCH_PHASE=replay WALDEN_BENCH_REP="$2" WALDEN_BENCH_PGDATA="$WR/dest" WALDEN_BENCH_BIN="$BIN" \
    WALDEN_SOCKET="$d/sock" WALDEN_STATE_DIR="$d/state" WALDEN_LISTEN="127.0.0.1:$((PORT + 20))" \
    PGHOST="$WR/sock" PGPORT="$PORT" PGUSER=postgres $storage bash "$HERE/daemon.sh" "$3"
}

setup() {
  local want="scale=$REPLAY_SCALE nseg=$REPLAY_NSEG"
  if [ "$(cat "$WR/ready" 2>/dev/null)" = "$want" ]; then log "reusing the archive and backup in $WR"; return; fi
  do_stop
  rm -rf "$WR"; mkdir -p "$WR" "$RES"; chmod 755 "$WR"; chown postgres: "$WR"
  start_s3
  as_pg mkdir -p "$WR/sock" "$WR/local" "$WR/daemon"
  cat >"$WR/archive.sh" <<EOF
#!/bin/bash
# archive_command of the replay primary: a plain copy, then Walden file:// and s3://
set -e
cp "\$1" "$WR/local/\$2.tmp" && mv -f "$WR/local/\$2.tmp" "$WR/local/\$2"
$FILE_STORAGE $BIN wal-push "\$1"
$S3_STORAGE $BIN wal-push "\$1"
EOF
  chmod 755 "$WR/archive.sh"
  as_pg "$PGBIN/initdb" -D "$WR/primary" -U postgres -A trust >/dev/null
  cat >>"$WR/primary/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WR/sock'
shared_buffers = 1GB
max_wal_size = 8GB
checkpoint_timeout = 1h
synchronous_commit = off   # only makes pgbench write the WAL faster
wal_level = replica
archive_mode = on
archive_command = '$WR/archive.sh %p %f'
EOF
  as_pg "$PGBIN/pg_ctl" -D "$WR/primary" -l "$WR/primary.log" -w start >/dev/null
  log "pgbench -i -s $REPLAY_SCALE"
  as_pg "$PGBIN/pgbench" -h "$WR/sock" -p "$PORT" -U postgres -i -s "$REPLAY_SCALE" -q postgres >"$WR/pgbench-init.log" 2>&1
  psql_p "checkpoint"
  local first; first=$(psql_p "select pg_walfile_name(pg_current_wal_lsn())")
  log "base backup (walden backup-push, file://)"
  as_pg env "$FILE_STORAGE" PGHOST="$WR/sock" PGPORT="$PORT" PGUSER=postgres \
    "$BIN" backup-push --pgdata "$WR/primary" >>"$WR/backup.log" 2>&1
  # the WAL before the backup is not replayed by anyone: drop its local copies
  local f; for f in "$WR"/local/*; do if [[ $(basename "$f") < $first ]]; then rm -f "$f"; fi; done
  log "pgbench TPC-B until >= $REPLAY_NSEG segments"
  local lsn0; lsn0=$(psql_p "select pg_current_wal_lsn()")
  until [ "$(psql_p "select pg_current_wal_lsn() - '$lsn0' >= $REPLAY_NSEG * 16777216::numeric")" = t ]; do
    as_pg "$PGBIN/pgbench" -h "$WR/sock" -p "$PORT" -U postgres -n -c 4 -j 2 -T 10 postgres >>"$WR/pgbench-run.log" 2>&1
  done
  psql_p "select pg_switch_wal()" >/dev/null
  local i
  for ((i = 0; i < 1200; i++)); do
    [ -z "$(find "$WR/primary/pg_wal/archive_status" -name '*.ready')" ] && break; sleep 0.5
  done
  pg_stop "$WR/primary"
  echo "$want" >"$WR/ready"
}

restore_cmd() {  # VARIANT
  case $1 in
    pg_wal) echo "false" ;;
    local_cp) echo "cp $WR/local/%f %p" ;;
    walden_file) echo "$FILE_STORAGE $BIN wal-fetch %f %p" ;;
    walden_s3) echo "$S3_STORAGE $BIN wal-fetch %f %p" ;;
    *_daemon) echo "WALDEN_SOCKET=$WR/daemon/$1/sock $BIN wal-fetch %f %p" ;;
  esac
}

log_time() {  # TEXT LOGFILE: epoch seconds of the first log line holding TEXT
  local line; line=$(grep -m1 -F "$1" "$2" || true)
  [ -z "$line" ] || date -d "$(cut -d' ' -f1-3 <<<"$line")" +%s.%N
}

one() {  # VARIANT REP
  local v=$1 rep=$2 dest=$WR/dest lg=$WR/logs/$1.$2.log
  pg_stop "$dest"; rm -rf "$dest"; mkdir -p "$WR/logs"; chmod 777 "$WR/logs"; rm -f "$lg"
  as_pg env "$FILE_STORAGE" "$BIN" restore "$dest" --restore-command "$(restore_cmd "$v")" >>"$WR/restore.log" 2>&1
  # the copy must not archive into the primary's archive after its promotion
  printf "archive_mode = off\n" >>"$dest/postgresql.auto.conf"
  local start; start=$(sed -n 's/^START WAL LOCATION: .*(file \([0-9A-F]*\))$/\1/p' "$dest/backup_label")
  # WAL segments from the backup's start on: what every variant replays
  find "$WR/local" -maxdepth 1 -type f -printf '%f\n' | sort |
    awk -v s="$start" 'length($1) == 24 && $1 >= s' >"$WR/replayed"
  wc -l <"$WR/replayed" >"$RES/segments"
  if [ "$v" = pg_wal ]; then
    as_pg bash -c "cd '$WR/local' && xargs -a '$WR/replayed' cp -t '$dest/pg_wal/'"
  fi
  if is_daemon "$v"; then daemon "$v" "$rep" start; fi
  sync
  log "$v rep$rep"
  local t0 t1 ok=0 pm
  t0=$(now)
  as_pg "$PGBIN/pg_ctl" -D "$dest" -l "$lg" start >/dev/null
  while :; do
    if grep -q 'database system is ready to accept connections' "$lg" 2>/dev/null; then ok=1; break; fi
    pm=$(head -1 "$dest/postmaster.pid" 2>/dev/null || true)
    if [ -n "$pm" ] && ! kill -0 "$pm" 2>/dev/null; then break; fi
    if [ "$(echo "$(now) - $t0 > ${REPLAY_TIMEOUT:-1800}" | bc)" = 1 ]; then break; fi
    sleep 0.02
  done
  t1=$(now)
  if [ $ok = 1 ]; then
    record "$v" replay_wall_s "$rep" "$(echo "$t1 - $t0" | bc -l)"
    # from the first restore_command call to promoted, by the log's own clock: leaves out
    # PostgreSQL's start-up fsync of the data directory, which varies with unrelated disk I/O
    local a z
    a=$(log_time 'starting archive recovery' "$lg"); z=$(log_time 'database system is ready to accept connections' "$lg")
    [ -z "$a" ] || [ -z "$z" ] || record "$v" replay_recovery_s "$rep" "$(echo "$z - $a" | bc -l)"
    local redo; redo=$(sed -n 's/.*redo done at .* elapsed: \([0-9.]*\) s.*/\1/p' "$lg" | tail -1)
    [ -z "$redo" ] || record "$v" replay_redo_s "$rep" "$redo"
    record "$v" replay_end_lsn "$rep" "$(sed -n 's/.*redo done at \([0-9A-F/]*\) .*/\1/p' "$lg" | tail -1)"
  else
    record "$v" replay_fail "$rep" "no 'ready to accept connections' (see $lg)"
  fi
  if is_daemon "$v"; then daemon "$v" "$rep" stop; fi
  pg_stop "$dest"
  rm -rf "$dest"
}

do_setup() {
  mkdir -p "$WR"; chown postgres: "$WR"
  start_s3
  setup
}

do_run() {
  do_setup
  mkdir -p "$RES"; : >"$RES/results.tsv"
  rm -f "$WR"/daemon/*/daemon.log
  as_pg mkdir -p "$WR/daemon"; as_pg bash -c ": >'$WR/daemon/records.tsv'"
  local v rep
  {
    printf 'pg_wal\tWAL in pg_wal (restore_command false)\n'
    printf 'local_cp\tcp from a local dir\n'
    printf 'walden_file\tWalden file, per call\n'
    printf 'walden_s3\tWalden s3, per call\n'
    printf 'walden_file_daemon\tWalden file, daemon (prefetch 8)\n'
    printf 'walden_s3_daemon\tWalden s3, daemon (prefetch 8)\n'
  } >"$RES/columns"
  for rep in $(seq "$REPEATS"); do
    for v in $VARIANTS; do one "$v" "$rep"; done
  done
  W=$WR WALDEN_BENCH_RECORDS=$WR/daemon/records.tsv bash "$HERE/daemon.sh" merge "$RES/results.tsv"
}

do_stop() {
  local d
  for d in "$WR/dest" "$WR/primary"; do [ -d "$d" ] && pg_stop "$d"; done
  for d in "$WR"/daemon/*/; do [ -d "$d" ] && daemon "$(basename "$d")" 0 kill; done
  if [ -s "$WR/s3s.pid" ]; then kill "$(cat "$WR/s3s.pid")" 2>/dev/null || true; rm -f "$WR/s3s.pid"; fi
  return 0
}

case ${1:-run} in
  setup) do_setup ;;
  run) do_run ;;
  stop) do_stop ;;
  *) echo "usage: $0 setup|run|stop" >&2; exit 2 ;;
esac
