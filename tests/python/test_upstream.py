"""Forwarding to a real upstream (`engine run --upstream URL`).

The upstream is a grpcio server of protos/chat/v1/chat.proto in this
process, on loopback. Every behaviour is checked differentially: the same
call made directly to the upstream and through the engine must give the
same messages, status, message, details and metadata. Engines under test:

- `bare`: no plan, no protos, no rules: every call is to a method the
  engine does not know, forwarded as bytes;
- `fallback`: protos/ and the few rules of upstream_fixtures/rules: what a
  rule answers is the mock's, the rest goes to the upstream;
- `always`: the same plan with `--upstream-mode always`.
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import engine_process
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOS = REPO_ROOT / "protos"
FIXTURES = Path(__file__).resolve().parent / "upstream_fixtures"
BUF_TIMEOUT = 60


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The Python modules of chat.proto (messages and stubs)."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    wkt = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "chat/v1/chat.proto",
    ]
    assert protoc.main(args) == 0
    sys.path.insert(0, str(out))
    try:
        pb = importlib.import_module("chat.v1.chat_pb2")
        rpc = importlib.import_module("chat.v1.chat_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb, rpc


class WithTrailers(grpc.Status):
    """A rich status with more trailing metadata beside its details."""

    def __init__(self, status):
        self.code = status.code
        self.details = status.details
        self.trailing_metadata = (*status.trailing_metadata, ("x-why", "gone"), ("x-bin-bin", b"\x00\x01\xff"))


class Upstream:
    """The real server: what it saw, for the checks that need it."""

    def __init__(self, pb, rpc):
        self.pb = pb
        self.cancelled = threading.Event()
        self.metadata: dict[str, list] = {}
        self.remaining: list[float | None] = []
        self.counter = 0
        outer = self

        class Chat(rpc.ChatServicer):
            def GetRoom(self, request, context):
                md = dict(context.invocation_metadata())
                outer.metadata[request.room] = list(context.invocation_metadata())
                outer.remaining.append(context.time_remaining())
                if request.room == "missing":
                    detail = error_details_pb2.ResourceInfo(
                        resource_type="room", resource_name="missing", description="no such room"
                    )
                    status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="room missing: ünïcode")
                    status.details.add().Pack(detail)
                    context.abort_with_status(WithTrailers(rpc_status.to_status(status)))
                if request.room == "slow":
                    time.sleep(2)
                if request.room == "counter":
                    outer.counter += 1
                    return pb.Room(room="counter", topic=f"call {min(outer.counter, 3)}")
                if request.room == "secret":
                    context.send_initial_metadata(
                        (("set-cookie", "s=1"), ("x-visible", "yes"), ("x-session-token", "st-1"), ("x-goog-api-key", "gk-1"))
                    )
                    context.set_trailing_metadata((("x-api-key", "k"), ("authorization", "Bearer up")))
                    return pb.Room(room="secret")
                context.send_initial_metadata((("x-up", "1"), ("x-echo", md.get("x-topic", "-"))))
                context.set_trailing_metadata((("x-trail", "t"), ("x-count-bin", b"\x07")))
                return pb.Room(room=request.room, topic="upstream: " + md.get("x-topic", "none"))

            def Subscribe(self, request, context):
                if request.room == "forever":
                    # Runs when the call ends, however grpcio learns of it
                    # (it may stop pulling this generator at once).
                    context.add_callback(outer.cancelled.set)
                    n = 0
                    while context.is_active():
                        yield pb.ChatMessage(user="up", text="tick", seq=n)
                        n += 1
                        time.sleep(0.05)
                    outer.cancelled.set()
                    return
                count = int(request.room.split(":")[1]) if request.room.startswith("n:") else 3
                for i in range(count):
                    yield pb.ChatMessage(user="up", text=f"m{i}", seq=i)
                if request.room.endswith(":fail"):
                    context.abort(grpc.StatusCode.ABORTED, "stream failed on purpose")

            def Upload(self, request_iterator, context):
                n, size, first = 0, 0, ""
                for m in request_iterator:
                    if n == 0:
                        first = m.text[:10]
                    n += 1
                    size += len(m.text)
                return pb.UploadSummary(note=f"{n} messages, {size} bytes, first {first}")

            def Converse(self, request_iterator, context):
                for m in request_iterator:
                    yield pb.ChatMessage(user="up", text=m.text.upper(), seq=m.seq)

            def Talk(self, request_iterator, context):
                for m in request_iterator:
                    yield pb.ChatMessage(user="up", text=m.text[::-1], seq=m.seq)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        rpc.add_ChatServicer_to_server(Chat(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self):
        self.server.stop(0)


@pytest.fixture(scope="module")
def upstream(chat):
    up = Upstream(*chat)
    yield up
    up.stop()


def start_engine(tmp_path_factory, name: str, args: list[str]):
    logs = tmp_path_factory.mktemp(f"logs-{name}")
    cmd = [str(engine_process.engine_binary()), "run", "--listen", "127.0.0.1:0", "--admin-listen", "off", *args]
    return engine_process.start(cmd, logs)


def bare_args(tmp_path_factory, upstream) -> list[str]:
    """No plan, no protos, no rules: only the upstream."""
    empty = tmp_path_factory.mktemp("empty")
    return ["--protos", str(empty), "--rules", str(empty), "--upstream", f"http://127.0.0.1:{upstream.port}"]


def engine_fixture(name: str, args, stack: str = "native"):
    """A module-scoped engine started with `args(tmp_path_factory, upstream)`."""

    @pytest.fixture(scope="module", name=name)
    def fixture(tmp_path_factory, upstream):
        srv = start_engine(tmp_path_factory, name, ["--http2", stack, *args(tmp_path_factory, upstream)])
        yield srv
        engine_process.stop(srv.proc)

    return fixture


def mocked_args(upstream) -> list[str]:
    return [
        "--protos",
        str(PROTOS),
        "--rules",
        str(FIXTURES / "rules"),
        "--upstream",
        f"http://127.0.0.1:{upstream.port}",
    ]


bare = engine_fixture("bare", bare_args)
bare_h2 = engine_fixture("bare_h2", bare_args, "h2")
fallback = engine_fixture("fallback", lambda _, up: mocked_args(up))
fallback_h2 = engine_fixture("fallback_h2", lambda _, up: mocked_args(up), "h2")
always = engine_fixture("always", lambda _, up: [*mocked_args(up), "--upstream-mode", "always"])


def stub(chat, port):
    _, rpc = chat
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, rpc.ChatStub(channel)


def outcome(call):
    """What a finished unary or client-streaming call gave, as comparable
    values: the response (or the error's code, message and details) with
    the metadata the upstream set."""
    try:
        response, c = call()
        return {
            "response": response.SerializeToString(),
            "code": c.code(),
            "initial": sorted(m for m in c.initial_metadata() if m[0] in ("x-up", "x-echo")),
            "trailing": sorted(m for m in c.trailing_metadata() if m[0].startswith("x-")),
        }
    except grpc.RpcError as e:
        trailing = dict(e.trailing_metadata() or ())
        return {
            "code": e.code(),
            "details": e.details(),
            "status": trailing.get("grpc-status-details-bin"),
            "trailing": sorted(m for m in (e.trailing_metadata() or ()) if m[0].startswith("x-")),
        }


def both(chat, upstream, engine, fn):
    """`fn(stub)` directly and through `engine`, the two results."""
    results = []
    for port in (upstream.port, engine.port):
        channel, s = stub(chat, port)
        try:
            results.append(fn(s))
        finally:
            channel.close()
    return results


# Each on the engine's own HTTP/2 stack, and the first two on the h2 crate's.
ENGINES = ["bare", "fallback", "always", "bare_h2", "fallback_h2"]


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.getfixturevalue(request.param)


def test_unary_with_metadata_is_identical(chat, upstream, engine):
    pb, _ = chat
    direct, through = both(
        chat,
        upstream,
        engine,
        lambda s: outcome(
            lambda: s.GetRoom.with_call(pb.GetRoomRequest(room="lobby"), metadata=(("x-topic", "cats"),), timeout=10)
        ),
    )
    assert direct["code"] == grpc.StatusCode.OK
    assert direct["initial"] == [("x-echo", "cats"), ("x-up", "1")]
    assert direct["trailing"] == [("x-count-bin", b"\x07"), ("x-trail", "t")]
    assert through == direct


def test_error_with_details_and_trailers_is_identical(chat, upstream, engine):
    pb, _ = chat
    direct, through = both(
        chat,
        upstream,
        engine,
        lambda s: outcome(lambda: s.GetRoom.with_call(pb.GetRoomRequest(room="missing"), timeout=10)),
    )
    assert direct["code"] == grpc.StatusCode.NOT_FOUND
    assert direct["details"] == "room missing: ünïcode"
    status = status_pb2.Status.FromString(direct["status"])
    assert status.details[0].TypeName() == "google.rpc.ResourceInfo"
    assert ("x-bin-bin", b"\x00\x01\xff") in direct["trailing"]
    assert through == direct


def stream_outcome(it):
    messages = []
    try:
        for m in it:
            messages.append(m.SerializeToString())
        return messages, it.code(), it.details(), sorted(m for m in it.trailing_metadata() if m[0].startswith("x-"))
    except grpc.RpcError as e:
        return messages, e.code(), e.details(), None


@pytest.mark.parametrize("room", ["n:0", "n:200", "n:5:fail"])
def test_server_stream_is_identical(chat, upstream, engine, room):
    pb, _ = chat
    direct, through = both(
        chat, upstream, engine, lambda s: stream_outcome(s.Subscribe(pb.SubscribeRequest(room=room), timeout=10))
    )
    count = int(room.split(":")[1])
    assert len(direct[0]) == count
    assert through == direct


def test_client_stream_with_a_large_message_is_identical(chat, upstream, engine):
    pb, _ = chat

    def upload(s):
        def messages():
            for i in range(40):
                yield pb.ChatMessage(user="u", text=("x" * 1_500_000 if i == 7 else f"t{i}"), seq=i)

        return outcome(lambda: s.Upload.with_call(messages(), timeout=30))

    direct, through = both(chat, upstream, engine, upload)
    assert direct["code"] == grpc.StatusCode.OK
    assert pb.UploadSummary.FromString(direct["response"]).note.startswith("40 messages")
    assert through == direct


def interactive(pb, s, method: str, n: int):
    """A bidi call whose client sends each message only once the reply to
    the previous one has arrived: the replies, the status, and whether
    every message went out."""
    outbox: list = []
    cond = threading.Condition()
    done = threading.Event()

    def requests():
        for i in range(n):
            yield pb.ChatMessage(user="u", text=f"hello {i}", seq=i)
            with cond:
                if not cond.wait_for(lambda: len(outbox) > i, timeout=10):
                    return
        done.set()

    call = getattr(s, method)(requests(), timeout=30)
    for reply in call:
        with cond:
            outbox.append(reply.SerializeToString())
            cond.notify_all()
    return outbox, call.code(), done.is_set()


@pytest.mark.parametrize("method", ["Converse", "Talk"])
def test_bidi_is_full_duplex(chat, upstream, engine, method):
    """Each reply arrives before the client sends its next message: the
    engine forwards as it goes, in both directions."""
    pb, _ = chat
    def converse(s):
        return interactive(pb, s, method, 20)

    direct, through = both(chat, upstream, engine, converse)
    assert direct[1] == grpc.StatusCode.OK and direct[2], direct
    assert len(direct[0]) == 20
    assert through == direct


def test_deadline_is_forwarded_and_kept(chat, upstream, engine):
    pb, _ = chat
    channel, s = stub(chat, engine.port)
    try:
        upstream.remaining.clear()
        s.GetRoom(pb.GetRoomRequest(room="deadline"), timeout=3)
        assert upstream.remaining and upstream.remaining[-1] is not None
        # grpc-timeout travels in whole units, rounded: a few ms either way.
        assert 1.0 < upstream.remaining[-1] <= 3.05
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            s.GetRoom(pb.GetRoomRequest(room="slow"), timeout=0.4)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 1.5
    finally:
        channel.close()


def test_request_metadata_is_forwarded_and_hop_by_hop_is_not(chat, upstream, engine):
    pb, _ = chat
    channel, s = stub(chat, engine.port)
    try:
        md = (("x-one", "1"), ("x-many", "a"), ("x-many", "b"), ("authorization", "Bearer t"), ("x-b-bin", b"\x00\xff"))
        s.GetRoom(pb.GetRoomRequest(room="md"), metadata=md, timeout=10)
    finally:
        channel.close()
    seen = upstream.metadata["md"]
    for m in md:
        assert m in seen, (m, seen)
    assert [v for k, v in seen if k == "x-many"] == ["a", "b"]
    names = {k for k, _ in seen}
    assert not names & {"connection", "te", "grpc-timeout", "host"}


def test_cancellation_reaches_the_upstream(chat, upstream, engine):
    pb, _ = chat
    upstream.cancelled.clear()
    channel, s = stub(chat, engine.port)
    try:
        call = s.Subscribe(pb.SubscribeRequest(room="forever"), timeout=30)
        next(call)
        call.cancel()
    finally:
        channel.close()
    assert upstream.cancelled.wait(10), "the upstream's stream went on after the client cancelled"


def test_unreachable_upstream_is_unavailable_naming_it(chat, tmp_path_factory):
    pb, _ = chat
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    empty = tmp_path_factory.mktemp("empty-unreachable")
    url = f"http://127.0.0.1:{port}"
    srv = start_engine(tmp_path_factory, "unreachable", ["--protos", str(empty), "--rules", str(empty), "--upstream", url])
    try:
        channel, s = stub(chat, srv.port)
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                s.GetRoom(pb.GetRoomRequest(room="x"), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert url in e.value.details()
            assert time.monotonic() - start < 5
        channel.close()
    finally:
        engine_process.stop(srv.proc)


def test_fallback_answers_from_rules_first(chat, upstream, fallback, fallback_h2, always):
    pb, _ = chat
    for srv, expected in ((fallback, "from the mock"), (fallback_h2, "from the mock"), (always, "upstream: none")):
        mocked = srv is not always
        channel, s = stub(chat, srv.port)
        try:
            assert s.GetRoom(pb.GetRoomRequest(room="general"), timeout=10).topic == expected
            assert s.GetRoom(pb.GetRoomRequest(room="other"), timeout=10).topic == "upstream: none"
            three = [pb.ChatMessage(text=f"{i}") for i in range(3)]
            note = s.Upload(iter(three), timeout=10).note
            assert note == ("three, from the mock" if mocked else "3 messages, 3 bytes, first 0")
            assert s.Upload(iter(three[:2]), timeout=10).note == "2 messages, 2 bytes, first 0"
            items = [m.text for m in s.Subscribe(pb.SubscribeRequest(room="general"), timeout=10)]
            assert items == (["one", "two"] if mocked else ["m0", "m1", "m2"])
            # Duplex: the first message decides whose the call is.
            talk = [m.text for m in s.Talk(iter([pb.ChatMessage(text="ping"), pb.ChatMessage(text="ping")]), timeout=10)]
            assert talk == (["pong", "pong"] if mocked else ["gnip", "gnip"])
            talk = [m.text for m in s.Talk(iter([pb.ChatMessage(text="hello"), pb.ChatMessage(text="ping")]), timeout=10)]
            assert talk == ["olleh", "gnip"]
        finally:
            channel.close()


@pytest.fixture(scope="module")
def buf() -> str:
    configured = os.environ.get("WIRESTUB_BUF")
    path = Path(configured) if configured else REPO_ROOT / "node_modules" / ".bin" / "buf"
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.exists():
        pytest.fail(f"buf not found at {path}: run tests/python/run.sh, which installs it with npm")
    return str(path)


@pytest.mark.parametrize("http", ["http1.1", "http2"])
@pytest.mark.parametrize("protocol", ["connect", "grpcweb"])
@pytest.mark.parametrize("stack", ["fallback", "fallback_h2"])
def test_browser_protocols_reach_a_grpc_upstream(request, buf, stack, protocol, http):
    """Connect (JSON) and gRPC-Web calls no rule answers go to the upstream
    as gRPC and its answer comes back in the client's protocol."""
    srv = request.getfixturevalue(stack)
    cmd = [
        buf,
        "curl",
        "--schema",
        str(PROTOS),
        "--protocol",
        protocol,
        *(["--http2-prior-knowledge"] if http == "http2" else []),
        "-H",
        "x-topic: dogs",
        "-d",
        json.dumps({"room": "elsewhere"}),
        f"http://127.0.0.1:{srv.port}/chat.v1.Chat/GetRoom",
    ]
    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=BUF_TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"room": "elsewhere", "topic": "upstream: dogs"}


