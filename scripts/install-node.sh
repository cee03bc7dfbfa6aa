#!/usr/bin/env bash
# Node programs from package.json, in the project's node_modules (node_modules/.bin goes on PATH):
# configurable-http-proxy (JupyterHub's proxy) and code-server (VS Code in the browser).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x node_modules/.bin/configurable-http-proxy ] && [ -x node_modules/.bin/code-server ]; then
  exit 0
fi
# @vscode/ripgrep downloads a binary from GitHub at install time; hand it Debian's rg instead,
# through the download cache it looks in first.
tmp=${TMPDIR:-/tmp}
cache="$tmp/vscode-ripgrep-cache-1.15.11"
tarball="$cache/ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz"
if [ ! -f "$tarball" ]; then
  staging=$(mktemp -d)
  mkdir -p "$cache" "$staging/bin"
  cp "$(command -v rg)" "$staging/bin/rg"
  tar -C "$staging/bin" -czf "$tarball" rg
  rm -rf "$staging"
fi
npm_config_yes=true npm_config_unsafe_perm=true npm install --no-audit --no-fund
