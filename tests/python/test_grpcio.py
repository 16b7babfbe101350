"""End-to-end checks of the wirestub engine with a real, non-Rust gRPC client.

At session start the Python stubs for protos/ are generated with
grpc_tools.protoc into a temporary directory, and the engine binary is started
from the repository root as `engine run --listen 127.0.0.1:0`, so it compiles
protos/ and rules/ in process. Every test then talks to it with grpcio and
checks the answers the example rules in rules/ promise.

Environment:
  WIRESTUB_ENGINE       path of the engine binary (default target/debug/engine,
                        relative to the repository root)
  WIRESTUB_ENGINE_ARGS  arguments instead of `run --listen 127.0.0.1:0`
                        (whitespace-separated; lets the suite be pointed at
                        another server, e.g. the tonic baseline)
  WIRESTUB_START_TIMEOUT seconds to wait for the `listening on` line (default 120)
"""

from __future__ import annotations

import datetime
import importlib
import importlib.resources
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOS = REPO_ROOT / "protos"
LISTENING = re.compile(r"listening on (\S+):(\d+)\s*$")
DEFAULT_ARGS = ["run", "--listen", "127.0.0.1:0"]


# --------------------------------------------------------------------------
# Session fixtures: stubs, engine process, channel
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    """Generates the Python modules for protos/ and returns them by name."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    wkt = importlib.resources.files("grpc_tools") / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    assert files, f"no .proto files under {PROTOS}"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    rc = protoc.main(args)
    assert rc == 0, f"grpc_tools.protoc failed ({rc}): {' '.join(args)}"
    sys.path.insert(0, str(out))
    try:
        mods = {
            "hello": importlib.import_module("helloworld_pb2"),
            "hello_grpc": importlib.import_module("helloworld_pb2_grpc"),
            "shop": importlib.import_module("shop.v1.catalog_pb2"),
            "shop_grpc": importlib.import_module("shop.v1.catalog_pb2_grpc"),
        }
    finally:
        sys.path.remove(str(out))
    return mods


def engine_command() -> list[str]:
    engine = Path(os.environ.get("WIRESTUB_ENGINE", "target/debug/engine"))
    if not engine.is_absolute():
        engine = REPO_ROOT / engine
    if not engine.exists():
        pytest.fail(
            f"engine binary {engine} not found: build it with "
            "`cargo build -p wirestub-engine` or set WIRESTUB_ENGINE"
        )
    extra = os.environ.get("WIRESTUB_ENGINE_ARGS")
    return [str(engine), *(shlex.split(extra) if extra else DEFAULT_ARGS)]


class Server:
    """A running server process and the port it listens on."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.log_path = log_path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def start_server(log_dir: Path) -> Server:
    """Starts the engine and waits for its `listening on` line."""
    cmd = engine_command()
    timeout = float(os.environ.get("WIRESTUB_START_TIMEOUT", "120"))
    fd, log_name = tempfile.mkstemp(prefix="engine-", suffix=".log", dir=log_dir)
    log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    lines: list[str] = []
    found: dict[str, int] = {}
    ready = threading.Event()

    def pump() -> None:
        # Reads the first lines, then keeps draining so the pipe never fills.
        assert proc.stdout is not None
        for line in proc.stdout:
            if not ready.is_set():
                lines.append(line)
                m = LISTENING.search(line)
                if m:
                    found["port"] = int(m.group(2))
                    ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout)
    if "port" not in found:
        stop_process(proc)
        pytest.fail(
            f"{' '.join(cmd)} did not print a `listening on` line within "
            f"{timeout:.0f}s (exit code {proc.returncode}).\nstdout: "
            f"{''.join(lines)!r}\nstderr:\n{log_path.read_text(errors='replace')[-4000:]}"
        )
    return Server(proc, found["port"], log_path)


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """SIGINT, then SIGKILL after `grace` seconds; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("logs"))
    yield srv
    stop_process(srv.proc)


@pytest.fixture(scope="session")
def channel(server):
    ch = grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.enable_http_proxy", 0)]
    )
    try:
        grpc.channel_ready_future(ch).result(timeout=10)
    except grpc.FutureTimeoutError:
        pytest.fail(f"could not connect to 127.0.0.1:{server.port}\n{server.log()}")
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def greeter(stubs, channel):
    return stubs["hello_grpc"].GreeterStub(channel)


@pytest.fixture(scope="session")
def catalog(stubs, channel):
    return stubs["shop_grpc"].CatalogStub(channel)


@pytest.fixture(scope="session")
def hello(stubs):
    return stubs["hello"]


@pytest.fixture(scope="session")
def shop(stubs):
    return stubs["shop"]


TIMEOUT = 10.0


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """Calls `fn` and returns the grpc.RpcError it must raise."""
    kwargs.setdefault("timeout", TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def metadata_dict(md) -> dict[str, str]:
    return {k: v for k, v in (md or ())}


# --------------------------------------------------------------------------
# helloworld.Greeter/SayHello
# --------------------------------------------------------------------------


def test_say_hello_tom(greeter, hello):
    reply = greeter.SayHello(hello.HelloRequest(name="Tom"), timeout=TIMEOUT)
    assert reply.message == "Hi Tom (from mock)"


def test_say_hello_fallback(greeter, hello):
    reply = greeter.SayHello(hello.HelloRequest(name="Alice"), timeout=TIMEOUT)
    assert reply.message == "Hello, stranger"
    reply = greeter.SayHello(hello.HelloRequest(), timeout=TIMEOUT)
    assert reply.message == "Hello, stranger"


def test_say_hello_admin_with_role(greeter, hello):
    reply, call = greeter.SayHello.with_call(
        hello.HelloRequest(name="admin"),
        metadata=[("x-role", "root")],
        timeout=TIMEOUT,
    )
    assert reply.message == "Welcome back, root"
    assert call.code() == grpc.StatusCode.OK
    assert metadata_dict(call.initial_metadata()).get("x-served-by") == "wirestub"


def test_say_hello_admin_without_role_falls_back(greeter, hello):
    reply = greeter.SayHello(hello.HelloRequest(name="admin"), timeout=TIMEOUT)
    assert reply.message == "Hello, stranger"


def test_say_hello_blocked(greeter, hello):
    err = rpc_error(greeter.SayHello, hello.HelloRequest(name="blocked"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "blocked users may not say hello"
    assert metadata_dict(err.trailing_metadata()).get("error-id") == "E123"


def test_say_hello_age_42(greeter, hello):
    reply, call = greeter.SayHello.with_call(
        hello.HelloRequest(name="Zed", age=42), timeout=TIMEOUT
    )
    assert reply.message == "The answer"
    assert call.code() == grpc.StatusCode.OK
    assert metadata_dict(call.trailing_metadata()).get("x-answer") == "42"


def test_unknown_method_is_unimplemented(channel, hello):
    nope = channel.unary_unary(
        "/helloworld.Greeter/Nope",
        request_serializer=hello.HelloRequest.SerializeToString,
        response_deserializer=hello.HelloReply.FromString,
    )
    err = rpc_error(nope, hello.HelloRequest(name="Tom"))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


def test_unknown_service_is_unimplemented(channel, hello):
    nope = channel.unary_unary(
        "/nowhere.Nothing/Do",
        request_serializer=hello.HelloRequest.SerializeToString,
        response_deserializer=hello.HelloReply.FromString,
    )
    err = rpc_error(nope, hello.HelloRequest(name="Tom"))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------------
# shop.v1.Catalog/GetProduct
# --------------------------------------------------------------------------


def book_request(shop, sku="BOOK-1", language="fr"):
    return shop.GetProductRequest(sku=sku, locale=shop.Locale(language=language))


def test_get_product_french_book(catalog, shop):
    p = catalog.GetProduct(
        book_request(shop), metadata=[("x-tenant", "acme")], timeout=TIMEOUT
    )
    assert p.sku == "BOOK-1"
    assert p.title == "Le Petit Prince"
    assert p.category == shop.CATEGORY_BOOKS
    assert p.price.currency_code == "EUR"
    assert p.price.units == 12
    assert p.price.nanos == 500000000
    assert list(p.tags) == ["classic", "fr"]
    assert dict(p.attributes) == {"binding": "paperback"}
    assert p.HasField("released_at")
    # 1943-04-06T00:00:00Z is -843868800 (not -844387200, which is 1943-03-31).
    released = datetime.datetime(1943, 4, 6, tzinfo=datetime.timezone.utc)
    assert p.released_at.seconds == int(released.timestamp()) == -843868800
    assert p.released_at.nanos == 0
    assert p.HasField("warranty")
    assert (p.warranty.seconds, p.warranty.nanos) == (0, 0)
    assert p.HasField("stock")
    assert p.stock.value == 3
    extra = p.extra
    assert set(extra.fields) == {"shelf", "signed", "editions"}
    assert extra.fields["shelf"].string_value == "B2"
    assert extra.fields["signed"].WhichOneof("kind") == "bool_value"
    assert extra.fields["signed"].bool_value is False
    editions = extra.fields["editions"].list_value.values
    assert [v.number_value for v in editions] == [1943, 1946]
    assert p.thumbnail == b""
    assert p.views == 9007199254740993
    assert p.rating == 4.8


def test_get_product_english_book(catalog, shop):
    p = catalog.GetProduct(
        book_request(shop, language="en"),
        metadata=[("x-tenant", "acme")],
        timeout=TIMEOUT,
    )
    assert p.title == "The Little Prince"
    assert p.category == shop.CATEGORY_BOOKS
    assert (p.price.currency_code, p.price.units) == ("USD", 14)


def test_get_product_without_tenant_falls_back(catalog, shop):
    p = catalog.GetProduct(book_request(shop), timeout=TIMEOUT)
    assert p.sku == "UNKNOWN"
    assert p.title == "Mystery box"
    assert p.category == shop.CATEGORY_GAMES
    assert not p.HasField("price")
    assert list(p.tags) == []


def test_get_product_wrong_tenant_falls_back(catalog, shop):
    p = catalog.GetProduct(
        book_request(shop), metadata=[("x-tenant", "globex")], timeout=TIMEOUT
    )
    assert p.title == "Mystery box"


def test_get_product_gone(catalog, shop):
    err = rpc_error(
        catalog.GetProduct,
        shop.GetProductRequest(sku="GONE"),
        metadata=[("x-tenant", "acme")],
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "product GONE was discontinued"


# --------------------------------------------------------------------------
# shop.v1.Catalog/SearchProducts
# --------------------------------------------------------------------------


def test_search_without_matching_rule_is_not_found(catalog, shop):
    err = rpc_error(catalog.SearchProducts, shop.SearchRequest(query="nothing"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "shop.v1.Catalog/SearchProducts" in (err.details() or "")


def test_search_slow_hits_deadline(catalog, shop):
    err = rpc_error(
        catalog.SearchProducts, shop.SearchRequest(query="slow"), timeout=0.1
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_search_slow_answers_after_delay(catalog, shop):
    start = time.monotonic()
    r = catalog.SearchProducts(shop.SearchRequest(query="slow"), timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    assert r.next_cursor == "slow"
    assert elapsed >= 0.25, f"answered after {elapsed:.3f}s, rule says delay_ms: 300"


def test_search_games_page(catalog, shop):
    r = catalog.SearchProducts(
        shop.SearchRequest(category=shop.CATEGORY_GAMES, page_size=2),
        timeout=TIMEOUT,
    )
    assert len(r.products) == 2
    assert [(p.sku, p.title) for p in r.products] == [
        ("GAME-1", "Chess"),
        ("GAME-2", "Go"),
    ]
    assert all(p.category == shop.CATEGORY_GAMES for p in r.products)
    assert r.next_cursor == "page-2"


def test_search_negative_sint64(catalog, shop):
    r = catalog.SearchProducts(
        shop.SearchRequest(min_price_units=-5), timeout=TIMEOUT
    )
    assert r.next_cursor == "negative"
    assert len(r.products) == 0


# --------------------------------------------------------------------------
# Process behaviour
# --------------------------------------------------------------------------


def test_many_calls_on_one_channel(greeter, hello):
    futures = [
        greeter.SayHello.future(hello.HelloRequest(name="Tom"), timeout=TIMEOUT)
        for _ in range(200)
    ]
    assert {f.result().message for f in futures} == {"Hi Tom (from mock)"}


def hello_grpc_call(ch, hello, name: str):
    say_hello = ch.unary_unary(
        "/helloworld.Greeter/SayHello",
        request_serializer=hello.HelloRequest.SerializeToString,
        response_deserializer=hello.HelloReply.FromString,
    )
    return say_hello(hello.HelloRequest(name=name), timeout=TIMEOUT)


def test_sigint_stops_engine_cleanly(tmp_path, hello):
    srv = start_server(tmp_path)
    # One answered call first: the engine is then surely past its start-up.
    with grpc.insecure_channel(
        f"127.0.0.1:{srv.port}", options=[("grpc.enable_http_proxy", 0)]
    ) as ch:
        reply = hello_grpc_call(ch, hello, "Tom")
    assert reply.message == "Hi Tom (from mock)"
    srv.proc.send_signal(signal.SIGINT)
    try:
        code = srv.proc.wait(5)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait(5)
        pytest.fail("engine did not stop within 5 s of SIGINT")
    assert code == 0, f"engine exited with {code} after SIGINT\n{srv.log()}"
