#!/usr/bin/env bash
# Runs every test of the workspace:
#   1. `cargo test --workspace` (unit, integration and e2e tests in Rust);
#   2. the grpcio end-to-end suite (tests/python/run.sh) against the debug
#      engine binary, built first with `cargo build -p wirestub-engine`.
# Both always run, so both print their usual summaries; the script exits
# non-zero if either fails. Honours CARGO_TARGET_DIR and WIRESTUB_VENV.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

target="${CARGO_TARGET_DIR:-target}"

echo "+ cargo test --workspace"
cargo_rc=0
cargo test --workspace || cargo_rc=$?

py_rc=0
echo "+ cargo build -p wirestub-engine"
if cargo build -p wirestub-engine; then
    echo "+ WIRESTUB_ENGINE=$target/debug/engine tests/python/run.sh"
    WIRESTUB_ENGINE="$target/debug/engine" tests/python/run.sh || py_rc=$?
else
    py_rc=$?
    echo "cargo build -p wirestub-engine failed: grpcio suite not run" >&2
fi

if [[ $cargo_rc -ne 0 || $py_rc -ne 0 ]]; then
    echo "test.sh: FAILED (cargo test exit $cargo_rc, grpcio suite exit $py_rc)" >&2
    exit 1
fi
echo "test.sh: cargo test and the grpcio suite passed"
