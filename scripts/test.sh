#!/usr/bin/env bash
# Runs every test of Borough: formatting, lints, the unit/integration/HTTP/crash
# tests, and the quick variant of the benchmarks (so the harness never rots).
# Services the tests need (PostgreSQL for the benchmark baselines, Mosquitto
# for MQTT notifications) are started here when they are not already running.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

ensure_postgres() {
  if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    return
  fi
  log "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 30); do
    pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && return
    sleep 1
  done
  echo "PostgreSQL is not reachable on 127.0.0.1:5432; the benchmark baseline needs it" >&2
  exit 1
}

ensure_mosquitto() {
  if (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
    return
  fi
  log "starting Mosquitto"
  if command -v mosquitto >/dev/null 2>&1; then
    mosquitto -d -c /etc/mosquitto/mosquitto.conf || true
  fi
  for _ in $(seq 1 30); do
    (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && return
    sleep 1
  done
  echo "Mosquitto is not reachable on 127.0.0.1:1883; the MQTT tests need it" >&2
  exit 1
}

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

ensure_postgres
ensure_mosquitto

log "PostGIS for the geo benchmark baseline"
./scripts/setup-postgis.sh

log "VictoriaMetrics for the temporal benchmark baseline"
./scripts/setup-victoria-metrics.sh >/dev/null

log "cargo test"
cargo test --workspace

log "dashboard end-to-end tests (headless Chromium)"
./scripts/test-dashboard.sh

log "third-party NGSI-LD clients (ngsildclient, ngsijs)"
BOROUGH_BIN="$PWD/target/debug/borough" ./scripts/test-clients.sh

log "benchmarks, quick variant"
for scenario in entities query geo temporal dashboard mqtt federation cluster; do
  cargo run --quiet -p borough -- bench "$scenario" --quick --out "target/bench-results/$scenario-quick.json"
done
