#!/usr/bin/env bash
# Runs the grpcio end-to-end tests (tests/python/test_grpcio.py) in a venv.
#
# Environment:
#   WIRESTUB_VENV    venv directory to create or reuse (default .venv, relative
#                    to the repository root)
#   WIRESTUB_ENGINE  engine binary under test (default target/debug/engine)
#   PYTHON           interpreter used to create the venv (default python3)
# Extra arguments are passed to pytest.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

venv="${WIRESTUB_VENV:-.venv}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "+ $python -m venv $venv"
    "$python" -m venv "$venv"
fi
echo "+ $venv/bin/python -m pip install -q -r tests/python/requirements.txt"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt

echo "+ $venv/bin/python -m pytest -q tests/python $*"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/python "$@"
