#!/usr/bin/env bash
# Stops what scripts/up.sh started: SIGTERM (workers finish in-flight tasks
# within their grace period), then waits for every process to exit.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet=${1:-}
shopt -s nullglob
pids=()
for f in .run/*.pid; do
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" && pids+=("$pid")
  fi
  rm -f "$f"
done
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
done
[ "$quiet" = --quiet ] || echo "stopped ${#pids[@]} process(es)"
