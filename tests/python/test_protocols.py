"""Every protocol the engine serves on its cleartext port, with real clients:
gRPC, gRPC-Web and Connect, over HTTP/2 (prior knowledge) and HTTP/1.1.

The engine binary (`WIRESTUB_ENGINE`, default target/debug/engine) is started
from the repository root as

    engine run --listen 127.0.0.1:0 --admin-listen off
               --rules rules --rules tests/node/rules

so it compiles protos/ and the bundled rules, plus tests/node/rules/ (a rich
error with details and templates, which the bundled example lacks).

What is checked:
- tests/node/protocols.test.mjs, run with `node --test`: one list of cases
  (tests/node/cases.mjs: unary answers and errors, response headers and
  trailers, deadlines, unknown methods, server, client and bidirectional
  streams) through connect-node's Connect (proto, JSON, GET), gRPC-Web
  (proto, JSON) and gRPC transports over HTTP/1.1 and HTTP/2, grpc-js, and
  protobuf-ts's fetch-based gRPC-Web transport (text and binary). Its
  dependencies are installed with `npm ci` in tests/node when
  tests/node/node_modules is missing.
- `buf curl` with --protocol connect, grpcweb and grpc, over HTTP/1.1 and
  HTTP/2 prior knowledge (gRPC needs HTTP/2: that cell is skipped), for a
  unary and a server-streaming call: every cell prints the same JSON as
  gRPC over HTTP/2 does, and what the rules say.

Environment:
  WIRESTUB_ENGINE  engine binary (default target/debug/engine)
  WIRESTUB_BUF     `buf` binary (default node_modules/.bin/buf at the
                   repository root, else tests/node/node_modules/.bin/buf)
  WIRESTUB_NODE    `node` binary (default: node on PATH; Node.js >= 20)
  WIRESTUB_NPM     `npm` binary (default: npm on PATH)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import engine_process
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = REPO_ROOT / "tests" / "node"
NODE_TEST = NODE_DIR / "protocols.test.mjs"
NODE_RULES = NODE_DIR / "rules"
NODE_TEST_TIMEOUT = 900
BUF_TIMEOUT = 60


# --------------------------------------------------------------------------
# Engine, node, npm and buf
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cmd = [
        str(engine_process.engine_binary()),
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--rules",
        "rules",
        "--rules",
        str(NODE_RULES.relative_to(REPO_ROOT)),
    ]
    srv = engine_process.start(cmd, tmp_path_factory.mktemp("protocols"))
    yield srv
    engine_process.stop(srv.proc)


@pytest.fixture(scope="session")
def buf(request) -> str:
    configured = os.environ.get("WIRESTUB_BUF")
    if configured:
        path = Path(configured)
        if not path.is_absolute():
            path = REPO_ROOT / path
        if not path.exists():
            pytest.fail(f"WIRESTUB_BUF={configured}: no such file")
        return str(path)
    root_buf = REPO_ROOT / "node_modules" / ".bin" / "buf"
    if root_buf.exists():
        return str(root_buf)
    # tests/node's package-lock.json pins @bufbuild/buf too.
    modules = request.getfixturevalue("node_modules")
    return str(modules / ".bin" / "buf")


# --------------------------------------------------------------------------
# tests/node/protocols.test.mjs
# --------------------------------------------------------------------------


def summarize_node_output(out: str) -> str:
    """The counts and, per transport (suite), the failed cases grouped by
    the first line of their error, from the spec reporter's output."""
    lines = out.splitlines()
    counts = [
        line
        for line in lines
        if re.match(r"ℹ (tests|pass|fail|skipped|cancelled) ", line)
    ]
    failures: dict[str, dict[str, list[str]]] = {}
    suite = ""
    for i, line in enumerate(lines):
        if line.startswith("✖ failing tests:"):
            break
        if line.startswith("▶ "):
            suite = line[2:].strip()
        elif line.startswith("  ✖ "):
            name = re.sub(r" \([\d.]+ms\)$", "", line[4:].strip())
            reason = next(
                (nxt.strip() for nxt in lines[i + 1 : i + 4] if nxt.strip()), ""
            )
            failures.setdefault(suite, {}).setdefault(reason[:400], []).append(name)
    passed = [line[2:] for line in lines if line.startswith("✔ ")]
    parts = ["\n".join(counts)]
    if passed:
        parts.append("transports with every case passed or skipped:\n  " + "\n  ".join(passed))
    for suite, reasons in failures.items():
        total = sum(len(names) for names in reasons.values())
        block = [f"{suite}: {total} failed"]
        for reason, names in reasons.items():
            block.append(f"  {len(names)} x {reason}")
            block += [f"      - {n}" for n in names]
        parts.append("\n".join(block))
    return "\n\n".join(parts)


