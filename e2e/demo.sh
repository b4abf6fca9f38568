#!/usr/bin/env bash
# The main job on the local default: protect a throwaway PostgreSQL 15 into
# file:// storage (walden as its archive_command, a walden base backup), lose
# it, and restore it with walden restore (walden as its restore_command). Everything lives in
# $WALDEN_DEMO_DIR (default /tmp/walden-demo) and listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

WALDEN_DEPS=postgres bash e2e/install-deps.sh
cargo build --release -q -p walden
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/walden"

D=${WALDEN_DEMO_DIR:-/tmp/walden-demo}
PGBIN=/usr/lib/postgresql/15/bin
PORT=${WALDEN_DEMO_PORT:-54329}
export WALDEN_STORAGE="file://$D/archive"
export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- env WALDEN_STORAGE="$WALDEN_STORAGE" PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER="$PGUSER" "$@"
  else "$@"; fi
}
psql() { "$PGBIN/psql" -XAtq -h 127.0.0.1 -U postgres -p "$1" -d postgres -c "$2"; }
say() { printf '\n== %s\n' "$*"; }

[ -f "$D/primary/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$D/primary" -m immediate stop >/dev/null 2>&1 || true
[ -f "$D/restored/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$D/restored" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$D" && mkdir -p "$D/archive"
[ "$(id -u)" -eq 0 ] && chown -R postgres: "$D"
chmod 755 "$D"

say "A throwaway PostgreSQL on 127.0.0.1:$PORT, archiving through: $BIN wal-push %p"
as_pg "$PGBIN/initdb" -D "$D/primary" -U postgres -A trust >/dev/null
cat >> "$D/primary/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = ''
archive_mode = on
archive_command = '$BIN wal-push %p'
CONF
as_pg "$PGBIN/pg_ctl" -D "$D/primary" -l "$D/primary.log" -w start >/dev/null
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s 5 -q postgres 2>/dev/null

say "Base backup: walden backup-push"
as_pg "$BIN" backup-push --pgdata "$D/primary" 2>/dev/null

say "Writing after the backup: 2000 pgbench transactions"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -n -c 2 -t 1000 postgres >/dev/null
Q="SELECT count(*) || ' accounts, balance ' || sum(abalance) || ', ' || (SELECT count(*) FROM pgbench_history) || ' history rows' FROM pgbench_accounts"
BEFORE=$(psql "$PORT" "$Q")
LAST=$(psql "$PORT" "SELECT pg_walfile_name(pg_switch_wal())")
until [ "$(psql "$PORT" "SELECT last_archived_wal >= '$LAST' FROM pg_stat_archiver")" = t ]; do sleep 0.2; done
echo "primary:  $BEFORE"
psql "$PORT" "SELECT 'archived ' || archived_count || ' WAL files, ' || failed_count || ' failures' FROM pg_stat_archiver"
"$BIN" backup-list 2>/dev/null

say "Disaster: the primary is gone"
as_pg "$PGBIN/pg_ctl" -D "$D/primary" -m immediate stop >/dev/null

say "Restore: walden restore (the newest backup, then every archived WAL file via walden wal-fetch)"
as_pg mkdir -m 700 "$D/restored"
as_pg "$BIN" restore "$D/restored" 2>/dev/null
cat >> "$D/restored/postgresql.conf" <<CONF
port = $((PORT + 1))
archive_mode = off
CONF
as_pg "$PGBIN/pg_ctl" -D "$D/restored" -l "$D/restored.log" -w -t 300 start >/dev/null
until [ "$(psql $((PORT + 1)) "SELECT pg_is_in_recovery()" 2>/dev/null)" = f ]; do sleep 0.2; done
AFTER=$(psql $((PORT + 1)) "$Q")
echo "restored: $AFTER ($(grep -c 'restored log file' "$D/restored.log") WAL files replayed from the archive)"
as_pg "$PGBIN/pg_ctl" -D "$D/restored" -m fast stop >/dev/null
if [ "$BEFORE" = "$AFTER" ]; then echo; echo "OK: the restored database holds exactly the primary's rows."; else echo "MISMATCH" >&2; exit 1; fi
