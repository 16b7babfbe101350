"""The engine's admin HTTP API, driven by real grpcio calls.

Each engine is the binary under test (`WIRESTUB_ENGINE`, default
target/debug/engine) compiling protos/ and rules/ in process, started as

    engine run --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
               [--journal N] [--admin-token T]

with both `listening on` lines read from stdout (`wirestub engine listening
on ADDR`, `wirestub admin listening on ADDR`). The tests make calls to the
example services (matched and unmatched) with grpcio and check what the
admin API says about them: the journal (list, filters, count, verify,
unmatched calls with the closest rule and why it failed, reset), the
Prometheus metrics (parsed with prometheus_client), status, services,
rules, reload (a valid and an invalid plan), the bearer token and the
health probes (`/readyz` failing while the engine drains).
"""

from __future__ import annotations

import http.client
import importlib
import importlib.resources
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import engine_process
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = engine_process.REPO_ROOT
PROTOS = REPO_ROOT / "protos"
RULES = REPO_ROOT / "rules"
TOKEN = "s3cret-admin-token"
TIMEOUT = 10.0
SAY_HELLO = "/helloworld.Greeter/SayHello"
SEARCH = "/shop.v1.Catalog/SearchProducts"
UPLOAD = "/chat.v1.Chat/Upload"


# --------------------------------------------------------------------------
# Engine processes and the admin client
# --------------------------------------------------------------------------


class Engine(engine_process.EngineProcess):
    """An engine with its gRPC port and its admin port."""

    def __init__(self, proc: subprocess.Popen, grpc_port: int, admin_port: int, log_path: Path, token: str | None):
        super().__init__(proc, grpc_port, log_path)
        self.admin_port = admin_port
        self.token = token

    def admin(
        self,
        method: str,
        path: str,
        body: object | None = None,
        token: str | None | bool = True,
        params: dict | list | None = None,
    ) -> tuple[int, dict, object]:
        """One admin request: (status, headers, JSON body or text).
        `token=True` sends the engine's token, a string sends that one,
        None sends none."""
        if params:
            path += "?" + urllib.parse.urlencode(params)
        headers = {}
        if token is True:
            token = self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        parsed: object = raw
        if hdrs.get("content-type", "").startswith("application/json"):
            parsed = json.loads(raw)
        return resp.status, hdrs, parsed

    def get(self, path: str, **params) -> object:
        """GET expecting 200; returns the body."""
        status, _, body = self.admin("GET", path, params=params or None)
        assert status == 200, f"GET {path} {params}: {status} {body}\n{self.log()}"
        return body