def admin_get(port: int, path: str):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        body = r.read().decode()
    return json.loads(body) if path.startswith("/admin") else body


@pytest.mark.parametrize("stack", ["native", "h2"])
def test_journal_metrics_and_status_show_forwarded_calls(chat, upstream, tmp_path, stack):
    """Forwarded calls are journaled with their path and the upstream's
    latency, counted per method (calls to methods the plan lacks under
    `(unknown)`), and the admin status shows the upstream's state."""
    pb, _ = chat
    args = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--http2",
        stack,
        "--journal",
        "100",
        *mocked_args(upstream),
    ]
    proc, port, admin, _ = engine_process.start_with_admin(args, tmp_path)
    try:
        status = admin_get(admin, "/admin/status")["upstream"]
        assert status["url"] == f"http://127.0.0.1:{upstream.port}" and status["mode"] == "fallback"
        assert status["state"] == "not connected"
        channel, s = stub(chat, port)
        try:
            assert s.GetRoom(pb.GetRoomRequest(room="general"), timeout=10).topic == "from the mock"
            assert s.GetRoom(pb.GetRoomRequest(room="other"), timeout=10).topic == "upstream: none"
            with pytest.raises(grpc.RpcError):
                s.GetRoom(pb.GetRoomRequest(room="missing"), timeout=10)
        finally:
            channel.close()
        # A method the plan lacks: the plan knows Chat, so call a path of its own.
        unknown = channel_call_unknown(port)
        assert unknown == grpc.StatusCode.UNIMPLEMENTED
        status = admin_get(admin, "/admin/status")["upstream"]
        assert status["state"] == "connected" and status["connections"] >= 1, status
        entries = admin_get(admin, "/admin/journal")["entries"]
        by_room = {}
        for e in entries:
            by_room.setdefault(e["method"], []).append(e)
        rooms = by_room["/chat.v1.Chat/GetRoom"]
        mocked = [e for e in rooms if "upstream" not in e]
        forwarded = [e for e in rooms if "upstream" in e]
        assert len(mocked) == 1 and mocked[0]["rule"] is not None
        assert len(forwarded) == 2
        assert all(e["upstream"]["latency_ms"] > 0 and not e["upstream"]["failed"] for e in forwarded)
        assert sorted(e["status"]["code"] for e in forwarded) == [0, 5]
        assert by_room["/chat.v1.Nowhere/Missing"][0]["upstream"]["failed"] is False
        unmatched = admin_get(admin, "/admin/journal/unmatched")["entries"]
        assert unmatched == [], "forwarded calls are not unmatched"
        metrics = admin_get(admin, "/metrics")
        assert 'wirestub_upstream_calls_total{grpc_service="chat.v1.Chat",grpc_method="GetRoom"} 2' in metrics
        assert 'wirestub_upstream_errors_total{grpc_service="chat.v1.Chat",grpc_method="GetRoom"} 0' in metrics
        assert 'wirestub_upstream_calls_total{grpc_service="(unknown)",grpc_method="(unknown)"} 1' in metrics
    finally:
        engine_process.stop(proc)


