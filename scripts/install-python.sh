#!/usr/bin/env bash
# Python side: the hub's virtual environment (.venv: gpuhub itself, JupyterHub, the single-user server
# and the test tools) and one virtual environment per local catalogue environment (.envs/NAME), whose
# interpreter runs that environment's kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f .venv/.gpuhub-installed ] || [ setup.cfg -nt .venv/.gpuhub-installed ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[server,test]'
  touch .venv/.gpuhub-installed
fi
# An editable install leaves out setup.cfg's data_files, among them the file that enables the
# Jupyter Server extension in every single-user server (a wheel install brings it).
config_d=.venv/etc/jupyter/jupyter_server_config.d
if ! cmp -s gpuhub/server/etc/gpuhub.json "$config_d/gpuhub.json"; then
  mkdir -p "$config_d"
  cp gpuhub/server/etc/gpuhub.json "$config_d/gpuhub.json"
fi

# gpuhub's JupyterLab extension, built with JupyterLab's own toolchain (nothing fetched at run time).
bash scripts/build-labextension.sh

# Kernel environments of the default catalogue (config/catalog.yaml, `local.python`).
# Every kernel environment gets ipykernel, dill (notebook code in snapshots) and xxhash (fast
# snapshot checksums; without it snapshots fall back to CRC-32).
make_env() {
  local name=$1; shift
  local dir=.envs/$name
  if [ -f "$dir/.installed" ]; then
    "$dir/bin/python" -c "import xxhash" 2>/dev/null || "$dir/bin/pip" install -q xxhash
    return 0
  fi
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip
  "$dir/bin/pip" install -q ipykernel dill xxhash "$@"
  touch "$dir/.installed"
}
# torch==2.13.0 is the CPU build; the same catalogue entry runs CUDA builds on GPU machines.
make_env pytorch torch==2.13.0 numpy pandas
make_env tensorflow tensorflow-cpu pandas
