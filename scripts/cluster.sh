#!/usr/bin/env bash
# A local cluster on this machine for the cluster tests and warren-chaos:
# three RabbitMQ nodes (one Erlang cookie, quorum queues replicated on all
# three) and a PostgreSQL primary with a streaming standby. Everything runs
# on its own ports and data directories; the machine's default RabbitMQ
# (5672) and PostgreSQL (5432) are never stopped or reconfigured.
#
#   scripts/cluster.sh up | down | status | env
#   scripts/cluster.sh rabbit-kill N      kill -9 node N (1-3)
#   scripts/cluster.sh rabbit-start N     start node N again (it rejoins)
#   scripts/cluster.sh partition N        cut node N off from the other two
#   scripts/cluster.sh heal               remove every partition
#   scripts/cluster.sh pg-promote         promote the standby, retire the old
#                                         primary (kill -9), make it the new standby
#   scripts/cluster.sh pg-terminate       terminate every client session on the primary
#   scripts/cluster.sh leader QUEUE       the node number leading a quorum queue
#   scripts/cluster.sh members QUEUE      how many nodes hold a replica of it
#   scripts/cluster.sh wait-healthy       until three nodes run unpartitioned and both databases answer
#   scripts/cluster.sh wait-healthy-now   whether they do now (exit status)
#
# Layout: node N's AMQP listener is 127.0.0.1:568N, its management API
# 127.0.0.1:1568N, its Erlang distribution 127.0.0.1N:2568N. Each node lives
# on its own loopback address (127.0.0.11-13) and dials out from it, so a
# partition is three iptables rules between addresses, on a chain of our own
# (WARREN_CHAOS) that `heal` and `down` flush. Clients use 127.0.0.1 and are
# never cut off. PostgreSQL runs on 127.0.0.1:5491 and :5492; which one is
# primary changes with each promotion (`env` prints the URLs).
#
# Env: CHAOS_CLUSTER_DIR (default /var/tmp/warren-cluster; PostgreSQL's
# user must be able to reach it, so not under /root).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

DIR=${CHAOS_CLUSTER_DIR:-/var/tmp/warren-cluster}
NODES=(1 2 3)
EPMD_PORT=4371
PG_PORTS=(5491 5492)
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
CHAIN=WARREN_CHAOS
RMQ_BIN=/usr/lib/rabbitmq/bin

node_name() { echo "warren-c$1@127.0.0.1$1"; }
node_ip() { echo "127.0.0.1$1"; }
amqp_port() { echo $((5680 + $1)); }
mgmt_port() { echo $((15680 + $1)); }
dist_port() { echo $((25680 + $1)); }