def test_node_clients_over_every_protocol(server, node, node_modules):
    env = dict(os.environ)
    env.update(
        {
            "WIRESTUB_ADDR": f"127.0.0.1:{server.port}",
            "WIRESTUB_NODE_RULES": "1",
            "NO_COLOR": "1",
        }
    )
    env.pop("WIRESTUB_TRANSPORTS", None)
    if os.environ.get("WIRESTUB_BUF"):
        env["WIRESTUB_BUF"] = str(Path(os.environ["WIRESTUB_BUF"]).resolve())
    cmd = [node, "--test", "--test-reporter=spec", str(NODE_TEST.relative_to(REPO_ROOT))]
    try:
        run = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NODE_TEST_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"`{' '.join(cmd)}` still running after {NODE_TEST_TIMEOUT}s\n"
            f"output so far:\n{e.stdout or ''}\nengine log:\n{server.log()}"
        )
    # The whole report, shown by pytest with the failure.
    print(run.stdout)
    print(run.stderr)
    assert run.returncode == 0, (
        f"`{' '.join(cmd)}` exited with {run.returncode} "
        f"(WIRESTUB_ADDR=127.0.0.1:{server.port}); the full report is in the "
        f"captured stdout.\n\n{summarize_node_output(run.stdout)}\n\n"
        f"stderr: {run.stderr[-2000:]}\nengine log:\n{server.log()}"
    )
    assert server.alive(), f"the engine exited\n{server.log()}"


# --------------------------------------------------------------------------
# buf curl: --protocol × HTTP version
# --------------------------------------------------------------------------

# Two calls, with what the bundled rules answer (proto JSON, as buf prints it).
CALLS = {
    # helloworld.Greeter/SayHello matched on a field and a request header.
    "unary": {
        "path": "helloworld.Greeter/SayHello",
        "data": {"name": "admin"},
        "headers": ["x-role: root"],
        "expect": [{"message": "Welcome back, root"}],
    },
    # chat.v1.Chat/Subscribe, room "general": three messages, then the end.
    "server-stream": {
        "path": "chat.v1.Chat/Subscribe",
        "data": {"room": "general"},
        "headers": [],
        "expect": [
            {"user": "ann", "text": "hello", "seq": 1},
            {"user": "bob", "text": "hi ann", "seq": 2},
            {"user": "ann", "text": "bye", "seq": 3},
        ],
    },
}

PROTOCOLS = ["connect", "grpcweb", "grpc"]
HTTP_VERSIONS = ["http1.1", "http2"]
REFERENCE = ("grpc", "http2")


def buf_curl(buf: str, server, call: str, protocol: str, http: str):
    spec = CALLS[call]
    cmd = [buf, "curl", "--schema", "protos", "--protocol", protocol]
    if http == "http2":
        cmd.append("--http2-prior-knowledge")
    for h in spec["headers"]:
        cmd += ["-H", h]
    cmd += [
        "-d",
        json.dumps(spec["data"]),
        f"http://127.0.0.1:{server.port}/{spec['path']}",
    ]
    return cmd, subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BUF_TIMEOUT,
    )


def json_documents(text: str) -> list:
    """The JSON values buf printed, one per message."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        value, i = decoder.raw_decode(text, i)
        out.append(value)


@pytest.fixture(scope="module")
def reference_outputs(buf, server) -> dict[str, str]:
    """What `buf curl` prints for each call with gRPC over HTTP/2, the
    protocol the engine has always served."""
    outputs = {}
    for call in CALLS:
        cmd, run = buf_curl(buf, server, call, *REFERENCE)
        assert run.returncode == 0, (
            f"reference call failed: {' '.join(cmd)} exited with {run.returncode}\n"
            f"stdout: {run.stdout}\nstderr: {run.stderr}\nengine log:\n{server.log()}"
        )
        outputs[call] = run.stdout
    return outputs


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("http", HTTP_VERSIONS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_buf_curl(buf, server, reference_outputs, protocol, http, call):
    if protocol == "grpc" and http == "http1.1":
        pytest.skip("gRPC needs HTTP/2: there is no gRPC over HTTP/1.1")
    cmd, run = buf_curl(buf, server, call, protocol, http)
    assert run.returncode == 0, (
        f"{' '.join(cmd)} exited with {run.returncode}\nstdout: {run.stdout}\n"
        f"stderr: {run.stderr}\nengine log:\n{server.log()}"
    )
    assert json_documents(run.stdout) == CALLS[call]["expect"], run.stdout
    assert run.stdout == reference_outputs[call], (
        f"--protocol {protocol} over {http} printed\n{run.stdout}\n"
        f"gRPC over HTTP/2 printed\n{reference_outputs[call]}"
    )
