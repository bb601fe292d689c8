#!/usr/bin/env bash
# The declared floors, tested: a fresh virtual environment with every direct dependency of
# the SDK and the server at the lowest version pyproject.toml allows (.ci/floors.py), then
# the API, SDK and optim tests. torch stays 2.13.0: any other version is a multi-GB CUDA
# download here (the CPU wheel of 2.13.0 is the one the package index serves this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
PY=${PYTHON:-python}

venv=${LOWEST_VENV:-$(mktemp -d)/venv}
"$PY" -m venv "$venv"
"$PY" .ci/floors.py server --pin torch==2.13.0 > "$venv/floors.txt"
echo "lowest versions: $(tr '\n' ' ' < "$venv/floors.txt")"
"$venv/bin/python" -m pip install -q -c "$venv/floors.txt" torch==2.13.0 -e ".[server]" \
  "pytest>=8,<9.1" "pytest-timeout>=2.2"

# The tests that need nothing beyond the server extra (no demo or test-only packages).
"$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" --durations=5 \
  tests/test_api.py tests/test_sync.py tests/test_settings.py tests/test_spec.py \
  tests/test_client_*.py tests/test_sdk_*.py tests/test_optim_*.py
