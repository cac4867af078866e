#!/usr/bin/env bash
# Interoperability tests: a real `borough serve` driven by third-party
# NGSI-LD software: Orange's ngsildclient (Python, clients/python), ngsijs
# (Node.js, clients/js), and FIWARE's IoT Agent library (clients/iotagent),
# which registers its devices' commands on Borough and receives them through
# the local Mosquitto (127.0.0.1:1883).
#
# Installs what it needs when missing or changed: a Python venv in
# target/client-venv with the pinned packages below, and clients/js's npm
# packages (`npm ci` from its package-lock.json). Then starts the server
# ($BOROUGH_BIN, default target/debug/borough; it is not built here) on a free
# loopback port with a temporary data directory and no MQTT broker, waits for
# /health, runs both suites with BOROUGH_URL set, stops the server, and exits
# non-zero if either suite failed. The server's log is kept in
# target/client-tests/borough.log (BOROUGH_LOG_LEVEL, default info).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

PY_REQUIREMENTS=("ngsildclient==0.5.2" "pytest==9.2.0")
VENV="$ROOT/target/client-venv"
BIN="${BOROUGH_BIN:-$ROOT/target/debug/borough}"
OUT="$ROOT/target/client-tests"

log() { printf '\n==> %s\n' "$*"; }

# --- Python venv ------------------------------------------------------------
want="$(printf '%s\n' "${PY_REQUIREMENTS[@]}")"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$want" ]; then
  log "python venv ($VENV): ${PY_REQUIREMENTS[*]}"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}"
  printf '%s\n' "$want" >"$VENV/.requirements"
fi

# --- npm packages -----------------------------------------------------------
JS="$ROOT/clients/js"
IOTA="$ROOT/clients/iotagent"
for dir in "$JS" "$IOTA"; do
  if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.borough-lock" 2>/dev/null; then
    log "npm ci ($dir)"
    (cd "$dir" && npm ci --no-audit --no-fund)
    cp "$dir/package-lock.json" "$dir/node_modules/.borough-lock"
  fi
done

# --- the server -------------------------------------------------------------
# The binary may be replaced by a build in progress: give it a moment.
for _ in $(seq 60); do
  [ -x "$BIN" ] && break
  sleep 1
done
if [ ! -x "$BIN" ]; then
  echo "no borough binary at $BIN (build it, or set BOROUGH_BIN)" >&2
  exit 2
fi

mkdir -p "$OUT"
DATA="$(mktemp -d)"
SERVER_OUT="$OUT/borough.stdout"
SERVER_LOG="$OUT/borough.log"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT

log "starting $BIN"
# The clients' tests subscribe endpoints on loopback.
# Secured as `borough serve` is by default: the clients send the operator
# key as a bearer token, and their per-run tenants are registered on first write.
KEY_FILE="$DATA/operator.key"
"$BIN" serve --http 127.0.0.1:0 --data "$DATA/store" --mqtt off --allow-outbound loopback \
  --auth on --operator-key-file "$KEY_FILE" --auto-create-tenants \
  --log-level "${BOROUGH_LOG_LEVEL:-info}" >"$SERVER_OUT" 2>"$SERVER_LOG" &
SERVER_PID=$!

# It prints `listening on http://ADDR` once the port is bound.
URL=""
for _ in $(seq 300); do
  URL="$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$SERVER_OUT" | head -n 1)"
  [ -n "$URL" ] && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "borough exited before listening:" >&2
    cat "$SERVER_OUT" "$SERVER_LOG" >&2
    exit 2
  fi
  sleep 0.1
done
if [ -z "$URL" ]; then
  echo "borough did not print its address within 30 s" >&2
  cat "$SERVER_LOG" >&2
  exit 2
fi

healthy=""
for _ in $(seq 100); do
  if curl -fsS "$URL/health" >/dev/null 2>&1; then
    healthy=1
    break
  fi
  sleep 0.1
done
if [ -z "$healthy" ]; then
  echo "borough at $URL did not answer /health" >&2
  exit 2
fi
echo "borough is up at $URL"
export BOROUGH_URL="$URL"
BOROUGH_API_KEY="$(cat "$KEY_FILE")"
export BOROUGH_API_KEY
# Anonymous calls are refused: the clients succeed because they send the key.
if [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/ngsi-ld/v1/types")" != "401" ]; then
  echo "borough answered an anonymous request: access control is not on" >&2
  exit 1
fi

# --- the suites -------------------------------------------------------------
log "ngsildclient (pytest clients/python)"
py_rc=0
(cd "$ROOT/clients/python" &&
  PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest -p no:cacheprovider -rfEs test_ngsildclient.py) || py_rc=$?

log "ngsijs (node --test clients/js)"
js_rc=0
(cd "$JS" && node --test ngsijs.test.mjs) || js_rc=$?

log "FIWARE IoT Agent library (node --test clients/iotagent)"
iota_rc=0
(cd "$IOTA" && node --test iotagent.test.mjs) || iota_rc=$?

log "client suites: ngsildclient exit $py_rc, ngsijs exit $js_rc, iotagent exit $iota_rc (server log: $SERVER_LOG)"
if [ "$py_rc" -ne 0 ] || [ "$js_rc" -ne 0 ] || [ "$iota_rc" -ne 0 ]; then
  exit 1
fi
