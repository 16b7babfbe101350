"""The runtime API on the admin listener, end to end: protos, rules and
descriptor sets changed over HTTP while the engine serves, each change
compiled in process and swapped in whole, or refused with the compiler's
diagnostics while the old plan keeps serving.

Every engine is the binary under test (`WIRESTUB_ENGINE`, default
target/debug/engine), started from the repository root as

    engine run [PLAN [--state-dir DIR]] [--protos DIR --rules DIR]
               --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0

with both `listening on` lines read from its stdout. The clients are real:
grpcio (messages from descriptor pools built with grpc_tools.protoc, no
generated modules), `buf curl` over server reflection (v1 and v1alpha),
and http.client for the admin API.

The sources the tests upload live in runtime_fixtures/:
- protos/: pay.proto (pay.v1.Payments/Charge) importing
  common/v1/money.proto, uploaded by the new-user test, copied into the
  --protos directory by the others;
- plan/: base.proto and its rule, compiled into a plan file by
  `compiler build` for the persistence test; ext.proto, uploaded over it,
  imports base.proto;
- descriptors/inventory.proto: turned into a FileDescriptorSet
  (--include_imports) and posted to /api/descriptors; descriptors/v2/ holds
  the same file with a second method, posted after it to replace it.

The tests:
1. a new user builds a mock from empty directories: uploads, reflection,
   rule add/replace/delete with the files on disk, listings, schema;
2. refusals (syntax errors, unknown keys/fields/methods, deleting what is
   needed) answer 422 with exact positions and change nothing; bad names
   400 with nothing written; oversized bodies 413; non-JSON 400;
3. sessions: per-session rules by header (both spellings), listing,
   deleting one session;
4. persistence over a plan with --state-dir, and forgetting without it;
5. descriptor sets posted as binary;
6. 16 grpcio clients calling while rules are added, replaced and deleted
   in a loop: no call fails;
7. 8 concurrent writers: no change lost; 24: those past 8 waiting may be
   told to come back (503, Retry-After), none answered 200 is lost;
8. uploads cannot replace a file of the plan; a changed descriptor set
   replaces the earlier one, sets are deleted by name or hash; a refused
   reload leaves the old plan as the base of later changes;
9. the admin token checked before a body is read; files of a second
   --rules or --protos directory are not changed; one engine per store (a
   lock file); stale temporaries removed at start;
   --runtime-max-schema-bytes.

Environment:
  WIRESTUB_ENGINE        engine binary (default target/debug/engine)
  WIRESTUB_COMPILER      compiler binary (default: `compiler` beside the engine)
  WIRESTUB_BUF           buf binary (default tests/node/node_modules/.bin/buf)
  WIRESTUB_START_TIMEOUT seconds to wait for the `listening on` lines
"""

from __future__ import annotations

import http.client
import importlib.resources
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import engine_process
import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

REPO_ROOT = engine_process.REPO_ROOT
FIXTURES = Path(__file__).resolve().parent / "runtime_fixtures"
PAY_PROTOS = FIXTURES / "protos"
PLAN_SOURCES = FIXTURES / "plan"
INVENTORY = FIXTURES / "descriptors"
TIMEOUT = 10.0
CHARGE = "/pay.v1.Payments/Charge"
PING = "/base.v1.Echo/Ping"
RELAY = "/ext.v1.Ext/Relay"
STOCK = "/inv.v1.Inventory/Stock"
DIAGNOSTIC_KEYS = {"severity", "message", "file", "line", "column", "hint"}


# --------------------------------------------------------------------------
# Engines and the admin client
# --------------------------------------------------------------------------


class Engine(engine_process.EngineProcess):
    """An engine with its gRPC port, its admin port and its command."""

    def __init__(
        self, proc, grpc_port: int, admin_port: int, log_path: Path, args: list[str], cwd: Path = REPO_ROOT
    ):
        super().__init__(proc, grpc_port, log_path)
        self.admin_port = admin_port
        self.args = args
        self.cwd = cwd
        self._channels: list[grpc.Channel] = []

    def exchange(
        self,
        method: str,
        path: str,
        body: object | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], object]:
        """One admin request: (status, lower-case headers, JSON body or
        text). A dict or list body is sent as JSON, bytes and str as they
        are."""
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            headers["Content-Type"] = content_type
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode()
            got = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        parsed: object = raw
        if got.get("content-type", "").startswith("application/json"):
            parsed = json.loads(raw)
        return resp.status, got, parsed

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, object]:
        """One admin request: (status, JSON body or text)."""
        status, _, parsed = self.exchange(method, path, body, content_type)
        return status, parsed

    def get(self, path: str) -> dict:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body}\n{self.log()}"
        return body

    def write(self, method: str, path: str, body: object | None = None, **kw) -> dict:
        """A change expected to apply: 200, `ok`, what changed, the plan."""
        status, answer = self.request(method, path, body, **kw)
        assert status == 200, f"{method} {path}: {status} {answer}\n{self.log()}"
        assert answer["ok"] is True, answer
        assert set(answer["plan"]) >= {"identity", "generation", "methods", "rules"}, answer
        return answer

    def plan(self) -> dict:
        return self.get("/admin/status")["plan"]

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[("grpc.enable_http_proxy", 0)])
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
        self._channels.append(ch)
        return ch

    def close_channels(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()


def start_engine(log_dir: Path, *args: str, cwd: Path = REPO_ROOT) -> Engine:
    """Starts `engine run ARGS... --listen 127.0.0.1:0 --admin-listen
    127.0.0.1:0` (in `cwd`) and waits for both `listening on` lines."""
    full = ["run", *args, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    proc, port, admin, log_path = engine_process.start_with_admin(full, log_dir, cwd)
    return Engine(proc, port, admin, log_path, list(args), cwd)

def stop_engine(engine: Engine) -> None:
    engine.close_channels()
    code = engine_process.stop(engine.proc)
    log = engine.log_path.read_text(errors="replace")
    assert "panicked" not in log, log[-4000:]
    assert code == 0, f"engine exited with {code}\n{log[-4000:]}"


@pytest.fixture
def engines(tmp_path):
    """Starts engines for one test (`engines(*args)`, `cwd=` the working
    directory, default the repository root) and stops them all at its end,
    checking none panicked."""
    started: list[Engine] = []
    log_dir = tmp_path / "logs"
    log_dir.mkdir()

    def start(*args: str, cwd: Path = REPO_ROOT) -> Engine:
        eng = start_engine(log_dir, *args, cwd=cwd)
        started.append(eng)
        return eng

    yield start
    for eng in started:
        if eng.alive():
            stop_engine(eng)


def restart(engine: Engine, engines) -> Engine:
    """Stops `engine` (cleanly) and starts another with the same arguments."""
    stop_engine(engine)
    return engines(*engine.args, cwd=engine.cwd)


# --------------------------------------------------------------------------
# Messages and calls: descriptor pools from grpc_tools.protoc
# --------------------------------------------------------------------------


def descriptor_set(out: Path, include: list[Path], files: list[str]) -> bytes:
    """A FileDescriptorSet (imports included) compiled by grpc_tools.protoc."""
    from grpc_tools import protoc

    wkt = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        *(f"-I{d}" for d in include),
        f"-I{wkt}",
        f"--descriptor_set_out={out}",
        "--include_imports",
        *files,
    ]
    assert protoc.main(args) == 0, f"grpc_tools.protoc failed: {' '.join(args)}"
    return out.read_bytes()


class Schema:
    """Message classes of a descriptor set, in a pool of their own (so the
    tests' schemas never meet in protobuf's default pool)."""

    def __init__(self, fds: bytes):
        self.pool = descriptor_pool.DescriptorPool()
        for f in descriptor_pb2.FileDescriptorSet.FromString(fds).file:
            self.pool.Add(f)

    def message(self, name: str, **fields):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(name))(**fields)

    def call(self, channel: grpc.Channel, path: str, request, metadata=None):
        """One unary call; the reply type is the method's output type."""
        service, method = path.strip("/").split("/")
        m = self.pool.FindServiceByName(service).FindMethodByName(method)
        reply = message_factory.GetMessageClass(m.output_type)
        stub = channel.unary_unary(
            path, request_serializer=lambda r: r.SerializeToString(), response_deserializer=reply.FromString
        )
        return stub(request, timeout=TIMEOUT, metadata=metadata)


@pytest.fixture(scope="module")
def pay(tmp_path_factory) -> Schema:
    out = tmp_path_factory.mktemp("pay-fds") / "pay.binpb"
    return Schema(descriptor_set(out, [PAY_PROTOS], ["pay.proto"]))


