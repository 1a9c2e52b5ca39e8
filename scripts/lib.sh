# Shared by scripts/up.sh and scripts/test.sh: make sure RabbitMQ (with its
# management and Prometheus plugins) and PostgreSQL are running on this
# machine, starting them, or installing them from Debian's packages, if not.
# Sourced, not executed.

# shellcheck shell=bash

WARREN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
AMQP_PORT=${AMQP_PORT:-5672}
MGMT_PORT=${MGMT_PORT:-15672}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $* (install sudo or run as root)"
  fi
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() { # wait_for <seconds> <description> <command...>
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@"; do
    [ $SECONDS -ge $deadline ] && die "timed out waiting for $what"
    sleep 0.5
  done
}

apt_install() {
  say "installing $* (Debian packages)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" </dev/null
}

ensure_postgres() {
  if ! pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
    if ! command -v pg_ctlcluster >/dev/null; then apt_install postgresql; fi
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$version" ] || die "PostgreSQL is installed but has no cluster in /etc/postgresql"
    say "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start \
      || die "could not start PostgreSQL $version"
    wait_for 60 "PostgreSQL on $PG_HOST:$PG_PORT" pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
  fi
  # The default URL is the passwordless `postgres` user, as on this project's
  # machines. A stock Debian install asks for a password over TCP; then use a
  # `warren` role (created once, over the local socket) instead.
  if [ -z "${WARREN_DATABASE__URL:-}" ] && ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -qtAc 'select 1' >/dev/null 2>&1; then
    say "postgres needs a password over TCP here; using role warren"
    as_root su postgres -c "psql -qtAc \"DO \\\$\\\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'warren') THEN CREATE ROLE warren LOGIN CREATEDB PASSWORD 'warren'; END IF; END\\\$\\\$\"" \
      || die "could not create the warren role"
    export WARREN_DATABASE__URL="postgres://warren:warren@$PG_HOST:$PG_PORT/warren"
    export TEST_ADMIN_DATABASE_URL="postgres://warren:warren@$PG_HOST:$PG_PORT/postgres"
  fi
}