# The environment every rabbitmq-* command of node N runs in: its own env
# file (not Debian's, which pins the default node), home (the cookie) and
# epmd on a port of our own that listens on the nodes' addresses.
rmq_run() {
  local n=$1 d="$DIR/rabbit$1" ip
  shift
  ip=$(node_ip "$n")
  env -u ERL_FLAGS -u NODENAME HOME="$d" \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_NODENAME="$(node_name "$n")" RABBITMQ_USE_LONGNAME=true \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
    RABBITMQ_DIST_PORT="$(dist_port "$n")" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_PID_FILE="$d/pid" ERL_EPMD_PORT=$EPMD_PORT \
    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel net_ticktime 10 -kernel inet_dist_use_interface {${ip//./,}} -kernel inet_dist_connect_options [{ip,{${ip//./,}}}]" \
    "$@"
}

# Bounded: a paused or cut-off node can leave rabbitmqctl waiting.
rmqctl() { local n=$1; shift; rmq_run "$n" timeout 60 "$RMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@"; }

ensure_epmd() {
  port_open 127.0.0.11 $EPMD_PORT && return
  epmd -daemon -port $EPMD_PORT -address 127.0.0.1,127.0.0.11,127.0.0.12,127.0.0.13
  wait_for 10 "epmd on port $EPMD_PORT" port_open 127.0.0.11 $EPMD_PORT
}

rabbit_configure() {
  local n=$1 d="$DIR/rabbit$1"
  mkdir -p "$d/log" "$d/mnesia"
  cat "$DIR/cookie" >"$d/.erlang.cookie"
  chmod 400 "$d/.erlang.cookie"
  : >"$d/rabbitmq-env.conf"
  echo '[rabbitmq_management].' >"$d/enabled_plugins"
  cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.default = $(amqp_port "$n")
management.tcp.port = $(mgmt_port "$n")
management.tcp.ip = 127.0.0.1
# A node cut off from the majority stops serving clients, so they move to
# a node that can still commit (RabbitMQ's advice for quorum queues).
cluster_partition_handling = pause_minority
consumer_timeout = 7200000
disk_free_limit.absolute = 100MB
loopback_users = none
EOF
}

rabbit_running() { port_open 127.0.0.1 "$(amqp_port "$1")"; }

rabbit_start() {
  local n=$1
  rabbit_running "$n" && return
  say "starting RabbitMQ node $(node_name "$n") on AMQP port $(amqp_port "$n")"
  (rmq_run "$n" setsid "$RMQ_BIN/rabbitmq-server" >"$DIR/rabbit$n/log/console.log" 2>&1 9>&- &)
  wait_for 90 "RabbitMQ node $n" rabbit_running "$n"
}

rabbit_kill() {
  local pid
  pid=$(cat "$DIR/rabbit$1/pid" 2>/dev/null || true)
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
  wait_for 30 "node $1 to stop" bash -c "! (exec 3<>/dev/tcp/127.0.0.1/$(amqp_port "$1")) 2>/dev/null"
}

rabbit_up() {
  ensure_rabbitmq_package
  ensure_epmd
  [ -f "$DIR/cookie" ] || (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/cookie")
  for n in "${NODES[@]}"; do rabbit_configure "$n"; done
  rabbit_start 1
  for n in 2 3; do
    rabbit_start "$n"
    if ! rmqctl "$n" cluster_status --formatter json | grep -q "$(node_name 1)"; then
      rmqctl "$n" stop_app >/dev/null
      rmqctl "$n" join_cluster "$(node_name 1)" >/dev/null
      rmqctl "$n" start_app >/dev/null
    fi
  done
  wait_for 60 "three running nodes" three_running
}

# Asked of each node in turn: a paused or dead node cannot answer.
three_running() {
  local n
  for n in "${NODES[@]}"; do
    rabbit_running "$n" || continue
    [ "$(rmqctl "$n" cluster_status --formatter json 2>/dev/null |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["running_nodes"]) - len(d.get("partitions") or {}))' 2>/dev/null)" = 3 ] && return 0
  done
  return 1
}

# Until whole; if not within 3 minutes, what is not, for whoever reads the log.
wait_healthy() {
  local deadline=$((SECONDS + 180)) n
  until healthy; do
    if [ $SECONDS -ge $deadline ]; then
      status >&2
      for n in "${NODES[@]}"; do
        rabbit_running "$n" && rmqctl "$n" cluster_status >&2 2>&1 | grep -iA4 "running nodes\|partitions\|alarms" >&2
      done
      die "timed out waiting for the cluster to be whole again"
    fi
    sleep 0.5
  done
}

healthy() { three_running && rabbit_running 1 && rabbit_running 2 && rabbit_running 3 && pg_ready 1 && pg_ready 2; }

ensure_rabbitmq_package() { [ -x "$RMQ_BIN/rabbitmq-server" ] || apt_install rabbitmq-server; }

# --- partitions --------------------------------------------------------------

chain_ready() {
  command -v iptables >/dev/null || apt_install iptables
  as_root iptables -N $CHAIN 2>/dev/null || true
  as_root iptables -C INPUT -j $CHAIN 2>/dev/null || as_root iptables -I INPUT -j $CHAIN
}

partition() {
  local n=$1 ip other
  chain_ready
  echo "$n" >"$DIR/partitioned"
  ip=$(node_ip "$n")
  for other in "${NODES[@]}"; do
    [ "$other" = "$n" ] && continue
    as_root iptables -A $CHAIN -s "$ip" -d "$(node_ip "$other")" -j DROP
    as_root iptables -A $CHAIN -s "$(node_ip "$other")" -d "$ip" -j DROP
  done
}

# Removes every partition. A node RabbitMQ paused (pause_minority) resumes
# by itself once it sees the majority again. If it is not serving a minute
# later its app is restarted, as an operator would; if that does not bring
# its listener back within 30 s either, the whole node is restarted, which
# is RabbitMQ's own advice for a partition Mnesia does not recover from
# (rabbitmq-server#17319: a node can stay paused after the heal). Each step
# is said, for whoever reads the chaos log.
heal() {
  command -v iptables >/dev/null || return 0
  as_root iptables -F $CHAIN 2>/dev/null || true
  [ -f "$DIR/partitioned" ] || return 0
  local n
  n=$(cat "$DIR/partitioned")
  rm -f "$DIR/partitioned"
  # Mnesia may count the node as running while RabbitMQ keeps it paused
  # with its listeners closed (seen on 3.10 under load): wait for its port.
  rejoined_within 60 "$n" && return 0
  say "node $n is still paused 60 s after the heal; restarting its app (rabbitmqctl start_app)"
  rmqctl "$n" stop_app >/dev/null 2>&1 || true
  rmqctl "$n" start_app >/dev/null 2>&1 || true
  rejoined_within 30 "$n" && return 0
  say "node $n is still not serving after start_app; restarting the node"
  rabbit_kill "$n"
  rabbit_start "$n"
}

rejoined_within() {
  local deadline=$((SECONDS + $1))
  until three_running && rabbit_running "$2"; do
    [ $SECONDS -ge $deadline ] && return 1
    sleep 1
  done
}

chain_remove() {
  command -v iptables >/dev/null || return 0
  heal
  as_root iptables -D INPUT -j $CHAIN 2>/dev/null || true
  as_root iptables -X $CHAIN 2>/dev/null || true
}

# --- PostgreSQL ---------------------------------------------------------------

as_pg() { runuser -u postgres -- "$@"; }
pg_dir() { echo "$DIR/pg$1"; }
pg_port() { echo "${PG_PORTS[$(($1 - 1))]}"; }
pg_primary() { cat "$DIR/pg-primary"; }
pg_standby() { [ "$(pg_primary)" = 1 ] && echo 2 || echo 1; }
pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$(pg_port "$1")"; }

pg_start() {
  local n=$1
  as_pg "$PG_BIN/pg_ctl" -D "$(pg_dir "$n")" -l "$(pg_dir "$n").log" -w -t 60 \
    -o "-p $(pg_port "$n") -k $DIR" start >/dev/null 9>&-
}

pg_init_primary() {
  local d
  d=$(pg_dir 1)
  as_pg "$PG_BIN/initdb" -D "$d" -A trust -U postgres >/dev/null
  cat >>"$d/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
wal_level = replica
# A commit waits until the standby has it: a promotion loses no commit
# anyone was told of (with asynchronous replication the last ones before
# the primary died are gone, and chaos counts them as lost). While no
# standby is connected, commits wait: that is the price of RPO 0.
synchronous_standby_names = '*'
synchronous_commit = on
max_wal_senders = 10
hot_standby = on
max_connections = 300
fsync = on
EOF
  echo "host replication all 127.0.0.1/32 trust" >>"$d/pg_hba.conf"
  echo 1 >"$DIR/pg-primary"
  pg_start 1
}

# A standby made from the primary with pg_basebackup (-R writes
# standby.signal and primary_conninfo), streaming from then on.
pg_make_standby() {
  local s=$1 p
  p=$(pg_primary)
  rm -rf "$(pg_dir "$s")"
  as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$(pg_port "$p")" -U postgres \
    -D "$(pg_dir "$s")" -R -X stream -c fast >/dev/null
  pg_start "$s"
}

pg_up() {
  [ -x "$PG_BIN/pg_ctl" ] || die "PostgreSQL server binaries not found (install postgresql)"
  chown postgres "$DIR"
  if [ ! -f "$DIR/pg-primary" ]; then pg_init_primary; else pg_ready "$(pg_primary)" || pg_start "$(pg_primary)"; fi
  pg_ready "$(pg_standby)" || pg_make_standby "$(pg_standby)"
}

# The standby becomes primary; the old primary is killed (as a failed
# machine would be) and rebuilt as the new standby, so the next promotion
# has somewhere to go.
pg_promote() {
  local old new
  old=$(pg_primary)
  new=$(pg_standby)
  pg_kill "$old"
  as_pg "$PG_BIN/pg_ctl" -D "$(pg_dir "$new")" -w promote >/dev/null
  echo "$new" >"$DIR/pg-primary"
  pg_make_standby "$old"
}

# The whole server at once, as a machine dying: the postmaster is stopped
# first so it forks nothing more, then it and every backend get SIGKILL
# together. (Killing the postmaster alone leaves its backends running, and
# committing, for a moment after the standby was promoted.)
pg_kill() {
  local pid
  pid=$(head -1 "$(pg_dir "$1")/postmaster.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -STOP "$pid" 2>/dev/null || true
    # shellcheck disable=SC2046
    kill -9 "$pid" $(pgrep -P "$pid") 2>/dev/null || true
  fi
  wait_for 30 "PostgreSQL $1 to stop" bash -c "! (exec 3<>/dev/tcp/127.0.0.1/$(pg_port "$1")) 2>/dev/null"
  rm -f "$(pg_dir "$1")/postmaster.pid" "$DIR/.s.PGSQL.$(pg_port "$1")" "$DIR/.s.PGSQL.$(pg_port "$1").lock"
}

pg_terminate() {
  "$PG_BIN/psql" -qAt -h 127.0.0.1 -p "$(pg_port "$(pg_primary)")" -U postgres -d postgres -c \
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
}

# --- whole cluster -------------------------------------------------------------

cluster_env() {
  local urls="" n
  for n in "${NODES[@]}"; do urls+="${urls:+;}amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"; done
  echo "CHAOS_CLUSTER_AMQP_URLS='$urls'"
  echo "CHAOS_CLUSTER_MANAGEMENT_URL=http://127.0.0.1:$(mgmt_port 1)"
  echo "CHAOS_CLUSTER_DATABASE_URL='postgres://postgres@127.0.0.1:${PG_PORTS[0]},127.0.0.1:${PG_PORTS[1]}/postgres?target_session_attrs=read-write'"
  echo "CHAOS_CLUSTER_PG_PRIMARY_PORT=$(pg_port "$(pg_primary)")"
}

leader() { # the node number leading quorum queue $1 on vhost /, asked of any node that answers
  local name="" n
  for n in "${NODES[@]}"; do
    rabbit_running "$n" || continue
    name=$(rmqctl "$n" list_queues name leader --formatter json 2>/dev/null |
      python3 -c 'import json,sys; q=sys.argv[1]; print(next((r["leader"] for r in json.load(sys.stdin) if r["name"]==q),""))' "$1" 2>/dev/null) || true
    [ -n "$name" ] && break
  done
  [ -n "$name" ] || die "no node knows a leader for quorum queue $1"
  echo "$name" | sed -E 's/^warren-c([0-9])@.*/\1/'
}

members() { # how many nodes hold a replica of quorum queue $1
  local n
  for n in "${NODES[@]}"; do
    rabbit_running "$n" || continue
    rmqctl "$n" list_queues name members --formatter json 2>/dev/null |
      python3 -c 'import json,sys; q=sys.argv[1]; print(next((len(r["members"]) for r in json.load(sys.stdin) if r["name"]==q),0))' "$1" && return
  done
  echo 0
}

status() {
  local n
  for n in "${NODES[@]}"; do
    if rabbit_running "$n"; then echo "rabbit $n: running ($(node_name "$n"), amqp $(amqp_port "$n"))"; else echo "rabbit $n: down"; fi
  done
  [ -f "$DIR/pg-primary" ] || { echo "postgres: not created"; return; }
  for n in 1 2; do
    local role=standby
    [ "$n" = "$(pg_primary)" ] && role=primary
    if pg_ready "$n"; then echo "postgres $n: $role, port $(pg_port "$n")"; else echo "postgres $n: $role, down"; fi
  done
  as_root iptables -S $CHAIN 2>/dev/null | grep -c DROP | sed 's/^/partition rules: /' || true
}

down() {
  local n
  chain_remove
  for n in "${NODES[@]}"; do [ -d "$DIR/rabbit$n" ] && rabbit_kill "$n"; done
  for n in 1 2; do [ -d "$(pg_dir "$n")" ] && pg_kill "$n"; done
  pkill -f "epmd -daemon -port $EPMD_PORT" 2>/dev/null || true
  rm -rf "$DIR"
}

main() {
  case "${1:-}" in
    up)
      mkdir -p "$DIR"
      (flock -x 9; rabbit_up; pg_up) 9>"$DIR/.lock"
      status
      ;;
    down) down ;;
    status) status ;;
    env) cluster_env ;;
    rabbit-kill) rabbit_kill "$2" ;;
    rabbit-start) rabbit_start "$2" ;;
    partition) partition "$2" ;;
    heal) heal ;;
    pg-promote) pg_promote ;;
    pg-terminate) pg_terminate ;;
    leader) leader "$2" ;;
    members) members "$2" ;;
    wait-healthy) wait_healthy ;;
    wait-healthy-now) healthy ;;
    *) sed -n '2,25p' "$0" >&2; exit 2 ;;
  esac
}

main "$@"