@pytest.fixture(scope="module")
def echo(tmp_path_factory) -> Schema:
    out = tmp_path_factory.mktemp("echo-fds") / "echo.binpb"
    return Schema(descriptor_set(out, [PLAN_SOURCES / "protos", PLAN_SOURCES], ["ext.proto"]))


def charge(pay: Schema, channel, id: str = "c-1", metadata=None) -> str:
    """Charge's `status`, or `!CODE` when the call fails."""
    try:
        return pay.call(channel, CHARGE, pay.message("pay.v1.ChargeRequest", id=id), metadata=metadata).status
    except grpc.RpcError as e:
        return f"!{e.code().name}"


def ping(echo: Schema, channel, path: str = PING, id: str = "p-1") -> str:
    """PingReply's `text`, or `!CODE` when the call fails."""
    try:
        return echo.call(channel, path, echo.message("base.v1.PingRequest", id=id)).text
    except grpc.RpcError as e:
        return f"!{e.code().name}"


def charge_rule(
    status: str, when_id: str | None = None, session: str | None = None, priority: int | None = None
) -> str:
    """A rule document for pay.v1.Payments/Charge answering `status`."""
    lines = ["service: pay.v1.Payments", "method: Charge"]
    if session:
        lines.append(f"session: {session}")
    lines.append("responses:")
    if when_id is not None:
        lines += ["  - when:", f'      request.id: "{when_id}"', "    body:"]
    else:
        lines.append("  - body:")
    lines.append(f'      status: "{status}"')
    if priority is not None:
        lines.append(f"    priority: {priority}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too), relative path -> bytes,
    but the engines' logs (the `engines` fixture's logs/) and the lock file
    that keeps a second engine off a store."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "logs" and p.name != ".wirestub.lock"
    }


