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
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import engine_process
import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOS = REPO_ROOT / "protos"
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
            "chat": importlib.import_module("chat.v1.chat_pb2"),
            "chat_grpc": importlib.import_module("chat.v1.chat_pb2_grpc"),
        }
    finally:
        sys.path.remove(str(out))
    return mods


def engine_command(args: list[str] | None = None) -> list[str]:
    """The engine and its arguments: `args` if given, else from the environment."""
    engine = engine_process.engine_binary()
    if args is not None:
        return [str(engine), *args]
    extra = os.environ.get("WIRESTUB_ENGINE_ARGS")
    return [str(engine), *(shlex.split(extra) if extra else DEFAULT_ARGS)]


Server = engine_process.EngineProcess


def start_server(log_dir: Path, args: list[str] | None = None) -> Server:
    """Starts the engine and waits for its `listening on` line."""
    return engine_process.start(engine_command(args), log_dir)


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """SIGINT, then SIGKILL after `grace` seconds; returns the exit code."""
    return engine_process.stop(proc, grace)


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
def chat_stub(stubs, channel):
    stub = stubs["chat_grpc"].ChatStub(channel)
    if os.environ.get("WIRESTUB_ENGINE_ARGS"):
        # Another server (e.g. the tonic baseline) may not serve chat.v1.
        try:
            stub.GetRoom(stubs["chat"].GetRoomRequest(), timeout=TIMEOUT)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                pytest.skip("the server under test does not serve chat.v1.Chat")
    return stub


@pytest.fixture(scope="session")
def hello(stubs):
    return stubs["hello"]


@pytest.fixture(scope="session")
def shop(stubs):
    return stubs["shop"]


@pytest.fixture(scope="session")
def chat(stubs):
    return stubs["chat"]


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
# Rich errors: google.rpc.Status in grpc-status-details-bin
# --------------------------------------------------------------------------

RICH_ERRORS = REPO_ROOT / "tests" / "cases" / "rich-errors"
BUILTIN_PROTOS = REPO_ROOT / "compiler" / "src" / "builtin"


