#!/usr/bin/env bash
# Installs this folder's npm packages (`npm ci` from package-lock.json) when
# node_modules is missing or was installed from another lock. The installed
# lock is remembered in node_modules/.borough-lock, as scripts/test-clients.sh
# does for clients/js. Fails when node or npm is missing.
set -euo pipefail
cd "$(dirname "$0")"

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "ensure.sh: $tool is not installed; the OIDC provider tests need Node.js 20 or later" >&2
    exit 2
  fi
done

# Two test runs at once must not both run `npm ci` into the same folder.
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/borough-oidc-provider-ensure.lock"
  flock 9
fi

if ! cmp -s package-lock.json node_modules/.borough-lock 2>/dev/null; then
  echo "==> npm ci (scripts/oidc-provider)" >&2
  npm ci --no-audit --no-fund >&2
  cp package-lock.json node_modules/.borough-lock
fi
