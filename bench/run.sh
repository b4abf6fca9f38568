#!/usr/bin/env bash
# run.sh - Walden's whole benchmark next to its peers, end to end, in one command (as root):
#
#   bash bench/run.sh           full size: pgbench -s 100, 3 repeats (hours; needs a quiet machine)
#   QUICK=1 bash bench/run.sh   everything small, 1 repeat: checks the pipeline in minutes
#
# Phases (PHASES, default "main lag datasets replay"):
#   main      the shared harness (../shared/bench/peers.sh, through bench/peers.sh) on pgbench
#             -s $SCALE: every peer column, plus walden_file and walden_s3 (one walden per call)
#             and walden_file_daemon, walden_s3_daemon (thin client through `walden daemon`:
#             backlog push, trickle push, fetch with prefetch; the daemon's own CPU and RSS)
#   lag       archive lag (`peers.sh lag`) for each of LAG_MODES (bulk, tpcb): the harness's
#             default peer subset plus walden_file, walden_s3, walden_s3_daemon
#   datasets  backup rows only, each dataset in its own work dir and port range: "random"
#             (RANDOM_MB of incompressible bytea) and "relsN" for each N of RELS (N one-row tables)
#   replay    bench/replay.sh: PostgreSQL replaying the same WAL from local disk vs through Walden
# The report (markdown) goes to $OUT and is printed at the end; the log to $OUT's .log. Every
# server this starts (Postgres, s3s-fs, stunnel, walden daemons) is stopped at the end.
#
# Knobs: QUICK, SCALE, REPEATS, NSEG, PHASES, LAG_MODES, RANDOM_MB, RELS, REPLAY_SCALE,
# REPLAY_NSEG, LAG_TXN, LAG_SECS, MAIN_TOOLS (peer columns of the main run; empty = all),
# LAG_PEERS (peer columns of the lag runs; empty = the harness's default subset),
# DATASET_REPEATS (default REPEATS; at 100,000 relations pgBackRest's S3 restore alone takes
# about 35-40 min per repeat), DATASET_CMD_TIMEOUT (the harness's limit per backup or restore
# command in the dataset runs: CMD_TIMEOUT if set, else 3600 s; the harness's own default of
# 900 s cuts that restore short), OUT,
# REPORT_ONLY=1 (only rebuild the report from the results of PHASES), and WALDEN_BIN (unset:
# `cargo build --release -p walden` into CARGO_TARGET_DIR, default /var/tmp/walden-ci/target).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BASE=/var/tmp/walden-peerbench
[ "$(id -u)" = 0 ] || { echo "run as root (Postgres runs as the postgres user)" >&2; exit 1; }

if [ -n "${QUICK:-}" ]; then
  : "${SCALE:=10}" "${REPEATS:=1}" "${NSEG:=16}" "${RANDOM_MB:=100}" "${RELS:=100 2000}"
  : "${REPLAY_SCALE:=10}" "${REPLAY_NSEG:=16}" "${LAG_TXN:=40}" "${LAG_SECS:=15}"
  : "${MAIN_TOOLS=raw_tar raw_zstd1 pgbb_server_z1 pgbr_posix_z1_p1 pgbr_posix_z1_p2 pgbr_posix_z1_async pgbr_s3_z1_p1 pgbr_s3_z1_p2 barman_s3 wale_file}"
  : "${LAG_PEERS:=raw_tar pgbr_posix_z1_p1 pgbr_posix_z1_async}"
  PREFIX=quick- PORT0=20100 PORT_DS=20200 PORT_REPLAY=20600
  export SKIP_S3RAW=1
else
  : "${SCALE:=100}" "${REPEATS:=3}" "${NSEG:=64}" "${RANDOM_MB:=1024}" "${RELS:=100 100000}"
  : "${REPLAY_SCALE:=$SCALE}" "${REPLAY_NSEG:=$NSEG}" "${MAIN_TOOLS=}" "${LAG_PEERS:=}"
  PREFIX='' PORT0=19100 PORT_DS=21200 PORT_REPLAY=21600
fi
: "${PHASES:=main lag datasets replay}" "${LAG_MODES:=bulk tpcb}" "${REPORT_ONLY:=}"
: "${OUT:=$BASE/${PREFIX}report.md}"
: "${LAG_TXN:=150}" "${LAG_SECS:=60}" "${DATASET_REPEATS:=$REPEATS}" "${DATASET_CMD_TIMEOUT:=${CMD_TIMEOUT:-3600}}"
export SCALE REPEATS NSEG LAG_TXN LAG_SECS
# backup rows on the extra datasets: this peer subset and Walden per call
DATASET_TOOLS="raw_zstd1 pgbb_server_z1 pgbr_posix_z1_p2 pgbr_s3_z1_p2 barman_s3"
W_MAIN=$BASE/${PREFIX}run
W_REPLAY=$BASE/${PREFIX}run-replay
PHASE_TSV=$BASE/${PREFIX}phases.tsv
LOG=${OUT%.md}.log
mkdir -p "$BASE"
exec > >(tee -a "$LOG") 2>&1
log() { printf '[%s] run.sh: %s\n' "$(date +%T)" "$*"; }

