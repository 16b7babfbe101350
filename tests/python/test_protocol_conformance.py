"""Protocol conformance on the engine's one cleartext port: gRPC, gRPC-Web
(binary and text) and Connect (unary, streaming, GET), over HTTP/2 (prior
knowledge) and HTTP/1.1, checked against the specifications:

- gRPC: grpc/grpc doc/PROTOCOL-HTTP2.md (status codes, grpc-encoding);
- gRPC-Web: grpc/grpc doc/PROTOCOL-WEB.md (trailer frame flag 0x80, a
  trailers-only answer in the headers, base64 bodies for
  application/grpc-web-text);
- Connect: connectrpc.com/docs/protocol (the code -> HTTP status table,
  the JSON error body with `details[{type, value}]`, the end-of-stream
  message flag 0x02, `trailer-` headers, GET requests for methods with
  `idempotency_level = NO_SIDE_EFFECTS`, compression);
- CORS as browsers' gRPC-Web and Connect clients need it.

Real clients where they exist (grpcio; @grpc/grpc-js from tests/node for
gzip), raw requests otherwise: http.client for HTTP/1.1, python-hyper's h2
for HTTP/2 (`h2_request` below: well-formed requests, any headers, the body
in DATA frames of our choosing). A small TCP proxy (`Sniffer`) decodes the
HTTP/2 frames between grpcio or grpc-js and the engine, to show that they
really sent (and got) gzip-compressed messages.

The engines are the binary under test (`WIRESTUB_ENGINE`, default
target/debug/engine), started from the repository root as

    engine run --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --journal 100
               --protos protos --protos tests/python/protocol_protos
               --rules rules --rules tests/python/protocol_rules [FLAGS]

with FLAGS `--compress-responses on`, `--cors-origins https://app.test` or
`--max-recv-bytes 1048576` for the tests that need them.
protocol_protos/conformance.proto is a test-only service whose request
names the status it wants (protocol_rules/conformance.yaml: codes 1..16
with the message "conformance code N" and a trailer `x-error-trailer: eN`,
a rich error with google.rpc details, and an echo with a response header
and a trailer); shop.v1.Catalog/GetProduct of the bundled example is the
NO_SIDE_EFFECTS method of the example.

"""

from __future__ import annotations

import base64
import functools
import gzip
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import engine_process
import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest
from abuse_support import MIB, RssWatch, channel, fields, grpc_frame, varint
from hyperframe.frame import DataFrame, Frame, HeadersFrame

HERE = Path(__file__).resolve().parent
REPO_ROOT = engine_process.REPO_ROOT
PROTOCOL_PROTOS = HERE / "protocol_protos"
PROTOCOL_RULES = HERE / "protocol_rules"
NODE_MODULES = REPO_ROOT / "tests" / "node" / "node_modules"

SERVICE = "conformance.v1.Conformance"
FAIL = f"/{SERVICE}/Fail"
LOOKUP = f"/{SERVICE}/Lookup"
FAIL_STREAM = f"/{SERVICE}/FailStream"
GET_PRODUCT = "/shop.v1.Catalog/GetProduct"

IO_TIMEOUT = 10.0
LISTENING = re.compile(r"wirestub (engine|admin) listening on (\S+):(\d+)\s*$")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# gRPC code -> (gRPC name, Connect name, Connect HTTP status), from the
# Connect protocol's error code table.
CODES = {
    1: ("CANCELLED", "canceled", 499),
    2: ("UNKNOWN", "unknown", 500),
    3: ("INVALID_ARGUMENT", "invalid_argument", 400),
    4: ("DEADLINE_EXCEEDED", "deadline_exceeded", 504),
    5: ("NOT_FOUND", "not_found", 404),
    6: ("ALREADY_EXISTS", "already_exists", 409),
    7: ("PERMISSION_DENIED", "permission_denied", 403),
    8: ("RESOURCE_EXHAUSTED", "resource_exhausted", 429),
    9: ("FAILED_PRECONDITION", "failed_precondition", 400),
    10: ("ABORTED", "aborted", 409),
    11: ("OUT_OF_RANGE", "out_of_range", 400),
    12: ("UNIMPLEMENTED", "unimplemented", 501),
    13: ("INTERNAL", "internal", 500),
    14: ("UNAVAILABLE", "unavailable", 503),
    15: ("DATA_LOSS", "data_loss", 500),
    16: ("UNAUTHENTICATED", "unauthenticated", 401),
}
GRPC_CODES = {sc.value[0]: sc for sc in grpc.StatusCode}
CONNECT_HTTP_STATUS = {name: status for _, name, status in CODES.values()}



# --------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------


class Engine(engine_process.EngineProcess):
    """An engine with its cleartext port and its admin port."""

    admin_port: int

    def admin_get(self, path: str, **params) -> dict:
        if params:
            path += "?" + urllib.parse.urlencode(params)
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=IO_TIMEOUT)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, f"GET {path}: {resp.status} {body!r}"
        return json.loads(body)


def start_engine(log_dir: Path, *flags: str) -> Engine:
    """`engine run` with the conformance protos and rules beside the bundled
    example, the admin API and a journal; waits for both `listening on`
    lines."""
    cmd = [
        str(engine_process.engine_binary()),
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--journal",
        "100",
        "--protos",
        "protos",
        "--protos",
        str(PROTOCOL_PROTOS.relative_to(REPO_ROOT)),
        "--rules",
        "rules",
        "--rules",
        str(PROTOCOL_RULES.relative_to(REPO_ROOT)),
        *flags,
    ]
    timeout = float(os.environ.get("WIRESTUB_START_TIMEOUT", "120"))
    log_path = log_dir / f"engine-{len(list(log_dir.glob('engine-*.log')))}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True
        )
    ports: dict[str, int] = {}
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # keeps draining so that the pipe never fills
            if ready.is_set():
                continue
            lines.append(line)
            m = LISTENING.search(line)
            if m:
                ports[m.group(1)] = int(m.group(3))
            if len(ports) == 2:
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout)
    if len(ports) != 2:
        engine_process.stop(proc)
        pytest.fail(
            f"{' '.join(cmd)} did not print its `listening on` lines within {timeout:.0f}s "
            f"(exit code {proc.returncode}).\nstdout: {''.join(lines)!r}\n"
            f"stderr:\n{log_path.read_text(errors='replace')[-4000:]}"
        )
    e = Engine(proc, ports["engine"], log_path)
    e.admin_port = ports["admin"]
    return e


def stop_engine(e: Engine) -> None:
    engine_process.stop(e.proc)
    assert "panicked" not in e.log_path.read_text(errors="replace"), e.log()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The default engine: no response compression, CORS for any origin."""
    e = start_engine(tmp_path_factory.mktemp("conformance"))
    yield e
    stop_engine(e)


@pytest.fixture(scope="module")
def gzip_engine(tmp_path_factory):
    """An engine with `--compress-responses on`."""
    e = start_engine(tmp_path_factory.mktemp("conformance-gzip"), "--compress-responses", "on")
    yield e
    stop_engine(e)


@pytest.fixture(scope="module")
def cors_engine(tmp_path_factory):
    """An engine whose only CORS origin is https://app.test."""
    e = start_engine(tmp_path_factory.mktemp("conformance-cors"), "--cors-origins", "https://app.test")
    yield e
    stop_engine(e)


@pytest.fixture(params=["engine", "gzip_engine"])
def any_engine(request) -> Engine:
    """Both the default engine and the one with `--compress-responses on`."""
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


def fail_request(code: int = 0, text: str = "", payload: bytes = b"") -> bytes:
    """conformance.v1.FailRequest { code, text, payload }."""
    out = b""
    if code:
        out += b"\x08" + varint(code)
    if text:
        t = text.encode()
        out += b"\x12" + varint(len(t)) + t
    if payload:
        out += b"\x1a" + varint(len(payload)) + payload
    return out


def reply_of(message: bytes) -> tuple[str, int]:
    """conformance.v1.Reply { text, seq } as (text, seq)."""
    f = fields(message)
    return f.get(1, [b""])[-1].decode(), f.get(2, [0])[-1]


