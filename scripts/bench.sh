#!/usr/bin/env bash
# The benchmark: builds the release binaries, makes sure RabbitMQ and
# PostgreSQL run, and runs warren-bench, which brings up its own Warren per
# measurement (fresh database, unique queue prefix) and takes it down after.
#
#   scripts/bench.sh all                       every scenario, 3 runs each, and a summary (~30 min)
#   scripts/bench.sh drain --tasks 100000      one scenario: ceiling, drain, submit, latency, memory, scaling, pages
#   scripts/bench.sh peers                     Warren's drain beside rusty-celery's and Celery's (installs them)
#   scripts/bench.sh grow                      drain, POSTs, API reads and their EXPLAINs with 0, 1M, 10M finished tasks in the table (~12 min)
#   scripts/bench.sh longpoll                  10,000 requests long-polling on one API: woken how soon, memory, queries
#   scripts/bench.sh pages                     dashboard page times with 1,000,000 tasks in the table
#   scripts/bench.sh webhooks                  the drain with and without webhooks to a receiver that takes 2 s
#   scripts/bench.sh webhooks --task-ms 50 --concurrency 25 --runs 5   the same with 2 s of sleep tasks
#   scripts/bench.sh workflows                 5,000 tasks drained independent vs as one chord's members + sum body
#   scripts/bench.sh retention                 the drain with the retention job off, then on, deleting 1,000,000 old rows
#   scripts/bench.sh scaling                   2,000 × 50 ms sleep tasks, 1/2/4 replicas, 3 runs
#   scripts/bench.sh scaling --replicas 1,2,4,8 --runs 1
#   scripts/bench.sh --help
#
# Prints a Markdown table; writes the figures to warren-bench.json (--json).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$WARREN_ROOT"

ensure_cargo
ensure_services
sweep_test_leftovers
say "building (release)"
cargo build --release --locked --bins
case " $* " in *" peers "* | *" all "*) ensure_peers ;; esac
export BENCH_ADMIN_DATABASE_URL=${TEST_ADMIN_DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}
exec "$RELEASE_BIN/warren-bench" "$@"