def seeded_dirs(tmp_path: Path, rules: dict[str, str]) -> tuple[Path, Path]:
    """protos/ (a copy of runtime_fixtures/protos) and rules/ (`rules`)
    under `tmp_path/src`."""
    protos = tmp_path / "src" / "protos"
    rules_dir = tmp_path / "src" / "rules"
    shutil.copytree(PAY_PROTOS, protos)
    rules_dir.mkdir()
    for name, text in rules.items():
        (rules_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (rules_dir / name).write_text(text)
    return protos, rules_dir


def upload_rule(eng: Engine, name: str, content: str) -> dict:
    """POST /admin/upload/rule/grpc, expected to apply."""
    return eng.write("POST", "/admin/upload/rule/grpc", {"filename": name, "content": content})


def quoted(name: str) -> str:
    """A file name as one path segment (`/` as %2F)."""
    return urllib.parse.quote(name, safe="")


# --------------------------------------------------------------------------
# buf curl over reflection
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def buf(node_modules) -> str:
    configured = os.environ.get("WIRESTUB_BUF")
    path = Path(configured) if configured else node_modules / ".bin" / "buf"
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.exists():
        pytest.fail(f"buf not found at {path}: run `npm ci` in tests/node or set WIRESTUB_BUF")
    return str(path)


def buf_list_methods(buf: str, engine: Engine, protocol: str) -> list[str]:
    cmd = [
        buf,
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect",
        "--reflect-protocol",
        protocol,
        "--list-methods",
        f"http://127.0.0.1:{engine.port}",
    ]
    run = subprocess.run(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, (
        f"{' '.join(cmd)} exited with {run.returncode}\nstdout: {run.stdout}\n"
        f"stderr: {run.stderr}\nengine log:\n{engine.log()}"
    )
    return run.stdout.split()


REFLECTION = ["grpc-v1", "grpc-v1alpha"]


# --------------------------------------------------------------------------
# 1. A new user, from empty directories
# --------------------------------------------------------------------------


def test_new_user_builds_a_mock_from_empty_directories(engines, tmp_path, pay, buf):
    protos, rules = tmp_path / "protos", tmp_path / "rules"
    protos.mkdir()
    rules.mkdir()
    eng = engines("--protos", str(protos), "--rules", str(rules))
    assert eng.get("/admin/status")["methods"] == 0
    assert eng.get("/admin/protos") == {"files": []}
    assert eng.get("/admin/rules/grpc") == {"files": []}
    for protocol in REFLECTION:
        assert "pay.v1.Payments/Charge" not in buf_list_methods(buf, eng, protocol)

    # The imported file, into a subdirectory by path.
    money = (PAY_PROTOS / "common/v1/money.proto").read_text()
    answer = eng.write("POST", "/admin/upload/proto/path", {"path": "common/v1/money.proto", "content": money})
    assert answer["changed"] == ["protos/common/v1/money.proto"], answer
    assert (protos / "common/v1/money.proto").read_text() == money
    # The file importing it, by name.
    pay_text = (PAY_PROTOS / "pay.proto").read_text()
    answer = eng.write("POST", "/admin/upload/proto", {"filename": "pay.proto", "content": pay_text})
    assert answer["changed"] == ["protos/pay.proto"], answer
    assert answer["plan"]["methods"] == 1, answer
    assert (protos / "pay.proto").read_text() == pay_text

    # Reflection shows the new service at once, over both protocols.
    for protocol in REFLECTION:
        assert "pay.v1.Payments/Charge" in buf_list_methods(buf, eng, protocol), protocol

    ch = eng.channel()
    assert charge(pay, ch) == "!NOT_FOUND"  # a method without rules

    # Add a rule (Wishmock style: the file name names the method).
    rule_name = "pay.v1.payments.charge.yaml"
    first = 'responses:\n  - body:\n      status: "first"\n      charged: {currency: "EUR", units: 12}\n'
    answer = upload_rule(eng, rule_name, first)
    assert answer["changed"] == [f"rules/{rule_name}"], answer
    assert (rules / rule_name).read_text() == first
    reply = pay.call(ch, CHARGE, pay.message("pay.v1.ChargeRequest", id="c-1"))
    assert (reply.status, reply.charged.currency, reply.charged.units) == ("first", "EUR", 12)

    # Replace it.
    second = 'responses:\n  - body:\n      status: "second"\n'
    answer = eng.write("PUT", f"/admin/rule/grpc/{rule_name}", {"content": second})
    assert answer["changed"] == [f"rules/{rule_name}"], answer
    assert (rules / rule_name).read_text() == second
    assert charge(pay, ch) == "second"

    # The listings and the files' contents.
    assert eng.get("/admin/protos")["files"] == [
        {"filename": "common/v1/money.proto", "path": str(protos / "common/v1/money.proto"), "size": len(money)},
        {"filename": "pay.proto", "path": str(protos / "pay.proto"), "size": len(pay_text)},
    ]
    assert eng.get("/admin/rules/grpc")["files"] == [
        {"filename": rule_name, "path": str(rules / rule_name), "size": len(second)}
    ]
    assert eng.get("/admin/proto/common%2Fv1%2Fmoney.proto") == {"filename": "common/v1/money.proto", "content": money}
    assert eng.get("/admin/proto/pay.proto") == {"filename": "pay.proto", "content": pay_text}
    assert eng.get(f"/admin/rule/grpc/{rule_name}") == {"filename": rule_name, "content": second}

    # The schema of a message (every field shape) and of an enum.
    schema = eng.get("/admin/schema/pay.v1.ChargeRequest")
    assert schema["kind"] == "message" and schema["name"] == "pay.v1.ChargeRequest", schema
    fields = {f["name"]: f for f in schema["fields"]}
    shape = {
        name: (f["id"], f["type"], f["repeated"], f["optional"], f["map"]) for name, f in fields.items()
    }
    assert shape == {
        "id": (1, "string", False, False, False),
        "amount": (2, "common.v1.Money", False, False, False),
        "tags": (3, "string", True, False, False),
        "note": (4, "string", False, True, False),
        "limits": (5, "int64", False, False, True),
        "card": (6, "string", False, False, False),
        "iban": (7, "string", False, False, False),
        "kind": (8, "pay.v1.ChargeRequest.Kind", False, False, False),
    }, schema
    assert fields["limits"]["keyType"] == "string", schema
    assert schema["oneofs"]["source"] == ["card", "iban"], schema
    assert schema["enums"] == ["pay.v1.ChargeRequest.Kind"], schema
    assert eng.get("/admin/schema/pay.v1.ChargeRequest.Kind") == {
        "kind": "enum",
        "name": "pay.v1.ChargeRequest.Kind",
        "values": {"KIND_UNSPECIFIED": 0, "KIND_CARD": 1, "KIND_BANK": 2},
    }
    money_schema = eng.get("/admin/schema/common.v1.Money")
    assert [(f["name"], f["type"]) for f in money_schema["fields"]] == [("currency", "string"), ("units", "int64")]
    status, body = eng.request("GET", "/admin/schema/pay.v1.Nope")
    assert status == 404 and "error" in body, (status, body)

    # Delete the rule: no answer any more, no file.
    answer = eng.write("DELETE", f"/admin/rule/grpc/{rule_name}")
    assert answer["changed"] == [f"rules/{rule_name}"], answer
    assert not (rules / rule_name).exists()
    assert charge(pay, ch) == "!NOT_FOUND"
    assert eng.get("/admin/rules/grpc") == {"files": []}
    status, _ = eng.request("GET", f"/admin/rule/grpc/{rule_name}")
    assert status == 404

    # Delete the protos (importer first): the files and their directory go.
    eng.write("DELETE", "/admin/proto/pay.proto")
    eng.write("DELETE", "/admin/proto/common%2Fv1%2Fmoney.proto")
    assert tree(protos) == {} and list(protos.iterdir()) == [], list(protos.rglob("*"))
    assert eng.get("/admin/protos") == {"files": []}
    assert "pay.v1.Payments/Charge" not in buf_list_methods(buf, eng, "grpc-v1")
    assert charge(pay, ch) == "!UNIMPLEMENTED"


# --------------------------------------------------------------------------
# 2. Refusals change nothing
# --------------------------------------------------------------------------

BROKEN_PROTO = 'syntax = "proto3";\npackage broken.v1;\nmessage A { string a = 1 }\n'
UNKNOWN_KEY = charge_rule("x").replace('      status: "x"\n', '      status: "x"\n    bogus: 1\n')
UNKNOWN_FIELD = charge_rule("x").replace("status:", "stauts:")
UNKNOWN_METHOD = charge_rule("x").replace("method: Charge", "method: Refnd")

# (id, method, path, body, file under the temporary src/ directory, line,
#  column, words of the message, words of the hint)
REFUSALS = [
    (
        "proto-syntax-error",
        "POST",
        "/admin/upload/proto",
        {"filename": "broken.proto", "content": BROKEN_PROTO},
        "protos/broken.proto",
        3,
        26,
        "expected ';'",
        None,
    ),
    (
        "rule-unknown-key",
        "POST",
        "/admin/upload/rule/grpc",
        {"filename": "bad.yaml", "content": UNKNOWN_KEY},
        "rules/bad.yaml",
        6,
        5,
        "unknown key `bogus`",
        "`body`",
    ),
    (
        "rule-unknown-field",
        "POST",
        "/admin/upload/rule/grpc",
        {"filename": "bad.yaml", "content": UNKNOWN_FIELD},
        "rules/bad.yaml",
        5,
        7,
        "unknown field `stauts`",
        "`status`",
    ),
    (
        "rule-unknown-field-replacing",
        "PUT",
        "/admin/rule/grpc/global.yaml",
        {"content": UNKNOWN_FIELD},
        "rules/global.yaml",
        5,
        7,
        "unknown field `stauts`",
        "`status`",
    ),
    (
        "rule-unknown-method",
        "POST",
        "/admin/upload/rule/grpc",
        {"filename": "bad.yaml", "content": UNKNOWN_METHOD},
        "rules/bad.yaml",
        2,
        9,
        "unknown method `pay.v1.Payments.Refnd`",
        "`pay.v1.Payments.Charge`",
    ),
    (
        "delete-proto-a-rule-needs",
        "DELETE",
        "/admin/proto/pay.proto",
        None,
        "rules/global.yaml",
        1,
        10,
        "pay.v1.Payments",
        None,
    ),
    (
        "delete-proto-an-import-needs",
        "DELETE",
        "/admin/proto/common%2Fv1%2Fmoney.proto",
        None,
        "protos/pay.proto",
        7,
        1,
        "import 'common/v1/money.proto' not found",
        None,
    ),
]


@pytest.fixture
def seeded(engines, tmp_path, pay):
    """An engine compiling a copy of runtime_fixtures/protos and one rule,
    global.yaml (Charge answers "global"), with a channel to it."""
    protos, rules = seeded_dirs(tmp_path, {"global.yaml": charge_rule("global")})
    eng = engines("--protos", str(protos), "--rules", str(rules))
    ch = eng.channel()
    assert charge(pay, ch) == "global"
    return eng, ch, tmp_path / "src"


@pytest.mark.parametrize(
    "method,path,body,file,line,column,message,hint",
    [pytest.param(*case[1:], id=case[0]) for case in REFUSALS],
)
def test_a_refused_change_changes_nothing(seeded, pay, method, path, body, file, line, column, message, hint):
    eng, ch, src = seeded
    before_plan = eng.plan()
    before_files = tree(src)
    status, answer = eng.request(method, path, body)
    assert status == 422, (status, answer)
    assert message in answer["error"], answer
    diags = answer["diagnostics"]
    assert diags and all(set(d) == DIAGNOSTIC_KEYS for d in diags), diags
    errors = [d for d in diags if d["severity"] == "error"]
    first = errors[0]
    assert (first["file"], first["line"], first["column"]) == (str(src / file), line, column), diags
    assert message in first["message"], diags
    if hint:
        assert hint in (first["hint"] or ""), diags
    # Nothing changed: the plan, the files, the answers.
    after_plan = eng.plan()
    assert (after_plan["identity"], after_plan["generation"]) == (
        before_plan["identity"],
        before_plan["generation"],
    )
    assert tree(src) == before_files
    assert charge(pay, ch) == "global"
    # The next good change applies over the old sources, not the refused ones.
    answer = upload_rule(eng, "next.yaml", charge_rule("n", "n"))
    assert answer["plan"]["generation"] == before_plan["generation"] + 1
    assert charge(pay, ch, id="n") == "n" and charge(pay, ch) == "global"


def test_an_applied_change_reports_the_compilers_warnings(seeded, pay):
    eng, ch, src = seeded
    # A second fallback for Charge after global.yaml's can never answer:
    # the compiler warns about it (and logs the warning).
    answer = upload_rule(eng, "shadowed.yaml", charge_rule("never"))
    assert charge(pay, ch) == "global"
    assert eng.logged("shadowed.yaml"), eng.log()
    warnings = answer.get("warnings") or []
    shadowed = str(src / "rules/shadowed.yaml")
    assert any(w.get("severity") == "warning" and w.get("file") == shadowed for w in warnings), answer


BAD_NAMES = ["../x", "/abs", "a/.hidden", "a/../../x", "x.txt"]
# Extensions are exact, as the directories are read: `pay.YAML` would be
# served, then lost at the next reload. (proto name, rule name)
UPPER_CASE_EXTENSIONS = [("a.PROTO", "pay.YAML"), ("common/v1/a.Proto", "sessions/a/pay.Yml")]


def bad_name_requests(name: str | tuple[str, str]):
    """Every route that takes a file name, with `name` (extension added
    unless it has one), or a (proto name, rule name) pair."""
    if isinstance(name, tuple):
        proto, rule = name
    else:
        proto = name if name.endswith(".txt") else f"{name}.proto"
        rule = name if name.endswith(".txt") else f"{name}.yaml"
    proto_text = 'syntax = "proto3";\npackage evil.v1;\n'
    rule_text = charge_rule("evil")
    return [
        ("POST", "/admin/upload/proto", {"filename": proto, "content": proto_text}),
        ("POST", "/upload_proto", {"filename": proto, "content": proto_text}),
        ("POST", "/admin/upload/proto/path", {"path": proto, "content": proto_text}),
        ("PUT", f"/admin/proto/{quoted(proto)}", {"content": proto_text}),
        ("POST", "/admin/upload/rule/grpc", {"filename": rule, "content": rule_text}),
        ("PUT", f"/admin/rule/grpc/{quoted(rule)}", {"content": rule_text}),
    ]


@pytest.mark.parametrize(
    "name", [*BAD_NAMES, *(pytest.param(pair, id="-".join(pair)) for pair in UPPER_CASE_EXTENSIONS)]
)
def test_invalid_file_names_are_refused_and_nothing_is_written(seeded, pay, tmp_path, name):
    eng, ch, src = seeded
    before_plan = eng.plan()
    before_files = tree(tmp_path)
    for method, path, body in bad_name_requests(name):
        status, answer = eng.request(method, path, body)
        assert status == 400, (method, path, status, answer)
        assert "error" in answer, answer
    assert tree(tmp_path) == before_files
    assert not Path("/abs.proto").exists() and not Path("/abs.yaml").exists()
    assert eng.plan()["identity"] == before_plan["identity"]
    assert charge(pay, ch) == "global"


def test_bodies_over_one_mib_are_refused_with_413(seeded, pay):
    eng, ch, src = seeded
    before = tree(src)
    body = json.dumps({"filename": "big.proto", "content": "// " + "x" * (1 << 20)}).encode()
    # As curl sends large bodies: the head, then the body once told to go on.
    with socket.create_connection(("127.0.0.1", eng.admin_port), timeout=TIMEOUT) as s:
        s.sendall(
            b"POST /admin/upload/proto HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
        )
        head = s.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413 "), head
    assert tree(src) == before
    assert charge(pay, ch) == "global"


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/admin/upload/proto"),
        ("POST", "/admin/upload/proto/path"),
        ("PUT", "/admin/proto/pay.proto"),
        ("POST", "/admin/upload/rule/grpc"),
        ("PUT", "/admin/rule/grpc/global.yaml"),
    ],
)
@pytest.mark.parametrize("body", ["not json", "[1, 2]", '{"content": 7}'], ids=["text", "array", "content-not-string"])
def test_bodies_that_are_not_the_expected_json_are_refused_with_400(seeded, pay, method, path, body):
    eng, ch, src = seeded
    before_plan, before = eng.plan(), tree(src)
    status, answer = eng.request(method, path, body)
    assert status == 400, (status, answer)
    assert "error" in answer, answer
    assert tree(src) == before and eng.plan()["identity"] == before_plan["identity"]
    assert charge(pay, ch) == "global"