def envelopes(body: bytes) -> list[tuple[int, bytes]]:
    """The (flags, payload) of each 5-byte-prefixed message of a body
    (gRPC, gRPC-Web, Connect streaming); the body must end with one."""
    out, i = [], 0
    while i < len(body):
        assert len(body) - i >= 5, f"truncated envelope header at {i}: {body[i:]!r}"
        flags, n = body[i], int.from_bytes(body[i + 1 : i + 5], "big")
        assert len(body) - i - 5 >= n, f"truncated envelope at {i}: {n} bytes announced, {len(body) - i - 5} left"
        out.append((flags, body[i + 5 : i + 5 + n]))
        i += 5 + n
    return out


def envelope(message: bytes, flags: int = 0) -> bytes:
    return bytes([flags]) + len(message).to_bytes(4, "big") + message


def web_trailers(block: bytes) -> dict[str, str]:
    """A gRPC-Web trailer frame's HTTP/1-style header block."""
    out: dict[str, str] = {}
    for line in block.decode().split("\r\n"):
        if not line:
            continue
        k, _, v = line.partition(":")
        out[k.strip().lower()] = v.strip()
    return out


def b64decode_any(text: str | bytes) -> bytes:
    """Standard or URL-safe base64, padded or not."""
    if isinstance(text, bytes):
        text = text.decode()
    text = text.strip().replace("-", "+").replace("_", "/").rstrip("=")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def b64decode_chunks(body: bytes) -> bytes:
    """A grpc-web-text body: base64 chunks, each possibly padded
    (PROTOCOL-WEB: padding may come wherever the server flushed)."""
    out = b""
    for chunk in re.findall(rb"[A-Za-z0-9+/]+=*", re.sub(rb"\s", b"", body)):
        out += base64.b64decode(chunk + b"=" * (-len(chunk) % 4))
    return out


def status_proto(raw: bytes) -> tuple[int, str, list[tuple[str, bytes]]]:
    """google.rpc.Status { code, message, details: [Any { type_url, value }] }."""
    f = fields(raw)
    details = []
    for any_bytes in f.get(3, []):
        a = fields(any_bytes)
        details.append((a.get(1, [b""])[-1].decode(), a.get(2, [b""])[-1]))
    return f.get(1, [0])[-1], f.get(2, [b""])[-1].decode(), details


def check_rich_details(details: list[tuple[str, bytes]]) -> None:
    """The two details of the rich-error rule: BadRequest and ErrorInfo."""
    types = [t for t, _ in details]
    assert types == [
        "type.googleapis.com/google.rpc.BadRequest",
        "type.googleapis.com/google.rpc.ErrorInfo",
    ], types
    bad_request = fields(details[0][1])
    violation = fields(bad_request[1][0])
    assert violation[1] == [b"text"] and violation[2] == [b"must not be rich"], violation
    info = fields(details[1][1])
    assert info[1] == [b"TOO_RICH"] and info[2] == [b"conformance.test"], info
    entry = fields(info[3][0])
    assert entry == {1: [b"hint"], 2: [b"be poor"]}, entry


def error_message(code: int) -> str:
    return f"conformance code {code}"


# --------------------------------------------------------------------------
# HTTP clients
# --------------------------------------------------------------------------


@dataclass
class Resp:
    """An HTTP response: status, headers (names lower case, in order),
    body, HTTP/2 trailers and, when the stream was reset, its error code."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)
    reset: int | None = None
    elapsed: float = 0.0

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def header_list(self, name: str) -> list[str]:
        """Every value of a header, comma-separated lists split."""
        out = []
        for k, v in self.headers:
            if k == name:
                out += [p.strip() for p in v.split(",") if p.strip()]
        return out

    def describe(self) -> str:
        return (
            f"HTTP {self.status} headers={self.headers} body={self.body[:600]!r}"
            f" trailers={self.trailers} reset={self.reset}"
        )


def http1(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | list = (), timeout: float = IO_TIMEOUT
) -> Resp:
    """One HTTP/1.1 request on a new connection (http.client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=dict(headers))
        r = conn.getresponse()
        data = r.read()
        assert r.version == 11, r.version
        return Resp(
            r.status,
            [(k.lower(), v) for k, v in r.getheaders()],
            data,
            elapsed=time.monotonic() - start,
        )
    finally:
        conn.close()


