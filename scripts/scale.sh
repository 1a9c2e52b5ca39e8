#!/usr/bin/env bash
# Adds or removes worker replicas of the system scripts/up.sh started, while
# it runs. A removed replica gets SIGTERM: it stops taking work, finishes
# its running tasks (worker.shutdown_grace_seconds), hands unstarted ones
# back to RabbitMQ and exits; nothing is lost.
#
#   scripts/scale.sh add [N]       start N more replicas (default 1)
#   scripts/scale.sh remove [N]    stop the N newest replicas (default 1)
#   scripts/scale.sh status        replicas, their addresses and readiness
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$WARREN_ROOT"

export WARREN_ENV=${WARREN_ENV:-development}
action=${1:-status}
count=${2:-1}
[[ "$count" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, got '$count'"

mapfile -t running < <(running_workers)
case "$action" in
  add)
    [ -f "$RUN_DIR/api.pid" ] || die "nothing runs here: start it with scripts/up.sh"
    [ -x "$RELEASE_BIN/warren-worker" ] || die "no release build: run scripts/up.sh first"
    last=${running[${#running[@]}-1]:-0}
    # Numbers are never reused while an older replica's pid file exists.
    for f in "$RUN_DIR"/worker-*.pid; do
      [ -e "$f" ] || continue
      n=${f##*/worker-}; n=${n%.pid}
      [ "$n" -gt "$last" ] && last=$n
    done
    added=$(seq $((last + 1)) $((last + count)))
    for i in $added; do start_worker "$i"; done
    # shellcheck disable=SC2086 # one argument per replica number
    wait_for_workers $added
    say "added $count worker(s); $((${#running[@]} + count)) running"
    ;;
  remove)
    [ "$count" -le "${#running[@]}" ] || die "only ${#running[@]} worker(s) running"
    pids=()
    for n in "${running[@]: -$count}"; do
      pid=$(cat "$RUN_DIR/worker-$n.pid")
      say "stopping worker $n (pid $pid): it finishes its running tasks first"
      kill -TERM "$pid"
      pids+=("$pid:$n")
    done
    for p in "${pids[@]}"; do
      pid=${p%%:*}
      while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
      rm -f "$RUN_DIR/worker-${p##*:}.pid"
    done
    say "removed $count worker(s); $((${#running[@]} - count)) running"
    ;;
  status)
    for n in "${running[@]}"; do
      addr=$(worker_addr "$n")
      ready=$(curl -fsS -o /dev/null -w ready "http://$addr/readyz" 2>/dev/null || echo "NOT READY")
      echo "worker $n  pid $(cat "$RUN_DIR/worker-$n.pid")  http://$addr/metrics  $ready  log .run/worker-$n.log"
    done
    echo "${#running[@]} worker(s) running"
    ;;
  *) die "usage: scripts/scale.sh add [N] | remove [N] | status" ;;
esac