# Creates database $1 if it does not exist, as the configured user.
ensure_database() {
  local name=$1 url=${WARREN_DATABASE__URL:-postgres://postgres@$PG_HOST:$PG_PORT/warren}
  local admin=${url%/*}/postgres
  if [ "$(psql "$admin" -qtAc "select 1 from pg_database where datname = '$name'")" != 1 ]; then
    say "creating database $name"
    psql "$admin" -qc "CREATE DATABASE \"$name\"" || die "could not create database $name"
  fi
}

ensure_rabbitmq() {
  if ! port_open 127.0.0.1 "$AMQP_PORT"; then
    if ! command -v rabbitmq-server >/dev/null; then apt_install rabbitmq-server; fi
    say "starting RabbitMQ"
    as_root rabbitmq-server -detached || die "could not start RabbitMQ"
    wait_for 120 "RabbitMQ on port $AMQP_PORT" port_open 127.0.0.1 "$AMQP_PORT"
  fi
  if ! port_open 127.0.0.1 "$MGMT_PORT"; then
    say "enabling the RabbitMQ management and Prometheus plugins"
    as_root rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus >/dev/null \
      || die "could not enable the RabbitMQ management plugin"
    wait_for 120 "RabbitMQ management on port $MGMT_PORT" port_open 127.0.0.1 "$MGMT_PORT"
  fi
}

ensure_services() {
  ensure_postgres
  ensure_rabbitmq
}

# promtool checks the shipped Prometheus configuration and the metrics
# output in tests; Debian ships it in the `prometheus` package.
ensure_promtool() {
  command -v promtool >/dev/null || apt_install prometheus
}

# A virtualenv outside the clone holding exactly these pinned packages.
# One stamp file instead of asking pip: `pip show` is slow, and comparing
# its piped output with grep -q would trip pipefail.
ensure_venv() {
  local dir=$1 want=$2
  if [ "$(cat "$dir/.warren-pins" 2>/dev/null)" != "$want" ]; then
    say "installing $want into $dir"
    command -v python3 >/dev/null && python3 -c 'import ensurepip' 2>/dev/null \
      || apt_install python3 python3-venv
    python3 -m venv "$dir" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    # shellcheck disable=SC2086 # one argument per pinned package
    "$dir/bin/pip" install -q $want || die "pip install failed"
    echo "$want" >"$dir/.warren-pins"
  fi
}

# Python tools the tests use: schemathesis (property tests of the HTTP
# API) and kubernetes-validate (schemas of deploy/k8s).
PY_VENV=$HOME/.cache/warren/venv
# Schemathesis's stateful phase (following the document's links), in a
# venv of its own: it needs a newer hypothesis than the one above.
ST_STATEFUL_VENV=$HOME/.cache/warren/venv-stateful
ensure_python_tools() {
  # hypothesis from 6.136 describes lambdas by parsing their source, which
  # trips CPython 3.11's "AST constructor recursion depth mismatch" bug
  # (fixed in later CPython releases) inside schemathesis's coverage phase;
  # 6.135.0 predates that code and satisfies schemathesis's >=6.130.12.
  ensure_venv "$PY_VENV" "schemathesis==4.32.5 hypothesis==6.135.0 kubernetes-validate==1.37.0"
  # 6.135.0's stateful rules repr themselves with dataclasses.asdict, which
  # deep-copies a lock and fails ("cannot pickle '_thread.lock' object")
  # before the first request; later releases do not. Should the bug above
  # strike there, schemathesis.sh runs the phase once more.
  ensure_venv "$ST_STATEFUL_VENV" "schemathesis==4.32.5 hypothesis==6.170.27"
}

# Celery and Flower from PyPI, pinned, for the interoperability tests: a
# Python producer and its result.get(), a real Celery worker running
# Python task code behind Warren's API, and Flower watching Warren workers.
CELERY_VENV=$HOME/.cache/warren/celery-venv
ensure_celery() {
  # SQLAlchemy: the database result backend a canvas test's client uses;
  # psycopg2: the same backend on PostgreSQL, the benchmark's Celery peer.
  ensure_venv "$CELERY_VENV" "celery==5.7.0 flower==2.2.0 sqlalchemy==2.0.44 psycopg2-binary==2.9.10"
  export TEST_CELERY_PYTHON=$CELERY_VENV/bin/python
}

# The benchmark's peers (warren-bench peers): rusty-celery, a project of
# its own built with its own lockfile and target directory, and Celery
# from the venv above.
ensure_peers() {
  ensure_celery
  local dir=$WARREN_ROOT/crates/bench/peers/rusty-celery
  local target=$HOME/.cache/warren/peers-target
  say "building the rusty-celery peer"
  cargo build --release --locked --quiet --manifest-path "$dir/Cargo.toml" --target-dir "$target" \
    || die "building the rusty-celery peer failed"
  export BENCH_RUSTY_CELERY=$target/release/rusty-celery-peer
  export BENCH_CELERY_PYTHON=$TEST_CELERY_PYTHON
}

# The dashboard's browser tests drive Debian's Chromium through its
# WebDriver (chromedriver); the tests find them at these paths.
ensure_chromium() {
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    apt_install chromium chromium-driver fonts-dejavu-core
  fi
  export TEST_CHROMIUM=${TEST_CHROMIUM:-/usr/bin/chromium}
  export TEST_CHROMEDRIVER=${TEST_CHROMEDRIVER:-/usr/bin/chromedriver}
}

ensure_cargo() {
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs), then run this again"
}

# Removes what an interrupted test or benchmark run (Ctrl-C, SIGKILL: no
# cleanup ran) left behind: their databases nobody is connected to, and
# queues and exchanges whose database is gone. Resources of a run in
# progress are left alone: its databases are in use, and its prefixes still
# have a database.
sweep_test_leftovers() {
  local admin=${TEST_ADMIN_DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}
  local db
  for db in $(psql "$admin" -qtAc "select datname from pg_database where datname like 'warren\_test\_%' or datname like 'warren\_st\_%' or datname like 'warren\_bench\_%'"); do
    psql "$admin" -qc "DROP DATABASE \"$db\"" >/dev/null 2>&1 && say "swept leftover database $db"
  done
  local kind name
  while read -r kind name; do
    curl -fsS -u guest:guest -X DELETE "http://127.0.0.1:$MGMT_PORT/api/$kind/$name" >/dev/null 2>&1 \
      && say "swept leftover ${kind%s} $name"
  done < <(broker_leftovers)
  return 0
}

# Prints "<kind> <path>" (kind: queues, exchanges, policies, vhosts) for
# what test and benchmark prefixes left on the broker: queues, exchanges
# and policies named <kind>-<prefix>.* (Warren's, and the Celery-named
# queues some tests declare) and vhosts t-<prefix>, whose database is gone.
broker_leftovers() {
  local admin=${TEST_ADMIN_DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}
  local live kind name prefix
  live=$(psql "$admin" -qtAc "select substr(datname, 13, 12) from pg_database where datname like 'warren\_test\_%'
                              union all select substr(datname, 11, 12) from pg_database where datname like 'warren\_st\_%'
                              union all select substr(datname, 14, 12) from pg_database where datname like 'warren\_bench\_%'")
  for kind in queues exchanges policies; do
    for name in $(curl -fsS -u guest:guest "http://127.0.0.1:$MGMT_PORT/api/$kind/%2F?columns=name" 2>/dev/null \
        | grep -o '"name":"\(t\|st\|bench\)-[0-9a-f]\{12\}\.[^"]*"' | cut -d'"' -f4); do
      prefix=${name#*-}
      prefix=${prefix:0:12}
      grep -qx "$prefix" <<<"$live" || echo "$kind %2F/$name"
    done
  done
  for name in $(curl -fsS -u guest:guest "http://127.0.0.1:$MGMT_PORT/api/vhosts?columns=name" 2>/dev/null \
      | grep -o '"name":"t-[0-9a-f]\{12\}"' | cut -d'"' -f4); do
    grep -qx "${name#t-}" <<<"$live" || echo "vhosts $name"
  done
}

# The local system of scripts/up.sh and scripts/scale.sh: release binaries,
# logs and pid files in .run/ (worker-<n>.pid, one per replica).
RUN_DIR=$WARREN_ROOT/.run
RELEASE_BIN=$CARGO_TARGET_DIR/release

# Replica n serves /metrics, /healthz and /readyz on 127.0.0.1:(base + n),
# so local Prometheus and the scripts below can find each one.
WORKER_PORT_BASE=${WORKER_PORT_BASE:-9100}
worker_addr() { echo "127.0.0.1:$((WORKER_PORT_BASE + $1))"; }

# Starts worker replica number $1 in the background.
start_worker() {
  mkdir -p "$RUN_DIR"
  WARREN_WORKER__METRICS_LISTEN=$(worker_addr "$1") \
    nohup "$RELEASE_BIN/warren-worker" >"$RUN_DIR/worker-$1.log" 2>&1 &
  echo $! >"$RUN_DIR/worker-$1.pid"
}

# Waits until replicas $@ answer /readyz (consuming, database reachable).
wait_for_workers() {
  local n
  for n in "$@"; do
    wait_for 60 "worker $n to be ready (see .run/worker-$n.log)" \
      curl -fs -o /dev/null "http://$(worker_addr "$n")/readyz"
  done
}

# Numbers of the worker replicas that are running, ascending.
running_workers() {
  local f n
  shopt -s nullglob
  for f in "$RUN_DIR"/worker-*.pid; do
    n=${f##*/worker-}
    n=${n%.pid}
    kill -0 "$(cat "$f")" 2>/dev/null && echo "$n"
  done | sort -n
  shopt -u nullglob
}
