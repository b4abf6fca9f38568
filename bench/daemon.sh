#!/usr/bin/env bash
# daemon.sh - one `walden daemon` for a bench column, and what it costs.
#
#   daemon.sh start            start a fresh daemon (empty state dir) for column $ID
#   daemon.sh mark PHASE       book the running phase, then count from here as PHASE
#   daemon.sh stop [--nowait]  book the running phase and SIGTERM the daemon
#   daemon.sh kill             SIGTERM the daemon without booking anything
#   daemon.sh merge RESULTS    (root) move booked rows into RESULTS (results.tsv)
#
# The daemon is not a descendant of the harness's archiver loop (walloop.py counts the
# CPU and RSS of its descendants only), so its cost is read here from /proc: CPU =
# utime+stime of /proc/PID/stat since the phase began, peak RSS = VmHWM (reset at each
# phase change through /proc/PID/clear_refs). Rows, in the harness's 4-column format:
#   ID  PHASE_daemon_cpu_s   REP  seconds
#   ID  PHASE_daemon_rss     REP  KiB
#   ID  PHASE_daemon_prefetch_hits / _misses  REP  count   (fetch and replay phases)
#   ID  PHASE_daemon_fail    REP  reason                   (shown under "Failures")
# go to $WALDEN_BENCH_RECORDS (default $W/walden-daemon/records.tsv; this runs as postgres,
# results.tsv belongs to root), which bench/peers.sh merges into $W/results/results.tsv.
#
# Phase at start: $WALDEN_BENCH_PHASE if set (lag, lagbulk, replay); otherwise walpushbl
# when the harness's fake data dir $W/walbench/$ID does not exist yet (its SETUP before the
# backlog run) and walpush when it does (its SETUP before the trickle run).
# REP: $WALDEN_BENCH_REP, else 1 + the rows of this ID and phase already booked or merged.
#
# Environment (from the column's ID_ENV): ID W WALDEN_BENCH_D WALDEN_BENCH_BIN WALDEN_SOCKET
# WALDEN_STATE_DIR WALDEN_LISTEN and the storage settings; WALDEN_BENCH_PGDATA (daemon's
# --pgdata; default: the fake dir, or $PGDATA in lag phases).
set -euo pipefail

D=${WALDEN_BENCH_D:-$W/walden-daemon/${ID:-}}
REC=${WALDEN_BENCH_RECORDS:-$W/walden-daemon/records.tsv}
HZ=$(getconf CLK_TCK)

