#!/usr/bin/env bash
# Runs the Python end-to-end tests (tests/python/test_*.py: grpcio, abuse
# cases, health and reflection with grpcio's clients and `buf curl`, the
# admin API, TLS) in a venv. `buf` comes from npm (@bufbuild/buf, installed
# into node_modules/ at the repository root when missing).
#
# Environment:
#   WIRESTUB_VENV    venv directory to create or reuse (default .venv, relative
#                    to the repository root)
#   WIRESTUB_ENGINE  engine binary under test (default target/debug/engine)
#   PYTHON           interpreter used to create the venv (default python3)
#   WIRESTUB_BUF     buf binary (default node_modules/.bin/buf)
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

if [[ -z "${WIRESTUB_BUF:-}" && ! -x node_modules/.bin/buf ]]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "buf is needed for the reflection tests: install npm (Debian: apt-get install npm)," >&2
        echo "or set WIRESTUB_BUF to a buf binary" >&2
        exit 1
    fi
    echo "+ npm install --no-save --no-audit --no-fund @bufbuild/buf@1.75.0"
    npm install --no-save --no-audit --no-fund --loglevel=error @bufbuild/buf@1.75.0
fi

echo "+ $venv/bin/python -m pytest -q tests/python $*"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/python "$@"
