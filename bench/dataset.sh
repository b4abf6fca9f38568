#!/usr/bin/env bash
# dataset.sh - extra data in the harness's cluster of work dir $W (port $PORT_BASE), as root:
#   dataset.sh random MIB   MIB rows of 1 MiB random bytea (pgcrypto), column storage EXTERNAL
#                           so that pglz does not try; incompressible for every tool
#   dataset.sh rels N       N small tables walden_rel_<i> (one int column, one row: one 8 KiB
#                           file each), created 500 per transaction in DO blocks
#   dataset.sh count        print "files<TAB>relations<TAB>logical_bytes" of the cluster
# Idempotent: what already exists is kept. Run after `peers.sh setup` for that W.
set -euo pipefail
: "${W:?}" "${PORT_BASE:?}"
PGBIN=/usr/lib/postgresql/15/bin
PGDATA=$W/pg/data

sql() { runuser -u postgres -- "$PGBIN/psql" -h "$W/pg/sock" -p "$PORT_BASE" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

random_rows() {  # MIB
  sql "create extension if not exists pgcrypto"
  sql "create table if not exists walden_random (id int primary key, b bytea)"
  sql "alter table walden_random alter column b set storage external"
  local have; have=$(sql "select count(*) from walden_random")
  log "random: $have of $1 MiB rows present"
  local from
  # 32 MiB per transaction; the subquery refers to i so that it runs once per row
  for ((from = have + 1; from <= $1; from += 32)); do
    sql "insert into walden_random
           select i, (select string_agg(gen_random_bytes(1024), ''::bytea) from generate_series(1, 1024) k where i > 0)
           from generate_series($from, least($from + 31, $1)) i"
  done
  sql "checkpoint"
}

rels() {  # N
  local have; have=$(sql "select count(*) from pg_class where relname like 'walden\_rel\_%' and relkind = 'r'")
  log "rels: $have of $1 tables present"
  local from
  for ((from = 1; from <= $1; from += 500)); do
    ((from + 499 <= have)) && continue
    sql "do \$\$ begin
           for i in $from..least($from + 499, $1) loop
             if to_regclass('walden_rel_' || i) is null then
               execute format('create table walden_rel_%s (id int)', i);
               execute format('insert into walden_rel_%s values (%s)', i, i);
             end if;
           end loop;
         end \$\$"
  done
  sql "checkpoint"
}

count() {
  local files rels lb
  files=$(find "$PGDATA" -type f | wc -l)
  rels=$(sql "select count(*) from pg_class where relkind in ('r', 'i', 't', 'm', 'S')")
  lb=$(du -sb --exclude=pg_wal "$PGDATA" | cut -f1)
  printf '%s\t%s\t%s\n' "$files" "$rels" "$lb"
}

case ${1:-} in
  random) random_rows "$2" ;;
  rels) rels "$2" ;;
  count) count ;;
  *) echo "usage: $0 random MIB | rels N | count" >&2; exit 2 ;;
esac