def test_deleting_what_does_not_exist_is_404(seeded):
    eng, _, src = seeded
    before_plan, before = eng.plan(), tree(src)
    for path in ("/admin/proto/nope.proto", "/admin/rule/grpc/nope.yaml", "/admin/rule/grpc/sessions%2Fa%2Fx.yaml"):
        status, answer = eng.request("DELETE", path)
        assert status == 404 and "error" in answer, (path, status, answer)
    assert tree(src) == before and eng.plan()["identity"] == before_plan["identity"]


# --------------------------------------------------------------------------
# 3. Sessions
# --------------------------------------------------------------------------

SESSION_HEADERS = ["x-wirestub-session", "x-gripmock-session"]


def session_answers(pay: Schema, ch, sessions=("alpha", "beta", "gamma")) -> dict:
    """Charge's answer without a session, in an unknown session (`zeta`)
    and in each of `sessions` (the same under both header spellings, or
    the set of what each gave)."""
    out = {"(none)": charge(pay, ch), "zeta": charge(pay, ch, metadata=[(SESSION_HEADERS[0], "zeta")])}
    for session in sessions:
        seen = {charge(pay, ch, metadata=[(h, session)]) for h in SESSION_HEADERS}
        out[session] = seen.pop() if len(seen) == 1 else seen
    return out


def test_sessions_are_listed_and_deleted_alone(seeded, pay):
    eng, ch, src = seeded
    rules = src / "rules"
    for session in ("alpha", "beta"):
        name = f"sessions/{session}/charge.yaml"
        body = {"filename": name, "content": charge_rule(session)}
        answer = eng.write("POST", "/admin/upload/rule/grpc", body)
        assert answer["changed"] == [f"rules/{name}"], answer
        assert (rules / name).read_text() == body["content"]
    # A session named by the document's `session` key.
    body = {"filename": "gamma.yaml", "content": charge_rule("gamma", session="gamma")}
    eng.write("POST", "/admin/upload/rule/grpc", body)

    assert session_answers(pay, ch) == {
        "(none)": "global",
        "zeta": "global",
        "alpha": "alpha",
        "beta": "beta",
        "gamma": "gamma",
    }
    listed = {s["id"]: s["files"] for s in eng.get("/api/sessions")["sessions"]}
    assert {k: listed.get(k) for k in ("alpha", "beta", "gamma")} == {
        "alpha": ["sessions/alpha/charge.yaml"],
        "beta": ["sessions/beta/charge.yaml"],
        "gamma": ["gamma.yaml"],
    }, listed

    generation = eng.plan()["generation"]
    status, answer = eng.request("DELETE", "/api/sessions/alpha")
    assert status == 200 and answer["ok"] and answer["removed"] == 1, answer
    assert answer["changed"] == ["rules/sessions/alpha/charge.yaml"], answer
    assert answer["plan"]["generation"] == generation + 1, answer
    assert not (rules / "sessions/alpha").exists()
    assert (rules / "sessions/beta/charge.yaml").exists() and (rules / "gamma.yaml").exists()
    assert session_answers(pay, ch) == {
        "(none)": "global",
        "zeta": "global",
        "alpha": "global",
        "beta": "beta",
        "gamma": "gamma",
    }
    listed = {s["id"] for s in eng.get("/api/sessions")["sessions"]}
    assert "alpha" not in listed and "beta" in listed, listed

    # Deleting a session that has nothing changes nothing; a bad name is 400.
    status, answer = eng.request("DELETE", "/api/sessions/alpha")
    assert status == 200 and answer["removed"] == 0 and answer["changed"] == [], answer
    assert eng.plan()["generation"] == generation + 1
    status, answer = eng.request("DELETE", "/api/sessions/bad%20name")
    assert status == 400, (status, answer)


def test_session_rules_answer_their_sessions_before_global_rules(seeded, pay):
    eng, ch, _ = seeded
    upload_rule(eng, "sessions/alpha/charge.yaml", charge_rule("alpha"))
    upload_rule(eng, "sessions/beta/charge.yaml", charge_rule("beta"))
    assert session_answers(pay, ch, ("alpha", "beta")) == {
        "(none)": "global",
        "zeta": "global",
        "alpha": "alpha",
        "beta": "beta",
    }


def test_session_rules_never_answer_calls_outside_their_session(seeded, pay):
    eng, ch, _ = seeded
    eng.write("DELETE", "/admin/rule/grpc/global.yaml")
    upload_rule(eng, "sessions/alpha/charge.yaml", charge_rule("alpha"))
    body = {"filename": "beta.yaml", "content": charge_rule("beta", session="beta")}
    eng.write("POST", "/admin/upload/rule/grpc", body)
    assert session_answers(pay, ch, ("alpha", "beta")) == {
        "(none)": "!NOT_FOUND",
        "zeta": "!NOT_FOUND",
        "alpha": "alpha",
        "beta": "beta",
    }


def test_sessions_named_by_the_session_key_are_listed_and_deleted(seeded, pay):
    eng, ch, src = seeded
    body = {"filename": "gamma.yaml", "content": charge_rule("gamma", session="gamma")}
    eng.write("POST", "/admin/upload/rule/grpc", body)
    assert charge(pay, ch, metadata=[("x-wirestub-session", "gamma")]) == "gamma"
    listed = {s["id"] for s in eng.get("/api/sessions")["sessions"]}
    assert "gamma" in listed, listed
    status, answer = eng.request("DELETE", "/api/sessions/gamma")
    assert status == 200 and answer["removed"] >= 1, answer
    assert charge(pay, ch, metadata=[("x-wirestub-session", "gamma")]) == "global"


# --------------------------------------------------------------------------
# 4. Persistence over a plan
# --------------------------------------------------------------------------


def compiler_binary() -> Path:
    configured = os.environ.get("WIRESTUB_COMPILER")
    path = Path(configured) if configured else engine_process.engine_binary().parent / "compiler"
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.exists():
        pytest.fail(f"compiler binary {path} not found: `cargo build -p wirestub-compiler` or set WIRESTUB_COMPILER")
    return path


def compile_plan(src: Path, out: Path, protos: dict[str, Path], rules: dict[str, str]) -> Path:
    """`compiler build` of `protos` (name in the plan -> source file) and
    `rules` (name -> text), copied under `src`, into the plan file `out`."""
    for name, source in protos.items():
        (src / "protos" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, src / "protos" / name)
    (src / "rules").mkdir(parents=True, exist_ok=True)
    for name, text in rules.items():
        (src / "rules" / name).write_text(text)
    cmd = [str(compiler_binary()), "build", "--protos", str(src / "protos"), "--rules", str(src / "rules")]
    cmd += ["-o", str(out)]
    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and out.exists(), f"{' '.join(cmd)}: {run.returncode}\n{run.stdout}\n{run.stderr}"
    return out


def files_below(root: Path, pattern: str) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob(pattern)) if p.is_file()}


PLAN_PROTOS = files_below(PLAN_SOURCES / "protos", "*.proto")
PLAN_RULES = {name: p.read_text() for name, p in files_below(PLAN_SOURCES / "rules", "*.yaml").items()}


