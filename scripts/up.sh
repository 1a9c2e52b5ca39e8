#!/usr/bin/env bash
# Brings up the whole system on this machine: RabbitMQ (with management
# UI) and PostgreSQL (started, or installed from Debian's packages), the
# `warren` database and its migrations, the API, and N workers.
#
#   scripts/up.sh [WORKERS]      default 2 workers
#
# Processes run in the background; logs and pids go to .run/. Stop them
# with scripts/down.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$WARREN_ROOT"

workers=${1:-2}
[[ "$workers" =~ ^[0-9]+$ ]] || die "WORKERS must be a number, got '$workers'"
export WARREN_ENV=${WARREN_ENV:-development}
listen=${WARREN_API__LISTEN:-127.0.0.1:8080}
export WARREN_API__LISTEN=$listen

ensure_cargo
ensure_services
ensure_database warren
"$WARREN_ROOT/scripts/down.sh" --quiet

say "building (release)"
cargo build --release --locked --bins
bin=$RELEASE_BIN

say "applying migrations"
"$bin/warren-api" migrate

mkdir -p .run
say "starting the API on $listen"
nohup "$bin/warren-api" >.run/api.log 2>&1 &
echo $! >.run/api.pid
for i in $(seq 1 "$workers"); do start_worker "$i"; done
say "started $workers worker(s); add or remove one with scripts/scale.sh add|remove"

ready() { curl -fsS "http://$listen/readyz" >/dev/null 2>&1; }
wait_for 60 "the API to be ready (see .run/api.log)" ready
wait_for_workers $(seq 1 "$workers")

cat <<EOT

  Warren is up.
    API                  http://$listen          (docs: http://$listen/docs)
    API key (dev)        warren-dev-key-local-only   (config/development.toml; real keys: warren-api keys create)
    RabbitMQ management  http://127.0.0.1:$MGMT_PORT  (guest / guest)
    PostgreSQL           ${WARREN_DATABASE__URL:-postgres://postgres@127.0.0.1:5432/warren}
    logs                 .run/api.log, .run/worker-*.log
    workers              scripts/scale.sh add | remove | status
    stop                 scripts/down.sh

EOT
