#!/usr/bin/env bash
# Regenerates the dashboard's screenshots in docs/screenshots (shown in the
# README) from the browser tests, which visit every page in a real Chromium.
#
#   scripts/screenshots.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$WARREN_ROOT"
ensure_cargo
ensure_services
ensure_chromium
cargo build --workspace --bins --locked
out="$WARREN_ROOT/docs/screenshots"
mkdir -p "$out"
TEST_SCREENSHOTS="$out" TEST_BIN_DIR="$CARGO_TARGET_DIR/debug" \
  cargo test -p warren-tests --test e2e --locked -- dashboard::a_ dashboard::an_ dashboard::the_api_reference webhooks::webhook_deliveries_show \
    workflows::the_dashboard_shows schedules::the_dashboard_shows
say "screenshots in docs/screenshots: $(ls "$out" | tr '\n' ' ')"
