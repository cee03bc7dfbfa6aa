#!/usr/bin/env bash
# System packages: Chromium for the browser tests and the screenshots, the libraries code-server's
# native modules build against, ripgrep (code-server's search, packaged from Debian), and
# PostgreSQL 15 (the store's tests start throw-away servers of their own with its programs).
set -euo pipefail
packages=(chromium libkrb5-dev libxkbfile-dev libsecret-1-dev ripgrep build-essential python3-dev
  postgresql)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${missing[*]} (run as root or install them with apt-get)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