# ---------------------------------------------------------------- helpers
peers() { bash "$HERE/peers.sh" "$@"; }     # the shared harness with Walden's columns
USED_W=()                                   # work dirs to stop at the end: "W PORT_BASE"
stop_all() {
  local entry
  for entry in "${USED_W[@]}"; do
    W=${entry% *} PORT_BASE=${entry#* } peers stop >/dev/null 2>&1 || true
  done
  if [[ " $PHASES " == *" replay "* ]]; then
    WR=$W_REPLAY PORT=$PORT_REPLAY WALDEN_BIN=${WALDEN_BIN:-unset} bash "$HERE/replay.sh" stop || true
  fi
}
[ -n "$REPORT_ONLY" ] || trap stop_all EXIT   # a report rebuild must not stop a run in progress

phase() {  # NAME CMD...: run CMD, book its duration
  local t0; t0=$(date +%s)
  log "phase $1"
  "${@:2}"
  printf '%s\t%s\n' "$1" "$(($(date +%s) - t0))" >>"$PHASE_TSV"
}

# A work dir's ports (Postgres, s3s-fs, stunnel, the daemons' HTTP) must be free once its own
# servers are stopped: another server there would silently take this run's requests.
ports_free() {  # PORT...
  local p
  for p in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "port $p on 127.0.0.1 is taken by another process; free it or move the port range" >&2
      return 1
    fi
  done
}
claim() {  # W PORT_BASE: stop what an earlier run left there, check the ports, stop it at the end
  USED_W+=("$1 $2")
  W=$1 PORT_BASE=$2 peers stop >/dev/null 2>&1 || true
  ports_free "$2" $(($2 + 10)) $(($2 + 11)) $(($2 + 21)) $(($2 + 22))
}

# The harness prints only the tools of its bench's columns file; lag runs may add others
# (its default lag subset): list them too, under their ids.
complete_columns() {  # RESULTS_DIR
  [ -s "$1/results.tsv" ] && [ -f "$1/columns" ] || return 0
  cut -f1 "$1/results.tsv" | sort -u | while read -r id; do
    [ "$id" = "S3 server (aws cli)" ] && continue
    cut -f1 "$1/columns" | grep -qxF "$id" || printf '%s\t%s\n' "$id" "$id" >>"$1/columns"
  done
}

segments_in() { find "$1" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' 2>/dev/null | wc -l; }

# Hard links to NSEG segments of another work dir's WAL batch (+ its pg_control): the harness
# then skips generating its own batch with pgbench (build_dataset checks only the count).
seed_walsegs() {  # FROM_W TO_W
  local src=$1/walsegs dst=$2/walsegs
  [ "$src" != "$dst" ] || return 0
  (($(segments_in "$dst") >= NSEG)) && return 0
  (($(segments_in "$src") >= NSEG)) && [ -s "$src/global/pg_control" ] || return 0
  rm -rf "$dst"; mkdir -p "$dst/global"
  find "$src" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' -printf '%f\n' | sort | head -n "$NSEG" |
    while read -r f; do cp -l "$src/$f" "$dst/" 2>/dev/null || cp "$src/$f" "$dst/"; done
  cp "$src/global/pg_control" "$dst/global/"
  chown -R postgres: "$dst"
}

# ---------------------------------------------------------------- phases
main_run() {
  claim "$W_MAIN" "$PORT0"
  rm -f "$W_MAIN"/walden-daemon/*/daemon.log   # the report lists this run's daemon warnings
  # no seeding here: pgBackRest refuses WAL of another cluster than its stanza's
  W=$W_MAIN PORT_BASE=$PORT0 peers setup
  W=$W_MAIN PORT_BASE=$PORT0 bash "$HERE/dataset.sh" count >"$W_MAIN/results/dataset.tsv"
  W=$W_MAIN PORT_BASE=$PORT0 TOOLSET=$MAIN_TOOLS peers bench
}

lag_run() {  # MODE (bulk|tpcb)
  local pfx=lag; [ "$1" = bulk ] && pfx=lagbulk
  [[ " $PHASES " == *" main "* ]] || claim "$W_MAIN" "$PORT0"
  # the daemon column goes last: bench/daemon.sh stops it (and books its cost) right after
  local extra="walden_file walden_s3 walden_s3_daemon" tools=""
  [ -n "$LAG_PEERS" ] && tools="$LAG_PEERS $extra"
  W=$W_MAIN PORT_BASE=$PORT0 LAG_MODE=$1 LAG_TOOLS=$tools EXTRA_TOOLS=$extra WALDEN_BENCH_PHASE=$pfx WALDEN_BENCH_REP=1 \
    peers lag >"$W_MAIN/lag-$1.out"
  runuser -u postgres -- env W="$W_MAIN" ID=walden_s3_daemon WALDEN_LISTEN="127.0.0.1:$((PORT0 + 22))" WALDEN_BENCH_REP=1 \
    bash "$HERE/daemon.sh" stop
  W=$W_MAIN bash "$HERE/daemon.sh" merge "$W_MAIN/results/results.tsv"
}

dataset_run() {  # NAME PORT_BASE KIND ARG
  local w=$BASE/${PREFIX}run-$1
  claim "$w" "$2"
  seed_walsegs "$W_MAIN" "$w"   # SKIP_WAL=1: the batch is never pushed, only counted
  phase "dataset $1: set-up and data" dataset_build "$w" "$2" "$3" "$4"
  phase "dataset $1: backups" env W="$w" PORT_BASE="$2" SCALE=1 REPEATS="$DATASET_REPEATS" TOOLSET="$DATASET_TOOLS" \
    CMD_TIMEOUT="$DATASET_CMD_TIMEOUT" \
    EXTRA_TOOLS="walden_file walden_s3" SKIP_WAL=1 SKIP_S3RAW=1 SKIP_STARTUP=1 bash "$HERE/peers.sh" bench
  W=$w PORT_BASE=$2 peers stop
  rm -rf "${w:?}"/repo/* "${w:?}"/s3/bench/*   # the stored backups: measured, not needed any more
}
dataset_done() {  # NAME PORT_BASE: its results go into the report
  local res=$BASE/${PREFIX}run-$1/results
  [ -s "$res/results.tsv" ] || return 0
  DATASETS+=("$1=$res"); DS_PORT[$1]=$2
}
dataset_build() {  # W PORT_BASE KIND ARG
  W=$1 PORT_BASE=$2 SCALE=1 peers setup
  W=$1 PORT_BASE=$2 bash "$HERE/dataset.sh" "$3" "$4"
  W=$1 PORT_BASE=$2 bash "$HERE/dataset.sh" count >"$1/results/dataset.tsv"
  log "dataset $(basename "$1"): $(cut -f1 "$1/results/dataset.tsv") files in PGDATA"
}

replay_env() { env WR="$W_REPLAY" PORT="$PORT_REPLAY" REPLAY_SCALE="$REPLAY_SCALE" REPLAY_NSEG="$REPLAY_NSEG" "$@"; }

# ---------------------------------------------------------------- go
log "QUICK=${QUICK:-} SCALE=$SCALE REPEATS=$REPEATS NSEG=$NSEG PHASES='$PHASES' -> $OUT"
[ -n "$REPORT_ONLY" ] || : >"$PHASE_TSV"
df -h / | tail -1
if [ -z "${WALDEN_BIN:-}" ] && [ -z "$REPORT_ONLY" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/walden-ci/target}
  phase "build walden (cargo build --release)" bash -c "cd '$ROOT' && cargo build --release -q -p walden"
  WALDEN_BIN=$CARGO_TARGET_DIR/release/walden
  chmod o+rx "$CARGO_TARGET_DIR" "$CARGO_TARGET_DIR/release" 2>/dev/null || true
fi
[ -n "${WALDEN_BIN:-}" ] || WALDEN_BIN=${CARGO_TARGET_DIR:-/var/tmp/walden-ci/target}/release/walden
export WALDEN_BIN
[ -n "$REPORT_ONLY" ] || phase "install peers" peers install

DATASETS=(); declare -A DS_PORT=()
for p in $PHASES; do
  case $p in
    main) [ -n "$REPORT_ONLY" ] || phase "main: pgbench -s $SCALE, all columns" main_run ;;
    lag) [ -n "$REPORT_ONLY" ] || for m in $LAG_MODES; do phase "lag: $m" lag_run "$m"; done ;;
    datasets)
      port=$PORT_DS
      [ -n "$REPORT_ONLY" ] || dataset_run random "$port" random "$RANDOM_MB"
      dataset_done random "$port"
      for n in $RELS; do
        port=$((port + 100)); name=rels$n
        ((n % 1000 == 0)) && name=rels$((n / 1000))k
        [ -n "$REPORT_ONLY" ] || dataset_run "$name" "$port" rels "$n"
        dataset_done "$name" "$port"
      done ;;
    replay)
      [ -n "$REPORT_ONLY" ] && continue
      replay_env bash "$HERE/replay.sh" stop
      ports_free "$PORT_REPLAY" $((PORT_REPLAY + 10)) $((PORT_REPLAY + 20))
      phase "replay: set-up (primary, archive, backup)" replay_env bash "$HERE/replay.sh" setup
      phase "replay: runs" replay_env bash "$HERE/replay.sh" run
      replay_env bash "$HERE/replay.sh" stop ;;
    *) echo "unknown phase $p" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- report
nseg_main=$(segments_in "$W_MAIN/walsegs")
{
  echo "# Walden benchmark"
  echo
  echo "Generated $(date -u +'%F %T UTC') by \`${QUICK:+QUICK=1 }bash bench/run.sh\` (SCALE=$SCALE REPEATS=$REPEATS" \
    "NSEG=$NSEG PHASES='$PHASES' LAG_MODES='$LAG_MODES' RANDOM_MB=$RANDOM_MB RELS='$RELS'" \
    "DATASET_REPEATS=$DATASET_REPEATS REPLAY_SCALE=$REPLAY_SCALE REPLAY_NSEG=$REPLAY_NSEG LAG_TXN=$LAG_TXN LAG_SECS=$LAG_SECS)."
  echo "Walden: \`$WALDEN_BIN\` ($("$WALDEN_BIN" --version), sha256 $(sha256sum "$WALDEN_BIN" | cut -c1-12));" \
    "bench scripts at $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet -- bench || echo ' + local changes')."
  echo "Machine: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB RAM, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  if [ -d "$W_MAIN/results" ] && [[ " $PHASES " == *" main "* || " $PHASES " == *" lag "* ]]; then
    echo
    echo "## Main dataset: pgbench -s $SCALE ($W_MAIN)"
    echo
    [ -s "$W_MAIN/results/dataset.tsv" ] && read -r f r _ <"$W_MAIN/results/dataset.tsv" &&
      echo "PGDATA holds $f files ($r relations in database postgres)."
    complete_columns "$W_MAIN/results"
    W=$W_MAIN PORT_BASE=$PORT0 NSEG=$nseg_main peers report
    python3 "$HERE/report.py" daemon "$W_MAIN/results" "$nseg_main"
  fi
  if ((${#DATASETS[@]})); then
    echo
    echo "## Datasets: backup push and restore (SKIP_WAL=1)"
    [ -s "$W_MAIN/results/dataset.tsv" ] && DATASETS=("pgbench-s$SCALE=$W_MAIN/results" "${DATASETS[@]}")
    python3 "$HERE/report.py" datasets "${DATASETS[@]}"
    for d in "${DATASETS[@]}"; do
      [ "${d#pgbench}" != "$d" ] && continue
      echo; echo "### Dataset ${d%%=*}: the harness's tables"
      W=$(dirname "${d#*=}") PORT_BASE=${DS_PORT[${d%%=*}]} peers report | sed 's/^### /#### /'
    done
  fi
  if [ -s "$W_REPLAY/results/results.tsv" ] && [[ " $PHASES " == *" replay "* ]]; then
    echo
    echo "## Replay"
    python3 "$HERE/report.py" replay "$W_REPLAY/results"
  fi
  echo
  echo "## Walden daemon logs (warnings and errors)"
  echo
  n=0
  for f in "$W_MAIN"/walden-daemon/*/daemon.log "$W_REPLAY"/daemon/*/daemon.log; do
    [ -f "$f" ] || continue
    problems=$(grep -E ' (WARN|ERROR) ' "$f" | grep -v 'no WALDEN_TOKEN_FILE' || true)
    lines=$(printf '%s' "$problems" | grep -c . || true)
    echo "- \`$f\`: $lines warning/error lines (besides the expected 'no WALDEN_TOKEN_FILE')"
    [ -z "$problems" ] || printf '%s\n' "$problems" | cut -c1-300 | head -5 | sed 's/^/  - /'
    n=$((n + lines))
  done
  echo
  echo "Total: $n."
  echo
  echo "## Versions"
  echo
  peers versions
  echo "- Walden: $("$WALDEN_BIN" --version) ($WALDEN_BIN)"
  python3 "$HERE/report.py" phases "$PHASE_TSV"
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "report written to $OUT"
cat "$OUT"