@pytest.fixture(scope="session")
def rpc(tmp_path_factory):
    """Python modules for the compiler's built-in google/rpc protos (grpcio
    ships none), generated like the stubs."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("rpc")
    wkt = importlib.resources.files("grpc_tools") / "_proto"
    files = ["google/rpc/status.proto", "google/rpc/error_details.proto"]
    args = ["grpc_tools.protoc", f"-I{BUILTIN_PROTOS}", f"-I{wkt}", f"--python_out={out}", *files]
    assert protoc.main(args) == 0, f"grpc_tools.protoc failed: {' '.join(args)}"
    sys.path.insert(0, str(out))
    try:
        return {
            "status": importlib.import_module("google.rpc.status_pb2"),
            "details": importlib.import_module("google.rpc.error_details_pb2"),
        }
    finally:
        sys.path.remove(str(out))


def test_rich_error_details(tmp_path, rpc):
    """A rule's `details` reach grpcio as a google.rpc.Status with typed
    details. Serves tests/cases/rich-errors with its own engine."""
    if os.environ.get("WIRESTUB_ENGINE_ARGS"):
        pytest.skip("needs the wirestub engine serving tests/cases/rich-errors")
    dirs = ["--protos", str(RICH_ERRORS / "protos"), "--rules", str(RICH_ERRORS / "rules")]
    srv = start_server(tmp_path, ["run", *dirs, "--listen", "127.0.0.1:0"])
    try:
        with grpc.insecure_channel(
            f"127.0.0.1:{srv.port}", options=[("grpc.enable_http_proxy", 0)]
        ) as ch:
            # Bytes in, bytes out: CreateRequest { name: "" } encodes to nothing.
            err = rpc_error(ch.unary_unary("/accounts.Accounts/Create"), b"")
    finally:
        stop_process(srv.proc)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "name is required"
    raw = metadata_dict(err.trailing_metadata())["grpc-status-details-bin"]
    status = rpc["status"].Status.FromString(raw)
    assert (status.code, status.message) == (3, "name is required")
    bad = rpc["details"].BadRequest()
    assert status.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("name", "must not be empty"),
        ("email", "must be an address"),
    ]
    assert bad.field_violations[1].localized_message.message == "adresse invalide"
    info = rpc["details"].ErrorInfo()
    assert status.details[1].Unpack(info)
    assert (info.reason, info.domain) == ("NAME_MISSING", "example.com")
    assert dict(info.metadata) == {"hint": "send a name", "field": "name"}
    retry = rpc["details"].RetryInfo()
    assert status.details[2].Unpack(retry)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (1, 500000000)


# --------------------------------------------------------------------------
# chat.v1.Chat: server, client and bidirectional streams
# --------------------------------------------------------------------------


def triples(msgs) -> list[tuple[str, str, int]]:
    return [(m.user, m.text, m.seq) for m in msgs]


def chat_lines(chat, *texts, user="ann"):
    return [chat.ChatMessage(user=user, text=t) for t in texts]


END = object()  # end of a response stream, as Bidi.recv reports it


class Bidi:
    """A streaming call driven one step at a time.

    Requests come from an iterator fed by a queue (`send`, `close` to
    half-close); a reader thread moves the replies, then END or the final
    grpc.RpcError, into another queue, so that every wait (`recv`,
    `silent_for`) is bounded by a timeout.
    """

    def __init__(self, method, timeout: float = TIMEOUT):
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._peeked: list = []  # a reply `silent_for` saw, kept for `recv`
        self._timeout = timeout
        self.half_closed = threading.Event()
        self.call = method(self._request_iter(), timeout=timeout)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _request_iter(self):
        try:
            while True:
                try:
                    # Bounded, and longer than the call's deadline, so that
                    # a deadline is never raced by a half-close from here;
                    # `close` (also on exit) ends the wait at once.
                    item = self._requests.get(timeout=self._timeout + TIMEOUT)
                except queue.Empty:
                    return
                if item is END:
                    return
                yield item
        finally:
            self.half_closed.set()

    def _read(self) -> None:
        try:
            for reply in self.call:
                self._replies.put(reply)
            self._replies.put(END)
        except grpc.RpcError as e:
            self._replies.put(e)

    def send(self, message) -> None:
        self._requests.put(message)

    def close(self) -> None:
        """Half-closes: the request iterator ends."""
        self._requests.put(END)

    def recv(self, timeout: float = 5.0):
        """The next reply, END, or the grpc.RpcError that ended the call."""
        if self._peeked:
            return self._peeked.pop()
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no reply within {timeout}s")

    def silent_for(self, seconds: float) -> bool:
        """True when nothing arrives within `seconds`."""
        if not self._peeked:
            try:
                self._peeked.append(self._replies.get(timeout=seconds))
            except queue.Empty:
                return True
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.call.cancel()  # no-op when the call has already ended
        self._reader.join(TIMEOUT)


def test_chat_unary_beside_streams(chat_stub, chat):
    room = chat_stub.GetRoom(chat.GetRoomRequest(room="general"), timeout=TIMEOUT)
    assert (room.room, room.topic) == ("general", "anything goes")


def test_subscribe_streams_items_in_order(chat_stub, chat):
    start = time.monotonic()
    call = chat_stub.Subscribe(chat.SubscribeRequest(room="general"), timeout=TIMEOUT)
    got = triples(call)
    elapsed = time.monotonic() - start
    assert got == [("ann", "hello", 1), ("bob", "hi ann", 2), ("ann", "bye", 3)]
    assert call.code() == grpc.StatusCode.OK
    assert metadata_dict(call.initial_metadata()).get("x-room") == "general"
    # Two pauses of stream_delay_ms: 20 between three items.
    assert elapsed >= 0.035, f"three items in {elapsed:.3f}s"


def test_subscribe_body_alone_is_a_stream_of_one(chat_stub, chat):
    call = chat_stub.Subscribe(chat.SubscribeRequest(room="attic"), timeout=TIMEOUT)
    assert triples(call) == [("system", "this room is empty", 0)]
    assert call.code() == grpc.StatusCode.OK


def test_endless_stream_cancelled_by_client(chat_stub, chat):
    call = chat_stub.Subscribe(chat.SubscribeRequest(room="lobby"), timeout=TIMEOUT)
    got = []
    for m in call:
        got.append((m.text, m.seq))
        if len(got) == 5:
            break
    assert got == [("tick", 1), ("tock", 2), ("tick", 1), ("tock", 2), ("tick", 1)]
    assert call.cancel(), "the stream had ended on its own"
    assert call.code() == grpc.StatusCode.CANCELLED
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # The channel (one HTTP/2 connection) keeps working: unary and streams.
    room = chat_stub.GetRoom(chat.GetRoomRequest(room="general"), timeout=TIMEOUT)
    assert room.topic == "anything goes"
    again = chat_stub.Subscribe(chat.SubscribeRequest(room="general"), timeout=TIMEOUT)
    assert [m.seq for m in again] == [1, 2, 3]


def test_stream_error_after_items(chat_stub, chat):
    call = chat_stub.Subscribe(chat.SubscribeRequest(room="flaky"), timeout=TIMEOUT)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for m in call:
            got.append((m.text, m.seq))
    assert got == [("one", 1), ("two", 2)], "the items come before the error"
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "room connection lost"


def test_endless_stream_ends_at_deadline(chat_stub, chat):
    call = chat_stub.Subscribe(chat.SubscribeRequest(room="lobby"), timeout=0.3)
    got = []
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for m in call:
            got.append(m.seq)
    elapsed = time.monotonic() - start
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got[:1] == [1], f"items before the deadline: {got}"
    assert got == [1 + i % 2 for i in range(len(got))], "tick, tock, tick, ..."
    assert elapsed < TIMEOUT


@pytest.mark.parametrize(
    "texts, users, note",
    [
        (
            ["hi", "yo", "bye"],
            ["ann", "bob", "cy"],
            "ann started it, and someone said bye",
        ),
        (["hi", "yo", "bye"], ["bob", "ann", "cy"], "three messages"),
        (["hi", "yo"], ["ann", "bob"], "uploaded"),
        ([], [], "nothing uploaded"),
    ],
    ids=["first-and-last", "count", "fallback", "empty"],
)
def test_upload_client_stream(chat_stub, chat, texts, users, note):
    lines = [chat.ChatMessage(user=u, text=t) for u, t in zip(users, texts)]
    summary, call = chat_stub.Upload.with_call(iter(lines), timeout=TIMEOUT)
    assert summary.note == note
    assert call.code() == grpc.StatusCode.OK


def test_converse_aggregate(chat_stub, chat):
    lines = chat_lines(chat, "hello", "over")
    replies = chat_stub.Converse(iter(lines), timeout=TIMEOUT)
    assert triples(replies) == [("mock", "roger", 0), ("mock", "out", 0)]
    replies = chat_stub.Converse(iter(chat_lines(chat, "hello")), timeout=TIMEOUT)
    assert triples(replies) == [("mock", "say over when you are done", 0)]


def test_converse_aggregate_answers_only_after_half_close(chat_stub, chat):
    with Bidi(chat_stub.Converse) as conv:
        conv.send(chat.ChatMessage(user="ann", text="over"))
        assert conv.silent_for(0.3), "aggregate mode answered before the half-close"
        conv.close()
        assert [(r.user, r.text) for r in (conv.recv(), conv.recv())] == [
            ("mock", "roger"),
            ("mock", "out"),
        ]
        assert conv.recv() is END
        assert conv.call.code() == grpc.StatusCode.OK


def test_converse_aggregate_never_closed_hits_deadline(chat_stub, chat):
    with Bidi(chat_stub.Converse, timeout=0.3) as conv:
        conv.send(chat.ChatMessage(user="ann", text="over"))
        err = conv.recv()
        assert isinstance(err, grpc.RpcError), f"expected an error, got {err!r}"
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_talk_duplex_answers_before_half_close(chat_stub, chat):
    with Bidi(chat_stub.Talk) as talk:
        for i in range(3):
            talk.send(chat.ChatMessage(user="ann", text="ping"))
            reply = talk.recv()
            assert not isinstance(reply, grpc.RpcError), reply
            assert reply is not END, f"round {i}: stream ended"
            assert (reply.user, reply.text) == ("mock", "pong"), f"round {i}"
            # The reply came while our request stream was still open.
            assert not talk.half_closed.is_set()
        talk.send(chat.ChatMessage(user="ann", text="count"))
        assert triples([talk.recv(), talk.recv()]) == [
            ("mock", "one", 1),
            ("mock", "two", 2),
        ]
        talk.send(chat.ChatMessage(user="ann", text="hm"))
        assert talk.recv().text == "say ping"
        talk.close()
        assert talk.recv() is END
        assert talk.half_closed.is_set()
        assert talk.call.code() == grpc.StatusCode.OK


def test_talk_duplex_error_ends_the_call(chat_stub, chat):
    with Bidi(chat_stub.Talk) as talk:
        talk.send(chat.ChatMessage(user="ann", text="ping"))
        assert talk.recv().text == "pong"
        talk.send(chat.ChatMessage(user="ann", text="bye"))
        err = talk.recv()
        assert isinstance(err, grpc.RpcError), f"expected an error, got {err!r}"
        assert err.code() == grpc.StatusCode.ABORTED
        assert err.details() == "conversation closed"


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


def test_sized_payloads_stop_at_the_fill_limit_while_another_client_is_served(tmp_path):
    """`utils.bytes(request.n)` asked for a gigabyte writes at most
    `--max-fill-bytes`, at once, and a second client is answered
    meanwhile."""
    case = REPO_ROOT / "tests" / "cases" / "templates"
    cmd = [str(engine_process.engine_binary()), "run", "--listen", "127.0.0.1:0", "--admin-listen", "off"]
    cmd += ["--protos", str(case / "protos"), "--rules", str(case / "rules"), "--max-fill-bytes", "1000"]
    srv = engine_process.start(cmd, tmp_path)

    def request(name: bytes, n: int) -> bytes:
        varint = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            varint.append(byte | (0x80 if n else 0))
            if not n:
                break
        return b"\x0a" + bytes([len(name)]) + name + b"\x10" + bytes(varint)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as a, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as b:
            echo_a, echo_b = a.unary_unary("/tpl.Tpl/Echo"), b.unary_unary("/tpl.Tpl/Echo")
            big = echo_a.future(request(b"sized", 1_000_000_000), timeout=10)
            small = echo_b(request(b"sized", 3), timeout=10)
            # Field 1 (text): "aba".
            assert small.startswith(b"\x0a\x03aba"), small
            reply = big.result()
            # Field 1 holds 1000 bytes: key, a two-byte length, the text.
            assert reply[:3] == b"\x0a\xe8\x07" and reply[3:1003] == b"ab" * 500, reply[:16]
    finally:
        engine_process.stop(srv.proc)