@pytest.fixture
def plan_file(tmp_path) -> Path:
    """runtime_fixtures/plan's protos and rules, copied to a temporary
    directory and compiled by `compiler build` into a plan file."""
    return compile_plan(tmp_path / "plan-src", tmp_path / "plan.bin", PLAN_PROTOS, PLAN_RULES)


EXT_PROTO = (PLAN_SOURCES / "ext.proto").read_text()
PING_OVERRIDE = (
    "service: base.v1.Echo\nmethod: Ping\nresponses:\n"
    '  - when:\n      request.id: "rt"\n    body:\n      text: "from runtime"\n'
)
RELAY_RULE = 'responses:\n  - body:\n      text: "relayed"\n'


def upload_over_plan(eng: Engine, proto_route: str = "/admin/upload/proto") -> None:
    """The runtime sources of the persistence test: a proto importing the
    plan's, a rule for a plan method, a rule for the new service."""
    eng.write("POST", proto_route, {"filename": "ext.proto", "content": EXT_PROTO})
    upload_rule(eng, "ping-override.yaml", PING_OVERRIDE)
    upload_rule(eng, "ext.v1.ext.relay.yaml", RELAY_RULE)


def echo_answers(echo: Schema, eng: Engine) -> tuple[str, str, str]:
    ch = eng.channel()
    return ping(echo, ch, id="rt"), ping(echo, ch, id="other"), ping(echo, ch, RELAY)


def test_runtime_changes_over_a_plan_persist_in_the_state_directory(engines, tmp_path, plan_file, echo):
    state = tmp_path / "state"
    eng = engines(str(plan_file), "--state-dir", str(state))
    storage = eng.get("/admin/status")["runtime"]["storage"]
    assert storage["persistent"] is True, storage
    assert storage["layered_over_plan"] == str(plan_file), storage
    assert (storage["protos"], storage["rules"]) == (str(state / "protos"), str(state / "rules")), storage
    assert echo_answers(echo, eng) == ("from the plan", "from the plan", "!UNIMPLEMENTED")

    upload_over_plan(eng)
    # The runtime rule is tried first: it answers the call it matches,
    # although the plan's (unconditional) rule matches it too.
    expected = ("from runtime", "from the plan", "relayed")
    assert echo_answers(echo, eng) == expected
    assert tree(state) == {
        "protos/ext.proto": EXT_PROTO.encode(),
        "rules/ping-override.yaml": PING_OVERRIDE.encode(),
        "rules/ext.v1.ext.relay.yaml": RELAY_RULE.encode(),
    }

    eng = restart(eng, engines)
    assert echo_answers(echo, eng) == expected
    assert [f["filename"] for f in eng.get("/admin/protos")["files"]] == ["ext.proto"]
    assert sorted(f["filename"] for f in eng.get("/admin/rules/grpc")["files"]) == [
        "ext.v1.ext.relay.yaml",
        "ping-override.yaml",
    ]
    # Deleting after the restart removes the file for good.
    eng.write("DELETE", "/admin/rule/grpc/ping-override.yaml")
    eng = restart(eng, engines)
    assert echo_answers(echo, eng) == ("from the plan", "from the plan", "relayed")


def test_runtime_changes_over_a_plan_without_a_state_directory_live_in_memory(engines, tmp_path, plan_file, echo):
    eng = engines(str(plan_file))
    storage = eng.get("/admin/status")["runtime"]["storage"]
    assert storage["persistent"] is False, storage
    assert storage["layered_over_plan"] == str(plan_file), storage
    files = tree(tmp_path)
    upload_over_plan(eng, "/upload_proto")  # Wishmock's alias
    assert echo_answers(echo, eng) == ("from runtime", "from the plan", "relayed")
    # Nothing written: not beside the plan, not in the working directory.
    assert tree(tmp_path) == files
    assert not (REPO_ROOT / "ext.proto").exists() and not (REPO_ROOT / "state").exists()

    eng = restart(eng, engines)
    assert echo_answers(echo, eng) == ("from the plan", "from the plan", "!UNIMPLEMENTED")
    assert eng.get("/admin/protos") == {"files": []}
    assert eng.get("/admin/rules/grpc") == {"files": []}


# --------------------------------------------------------------------------
# 5. Descriptor sets
# --------------------------------------------------------------------------


def test_descriptor_sets_posted_as_binary_serve_rules(engines, tmp_path):
    protos, rules = tmp_path / "protos", tmp_path / "rules"
    protos.mkdir()
    rules.mkdir()
    eng = engines("--protos", str(protos), "--rules", str(rules))
    fds = descriptor_set(tmp_path / "inventory.binpb", [INVENTORY], ["inventory.proto"])
    inventory = Schema(fds)

    answer = eng.write("POST", "/api/descriptors", fds, content_type="application/octet-stream")
    assert answer["serviceIDs"] == ["inv.v1.Inventory"], answer
    name = answer["name"]
    assert answer["changed"] == [f"protos/{name}"], answer
    assert (protos / name).read_bytes() == fds

    rule = (
        'responses:\n  - body:\n      sku: "BOOK-1"\n      count: 7\n'
        '      checked_at: "2024-01-02T03:04:05Z"\n'
    )
    upload_rule(eng, "inv.v1.inventory.stock.yaml", rule)
    ch = eng.channel()
    reply = inventory.call(ch, STOCK, inventory.message("inv.v1.StockRequest", sku="BOOK-1"))
    assert (reply.sku, reply.count, reply.checked_at.seconds) == ("BOOK-1", 7, 1704164645)

    listed = eng.get("/api/descriptors")
    assert "inv.v1.Inventory" in listed["services"], listed
    [entry] = listed["descriptors"]
    assert entry["name"] == name and entry["bytes"] == len(fds), entry
    assert entry["serviceIDs"] == ["inv.v1.Inventory"], entry
    assert set(entry["files"]) == {"inventory.proto", "google/protobuf/timestamp.proto"}, entry

    before = eng.plan()
    for garbage in (b"\xff\xff\xff\xff not a FileDescriptorSet", b"", b"\x0a\x03abc"):
        status, body = eng.request("POST", "/api/descriptors", garbage, content_type="application/octet-stream")
        assert status == 400 and "error" in body, (garbage, status, body)
    assert eng.plan()["identity"] == before["identity"]
    assert tree(protos) == {name: fds}
    reply = inventory.call(ch, STOCK, inventory.message("inv.v1.StockRequest", sku="BOOK-1"))
    assert reply.count == 7


# --------------------------------------------------------------------------
# 6. Calls while the rules change
# --------------------------------------------------------------------------

CLIENTS = 16
LOOP_SECONDS = 6.0
MAX_CALLS_PER_CLIENT = 5000
MAX_WRITE_ROUNDS = 500


def test_calls_never_fail_while_rules_are_added_replaced_and_deleted(seeded, pay):
    eng, _, _ = seeded
    request = pay.message("pay.v1.ChargeRequest", id="loop").SerializeToString()
    stop = threading.Event()
    start = threading.Barrier(CLIENTS + 1)
    results: list[dict] = [{} for _ in range(CLIENTS)]
    failures: list[str] = []

    def client(i: int) -> None:
        seen = results[i]
        ch = grpc.insecure_channel(f"127.0.0.1:{eng.port}", options=[("grpc.enable_http_proxy", 0)])
        try:
            grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
            reply_cls = type(pay.message("pay.v1.ChargeReply"))
            stub = ch.unary_unary(CHARGE, request_serializer=lambda b: b, response_deserializer=reply_cls.FromString)
            start.wait(TIMEOUT)
            for _ in range(MAX_CALLS_PER_CLIENT):
                if stop.is_set():
                    break
                try:
                    status = stub(request, timeout=TIMEOUT).status
                    seen[status] = seen.get(status, 0) + 1
                except grpc.RpcError as e:
                    failures.append(f"client {i}: {e.code().name} {e.details()}")
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"client {i}: {e!r}")
        finally:
            ch.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    first = eng.plan()["generation"]
    start.wait(TIMEOUT)
    deadline = time.monotonic() + LOOP_SECONDS
    swaps = 0
    try:
        for n in range(MAX_WRITE_ROUNDS):
            if time.monotonic() > deadline:
                break
            body = {"filename": "hot.yaml", "content": charge_rule(f"hot-{n}-a", when_id="loop")}
            eng.write("POST", "/admin/upload/rule/grpc", body)
            eng.write("PUT", "/admin/rule/grpc/hot.yaml", {"content": charge_rule(f"hot-{n}-b", when_id="loop")})
            eng.write("DELETE", "/admin/rule/grpc/hot.yaml")
            swaps += 3
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT + 5)
    assert not any(t.is_alive() for t in threads)
    assert failures == [], failures[:20]
    answers: dict[str, int] = {}
    for seen in results:
        for k, v in seen.items():
            answers[k] = answers.get(k, 0) + v
    unexpected = {k for k in answers if k != "global" and not re.fullmatch(r"hot-\d+-[ab]", k)}
    assert not unexpected, answers
    calls = sum(answers.values())
    hot = sum(v for k, v in answers.items() if k.startswith("hot-"))
    print(f"{swaps} swaps, {calls} calls ({hot} answered by the runtime rule)")
    assert calls >= CLIENTS * 20, answers
    assert answers.get("global") and hot, answers
    assert swaps >= 30, swaps
    assert eng.plan()["generation"] == first + swaps
    assert eng.alive()