def start_engine(log_dir: Path, *flags: str, token: str | None = None) -> Engine:
    args = ["run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *flags]
    if token:
        args += ["--admin-token", token]
    proc, port, admin, log_path = engine_process.start_with_admin(args, log_dir)
    return Engine(proc, port, admin, log_path, token)

def stop_engine(engine: Engine) -> None:
    engine_process.stop(engine.proc)
    log = engine.log_path.read_text(errors="replace")
    assert "panicked" not in log, log[-4000:]


def eventually(check, what: str, timeout: float = 5.0):
    """Retries `check` until it returns a true value: calls are recorded
    and counted as they end, which a client may see a moment before."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still {value!r} after {timeout}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """Python modules for protos/, generated with grpc_tools.protoc."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("admin-stubs")
    wkt = importlib.resources.files("grpc_tools") / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = ["grpc_tools.protoc", f"-I{PROTOS}", f"-I{wkt}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
    assert protoc.main(args) == 0, f"grpc_tools.protoc failed: {' '.join(args)}"
    sys.path.insert(0, str(out))
    try:
        return {
            "hello": importlib.import_module("helloworld_pb2"),
            "hello_grpc": importlib.import_module("helloworld_pb2_grpc"),
            "shop": importlib.import_module("shop.v1.catalog_pb2"),
            "shop_grpc": importlib.import_module("shop.v1.catalog_pb2_grpc"),
            "chat": importlib.import_module("chat.v1.chat_pb2"),
            "chat_grpc": importlib.import_module("chat.v1.chat_pb2_grpc"),
        }
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The engine most tests share: journal of 200 calls, a token."""
    eng = start_engine(tmp_path_factory.mktemp("admin-logs"), "--journal", "200", token=TOKEN)
    yield eng
    stop_engine(eng)


@pytest.fixture(scope="module")
def channel(engine):
    ch = grpc.insecure_channel(f"127.0.0.1:{engine.port}", options=[("grpc.enable_http_proxy", 0)])
    grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
    yield ch
    ch.close()


def say_hello(stubs, channel, name: str, metadata=None):
    stub = stubs["hello_grpc"].GreeterStub(channel)
    return stub.SayHello(stubs["hello"].HelloRequest(name=name), timeout=TIMEOUT, metadata=metadata)


# --------------------------------------------------------------------------
# Probes and the token
# --------------------------------------------------------------------------


def test_probes_need_no_token(engine):
    for path in ("/healthz", "/readyz"):
        status, _, body = engine.admin("GET", path, token=None)
        assert status == 200, (path, body)


def test_every_other_route_needs_the_token(engine):
    for method, path in [
        ("GET", "/admin/status"),
        ("GET", "/metrics"),
        ("GET", "/admin/journal"),
        ("POST", "/admin/reload"),
        ("DELETE", "/admin/journal"),
    ]:
        status, headers, body = engine.admin(method, path, token=None)
        assert status == 401, (method, path, body)
        assert headers.get("www-authenticate", "").startswith("Bearer"), headers
        assert "error" in body
        status, _, _ = engine.admin(method, path, token="not-the-token")
        assert status == 401, (method, path)
    status, _, _ = engine.admin("GET", "/admin/status")
    assert status == 200


# --------------------------------------------------------------------------
# Status, services, rules
# --------------------------------------------------------------------------


def test_status(engine):
    s = engine.get("/admin/status")
    assert re.fullmatch(r"[0-9a-f]{16}", s["plan"]["identity"]), s
    assert s["plan"]["generation"] >= 1
    assert s["plan"]["loaded_at"].endswith("Z")
    assert s["started_at"].endswith("Z")
    assert s["uptime_seconds"] >= 0
    for service in ("helloworld.Greeter", "shop.v1.Catalog", "chat.v1.Chat"):
        assert service in s["services"], s["services"]
    assert s["methods"] >= 8 and s["rules"] >= 20, s
    kinds = {(l["kind"], int(l["addr"].rsplit(":", 1)[1])) for l in s["listeners"]}
    assert ("grpc", engine.port) in kinds and ("admin", engine.admin_port) in kinds, s["listeners"]
    assert s["journal"]["enabled"] is True and s["journal"]["capacity"] == 200, s["journal"]
    assert s["draining"] is False


def test_services(engine):
    services = {s["name"]: s for s in engine.get("/admin/services")["services"]}
    greeter = {m["name"]: m for m in services["helloworld.Greeter"]["methods"]}
    hello = greeter["SayHello"]
    assert hello["path"] == SAY_HELLO
    assert hello["kind"] == "unary"
    assert hello["input_type"] == "helloworld.HelloRequest"
    assert hello["output_type"] == "helloworld.HelloReply"
    assert hello["rules"] == 5 and hello["builtin"] is False
    chat = {m["name"]: m for m in services["chat.v1.Chat"]["methods"]}
    assert chat["Upload"]["kind"] == "client_streaming"
    assert chat["Talk"]["duplex"] is True
    health = services["grpc.health.v1.Health"]["methods"]
    assert all(m["builtin"] for m in health), health


def test_rules_of_a_method(engine):
    body = engine.get("/admin/methods/helloworld.Greeter/SayHello/rules")
    rules = body["rules"]
    assert [r["index"] for r in rules] == [0, 1, 2, 3, 4]
    first = rules[0]
    assert first["origin"] == "rules/helloworld.greeter.sayhello.yaml:12:9"
    assert first["priority"] == 20
    texts = sorted(c["text"] for c in first["conditions"])
    assert texts == ['metadata.x-role == "root"', 'request.name == "admin"'], texts
    blocked = rules[2]
    assert blocked["conditions"][0]["text"] == 'request.name == "blocked"'
    assert blocked["response"]["status"] == {"code": 7, "name": "PERMISSION_DENIED"}
    assert blocked["response"]["message"] == "blocked users may not say hello"
    assert rules[4]["conditions"] == []
    status, _, err = engine.admin("GET", "/admin/methods/helloworld.Greeter/Nope/rules")
    assert status == 404 and "Nope" in err["error"]


# --------------------------------------------------------------------------
# The journal
# --------------------------------------------------------------------------


def test_journal(engine, stubs, channel):
    status, _, body = engine.admin("DELETE", "/admin/journal")
    assert status == 200, body

    shop, chat = stubs["shop"], stubs["chat"]
    assert say_hello(stubs, channel, "Tom").message == "Hi Tom (from mock)"
    assert say_hello(stubs, channel, "admin", metadata=[("x-role", "root")]).message == "Welcome back, root"
    with pytest.raises(grpc.RpcError) as denied:
        say_hello(stubs, channel, "blocked")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # No SearchProducts rule has page size 3: NOT_FOUND, unmatched.
    search = stubs["shop_grpc"].CatalogStub(channel)
    with pytest.raises(grpc.RpcError) as missed:
        search.SearchProducts(shop.SearchRequest(category=shop.CATEGORY_GAMES, page_size=3), timeout=TIMEOUT)
    assert missed.value.code() == grpc.StatusCode.NOT_FOUND
    upload = stubs["chat_grpc"].ChatStub(channel).Upload
    items = [chat.ChatMessage(user="bob", text=t) for t in ("a", "b", "c")]
    assert upload(iter(items), timeout=TIMEOUT).note == "three messages"

    listing = eventually(
        lambda: (lambda b: b if len(b["entries"]) == 5 else None)(engine.get("/admin/journal")),
        "five calls in the journal",
    )
    entries = listing["entries"]
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs), "oldest first"
    assert [e["method"] for e in entries] == [SAY_HELLO, SAY_HELLO, SAY_HELLO, SEARCH, UPLOAD]

    tom, admin, blocked, miss, up = entries
    assert tom["request"] == {"name": "Tom"}
    assert tom["status"] == {"code": 0, "name": "OK"}
    assert tom["rule"]["origin"] == "rules/helloworld.greeter.sayhello.yaml:6:9"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", tom["time"]), tom["time"]
    assert isinstance(tom["latency_ms"], float) and tom["latency_ms"] >= 0
    assert admin["metadata"].get("x-role") == "root"
    assert admin["rule"]["index"] == 0
    assert blocked["status"]["name"] == "PERMISSION_DENIED"
    assert blocked["message"] == "blocked users may not say hello"
    assert miss["rule"] is None and miss["status"]["name"] == "NOT_FOUND"
    assert miss["request"] == {"category": "CATEGORY_GAMES", "page_size": 3}
    assert [m["text"] for m in up["messages"]] == ["a", "b", "c"]

    def listed(**params) -> list[int]:
        return [e["seq"] for e in engine.get("/admin/journal", **params)["entries"]]

    assert listed(method="helloworld.Greeter/SayHello") == seqs[:3]
    assert listed(method=SAY_HELLO) == seqs[:3]
    assert listed(method="shop.v1.Catalog") == [seqs[3]]
    assert listed(status="PERMISSION_DENIED") == [seqs[2]]
    assert listed(status="5") == [seqs[3]]
    assert listed(matched="false") == [seqs[3]]
    assert listed(metadata="x-role=root") == [seqs[1]]
    assert listed(body=json.dumps({"name": "Tom"})) == [seqs[0]]
    assert listed(body=json.dumps({"pageSize": 3})) == [seqs[3]]
    assert listed(body=json.dumps({"user": "bob", "text": "b"})) == [seqs[4]]
    assert listed(since=str(seqs[2])) == seqs[3:]
    assert listed(limit="2") == seqs[3:]
    status, _, err = engine.admin("GET", "/admin/journal", params={"colour": "red"})
    assert status == 400 and "colour" in err["error"]

    assert engine.get("/admin/journal/count", method="helloworld.Greeter/SayHello") == {"count": 3}
    assert engine.get("/admin/journal/count", matched="true") == {"count": 4}

    # Verify: a pass, a count that is too high, a call that never came.
    status, _, v = engine.admin(
        "POST", "/admin/journal/verify", {"method": SAY_HELLO, "body": {"name": "Tom"}, "times": 1}
    )
    assert status == 200 and v["ok"] is True and v["count"] == 1, v
    _, _, v = engine.admin("POST", "/admin/journal/verify", {"method": "helloworld.Greeter/SayHello", "at_most": 2})
    assert v["ok"] is False and v["count"] == 3 and v["expected"] == "at most 2", v
    _, _, v = engine.admin(
        "POST",
        "/admin/journal/verify",
        {"method": "helloworld.Greeter/SayHello", "body": {"name": "Jerry"}, "metadata": {"x-role": "root"}},
    )
    assert v["ok"] is False and v["count"] == 0, v
    best = v["closest"][0]
    assert best["seq"] == seqs[1], v["closest"]
    assert best["differences"] == [{"at": "request.name", "expected": "Jerry", "actual": "admin"}]
    status, _, err = engine.admin("POST", "/admin/journal/verify", {"body": {}})
    assert status == 400 and "method" in err["error"]

    # Unmatched: the closest rule and why it failed.
    unmatched = engine.get("/admin/journal/unmatched")["entries"]
    assert [e["seq"] for e in unmatched] == [seqs[3]]
    closest = unmatched[0]["closest"]
    assert closest is not None, unmatched[0]
    assert closest["origin"].startswith("rules/shop.yaml:"), closest
    assert (closest["held"], closest["total"]) == (1, 2), closest
    failed = closest["failed"]
    assert failed["input"] == "request.page_size"
    assert failed["operator"] == "eq" and failed["expected"] == 2 and failed["actual"] == 3, failed
    assert "request.page_size == 2" in closest["reason"] and "3" in closest["reason"], closest

    status, _, body = engine.admin("DELETE", "/admin/journal")
    assert status == 200 and body == {"removed": 5}
    assert engine.get("/admin/journal/count") == {"count": 0}


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def samples(engine) -> list:
    status, headers, text = engine.admin("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(all_samples, name: str, **labels) -> float:
    found = [s.value for s in all_samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found)


def test_metrics_count_calls(engine, stubs, channel):
    room = "chat.v1.Chat"
    labels = {"grpc_service": room, "grpc_method": "GetRoom"}
    general = "rules/chat.v1.chat.getroom.yaml:4:9"
    fallback = "rules/chat.v1.chat.getroom.yaml:11:9"

    def snapshot():
        s = samples(engine)
        return {
            "started": value(s, "grpc_server_started_total", grpc_type="unary", **labels),
            "ok": value(s, "grpc_server_handled_total", grpc_code="OK", **labels),
            "count": value(s, "grpc_server_handling_seconds_count", **labels),
            "inf": value(s, "grpc_server_handling_seconds_bucket", le="+Inf", **labels),
            "general": value(s, "wirestub_rule_hits_total", rule=general, **labels),
            "fallback": value(s, "wirestub_rule_hits_total", rule=fallback, **labels),
        }

    before = snapshot()
    stub = stubs["chat_grpc"].ChatStub(channel)
    for name in ("general", "general", "random"):
        stub.GetRoom(stubs["chat"].GetRoomRequest(room=name), timeout=TIMEOUT)
    want = {"started": 3, "ok": 3, "count": 3, "inf": 3, "general": 2, "fallback": 1}

    def deltas():
        after = snapshot()
        d = {k: after[k] - before[k] for k in want}
        return d if d == want else None

    eventually(deltas, f"metric deltas {want}")


# --------------------------------------------------------------------------
# Reload, a journal-less engine, draining
# --------------------------------------------------------------------------


@pytest.fixture
def sources(tmp_path):
    """A copy of protos/ and rules/ the test may break."""
    shutil.copytree(PROTOS, tmp_path / "protos")
    shutil.copytree(RULES, tmp_path / "rules")
    return tmp_path


def test_reload_and_a_journal_less_engine(tmp_path, sources):
    eng = start_engine(
        tmp_path, "--protos", str(sources / "protos"), "--rules", str(sources / "rules"), "--drain-timeout-ms", "200"
    )
    try:
        first = eng.get("/admin/status")
        assert first["journal"] == {"enabled": False}
        status, _, err = eng.admin("GET", "/admin/journal")
        assert status == 409 and "--journal N" in err["error"], err
        status, _, err = eng.admin("POST", "/admin/journal/verify", {"method": SAY_HELLO})
        assert status == 409

        status, _, r = eng.admin("POST", "/admin/reload")
        assert status == 200, r
        assert r["generation"] == first["plan"]["generation"] + 1 and r["changed"] is False, r

        rule = sources / "rules" / "helloworld.greeter.sayhello.yaml"
        rule.write_text(rule.read_text() + "\n  - when:\n      request.nosuchfield: 1\n    body: {message: x}\n")
        status, _, err = eng.admin("POST", "/admin/reload")
        assert status == 422, err
        assert "nosuchfield" in err["error"], err
        assert eng.get("/admin/status")["plan"]["generation"] == r["generation"], "the old plan keeps serving"

        rule.write_text(rule.read_text().replace("request.nosuchfield: 1", "request.name: Zed"))
        status, _, r2 = eng.admin("POST", "/admin/reload")
        assert status == 200 and r2["changed"] is True, r2
        assert len(eng.get("/admin/methods/helloworld.Greeter/SayHello/rules")["rules"]) == 6
    finally:
        stop_engine(eng)


def test_readyz_fails_while_draining(tmp_path, stubs):
    eng = start_engine(tmp_path, "--drain-timeout-ms", "3000")
    ch = grpc.insecure_channel(f"127.0.0.1:{eng.port}", options=[("grpc.enable_http_proxy", 0)])
    try:
        assert eng.admin("GET", "/readyz")[0] == 200
        # An endless stream keeps the engine draining until the timeout.
        stream = stubs["chat_grpc"].ChatStub(ch).Subscribe(stubs["chat"].SubscribeRequest(room="lobby"), timeout=30)
        next(stream)
        eng.proc.send_signal(signal.SIGTERM)

        def draining():
            try:
                status, _, body = eng.admin("GET", "/readyz")
            except OSError:
                return None
            return (status, body) if status == 503 else None

        status, body = eventually(draining, "/readyz answering 503", timeout=3.0)
        assert body == {"status": "draining"}
        assert eng.admin("GET", "/healthz")[0] == 200
        stream.cancel()
    finally:
        ch.close()
        stop_engine(eng)