def channel_call_unknown(port: int):
    """A unary call to a method neither the plan nor the upstream has:
    the upstream's UNIMPLEMENTED comes back."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.unary_unary("/chat.v1.Nowhere/Missing")
        with pytest.raises(grpc.RpcError) as e:
            call(b"", timeout=10)
        return e.value.code()
    finally:
        channel.close()


def compiler_binary() -> Path:
    """The compiler next to the engine under test."""
    path = engine_process.engine_binary().parent / "compiler"
    if not path.exists():
        pytest.fail(f"{path} not found: build it with `cargo build -p wirestub-compiler`")
    return path


def test_record_compile_replay(chat, tmp_path):
    """Calls recorded through the engine compile with `compiler build` and
    replay with the same answers once the upstream is gone; no secret is
    written."""
    pb, _ = chat
    up = Upstream(*chat)
    record = tmp_path / "recorded"
    args = ["--protos", str(PROTOS), "--rules", str(tmp_path), "--upstream", f"http://127.0.0.1:{up.port}"]
    srv = start_engine(tmp_path_factory_shim(tmp_path), "record", [*args, "--record", str(record)])

    def calls(s):
        out = []
        md = (("authorization", "Bearer client-secret"), ("x-topic", "cats"))
        out.append(outcome(lambda: s.GetRoom.with_call(pb.GetRoomRequest(room="lobby"), metadata=md, timeout=10)))
        out.append(outcome(lambda: s.GetRoom.with_call(pb.GetRoomRequest(room="missing"), timeout=10)))
        out.append(outcome(lambda: s.GetRoom.with_call(pb.GetRoomRequest(room="secret"), timeout=10)))
        for _ in range(4):
            out.append(outcome(lambda: s.GetRoom.with_call(pb.GetRoomRequest(room="counter"), timeout=10)))
        out.append(stream_outcome(s.Subscribe(pb.SubscribeRequest(room="n:3"), timeout=10)))
        out.append(stream_outcome(s.Subscribe(pb.SubscribeRequest(room="n:2:fail"), timeout=10)))
        for n in (3, 5):
            msgs = [pb.ChatMessage(user="u", text=f"t{i}", seq=i) for i in range(n)]
            out.append(outcome(lambda: s.Upload.with_call(iter(msgs), timeout=10)))
        talk = [pb.ChatMessage(text=t, seq=i) for i, t in enumerate(["abc", "hello"])]
        out.append(stream_outcome(s.Talk(iter(talk), timeout=10)))
        # A client that waits for each reply: recorded reply by reply.
        out.append(interactive(pb, s, "Converse", 3))
        return out

    try:
        channel, s = stub(chat, srv.port)
        try:
            recorded = calls(s)
        finally:
            channel.close()
        wait_for_recordings(record, 5)
    finally:
        engine_process.stop(srv.proc)
        up.stop()
    files = sorted(p.name for p in record.glob("*.yaml"))
    assert files == [
        "chat.v1.chat.converse.yaml",
        "chat.v1.chat.getroom.yaml",
        "chat.v1.chat.subscribe.yaml",
        "chat.v1.chat.talk.yaml",
        "chat.v1.chat.upload.yaml",
    ]
    text = "".join(p.read_text() for p in record.glob("*.yaml"))
    for secret in ("client-secret", "Bearer", "set-cookie", "x-api-key", "authorization", "s=1", "st-1", "gk-1"):
        assert secret not in text, secret
    assert "x-visible" in text
    assert "mode: duplex" in (record / "chat.v1.chat.converse.yaml").read_text()
    assert not list(record.glob(".*.tmp"))

    plan = tmp_path / "plan.bin"
    build = subprocess.run(
        [str(compiler_binary()), "build", "--protos", str(PROTOS), "--rules", str(record), "-o", str(plan)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr + text
    replay = start_engine(tmp_path_factory_shim(tmp_path), "replay", [str(plan)])
    try:
        channel, s = stub(chat, replay.port)
        try:
            replayed = calls(s)
        finally:
            channel.close()
    finally:
        engine_process.stop(replay.proc)
    # The secrets the upstream sent are, by design, not replayed.
    secret = recorded[2]["trailing"]
    assert ("x-api-key", "k") in secret
    recorded[2]["trailing"] = [m for m in secret if m[0] != "x-api-key"]
    assert len(replayed) == len(recorded)
    for i, (a, b) in enumerate(zip(recorded, replayed)):
        assert a == b, (i, a, b)


def wait_for_recordings(record: Path, files: int) -> None:
    """The recorder writes behind the calls: waits (10 s at most) for
    `files` rule files in `record`, then a little more for their last
    rewrites."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(list(record.glob("*.yaml"))) < files:
        time.sleep(0.05)
    time.sleep(0.5)