# --------------------------------------------------------------------------
# 7. Concurrent writers
# --------------------------------------------------------------------------

WRITERS = 8


def test_concurrent_writers_lose_no_change(seeded, pay):
    eng, ch, src = seeded
    first = eng.plan()["generation"]
    barrier = threading.Barrier(WRITERS)
    answers: list[object] = [None] * WRITERS

    def writer(i: int) -> None:
        body = {"filename": f"writer-{i}.yaml", "content": charge_rule(f"writer-{i}", when_id=f"w{i}")}
        barrier.wait(TIMEOUT)
        answers[i] = eng.request("POST", "/admin/upload/rule/grpc", body)

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(a is not None and a[0] == 200 and a[1]["ok"] for a in answers), answers
    generations = sorted(a[1]["plan"]["generation"] for a in answers)
    assert generations == list(range(first + 1, first + WRITERS + 1)), generations
    assert eng.plan()["generation"] == first + WRITERS
    listed = {f["filename"] for f in eng.get("/admin/rules/grpc")["files"]}
    assert listed == {"global.yaml", *(f"writer-{i}.yaml" for i in range(WRITERS))}, listed
    for i in range(WRITERS):
        assert (src / "rules" / f"writer-{i}.yaml").exists()
        assert charge(pay, ch, id=f"w{i}") == f"writer-{i}"
    assert charge(pay, ch) == "global"


# Past MAX_WAITING (8) writers waiting for the compiler, a writer is told to
# come back (503, Retry-After); none that was answered 200 is lost.
MANY_WRITERS = 24


