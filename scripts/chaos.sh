#!/usr/bin/env bash
# Fault injection on a local cluster (scripts/cluster.sh): warren-chaos runs
# a mixed workload while a nemesis kills, partitions, promotes and pauses,
# then checks that nothing accepted was lost or committed twice.
#
#   scripts/chaos.sh short          what CI runs (about 3 minutes, debug
#                                   binaries): every nemesis once, must be
#                                   clean; then a run with an injected bug
#                                   (a consumer that acks without committing),
#                                   which must report loss; the cluster is
#                                   brought up first and taken down after.
#   scripts/chaos.sh long [ARGS]    the published run: release binaries, 10
#                                   minutes, every nemesis at least 5 times
#   scripts/chaos.sh leader [ARGS]  kill the queue leader under 500 tasks/s
#   scripts/chaos.sh run ARGS       warren-chaos with your own arguments
#                                   (`warren-chaos --help`)
#
# Histories are written to target/chaos/*.json. The cluster is left as it
# was found: taken down if this script brought it up.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$WARREN_ROOT"

mode=${1:-short}
shift || true
out=$WARREN_ROOT/target/chaos
mkdir -p "$out"

ensure_cargo
ensure_services

# The whole workspace, as test.sh and bench.sh build it: a subset of
# packages unifies dependency features differently and rebuilt most
# dependencies a second time (5 minutes of a cold CI run).
profile=debug
if [ "$mode" != short ]; then
  say "building release binaries"
  cargo build --release --locked --workspace --bins
  profile=release
else
  cargo build --locked --workspace --bins
fi
chaos=("$CARGO_TARGET_DIR/$profile/warren-chaos" --bin-dir "$CARGO_TARGET_DIR/$profile")

# A cluster already running whole is used and left running; anything else
# (nothing, or what a killed run left behind) is wiped and brought up, and
# taken down at the end.
brought_up=false
if ! scripts/cluster.sh wait-healthy-now 2>/dev/null; then
  scripts/cluster.sh down
  brought_up=true
fi
cleanup() {
  scripts/cluster.sh heal || true
  if $brought_up; then scripts/cluster.sh down || true; fi
}
trap cleanup EXIT
scripts/cluster.sh up
eval "$(scripts/cluster.sh env)"
export CHAOS_CLUSTER_AMQP_URLS

case "$mode" in
  short)
    say "chaos: every nemesis once; lost, double-committed, stuck must all be 0"
    "${chaos[@]}" --duration 30 --rate 20 --gap 2 --hold 12 --each-at-least 1 \
      --quiesce 60 --expect-clean --out "$out/short.json"
    say "chaos: the checker against an injected bug (acks without committing); must report loss"
    "${chaos[@]}" --duration 12 --rate 20 --nemeses none --inject-bug ack-without-commit \
      --quiesce 8 --expect-loss --out "$out/injected-bug.json"
    ;;
  long)
    "${chaos[@]}" --duration 600 --rate 40 --gap 5 --hold 20 --each-at-least 5 \
      --concurrency 16 --expect-clean --out "$out/long.json" "$@"
    ;;
  leader)
    "${chaos[@]}" --duration 120 --rate 50 --batches-only --nemeses kill-leader --gap 20 \
      --each-at-least 3 --concurrency 32 --expect-clean --out "$out/leader.json" "$@"
    ;;
  run) "${chaos[@]}" "$@" ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac

if $brought_up; then
  scripts/cluster.sh down
  brought_up=false
  say "cluster down; checking that nothing of it is left"
  for port in 5681 5682 5683 5491 5492 4371; do
    port_open 127.0.0.1 "$port" && die "port $port still open after cluster.sh down"
  done
  if command -v iptables >/dev/null && as_root iptables -S 2>/dev/null | grep -q WARREN_CHAOS; then
    die "the WARREN_CHAOS firewall chain is still there"
  fi
  port_open 127.0.0.1 "$AMQP_PORT" || die "the machine's RabbitMQ is no longer answering"
  port_open "$PG_HOST" "$PG_PORT" || die "the machine's PostgreSQL is no longer answering"
fi
say "chaos $mode passed"