def h2_request(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]] = (),
    chunks: list[bytes] | None = None,
    timeout: float = IO_TIMEOUT,
) -> Resp:
    """One HTTP/2 request (prior knowledge) on a new connection with h2:
    each of `chunks` is sent as its own DATA frame (split further only past
    the peer's frame size), the last with END_STREAM; no chunks, END_STREAM
    on the HEADERS. Flow control is honoured both ways. Sending stops if
    the engine ends the stream first."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    start = time.monotonic()
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        # Room for large answers (a gzip bomb's refusal is small, but echoes
        # and streams are not limited).
        conn.increment_flow_control_window(16 * MIB)
        sid = conn.get_next_available_stream_id()
        request = [(":method", method), (":scheme", "http"), (":path", path), (":authority", f"127.0.0.1:{port}")]
        conn.send_headers(sid, request + list(headers), end_stream=not chunks)
        pending = list(chunks or [])
        sock.sendall(conn.data_to_send())
        status, resp_headers, body, trailers, reset = 0, [], b"", {}, None
        ended = False
        deadline = time.monotonic() + timeout
        while not ended:
            # Send what the windows allow.
            while pending and not ended:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = pending[0]
                if len(chunk) > window:
                    piece, pending[0] = chunk[:window], chunk[window:]
                    last = False
                else:
                    piece = pending.pop(0)
                    last = not pending
                try:
                    conn.send_data(sid, piece, end_stream=last)
                except h2.exceptions.StreamClosedError:
                    pending = []
                sock.sendall(conn.data_to_send())
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no end of stream within {timeout}s: HTTP {status} {resp_headers} {body[:200]!r}")
            sock.settimeout(left)
            data = sock.recv(1 << 16)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    for k, v in ev.headers:
                        if k == ":status":
                            status = int(v)
                        else:
                            resp_headers.append((k, v))
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                    trailers = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    ended = True
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    reset = ev.error_code
                    ended = True
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    ended = True
            try:
                sock.sendall(conn.data_to_send())
            except OSError:
                break
        return Resp(status, resp_headers, body, trailers, reset, time.monotonic() - start)
    finally:
        sock.close()


def request(
    port: int, http_version: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None
) -> Resp:
    """The same request over HTTP/1.1 or HTTP/2."""
    if http_version == "http1":
        return http1(port, method, path, body, headers)
    return h2_request(port, method, path, headers, [body] if body else None)


HTTP_VERSIONS = ["http1", "http2"]


# --------------------------------------------------------------------------
# Protocol-level calls
# --------------------------------------------------------------------------


def grpc_web_call(
    port: int, http_version: str, path: str, message: bytes, text: bool = False, extra: list = ()
) -> tuple[Resp, list[bytes], dict[str, str], str]:
    """A gRPC-Web call (binary or text): the response, its messages, its
    trailers and where they were (`frame`, or `headers` for a
    trailers-only answer)."""
    body = grpc_frame(message)
    ctype = "application/grpc-web-text" if text else "application/grpc-web+proto"
    if text:
        body = base64.b64encode(body)
    headers = [("content-type", ctype), ("x-grpc-web", "1"), ("accept", ctype), *extra]
    r = request(port, http_version, "POST", path, headers, body)
    assert r.status == 200, r.describe()
    raw = b64decode_chunks(r.body) if text else r.body
    messages, trailers, where = [], {}, "headers"
    frames = envelopes(raw)
    for i, (flags, payload) in enumerate(frames):
        if flags & 0x80:
            assert i == len(frames) - 1, f"trailer frame is not last: {frames}"
            trailers, where = web_trailers(payload), "frame"
        else:
            assert flags == 0, f"unexpected flags {flags:#x}"
            messages.append(payload)
    if where == "headers":
        # Trailers-only: the status travels in the headers (PROTOCOL-WEB:
        # "Trailers may be sent together with response headers").
        trailers = {k: v for k, v in r.headers if k.startswith("grpc-") or k.startswith("x-")}
    assert r.trailers == {}, f"gRPC-Web must not use HTTP trailers: {r.describe()}"
    return r, messages, trailers, where


def connect_unary(
    port: int, http_version: str, path: str, body: bytes, codec: str = "proto", extra: list = ()
) -> Resp:
    headers = [("content-type", f"application/{codec}"), ("connect-protocol-version", "1"), *extra]
    return request(port, http_version, "POST", path, headers, body)


def connect_stream(
    port: int, http_version: str, path: str, message: bytes, codec: str = "proto", extra: list = (), flags: int = 0
) -> tuple[Resp, list[bytes], dict]:
    """A Connect streaming call with one request message: the response,
    its messages and its end-of-stream JSON (which must come last)."""
    headers = [("content-type", f"application/connect+{codec}"), ("connect-protocol-version", "1"), *extra]
    r = request(port, http_version, "POST", path, headers, envelope(message, flags))
    assert r.status == 200, f"Connect streaming responses are always 200: {r.describe()}"
    frames = envelopes(r.body)
    assert frames and frames[-1][0] & 0x02, f"no end-of-stream message last: {frames}"
    for flags, _ in frames[:-1]:
        assert not flags & 0x02, f"end-of-stream message before the last: {frames}"
    end_flags, end = frames[-1]
    if end_flags & 0x01:
        end = gzip.decompress(end)
    return r, [m for _, m in frames[:-1]], json.loads(end)


def connect_error(r: Resp) -> dict:
    assert r.header("content-type") == "application/json", f"Connect errors are JSON: {r.describe()}"
    return json.loads(r.body)


# --------------------------------------------------------------------------
# 1. Error mapping, code by code
# --------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(CODES))
def test_grpc_error_codes_with_grpcio(engine, code):
    with channel(engine.port) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(FAIL)(fail_request(code), timeout=IO_TIMEOUT)
    e = info.value
    assert e.code() == GRPC_CODES[code], (e.code(), e.details())
    assert e.details() == error_message(code)
    assert ("x-error-trailer", f"e{code}") in tuple(e.trailing_metadata() or ())


@pytest.mark.parametrize("code", list(CODES))
def test_grpc_stream_error_codes_with_grpcio(engine, code):
    """A server stream: the first item arrives, then the status."""
    got = []
    with channel(engine.port) as ch:
        with pytest.raises(grpc.RpcError) as info:
            for m in ch.unary_stream(FAIL_STREAM)(fail_request(code), timeout=IO_TIMEOUT):
                got.append(reply_of(m))
    assert got == [("before", 1)]
    assert info.value.code() == GRPC_CODES[code]
    assert info.value.details() == error_message(code)


WEB_VARIANTS = [
    ("http1", "binary", FAIL),
    ("http2", "binary", FAIL),
    ("http1", "text", FAIL),
    ("http2", "text", FAIL),
    ("http1", "binary", FAIL_STREAM),
    ("http2", "binary", FAIL_STREAM),
]


@pytest.mark.parametrize("code", list(CODES))
@pytest.mark.parametrize(
    "http_version,mode,path", WEB_VARIANTS, ids=[f"{h}-{m}-{p.rsplit('/', 1)[1]}" for h, m, p in WEB_VARIANTS]
)
def test_grpc_web_error_codes(engine, code, http_version, mode, path):
    """HTTP 200 always; grpc-status and the percent-encoded grpc-message in
    the trailer frame, or in the headers for a trailers-only answer (the
    unary errors); a stream's item comes before its trailer frame."""
    r, messages, trailers, where = grpc_web_call(
        engine.port, http_version, path, fail_request(code), text=(mode == "text")
    )
    assert trailers.get("grpc-status") == str(code), r.describe()
    assert urllib.parse.unquote(trailers.get("grpc-message", "")) == error_message(code), r.describe()
    assert trailers.get("x-error-trailer") == f"e{code}", r.describe()
    if path == FAIL_STREAM:
        assert [reply_of(m) for m in messages] == [("before", 1)], r.describe()
        assert where == "frame", r.describe()
    else:
        assert messages == [], r.describe()
    expected_type = "application/grpc-web-text" if mode == "text" else "application/grpc-web"
    assert (r.header("content-type") or "").startswith(expected_type), r.describe()


@pytest.mark.parametrize("code", list(CODES))
@pytest.mark.parametrize("codec", ["proto", "json"])
@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_unary_error_codes(engine, code, codec, http_version):
    """The HTTP status of the Connect table, a JSON body {code, message}
    and the trailing metadata as trailer- headers."""
    body = fail_request(code) if codec == "proto" else json.dumps({"code": code}).encode()
    r = connect_unary(engine.port, http_version, FAIL, body, codec)
    _, name, status = CODES[code]
    assert r.status == status, r.describe()
    assert connect_error(r) == {"code": name, "message": error_message(code)}, r.describe()
    assert r.header("trailer-x-error-trailer") == f"e{code}", r.describe()
    assert r.trailers == {}, "Connect does not use HTTP trailers"


@pytest.mark.parametrize("code", list(CODES))
@pytest.mark.parametrize("codec", ["proto", "json"])
@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_stream_error_codes(engine, code, codec, http_version):
    """HTTP 200; the item, then the end-of-stream message (flag 0x02) with
    {"error": {code, message}, "metadata": {...}}."""
    message = fail_request(code) if codec == "proto" else json.dumps({"code": code}).encode()
    r, messages, end = connect_stream(engine.port, http_version, FAIL_STREAM, message, codec)
    _, name, _ = CODES[code]
    if codec == "proto":
        assert [reply_of(m) for m in messages] == [("before", 1)], r.describe()
    else:
        assert [json.loads(m) for m in messages] == [{"text": "before", "seq": 1}], r.describe()
    assert end == {
        "error": {"code": name, "message": error_message(code)},
        "metadata": {"x-error-trailer": [f"e{code}"]},
    }, r.describe()
    assert r.header("content-type") == f"application/connect+{codec}", r.describe()


def test_success_carries_metadata_over_every_protocol(engine):
    """The echo rule: its response header and trailer over each protocol."""
    port = engine.port
    with channel(port) as ch:
        reply, call = ch.unary_unary(FAIL).with_call(fail_request(text="g"), timeout=IO_TIMEOUT)
    assert reply_of(reply) == ("echo g", 1)
    assert ("x-answer-header", "h1") in call.initial_metadata()
    assert ("x-answer-trailer", "t1") in call.trailing_metadata()
    for http_version in HTTP_VERSIONS:
        r, messages, trailers, where = grpc_web_call(port, http_version, FAIL, fail_request(text="w"))
        assert [reply_of(m) for m in messages] == [("echo w", 1)] and where == "frame", r.describe()
        assert trailers.get("grpc-status") == "0" and trailers.get("x-answer-trailer") == "t1", trailers
        assert r.header("x-answer-header") == "h1", r.describe()
        r = connect_unary(port, http_version, FAIL, fail_request(text="c"))
        assert r.status == 200 and reply_of(r.body) == ("echo c", 1), r.describe()
        assert r.header("content-type") == "application/proto", r.describe()
        assert r.header("x-answer-header") == "h1" and r.header("trailer-x-answer-trailer") == "t1", r.describe()
        r, messages, end = connect_stream(port, http_version, FAIL_STREAM, fail_request(text="s"))
        assert [reply_of(m) for m in messages] == [("one s", 1), ("two s", 2)], r.describe()
        assert end == {"metadata": {"x-answer-trailer": ["t1"]}}, end
        assert r.header("x-answer-header") == "h1", r.describe()


# ---- rich errors (details)


