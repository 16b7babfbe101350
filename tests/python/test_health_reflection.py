"""The engine's built-in gRPC health checking and server reflection, with
real clients: grpcio-health-checking, grpcio-reflection's descriptor
database (v1alpha) and `buf curl` (reflection v1 and v1alpha).

The engine binary (`WIRESTUB_ENGINE`, default target/debug/engine) is started
from the repository root as

    engine run --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
               --rules rules --rules <tmp>/extra-rules

so it compiles protos/ and the example rules, plus one extra rule: a
`shop.v1.Catalog/SearchProducts` call with query "drain" is answered after
DRAIN_DELAY_MS, which keeps a call in flight while the engine drains.

What is checked:
- Check: "" and every mocked service SERVING; an unknown service NOT_FOUND.
- Watch: SERVING at once; SERVICE_UNKNOWN for an unknown service, with the
  call left open.
- SIGTERM while a Watch is open and a call is in flight: the Watch receives
  NOT_SERVING while the process is still up, a Check made then never says
  SERVING, the call in flight still gets its answer and the engine exits 0.
- Reflection (v1alpha, grpcio-reflection): the services listed, a method's
  file resolved with its dependencies, a call made with the reflected types.
- `buf curl` over both reflection protocols: services and methods listed,
  an example method and the health Check called with the reflected schema.

Environment:
  WIRESTUB_ENGINE  engine binary (default target/debug/engine)
  WIRESTUB_BUF     `buf` binary (default node_modules/.bin/buf at the
                   repository root; install it there with
                   `npm install --no-save --no-audit --no-fund @bufbuild/buf`)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import engine_process
import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
DRAIN_DELAY_MS = 3000
DRAIN_TIMEOUT_MS = 15000

MOCKED_SERVICES = ["chat.v1.Chat", "helloworld.Greeter", "shop.v1.Catalog"]
BUILTIN_SERVICES = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
]

EXTRA_RULE = f"""\
# Held for {DRAIN_DELAY_MS} ms: a call still in flight while the engine drains.
service: shop.v1.Catalog
method: SearchProducts
responses:
  - when:
      request.query: "drain"
    delay_ms: {DRAIN_DELAY_MS}
    body:
      next_cursor: "drained"
