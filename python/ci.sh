#!/usr/bin/env bash
# Builds the Python plug-in in its own venv and runs its tests, Prefect 3.9.1's standard
# WorkerCleanupQueue suite included. Needs only python3 (3.11+, with venv) and cargo.
#   bash python/ci.sh            # venv in python/.venv (reused when present)
#   CLEANUP_QUEUE_VENV=/x bash python/ci.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
venv="${CLEANUP_QUEUE_VENV:-$here/.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== python venv at $venv"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" --version

echo "== pip install prefect==3.9.1, pytest, pytest-asyncio, maturin"
"$venv/bin/python" -m pip install --quiet "prefect==3.9.1" "pytest>=8" "pytest-asyncio>=0.24" "maturin>=1.5,<2"

echo "== maturin develop --release"
VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --release --manifest-path "$here/Cargo.toml"

echo "== pytest"
# pytest exits non-zero on any failure, and with 5 when it collected no test.
"$venv/bin/python" -m pytest -p no:cacheprovider -v tests

echo "== Prefect's standard suite again, buffered durability (calls run inline on the event loop)"
CLEANUP_QUEUE_DURABILITY=buffered:50 "$venv/bin/python" -m pytest -p no:cacheprovider -q tests/test_standard_suite.py
