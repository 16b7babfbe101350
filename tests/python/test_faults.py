"""Transport faults (tests/python/fault_rules) as real clients see them.

Each fault a rule injects (RST_STREAM with a chosen code, GOAWAY graceful
or immediate, the TCP connection closed, reads or writes stalled, the
output trickled, a malformed frame) is observed by grpcio and by
@grpc/grpc-js (tests/node/faults.mjs) as the status gRPC's documentation
predicts: a RST_STREAM code maps as gRPC's HTTP/2 protocol says (CANCEL is
CANCELLED, INTERNAL_ERROR is INTERNAL), a lost connection is UNAVAILABLE,
a stall past the deadline is DEADLINE_EXCEEDED. The journal and the
metrics name every fault; `--seed` makes which calls a rate picks repeat.
"""

import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import engine_process
import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FAULT_RULES = Path(__file__).resolve().parent / "fault_rules"
NODE_DIR = REPO_ROOT / "tests" / "node"

# (request name, status both clients report, replies grpcio gets)
UNARY = [
    ("reset-cancel", "CANCELLED"),
    ("reset-internal", "INTERNAL"),
    ("reset-after-reply", "CANCELLED"),
    ("goaway-immediate", "UNAVAILABLE"),
    ("close", "UNAVAILABLE"),
    ("malformed", "INTERNAL"),
    ("goaway-graceful", "OK"),
    ("trickle", "OK"),
]
# (room, status, messages before it)
STREAMS = [("reset-after-2", "CANCELLED", 2), ("close-after-1", "UNAVAILABLE", 1)]


class Engine:
    def __init__(self, proc, port, admin_port):
        self.proc, self.port, self.admin_port = proc, port, admin_port