"""

SEARCH = "/shop.v1.Catalog/SearchProducts"
# SearchRequest { query: "drain" } and the answer the extra rule gives it,
# SearchResponse { next_cursor: "drained" } (bytes in, bytes out).
DRAIN_REQUEST = b"\x0a\x05drain"
DRAINED_REPLY = b"\x12\x07drained"


def status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


# --------------------------------------------------------------------------
# Engine and channels
# --------------------------------------------------------------------------


def start_engine(tmp: Path, *extra: str) -> engine_process.EngineProcess:
    rules = tmp / "extra-rules"
    rules.mkdir(exist_ok=True)
    (rules / "drain.yaml").write_text(EXTRA_RULE)
    cmd = [
        str(engine_process.engine_binary()),
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--rules",
        "rules",
        "--rules",
        str(rules),
        "--drain-timeout-ms",
        str(DRAIN_TIMEOUT_MS),
        *extra,
    ]
    return engine_process.start(cmd, tmp)


def open_channel(srv: engine_process.EngineProcess) -> grpc.Channel:
    ch = grpc.insecure_channel(
        f"127.0.0.1:{srv.port}", options=[("grpc.enable_http_proxy", 0)]
    )
    try:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT)
    except grpc.FutureTimeoutError:
        ch.close()
        pytest.fail(f"could not connect to 127.0.0.1:{srv.port}\n{srv.log()}")
    return ch


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_engine(tmp_path_factory.mktemp("health-reflection"))
    yield srv
    engine_process.stop(srv.proc)


@pytest.fixture(scope="module")
def channel(server):
    ch = open_channel(server)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def health(channel):
    return health_pb2_grpc.HealthStub(channel)


def check(stub, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return stub.Check(request, timeout=TIMEOUT).status


def next_status(watch, what: str, timeout: float = TIMEOUT) -> int:
    """The next message of a Watch call, read in a thread so that a silent
    server fails the test instead of hanging it."""
    out: dict[str, object] = {}

    def read() -> None:
        try:
            out["status"] = next(watch).status
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        watch.cancel()
        pytest.fail(f"{what}: no Watch message within {timeout:.0f}s")
    if "error" in out:
        pytest.fail(f"{what}: Watch ended: {out['error']!r}")
    return out["status"]  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------


def test_check_server_is_serving(health):
    assert status_name(check(health, "")) == "SERVING"


@pytest.mark.parametrize("service", MOCKED_SERVICES)
def test_check_mocked_service_is_serving(health, service):
    assert status_name(check(health, service)) == "SERVING"


@pytest.mark.parametrize(
    "service", ["nope.v1.Nothing", "helloworld.greeter", "shop.v1"]
)
def test_check_unknown_service_is_not_found(health, service):
    with pytest.raises(grpc.RpcError) as e:
        check(health, service)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value


def test_watch_receives_serving(health):
    watch = health.Watch(health_pb2.HealthCheckRequest(service="helloworld.Greeter"))
    try:
        assert status_name(next_status(watch, "Watch helloworld.Greeter")) == "SERVING"
    finally:
        watch.cancel()


def test_watch_unknown_service_stays_open(health):
    watch = health.Watch(health_pb2.HealthCheckRequest(service="nope.v1.Nothing"))
    try:
        status = next_status(watch, "Watch nope.v1.Nothing")
        assert status_name(status) == "SERVICE_UNKNOWN"
        # The call is not ended by the server: no status yet.
        time.sleep(0.2)
        assert watch.running(), "Watch of an unknown service ended"
    finally:
        watch.cancel()


def test_sigterm_turns_health_not_serving_before_exit(tmp_path):
    srv = start_engine(tmp_path)
    try:
        ch = open_channel(srv)
        stub = health_pb2_grpc.HealthStub(ch)
        assert status_name(check(stub, "")) == "SERVING"
        watches = {
            service: stub.Watch(health_pb2.HealthCheckRequest(service=service))
            for service in ["", "helloworld.Greeter"]
        }
        for service, watch in watches.items():
            assert status_name(next_status(watch, f"Watch {service!r}")) == "SERVING"

        # A call the engine holds for DRAIN_DELAY_MS, in flight across the
        # signal: the engine stays up to answer it.
        search = ch.unary_unary(SEARCH)
        in_flight = search.future(DRAIN_REQUEST, timeout=DRAIN_TIMEOUT_MS / 1000)
        time.sleep(0.3)
        assert not in_flight.done(), f"the held call ended early: {in_flight}"
        srv.proc.send_signal(signal.SIGTERM)

        for service, watch in watches.items():
            status = next_status(watch, f"Watch {service!r} after SIGTERM", timeout=5)
            assert status_name(status) == "NOT_SERVING"
        assert srv.alive(), "the engine exited before the call in flight ended"

        # A Check made now: NOT_SERVING if the engine still takes the call;
        # refused (UNAVAILABLE) once the connection has been told to go
        # away. Never SERVING.
        try:
            status = check(stub, "helloworld.Greeter")
            assert status_name(status) == "NOT_SERVING"
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        for watch in watches.values():
            watch.cancel()

        assert in_flight.result() == DRAINED_REPLY
        try:
            code = srv.proc.wait(DRAIN_TIMEOUT_MS / 1000 + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"engine still up after draining\n{srv.log()}")
        assert code == 0, f"engine exited with {code}\n{srv.log()}"
        ch.close()
    finally:
        engine_process.stop(srv.proc)


def test_shutdown_grace_answers_not_serving_to_new_checks(tmp_path):
    # With --shutdown-grace-ms the engine keeps serving after SIGTERM with
    # health NOT_SERVING, so a probe made then sees NOT_SERVING (not a
    # refused connection) and calls still succeed; then it drains and
    # exits 0.
    srv = start_engine(tmp_path, "--shutdown-grace-ms", "1500")
    try:
        ch = open_channel(srv)
        stub = health_pb2_grpc.HealthStub(ch)
        assert status_name(check(stub, "")) == "SERVING"
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while status_name(check(stub, "")) == "SERVING":
            assert time.monotonic() < deadline, "still SERVING 1 s after SIGTERM"
            time.sleep(0.02)
        assert status_name(check(stub, "helloworld.Greeter")) == "NOT_SERVING"
        hello = ch.unary_unary("/helloworld.Greeter/SayHello")
        assert hello(b"", timeout=TIMEOUT) is not None, "calls are still answered during the grace period"
        try:
            code = srv.proc.wait(DRAIN_TIMEOUT_MS / 1000 + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"engine still up after the grace period\n{srv.log()}")
        assert code == 0, f"engine exited with {code}\n{srv.log()}"
        ch.close()
    finally:
        engine_process.stop(srv.proc)


# --------------------------------------------------------------------------
# Reflection with grpcio-reflection (v1alpha)
# --------------------------------------------------------------------------


@pytest.fixture()
def reflection_db(channel):
    return ProtoReflectionDescriptorDatabase(channel)


def test_reflection_lists_services(reflection_db):
    services = sorted(reflection_db.get_services())
    assert services == sorted(MOCKED_SERVICES + BUILTIN_SERVICES)


def test_reflection_resolves_a_methods_file(reflection_db):
    pool = descriptor_pool.DescriptorPool(reflection_db)
    method = pool.FindMethodByName("shop.v1.Catalog.GetProduct")
    assert method.input_type.full_name == "shop.v1.GetProductRequest"
    assert method.output_type.full_name == "shop.v1.Product"
    file = pool.FindFileContainingSymbol("shop.v1.Catalog")
    assert file.name == "shop/v1/catalog.proto"
    deps = sorted(d.name for d in file.dependencies)
    assert deps == [
        "common/money.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/struct.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/wrappers.proto",
    ]
    price = pool.FindMessageTypeByName("shop.v1.Product").fields_by_name["price"]
    assert price.message_type.full_name == "common.Money"


def test_reflection_unknown_symbol_is_a_key_error(reflection_db):
    with pytest.raises(KeyError):
        reflection_db.FindFileContainingSymbol("nope.v1.Nothing")
    with pytest.raises(KeyError):
        reflection_db.FindFileByName("nope/v1/nothing.proto")


def test_call_with_reflected_types(channel, reflection_db):
    pool = descriptor_pool.DescriptorPool(reflection_db)
    method = pool.FindMethodByName("helloworld.Greeter.SayHello")
    request_class = message_factory.GetMessageClass(method.input_type)
    reply_class = message_factory.GetMessageClass(method.output_type)
    say_hello = channel.unary_unary(
        "/helloworld.Greeter/SayHello",
        request_serializer=request_class.SerializeToString,
        response_deserializer=reply_class.FromString,
    )
    reply = say_hello(request_class(name="Tom"), timeout=TIMEOUT)
    assert reply.message == "Hi Tom (from mock)"


def test_reflection_describes_health(reflection_db):
    pool = descriptor_pool.DescriptorPool(reflection_db)
    service = pool.FindServiceByName("grpc.health.v1.Health")
    assert sorted(m.name for m in service.methods) == ["Check", "Watch"]


# --------------------------------------------------------------------------
# buf curl (reflection v1 and v1alpha)
# --------------------------------------------------------------------------

BUF_INSTALL = (
    "install it at the repository root with "
    "`npm install --no-save --no-audit --no-fund @bufbuild/buf`, "
    "or point WIRESTUB_BUF at a buf binary"
)


@pytest.fixture(scope="session")
def buf() -> str:
    configured = os.environ.get("WIRESTUB_BUF")
    default = REPO_ROOT / "node_modules" / ".bin" / "buf"
    path = Path(configured) if configured else default
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.exists():
        pytest.fail(f"buf not found at {path}: {BUF_INSTALL}")
    return str(path)


def buf_curl(buf: str, server, protocol: str, *args: str) -> str:
    cmd = [
        buf,
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect",
        "--reflect-protocol",
        protocol,
        *args,
    ]
    run = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, (
        f"{' '.join(cmd)} exited with {run.returncode}\nstdout: {run.stdout}\n"
        f"stderr: {run.stderr}\nengine log:\n{server.log()}"
    )
    return run.stdout


PROTOCOLS = ["grpc-v1", "grpc-v1alpha"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_buf_curl_lists_services(buf, server, protocol):
    url = f"http://127.0.0.1:{server.port}"
    out = buf_curl(buf, server, protocol, "--list-services", url)
    assert sorted(out.split()) == sorted(MOCKED_SERVICES + BUILTIN_SERVICES)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_buf_curl_lists_methods(buf, server, protocol):
    url = f"http://127.0.0.1:{server.port}"
    out = buf_curl(buf, server, protocol, "--list-methods", url)
    methods = out.split()
    for method in [
        "helloworld.Greeter/SayHello",
        "shop.v1.Catalog/GetProduct",
        "shop.v1.Catalog/SearchProducts",
        "grpc.health.v1.Health/Check",
    ]:
        assert method in methods, out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_buf_curl_calls_a_method(buf, server, protocol):
    out = buf_curl(
        buf,
        server,
        protocol,
        "-d",
        '{"name": "Tom"}',
        f"http://127.0.0.1:{server.port}/helloworld.Greeter/SayHello",
    )
    assert json.loads(out) == {"message": "Hi Tom (from mock)"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_buf_curl_calls_a_method_with_well_known_types(buf, server, protocol):
    # The reply's type imports google/protobuf/*.proto: the reflected schema
    # must carry them for buf to print it.
    out = buf_curl(
        buf,
        server,
        protocol,
        "-d",
        '{"query": "x", "category": "CATEGORY_GAMES", "page_size": 2}',
        f"http://127.0.0.1:{server.port}/shop.v1.Catalog/SearchProducts",
    )
    reply = json.loads(out)
    assert [p["sku"] for p in reply["products"]] == ["GAME-1", "GAME-2"], reply
    assert reply["nextCursor"] == "page-2"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_buf_curl_health_check(buf, server, protocol):
    out = buf_curl(
        buf,
        server,
        protocol,
        "-d",
        '{"service": "helloworld.Greeter"}',
        f"http://127.0.0.1:{server.port}/grpc.health.v1.Health/Check",
    )
    assert json.loads(out) == {"status": "SERVING"}
