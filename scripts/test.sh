#!/usr/bin/env bash
# The test command (also what CI runs): formatting, lints, and every test,
# unit and end-to-end, against a real RabbitMQ and a real PostgreSQL, which
# it starts or installs first if needed; then schemathesis against the
# running API's /openapi.json.
#
#   scripts/test.sh          everything
#   scripts/test.sh celery   only tests whose name contains "celery" (after fmt, clippy, build)
#
# Env: CARGO_TARGET_DIR (default ~/.cache/warren/target), TEST_THREADS
# (default 4), TEST_LOG=1 to see the services' logs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$WARREN_ROOT"
started=$SECONDS

ensure_cargo
ensure_services
ensure_promtool
ensure_chromium
ensure_celery
sweep_test_leftovers

# Every test tears down what it declared: anything of a finished test still
# on the broker is a leak, named with its test, swept, and a failure.
check_no_test_leftovers() {
  local leaked prefix tests
  leaked=$(broker_leftovers | grep ' %2F/t-\| t-' || true)
  [ -z "$leaked" ] && return 0
  echo "$leaked" >&2
  for prefix in $(grep -o 't-[0-9a-f]\{12\}' <<<"$leaked" | sort -u); do
    tests=$(grep "^$prefix\. " "$TEST_PREFIX_LOG" | cut -d' ' -f2- || true)
    echo "$prefix left by: ${tests:-?}" >&2
  done
  sweep_test_leftovers
  die "the tests above left their queues, exchanges or vhosts on the broker"
}

say "promtool: Prometheus configuration, alert rules and their unit tests"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "building binaries (the end-to-end tests start real worker processes)"
cargo build --workspace --bins --locked
"$WARREN_ROOT/scripts/check-deploy.sh"
say "cargo test"
# The e2e tests mostly wait on I/O: more threads than cores is fine.
export TEST_PREFIX_LOG="$CARGO_TARGET_DIR/test-prefixes.log"
: >"$TEST_PREFIX_LOG"
TEST_BIN_DIR="$CARGO_TARGET_DIR/debug" \
  cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-4}" "$@"
check_no_test_leftovers

# A filtered run (scripts/test.sh celery) is for iterating; the chaos run
# is not filtered by test name, so it runs with the full suite only.
if [ $# -eq 0 ]; then
  say "chaos (a local RabbitMQ cluster and PostgreSQL standby; faults; the checker)"
  "$WARREN_ROOT/scripts/chaos.sh" short
fi

say "schemathesis (property-based, against /openapi.json)"
"$WARREN_ROOT/scripts/schemathesis.sh"

say "all checks passed in $((SECONDS - started))s"