def start(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = ["run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    args += ["--rules", "rules", "--rules", str(FAULT_RULES), "--journal", "1000", *extra]
    proc, port, admin_port, _ = engine_process.start_with_admin(args, tmp_path)
    return Engine(proc, port, admin_port)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start(tmp_path_factory.mktemp("faults"))
    yield srv
    engine_process.stop(srv.proc)


def unary(port, name, timeout=3.0, channel=None):
    """Calls SayHello; returns (status name, reply or None, seconds)."""
    own = channel is None
    channel = channel or grpc.insecure_channel(f"127.0.0.1:{port}")
    say = channel.unary_unary("/helloworld.Greeter/SayHello")
    request = b"\x0a" + bytes([len(name)]) + name.encode()
    started = time.monotonic()
    try:
        reply = say(request, timeout=timeout)
        return "OK", reply, time.monotonic() - started
    except grpc.RpcError as e:
        return e.code().name, None, time.monotonic() - started
    finally:
        if own:
            channel.close()


@pytest.mark.parametrize("name,status", UNARY)
def test_grpcio_sees_each_unary_fault(server, name, status):
    code, reply, _ = unary(server.port, name)
    assert code == status, f"{name}: {code}"
    if status == "OK":
        assert reply and len(reply) > 5


@pytest.mark.parametrize("room,status,before", STREAMS)
def test_grpcio_sees_stream_faults_after_n_messages(server, room, status, before):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        subscribe = ch.unary_stream("/chat.v1.Chat/Subscribe")
        got = []
        with pytest.raises(grpc.RpcError) as e:
            for m in subscribe(b"\x0a" + bytes([len(room)]) + room.encode(), timeout=3):
                got.append(m)
        assert e.value.code().name == status
        assert len(got) == before


def test_graceful_goaway_lets_the_call_finish_and_the_client_reconnects(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        assert unary(server.port, "goaway-graceful", channel=ch)[0] == "OK"
        # The drained connection closes; the channel opens another.
        assert unary(server.port, "anyone", channel=ch)[0] == "OK"


def test_stalled_writes_hit_the_deadline_while_another_client_is_served(server):
    result = {}
    slow = threading.Thread(target=lambda: result.update(stalled=unary(server.port, "stall-write", timeout=1.0)))
    slow.start()
    time.sleep(0.2)
    code, _, _ = unary(server.port, "anyone")
    assert code == "OK"
    slow.join()
    assert result["stalled"][0] == "DEADLINE_EXCEEDED"


def test_stalled_reads_hold_the_next_call_on_that_connection_only(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        assert unary(server.port, "stall-read", channel=ch)[0] == "OK"
        # The connection is not read for 1.5 s: the next call on it waits.
        code, _, _ = unary(server.port, "anyone", timeout=0.7, channel=ch)
        assert code == "DEADLINE_EXCEEDED"
        # Another connection is served meanwhile.
        assert unary(server.port, "anyone")[0] == "OK"


def test_trickle_sends_the_whole_answer_slowly(server):
    # About 80 bytes of frames, 4 every 20 ms: well over 200 ms.
    code, reply, seconds = unary(server.port, "trickle")
    assert code == "OK" and b"a few bytes at a time" in reply
    assert seconds > 0.2


def test_journal_and_metrics_name_the_faults(server):
    unary(server.port, "reset-cancel")
    unary(server.port, "close")
    admin = f"http://127.0.0.1:{server.admin_port}"
    with urllib.request.urlopen(f"{admin}/admin/journal?limit=50", timeout=10) as r:
        entries = json.load(r)["entries"]
    faults = {e.get("fault"): e["status"]["name"] for e in entries if e.get("fault")}
    assert faults.get("RST_STREAM CANCEL after 0 message(s)") == "CANCELLED", faults
    assert faults.get("TCP close after 0 message(s)") == "UNAVAILABLE", faults
    with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    for kind in ("reset", "close"):
        line = f'wirestub_injected_faults_total{{grpc_service="helloworld.Greeter",grpc_method="SayHello",kind="{kind}"}}'
        assert line in metrics, metrics


def outcomes(tmp_path, seed):
    srv = start(tmp_path, "--seed", str(seed), "--workers", "1")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            return [unary(srv.port, "half", channel=ch)[0] for _ in range(24)]
    finally:
        engine_process.stop(srv.proc)


def test_a_fault_rate_repeats_under_the_same_seed(tmp_path):
    a = outcomes(tmp_path / "a", 7)
    b = outcomes(tmp_path / "b", 7)
    assert a == b
    assert set(a) == {"OK", "CANCELLED"}, a


def test_grpc_js_sees_each_fault(server, node, node_modules):
    calls = [{"name": n, "method": "unary", "request": n} for n, _ in UNARY]
    calls += [{"name": r, "method": "stream", "request": r} for r, _, _ in STREAMS]
    calls += [{"name": "stall-write", "method": "unary", "request": "stall-write", "timeoutMs": 1000}]
    run = subprocess.run(
        [node, str(NODE_DIR / "faults.mjs"), json.dumps(calls)],
        cwd=NODE_DIR,
        env={"WIRESTUB_ADDR": f"127.0.0.1:{server.port}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = {r["name"]: r for r in map(json.loads, run.stdout.splitlines())}
    expected = {n: s for n, s in UNARY} | {r: s for r, s, _ in STREAMS} | {"stall-write": "DEADLINE_EXCEEDED"}
    got = {n: seen[n]["code"] for n in expected}
    assert got == expected
    for room, _, before in STREAMS:
        assert seen[room]["messages"] == before


def test_the_reference_stack_resets_the_stream_for_every_transport_fault(tmp_path):
    """The h2 crate keeps its connection to itself: a reset keeps its code,
    every other transport fault resets the stream (INTERNAL_ERROR), and
    the journal says which fault it was."""
    srv = start(tmp_path, "--http2", "h2")
    try:
        assert unary(srv.port, "reset-cancel")[0] == "CANCELLED"
        assert unary(srv.port, "close")[0] == "INTERNAL"
        assert unary(srv.port, "anyone")[0] == "OK"
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.admin_port}/admin/journal?limit=10", timeout=10) as r:
            faults = {e.get("fault"): e["status"]["name"] for e in json.load(r)["entries"]}
        assert faults.get("TCP close after 0 message(s)") == "INTERNAL", faults
    finally:
        engine_process.stop(srv.proc)