def grpcio_rich_status(port: int) -> bytes:
    with channel(port) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(FAIL)(fail_request(3, "rich"), timeout=IO_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "rich error"
    md = dict(info.value.trailing_metadata())
    assert "grpc-status-details-bin" in md, md
    return md["grpc-status-details-bin"]


def test_rich_error_with_grpcio(engine):
    code, message, details = status_proto(grpcio_rich_status(engine.port))
    assert (code, message) == (3, "rich error")
    check_rich_details(details)


@pytest.mark.parametrize("mode", ["binary", "text"])
@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_rich_error_grpc_web(engine, http_version, mode):
    """grpc-status-details-bin (base64 google.rpc.Status) in the gRPC-Web
    answer, the same Status grpcio gets."""
    r, _, trailers, _ = grpc_web_call(engine.port, http_version, FAIL, fail_request(3, "rich"), text=(mode == "text"))
    assert trailers.get("grpc-status") == "3", r.describe()
    raw = b64decode_any(trailers["grpc-status-details-bin"])
    code, message, details = status_proto(raw)
    assert (code, message) == (3, "rich error")
    check_rich_details(details)
    assert status_proto(raw) == status_proto(grpcio_rich_status(engine.port))


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_rich_error_connect_unary(engine, http_version):
    """`details`: [{type: the message's full name, value: unpadded base64 of
    its bytes}], the same detail messages gRPC carries."""
    r = connect_unary(engine.port, http_version, FAIL, fail_request(3, "rich"))
    assert r.status == 400, r.describe()
    err = connect_error(r)
    assert err["code"] == "invalid_argument" and err["message"] == "rich error", err
    _, _, grpc_details = status_proto(grpcio_rich_status(engine.port))
    assert [d["type"] for d in err["details"]] == ["google.rpc.BadRequest", "google.rpc.ErrorInfo"], err
    for d, (type_url, value) in zip(err["details"], grpc_details):
        assert "=" not in d["value"], f"Connect detail values are unpadded base64: {d}"
        assert re.fullmatch(r"[A-Za-z0-9+/]*", d["value"]), f"standard base64 alphabet expected: {d}"
        assert b64decode_any(d["value"]) == value
        assert type_url.endswith("/" + d["type"])
    check_rich_details([(f"type.googleapis.com/{d['type']}", b64decode_any(d["value"])) for d in err["details"]])
    assert r.header("trailer-x-detail-trailer") == "d1", r.describe()
    assert r.header("trailer-grpc-status-details-bin") is None, r.describe()


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_rich_error_connect_stream(engine, http_version):
    r, messages, end = connect_stream(engine.port, http_version, FAIL_STREAM, fail_request(3, "rich"))
    assert messages == [], r.describe()
    err = end["error"]
    assert err["code"] == "invalid_argument" and err["message"] == "rich error", end
    check_rich_details([(f"type.googleapis.com/{d['type']}", b64decode_any(d["value"])) for d in err["details"]])
    assert all("=" not in d["value"] for d in err["details"]), err
    assert end.get("metadata") == {"x-detail-trailer": ["d1"]}, end


# --------------------------------------------------------------------------
# 2. Compression
# --------------------------------------------------------------------------


class Sniffer:
    """A TCP proxy in front of the engine that decodes the HTTP/2 frames
    going each way on each connection (hyperframe and hpack; nothing is
    changed), so that a test can see which headers and message flags a
    real client sent and got."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        # Per connection: bytes client -> engine, engine -> client.
        self.connections: list[tuple[bytearray, bytearray]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            up, down = bytearray(), bytearray()
            with self.lock:
                self.connections.append((up, down))
            for src, dst, buf in ((client, server, up), (server, client, down)):
                threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self.lock:
                    buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()

    @staticmethod
    def _frames(raw: bytes, preface: bool) -> list[Frame]:
        if preface:
            assert raw.startswith(PREFACE), raw[:30]
            raw = raw[len(PREFACE) :]
        decoder = hpack.Decoder()
        out, i = [], 0
        while len(raw) - i >= 9:
            frame, length = Frame.parse_frame_header(memoryview(raw[i : i + 9]))
            if len(raw) - i - 9 < length:
                break
            frame.parse_body(memoryview(raw[i + 9 : i + 9 + length]))
            i += 9 + length
            if isinstance(frame, HeadersFrame):
                frame.decoded = dict(decoder.decode(frame.data, raw=False))
            out.append(frame)
        return out

    def calls(self) -> list[dict]:
        """The calls to the conformance service, in order: request headers
        and message flags, response headers (the first block) and message
        flags."""
        with self.lock:
            connections = [(bytes(u), bytes(d)) for u, d in self.connections]
        out = []
        for up, down in connections:
            if not up:
                continue
            streams: dict[int, dict] = {}
            for f in self._frames(up, preface=True):
                if isinstance(f, HeadersFrame):
                    st = streams.setdefault(f.stream_id, {"request": {}, "response": {}, "up": b"", "down": b""})
                    st["request"].update(f.decoded)
                elif isinstance(f, DataFrame) and f.stream_id in streams:
                    streams[f.stream_id]["up"] += f.data
            for f in self._frames(down, preface=False):
                if isinstance(f, HeadersFrame) and f.stream_id in streams:
                    if not streams[f.stream_id]["response"]:
                        streams[f.stream_id]["response"] = dict(f.decoded)
                elif isinstance(f, DataFrame) and f.stream_id in streams:
                    streams[f.stream_id]["down"] += f.data
            for sid in sorted(streams):
                st = streams[sid]
                if not st["request"].get(":path", "").startswith(f"/{SERVICE}/"):
                    continue
                out.append(
                    {
                        "request": st["request"],
                        "request_flags": [fl for fl, _ in envelopes(st["up"])],
                        "response": st["response"],
                        "response_flags": [fl for fl, _ in envelopes(st["down"])],
                    }
                )
        return out


@pytest.fixture
def sniffer_for():
    made = []

    def make(e: Engine) -> Sniffer:
        s = Sniffer(e.port)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("level", ["channel", "call"])
def test_grpcio_gzip(any_engine, sniffer_for, level):
    """grpcio with gzip (on the channel, or on the call) gets correct
    answers; what went over the wire shows gzip was used, and the answer is
    gzip-compressed exactly when the engine runs with --compress-responses
    on (grpcio announces grpc-accept-encoding: ..., gzip)."""
    compress = any_engine.proc.args.count("--compress-responses") > 0
    sniffer = sniffer_for(any_engine)
    payload = b"z" * 4096  # compressible, so grpcio compresses it
    kwargs = {"compression": grpc.Compression.Gzip}
    ch = grpc.insecure_channel(
        f"127.0.0.1:{sniffer.port}",
        options=[("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)],
        **(kwargs if level == "channel" else {}),
    )
    with ch:
        call_kw = kwargs if level == "call" else {}
        reply = ch.unary_unary(FAIL)(fail_request(text="zip", payload=payload), timeout=IO_TIMEOUT, **call_kw)
        assert reply_of(reply) == ("echo zip", 1)
        items = list(
            ch.unary_stream(FAIL_STREAM)(fail_request(text="zs", payload=payload), timeout=IO_TIMEOUT, **call_kw)
        )
        assert [reply_of(m) for m in items] == [("one zs", 1), ("two zs", 2)]
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(FAIL)(fail_request(code=5, payload=payload), timeout=IO_TIMEOUT, **call_kw)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    calls = sniffer.calls()
    assert len(calls) == 3, calls
    for c in calls:
        assert c["request"].get("grpc-encoding") == "gzip", c
        assert c["request_flags"] == [1], c
        assert "gzip" in c["request"].get("grpc-accept-encoding", ""), c
    for c in calls[:2]:
        if compress:
            assert c["response"].get("grpc-encoding") == "gzip", c
            assert c["response_flags"] and set(c["response_flags"]) == {1}, c
        else:
            assert c["response"].get("grpc-encoding", "identity") == "identity", c
            assert set(c["response_flags"]) == {0}, c


@pytest.mark.parametrize("accept", [True, False])
def test_grpc_response_gzip_raw_h2(any_engine, accept):
    """A raw gRPC request with grpc-accept-encoding: gzip gets grpc-encoding:
    gzip and compressed messages from an engine with --compress-responses
    on, identity otherwise (and without the header, always identity)."""
    compress = any_engine.proc.args.count("--compress-responses") > 0
    headers = [("content-type", "application/grpc"), ("te", "trailers")]
    if accept:
        headers.append(("grpc-accept-encoding", "gzip"))
    r = h2_request(any_engine.port, "POST", FAIL, headers, [grpc_frame(fail_request(text="raw"))])
    assert r.status == 200 and r.trailers.get("grpc-status") == "0", r.describe()
    [(flags, payload)] = envelopes(r.body)
    if compress and accept:
        assert r.header("grpc-encoding") == "gzip", r.describe()
        assert flags == 1, r.describe()
        payload = gzip.decompress(payload)
    else:
        assert r.header("grpc-encoding") in (None, "identity"), r.describe()
        assert flags == 0, r.describe()
    assert reply_of(payload) == ("echo raw", 1)


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_grpc_web_gzip_request_and_response(any_engine, http_version):
    compress = any_engine.proc.args.count("--compress-responses") > 0
    body = envelope(gzip.compress(fail_request(text="webzip")), flags=1)
    headers = [
        ("content-type", "application/grpc-web+proto"),
        ("grpc-encoding", "gzip"),
        ("grpc-accept-encoding", "gzip"),
    ]
    r = request(any_engine.port, http_version, "POST", FAIL, headers, body)
    assert r.status == 200, r.describe()
    frames = envelopes(r.body)
    (flags, payload), (tflags, tblock) = frames
    if compress:
        assert r.header("grpc-encoding") == "gzip" and flags == 1, r.describe()
        payload = gzip.decompress(payload)
    else:
        assert flags == 0, r.describe()
    assert reply_of(payload) == ("echo webzip", 1)
    assert tflags & 0x80
    if tflags & 0x01:
        tblock = gzip.decompress(tblock)
    assert web_trailers(tblock)["grpc-status"] == "0"


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("codec", ["proto", "json"])
def test_connect_unary_gzip(any_engine, http_version, codec):
    """Content-Encoding: gzip on the request is decoded; with
    Accept-Encoding: gzip the answer is gzip-compressed (Content-Encoding:
    gzip) by an engine with --compress-responses on, and plain otherwise."""
    compress = any_engine.proc.args.count("--compress-responses") > 0
    plain = fail_request(text="cz") if codec == "proto" else json.dumps({"text": "cz"}).encode()
    r = connect_unary(
        any_engine.port,
        http_version,
        FAIL,
        gzip.compress(plain),
        codec,
        [("content-encoding", "gzip"), ("accept-encoding", "gzip")],
    )
    assert r.status == 200, r.describe()
    body = r.body
    if compress:
        assert r.header("content-encoding") == "gzip", r.describe()
        body = gzip.decompress(body)
    else:
        assert r.header("content-encoding") in (None, "identity"), r.describe()
    if codec == "proto":
        assert reply_of(body) == ("echo cz", 1)
    else:
        assert json.loads(body) == {"text": "echo cz", "seq": 1}


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_stream_gzip(any_engine, http_version):
    """Connect-Content-Encoding: gzip with the compressed flag on the
    request envelope; with Connect-Accept-Encoding: gzip the answer's
    messages are compressed (flag 0x01) by an engine with
    --compress-responses on."""
    compress = any_engine.proc.args.count("--compress-responses") > 0
    r, messages, end = connect_stream(
        any_engine.port,
        http_version,
        FAIL_STREAM,
        gzip.compress(fail_request(text="sz")),
        extra=[("connect-content-encoding", "gzip"), ("connect-accept-encoding", "gzip")],
        flags=1,
    )
    frames = envelopes(r.body)
    if compress:
        assert r.header("connect-content-encoding") == "gzip", r.describe()
        assert all(fl & 0x01 for fl, _ in frames[:-1]), frames
        messages = [gzip.decompress(m) for m in messages]
    else:
        assert all(fl == 0 for fl, _ in frames[:-1]), frames
    assert [reply_of(m) for m in messages] == [("one sz", 1), ("two sz", 2)]
    assert end == {"metadata": {"x-answer-trailer": ["t1"]}}


def test_connect_gzip_http1_plain_client(engine):
    """The brief's case on its own: a gzip Connect unary request over
    HTTP/1.1 with http.client, no Accept-Encoding: a plain answer."""
    r = http1(
        engine.port,
        "POST",
        FAIL,
        gzip.compress(fail_request(code=0, text="h1gzip")),
        {"content-type": "application/proto", "content-encoding": "gzip", "connect-protocol-version": "1"},
    )
    assert r.status == 200 and reply_of(r.body) == ("echo h1gzip", 1), r.describe()


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("form", ["post", "get"])
def test_connect_empty_gzip_body_is_an_empty_message(engine, http_version, form):
    if form == "post":
        r = connect_unary(engine.port, http_version, FAIL, b"", extra=[("content-encoding", "gzip")])
    else:
        r = request(
            engine.port, http_version, "GET",
            f"{LOOKUP}?connect=v1&encoding=proto&base64=1&compression=gzip&message=", [], None,
        )
    assert r.status == 200, r.describe()
    assert reply_of(r.body) == ("echo ", 1), r.describe()


# ---- gzip bombs


@functools.cache
def gzip_bomb(expanded: int = 512 * MIB) -> bytes:
    """gzip of FailRequest { payload: `expanded` zero bytes }: about 500 KiB
    that inflate to 512 MiB."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [c.compress(b"\x1a" + varint(expanded))]
    zeros = bytes(MIB)
    parts += [c.compress(zeros) for _ in range(expanded // MIB)]
    parts.append(c.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    e = start_engine(tmp_path_factory.mktemp("conformance-bomb"), "--max-recv-bytes", str(MIB))
    yield e
    stop_engine(e)


BOMBS = ["grpc-http2", "grpc-web-http1", "grpc-web-http2", "connect-http1", "connect-http2", "connect-stream-http2"]


BOMB_ROUNDS = 8


def send_bomb(port: int, kind: str, bomb: bytes) -> tuple[Resp, str]:
    """One bomb of `kind`; asserts RESOURCE_EXHAUSTED in the protocol's
    terms and returns the response and the status message."""
    http_version = "http1" if kind.endswith("http1") else "http2"
    if kind == "grpc-http2":
        r = h2_request(
            port, "POST", FAIL,
            [("content-type", "application/grpc"), ("te", "trailers"), ("grpc-encoding", "gzip")],
            [envelope(bomb, 1)],
        )
        every = dict(r.headers) | r.trailers
        assert r.status == 200 and every.get("grpc-status") == "8", r.describe()
        return r, urllib.parse.unquote(every.get("grpc-message", ""))
    if kind.startswith("grpc-web"):
        r = request(
            port, http_version, "POST", FAIL,
            [("content-type", "application/grpc-web+proto"), ("grpc-encoding", "gzip")],
            envelope(bomb, 1),
        )
        assert r.status == 200, r.describe()
        frames = envelopes(r.body)
        trailers = web_trailers(frames[-1][1]) if frames else dict(r.headers)
        assert trailers.get("grpc-status") == "8", r.describe()
        return r, urllib.parse.unquote(trailers.get("grpc-message", ""))
    if kind.startswith("connect-stream"):
        r, messages, end = connect_stream(
            port, http_version, FAIL_STREAM, bomb, extra=[("connect-content-encoding", "gzip")], flags=1
        )
        assert messages == [] and end["error"]["code"] == "resource_exhausted", r.describe()
        return r, end["error"].get("message", "")
    r = connect_unary(port, http_version, FAIL, bomb, extra=[("content-encoding", "gzip")])
    assert r.status == 429, r.describe()
    err = connect_error(r)
    assert err["code"] == "resource_exhausted", err
    return r, err.get("message", "")


@pytest.mark.parametrize("kind", BOMBS)
def test_gzip_bomb_is_resource_exhausted(small_engine, kind):
    """A 500 KiB gzip message that inflates to 512 MiB, against
    --max-recv-bytes 1 MiB, sent BOMB_ROUNDS times: each gets
    RESOURCE_EXHAUSTED (Connect unary: 429 resource_exhausted) naming the
    limit, within 3 s; the engine's resident memory, sampled every 20 ms
    throughout, grows by less than 64 MiB; the engine still serves."""
    bomb = gzip_bomb()
    port = small_engine.port
    baseline = small_engine.rss_kib()
    watch = RssWatch(small_engine.proc.pid)
    try:
        for _ in range(BOMB_ROUNDS):
            r, message = send_bomb(port, kind, bomb)
            assert r.elapsed < 3.0, f"took {r.elapsed:.2f}s"
            assert str(MIB) in message, message
    finally:
        watch.stop()
    assert small_engine.alive(), small_engine.log()
    grown = watch.peak - baseline
    assert grown < 64 * 1024, f"{watch.report()}, {grown / 1024:.1f} MiB over the {baseline / 1024:.1f} MiB baseline"
    with channel(port) as ch:
        assert reply_of(ch.unary_unary(FAIL)(fail_request(text="after"), timeout=IO_TIMEOUT)) == ("echo after", 1)


# ---- unknown encodings


def test_grpc_unknown_encoding_is_unimplemented(engine):
    """grpc-encoding: br: UNIMPLEMENTED, with grpc-accept-encoding listing
    what the engine takes (gzip among them)."""
    r = h2_request(
        engine.port, "POST", FAIL,
        [("content-type", "application/grpc"), ("te", "trailers"), ("grpc-encoding", "br")],
        [envelope(b"\x0b\x00\x00\x00", 1)],
    )
    every = dict(r.headers) | r.trailers
    assert r.status == 200 and every.get("grpc-status") == "12", r.describe()
    accepted = [e.strip() for e in every.get("grpc-accept-encoding", "").split(",")]
    assert "gzip" in accepted, r.describe()
    assert "br" in urllib.parse.unquote(every.get("grpc-message", "")), r.describe()


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_grpc_web_unknown_encoding_is_unimplemented(engine, http_version):
    r, _, trailers, _ = grpc_web_call(
        engine.port, http_version, FAIL, b"", extra=[("grpc-encoding", "br")]
    )
    assert trailers.get("grpc-status") == "12", r.describe()
    assert "gzip" in (r.header("grpc-accept-encoding") or trailers.get("grpc-accept-encoding", "")), r.describe()


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_unknown_encoding_is_unimplemented(engine, http_version):
    """Connect: 'If the client uses an unsupported Content-Encoding, servers
    should return an error with code "unimplemented" and a message listing
    the supported encodings'."""
    r = connect_unary(engine.port, http_version, FAIL, b"x", extra=[("content-encoding", "br")])
    assert r.status == 501, r.describe()
    err = connect_error(r)
    assert err["code"] == "unimplemented" and "gzip" in err["message"], err
    r, _, end = connect_stream(
        engine.port, http_version, FAIL_STREAM, b"x", extra=[("connect-content-encoding", "br")], flags=1
    )
    assert end["error"]["code"] == "unimplemented" and "gzip" in end["error"]["message"], end
    r = get(engine.port, http_version, f"{LOOKUP}?connect=v1&encoding=proto&base64=1&compression=br&message=AA")
    assert r.status == 501, r.describe()
    err = connect_error(r)
    assert err["code"] == "unimplemented" and "gzip" in err["message"], err


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_unknown_encoding_uses_connect_headers(engine, http_version):
    r = connect_unary(engine.port, http_version, FAIL, b"x", extra=[("content-encoding", "br")])
    assert "gzip" in r.header_list("accept-encoding"), r.describe()
    assert "grpc-encoding" not in connect_error(r)["message"], r.describe()
    r, _, end = connect_stream(
        engine.port, http_version, FAIL_STREAM, b"x", extra=[("connect-content-encoding", "br")], flags=1
    )
    assert "gzip" in r.header_list("connect-accept-encoding"), r.describe()


# ---- @grpc/grpc-js with gzip

GRPC_JS_SCRIPT = r"""
const grpc = require('@grpc/grpc-js');
const [addr, path, hex] = process.argv.slice(2);
const client = new grpc.Client(addr, grpc.credentials.createInsecure(), {
  'grpc.default_compression_algorithm': 2, // gzip
});
client.makeUnaryRequest(path, (b) => b, (b) => b, Buffer.from(hex, 'hex'), (err, res) => {
  if (err) console.log(JSON.stringify({code: err.code, details: err.details}));
  else console.log(JSON.stringify({reply: res.toString('hex')}));
  client.close();
});
"""


def test_grpc_js_gzip(any_engine, sniffer_for, tmp_path, node, node_modules):
    compress = any_engine.proc.args.count("--compress-responses") > 0
    script = tmp_path / "gzip.cjs"
    script.write_text(GRPC_JS_SCRIPT)
    sniffer = sniffer_for(any_engine)
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))

    def run(message: bytes) -> dict:
        out = subprocess.run(
            [node, str(script), f"127.0.0.1:{sniffer.port}", FAIL, message.hex()],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    got = run(fail_request(text="js", payload=b"j" * 2048))
    assert reply_of(bytes.fromhex(got["reply"])) == ("echo js", 1), got
    got = run(fail_request(code=7, payload=b"j" * 2048))
    assert got == {"code": 7, "details": error_message(7)}, got
    calls = sniffer.calls()
    assert len(calls) == 2, calls
    for c in calls:
        assert c["request"].get("grpc-encoding") == "gzip" and c["request_flags"] == [1], c
    first = calls[0]
    assert "gzip" in first["request"].get("grpc-accept-encoding", ""), first
    if compress:
        assert first["response"].get("grpc-encoding") == "gzip" and first["response_flags"] == [1], first
    else:
        assert first["response"].get("grpc-encoding", "identity") == "identity", first
        assert first["response_flags"] == [0], first


# --------------------------------------------------------------------------
# 3. gRPC-Web text over HTTP/2
# --------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 3, 7])
@pytest.mark.parametrize("path", [FAIL, FAIL_STREAM])
def test_grpc_web_text_over_http2_split_body(engine, split, path):
    """The base64 request body in two DATA frames split at an odd offset
    (inside a 4-character base64 group); the answer decodes to the framed
    message(s) then the trailer frame."""
    body = base64.b64encode(grpc_frame(fail_request(text="text-mode")))
    assert len(body) > split
    r = h2_request(
        engine.port, "POST", path,
        [("content-type", "application/grpc-web-text"), ("accept", "application/grpc-web-text"), ("x-grpc-web", "1")],
        [body[:split], body[split:]],
    )
    assert r.status == 200, r.describe()
    assert (r.header("content-type") or "").startswith("application/grpc-web-text"), r.describe()
    assert re.fullmatch(rb"[A-Za-z0-9+/=\s]*", r.body), f"not base64: {r.body!r}"
    frames = envelopes(b64decode_chunks(r.body))
    *messages, (tflags, tblock) = frames
    assert tflags == 0x80, frames
    assert web_trailers(tblock).get("grpc-status") == "0", tblock
    got = [reply_of(m) for fl, m in messages]
    if path == FAIL:
        assert got == [("echo text-mode", 1)]
    else:
        assert got == [("one text-mode", 1), ("two text-mode", 2)]
        assert web_trailers(tblock).get("x-answer-trailer") == "t1", tblock
    assert r.trailers == {}, r.describe()


def test_grpc_web_text_over_http2_byte_by_byte(engine):
    """The extreme split: one base64 character per DATA frame."""
    body = base64.b64encode(grpc_frame(fail_request(text="drip")))
    r = h2_request(
        engine.port, "POST", FAIL,
        [("content-type", "application/grpc-web-text+proto"), ("x-grpc-web", "1")],
        [body[i : i + 1] for i in range(len(body))],
    )
    frames = envelopes(b64decode_chunks(r.body))
    assert reply_of(frames[0][1]) == ("echo drip", 1), r.describe()
    assert web_trailers(frames[-1][1]).get("grpc-status") == "0", r.describe()


# --------------------------------------------------------------------------
# 4. CORS
# --------------------------------------------------------------------------


def preflight(port: int, http_version: str, origin: str, requested: str) -> Resp:
    headers = [
        ("origin", origin),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", requested),
    ]
    return request(port, http_version, "OPTIONS", FAIL, headers, None)


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_cors_preflight_any_origin(engine, http_version):
    requested = "content-type, x-grpc-web, x-user-agent, connect-protocol-version, x-custom-meta"
    r = preflight(engine.port, http_version, "http://page.test", requested)
    assert r.status == 204, r.describe()
    assert r.header("access-control-allow-origin") == "*", r.describe()
    assert r.header("access-control-allow-credentials") is None, r.describe()
    methods = r.header_list("access-control-allow-methods")
    assert "POST" in methods, r.describe()
    allowed = [h.lower() for h in r.header_list("access-control-allow-headers")]
    for h in [x.strip() for x in requested.split(",")]:
        assert h in allowed, f"{h} not allowed: {r.describe()}"
    assert r.body == b"", r.describe()


def exposed(r: Resp) -> list[str]:
    return [h.lower() for h in r.header_list("access-control-expose-headers")]


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_cors_on_grpc_web_answers(engine, http_version):
    origin = [("origin", "http://page.test")]
    r, messages, _, _ = grpc_web_call(engine.port, http_version, FAIL, fail_request(text="cors"), extra=origin)
    assert r.header("access-control-allow-origin") == "*", r.describe()
    for h in ["grpc-status", "grpc-message", "x-answer-header"]:
        assert h in exposed(r), f"{h} not exposed: {r.describe()}"
    # A trailers-only error: the status is in the headers, which the page
    # must be able to read.
    r, _, trailers, where = grpc_web_call(engine.port, http_version, FAIL, fail_request(7), extra=origin)
    assert trailers.get("grpc-status") == "7"
    assert r.header("access-control-allow-origin") == "*", r.describe()
    for h in ["grpc-status", "grpc-message", "grpc-status-details-bin"] + (
        ["x-error-trailer"] if where == "headers" else []
    ):
        assert h in exposed(r), f"{h} not exposed: {r.describe()}"


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_cors_on_connect_answers(engine, http_version):
    origin = [("origin", "http://page.test")]
    r = connect_unary(engine.port, http_version, FAIL, fail_request(text="cors"), extra=origin)
    assert r.status == 200 and r.header("access-control-allow-origin") == "*", r.describe()
    for h in ["x-answer-header", "trailer-x-answer-trailer"]:
        assert h in exposed(r), f"{h} not exposed: {r.describe()}"
    r = connect_unary(engine.port, http_version, FAIL, fail_request(9), extra=origin)
    assert r.status == 400 and r.header("access-control-allow-origin") == "*", r.describe()
    assert "trailer-x-error-trailer" in exposed(r), r.describe()
    r, _, _ = connect_stream(engine.port, http_version, FAIL_STREAM, fail_request(text="s"), extra=origin)
    assert r.header("access-control-allow-origin") == "*" and "x-answer-header" in exposed(r), r.describe()
    r = request(engine.port, http_version, "GET", f"{LOOKUP}?connect=v1&encoding=json&message=%7B%7D", origin, None)
    assert r.status == 200 and r.header("access-control-allow-origin") == "*", r.describe()


@pytest.mark.parametrize(
    "http_version",
    [
        "http1",
        "http2",
    ],
)
def test_cors_on_http_refusals(engine, http_version):
    origin = [("origin", "http://page.test")]
    r = request(engine.port, http_version, "POST", FAIL, [("content-type", "text/plain"), *origin], b"x")
    assert r.status == 415 and r.header("access-control-allow-origin") == "*", r.describe()
    r = get(engine.port, http_version, f"{FAIL}?connect=v1&encoding=json&message=%7B%7D", origin)
    assert r.status == 405 and r.header("access-control-allow-origin") == "*", r.describe()


def test_no_cors_headers_without_origin(engine):
    r = connect_unary(engine.port, "http1", FAIL, fail_request(text="x"))
    assert r.header("access-control-allow-origin") is None, r.describe()
    with channel(engine.port) as ch:
        _, call = ch.unary_unary(FAIL).with_call(fail_request(text="x"), timeout=IO_TIMEOUT)
    assert not any(k.startswith("access-control-") for k, _ in call.initial_metadata())


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_cors_listed_origin(cors_engine, http_version):
    port = cors_engine.port
    r = preflight(port, http_version, "https://app.test", "content-type, x-grpc-web")
    assert r.status == 204, r.describe()
    assert r.header("access-control-allow-origin") == "https://app.test", r.describe()
    assert r.header("access-control-allow-credentials") == "true", r.describe()
    assert "origin" in [v.lower() for v in r.header_list("vary")], r.describe()
    origin = [("origin", "https://app.test")]
    r = connect_unary(port, http_version, FAIL, fail_request(text="ok"), extra=origin)
    assert r.status == 200, r.describe()
    assert r.header("access-control-allow-origin") == "https://app.test", r.describe()
    assert r.header("access-control-allow-credentials") == "true", r.describe()
    r, _, _, _ = grpc_web_call(port, http_version, FAIL, fail_request(text="ok"), extra=origin)
    assert r.header("access-control-allow-origin") == "https://app.test", r.describe()
    assert r.header("access-control-allow-credentials") == "true", r.describe()


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_cors_other_origin_refused(cors_engine, http_version):
    port = cors_engine.port
    r = preflight(port, http_version, "https://evil.test", "content-type")
    assert r.status == 403, r.describe()
    assert r.header("access-control-allow-origin") is None, r.describe()
    origin = [("origin", "https://evil.test")]
    r = connect_unary(port, http_version, FAIL, fail_request(text="no"), extra=origin)
    assert r.header("access-control-allow-origin") is None, r.describe()
    assert r.header("access-control-allow-credentials") is None, r.describe()
    r, _, _, _ = grpc_web_call(port, http_version, FAIL, fail_request(text="no"), extra=origin)
    assert r.header("access-control-allow-origin") is None, r.describe()


# --------------------------------------------------------------------------
# 5. Connect GET
# --------------------------------------------------------------------------


def get(port: int, http_version: str, path: str, headers: list = ()) -> Resp:
    return request(port, http_version, "GET", path, list(headers), None)


def urlsafe_b64(data: bytes, pad: bool = False) -> str:
    s = base64.urlsafe_b64encode(data).decode()
    return urllib.parse.quote(s if pad else s.rstrip("="), safe="")


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_get_proto_base64(engine, http_version):
    msg = fail_request(text="get?/+")  # bytes whose base64 has URL-unsafe characters
    for pad in (False, True):
        r = get(engine.port, http_version, f"{LOOKUP}?connect=v1&encoding=proto&base64=1&message={urlsafe_b64(msg, pad)}")
        assert r.status == 200 and r.header("content-type") == "application/proto", r.describe()
        assert reply_of(r.body) == ("echo get?/+", 1), r.describe()
        assert r.header("x-answer-header") == "h1" and r.header("trailer-x-answer-trailer") == "t1", r.describe()


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_get_json(engine, http_version):
    message = urllib.parse.quote(json.dumps({"text": "json get é"}), safe="")
    r = get(engine.port, http_version, f"{LOOKUP}?connect=v1&encoding=json&message={message}")
    assert r.status == 200 and r.header("content-type") == "application/json", r.describe()
    assert json.loads(r.body) == {"text": "echo json get é", "seq": 1}, r.describe()
    # Any order of parameters, unknown ones allowed (the spec says servers
    # must accept both); an error answers with the Connect mapping.
    message = urllib.parse.quote(json.dumps({"code": 5}), safe="")
    r = get(engine.port, http_version, f"{LOOKUP}?cache-buster=1&message={message}&encoding=json&connect=v1")
    assert r.status == 404 and connect_error(r) == {"code": "not_found", "message": error_message(5)}, r.describe()


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_get_bundled_get_product(engine, http_version):
    """The bundled example's NO_SIDE_EFFECTS method (its rules need the
    x-tenant header)."""
    message = urllib.parse.quote(json.dumps({"sku": "BOOK-1"}), safe="")
    r = get(engine.port, http_version, f"{GET_PRODUCT}?connect=v1&encoding=json&message={message}", [("x-tenant", "acme")])
    assert r.status == 200, r.describe()
    product = json.loads(r.body)
    assert product["title"] == "The Little Prince" and product["sku"] == "BOOK-1", product


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("path", [FAIL, "/helloworld.Greeter/SayHello", "/chat.v1.Chat/Subscribe"])
def test_connect_get_without_no_side_effects_is_405(engine, http_version, path):
    message = urllib.parse.quote(json.dumps({}), safe="")
    r = get(engine.port, http_version, f"{path}?connect=v1&encoding=json&message={message}")
    assert r.status == 405, r.describe()


@pytest.mark.parametrize(
    "http_version",
    [
        "http1",
        "http2",
    ],
)
def test_405_names_the_allowed_methods(engine, http_version):
    r = get(engine.port, http_version, f"{FAIL}?connect=v1&encoding=json&message=%7B%7D")
    assert r.status == 405, r.describe()
    assert "POST" in r.header_list("allow"), r.describe()


def test_connect_get_bad_query_to_post_only_method_is_405_http1(engine):
    r = get(engine.port, "http1", f"{FAIL}?encoding=xml")
    assert r.status == 405, r.describe()


def test_connect_get_bad_query_to_post_only_method_is_405_http2(engine):
    r = get(engine.port, "http2", f"{FAIL}?encoding=xml")
    assert r.status == 405, r.describe()


MALFORMED_QUERIES = {
    "no-message": "connect=v1&encoding=json",
    "no-encoding": "connect=v1&message=%7B%7D",
    "bad-base64": "connect=v1&encoding=proto&base64=1&message=%25%25%25",
    "bad-version": "connect=v2&encoding=json&message=%7B%7D",
    "bad-json": "connect=v1&encoding=json&message=%7B%22text%22",
}


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("case", list(MALFORMED_QUERIES))
def test_connect_get_malformed_query_is_invalid_argument(engine, http_version, case):
    r = get(engine.port, http_version, f"{LOOKUP}?{MALFORMED_QUERIES[case]}")
    assert r.status == 400, r.describe()
    err = connect_error(r)
    assert err["code"] == "invalid_argument" and err.get("message"), err


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_get_undecodable_proto_is_an_error(engine, http_version):
    """A base64 message that is not a valid FailRequest: a Connect error
    (the engine answers internal, as gRPC servers do for a message that
    does not parse; connect-go would say invalid_argument; the spec does
    not say)."""
    message = urlsafe_b64(b"\x12\x09short")
    r = get(engine.port, http_version, f"{LOOKUP}?connect=v1&encoding=proto&base64=1&message={message}")
    err = connect_error(r)
    assert err["code"] in ("invalid_argument", "internal") and err.get("message"), err
    assert r.status == CONNECT_HTTP_STATUS[err["code"]], r.describe()


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_get_unknown_codec_is_415(engine, http_version):
    r = get(engine.port, http_version, f"{LOOKUP}?connect=v1&encoding=xml&message=x")
    assert r.status == 415, r.describe()


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
def test_connect_unknown_codec_post_is_415(engine, http_version):
    """POST with a codec the engine lacks ('must respond with 415'), and a
    streaming content type on a unary method (the engine's choice: 415)."""
    r = request(engine.port, http_version, "POST", FAIL, [("content-type", "application/xml")], b"<x/>")
    assert r.status == 415, r.describe()
    r = request(engine.port, http_version, "POST", FAIL, [("content-type", "application/connect+proto")], envelope(b""))
    assert r.status == 415, r.describe()


# --------------------------------------------------------------------------
# 6. JSON
# --------------------------------------------------------------------------

JSON_TRANSPORTS = ["connect", "connect-stream", "grpc-web"]


def json_call(port: int, http_version: str, transport: str, body: bytes) -> tuple[str, str]:
    """A JSON request over a transport: (Connect code name or gRPC code as
    a string, message)."""
    if transport == "connect":
        r = connect_unary(port, http_version, FAIL, body, "json")
        err = connect_error(r)
        assert r.status == CONNECT_HTTP_STATUS[err["code"]], r.describe()
        return err["code"], err.get("message", "")
    if transport == "connect-stream":
        r, _, end = connect_stream(port, http_version, FAIL_STREAM, body, "json")
        return end["error"]["code"], end["error"].get("message", "")
    headers = [("content-type", "application/grpc-web+json")]
    r = request(port, http_version, "POST", FAIL, headers, grpc_frame(body))
    assert r.status == 200, r.describe()
    frames = envelopes(r.body)
    trailers = web_trailers(frames[-1][1]) if frames and frames[-1][0] & 0x80 else dict(r.headers)
    code = int(trailers["grpc-status"])
    return CODES[code][1] if code else "ok", urllib.parse.unquote(trailers.get("grpc-message", ""))


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("transport", JSON_TRANSPORTS)
def test_malformed_json_is_invalid_argument(engine, http_version, transport):
    code, message = json_call(engine.port, http_version, transport, b'{"text": "unfinished')
    assert code == "invalid_argument", (code, message)
    assert "JSON" in message and re.search(r"EOF|end|unterminated|column", message, re.I), message


@pytest.mark.parametrize("http_version", HTTP_VERSIONS)
@pytest.mark.parametrize("transport", JSON_TRANSPORTS)
def test_unknown_json_field_is_invalid_argument(engine, http_version, transport):
    code, message = json_call(engine.port, http_version, transport, b'{"text": "x", "colour": "red"}')
    assert code == "invalid_argument", (code, message)
    assert "colour" in message, message


@pytest.mark.parametrize("transport", JSON_TRANSPORTS)
def test_wrong_json_type_is_invalid_argument(engine, transport):
    code, message = json_call(engine.port, "http1", transport, b'{"code": "five"}')
    assert code == "invalid_argument", (code, message)


@pytest.mark.parametrize("name", ["include_stock", "includeStock"])
def test_json_field_names_both_forms(engine, name):
    """The JSON mapping takes the proto field name and the lowerCamel JSON
    name; the answer uses JSON names (the bundled GetProduct rules)."""
    body = json.dumps({"sku": "BOOK-1", "locale": {"language": "fr"}, name: True}).encode()
    r = connect_unary(engine.port, "http1", GET_PRODUCT, body, "json", [("x-tenant", "acme")])
    assert r.status == 200, r.describe()
    product = json.loads(r.body)
    assert product["title"] == "Le Petit Prince" and product["releasedAt"] == "1943-04-06T00:00:00Z", product
    assert product["price"]["currencyCode"] == "EUR", product


# --------------------------------------------------------------------------
# 7. The journal records the protocol
# --------------------------------------------------------------------------


def test_journal_records_the_protocol(engine):
    port = engine.port
    tag = f"journal-{time.monotonic_ns()}"
    expected = {}
    with channel(port) as ch:
        ch.unary_unary(FAIL)(fail_request(text=f"{tag}-grpc"), timeout=IO_TIMEOUT)
    expected[f"{tag}-grpc"] = "grpc"
    for http_version in HTTP_VERSIONS:
        name = f"{tag}-web-{http_version}"
        grpc_web_call(port, http_version, FAIL, fail_request(text=name))
        expected[name] = "grpc-web"
        name = f"{tag}-webtext-{http_version}"
        grpc_web_call(port, http_version, FAIL, fail_request(text=name), text=True)
        expected[name] = "grpc-web"
        name = f"{tag}-connect-{http_version}"
        assert connect_unary(port, http_version, FAIL, fail_request(text=name)).status == 200
        expected[name] = "connect"
        name = f"{tag}-stream-{http_version}"
        connect_stream(port, http_version, FAIL_STREAM, fail_request(text=name))
        expected[name] = "connect"
        name = f"{tag}-get-{http_version}"
        msg = urllib.parse.quote(json.dumps({"text": name}), safe="")
        assert get(port, http_version, f"{LOOKUP}?connect=v1&encoding=json&message={msg}").status == 200
        expected[name] = "connect"
    name = f"{tag}-grpc-error"
    with channel(port) as ch, pytest.raises(grpc.RpcError):
        ch.unary_unary(FAIL)(fail_request(code=5, text=name), timeout=IO_TIMEOUT)
    expected[name] = "grpc"

    deadline = time.monotonic() + 5
    while True:
        seen = {}
        for method in (FAIL, FAIL_STREAM, LOOKUP):
            listing = engine.admin_get("/admin/journal", method=method.lstrip("/"), limit=1000)
            for e in listing["entries"]:
                req = e.get("request") or {}
                if isinstance(req, dict) and str(req.get("text", "")).startswith(tag):
                    seen[req["text"]] = e
        if set(seen) >= set(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    missing = set(expected) - set(seen)
    assert not missing, f"not in the journal: {sorted(missing)}"
    wrong = {k: seen[k]["protocol"] for k in expected if seen[k].get("protocol") != expected[k]}
    assert not wrong, f"wrong protocol (expected {expected}): {wrong}"
    assert seen[f"{tag}-grpc-error"]["status"]["name"] == "NOT_FOUND"