def test_writers_past_eight_waiting_are_told_to_come_back_and_none_is_lost(seeded, pay):
    eng, ch, src = seeded
    first = eng.plan()["generation"]
    barrier = threading.Barrier(MANY_WRITERS)
    answers: list[object] = [None] * MANY_WRITERS

    def writer(i: int) -> None:
        body = {"filename": f"many-{i}.yaml", "content": charge_rule(f"many-{i}", when_id=f"m{i}")}
        barrier.wait(TIMEOUT)
        answers[i] = eng.exchange("POST", "/admin/upload/rule/grpc", body)

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(MANY_WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(a is not None and a[0] in (200, 503) for a in answers), answers
    applied = [i for i, a in enumerate(answers) if a[0] == 200]
    for i, (status, headers, body) in enumerate(answers):
        if status == 503:
            assert headers.get("retry-after") == "1" and "error" in body, (i, headers, body)
            assert not (src / "rules" / f"many-{i}.yaml").exists()
        else:
            assert body["ok"] is True, body
    print(f"{len(applied)} of {MANY_WRITERS} writers applied, {MANY_WRITERS - len(applied)} told to come back")
    assert applied, answers
    assert sorted(answers[i][2]["plan"]["generation"] for i in applied) == list(
        range(first + 1, first + len(applied) + 1)
    )
    assert eng.plan()["generation"] == first + len(applied)
    listed = {f["filename"] for f in eng.get("/admin/rules/grpc")["files"]}
    assert listed == {"global.yaml", *(f"many-{i}.yaml" for i in applied)}, listed
    for i in applied:
        assert (src / "rules" / f"many-{i}.yaml").exists()
        assert charge(pay, ch, id=f"m{i}") == f"many-{i}"
    assert charge(pay, ch) == "global"


# --------------------------------------------------------------------------
# 8. The plan's files, descriptor sets replaced, refused reloads
# --------------------------------------------------------------------------

# A plan serving base.proto and inventory.proto, which imports
# google/protobuf/timestamp.proto: none of the three may be replaced by an
# upload (an upload may import them).
FAKE_PROTO = 'syntax = "proto3";\npackage fake.v1;\nmessage Fake {\n  string s = 1;\n}\n'


def proto_uploads(name: str, text: str) -> list[tuple[str, str, dict]]:
    """Every route that uploads a .proto, with `name`."""
    return [
        ("POST", "/admin/upload/proto", {"filename": name, "content": text}),
        ("POST", "/upload_proto", {"filename": name, "content": text}),
        ("POST", "/admin/upload/proto/path", {"path": name, "content": text}),
        ("PUT", f"/admin/proto/{quoted(name)}", {"content": text}),
    ]


@pytest.mark.parametrize(
    "name,text",
    [
        ("base.proto", (PLAN_SOURCES / "protos/base.proto").read_text().replace("Ping(", "Pong(")),
        ("inventory.proto", FAKE_PROTO),
        ("google/protobuf/timestamp.proto", FAKE_PROTO.replace("fake.v1", "google.protobuf")),
    ],
)
def test_uploads_cannot_replace_a_file_of_the_plan(engines, tmp_path, echo, name, text):
    protos = {**PLAN_PROTOS, "inventory.proto": INVENTORY / "inventory.proto"}
    plan = compile_plan(tmp_path / "plan-src", tmp_path / "plan.bin", protos, PLAN_RULES)
    state = tmp_path / "state"
    eng = engines(str(plan), "--state-dir", str(state))
    before_plan, before_files = eng.plan(), tree(state)
    for method, path, body in proto_uploads(name, text):
        status, answer = eng.request(method, path, body)
        assert status == 400, (method, path, status, answer)
        assert name in answer["error"], answer
    after = eng.plan()
    assert (after["identity"], after["generation"]) == (before_plan["identity"], before_plan["generation"])
    assert tree(state) == before_files
    assert eng.get("/admin/protos") == {"files": []}
    assert echo_answers(echo, eng) == ("from the plan", "from the plan", "!UNIMPLEMENTED")
    # Importing the plan's files is still the way.
    upload_over_plan(eng)
    assert echo_answers(echo, eng) == ("from runtime", "from the plan", "relayed")


def test_descriptor_sets_may_carry_the_plans_files_only_as_served(engines, tmp_path, echo, plan_file):
    # A set made with --include_imports carries the plan's base.proto: as
    # it is served, it is an import and the set's own file is served; a set
    # whose base.proto differs is refused (400), nothing changed.
    eng = engines(str(plan_file), "--state-dir", str(tmp_path / "state"))
    src = tmp_path / "ds"
    src.mkdir()
    (src / "ext.proto").write_text(EXT_PROTO)
    (src / "base.proto").write_text((PLAN_SOURCES / "protos/base.proto").read_text())
    answer = eng.write("POST", "/api/descriptors", descriptor_set(src / "ok.binpb", [src], [str(src / "ext.proto")]))
    assert answer["ok"], answer
    upload_rule(eng, "ext.v1.ext.relay.yaml", RELAY_RULE)
    assert echo_answers(echo, eng)[2] == "relayed"

    changed = (PLAN_SOURCES / "protos/base.proto").read_text().replace("string text", "int64 text")
    assert changed != (PLAN_SOURCES / "protos/base.proto").read_text()
    (src / "base.proto").write_text(changed)
    before = eng.plan()
    status, answer = eng.request(
        "POST", "/api/descriptors", descriptor_set(src / "bad.binpb", [src], [str(src / "ext.proto")])
    )
    assert status == 400 and "base.proto" in answer["error"], (status, answer)
    assert eng.plan() == before
    assert echo_answers(echo, eng) == ("from the plan", "from the plan", "relayed")


RESTOCK = "/inv.v1.Inventory/Restock"
RESTOCK_RULE = "service: inv.v1.Inventory\nmethod: Restock\nresponses:\n  - body:\n      count: 9\n"


@pytest.mark.parametrize("form", ["as-listed", "percent-encoded", "hash"])
def test_a_changed_descriptor_set_replaces_the_earlier_one_and_sets_are_deleted(engines, tmp_path, buf, form):
    protos, rules = tmp_path / "protos", tmp_path / "rules"
    protos.mkdir()
    rules.mkdir()
    eng = engines("--protos", str(protos), "--rules", str(rules))
    # The same file, inventory.proto, before and after a method was added.
    v1 = descriptor_set(tmp_path / "v1.binpb", [INVENTORY], ["inventory.proto"])
    v2 = descriptor_set(tmp_path / "v2.binpb", [INVENTORY / "v2"], ["inventory.proto"])
    inventory = Schema(v2)

    def post(fds: bytes) -> dict:
        return eng.write("POST", "/api/descriptors", fds, content_type="application/octet-stream")

    first = post(v1)
    assert first["replaced"] == [], first
    second = post(v2)
    name = second["name"]
    assert name != first["name"], (first, second)
    assert second["replaced"] == [f"protos/{first['name']}"], second
    assert sorted(second["changed"]) == sorted([f"protos/{first['name']}", f"protos/{name}"]), second
    assert tree(protos) == {name: v2}
    [entry] = eng.get("/api/descriptors")["descriptors"]
    assert entry["name"] == name and entry["bytes"] == len(v2), entry

    # The new method: ruled, served, and in reflection.
    upload_rule(eng, "restock.yaml", RESTOCK_RULE)
    ch = eng.channel()
    assert inventory.call(ch, RESTOCK, inventory.message("inv.v1.StockRequest", sku="B")).count == 9
    assert "inv.v1.Inventory/Restock" in buf_list_methods(buf, eng, "grpc-v1")

    # Deleted by the name listed, %2F-encoded, or its hash alone (once its
    # rule has gone: a set a rule needs is refused like a proto).
    path = {
        "as-listed": name,
        "percent-encoded": quoted(name),
        "hash": name.removeprefix("descriptors/").removesuffix(".binpb"),
    }[form]
    status, answer = eng.request("DELETE", f"/api/descriptors/{path}")
    assert status == 422 and "inv.v1.Inventory" in answer["error"], (status, answer)
    eng.write("DELETE", "/admin/rule/grpc/restock.yaml")
    answer = eng.write("DELETE", f"/api/descriptors/{path}")
    assert answer["changed"] == [f"protos/{name}"], answer
    assert eng.get("/api/descriptors")["descriptors"] == []
    assert tree(protos) == {}
    try:
        inventory.call(ch, RESTOCK, inventory.message("inv.v1.StockRequest", sku="B"))
        raise AssertionError("Restock still served after its descriptor set was deleted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED, e
    status, answer = eng.request("DELETE", f"/api/descriptors/{path}")
    assert status == 404, (status, answer)


# Reloads refused (422): the plan file replaced by one lacking base.v1.Echo,
# which a runtime rule needs; or by a valid one while a broken rule file
# sits in the state directory. The old plan must stay the base of later
# runtime changes, not only keep serving: (the new plan file's protos and
# rules, a broken file put in the state directory by hand).
REFUSED_RELOADS = [
    pytest.param(
        {"inventory.proto": INVENTORY / "inventory.proto"}, {}, None, id="new-plan-lacks-a-service-a-runtime-rule-needs"
    ),
    pytest.param(
        PLAN_PROTOS,
        {name: text.replace("from the plan", "from plan two") for name, text in PLAN_RULES.items()},
        "broken.yaml",
        id="new-plan-valid-runtime-file-broken",
    ),
]


@pytest.mark.parametrize("new_protos,new_rules,broken", REFUSED_RELOADS)
def test_a_refused_reload_leaves_the_old_plan_as_the_base(
    engines, tmp_path, plan_file, echo, new_protos, new_rules, broken
):
    live, state = tmp_path / "live.bin", tmp_path / "state"
    shutil.copy(plan_file, live)
    eng = engines(str(live), "--state-dir", str(state))
    upload_over_plan(eng)
    expected = ("from runtime", "from the plan", "relayed")
    assert echo_answers(echo, eng) == expected
    before = eng.plan()

    compile_plan(tmp_path / "next-src", live, new_protos, new_rules)
    if broken:
        (state / "rules" / broken).write_text("service: [\n")
    status, answer = eng.request("POST", "/admin/reload")
    assert status == 422, (status, answer)
    after = eng.plan()
    assert (after["identity"], after["generation"]) == (before["identity"], before["generation"])
    assert echo_answers(echo, eng) == expected

    # The next runtime change compiles against the old plan and swaps in
    # the old plan's answers with it.
    later = PING_OVERRIDE.replace('"rt"', '"later"').replace("from runtime", "later")
    answer = upload_rule(eng, "later.yaml", later)
    assert answer["plan"]["generation"] == before["generation"] + 1, answer
    assert ping(echo, eng.channel(), id="later") == "later"
    assert echo_answers(echo, eng) == expected


# --------------------------------------------------------------------------
# 9. The admin token, second directories, the store's lock and temporaries,
#    the bound on schema bytes
# --------------------------------------------------------------------------

TOKEN = "s3cret"
SLOW_BODIES = 300


def slow_head(authorization: str | None) -> bytes:
    """A request head announcing a body that never comes."""
    auth = f"Authorization: {authorization}\r\n".encode() if authorization else b""
    return (
        b"POST /api/stubs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n" + auth + b"\r\n"
    )


def answer_then_close(s: socket.socket, within: float) -> bytes:
    """What the server sends on `s` until it closes it; fails unless it
    has closed within `within` seconds."""
    deadline = time.monotonic() + within
    data = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"not closed within {within}s; got {data!r}"
        s.settimeout(left)
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            raise AssertionError(f"not closed within {within}s; got {data!r}") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"Basic {TOKEN}"], ids=["no-token", "wrong-token", "not-bearer"]
)
def test_requests_without_the_token_are_answered_before_their_body(engines, plan_file, authorization):
    eng = engines(str(plan_file), "--admin-token", TOKEN)
    authorised = {"Authorization": f"Bearer {TOKEN}"}
    head = slow_head(authorization)
    # One: 401 at once, and the connection closed.
    with socket.create_connection(("127.0.0.1", eng.admin_port), timeout=TIMEOUT) as s:
        started = time.monotonic()
        s.sendall(head)
        answer = answer_then_close(s, 1.0)
        assert time.monotonic() - started < 1.0
    assert answer.startswith(b"HTTP/1.1 401 "), answer

    # Many at once do not keep an authorised request from being answered.
    conns: list[socket.socket] = []
    try:
        for _ in range(SLOW_BODIES):
            s = socket.create_connection(("127.0.0.1", eng.admin_port), timeout=TIMEOUT)
            conns.append(s)
            s.sendall(head)
        started = time.monotonic()
        status, _, body = eng.exchange("GET", "/admin/status", headers=authorised, timeout=5)
        took = time.monotonic() - started
        assert status == 200 and "plan" in body, (status, body)
        assert took < 1.0, f"authorised GET /admin/status took {took:.2f}s beside {SLOW_BODIES} slow bodies"
        for s in conns:
            assert answer_then_close(s, 5.0).startswith(b"HTTP/1.1 401 ")
    finally:
        for s in conns:
            s.close()
    status, _, _ = eng.exchange("GET", "/admin/status")
    assert status == 401
    assert eng.exchange("GET", "/admin/status", headers=authorised)[0] == 200


# A second directory of each kind: (kind, routes' prefix, the second
# directory's file, its text, the text a change would write)
SECOND_DIRS = [
    ("rules", "/admin/rule/grpc", "extra.yaml", charge_rule("extra", when_id="x"), charge_rule("changed", when_id="x")),
    (
        "protos",
        "/admin/proto",
        "common/v1/money.proto",
        (PAY_PROTOS / "common/v1/money.proto").read_text(),
        (PAY_PROTOS / "common/v1/money.proto").read_text() + "\nmessage Extra {}\n",
    ),
]


