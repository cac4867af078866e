#!/usr/bin/env bash
# Installs PostGIS for the local PostgreSQL (the baseline of `borough bench geo`)
# from Debian's packages. Idempotent: does nothing when the package is already
# installed. Runs as root without prompts (uses sudo -n when not root).
#
#   PG_MAJOR=15 scripts/setup-postgis.sh     # default: the installed server's major version, else 15
set -euo pipefail

log() { printf '==> %s\n' "$*" >&2; }

if [ -z "${PG_MAJOR:-}" ]; then
  PG_MAJOR=15
  if [ -d /usr/lib/postgresql ]; then
    # The newest installed server, e.g. /usr/lib/postgresql/15/bin/postgres.
    for dir in /usr/lib/postgresql/*/bin/postgres; do
      [ -e "$dir" ] || continue
      PG_MAJOR="$(basename "$(dirname "$(dirname "$dir")")")"
    done
  fi
fi
PACKAGE="postgresql-${PG_MAJOR}-postgis-3"

if dpkg -s "$PACKAGE" >/dev/null 2>&1; then
  log "$PACKAGE is already installed"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "setup-postgis: installing $PACKAGE needs root (run this script as root)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
log "apt-get install $PACKAGE"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$PACKAGE"

if ! dpkg -s "$PACKAGE" >/dev/null 2>&1; then
  echo "setup-postgis: $PACKAGE is still not installed after apt-get install" >&2
  exit 1
fi
log "$PACKAGE installed; CREATE EXTENSION postgis now works on PostgreSQL $PG_MAJOR"