def tmp_path_factory_shim(tmp_path: Path):
    """start_engine's log directory maker, for a test with a tmp_path."""

    class Factory:
        def mktemp(self, name):
            d = tmp_path / name
            d.mkdir(exist_ok=True)
            return d

    return Factory()


def test_each_service_to_its_own_upstream(chat, tmp_path):
    """`upstream-for` in the configuration file: chat.v1.Chat goes to its
    own upstream, other services to the default one; with no default, a
    service without an upstream is not forwarded."""
    pb, _ = chat
    own, default = Upstream(*chat), Upstream(*chat)
    config = tmp_path / "wirestub.yaml"
    config.write_text(
        f"upstream: http://127.0.0.1:{default.port}\n"
        f"upstream-for:\n  - chat.v1.Chat=http://127.0.0.1:{own.port}\n"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = start_engine(
        tmp_path_factory_shim(tmp_path),
        "per-service",
        ["--config", str(config), "--protos", str(empty), "--rules", str(empty)],
    )
    only = start_engine(
        tmp_path_factory_shim(tmp_path),
        "only-chat",
        ["--upstream-for", f"chat.v1.Chat=http://127.0.0.1:{own.port}", "--protos", str(empty), "--rules", str(empty)],
    )
    try:
        channel, s = stub(chat, srv.port)
        try:
            assert s.GetRoom(pb.GetRoomRequest(room="routed"), timeout=10).room == "routed"
        finally:
            channel.close()
        assert "routed" in own.metadata and "routed" not in default.metadata
        # Another service: the default upstream answers (it lacks the
        # method, so UNIMPLEMENTED comes from it, in grpcio's words).
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        try:
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary("/other.v1.Service/Call")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "unknown method" not in e.value.details()
        finally:
            channel.close()
        channel = grpc.insecure_channel(f"127.0.0.1:{only.port}")
        try:
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary("/other.v1.Service/Call")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "unknown method /other.v1.Service/Call" in e.value.details()
        finally:
            channel.close()
    finally:
        engine_process.stop(srv.proc)
        engine_process.stop(only.proc)
        own.stop()
        default.stop()


def test_record_ignored_fields_are_echoed(chat, tmp_path):
    """A field named by --record-ignore-fields is left out of `when`, and
    where the answer repeats it, the replay echoes the request's value."""
    pb, _ = chat
    up = Upstream(*chat)
    record = tmp_path / "recorded"
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--protos", str(PROTOS), "--rules", str(empty), "--upstream", f"http://127.0.0.1:{up.port}"]
    srv = start_engine(
        tmp_path_factory_shim(tmp_path), "record", [*args, "--record", str(record), "--record-ignore-fields", "room"]
    )
    try:
        channel, s = stub(chat, srv.port)
        try:
            s.GetRoom(pb.GetRoomRequest(room="r-1234"), timeout=10)
        finally:
            channel.close()
        path = record / "chat.v1.chat.getroom.yaml"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not path.exists():
            time.sleep(0.05)
    finally:
        engine_process.stop(srv.proc)
        up.stop()
    text = path.read_text()
    assert "when" not in text and "{{request.room}}" in text, text
    replay = start_engine(tmp_path_factory_shim(tmp_path), "replay", ["--protos", str(PROTOS), "--rules", str(record)])
    try:
        channel, s = stub(chat, replay.port)
        try:
            room = s.GetRoom(pb.GetRoomRequest(room="another-5678"), timeout=10)
        finally:
            channel.close()
    finally:
        engine_process.stop(replay.proc)
    assert (room.room, room.topic) == ("another-5678", "upstream: none")


@pytest.mark.parametrize("stack", ["native", "h2"])
def test_client_stream_held_for_the_upstream_is_bounded(chat, upstream, tmp_path, stack):
    """In fallback mode a client stream is held whole while its rules are
    tried, as it may yet go to the upstream, up to 8 MiB (each message
    counting 64 bytes more than its length); past that the call is the
    mock's. A 24 MiB stream and a flood of empty messages get the mock's
    no-match answer, in bounded memory, while another client is served."""
    pb, _ = chat
    srv = start_engine(tmp_path_factory_shim(tmp_path), f"bounded-{stack}", ["--http2", stack, *mocked_args(upstream)])
    try:
        channel, s = stub(chat, srv.port)
        other_channel, other = stub(chat, srv.port)
        try:
            rss = srv.rss_kib()

            def big():
                for i in range(240):
                    yield pb.ChatMessage(text="x" * 100_000, seq=i)
                    if i == 100:
                        assert other.GetRoom(pb.GetRoomRequest(room="general"), timeout=10).topic == "from the mock"

            with pytest.raises(grpc.RpcError) as e:
                s.Upload(big(), timeout=60)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()

            def empty():
                for _ in range(150_000):
                    yield pb.ChatMessage()

            with pytest.raises(grpc.RpcError) as e:
                s.Upload(empty(), timeout=120)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
            grown = (srv.rss_kib() - rss) / 1024
            assert grown < 64, f"the engine grew by {grown:.0f} MiB"
            assert other.GetRoom(pb.GetRoomRequest(room="other"), timeout=10).topic == "upstream: none"
        finally:
            channel.close()
            other_channel.close()
        assert srv.alive()
    finally:
        engine_process.stop(srv.proc)


def record_raw(chat, tmp_path, calls) -> Path:
    """Runs `calls(stub)` through an engine with no protos at all that
    records into a directory; returns it once the recorder has written."""
    up = Upstream(*chat)
    record = tmp_path / "raw"
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--protos", str(empty), "--rules", str(empty), "--upstream", f"http://127.0.0.1:{up.port}"]
    srv = start_engine(tmp_path_factory_shim(tmp_path), "record-raw", [*args, "--record", str(record)])
    try:
        channel, s = stub(chat, srv.port)
        try:
            result = calls(s)
        finally:
            channel.close()
        wait_for_recordings(record, 4)
    finally:
        engine_process.stop(srv.proc)
        up.stop()
    return record, result


def build_plan(tmp_path, rules: Path, protos: Path | None = None, name: str = "plan.bin") -> Path:
    plan = tmp_path / name
    if protos is None:
        protos = tmp_path / "no-protos"
        protos.mkdir(exist_ok=True)
    build = subprocess.run(
        [str(compiler_binary()), "build", "--protos", str(protos), "--rules", str(rules), "-o", str(plan)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    texts = "".join(p.read_text() for p in rules.glob("*.yaml"))
    assert build.returncode == 0, build.stderr + texts
    return plan


def raw_calls(pb, s):
    out = []
    md = (("authorization", "Bearer client-secret"), ("x-topic", "cats"))
    out.append(outcome(lambda: s.GetRoom.with_call(pb.GetRoomRequest(room="lobby"), metadata=md, timeout=10)))
    out.append(outcome(lambda: s.GetRoom.with_call(pb.GetRoomRequest(room="missing"), timeout=10)))
    for _ in range(4):
        out.append(outcome(lambda: s.GetRoom.with_call(pb.GetRoomRequest(room="counter"), timeout=10)))
    out.append(stream_outcome(s.Subscribe(pb.SubscribeRequest(room="n:3"), timeout=10)))
    out.append(stream_outcome(s.Subscribe(pb.SubscribeRequest(room="n:2:fail"), timeout=10)))
    for n in (3, 5):
        msgs = [pb.ChatMessage(user="u", text=f"t{i}", seq=i) for i in range(n)]
        out.append(outcome(lambda: s.Upload.with_call(iter(msgs), timeout=10)))
    talk = [pb.ChatMessage(text=t, seq=i) for i, t in enumerate(["abc", "hello"])]
    out.append(stream_outcome(s.Talk(iter(talk), timeout=10)))
    return out


@pytest.mark.parametrize("stack", ["native", "h2"])
def test_raw_record_compile_replay_without_protos(chat, tmp_path, stack):
    """With no .proto anywhere: calls are recorded as raw rules (base64
    messages, a wire dump in comments, no secret), compile with an empty
    protos directory, and replay the same answers, each recording as many
    times as it was seen and then NOT_FOUND."""
    pb, _ = chat
    record, recorded = record_raw(chat, tmp_path, lambda s: raw_calls(pb, s))
    files = sorted(p.name for p in record.glob("*.yaml"))
    assert files == [
        "chat.v1.chat.getroom.yaml",
        "chat.v1.chat.subscribe.yaml",
        "chat.v1.chat.talk.yaml",
        "chat.v1.chat.upload.yaml",
    ]
    text = "".join(p.read_text() for p in record.glob("*.yaml"))
    for secret in ("client-secret", "Bearer", "Bearer up"):
        assert secret not in text, secret
    getroom = (record / "chat.v1.chat.getroom.yaml").read_text()
    assert "raw: unary" in getroom and '"authorization"' in getroom  # the name, never the value
    assert '# request 1: 1: "lobby"' in getroom
    assert "raw: server_streaming" in (record / "chat.v1.chat.subscribe.yaml").read_text()
    assert "raw: client_streaming" in (record / "chat.v1.chat.upload.yaml").read_text()
    assert "raw: bidi_streaming" in (record / "chat.v1.chat.talk.yaml").read_text()

    # With the protos, the same recordings compile into typed rules: the
    # set fields as conditions, the answers shown as JSON.
    typed = build_plan(tmp_path, record, PROTOS, "typed.bin")
    dump = subprocess.run([str(compiler_binary()), "dump", str(typed)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert '{"room":"lobby","topic":"upstream: cats"}' in dump.stdout, dump.stdout
    assert 'request.room == b"lobby"' in dump.stdout and "recorded" not in dump.stdout, dump.stdout

    raw = build_plan(tmp_path, record)
    for plan in (raw, typed):
        replay = start_engine(tmp_path_factory_shim(tmp_path), f"replay-{plan.stem}", ["--http2", stack, str(plan)])
        try:
            channel, s = stub(chat, replay.port)
            try:
                replayed = raw_calls(pb, s)
                # Every recording is used up: the same call again is unmatched.
                with pytest.raises(grpc.RpcError) as e:
                    md = (("authorization", "x"), ("x-topic", "c"))
                    s.GetRoom(pb.GetRoomRequest(room="lobby"), metadata=md, timeout=10)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            finally:
                channel.close()
        finally:
            engine_process.stop(replay.proc)
        assert len(replayed) == len(recorded)
        for i, (a, b) in enumerate(zip(recorded, replayed)):
            assert a == b, (plan.name, i, a, b)


def test_raw_replay_picks_the_closest_recording_above_the_threshold(chat, tmp_path):
    """A call that is not identical to any recording gets the most similar
    one when it is at least `--raw-threshold` alike (the journal shows the
    score), else NOT_FOUND; the staged match keeps a call with other
    metadata names from any recording."""
    pb, _ = chat

    def calls(s):
        s.GetRoom(pb.GetRoomRequest(room="the-long-room-name-alpha"), metadata=(("x-tenant", "t1"),), timeout=10)
        s.GetRoom(pb.GetRoomRequest(room="zz"), timeout=10)
        return None

    record, _ = record_raw(chat, tmp_path, calls)
    text = (record / "chat.v1.chat.getroom.yaml").read_text()
    # Recordings are reusable by editing `times`: let them answer many calls.
    (record / "chat.v1.chat.getroom.yaml").write_text(text.replace("times: 1", "times: 100"))
    plan = build_plan(tmp_path, record)
    args = ["run", str(plan), "--listen", "127.0.0.1:0"]
    args += ["--admin-listen", "127.0.0.1:0", "--journal", "100", "--raw-threshold", "0.75"]
    proc, port, admin, _ = engine_process.start_with_admin(args, tmp_path)
    try:
        channel, s = stub(chat, port)
        try:
            tenant = (("x-tenant", "t2"),)
            exact = s.GetRoom(pb.GetRoomRequest(room="the-long-room-name-alpha"), metadata=tenant, timeout=10)
            near = s.GetRoom(pb.GetRoomRequest(room="the-long-room-name-alphb"), metadata=tenant, timeout=10)
            assert near == exact and exact.room == "the-long-room-name-alpha"
            assert s.GetRoom(pb.GetRoomRequest(room="zz"), timeout=10).room == "zz"
            with pytest.raises(grpc.RpcError) as e:
                s.GetRoom(pb.GetRoomRequest(room="a-different-request"), metadata=tenant, timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            # The very body of a recording, but with a metadata name its
            # call did not carry: the staged match refuses it.
            with pytest.raises(grpc.RpcError) as e:
                s.GetRoom(pb.GetRoomRequest(room="zz"), metadata=tenant, timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            channel.close()
        entries = admin_get(admin, "/admin/journal")["entries"]
        scores = [e.get("similarity") for e in entries]
        assert scores.count(None) == len(entries) - 1, scores
        score = next(s for s in scores if s is not None)
        assert 0.75 <= score < 1.0, score
    finally:
        engine_process.stop(proc)


def test_a_second_recording_run_keeps_the_first(chat, tmp_path):
    """Recording again into the same directory writes new files beside
    the old ones (`name.2.yaml`), never over them; both compile together."""
    pb, _ = chat
    up = Upstream(*chat)
    record = tmp_path / "recorded"
    args = ["--protos", str(PROTOS), "--rules", str(tmp_path / "none"), "--upstream", f"http://127.0.0.1:{up.port}"]
    (tmp_path / "none").mkdir()
    try:
        for run, room in enumerate(("first", "second")):
            srv = start_engine(tmp_path_factory_shim(tmp_path), f"rec-{run}", [*args, "--record", str(record)])
            try:
                channel, s = stub(chat, srv.port)
                try:
                    s.GetRoom(pb.GetRoomRequest(room=room), timeout=10)
                finally:
                    channel.close()
                wait_for_recordings(record, run + 1)
            finally:
                engine_process.stop(srv.proc)
    finally:
        up.stop()
    first = (record / "chat.v1.chat.getroom.yaml").read_text()
    second = (record / "chat.v1.chat.getroom.2.yaml").read_text()
    assert '"request.room":"first"' in first and "second" not in first
    assert '"request.room":"second"' in second
    build_plan(tmp_path, record, PROTOS)


def test_json_client_gets_an_error_for_an_upstream_message_that_does_not_decode(tmp_path):
    """A Connect JSON client whose call is forwarded gets INTERNAL naming
    the upstream when the upstream's message is not the method's type,
    never an empty object."""
    import urllib.error
    import urllib.request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"\xff\xff\xff")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("chat.v1.Chat", {"GetRoom": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--protos", str(PROTOS), "--rules", str(empty), "--upstream", f"http://127.0.0.1:{port}"]
    srv = start_engine(tmp_path_factory_shim(tmp_path), "json-bad", args)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{srv.port}/chat.v1.Chat/GetRoom",
            data=b'{"room": "x"}',
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 500
        error = json.loads(e.value.read())
        assert error["code"] == "internal", error
        assert "does not decode as chat.v1.Room" in error["message"] and str(port) in error["message"], error
    finally:
        engine_process.stop(srv.proc)
        server.stop(0)