alive() {  # PID: running (a zombie waiting for init to reap it counts as gone)
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ "${st%% *}" != Z ]
}
ticks() {  # PID: utime + stime in clock ticks
  local st
  st=$(cat "/proc/$1/stat"); st=${st##*) }
  # shellcheck disable=SC2086  # split the fields on purpose
  set -- $st
  echo $((${12} + ${13}))
}
hwm() { awk '/^VmHWM:/{print $2}' "/proc/$1/status"; }
metric() {  # NAME: a counter from the daemon's /metrics (empty if unreachable)
  curl -s --max-time 2 "http://$WALDEN_LISTEN/metrics" 2>/dev/null | awk -v m="$1" '$1 == m {print $2}'
}
record() { printf '%s\t%s\t%s\t%s\n' "$ID" "$1" "$REP" "$2" >>"$REC"; }
set_rep() {  # PHASE: the harness's repeat = 1 + this phase's rows so far (booked or merged)
  REP=${WALDEN_BENCH_REP:-}
  [ -n "$REP" ] && return
  local f=() n
  for n in "$REC" "$W/results/results.tsv"; do [ -r "$n" ] && f+=("$n"); done
  n=0
  ((${#f[@]})) && n=$(awk -F'\t' -v i="$ID" -v m="$1_daemon_cpu_s" '$1 == i && $2 == m {n++} END {print n + 0}' "${f[@]}")
  REP=$((n + 1))
}
wait_gone() {  # PID SECONDS
  local i
  for ((i = 0; i < $2 * 20; i++)); do alive "$1" || return 0; sleep 0.05; done
  kill -KILL "$1" 2>/dev/null || true
}

book() {  # write the running phase's rows
  [ -s "$D/pid" ] || return 0
  local pid phase cpu0 now
  pid=$(cat "$D/pid"); phase=$(cat "$D/phase"); cpu0=$(cat "$D/cpu0")
  set_rep "$phase"
  if ! alive "$pid"; then
    record "${phase}_daemon_fail" "the daemon died (see $D/daemon.log)"
    return 0
  fi
  now=$(ticks "$pid")
  record "${phase}_daemon_cpu_s" "$(echo "($now - $cpu0) / $HZ" | bc -l)"
  record "${phase}_daemon_rss" "$(hwm "$pid")"
  case $phase in walfetch|replay*)
    record "${phase}_daemon_prefetch_hits" "$(metric walden_prefetch_hits_total)"
    record "${phase}_daemon_prefetch_misses" "$(metric walden_prefetch_misses_total)" ;;
  esac
  echo "$now" >"$D/cpu0"
}

finish_old() {  # make sure no earlier daemon of this column is still exiting
  local f
  for f in "$D/pid" "$D/pid.stopping"; do
    [ -s "$f" ] || continue
    kill -TERM "$(cat "$f")" 2>/dev/null || true
    wait_gone "$(cat "$f")" 30
    rm -f "$f"
  done
}

stop() {  # [--nowait]
  [ -s "$D/pid" ] || return 0
  book
  local pid; pid=$(cat "$D/pid")
  kill -TERM "$pid" 2>/dev/null || true
  mv "$D/pid" "$D/pid.stopping"
  # --nowait: called from inside a timed loop; the next start waits for the exit instead
  if [ "${1:-}" != --nowait ]; then wait_gone "$pid" 30; rm -f "$D/pid.stopping"; fi
}

start() {
  stop
  finish_old
  mkdir -p "$D"
  rm -rf "$WALDEN_STATE_DIR" "$D"/mark.* "$D"/last.* "$WALDEN_SOCKET"
  local phase=${WALDEN_BENCH_PHASE:-} pgdata=${WALDEN_BENCH_PGDATA:-}
  if [ -z "$phase" ]; then
    if [ -d "$W/walbench/$ID" ]; then phase=walpush; else phase=walpushbl; fi
  fi
  if [ -z "$pgdata" ]; then
    case $phase in lag*) pgdata=${PGDATA:?} ;; *) pgdata=$W/walbench/$ID ;; esac
  fi
  # the fetch command stops the daemon after the harness's last segment
  local last
  last=$(find "$W/walsegs" -maxdepth 1 -regextype posix-extended -regex '.*/[0-9A-F]{24}' -printf '%f\n' 2>/dev/null | sort | tail -1 || true)
  [ -z "$last" ] || touch "$D/last.$last"
  echo "== $(date -u +%FT%TZ) start $ID phase=$phase pgdata=$pgdata" >>"$D/daemon.log"
  setsid "$WALDEN_BENCH_BIN" daemon --pgdata "$pgdata" </dev/null >>"$D/daemon.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$D/pid"; echo "$phase" >"$D/phase"; echo 0 >"$D/cpu0"
  local i
  for ((i = 0; i < 200; i++)); do
    [ -S "$WALDEN_SOCKET" ] && return 0
    alive "$pid" || break
    sleep 0.05
  done
  echo "walden daemon for $ID did not come up; last lines of $D/daemon.log:" >&2
  tail -5 "$D/daemon.log" >&2
  return 1
}

mark() {  # PHASE
  book
  local pid; pid=$(cat "$D/pid")
  echo "$1" >"$D/phase"
  echo 5 >"/proc/$pid/clear_refs"   # VmHWM := current RSS
  touch "$D/mark.$1"
}

merge() {  # RESULTS_TSV
  [ -s "$REC" ] || return 0
  cat "$REC" >>"$1"
  : >"$REC"
}

case ${1:-} in
  start) start ;;
  mark) mark "$2" ;;
  stop) stop "${2:-}" ;;
  kill) if [ -s "$D/pid" ]; then mv "$D/pid" "$D/pid.stopping"; fi; finish_old ;;
  merge) merge "$2" ;;
  *) echo "usage: $0 start|mark PHASE|stop [--nowait]|kill|merge RESULTS" >&2; exit 2 ;;
esac
