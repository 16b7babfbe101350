#!/usr/bin/env bash
# Runs every test of the workspace:
#   1. `cargo build --workspace`: the debug `engine` and `compiler` binaries,
#      which the e2e tests and the grpcio suite start as processes;
#   2. `cargo test --workspace` (unit, integration and e2e tests in Rust),
#      then the e2e cases, the health/reflection tests and the lifecycle
#      tests (swaps, drain, metrics) again with the engine on the reference
#      h2 stack (WIRESTUB_TEST_HTTP2=h2): both stacks must give the same
#      answers;
#   3. the grpcio end-to-end suite (tests/python/run.sh) against the debug
#      engine binary.
# The two test suites both run, so both print their usual summaries; the
# script exits non-zero if the build or either suite fails. Honours
# CARGO_TARGET_DIR and WIRESTUB_VENV.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

target="${CARGO_TARGET_DIR:-target}"

echo "+ cargo build --workspace"
cargo build --workspace

echo "+ cargo test --workspace"
cargo_rc=0
cargo test --workspace || cargo_rc=$?
echo "+ WIRESTUB_TEST_HTTP2=h2 cargo test -p wirestub-tests --test e2e --test builtin --test lifecycle"
WIRESTUB_TEST_HTTP2=h2 cargo test -p wirestub-tests --test e2e --test builtin --test lifecycle || cargo_rc=$?

echo "+ WIRESTUB_ENGINE=$target/debug/engine tests/python/run.sh"
py_rc=0
WIRESTUB_ENGINE="$target/debug/engine" tests/python/run.sh || py_rc=$?

if [[ $cargo_rc -ne 0 || $py_rc -ne 0 ]]; then
    echo "test.sh: FAILED (cargo test exit $cargo_rc, grpcio suite exit $py_rc)" >&2
    exit 1
fi
echo "test.sh: cargo test and the grpcio suite passed"
