#!/usr/bin/env bash
# Installs VictoriaMetrics (the baseline of `borough bench temporal`) from
# Debian's packages. Idempotent: does nothing when the package is already
# installed. Runs as root without prompts (uses sudo -n when not root).
# The bench starts its own VictoriaMetrics on loopback with a temporary
# storage directory; this script never starts or enables the packaged service.
#
# Prints nothing on stdout but, at the end, the path of the server binary
# (the bench looks for it on PATH as victoria-metrics, then in /usr/bin).
set -euo pipefail

log() { printf '==> %s\n' "$*" >&2; }

PACKAGE=victoria-metrics

binary() {
  for candidate in /usr/bin/victoria-metrics /usr/bin/victoria-metrics-prod; do
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  dpkg -L "$PACKAGE" 2>/dev/null | grep -E '/bin/victoria-metrics[^/]*$' | head -n1
}

if dpkg -s "$PACKAGE" >/dev/null 2>&1; then
  log "$PACKAGE is already installed"
  binary
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "setup-victoria-metrics: installing $PACKAGE needs root (run this script as root)" >&2
  exit 1
fi

# The package's maintainer scripts would start its service; keep them from
# doing so (policy-rc.d answers "not allowed" for the duration of the install).
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod +x "$POLICY"
  CREATED_POLICY=1
fi
cleanup() {
  if [ "$CREATED_POLICY" -eq 1 ]; then
    "${SUDO[@]}" rm -f "$POLICY"
  fi
}
trap cleanup EXIT

log "apt-get update"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
log "apt-get install $PACKAGE"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$PACKAGE" >&2

if ! dpkg -s "$PACKAGE" >/dev/null 2>&1; then
  echo "setup-victoria-metrics: $PACKAGE is still not installed after apt-get install" >&2
  exit 1
fi
log "$PACKAGE installed"
binary