@pytest.mark.parametrize("kind,route,name,text,changed", SECOND_DIRS, ids=[d[0] for d in SECOND_DIRS])
def test_files_of_a_second_directory_are_not_changed(engines, tmp_path, pay, kind, route, name, text, changed):
    protos, rules = seeded_dirs(tmp_path, {"global.yaml": charge_rule("global")})
    src = tmp_path / "src"
    second = src / f"second-{kind}"
    (second / name).parent.mkdir(parents=True)
    if kind == "protos":
        (protos / name).rename(second / name)
    else:
        (second / name).write_text(text)
    eng = engines("--protos", str(protos), "--rules", str(rules), f"--{kind}", str(second))
    ch = eng.channel()
    listed = [f["filename"] for f in eng.get(f"/admin/{'protos' if kind == 'protos' else 'rules/grpc'}")["files"]]
    [listed_name] = [n for n in listed if n.endswith(name)]
    before_plan, before = eng.plan(), tree(src)
    for method, path, body in [
        ("DELETE", f"{route}/{quoted(listed_name)}", None),
        ("PUT", f"{route}/{quoted(listed_name)}", {"content": changed}),
    ]:
        status, answer = eng.request(method, path, body)
        assert status == 400, (method, path, status, answer)
        assert "error" in answer, answer
    assert tree(src) == before and (second / name).read_text() == text
    assert eng.plan()["identity"] == before_plan["identity"]
    assert charge(pay, ch) == "global"
    if kind == "rules":
        assert charge(pay, ch, id="x") == "extra"


def test_a_name_equal_to_a_second_directorys_path_is_a_file_of_the_first(engines, tmp_path, pay):
    protos, rules = seeded_dirs(tmp_path, {"global.yaml": charge_rule("global")})
    src = tmp_path / "src"
    (src / "extra").mkdir()
    extra_text = charge_rule("extra", when_id="x")
    (src / "extra/extra.yaml").write_text(extra_text)
    # Relative directories, so `extra/extra.yaml` is also a name below the
    # first.
    eng = engines("--protos", "protos", "--rules", "rules", "--rules", "extra", cwd=src)
    ch = eng.channel()
    assert charge(pay, ch, id="x") == "extra"
    first_dir_text = charge_rule("first-dir", when_id="y")
    answer = eng.write("PUT", f"/admin/rule/grpc/{quoted('extra/extra.yaml')}", {"content": first_dir_text})
    assert answer["changed"] == ["rules/extra/extra.yaml"], answer
    assert (rules / "extra/extra.yaml").read_text() == first_dir_text
    assert (src / "extra/extra.yaml").read_text() == extra_text
    assert (charge(pay, ch, id="x"), charge(pay, ch, id="y")) == ("extra", "first-dir")

    eng = restart(eng, engines)
    ch = eng.channel()
    assert (charge(pay, ch, id="x"), charge(pay, ch, id="y"), charge(pay, ch)) == ("extra", "first-dir", "global")
    listed = {f["path"] for f in eng.get("/admin/rules/grpc")["files"]}
    assert {str(Path("rules/extra/extra.yaml")), str(Path("extra/extra.yaml"))} <= {
        str(Path(p)) for p in listed
    }, listed


def store_args(layout: str, tmp_path: Path, plan_file: Path) -> tuple[list[str], Path]:
    """An engine's arguments for a store laid out as `layout` (`state-dir`:
    over a plan; `directories`: --protos and --rules), and the store."""
    if layout == "state-dir":
        state = tmp_path / "state"
        return [str(plan_file), "--state-dir", str(state)], state
    protos, rules = seeded_dirs(tmp_path, {"global.yaml": charge_rule("global")})
    return ["--protos", str(protos), "--rules", str(rules)], tmp_path / "src"


LAYOUTS = ["state-dir", "directories"]


def another_rule(layout: str) -> dict:
    """A rule upload that compiles in the store `layout` makes."""
    content = PING_OVERRIDE if layout == "state-dir" else charge_rule("another")
    return {"filename": "another.yaml", "content": content}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_engine_writes_a_store_others_may_serve_it(engines, tmp_path, plan_file, layout):
    # Several engines may serve the same directories (two test runs of the
    # bundled example); the first change makes an engine the store's
    # writer, and another's changes are refused (409) until it stops.
    args, _ = store_args(layout, tmp_path, plan_file)
    first = engines(*args)
    second = engines(*args)
    assert first.write("POST", "/admin/upload/rule/grpc", another_rule(layout))["ok"]
    status, answer = second.request("POST", "/admin/upload/rule/grpc", another_rule(layout))
    assert status == 409 and ".wirestub.lock" in answer["error"], (status, answer)
    assert second.alive() and second.get("/admin/status")
    # Once the first has stopped, the store is free.
    stop_engine(first)
    assert second.write("POST", "/admin/upload/rule/grpc", another_rule(layout))["ok"]


# Temporaries an engine killed while writing leaves (`.NAME.<16 hex>.tmp`),
# and hidden files that only look like them.
STALE = [
    "protos/.pay.proto.0123456789abcdef.tmp",
    "rules/.global.yaml.fedcba9876543210.tmp",
    "rules/sessions/a/.charge.yaml.00000000DEADBEEF.tmp",
]
NOT_STALE = ["rules/.notes.tmp", "rules/.global.yaml.0123.tmp"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stale_temporaries_are_removed_by_the_writer(engines, tmp_path, plan_file, pay, layout):
    # Removed when the engine becomes the store's writer (its first change):
    # only then is no other engine writing them.
    args, store = store_args(layout, tmp_path, plan_file)
    for name in STALE + NOT_STALE:
        (store / name).parent.mkdir(parents=True, exist_ok=True)
        (store / name).write_text("half-written")
    eng = engines(*args)
    assert [n for n in STALE if not (store / n).exists()] == []
    assert eng.write("POST", "/admin/upload/rule/grpc", another_rule(layout))["ok"]
    eng.write("DELETE", "/admin/rule/grpc/another.yaml")
    assert [n for n in STALE if (store / n).exists()] == []
    assert [n for n in NOT_STALE if not (store / n).exists()] == []
    listed = [f["filename"] for f in eng.get("/admin/rules/grpc")["files"]]
    assert listed == ([] if layout == "state-dir" else ["global.yaml"]), listed
    if layout == "directories":
        assert charge(pay, eng.channel()) == "global"


MAX_SCHEMA_BYTES = 20_000


def padded_proto(package: str, size: int) -> str:
    """A valid .proto of about `size` bytes (a long comment)."""
    head = f'syntax = "proto3";\npackage {package};\nmessage Padded {{\n  string s = 1;\n}}\n'
    return head + "// " + "x" * max(0, size - len(head) - 4) + "\n"


def padded_descriptor_set(size: int) -> bytes:
    """A FileDescriptorSet of about `size` bytes (many messages)."""
    fds = descriptor_pb2.FileDescriptorSet()
    f = fds.file.add(name="padded.proto", package="padded.v1", syntax="proto3")
    n = 0
    while fds.ByteSize() < size:
        f.message_type.add(name=f"Padding{n:05d}")
        n += 1
    return fds.SerializeToString()


# What pushes the protos and descriptor sets past the bound: (method, path,
# body; bytes are posted as application/octet-stream).
OVER_SCHEMA_BYTES = [
    ("POST", "/admin/upload/proto", {"filename": "big.proto", "content": padded_proto("big.v1", MAX_SCHEMA_BYTES)}),
    ("POST", "/admin/upload/proto/path", {"path": "a/big.proto", "content": padded_proto("big.v1", MAX_SCHEMA_BYTES)}),
    ("PUT", "/admin/proto/pay.proto", {"content": (PAY_PROTOS / "pay.proto").read_text() + "// " + "x" * 20_000}),
    ("POST", "/api/descriptors", padded_descriptor_set(MAX_SCHEMA_BYTES)),
]


@pytest.mark.parametrize("method,path,body", OVER_SCHEMA_BYTES, ids=[f"{m}-{p}" for m, p, _ in OVER_SCHEMA_BYTES])
def test_protos_past_the_schema_bound_are_refused_with_413(engines, tmp_path, pay, method, path, body):
    protos, rules = seeded_dirs(tmp_path, {"global.yaml": charge_rule("global")})
    args = ["--protos", str(protos), "--rules", str(rules), "--runtime-max-schema-bytes", str(MAX_SCHEMA_BYTES)]
    eng = engines(*args)
    ch = eng.channel()
    # Under the bound, a proto is taken.
    eng.write("POST", "/admin/upload/proto", {"filename": "small.proto", "content": padded_proto("small.v1", 5000)})
    before_plan, before = eng.plan(), tree(tmp_path / "src")
    ctype = "application/octet-stream" if isinstance(body, bytes) else "application/json"
    status, answer = eng.request(method, path, body, content_type=ctype)
    assert status == 413, (status, answer)
    assert "--runtime-max-schema-bytes" in answer["error"], answer
    assert tree(tmp_path / "src") == before
    after = eng.plan()
    assert (after["identity"], after["generation"]) == (before_plan["identity"], before_plan["generation"])
    assert charge(pay, ch) == "global"
    # A change that adds no schema bytes still applies.
    upload_rule(eng, "next.yaml", charge_rule("n", "n"))
    assert charge(pay, ch, id="n") == "n"
