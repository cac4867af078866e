#!/usr/bin/env bash
# End-to-end tests of the dashboard in headless Chromium (Debian's package,
# driven by playwright-core from npm): builds borough, then web/tests starts
# `borough serve` on a free port with a temporary data directory, loads a
# simulated city, drives the page and stops the server. Screenshots of each
# view go to target/dashboard-screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

if [ ! -x /usr/bin/chromium ]; then
  log "installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q chromium
fi

if [ ! -d web/node_modules/playwright-core ]; then
  log "npm ci (web/)"
  (cd web && npm ci --no-audit --no-fund)
fi

log "building borough"
cargo build --quiet -p borough
export BOROUGH_BIN="$PWD/target/debug/borough"
export SCREENSHOTS="$PWD/target/dashboard-screenshots"
rm -rf "$SCREENSHOTS"
mkdir -p "$SCREENSHOTS"

log "dashboard tests in headless Chromium"
(cd web && node --test --test-concurrency=1 tests/dashboard.test.mjs)
echo "screenshots: $SCREENSHOTS"
