#!/usr/bin/env bash
# gpuhub's JupyterLab extension (labextension/): its npm dependencies, JupyterLab's own builder
# (@jupyterlab/builder, webpack module federation against the installed JupyterLab), the built
# assets into gpuhub/server/labextension (shipped in the package: setup.cfg's data_files put them
# under share/jupyter/labextensions/@gpuhub/labextension), and, for this checkout's editable
# install, a copy there in .venv. Also JupyterLab settings overrides for gpuhub's users (no
# "official Jupyter news" prompt). Needs node (scripts/install-system.sh) and the venv's JupyterLab.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
out=gpuhub/server/labextension
if [ ! -d labextension/node_modules/@jupyterlab/builder ] \
  || [ labextension/package.json -nt labextension/node_modules/.package-lock.json ]; then
  (cd labextension && npm_config_yes=true npm install --no-audit --no-fund)
fi
stamp=$out/package.json
if [ ! -f "$stamp" ] || [ -n "$(find labextension/lib labextension/style labextension/package.json -newer "$stamp" 2>/dev/null)" ]; then
  core=$("$VENV/bin/python" -c 'import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), "staging"))')
  rm -rf "$out"
  (cd labextension && node_modules/.bin/build-labextension --core-path "$core" .)
fi
dest=$VENV/share/jupyter/labextensions/@gpuhub/labextension
if ! diff -rq "$out" "$dest" >/dev/null 2>&1; then
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  cp -r "$out" "$dest"
fi
overrides=$VENV/share/jupyter/lab/settings/overrides.d
if ! cmp -s gpuhub/server/etc/lab/gpuhub.json "$overrides/gpuhub.json"; then
  mkdir -p "$overrides"
  cp gpuhub/server/etc/lab/gpuhub.json "$overrides/gpuhub.json"
fi
