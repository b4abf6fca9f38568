#!/usr/bin/env bash
# Runs the peer harness (../shared/bench/peers.sh: pgBackRest, barman-cloud, WAL-E,
# pg_basebackup, raw tar|zstd on the same data and S3 server) with Walden as extra
# columns (bench/columns.sh): walden_file, walden_s3 (one walden per call) and
# walden_file_daemon, walden_s3_daemon (thin client through `walden daemon`, WAL rows).
# Arguments go to the harness, e.g.
#   bash bench/peers.sh all
#   TOOLSET="raw_zstd1 pgbr_posix_z1_p2 pgbr_s3_z1_p2" SKIP_WAL=1 REPEATS=2 bash bench/peers.sh bench
# bench/run.sh runs everything (main, lag, datasets, replay) and writes the report.
# Everything runs on 127.0.0.1 (ports from PORT_BASE, default 19100). Run as root.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
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

# shellcheck source=columns.sh
source "$HERE/columns.sh"
export EXTRA_TOOLS="${EXTRA_TOOLS:-$WALDEN_IDS}"

# the daemons (run as postgres) keep their socket, state and booked rows here
export W=${W:-/var/tmp/walden-peerbench/run}
mkdir -p "$W/walden-daemon"; chown postgres: "$W/walden-daemon"
case ${1:-all} in
  bench|all)  # a fresh results.tsv: drop rows and fake dirs an interrupted run left behind
    : >"$W/walden-daemon/records.tsv"; chown postgres: "$W/walden-daemon/records.tsv"
    for id in $WALDEN_IDS; do rm -rf "$W/walbench/$id"; done ;;
esac

rc=0
bash "$PEERS" "$@" || rc=$?
case ${1:-all} in
  stop|all)  # the harness knows nothing of the daemons
    for d in "$W"/walden-daemon/*/; do
      [ -d "$d" ] && runuser -u postgres -- env W="$W" ID="$(basename "$d")" bash "$HERE/daemon.sh" kill
    done ;;
esac
# the daemons' own CPU / RSS rows join the harness's results (only after the subcommands
# that run daemons: a report or versions call must not take the rows of a run in progress)
case ${1:-all} in
  bench|all|one|lag) [ -d "$W/results" ] && bash "$HERE/daemon.sh" merge "$W/results/results.tsv" ;;
esac
exit $rc
