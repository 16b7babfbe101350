#!/usr/bin/env python3
"""End-to-end load bench: the wirestub engine against the tonic baseline.

One command, standard library only:

    python3 benches/load.py                 # full run (about 50 minutes)
    python3 benches/load.py --quick         # CI: 16x10, static + match, 200 B, protocols, proxy (~1.5 minutes)
    python3 benches/load.py --soak 600      # memory growth of the engine alone

The workloads are the methods of the bench service (benches/plan/: protos/
and rules/, compiled together with the example's protos/ and rules/ into one
plan), one per kind of rule and size of message, plus two calls of the
example (`--list-workloads` prints them):

    static-200B     a rule without conditions, 200-byte request and reply
    match-200B      the answer depends on an `eq` test of a request field, and
                    the request fails six rules before the one that answers
                    (the main workload)
    template-200B   a reply rendered per call from `{{request.name}}`
    nomatch-200B    no rule holds: NOT_FOUND (the engine's --no-match default)
    match-10B       match with a 10-byte request and reply
    match-10KB      match with a 10,000-byte request and reply
    hello, product  helloworld.Greeter/SayHello and shop.v1.Catalog/GetProduct

The tonic baseline (benches/baseline.rs) serves the same methods with the
same bytes, hand-written, the templated reply built per call with format!.

Protocol cells (`--protocols`; `--list-workloads` prints them) make the call
of `hello` over the other protocols the engine serves on the same port, on
the engine alone (tonic speaks gRPC only), against the engine's own gRPC
cell of that call (`grpc`) in the same layout and repeat:

    connect-proto     Connect unary over HTTP/2, application/proto (bare message)
    connect-json      Connect unary over HTTP/2, application/json {"name":"Tom"}
    grpc-web-proto    gRPC-Web over HTTP/2, application/grpc-web+proto
    connect-proto-h1  Connect unary over HTTP/1.1 (h2load --h1, no pipelining)

The proxy cell (`--proxy-layouts`, `--proxy-cell`, default 16x10) makes the
main workload's call to the tonic baseline in two ways, in the same run and
layout, in turn:

    direct            straight to the baseline
    proxied           through an engine started for the cell with no plan
                      (`engine run --protos EMPTY --rules EMPTY --upstream
                      http://127.0.0.1:BASELINE_PORT --upstream-mode always`),
                      which forwards every call to that same baseline

and reports the engine's CPU per proxied call, alone and with the
baseline's, against the baseline's per direct call, and both throughputs.

What a run does, following shared/guides/performance.md:
  1. builds the engine, the compiler, the baseline and the latency client in
     release mode (`cargo build --release ...`, honouring CARGO_TARGET_DIR)
     and compiles the plan with the compiler;
  2. writes each workload's gRPC request body (5-byte prefix + protobuf
     bytes, encoded by hand) and expected reply;
  3. checks correctness with real HTTP/2 clients before timing anything,
     every workload on both servers: `nghttp` (same Debian package as
     h2load) must see :status 200, the expected grpc-status (and
     grpc-message) and exactly the expected reply bytes; grpcio is used as
     well when this interpreter or the project's .venv (made by test.sh) can
     import it;
  4. throughput: runs h2load against each server in turn (engine, baseline,
     engine, baseline, ...) after an untimed warm-up run, in two layouts:
     "pinned" (server on CPU 0 with --workers 1, load generator on CPU 1,
     both via taskset) and "shared" (nothing pinned, --workers 2); the main
     workload at every cell (connections x streams: 1x1, 16x10, 64x100),
     then at 16x10 each other kind of rule and size (`--extra`);
  5. measures server CPU per request: utime+stime from /proc/PID/stat,
     sampled when h2load announces the start and the end of its measurement
     window (so its warm-up is excluded), divided by the succeeded requests;
  6. latency percentiles: h2load 1.52 prints none, and being closed-loop it
     would hide a stalled server in a lower rate. The open-loop client
     `latency` (benches/latency.rs) sends the main workload at a fixed rate
     over the cell's connections and measures each request from its
     scheduled time to its trailers; it checks grpc-status and the reply
     bytes of every response. Per layout and cell it runs against engine and
     baseline alternately at the same rate, a fraction (`--latency-fractions`,
     default 50% and 90%) of the lower of the two servers' h2load
     throughput in that cell, or at `--latency-rate`; pinned like h2load;
  7. protocol cells: before timing, one call of each is checked (HTTP
     status 200, the protocol's content type, the reply bytes or JSON
     object, gRPC-Web's trailer frame with grpc-status 0; nghttp over
     HTTP/2, http.client over HTTP/1.1); then on the engine, after an
     untimed warm-up of each cell, per repeat the gRPC cell of `hello` and
     every protocol cell in turn with h2load (--protocol-cell, default
     16x10; HTTP/1.1 cells at --h1-cell, default 16x1), CPU per call
     sampled as in 5; reported with ratios to the gRPC cell of the same
     repeat;
  8. proxy cell: starts the forwarding engine in front of the layout's
     baseline, pinned like the servers (pinned: core 0, sharing it with the
     baseline, --workers 1; shared: --workers 2), and checks every workload
     through it with nghttp (the expected reply bytes, grpc-status and
     grpc-message: those the baseline answers directly) and grpcio; then,
     after an untimed warm-up of each path, per repeat the direct and the
     proxied path in turn with h2load at --proxy-cell, sampling as in 5 the
     baseline's CPU (direct) or the engine's and the baseline's (proxied)
     over the same window; any failed, errored or timed-out call is an
     error; after the timed runs every workload is checked again through
     the engine, and a latency client burst of the main workload (every
     response checked), then the engine is stopped;
  9. after the timed runs, checks every workload again with nghttp and with
     a short burst of the latency client (every response checked), so a
     server that answered wrongly under load cannot go unnoticed (h2load
     counts any HTTP 200 as a success, whatever grpc-status says), and 500
     calls of each protocol cell, every answer checked as in 7;
 10. prints a markdown report with medians, ranges and engine/baseline
     ratios (protocol cells: ratios to gRPC; proxy cell: proxied/direct)
     and writes it to benches/results/latest.md (raw runs in latest.json,
     the protocol cells' under "protocols", the proxy cell's under "proxy").

--quick (for CI) runs the 16x10 cell only, match-200B and static-200B,
one repeat of 3 s, and one 2-second latency run per server at 50%, in both
layouts; the protocol cells, one repeat of 3 s each without the untimed
warm-up runs, in the first layout only (--protocol-layouts overrides); the
proxy cell, one repeat of 3 s per path without the untimed warm-up runs, in
the first layout only (--proxy-layouts overrides). `--cells none --extra
none --protocols none --no-latency` leaves the proxy cell alone (with the
correctness checks). `--soak SECONDS` starts the engine
alone (--workers 2), drives it with h2load over the four 200-byte rule
kinds for SECONDS, in runs of at most 60 s, samples its resident memory
(VmRSS) every 10 s, and writes benches/results/soak.md (start, after
warm-up, last, max, growth).

Servers listen on 127.0.0.1 only, every h2load and latency run is bounded
by its duration and a subprocess timeout, and every server started here is
stopped at the end, on error too. Nothing is installed by this script: it
fails with a clear message when h2load or nghttp is missing (Debian package
nghttp2-client).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benches" / "results"
BENCH_PLAN = ROOT / "benches" / "plan"
LISTENING = re.compile(r"listening on (\S+):(\d+)\s*$")
ADMIN_LISTENING = re.compile(r"wirestub admin listening on (\S+):(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")

FULL_CELLS = [(1, 1), (16, 10), (64, 100)]
QUICK_CELLS = [(16, 10)]
MAIN_WORKLOAD = "match-200B"
FULL_EXTRA = ["static-200B", "template-200B", "nomatch-200B", "match-10B", "match-10KB"]
QUICK_EXTRA = ["static-200B"]
EXTRA_CELL = (16, 10)
SOAK_WORKLOADS = ["static-200B", "match-200B", "template-200B", "nomatch-200B"]
SOAK_CHUNK_S = 60
SOAK_SAMPLE_S = 10


class BenchError(Exception):
    """A failure that makes the bench meaningless; reported, exit code 1."""


def say(msg: str) -> None:
    print(f"[load] {msg}", flush=True)


# --------------------------------------------------------------------------
# Protobuf and gRPC framing, by hand
# --------------------------------------------------------------------------


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_bytes(field_no: int, data: bytes) -> bytes:
    return varint(field_no << 3 | 2) + varint(len(data)) + data


def pb_string(field_no: int, text: str) -> bytes:
    return pb_bytes(field_no, text.encode())


def pb_varint(field_no: int, value: int) -> bytes:
    return varint(field_no << 3) + varint(value)


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_messages(body: bytes) -> list[bytes]:
    msgs = []
    pos = 0
    while pos < len(body):
        if pos + 5 > len(body):
            raise ValueError("truncated gRPC frame prefix")
        if body[pos] != 0:
            raise ValueError("compressed gRPC frame")
        n = int.from_bytes(body[pos + 1 : pos + 5], "big")
        msgs.append(body[pos + 5 : pos + 5 + n])
        pos += 5 + n
    if pos != len(body):
        raise ValueError("truncated gRPC message")
    return msgs


@dataclass
class Workload:
    title: str
    path: str
    request: bytes
    # The reply message, or None for an error answered trailers-only.
    reply: bytes | None
    status: int = 0
    message: str = ""

    @property
    def expected_body(self) -> bytes:
        return b"" if self.reply is None else grpc_frame(self.reply)


ALPHABET = b"abcdefghijklmnopqrstuvwxyz"


def reply_padding(n: int) -> str:
    """The bench rules' reply filler: the letters a-z repeated, cut to n."""
    return (ALPHABET * (n // len(ALPHABET) + 1))[:n].decode()


def bench_request(name: str, size: int) -> bytes:
    """BenchRequest {name, padding} of exactly `size` bytes (padding: the
    digits 0-9 repeated; no rule reads it)."""
    head = pb_string(1, name)
    for n in range(size, -1, -1):
        if len(head) + 1 + len(varint(n)) + n == size:
            return head + pb_bytes(3, (b"0123456789" * (n // 10 + 1))[:n])
    raise ValueError(f"no padding makes {name!r} {size} bytes")


def bench_reply(message: str, padding: int) -> bytes:
    """BenchReply {padding = 1, message = 2}, in field order."""
    return (pb_string(1, reply_padding(padding)) if padding else b"") + pb_string(2, message)


BENCH = "/bench.v1.Bench/"
NO_MATCH_MESSAGE = "no rule matches this request to bench.v1.Bench/NoMatch"

WORKLOADS = {
    "static-200B": Workload(
        title="StaticRule: a rule without conditions, 200 B request and reply",
        path=BENCH + "StaticRule",
        request=bench_request("medium", 200),
        reply=bench_reply("static", 189),
    ),
    "match-200B": Workload(
        title="FieldMatch: an `eq` rule on `name` behind six failing ones, 200 B request and reply",
        path=BENCH + "FieldMatch",
        request=bench_request("medium", 200),
        reply=bench_reply("matched medium", 181),
    ),
    "template-200B": Workload(
        title="Template: a reply rendered from `{{request.name}}`, 200 B request and reply",
        path=BENCH + "Template",
        request=bench_request("medium", 200),
        reply=bench_reply("Hello medium!", 182),
    ),
    "nomatch-200B": Workload(
        title="NoMatch: no rule holds, NOT_FOUND, 200 B request",
        path=BENCH + "NoMatch",
        request=bench_request("medium", 200),
        reply=None,
        status=5,
        message=NO_MATCH_MESSAGE,
    ),
    "match-10B": Workload(
        title="FieldMatch with a 10 B request and reply",
        path=BENCH + "FieldMatch",
        request=bench_request("small", 10),
        reply=bench_reply("small ok", 0),
    ),
    "match-10KB": Workload(
        title="FieldMatch with a 10,000 B request and reply",
        path=BENCH + "FieldMatch",
        request=bench_request("large", 10_000),
        reply=bench_reply("matched large", 9982),
    ),
    "hello": Workload(
        title='helloworld.Greeter/SayHello {name: "Tom"}: a field-matched rule of the example',
        path="/helloworld.Greeter/SayHello",
        request=pb_string(1, "Tom"),
        reply=pb_string(1, "Hi Tom (from mock)"),
    ),
    "product": Workload(
        title='shop.v1.Catalog/GetProduct {sku: "X"}: the fallback behind a failed match gate',
        path="/shop.v1.Catalog/GetProduct",
        request=pb_string(1, "X"),
        reply=pb_string(1, "UNKNOWN") + pb_string(2, "Mystery box") + pb_varint(3, 2),
    ),
}

for _key, _size in (("static-200B", 200), ("match-200B", 200), ("template-200B", 200), ("match-10B", 10)):
    assert len(WORKLOADS[_key].request) == _size and len(WORKLOADS[_key].reply or b"") == _size, _key
assert len(WORKLOADS["match-10KB"].request) == len(WORKLOADS["match-10KB"].reply or b"") == 10_000


@dataclass
class Files:
    """A workload's request body (as h2load and nghttp send it) and
    expected response body, written once per run."""

    body: Path
    expected: Path


def write_files(work: Path) -> dict[str, Files]:
    out = {}
    for key, wl in WORKLOADS.items():
        f = Files(body=work / f"{key}.body.bin", expected=work / f"{key}.expected.bin")
        f.body.write_bytes(grpc_frame(wl.request))
        f.expected.write_bytes(wl.expected_body)
        out[key] = f
    return out


# --------------------------------------------------------------------------
# Protocols: the same call over gRPC, Connect and gRPC-Web
# --------------------------------------------------------------------------

# The call every protocol cell makes: helloworld.Greeter/SayHello
# {name: "Tom"}, answered "Hi Tom (from mock)" by a field-matched rule.
PROTOCOL_WORKLOAD = "hello"
HELLO_JSON_REQUEST = b'{"name":"Tom"}'
HELLO_JSON_REPLY = {"message": "Hi Tom (from mock)"}


@dataclass
class ProtocolCell:
    """One protocol's way of making the PROTOCOL_WORKLOAD call (engine
    only: the tonic baseline speaks gRPC alone)."""

    title: str
    content_type: str
    # How the request body is built from the workload's protobuf request.
    encoding: str  # "grpc" (5-byte prefix), "raw" (the message) or "json"
    headers: tuple[tuple[str, str], ...] = ()  # besides content-type
    h1: bool = False

    def body(self) -> bytes:
        request = WORKLOADS[PROTOCOL_WORKLOAD].request
        return {"grpc": grpc_frame(request), "raw": request, "json": HELLO_JSON_REQUEST}[self.encoding]

    def header_args(self) -> list[str]:
        """-H arguments for h2load and nghttp."""
        out = ["-H", f"content-type: {self.content_type}"]
        for name, value in self.headers:
            out += ["-H", f"{name}: {value}"]
        return out

    def check_body(self, body: bytes) -> str | None:
        """Why one response body is wrong, or None."""
        reply = WORKLOADS[PROTOCOL_WORKLOAD].reply
        assert reply is not None
        if self.encoding == "raw":
            return None if body == reply else f"expected exactly {reply!r}"
        if self.encoding == "json":
            try:
                got = json.loads(body)
            except ValueError:
                return "not JSON"
            return None if got == HELLO_JSON_REPLY else f"expected JSON {HELLO_JSON_REPLY}"
        # gRPC-Web: the reply message, then the trailer frame (flag 0x80)
        # with grpc-status 0, nothing else.
        frames = []
        pos = 0
        while pos + 5 <= len(body):
            n = int.from_bytes(body[pos + 1 : pos + 5], "big")
            frames.append((body[pos], body[pos + 5 : pos + 5 + n]))
            pos += 5 + n
        if pos != len(body):
            return "truncated gRPC-Web frame"
        if len(frames) != 2 or frames[0] != (0, reply) or frames[1][0] != 0x80:
            return f"expected a message frame {grpc_frame(reply)!r} and one trailer frame"
        trailers = {}
        for line in frames[1][1].decode(errors="replace").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                trailers[name.strip().lower()] = value.strip()
        if trailers.get("grpc-status") != "0":
            return f"trailer frame without grpc-status 0: {frames[1][1]!r}"
        return None

    def check_bodies(self, data: bytes, count: int) -> str | None:
        """Why `count` response bodies, as nghttp printed them one after
        the other, are wrong, or None. Answers on concurrent streams may
        interleave at DATA frames: gRPC-Web's are taken apart into their
        frames (each sent in one DATA frame) and paired again."""
        if self.encoding != "grpc":
            one = data[: len(data) // count]
            if len(data) != len(one) * count or data != one * count:
                return f"the {count} answers differ ({len(data)} bytes in all)"
            return self.check_body(one)
        frames: list[bytes] = []
        pos = 0
        while pos + 5 <= len(data):
            end = pos + 5 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            frames.append(data[pos:end])
            pos = end
        if pos != len(data):
            return "truncated gRPC-Web frame"
        messages = [f for f in frames if f[0] == 0]
        trailers = [f for f in frames if f[0] == 0x80]
        if len(messages) != count or len(trailers) != count or len(frames) != 2 * count:
            return f"expected {count} message and {count} trailer frames, got {len(messages)} and {len(trailers)}"
        for m, t in zip(messages, trailers):
            why = self.check_body(m + t)
            if why:
                return why
        return None


PROTOCOLS = {
    "grpc": ProtocolCell(
        title="gRPC over HTTP/2, the reference (the workload `hello`)",
        content_type="application/grpc",
        encoding="grpc",
        headers=(("te", "trailers"),),
    ),
    "connect-proto": ProtocolCell(
        title="Connect unary over HTTP/2, `application/proto`: the body is the bare message",
        content_type="application/proto",
        encoding="raw",
        headers=(("connect-protocol-version", "1"),),
    ),
    "connect-json": ProtocolCell(
        title='Connect unary over HTTP/2, `application/json`: `{"name":"Tom"}`',
        content_type="application/json",
        encoding="json",
        headers=(("connect-protocol-version", "1"),),
    ),
    "grpc-web-proto": ProtocolCell(
        title="gRPC-Web over HTTP/2, `application/grpc-web+proto`: framed message, trailers in a 0x80 frame",
        content_type="application/grpc-web+proto",
        encoding="grpc",
        headers=(("x-grpc-web", "1"),),
    ),
    "connect-proto-h1": ProtocolCell(
        title="Connect unary over HTTP/1.1 (`h2load --h1`, no pipelining), `application/proto`",
        content_type="application/proto",
        encoding="raw",
        headers=(("connect-protocol-version", "1"),),
        h1=True,
    ),
}
DEFAULT_PROTOCOLS = ["connect-proto", "connect-json", "grpc-web-proto", "connect-proto-h1"]
PROTOCOL_BURST = 500


def write_protocol_files(work: Path) -> dict[str, Path]:
    """Each protocol cell's request body file."""
    out = {}
    for key, cell in PROTOCOLS.items():
        out[key] = work / f"protocol-{key}.body.bin"
        out[key].write_bytes(cell.body())
    return out


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    say("+ " + " ".join(cmd))
    try:
        return subprocess.run(cmd, cwd=ROOT, timeout=timeout, check=True, **kwargs)
    except subprocess.CalledProcessError as e:
        raise BenchError(f"command failed with exit code {e.returncode}: {' '.join(cmd)}") from e
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"command timed out after {timeout:.0f}s: {' '.join(cmd)}") from e


class Server:
    """A server process started here, with the port it printed."""

    def __init__(self, name: str, cmd: list[str], cpus: str | None, log_dir: Path):
        self.name = name
        full = (["taskset", "-c", cpus] if cpus else []) + cmd
        self.log_path = log_dir / f"{name}-{int(time.time() * 1000)}.log"
        say(f"starting {name}: {' '.join(full)}")
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C on the driver reaches the servers only
            # through stop(), which then waits for them properly.
            self.proc = subprocess.Popen(
                full,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        SERVERS.append(self)
        self.admin_port: int | None = None
        self.port = self._wait_for_port(timeout=60)
        say(f"{name} listening on 127.0.0.1:{self.port} (pid {self.proc.pid})")

    def _wait_for_port(self, timeout: float) -> int:
        found: dict[str, int] = {}
        first: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:  # keeps draining so the pipe never fills
                admin = ADMIN_LISTENING.search(line)
                if admin:
                    self.admin_port = int(admin.group(2))
                    continue
                if not ready.is_set():
                    first.append(line)
                    m = LISTENING.search(line)
                    if m:
                        found["port"] = int(m.group(2))
                        ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(timeout)
        if "port" not in found:
            self.stop()
            raise BenchError(
                f"{self.name} printed no `listening on` line within {timeout:.0f}s "
                f"(exit code {self.proc.returncode}); stdout: {''.join(first)!r}; "
                f"stderr tail:\n{self.log_tail()}"
            )
        return found["port"]

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_ticks(self) -> int:
        """utime + stime of the whole process, in clock ticks."""
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        rest = stat[stat.rindex(")") + 2 :].split()
        return int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5)

    def memory_kib(self) -> dict[str, int]:
        out = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        out[key] = int(value.split()[0])
        except OSError:
            pass
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        if self in SERVERS:
            SERVERS.remove(self)


SERVERS: list[Server] = []


def stop_all_servers() -> None:
    for srv in list(SERVERS):
        try:
            srv.stop()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"[load] could not stop {srv.name} (pid {srv.pid}): {e}", file=sys.stderr)


# --------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------

GRPC_HEADERS = ["-H", "content-type: application/grpc", "-H", "te: trailers"]


def check_nghttp(srv: Server, key: str, files: Files) -> None:
    """One call with nghttp: exactly the expected body, :status 200 and the
    expected grpc-status and grpc-message; raises BenchError otherwise."""
    wl = WORKLOADS[key]
    url = f"http://127.0.0.1:{srv.port}{wl.path}"
    where = f"{srv.name}, {key}"
    out = subprocess.run(
        ["nghttp", "-d", str(files.body), *GRPC_HEADERS, url], capture_output=True, timeout=15
    )
    if out.returncode != 0:
        raise BenchError(f"{where}: nghttp failed ({out.returncode}): {out.stderr.decode(errors='replace')}")
    try:
        grpc_messages(out.stdout)
    except ValueError as e:
        raise BenchError(f"{where}: bad gRPC body {out.stdout[:200]!r}: {e}") from e
    if out.stdout != wl.expected_body:
        raise BenchError(
            f"{where}: unexpected reply ({len(out.stdout)} bytes) {out.stdout[:120]!r}..., "
            f"expected ({len(wl.expected_body)} bytes) {wl.expected_body[:120]!r}..."
        )
    out = subprocess.run(
        ["nghttp", "-v", "-n", "-d", str(files.body), *GRPC_HEADERS, url],
        capture_output=True, text=True, errors="replace", timeout=15,
    )  # fmt: skip
    status = re.findall(r"recv \(stream_id=\d+\) :status: (\d+)", out.stdout)
    grpc_status = re.findall(r"recv \(stream_id=\d+\) grpc-status: (\d+)", out.stdout)
    grpc_message = re.findall(r"recv \(stream_id=\d+\) grpc-message: (.*?)\s*$", out.stdout, re.M)
    if status != ["200"] or grpc_status != [str(wl.status)]:
        raise BenchError(
            f"{where}: expected :status 200 and grpc-status {wl.status}, got {status} / {grpc_status}"
        )
    # Percent-decoded: tonic encodes spaces as %20, which gRPC allows but
    # does not require.
    if wl.status != 0 and [urllib.parse.unquote(m) for m in grpc_message] != [wl.message]:
        raise BenchError(f"{where}: expected grpc-message {wl.message!r}, got {grpc_message}")


GRPCIO_CHECK = r"""
import json, sys
import grpc
spec = json.load(sys.stdin)
results = {}
with grpc.insecure_channel(f"127.0.0.1:{spec['port']}", options=[("grpc.enable_http_proxy", 0)]) as ch:
    for key, w in spec["workloads"].items():
        call = ch.unary_unary(w["path"])  # no serializers: raw bytes in and out
        try:
            reply = call(bytes.fromhex(w["request"]), timeout=10)
            results[key] = {"status": 0, "reply": reply.hex(), "message": ""}
        except grpc.RpcError as e:
            results[key] = {"status": e.code().value[0], "reply": None, "message": e.details() or ""}
json.dump(results, sys.stdout)
"""

_GRPCIO_PYTHON: list[str | None] = []


def grpcio_python() -> str | None:
    """An interpreter that can import grpc: this one, or the project's
    .venv (tests/python/run.sh makes it); None if neither can."""
    if not _GRPCIO_PYTHON:
        found = None
        for py in (sys.executable, str(ROOT / ".venv" / "bin" / "python")):
            if not Path(py).exists():
                continue
            try:
                ok = subprocess.run([py, "-c", "import grpc"], capture_output=True, timeout=60).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            if ok:
                found = py
                break
        _GRPCIO_PYTHON.append(found)
    return _GRPCIO_PYTHON[0]


def check_grpcio(srv: Server, keys: list[str]) -> str:
    """Calls every workload once with grpcio; returns a note, raises
    BenchError on a wrong answer."""
    py = grpcio_python()
    if py is None:
        return f"{srv.name}: grpcio not importable (here or in .venv), grpcio check skipped"
    spec = {
        "port": srv.port,
        "workloads": {
            k: {"path": WORKLOADS[k].path, "request": WORKLOADS[k].request.hex()} for k in keys
        },
    }
    try:
        out = subprocess.run(
            [py, "-c", GRPCIO_CHECK], input=json.dumps(spec), capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{srv.name}: the grpcio check timed out") from e
    if out.returncode != 0:
        raise BenchError(f"{srv.name}: the grpcio check failed:\n{out.stderr[-2000:]}")
    results = json.loads(out.stdout)
    for key in keys:
        wl, got = WORKLOADS[key], results[key]
        want_reply = None if wl.reply is None else wl.reply.hex()
        if (got["status"], got["reply"]) != (wl.status, want_reply) or (wl.status and got["message"] != wl.message):
            raise BenchError(
                f"{srv.name}, {key}: grpcio got status {got['status']} {got['message']!r} and reply "
                f"{(got['reply'] or '')[:80]}..., expected status {wl.status} {wl.message!r} and reply "
                f"{(want_reply or '')[:80]}..."
            )
    return f"{srv.name}: grpcio ({py}) got the expected answer for {len(keys)} workloads"


def check_servers(servers: dict[str, Server], keys: list[str], files: dict[str, Files]) -> list[str]:
    """Every workload on every server, nghttp then grpcio."""
    notes = []
    for srv in servers.values():
        for key in keys:
            check_nghttp(srv, key, files[key])
        notes.append(
            f"{srv.name}: nghttp saw :status 200, the expected grpc-status and exactly the expected reply "
            f"bytes for {len(keys)} workloads ({', '.join(keys)})"
        )
        notes.append(check_grpcio(srv, keys))
    return notes


def check_protocol(srv: Server, key: str, body_file: Path, count: int = 1) -> None:
    """`count` calls of a protocol cell, every answer checked: HTTP status
    200, the protocol's content type and the expected reply (exact bytes
    for proto, the same JSON object for JSON, the message and a trailer
    frame with grpc-status 0 for gRPC-Web). HTTP/2 with nghttp (`-m
    count` on one connection), HTTP/1.1 with http.client (one keep-alive
    connection); raises BenchError otherwise."""
    cell = PROTOCOLS[key]
    wl = WORKLOADS[PROTOCOL_WORKLOAD]
    where = f"{srv.name}, {key}"
    if cell.h1:
        headers = {"content-type": cell.content_type, **dict(cell.headers)}
        body = cell.body()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=15)
        try:
            for i in range(count):
                conn.request("POST", wl.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                ctype = (resp.getheader("content-type") or "").split(";")[0].strip().lower()
                why = cell.check_body(data) if (resp.status, ctype) == (200, cell.content_type) else (
                    f"expected HTTP 200 and content-type {cell.content_type}, got {resp.status} and {ctype!r}"
                )  # fmt: skip
                if why:
                    raise BenchError(f"{where}: HTTP/1.1 call {i + 1} of {count}: {why}; got {data[:200]!r}")
        except (OSError, http.client.HTTPException) as e:
            raise BenchError(f"{where}: HTTP/1.1 call failed: {e!r}") from e
        finally:
            conn.close()
        return
    url = f"http://127.0.0.1:{srv.port}{wl.path}"
    # nghttp asks for gzip unless told otherwise; h2load does not ask.
    nargs = ["-d", str(body_file), *cell.header_args(), "-H", "accept-encoding: identity"]
    if count > 1:
        nargs += ["-m", str(count)]
    out = subprocess.run(["nghttp", *nargs, url], capture_output=True, timeout=60)
    if out.returncode != 0:
        raise BenchError(f"{where}: nghttp failed ({out.returncode}): {out.stderr.decode(errors='replace')}")
    why = cell.check_bodies(out.stdout, count)
    if why:
        raise BenchError(f"{where}: unexpected reply: {why}; got {out.stdout[:200]!r}")
    out = subprocess.run(
        ["nghttp", "-v", "-n", *nargs, url], capture_output=True, text=True, errors="replace", timeout=60
    )
    status = re.findall(r"recv \(stream_id=\d+\) :status: (\d+)", out.stdout)
    ctypes = re.findall(r"recv \(stream_id=\d+\) content-type: (.*?)\s*$", out.stdout, re.M)
    ctypes = [c.split(";")[0].strip().lower() for c in ctypes]
    if status != ["200"] * count or ctypes != [cell.content_type] * count:
        raise BenchError(
            f"{where}: expected :status 200 and content-type {cell.content_type} on {count} answers, got "
            f"statuses {sorted(set(status))} ({len(status)}) and content types {sorted(set(ctypes))} ({len(ctypes)})"
        )


def check_protocols(srv: Server, keys: list[str], pfiles: dict[str, Path], count: int = 1) -> str:
    """Every protocol cell but the gRPC reference (checked as the workload
    `hello`), `count` calls each; returns a note."""
    for key in keys:
        if key != "grpc":
            check_protocol(srv, key, pfiles[key], count)
    others = [k for k in keys if k != "grpc"]
    return (
        f"{srv.name}: {count} call(s) of each protocol cell ({', '.join(others)}) got HTTP 200, the protocol's "
        "content type and the expected reply (nghttp over HTTP/2, http.client over HTTP/1.1)"
    )


# --------------------------------------------------------------------------
# h2load
# --------------------------------------------------------------------------


@dataclass
class RunResult:
    layout: str
    workload: str
    cell: str
    server: str
    repeat: int
    rps: float
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    cpu_s: float
    cpu_us_per_req: float | None
    lat_mean_us: float | None
    lat_max_us: float | None
    window_s: float
    # Proxy cell, calls through the engine: the upstream's CPU over the
    # same window (the engine's is cpu_s).
    upstream_cpu_s: float | None = None
    upstream_cpu_us_per_req: float | None = None

    @classmethod
    def from_h2load(cls, layout: str, workload: str, cell: str, server: str, repeat: int, fig: dict) -> RunResult:
        upstream_cpu_s = fig.get("upstream_cpu_s")
        return cls(
            layout=layout, workload=workload, cell=cell, server=server, repeat=repeat,
            rps=fig["rps"], done=fig["done"], succeeded=fig["succeeded"],
            failed=fig["failed"], errored=fig["errored"], timeout=fig["timeout"],
            cpu_s=fig["cpu_s"],
            cpu_us_per_req=fig["cpu_s"] * 1e6 / fig["succeeded"],
            lat_mean_us=fig["lat_mean_us"], lat_max_us=fig["lat_max_us"],
            window_s=fig["window_s"],
            upstream_cpu_s=upstream_cpu_s,
            upstream_cpu_us_per_req=None if upstream_cpu_s is None else upstream_cpu_s * 1e6 / fig["succeeded"],
        )  # fmt: skip


UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * UNITS[m.group(2)]


def h2load(
    srv: Server,
    paths: list[str],
    body_file: Path,
    conns: int,
    streams: int,
    duration: int,
    warmup: int,
    cpus: str | None,
    headers: list[str] | None = None,
    h1: bool = False,
    upstream: Server | None = None,
) -> tuple[dict, str]:
    """One bounded h2load run over `paths` (requests spread over them, all
    with the same body); returns parsed figures and the raw output.
    `headers` are h2load arguments (`-H`, `name: value`, ...), gRPC's by
    default; `h1` speaks HTTP/1.1 (`--h1`; then `streams` > 1 pipelines).
    `upstream`: the server `srv` forwards to, whose CPU over the same
    window is then `upstream_cpu_s` (the server's own is `cpu_s`)."""
    cmd = (["taskset", "-c", cpus] if cpus else []) + [
        "h2load",
        *(["--h1"] if h1 else []),
        *[f"http://127.0.0.1:{srv.port}{path}" for path in paths],
        "-d", str(body_file),
        *(GRPC_HEADERS if headers is None else headers),
        "-c", str(conns),
        "-m", str(streams),
        "-t", "1",
        "-D", str(int(duration)),
        "--warm-up-time", str(int(warmup)),
    ]  # fmt: skip
    limit = duration + warmup + 30
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    killed = threading.Event()

    def watchdog() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(limit, watchdog)
    timer.start()
    watched = [srv] if upstream is None else [srv, upstream]

    def cpu_ticks() -> list[int]:
        return [s.cpu_ticks() for s in watched]

    lines = []
    cpu0 = cpu1 = t0 = t1 = None
    start_ticks = cpu_ticks()
    start_time = time.monotonic()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            # h2load flushes these lines as the events happen: sample the
            # server's CPU exactly over the measurement window.
            if "Main benchmark duration is started" in line and cpu0 is None:
                cpu0, t0 = cpu_ticks(), time.monotonic()
            elif "Main benchmark duration is over" in line and cpu1 is None:
                cpu1, t1 = cpu_ticks(), time.monotonic()
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    if killed.is_set():
        raise BenchError(f"h2load killed after {limit:.0f}s:\n{output[-2000:]}")
    if rc != 0:
        raise BenchError(f"h2load exited with {rc}:\n{output[-2000:]}")
    if cpu0 is None or cpu1 is None:  # older h2load: whole run, warm-up included
        cpu0, t0 = start_ticks, start_time
        cpu1, t1 = cpu_ticks(), time.monotonic()
    fig = parse_h2load(output)
    fig["cpu_s"] = (cpu1[0] - cpu0[0]) / CLK_TCK
    if upstream is not None:
        fig["upstream_cpu_s"] = (cpu1[1] - cpu0[1]) / CLK_TCK
    fig["window_s"] = t1 - t0
    return fig, output


def parse_h2load(output: str) -> dict:
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    r = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        output,
    )
    if not m or not r:
        raise BenchError(f"cannot parse h2load output:\n{output[-2000:]}")
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output)
    fig = {
        "rps": float(m.group(1)),
        "done": int(r.group(3)),
        "succeeded": int(r.group(4)),
        "failed": int(r.group(5)),
        "errored": int(r.group(6)),
        "timeout": int(r.group(7)),
        "lat_mean_us": None,
        "lat_max_us": None,
    }
    if lat:
        try:
            fig["lat_max_us"] = to_us(lat.group(2))
            fig["lat_mean_us"] = to_us(lat.group(3))
        except ValueError:
            pass
    return fig


# --------------------------------------------------------------------------
# Open-loop latency (benches/latency.rs)
# --------------------------------------------------------------------------


@dataclass
class LatencyResult:
    layout: str
    workload: str
    cell: str
    server: str
    repeat: int
    # What the rate was derived from: "50%" of the cell's throughput, or "fixed".
    offered: str
    rate: float
    connections: int
    sent: int
    ok: int
    failed: int
    dropped: int
    achieved: float
    p50_us: float | None
    p90_us: float | None
    p99_us: float | None
    p999_us: float | None
    max_us: float | None
    mean_us: float | None
    send_lag_p99_us: float | None
    errors: dict = field(default_factory=dict)


def latency_client(
    binary: Path,
    srv: Server,
    key: str,
    files: Files,
    conns: int,
    rate: float,
    duration: float,
    warmup: float,
    cpus: str | None,
    grace: float = 5.0,
) -> dict:
    """One bounded run of the open-loop client; returns its JSON report."""
    wl = WORKLOADS[key]
    cmd = (["taskset", "-c", cpus] if cpus else []) + [
        str(binary),
        "--port", str(srv.port),
        "--path", wl.path,
        "--body", str(files.body),
        "--expect-status", str(wl.status),
        "--expect-body", str(files.expected),
        "--rate", f"{rate:.0f}",
        "--connections", str(conns),
        "--duration", f"{duration:g}",
        "--warmup", f"{warmup:g}",
        "--grace", f"{grace:g}",
    ]  # fmt: skip
    limit = warmup + duration + grace + 30
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"latency client killed after {limit:.0f}s: {' '.join(cmd)}") from e
    if out.returncode != 0:
        raise BenchError(f"latency client exited with {out.returncode}: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    try:
        return json.loads(out.stdout)
    except ValueError as e:
        raise BenchError(f"cannot parse the latency client's output {out.stdout[-500:]!r}") from e


def burst_check(binary: Path, srv: Server, key: str, files: Files, cpus: str | None) -> None:
    """A second of calls over 4 connections, every answer checked by the
    latency client (status and bytes); raises BenchError on any failure."""
    rep = latency_client(binary, srv, key, files, conns=4, rate=2000, duration=1, warmup=0, cpus=cpus, grace=5)
    if rep["failed"] or rep["dropped"] or rep["ok"] == 0:
        raise BenchError(
            f"{srv.name}, {key}: burst check: {rep['ok']} ok, {rep['failed']} failed, "
            f"{rep['dropped']} dropped; errors {rep['errors']}"
        )


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def fmt_num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fmt_us(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 1e6:
        return f"{v / 1e6:.2f} s"
    if v >= 1e3:
        return f"{v / 1e3:.2f} ms"
    return f"{v:.0f} µs"


def spread(values: list[float | None], fmt) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(vals))}–{fmt(max(vals))})"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}×" if v >= 0.095 else f"{v:.2g}×"


def build_report(
    meta: dict, runs: list[RunResult], lat: list[LatencyResult], notes: list[str], memory: list[str],
    proto_runs: list[RunResult] | None = None, proxy_runs: list[RunResult] | None = None,
    validation_runs: list[RunResult] | None = None, shared_runs: list[RunResult] | None = None,
) -> str:  # fmt: skip
    lines = [
        "# End-to-end load bench: wirestub engine vs tonic baseline",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['cpus']} CPUs ({meta['cpu_model']}), {meta['kernel']}",
        f"- load generator: {meta['h2load']}, `-t 1`, `-D {meta['duration']:g}` s after "
        f"`--warm-up-time {meta['warmup']:g}` s, one untimed warm-up run per server, workload and cell",
        f"- latency client: benches/latency.rs, open loop, {meta['latency_duration']:g} s after a "
        f"{meta['latency_warmup']:g} s warm-up per run, {meta['latency_repeats']} run(s) per server and rate",
        f"- repeats: {meta['repeats']} per server, workload and cell, alternating engine, baseline, engine, ...",
        "- layouts: **pinned** = server `taskset -c 0` with `--workers 1`, h2load and the latency client "
        "`taskset -c 1`; **shared** = nothing pinned, servers with `--workers 2`",
        f"- engine: `{meta['engine_cmd']}`",
        "",
        "Workloads (sizes of the protobuf messages, without the 5-byte gRPC prefix):",
        "",
    ]
    used = []
    for r in [*runs, *lat, *(proxy_runs or [])]:
        if r.workload not in used:
            used.append(r.workload)
    for key in used:
        wl = WORKLOADS[key]
        lines.append(f"- `{key}`: `{wl.path}`, {wl.title}")
    lines += [
        "",
        "Statistics: every cell shows the median over repeats and (min–max). "
        "*req/s* is h2load's rate over its measurement window. "
        "*CPU/req* is the server's utime+stime (from /proc/PID/stat, sampled when h2load starts "
        "and ends its measurement window) divided by succeeded requests. "
        "*lat mean* and *lat max* are the mean and the maximum of h2load's \"time for request\" "
        "in a run (closed loop: h2load 1.52 prints no percentiles). "
        "Ratios are engine/baseline per repeat pair: above 1 is better for req/s, "
        "below 1 is better for CPU/req and latency.",
    ]
    if runs:
        lines += throughput_report(runs)
    if lat:
        lines += [
            "",
            "## Latency at a fixed offered rate (open loop)",
            "",
            "The latency client sends at a fixed rate over the cell's connections (c); each request "
            "is due at t0 + i/rate, and its latency runs from that scheduled time to its trailers, so "
            "a server that stalls is charged for the requests waiting behind the stall. The rate is a "
            "fraction of the lower of the two servers' median h2load req/s in that layout and cell "
            "(or fixed by `--latency-rate`), the same for both servers. Every response's grpc-status "
            "and bytes are checked: *failed* counts wrong answers, errors and answers missing 5 s "
            "after the last send; *dropped* counts requests not sent because 10,000 were outstanding. "
            "*send lag p99* is how late the client itself started requests: when it is large, the "
            "client was the limit. Percentiles have three significant digits (HdrHistogram).",
            "",
            "| layout | workload | c | offered req/s | server | ok / sent | failed | dropped | achieved req/s "
            "| p50 | p90 | p99 | p99.9 | max | send lag p99 |",
            "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lkeys = []
        for r in lat:
            k = (r.layout, r.workload, r.cell, r.offered)
            if k not in lkeys:
                lkeys.append(k)
        for layout, workload, cell, offered in lkeys:
            sel = [r for r in lat if (r.layout, r.workload, r.cell, r.offered) == (layout, workload, cell, offered)]
            for server in ("engine", "baseline"):
                rs = [r for r in sel if r.server == server]
                if not rs:
                    continue
                flag = " ⚠" if any(r.failed or r.dropped for r in rs) else ""
                lines.append(
                    f"| {layout} | {workload} | {rs[0].connections} | {offered} = {fmt_num(rs[0].rate)} "
                    f"| {server}{flag} | {sum(r.ok for r in rs):,} / {sum(r.sent for r in rs):,} "
                    f"| {sum(r.failed for r in rs):,} | {sum(r.dropped for r in rs):,} "
                    f"| {spread([r.achieved for r in rs], fmt_num)} "
                    f"| {spread([r.p50_us for r in rs], fmt_us)} "
                    f"| {spread([r.p90_us for r in rs], fmt_us)} "
                    f"| {spread([r.p99_us for r in rs], fmt_us)} "
                    f"| {spread([r.p999_us for r in rs], fmt_us)} "
                    f"| {spread([r.max_us for r in rs], fmt_us)} "
                    f"| {spread([r.send_lag_p99_us for r in rs], fmt_us)} |"
                )
        lines += [
            "",
            "| layout | workload | c | offered req/s | p50 engine/baseline | p99 engine/baseline "
            "| p99.9 engine/baseline |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for layout, workload, cell, offered in lkeys:
            sel = [r for r in lat if (r.layout, r.workload, r.cell, r.offered) == (layout, workload, cell, offered)]
            eng = {r.repeat: r for r in sel if r.server == "engine"}
            base = {r.repeat: r for r in sel if r.server == "baseline"}
            pairs = [(eng[i], base[i]) for i in sorted(eng) if i in base]
            cols = []
            for attr in ("p50_us", "p99_us", "p999_us"):
                cols.append(spread([ratio(getattr(e, attr), getattr(b, attr)) for e, b in pairs], fmt_ratio))
            lines.append(
                f"| {layout} | {workload} | {sel[0].connections} | {offered} = {fmt_num(sel[0].rate)} | "
                + " | ".join(cols)
                + " |"
            )
    if proto_runs:
        lines += protocol_report(meta, proto_runs)
    if proxy_runs:
        lines += proxy_report(meta, proxy_runs)
    if validation_runs:
        lines += validation_report(validation_runs)
    if shared_runs:
        lines += shared_report(shared_runs)
    if memory:
        lines += ["", "Memory after the runs of each layout (VmRSS / peak VmHWM):", ""]
        lines += [f"- {m}" for m in memory]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def throughput_report(runs: list[RunResult]) -> list[str]:
    """The h2load section: each server's figures, then engine/baseline
    ratios per repeat pair."""
    lines = [
        "",
        "## Throughput (h2load, closed loop)",
        "",
        "| layout | workload | c×m | server | req/s | CPU µs/req | lat mean | lat max |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    keys = []
    for r in runs:
        k = (r.layout, r.workload, r.cell)
        if k not in keys:
            keys.append(k)
    for layout, workload, cell in keys:
        for server in ("engine", "baseline"):
            rs = [r for r in runs if (r.layout, r.workload, r.cell, r.server) == (layout, workload, cell, server)]
            if not rs:
                continue
            flag = " ⚠" if any(r.failed or r.errored or r.timeout or r.succeeded != r.done for r in rs) else ""
            lines.append(
                f"| {layout} | {workload} | {cell} | {server}{flag} "
                f"| {spread([r.rps for r in rs], fmt_num)} "
                f"| {spread([r.cpu_us_per_req for r in rs], lambda v: fmt_num(v, 2))} "
                f"| {spread([r.lat_mean_us for r in rs], fmt_us)} "
                f"| {spread([r.lat_max_us for r in rs], fmt_us)} |"
            )
    lines += [
        "",
        "| layout | workload | c×m | req/s engine/baseline | CPU/req engine/baseline "
        "| lat mean engine/baseline | lat max engine/baseline |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for layout, workload, cell in keys:
        sel = [r for r in runs if (r.layout, r.workload, r.cell) == (layout, workload, cell)]
        eng = {r.repeat: r for r in sel if r.server == "engine"}
        base = {r.repeat: r for r in sel if r.server == "baseline"}
        pairs = [(eng[i], base[i]) for i in sorted(eng) if i in base]
        cols = []
        for attr in ("rps", "cpu_us_per_req", "lat_mean_us", "lat_max_us"):
            cols.append(spread([ratio(getattr(e, attr), getattr(b, attr)) for e, b in pairs], fmt_ratio))
        lines.append(f"| {layout} | {workload} | {cell} | " + " | ".join(cols) + " |")
    return lines


def protocol_report(meta: dict, proto_runs: list[RunResult]) -> list[str]:
    """The protocols section: each cell's figures, then its ratios to the
    gRPC cell of the same layout and repeat."""
    wl = WORKLOADS[PROTOCOL_WORKLOAD]
    keys = []
    for r in proto_runs:
        if (r.layout, r.workload, r.cell) not in keys:
            keys.append((r.layout, r.workload, r.cell))
    lines = [
        "",
        "## Protocols: one call over gRPC, Connect and gRPC-Web (engine only)",
        "",
        f"The same call, `{wl.path}` {{name: \"Tom\"}} answered \"Hi Tom (from mock)\" by a field-matched rule "
        "of the example, made over each protocol the engine serves on its port; the tonic baseline speaks gRPC "
        "only, so these cells compare the engine with itself: *vs gRPC* is the cell's figure over the gRPC "
        "cell's in the same layout and repeat (every repeat runs each cell in turn"
        + (", after one untimed warm-up run of each" if meta.get("protocol_warmup_runs", True) else
           "; no untimed warm-up runs in --quick, only h2load's `--warm-up-time`")  # fmt: skip
        + "). h2load as above, with the protocol's `content-type` (and `te: trailers` for gRPC, "
        "`connect-protocol-version: 1` for Connect, `x-grpc-web: 1` for gRPC-Web) and its request body; over "
        "HTTP/1.1 (`--h1`) one request at a time per connection, no pipelining, so fewer calls in flight than "
        "in the HTTP/2 cells (see c×m). h2load counts any 2xx as a "
        "success: a Connect error has a 4xx/5xx status and counts as failed, a gRPC or gRPC-Web error does "
        "not, so every cell's answer is checked before and after the timed runs (status, content type, reply "
        f"bytes, grpc-status; {meta.get('protocol_burst', PROTOCOL_BURST)} calls each after).",
        "",
    ]
    lines += [f"- `{key}`: {PROTOCOLS[key].title}" for key in meta.get("protocols", [])]
    lines += [
        "",
        "| layout | protocol | c×m | req/s | CPU µs/req | lat mean | lat max |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for layout, key, cell in keys:
        rs = [r for r in proto_runs if (r.layout, r.workload, r.cell) == (layout, key, cell)]
        flag = " ⚠" if any(r.failed or r.errored or r.timeout or r.succeeded != r.done for r in rs) else ""
        lines.append(
            f"| {layout} | {key}{flag} | {cell} "
            f"| {spread([r.rps for r in rs], fmt_num)} "
            f"| {spread([r.cpu_us_per_req for r in rs], lambda v: fmt_num(v, 2))} "
            f"| {spread([r.lat_mean_us for r in rs], fmt_us)} "
            f"| {spread([r.lat_max_us for r in rs], fmt_us)} |"
        )
    lines += [
        "",
        "| layout | protocol | c×m | CPU/req vs gRPC | req/s vs gRPC |",
        "|---|---|---|---:|---:|",
    ]
    for layout, key, cell in keys:
        if key == "grpc":
            continue
        ref = {r.repeat: r for r in proto_runs if (r.layout, r.workload) == (layout, "grpc")}
        pairs = [(r, ref[r.repeat]) for r in proto_runs
                 if (r.layout, r.workload, r.cell) == (layout, key, cell) and r.repeat in ref]  # fmt: skip
        cpu = spread([ratio(r.cpu_us_per_req, g.cpu_us_per_req) for r, g in pairs], fmt_ratio)
        rps = spread([ratio(r.rps, g.rps) for r, g in pairs], fmt_ratio)
        lines.append(f"| {layout} | {key} | {cell} | {cpu} | {rps} |")
    return lines


def proxy_report(meta: dict, proxy_runs: list[RunResult]) -> list[str]:
    """The proxy section: each path's figures, then proxied/direct ratios
    per layout and repeat."""
    keys = []
    for r in proxy_runs:
        if (r.layout, r.workload, r.cell) not in keys:
            keys.append((r.layout, r.workload, r.cell))
    lines = [
        "",
        "## Proxy: the engine forwarding every call to the tonic baseline",
        "",
        "The main workload's call made straight to the tonic baseline (*direct*) and through an engine with no "
        "plan that forwards every call to that same baseline, byte for byte over one HTTP/2 connection per "
        "worker (*proxied*: `engine run --protos EMPTY --rules EMPTY --upstream http://127.0.0.1:PORT "
        "--upstream-mode always --admin-listen off`), in turn in every repeat"
        + (", after one untimed warm-up run of each" if meta.get("proxy_warmup_runs", True) else
           "; no untimed warm-up runs in --quick, only h2load's `--warm-up-time`")  # fmt: skip
        + ". The engine runs like the servers: pinned, on core 0 with `--workers 1`, sharing that core with the "
        "baseline, h2load on core 1; shared, unpinned with `--workers 2`. CPU per call: *engine* is the "
        "forwarding engine's utime+stime, *baseline* the tonic server's, *total* their sum, each over h2load's "
        "measurement window, divided by the succeeded calls. Ratios are proxied/direct per repeat pair: "
        "*engine ÷ direct* is what forwarding costs the engine for each call the baseline answers, "
        "*total ÷ direct* what the whole chain costs against the baseline alone.",
        "",
        "| layout | workload | c×m | path | req/s | CPU µs/call engine | CPU µs/call baseline "
        "| CPU µs/call total | lat mean | lat max |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layout, workload, cell in keys:
        for path in PROXY_PATHS:
            rs = [r for r in proxy_runs if (r.layout, r.workload, r.cell, r.server) == (layout, workload, cell, path)]
            if not rs:
                continue
            engine, baseline, total = zip(*(proxy_cpu(r) for r in rs))
            lines.append(
                f"| {layout} | {workload} | {cell} | {path} "
                f"| {spread([r.rps for r in rs], fmt_num)} "
                f"| {spread(list(engine), lambda v: fmt_num(v, 2))} "
                f"| {spread(list(baseline), lambda v: fmt_num(v, 2))} "
                f"| {spread(list(total), lambda v: fmt_num(v, 2))} "
                f"| {spread([r.lat_mean_us for r in rs], fmt_us)} "
                f"| {spread([r.lat_max_us for r in rs], fmt_us)} |"
            )
    lines += [
        "",
        "| layout | workload | c×m | CPU/call engine ÷ direct | CPU/call total ÷ direct | req/s proxied/direct "
        "| lat mean proxied/direct |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for layout, workload, cell in keys:
        sel = [r for r in proxy_runs if (r.layout, r.workload, r.cell) == (layout, workload, cell)]
        direct = {r.repeat: r for r in sel if r.server == "direct"}
        pairs = [(r, direct[r.repeat]) for r in sel if r.server == "proxied" and r.repeat in direct]
        engine = spread([ratio(proxy_cpu(p)[0], proxy_cpu(d)[2]) for p, d in pairs], fmt_ratio)
        total = spread([ratio(proxy_cpu(p)[2], proxy_cpu(d)[2]) for p, d in pairs], fmt_ratio)
        rps = spread([ratio(p.rps, d.rps) for p, d in pairs], fmt_ratio)
        lat_mean = spread([ratio(p.lat_mean_us, d.lat_mean_us) for p, d in pairs], fmt_ratio)
        lines.append(f"| {layout} | {workload} | {cell} | {engine} | {total} | {rps} | {lat_mean} |")
    return lines


def shared_report(runs: list[RunResult]) -> list[str]:
    """The shared-state section: a call to a rule limited by `times`,
    counted in Redis by one engine and in memory by the other."""
    intro = (
        f"`{LIMITED_PATH}` (`benches/plan/protos/bench/v1/limited.proto`: the 200 B request of `match-200B`, "
        "answered by one rule limited by `times` with a limit no run reaches, so every call claims a count), to "
        "an engine run with `--shared-state` (a redis-server on loopback, unpinned) and to one counting in its "
        "own memory, in turn in every repeat after one untimed warm-up run of each, both placed like the "
        "servers. *Redis CPU/req* is redis-server's utime+stime over the same window. Ratios are shared/local "
        "per repeat pair: what counting across replicas costs the engine, and the latency it adds."
    )
    times = [r for r in runs if r.server in SHARED_SERVERS]
    journal = [r for r in runs if r.server in JOURNAL_SERVERS]
    lines = pair_report("Shared state: `times` counted in Redis", intro, times, SHARED_SERVERS, "Redis CPU µs/req")
    if journal:
        intro = (
            "`match-200B`, every call recorded with `--journal 100000`: by an engine run with `--shared-state` "
            "that also appends each call to the shared journal (a Redis stream, in background batches from a "
            "thread of its own; the engine's CPU includes that thread) and by one that keeps it only in its own "
            "journal, in turn in every repeat after one untimed warm-up run of each. Ratios are shared/local per "
            "repeat pair: what sharing the journal costs the engine."
        )
        lines += pair_report("Shared state: the journal appended to Redis", intro, journal, JOURNAL_SERVERS,
                             "Redis CPU µs/req")  # fmt: skip
    return lines


def pair_report(
    title: str, intro: str, runs: list[RunResult], servers: tuple[str, str], upstream_column: str | None = None,
) -> list[str]:  # fmt: skip
    """A section comparing two engines run in turn on one cell: each one's
    figures, then the ratios of the first to the second per repeat pair."""
    extra = f" {upstream_column} |" if upstream_column else ""
    lines = ["", f"## {title}", "", intro, "", f"| layout | c×m | engine | req/s | CPU µs/req |{extra} lat mean |"]
    lines.append("|---|---|---|---:|---:|" + ("---:|" if upstream_column else "") + "---:|")
    keys = []
    for r in runs:
        if (r.layout, r.cell) not in keys:
            keys.append((r.layout, r.cell))
    for layout, cell in keys:
        for name in servers:
            rs = [r for r in runs if (r.layout, r.cell, r.server) == (layout, cell, name)]
            up = f" {spread([r.upstream_cpu_us_per_req for r in rs], lambda v: fmt_num(v, 2))} |" if extra else ""
            lines.append(
                f"| {layout} | {cell} | {name} | {spread([r.rps for r in rs], fmt_num)} "
                f"| {spread([r.cpu_us_per_req for r in rs], lambda v: fmt_num(v, 2))} |{up} "
                f"{spread([r.lat_mean_us for r in rs], fmt_us)} |"
            )
    a, b = servers
    lines += ["", f"| layout | c×m | CPU/req {a}/{b} | lat mean {a}/{b} | req/s {a}/{b} |", "|---|---|---:|---:|---:|"]
    for layout, cell in keys:
        sel = [r for r in runs if (r.layout, r.cell) == (layout, cell)]
        second = {r.repeat: r for r in sel if r.server == b}
        pairs = [(r, second[r.repeat]) for r in sel if r.server == a and r.repeat in second]
        cpu = spread([ratio(x.cpu_us_per_req, y.cpu_us_per_req) for x, y in pairs], fmt_ratio)
        lat = spread([ratio(x.lat_mean_us, y.lat_mean_us) for x, y in pairs], fmt_ratio)
        rps = spread([ratio(x.rps, y.rps) for x, y in pairs], fmt_ratio)
        lines.append(f"| {layout} | {cell} | {cpu} | {lat} | {rps} |")
    return lines


def validation_report(val_runs: list[RunResult]) -> list[str]:
    """The validation section: the same call to two engines serving the
    same plan, validation on and off, and the on/off ratios."""
    intro = (
        f"`{VALIDATED_PATH}` (`benches/plan/protos/bench/v1/validated.proto`: the 200 B request of `match-200B` "
        "with protovalidate rules on its three fields: length, pattern, range, byte length), answered by one rule "
        "without conditions, to an engine run with `--validation on` and to one without, in turn in every "
        "repeat after one untimed warm-up run of each, both placed like the servers. Ratios are on/off per "
        "repeat pair: what validating a valid request costs."
    )
    return pair_report("Validation: the cost of checking requests", intro, val_runs, VALIDATION_SERVERS)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def target_dir() -> Path:
    env = os.environ.get("CARGO_TARGET_DIR")
    if env:
        return (ROOT / env).resolve()
    try:
        out = subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return Path(json.loads(out.stdout)["target_directory"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return ROOT / "target"


def machine_meta() -> dict:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        h2 = subprocess.run(["h2load", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        h2 = "h2load"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "h2load": h2 or "h2load",
    }


def parse_cell(text: str) -> tuple[int, int]:
    c, _, m = text.strip().lower().partition("x")
    return int(c), int(m)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="CI: 16x10, match + static 200 B, 1 short repeat (~1.5 min)")
    p.add_argument("--duration", type=int, help="whole seconds measured per h2load run (default 10, quick 3)")
    p.add_argument("--warmup", type=int, help="h2load --warm-up-time seconds (default 2, quick 1)")
    p.add_argument("--repeats", type=int, help="timed runs per server, workload and cell (default 3, quick 1)")
    p.add_argument(
        "--cells", help="comma-separated CxM list for the main workload, e.g. 1x1,16x10,64x100, or `none`"
    )
    p.add_argument("--layouts", default="pinned,shared", help="pinned, shared or both (default both)")
    p.add_argument(
        "--workload", choices=sorted(WORKLOADS), default=MAIN_WORKLOAD, help="main workload (default %(default)s)"
    )
    p.add_argument(
        "--extra",
        help="comma-separated workloads run at --extra-cell besides the main one, or `none` "
        f"(default {','.join(FULL_EXTRA)}; quick {','.join(QUICK_EXTRA)})",
    )
    p.add_argument("--extra-cell", default="16x10", help="CxM cell of the --extra workloads (default 16x10)")
    p.add_argument(
        "--protocols",
        help="comma-separated protocol cells run on the engine against its gRPC cell of the same call "
        f"(`{PROTOCOL_WORKLOAD}`), or `none` (default {','.join(DEFAULT_PROTOCOLS)})",
    )
    p.add_argument("--protocol-cell", default="16x10", help="CxM cell of the HTTP/2 protocol cells (default 16x10)")
    p.add_argument(
        "--h1-cell", default="16x1",
        help="CxM cell of the HTTP/1.1 protocol cells; M > 1 pipelines (default 16x1)",
    )  # fmt: skip
    p.add_argument(
        "--protocol-layouts",
        help="layouts the protocol cells run in (default every layout run; quick: the first one)",
    )
    p.add_argument(
        "--proxy-layouts",
        help="layouts the proxy cell runs in, or `none` (default every layout run; quick: the first one)",
    )
    p.add_argument("--proxy-cell", default="16x10", help="CxM cell of the proxy cell (default 16x10)")
    p.add_argument(
        "--validation-layouts", type=lambda v: [x for x in v.split(",") if x] if v != "none" else [],
        default=None, help="layouts with the validation cell, or `none` (default: the first layout; none in --quick)",
    )  # fmt: skip
    p.add_argument("--validation-cell", default="16x10", help="CxM cell of the validation cell (default 16x10)")
    p.add_argument(
        "--shared-layouts", type=lambda v: [x for x in v.split(",") if x] if v != "none" else [],
        default=None, help="layouts with the shared-state cell, or `none` (default: the first layout; none in --quick; "
        "needs redis-server)",
    )  # fmt: skip
    p.add_argument("--shared-cell", default="16x10", help="CxM cell of the shared-state cell (default 16x10)")
    p.add_argument("--latency-fractions", help="latency runs at these fractions of the lower h2load req/s "
                   "(default 0.5,0.9; quick 0.5)")  # fmt: skip
    p.add_argument("--latency-rate", type=float, help="one fixed latency rate in req/s instead of fractions")
    p.add_argument(
        "--latency-duration", type=float, help="seconds measured per latency run (default --duration, quick 2)"
    )
    p.add_argument("--latency-warmup", type=float, help="latency client warm-up seconds (default 1, quick 0.5)")
    p.add_argument("--latency-repeats", type=int, help="latency runs per server and rate (default --repeats)")
    p.add_argument("--no-latency", action="store_true", help="skip the open-loop latency runs")
    p.add_argument("--soak", type=int, metavar="SECONDS", help="memory growth run of the engine alone instead")
    p.add_argument(
        "--soak-reload-ms", type=int, metavar="MS",
        help="during --soak, swap the plan (POST /admin/reload) every MS milliseconds",
    )  # fmt: skip
    p.add_argument(
        "--soak-stubs-ms", type=int, metavar="MS",
        help="during --soak, every MS milliseconds add a GripMock stub through the runtime API (POST /api/stubs) "
        "and delete the one added before: a swap per change, and new rule origins each time",
    )  # fmt: skip
    p.add_argument(
        "--soak-warmup", type=int, help="seconds of soak before the reference sample (default SECONDS/4, 10-60)"
    )
    p.add_argument("--soak-out", default=str(RESULTS_DIR / "soak.md"), help="soak report path")
    p.add_argument(
        "--engine-arg", action="append", default=[], metavar="ARG",
        help="extra argument for `engine run` (repeatable), e.g. --engine-arg=--seed --engine-arg=1",
    )  # fmt: skip
    p.add_argument("--list-workloads", action="store_true", help="print the workloads and exit")
    p.add_argument(
        "--observe", action="store_true",
        help="the cost of metrics and of the journal (engine alone; benches/results/observe.md)",
    )  # fmt: skip
    p.add_argument("--no-build", action="store_true", help="use the binaries already built")
    p.add_argument("--engine", help="engine binary (default TARGET/release/engine)")
    p.add_argument("--baseline", help="baseline binary (default TARGET/release/baseline)")
    p.add_argument("--compiler", help="compiler binary (default TARGET/release/compiler)")
    p.add_argument("--latency", help="latency client binary (default TARGET/release/latency)")
    p.add_argument("--out", default=str(RESULTS_DIR / "latest.md"), help="markdown report path")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.cells and args.cells.strip().lower() == "none":
        args.cells = []
    elif args.cells:
        args.cells = [parse_cell(x) for x in args.cells.split(",")]
    else:
        args.cells = QUICK_CELLS if args.quick else FULL_CELLS
    args.extra_cell = parse_cell(args.extra_cell)
    if args.extra is None:
        args.extra = QUICK_EXTRA if args.quick else FULL_EXTRA
    elif args.extra.strip().lower() == "none":
        args.extra = []
    else:
        args.extra = [x.strip() for x in args.extra.split(",") if x.strip()]
    for key in args.extra:
        if key not in WORKLOADS:
            p.error(f"unknown workload {key!r} in --extra (known: {', '.join(WORKLOADS)})")
    args.extra = [k for k in args.extra if k != args.workload]
    if args.protocols is None:
        args.protocols = list(DEFAULT_PROTOCOLS)
    elif args.protocols.strip().lower() == "none":
        args.protocols = []
    else:
        args.protocols = [x.strip() for x in args.protocols.split(",") if x.strip() and x.strip() != "grpc"]
    for key in args.protocols:
        if key not in PROTOCOLS:
            p.error(f"unknown protocol cell {key!r} in --protocols (known: {', '.join(DEFAULT_PROTOCOLS)})")
    args.protocol_cell = parse_cell(args.protocol_cell)
    args.h1_cell = parse_cell(args.h1_cell)
    args.proxy_cell = parse_cell(args.proxy_cell)
    args.validation_cell = parse_cell(args.validation_cell)
    args.shared_cell = parse_cell(args.shared_cell)
    if args.latency_fractions is None:
        args.latency_fractions = [0.5] if args.quick else [0.5, 0.9]
    else:
        args.latency_fractions = [float(x) for x in args.latency_fractions.split(",") if x.strip()]
    if args.latency_duration is None:
        args.latency_duration = 2.0 if args.quick else float(args.duration)
    if args.latency_warmup is None:
        args.latency_warmup = 0.5 if args.quick else 1.0
    if args.latency_repeats is None:
        args.latency_repeats = args.repeats
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for layout in args.layouts:
        if layout not in ("pinned", "shared"):
            p.error(f"unknown layout {layout!r}")
    if args.duration <= 0 or args.warmup < 0 or args.repeats < 1:
        p.error("--duration must be positive, --warmup not negative, --repeats at least 1")
    if args.protocol_layouts is not None:
        args.protocol_layouts = [x.strip() for x in args.protocol_layouts.split(",") if x.strip()]
        for layout in args.protocol_layouts:
            if layout not in args.layouts:
                p.error(f"--protocol-layouts: {layout!r} is not in --layouts")
    if args.proxy_layouts is not None:
        given = args.proxy_layouts.strip().lower()
        args.proxy_layouts = [] if given == "none" else [x.strip() for x in given.split(",") if x.strip()]
        for layout in args.proxy_layouts:
            if layout not in args.layouts:
                p.error(f"--proxy-layouts: {layout!r} is not in --layouts")
    cells = [
        *args.cells, args.extra_cell, args.protocol_cell, args.h1_cell, args.proxy_cell, args.validation_cell,
        args.shared_cell,
    ]  # fmt: skip
    if any(c < 1 or m < 1 for c, m in cells):
        p.error("cells need at least 1 connection and 1 stream")
    bad_rate = args.latency_rate is not None and args.latency_rate <= 0
    if not all(0 < f <= 1.5 for f in args.latency_fractions) or bad_rate:
        p.error("--latency-fractions must be in (0, 1.5], --latency-rate positive")
    if args.latency_duration <= 0 or args.latency_warmup < 0 or args.latency_repeats < 1:
        p.error("--latency-duration must be positive, --latency-warmup not negative, --latency-repeats at least 1")
    if args.soak is not None:
        if not 1 <= args.soak <= 7 * 24 * 3600:
            p.error("--soak takes 1 to 604800 seconds")
        if args.soak_warmup is None:
            args.soak_warmup = max(10, min(60, args.soak // 4))
        if not 0 <= args.soak_warmup < args.soak:
            p.error("--soak-warmup must be shorter than the soak")
    return args


@dataclass
class Binaries:
    engine: Path
    baseline: Path
    compiler: Path
    latency: Path


def prepare_binaries(args: argparse.Namespace) -> Binaries:
    release = target_dir() / "release"
    if not args.no_build:
        run(
            ["cargo", "build", "--release", "-p", "wirestub-engine", "-p", "wirestub-compiler",
             "-p", "wirestub-benches"],  # fmt: skip
            timeout=3600,
        )
    bins = Binaries(
        engine=Path(args.engine) if args.engine else release / "engine",
        baseline=Path(args.baseline) if args.baseline else release / "baseline",
        compiler=Path(args.compiler) if args.compiler else release / "compiler",
        latency=Path(args.latency) if args.latency else release / "latency",
    )
    for binary in asdict(bins).values():
        if not Path(binary).exists():
            raise BenchError(f"{binary} does not exist (build it, or drop --no-build)")
    return bins


def compile_plan(bins: Binaries, work: Path) -> Path:
    """The example and the bench service in one plan."""
    plan = work / "plan.bin"
    run(
        [
            str(bins.compiler), "build",
            "--protos", "protos", "--protos", str(BENCH_PLAN / "protos"),
            "--rules", "rules", "--rules", str(BENCH_PLAN / "rules"),
            "-o", str(plan),
        ],
        timeout=300,
    )  # fmt: skip
    if not plan.exists():
        raise BenchError(f"the compiler wrote no plan at {plan}")
    return plan


def require_tools() -> None:
    for tool in ("h2load", "nghttp"):
        if shutil.which(tool) is None:
            raise BenchError(
                f"`{tool}` not found: install the Debian package nghttp2-client "
                "(apt-get install -y nghttp2-client); this script installs nothing"
            )


def engine_cmd(bins: Binaries, plan: Path, workers: str, extra: list[str]) -> list[str]:
    return [str(bins.engine), "run", str(plan), "--listen", "127.0.0.1:0", "--workers", workers, *extra]


def timed_h2load(
    layout: str, key: str, servers: dict[str, Server], files: dict[str, Files],
    conns: int, streams: int, args: argparse.Namespace, loader_cpus: str | None,
    runs: list[RunResult], notes: list[str],
) -> None:  # fmt: skip
    """Warm-up, then the repeats of one workload and cell, alternating servers."""
    cell = f"{conns}×{streams}"
    wl = WORKLOADS[key]
    for name, srv in servers.items():  # untimed warm-up
        say(f"{layout} {key} {cell} warm-up {name}")
        h2load(srv, [wl.path], files[key].body, conns, streams, max(1, args.duration // 3), 0, loader_cpus)
    for rep in range(args.repeats):
        for name, srv in servers.items():
            fig, output = h2load(
                srv, [wl.path], files[key].body, conns, streams, args.duration, args.warmup, loader_cpus
            )
            if not srv.alive():
                raise BenchError(f"{name} died during the run:\n{srv.log_tail()}")
            if fig["succeeded"] == 0:
                raise BenchError(f"{name}: no request succeeded at {key} {cell}:\n{output[-2000:]}")
            res = RunResult.from_h2load(layout, key, cell, name, rep, fig)
            runs.append(res)
            say(
                f"{layout} {key} {cell} #{rep + 1} {name:8}: {res.rps:>10,.0f} req/s, "
                f"{res.cpu_us_per_req:6.2f} µs CPU/req, lat mean {fmt_us(res.lat_mean_us)}, "
                f"max {fmt_us(res.lat_max_us)}, {res.succeeded} ok, "
                f"{res.failed + res.errored + res.timeout} bad"
            )
            if res.failed or res.errored or res.timeout:
                notes.append(
                    f"{layout} {key} {cell} #{rep + 1} {name}: h2load counted {res.failed} failed, "
                    f"{res.errored} errored, {res.timeout} timed-out requests"
                )


def timed_protocols(
    layout: str, srv: Server, pfiles: dict[str, Path], args: argparse.Namespace,
    loader_cpus: str | None, proto_runs: list[RunResult], notes: list[str],
) -> None:  # fmt: skip
    """The protocol cells on the engine: the gRPC reference and each of
    --protocols, the same call, an untimed warm-up each, then per repeat
    every cell in turn (so each repeat has its own gRPC reference).
    --quick skips the untimed warm-up runs (h2load's --warm-up-time stays)."""
    keys = ["grpc", *args.protocols]
    path = WORKLOADS[PROTOCOL_WORKLOAD].path

    def shape(key: str) -> tuple[int, int]:
        return args.h1_cell if PROTOCOLS[key].h1 else args.protocol_cell

    def once(key: str, duration: int, warmup: int) -> tuple[dict, str]:
        conns, streams = shape(key)
        cell = PROTOCOLS[key]
        return h2load(
            srv, [path], pfiles[key], conns, streams, duration, warmup, loader_cpus,
            headers=cell.header_args(), h1=cell.h1,
        )  # fmt: skip

    if not args.quick:  # --quick: h2load's own --warm-up-time only, to stay short
        for key in keys:
            say(f"{layout} protocol {key} warm-up")
            once(key, max(1, args.duration // 3), 0)
    for rep in range(args.repeats):
        ref = None
        for key in keys:
            conns, streams = shape(key)
            cell = f"{conns}×{streams}"
            fig, output = once(key, args.duration, args.warmup)
            if not srv.alive():
                raise BenchError(f"{srv.name} died during the {key} run:\n{srv.log_tail()}")
            if fig["succeeded"] == 0:
                raise BenchError(f"{srv.name}: no request succeeded for protocol {key} at {cell}:\n{output[-2000:]}")
            res = RunResult.from_h2load(layout, key, cell, srv.name, rep, fig)
            proto_runs.append(res)
            if key == "grpc":
                ref = res
            vs = ratio(res.cpu_us_per_req, ref.cpu_us_per_req if ref else None)
            say(
                f"{layout} protocol {key:16} {cell:6} #{rep + 1}: {res.rps:>10,.0f} req/s, "
                f"{res.cpu_us_per_req:6.2f} µs CPU/req ({fmt_ratio(vs)} gRPC), lat mean {fmt_us(res.lat_mean_us)}, "
                f"max {fmt_us(res.lat_max_us)}, {res.succeeded} ok, {res.failed + res.errored + res.timeout} bad"
            )
            if res.failed or res.errored or res.timeout:
                notes.append(
                    f"{layout} protocol {key} {cell} #{rep + 1}: h2load counted {res.failed} failed, "
                    f"{res.errored} errored, {res.timeout} timed-out requests"
                )


PROXY_PATHS = ("direct", "proxied")  # the two sides of the proxy cell, in the order they run


def proxy_cmd(bins: Binaries, upstream: Server, workers: str, empty: Path, extra: list[str]) -> list[str]:
    """The engine as a pure pass-through: no plan (empty protos and rules
    directories), every call forwarded to `upstream`, no admin API."""
    return [
        str(bins.engine), "run",
        "--protos", str(empty), "--rules", str(empty),
        "--upstream", f"http://127.0.0.1:{upstream.port}", "--upstream-mode", "always",
        "--listen", "127.0.0.1:0", "--workers", workers, "--admin-listen", "off",
        *extra,
    ]  # fmt: skip


def timed_proxy(
    layout: str, upstream: Server, bins: Binaries, work: Path, files: dict[str, Files],
    args: argparse.Namespace, workers: str, server_cpus: str | None, loader_cpus: str | None,
    proxy_runs: list[RunResult], notes: list[str],
) -> None:  # fmt: skip
    """The proxy cell: the main workload's call made straight to the tonic
    baseline (`direct`) and through an engine that forwards every call to
    that same baseline (`proxied`), alternating, both servers' CPU sampled
    over each measurement window. The engine starts here, pinned like the
    servers, and every workload is checked through it before and after the
    timed runs; any failed call is an error. --quick skips the untimed
    warm-up runs (h2load's --warm-up-time stays)."""
    key = args.workload
    wl = WORKLOADS[key]
    conns, streams = args.proxy_cell
    cell = f"{conns}×{streams}"
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    proxy = Server("proxy", proxy_cmd(bins, upstream, workers, empty, args.engine_arg), server_cpus, work)
    try:
        # The baseline answered every workload with the expected bytes
        # (check_servers): through the engine they must be the same.
        for k in WORKLOADS:
            check_nghttp(proxy, k, files[k])
        grpcio_note = check_grpcio(proxy, list(WORKLOADS))
        say(grpcio_note)
        targets = {"direct": (upstream, None), "proxied": (proxy, upstream)}

        def once(path: str, duration: int, warmup: int) -> tuple[dict, str]:
            srv, behind = targets[path]
            return h2load(
                srv, [wl.path], files[key].body, conns, streams, duration, warmup, loader_cpus, upstream=behind
            )

        if not args.quick:
            for path in PROXY_PATHS:
                say(f"{layout} proxy {key} {cell} warm-up {path}")
                once(path, max(1, args.duration // 3), 0)
        for rep in range(args.repeats):
            for path in PROXY_PATHS:
                fig, output = once(path, args.duration, args.warmup)
                for srv in (proxy, upstream):
                    if not srv.alive():
                        raise BenchError(f"{srv.name} died during the proxy cell:\n{srv.log_tail()}")
                bad = fig["failed"] + fig["errored"] + fig["timeout"]
                if fig["succeeded"] == 0 or bad:
                    raise BenchError(
                        f"proxy cell, {path}: {fig['succeeded']} calls succeeded, {bad} failed, errored or "
                        f"timed out at {key} {cell}:\n{output[-2000:]}"
                    )
                res = RunResult.from_h2load(layout, key, cell, path, rep, fig)
                proxy_runs.append(res)
                engine_cpu, baseline_cpu, total_cpu = proxy_cpu(res)
                say(
                    f"{layout} proxy {key} {cell} #{rep + 1} {path:8}: {res.rps:>10,.0f} req/s, CPU µs/call "
                    f"engine {fmt_num(engine_cpu, 2)}, baseline {fmt_num(baseline_cpu, 2)}, "
                    f"total {fmt_num(total_cpu, 2)}, lat mean {fmt_us(res.lat_mean_us)}, "
                    f"max {fmt_us(res.lat_max_us)}, {res.succeeded} ok"
                )
        # Still forwarding correctly after the load (h2load counts any
        # HTTP 200 as a success, an UNAVAILABLE from the engine too).
        for k in WORKLOADS:
            check_nghttp(proxy, k, files[k])
        burst_check(bins.latency, proxy, key, files[key], loader_cpus)
    finally:
        proxy.stop()
    for note in (
        f"proxy cell: through the forwarding engine, nghttp saw :status 200, the grpc-status and exactly the "
        f"reply bytes the baseline answers directly for {len(WORKLOADS)} workloads, before and after the timed "
        "runs",
        grpcio_note,
        f"{layout}: proxy cell: no h2load call failed, errored or timed out, and every response of a 2,000-call "
        f"burst of `{key}` through the engine after the timed runs was right (latency client)",
    ):
        if note not in notes:
            notes.append(note)


def proxy_cpu(r: RunResult) -> tuple[float | None, float | None, float | None]:
    """(engine, baseline, total) CPU µs per call of a proxy cell run; no
    engine on the direct path."""
    if r.upstream_cpu_us_per_req is None or r.cpu_us_per_req is None:
        return None, r.cpu_us_per_req, r.cpu_us_per_req
    return r.cpu_us_per_req, r.upstream_cpu_us_per_req, r.cpu_us_per_req + r.upstream_cpu_us_per_req


VALIDATED_PATH = "/bench.v1.Validated/Check"
VALIDATION_SERVERS = ("validation-on", "validation-off")


def timed_validation(
    layout: str, bins: Binaries, plan: Path, work: Path, args: argparse.Namespace, workers: str,
    server_cpus: str | None, loader_cpus: str | None, val_runs: list[RunResult], notes: list[str],
) -> None:  # fmt: skip
    """The validation cell: the same valid request to an engine with
    `--validation on` and to one without, alternating, after checking that
    both answer it and that the validating one refuses an invalid one."""
    conns, streams = args.validation_cell
    cell = f"{conns}×{streams}"
    body = work / "validated.body.bin"
    body.write_bytes(grpc_frame(bench_request("medium", 200)))
    bad = work / "validated-bad.body.bin"
    bad.write_bytes(grpc_frame(bench_request("Medium!", 200)))
    servers = {
        "validation-on": Server(
            "validation-on", engine_cmd(bins, plan, workers, [*args.engine_arg, "--validation", "on"]), server_cpus, work
        ),
        "validation-off": Server("validation-off", engine_cmd(bins, plan, workers, args.engine_arg), server_cpus, work),
    }  # fmt: skip
    try:
        for name, srv in servers.items():
            fig, output = h2load(srv, [VALIDATED_PATH], body, 1, 1, 1, 0, loader_cpus)
            if fig["succeeded"] == 0:
                raise BenchError(f"{name} does not answer {VALIDATED_PATH}:\n{output[-2000:]}")
        probe = run(
            ["nghttp", "-v", "-d", str(bad), "-H", "content-type: application/grpc", "-H", "te: trailers",
             f"http://127.0.0.1:{servers['validation-on'].port}{VALIDATED_PATH}"],
            30, capture_output=True, text=True,
        )  # fmt: skip
        if "grpc-status: 3" not in probe.stdout:
            raise BenchError(f"the validating engine did not refuse an invalid request:\n{probe.stdout[-2000:]}")
        for name, srv in servers.items():
            say(f"{layout} validation {cell} warm-up {name}")
            h2load(srv, [VALIDATED_PATH], body, conns, streams, max(1, args.duration // 3), 0, loader_cpus)
        for rep in range(args.repeats):
            for name, srv in servers.items():
                fig, output = h2load(srv, [VALIDATED_PATH], body, conns, streams, args.duration, args.warmup, loader_cpus)
                if not srv.alive() or fig["succeeded"] == 0:
                    raise BenchError(f"{name} failed the validation cell:\n{output[-2000:]}")
                res = RunResult.from_h2load(layout, "validated-200B", cell, name, rep, fig)
                val_runs.append(res)
                say(
                    f"{layout} validation {cell} #{rep + 1} {name:14}: {res.rps:>10,.0f} req/s, "
                    f"{res.cpu_us_per_req:6.2f} µs CPU/req"
                )
        notes.append(f"{layout}: the validating engine refused a request breaking its rules with INVALID_ARGUMENT")
    finally:
        for srv in servers.values():
            srv.stop()


LIMITED_PATH = "/bench.v1.Limited/Count"
SHARED_SERVERS = ("shared-counts", "local-counts")
JOURNAL_SERVERS = ("shared-journal", "local-journal")


class Redis:
    """A redis-server on a loopback port, for the shared-state cell."""

    def __init__(self, work: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(work)],
            cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.command(b"PING").startswith(b"+PONG"):
                return
            time.sleep(0.05)
        raise BenchError("redis-server did not start")

    def command(self, *words: bytes) -> bytes:
        """One command in RESP; the raw answer (empty on failure)."""
        req = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(req)
                return s.recv(65536)
        except OSError:
            return b""

    def cpu_ticks(self) -> int:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            stat = f.read()
        rest = stat[stat.rindex(")") + 2 :].split()
        return int(rest[11]) + int(rest[12])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def timed_pair(
    layout: str, label: str, workload: str, servers: dict[str, "Server"], path: str, body: Path,
    args: argparse.Namespace, loader_cpus: str | None, redis: "Redis", runs: list[RunResult],
) -> None:  # fmt: skip
    """The timed runs of a shared-state pair: each server in turn, in every
    repeat, with Redis's CPU over the same window."""
    conns, streams = args.shared_cell
    cell = f"{conns}×{streams}"
    for rep in range(args.repeats):
        for name, srv in servers.items():
            fig, output = h2load(
                srv, [path], body, conns, streams, args.duration, args.warmup, loader_cpus, upstream=redis
            )
            if not srv.alive() or fig["succeeded"] == 0 or fig.get("failed") or fig.get("errored"):
                raise BenchError(f"{name} failed the {label} cell:\n{output[-2000:]}")
            res = RunResult.from_h2load(layout, workload, cell, name, rep, fig)
            runs.append(res)
            say(
                f"{layout} {label} {cell} #{rep + 1} {name:14}: {res.rps:>10,.0f} req/s, "
                f"{res.cpu_us_per_req:6.2f} µs CPU/req, Redis {res.upstream_cpu_us_per_req or 0:6.2f} µs/req"
            )


def timed_shared(
    layout: str, bins: Binaries, plan: Path, work: Path, args: argparse.Namespace, workers: str,
    server_cpus: str | None, loader_cpus: str | None, runs: list[RunResult], notes: list[str],
) -> None:  # fmt: skip
    """The shared-state cell: the same call to a rule limited by `times`,
    to an engine counting in Redis and to one counting in memory,
    alternating, after checking that both answer it and that the first one
    counts in Redis."""
    conns, streams = args.shared_cell
    cell = f"{conns}×{streams}"
    body = work / "limited.body.bin"
    body.write_bytes(grpc_frame(bench_request("medium", 200)))
    redis = Redis(work)
    servers: dict[str, Server] = {}
    try:
        shared = [*args.engine_arg, "--shared-state", f"redis://127.0.0.1:{redis.port}"]
        servers["shared-counts"] = Server("shared-counts", engine_cmd(bins, plan, workers, shared), server_cpus, work)
        servers["local-counts"] = Server("local-counts", engine_cmd(bins, plan, workers, args.engine_arg), server_cpus, work)
        for name, srv in servers.items():
            fig, output = h2load(srv, [LIMITED_PATH], body, 1, 1, 1, 0, loader_cpus)
            if fig["succeeded"] == 0:
                raise BenchError(f"{name} does not answer {LIMITED_PATH}:\n{output[-2000:]}")
        if b":times:" not in redis.command(b"KEYS", b"*"):
            raise BenchError("the engine with --shared-state wrote no count to Redis")
        for name, srv in servers.items():
            say(f"{layout} shared {cell} warm-up {name}")
            h2load(srv, [LIMITED_PATH], body, conns, streams, max(1, args.duration // 3), 0, loader_cpus)
        timed_pair(layout, "shared", "limited-200B", servers, LIMITED_PATH, body, args, loader_cpus, redis, runs)
        notes.append(f"{layout}: the engine with --shared-state counted its calls in Redis (keys `PREFIX:times:...`)")
        # The journal: every call of match-200B recorded, by one engine
        # that also appends it to the shared journal, and by one that keeps
        # it only in its own.
        for name in list(servers):
            servers.pop(name).stop()
        match = WORKLOADS["match-200B"]
        mbody = work / "journal.body.bin"
        mbody.write_bytes(grpc_frame(match.request))
        journal = [*args.engine_arg, "--journal", "100000"]
        servers["shared-journal"] = Server(
            "shared-journal", engine_cmd(bins, plan, workers, [*journal, *shared[len(args.engine_arg):]]), server_cpus,
            work,
        )  # fmt: skip
        servers["local-journal"] = Server("local-journal", engine_cmd(bins, plan, workers, journal), server_cpus, work)
        for name, srv in servers.items():
            say(f"{layout} journal {cell} warm-up {name}")
            h2load(srv, [match.path], mbody, conns, streams, max(1, args.duration // 3), 0, loader_cpus)
        if int(redis.command(b"XLEN", b"wirestub:journal").strip(b":\r\n") or 0) == 0:
            raise BenchError("the engine with --shared-state and --journal appended nothing to the shared journal")
        timed_pair(layout, "journal", "journal-match-200B", servers, match.path, mbody, args, loader_cpus, redis, runs)
        notes.append(f"{layout}: the engine with --shared-state and --journal appended its calls to `wirestub:journal`")
    finally:
        for srv in servers.values():
            srv.stop()
        redis.stop()


def timed_latency(
    layout: str, key: str, servers: dict[str, Server], files: dict[str, Files],
    conns: int, streams: int, args: argparse.Namespace, bins: Binaries, loader_cpus: str | None,
    runs: list[RunResult], lat: list[LatencyResult], notes: list[str],
) -> None:  # fmt: skip
    """The latency runs of one cell: each rate, engine and baseline alternately."""
    cell = f"{conns}×{streams}"
    if args.latency_rate is not None:
        rates = [("fixed", args.latency_rate)]
    else:
        medians = []
        for name in servers:
            rps = [r.rps for r in runs if (r.layout, r.workload, r.cell, r.server) == (layout, key, cell, name)]
            if rps:
                medians.append(statistics.median(rps))
        if len(medians) < len(servers):
            notes.append(f"{layout} {key} {cell}: no h2load throughput to derive latency rates from, skipped")
            return
        rates = [(f"{f:.0%}", f * min(medians)) for f in args.latency_fractions]
    for offered, rate in rates:
        for rep in range(args.latency_repeats):
            for name, srv in servers.items():
                rep_json = latency_client(
                    bins.latency, srv, key, files[key], conns, rate,
                    args.latency_duration, args.latency_warmup, loader_cpus,
                )  # fmt: skip
                if not srv.alive():
                    raise BenchError(f"{name} died during the latency run:\n{srv.log_tail()}")
                lu = rep_json.get("latency_us") or {}
                lag = rep_json.get("send_lag_us") or {}
                res = LatencyResult(
                    layout=layout, workload=key, cell=cell, server=name, repeat=rep,
                    offered=offered, rate=rate, connections=conns,
                    sent=rep_json["sent"], ok=rep_json["ok"], failed=rep_json["failed"],
                    dropped=rep_json["dropped"], achieved=rep_json["achieved_rate"],
                    p50_us=lu.get("p50"), p90_us=lu.get("p90"), p99_us=lu.get("p99"),
                    p999_us=lu.get("p999"), max_us=lu.get("max"), mean_us=lu.get("mean"),
                    send_lag_p99_us=lag.get("p99"), errors=rep_json.get("errors") or {},
                )  # fmt: skip
                lat.append(res)
                say(
                    f"{layout} {key} {conns} conns @ {offered} = {rate:,.0f} req/s #{rep + 1} {name:8}: "
                    f"p50 {fmt_us(res.p50_us)}, p99 {fmt_us(res.p99_us)}, p99.9 {fmt_us(res.p999_us)}, "
                    f"max {fmt_us(res.max_us)}, {res.ok} ok, {res.failed} failed, {res.dropped} dropped, "
                    f"send lag p99 {fmt_us(res.send_lag_p99_us)}"
                )
                if res.ok == 0:
                    raise BenchError(f"{name}: no latency request succeeded at {key} {cell}: {res.errors}")
                if res.failed or res.dropped:
                    notes.append(
                        f"{layout} {key} {conns} conns @ {offered} #{rep + 1} {name}: latency client counted "
                        f"{res.failed} failed, {res.dropped} dropped; errors {res.errors}"
                    )


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    require_tools()
    notes: list[str] = []
    layouts = list(args.layouts)
    if "pinned" in layouts and ((os.cpu_count() or 1) < 2 or shutil.which("taskset") is None):
        layouts.remove("pinned")
        notes.append("pinned layout skipped: needs 2 CPUs and taskset")
    if not layouts:
        raise BenchError("no layout left to run")

    bins = prepare_binaries(args)
    work = Path(tempfile.mkdtemp(prefix="wirestub-load-"))
    try:
        plan = compile_plan(bins, work)
        files = write_files(work)
        pfiles = write_protocol_files(work)
        checked = list(WORKLOADS)
        if args.protocol_layouts is not None:
            proto_layouts = [x for x in args.protocol_layouts if x in layouts]
        else:
            proto_layouts = layouts[:1] if args.quick else list(layouts)
        if not args.protocols:
            proto_layouts = []
        if args.proxy_layouts is not None:
            proxy_layouts = [x for x in args.proxy_layouts if x in layouts]
        else:
            proxy_layouts = layouts[:1] if args.quick else list(layouts)
        if args.validation_layouts is not None:
            validation_layouts = [x for x in args.validation_layouts if x in layouts]
        else:
            validation_layouts = [] if args.quick else layouts[:1]
        if args.shared_layouts is not None:
            shared_layouts = [x for x in args.shared_layouts if x in layouts]
        else:
            shared_layouts = [] if args.quick else layouts[:1]
        if shared_layouts and not shutil.which("redis-server"):
            notes.append("shared-state cell skipped: no redis-server on PATH (Debian package redis-server)")
            shared_layouts = []
        for key in [args.workload, *args.extra]:
            say(f"{key}: {WORKLOADS[key].path}, request body {len(grpc_frame(WORKLOADS[key].request))} bytes")

        meta = machine_meta()
        meta.update(
            date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            command=" ".join(["python3", "benches/load.py", *argv]),
            duration=args.duration,
            warmup=args.warmup,
            repeats=args.repeats,
            latency_duration=args.latency_duration,
            latency_warmup=args.latency_warmup,
            latency_repeats=args.latency_repeats,
            engine_cmd=" ".join(["engine", "run", "PLAN", "--workers", "N", *args.engine_arg]),
            workload=args.workload,
            extra=args.extra,
            protocols=["grpc", *args.protocols] if proto_layouts else [],
            protocol_layouts=proto_layouts,
            protocol_cell="x".join(map(str, args.protocol_cell)),
            h1_cell="x".join(map(str, args.h1_cell)),
            protocol_burst=PROTOCOL_BURST,
            protocol_warmup_runs=not args.quick,
            proxy_layouts=proxy_layouts,
            proxy_cell="x".join(map(str, args.proxy_cell)),
            proxy_warmup_runs=not args.quick,
            validation_layouts=validation_layouts,
            validation_cell="x".join(map(str, args.validation_cell)),
            shared_layouts=shared_layouts,
            shared_cell="x".join(map(str, args.shared_cell)),
        )
        runs: list[RunResult] = []
        proto_runs: list[RunResult] = []
        proxy_runs: list[RunResult] = []
        validation_runs: list[RunResult] = []
        shared_runs: list[RunResult] = []
        lat: list[LatencyResult] = []
        memory: list[str] = []
        for layout in layouts:
            pinned = layout == "pinned"
            server_cpus, loader_cpus = ("0", "1") if pinned else (None, None)
            workers = "1" if pinned else "2"
            servers = {
                "engine": Server("engine", engine_cmd(bins, plan, workers, args.engine_arg), server_cpus, work),
                "baseline": Server(
                    "baseline",
                    [str(bins.baseline), "--listen", "127.0.0.1:0", "--workers", workers],
                    server_cpus,
                    work,
                ),
            }
            for note in check_servers(servers, checked, files):
                say(note)
                if note not in notes:
                    notes.append(note)
            with_protocols = layout in proto_layouts
            if with_protocols:
                note = check_protocols(servers["engine"], ["grpc", *args.protocols], pfiles)
                say(note)
                if note not in notes:
                    notes.append(note)
            for conns, streams in args.cells:
                timed_h2load(layout, args.workload, servers, files, conns, streams, args, loader_cpus, runs, notes)
            for key in args.extra:
                conns, streams = args.extra_cell
                timed_h2load(layout, key, servers, files, conns, streams, args, loader_cpus, runs, notes)
            if with_protocols:
                timed_protocols(layout, servers["engine"], pfiles, args, loader_cpus, proto_runs, notes)
            if layout in proxy_layouts:
                timed_proxy(
                    layout, servers["baseline"], bins, work, files, args, workers, server_cpus, loader_cpus,
                    proxy_runs, notes,
                )  # fmt: skip
            if layout in validation_layouts:
                timed_validation(layout, bins, plan, work, args, workers, server_cpus, loader_cpus, validation_runs, notes)
            if layout in shared_layouts:
                timed_shared(layout, bins, plan, work, args, workers, server_cpus, loader_cpus, shared_runs, notes)
            if not args.no_latency:
                for conns, streams in args.cells:
                    timed_latency(
                        layout, args.workload, servers, files, conns, streams, args, bins, loader_cpus,
                        runs, lat, notes,
                    )  # fmt: skip
            # Still answering correctly after the load, every response of a
            # burst checked.
            for name, srv in servers.items():
                for key in checked:
                    check_nghttp(srv, key, files[key])
                for key in [args.workload, *args.extra]:
                    burst_check(bins.latency, srv, key, files[key], loader_cpus)
                if with_protocols and name == "engine":
                    burst_check(bins.latency, srv, PROTOCOL_WORKLOAD, files[PROTOCOL_WORKLOAD], loader_cpus)
                    check_protocols(srv, ["grpc", *args.protocols], pfiles, PROTOCOL_BURST)
                mem = srv.memory_kib()
                if mem:
                    memory.append(
                        f"{layout}, {name}: {mem.get('VmRSS', 0) / 1024:.1f} MiB / {mem.get('VmHWM', 0) / 1024:.1f} MiB"
                    )
                srv.stop()
            notes.append(
                f"{layout}: after the timed runs, both servers still answered every workload correctly "
                "(nghttp), and every response of a 2,000-call burst of each timed workload (latency client)"
            )
            if with_protocols:
                notes.append(
                    f"{layout}: after the timed runs, the engine answered {PROTOCOL_BURST} calls of each protocol "
                    f"cell ({', '.join(args.protocols)}) correctly, and a 2,000-call gRPC burst of "
                    f"`{PROTOCOL_WORKLOAD}` (latency client)"
                )

        report = build_report(meta, runs, lat, notes, memory, proto_runs, proxy_runs, validation_runs, shared_runs)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        out.with_suffix(".json").write_text(
            json.dumps(
                {
                    "meta": meta,
                    "runs": [asdict(r) for r in runs],
                    "latency": [asdict(r) for r in lat],
                    "protocols": [asdict(r) for r in proto_runs],
                    "proxy": [asdict(r) for r in proxy_runs],
                    "validation": [asdict(r) for r in validation_runs],
                    "shared": [asdict(r) for r in shared_runs],
                },
                indent=1,
            )
            + "\n"
        )
        print()
        print(report, flush=True)
        say(f"wrote {out} and {out.with_suffix('.json')} in {time.monotonic() - started:.0f}s")
        return 0
    finally:
        stop_all_servers()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------
# Soak: memory growth of the engine alone
# --------------------------------------------------------------------------


@dataclass
class Sample:
    t_s: float
    rss_kib: int
    hwm_kib: int
    cpu_s: float


def soak(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    require_tools()
    bins = prepare_binaries(args)
    work = Path(tempfile.mkdtemp(prefix="wirestub-soak-"))
    try:
        plan = compile_plan(bins, work)
        files = write_files(work)
        extra = list(args.engine_arg)
        if args.soak_reload_ms or args.soak_stubs_ms:
            extra += ["--admin-listen", "127.0.0.1:0"]
        eng = Server("engine", engine_cmd(bins, plan, "2", extra), None, work)
        for key in WORKLOADS:
            check_nghttp(eng, key, files[key])
        say(f"engine answered every workload correctly; soaking for {args.soak}s")
        reloads = {"ok": 0, "failed": 0}

        samples: list[Sample] = []
        t0 = time.monotonic()
        cpu0 = eng.cpu_ticks()
        stop = threading.Event()

        def sample() -> None:
            mem = eng.memory_kib()
            try:
                cpu = (eng.cpu_ticks() - cpu0) / CLK_TCK
            except OSError:
                cpu = float("nan")
            samples.append(Sample(time.monotonic() - t0, mem.get("VmRSS", 0), mem.get("VmHWM", 0), cpu))

        def sampler() -> None:
            while not stop.wait(SOAK_SAMPLE_S):
                if not eng.alive():
                    return
                sample()
                s = samples[-1]
                say(f"soak t={s.t_s:5.0f}s RSS {s.rss_kib / 1024:.1f} MiB (peak {s.hwm_kib / 1024:.1f} MiB)")

        def reloader() -> None:
            # POST /admin/reload every --soak-reload-ms: the plan swapped
            # under load, over and over.
            deadline = time.monotonic() + 30
            while eng.admin_port is None and time.monotonic() < deadline:
                time.sleep(0.05)
            url = f"http://127.0.0.1:{eng.admin_port}/admin/reload"
            while not stop.wait(args.soak_reload_ms / 1000):
                try:
                    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=30) as r:
                        r.read()
                    reloads["ok"] += 1
                except (OSError, urllib.error.URLError):
                    reloads["failed"] += 1

        stubs = {"ok": 0, "failed": 0}

        def stubber() -> None:
            # Every --soak-stubs-ms: a new stub, then the one before it
            # deleted; each change a compile and a swap, each stub a rule
            # written somewhere new.
            deadline = time.monotonic() + 30
            while eng.admin_port is None and time.monotonic() < deadline:
                time.sleep(0.05)
            base = f"http://127.0.0.1:{eng.admin_port}/api/stubs"
            previous = None
            n = 0
            while not stop.wait(args.soak_stubs_ms / 1000):
                n += 1
                stub = {
                    "service": "helloworld.Greeter",
                    "method": "SayHello",
                    "input": {"equals": {"name": f"soak-{n}"}},
                    "output": {"data": {"message": f"stub {n}"}},
                }
                try:
                    req = urllib.request.Request(base, data=json.dumps(stub).encode(), method="POST")
                    with urllib.request.urlopen(req, timeout=30) as r:
                        [stub_id] = json.loads(r.read())
                    stubs["ok"] += 1
                    if previous:
                        req = urllib.request.Request(f"{base}/{previous}", method="DELETE")
                        with urllib.request.urlopen(req, timeout=30) as r:
                            r.read()
                        stubs["ok"] += 1
                    previous = stub_id
                except (OSError, urllib.error.URLError, ValueError):
                    stubs["failed"] += 1

        sample()
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        reload_thread = threading.Thread(target=reloader, daemon=True)
        if args.soak_reload_ms:
            reload_thread.start()
        stub_thread = threading.Thread(target=stubber, daemon=True)
        if args.soak_stubs_ms:
            stub_thread.start()
        paths = [WORKLOADS[k].path for k in SOAK_WORKLOADS]
        totals = {"done": 0, "succeeded": 0, "bad": 0}
        chunks = 0
        try:
            remaining = args.soak
            while remaining > 0:
                chunk = min(SOAK_CHUNK_S, remaining)
                fig, output = h2load(eng, paths, files["match-200B"].body, 16, 10, chunk, 0, None)
                if not eng.alive():
                    raise BenchError(f"the engine died during the soak:\n{eng.log_tail()}")
                chunks += 1
                totals["done"] += fig["done"]
                totals["succeeded"] += fig["succeeded"]
                totals["bad"] += fig["failed"] + fig["errored"] + fig["timeout"]
                remaining -= chunk
                say(f"soak chunk {chunks}: {fig['rps']:,.0f} req/s, {fig['succeeded']:,} ok, {remaining}s left")
        finally:
            stop.set()
            thread.join(SOAK_SAMPLE_S + 5)
            if reload_thread.is_alive():
                reload_thread.join(35)
            if stub_thread.is_alive():
                stub_thread.join(35)
        if time.monotonic() - t0 - samples[-1].t_s > 2:
            sample()
        for key in WORKLOADS:
            check_nghttp(eng, key, files[key])
        elapsed = samples[-1].t_s
        eng.stop()

        after = next((s for s in samples if s.t_s >= args.soak_warmup), samples[-1])
        last = samples[-1]
        peak = max(samples, key=lambda s: s.rss_kib)
        growth = last.rss_kib - after.rss_kib
        span_s = last.t_s - after.t_s
        # A rate per hour means something only over a long enough span.
        per_hour = f", {growth / 1024 / (span_s / 3600):+.1f} MiB per hour" if span_s >= 300 else ""

        def mib(kib: int) -> str:
            return f"{kib / 1024:.1f} MiB"

        lines = [
            "# Soak: the engine's memory under sustained load",
            "",
            f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- command: `{' '.join(['python3', 'benches/load.py', *argv])}`",
            f"- engine: `{' '.join(['engine', 'run', 'PLAN', '--workers', '2', *args.engine_arg])}`, "
            "the example and the bench service in one plan",
            f"- load: h2load `-c 16 -m 10 -t 1` in {chunks} run(s) of at most {SOAK_CHUNK_S} s, requests spread "
            f"over {', '.join(SOAK_WORKLOADS)} (the same 200 B request)",
            f"- {totals['succeeded']:,} requests succeeded ({totals['succeeded'] / max(elapsed, 1e-9):,.0f} req/s "
            f"over {elapsed:.0f} s), {totals['bad']:,} failed, errored or timed out; the engine answered every "
            "workload correctly (nghttp) before and after",
            f"- engine CPU: {last.cpu_s:.1f} s",
            *(
                [f"- plan reloads (POST /admin/reload every {args.soak_reload_ms} ms): {reloads['ok']:,} swapped, "
                 f"{reloads['failed']:,} failed"]
                if args.soak_reload_ms else []
            ),  # fmt: skip
            *(
                [f"- runtime changes (a stub added and the one before deleted every {args.soak_stubs_ms} ms): "
                 f"{stubs['ok']:,} applied, {stubs['failed']:,} failed"]
                if args.soak_stubs_ms else []
            ),  # fmt: skip
            f"- resident memory (VmRSS), sampled every {SOAK_SAMPLE_S} s:",
            "",
            "| when | t | VmRSS |",
            "|---|---:|---:|",
            f"| start (idle, after the correctness check) | {samples[0].t_s:.0f} s | {mib(samples[0].rss_kib)} |",
            f"| after warm-up ({args.soak_warmup} s) | {after.t_s:.0f} s | {mib(after.rss_kib)} |",
            f"| last | {last.t_s:.0f} s | {mib(last.rss_kib)} |",
            f"| max | {peak.t_s:.0f} s | {mib(peak.rss_kib)} |",
            "",
            f"Growth after warm-up: {growth / 1024:+.2f} MiB ({growth / max(after.rss_kib, 1):+.1%}) over "
            f"{span_s:.0f} s{per_hour}; peak VmHWM {mib(last.hwm_kib)}.",
            "",
            "Samples (t, VmRSS MiB): "
            + ", ".join(f"{s.t_s:.0f} s {s.rss_kib / 1024:.1f}" for s in samples),
        ]
        report = "\n".join(lines) + "\n"
        out = Path(args.soak_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print()
        print(report, flush=True)
        say(f"wrote {out} in {time.monotonic() - started:.0f}s")
        return 0
    finally:
        stop_all_servers()
        shutil.rmtree(work, ignore_errors=True)


# What `--observe` compares: the engine with its observers off, with
# metrics, and with metrics and a journal, everything else equal.
OBSERVE_CONFIGS = [
    ("metrics off, journal off", ["--metrics", "off"]),
    ("metrics on, journal off", ["--metrics", "on"]),
    ("metrics on, journal 10000", ["--metrics", "on", "--journal", "10000"]),
]


def observe(args: argparse.Namespace, argv: list[str]) -> int:
    """The cost of metrics and of the journal: one pinned engine worker per
    configuration, h2load 16x10 on the other core, repeats alternating."""
    require_tools()
    bins = prepare_binaries(args)
    cpus = os.cpu_count() or 1
    server_cpus, loader_cpus = ("0", "1") if cpus >= 2 else (None, None)
    work = Path(tempfile.mkdtemp(prefix="wirestub-observe-"))
    key = "match-200B"
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in OBSERVE_CONFIGS}
    try:
        plan = compile_plan(bins, work)
        files = write_files(work)
        servers = {}
        for name, extra in OBSERVE_CONFIGS:
            cmd = engine_cmd(bins, plan, "1", ["--admin-listen", "off", *extra, *args.engine_arg])
            servers[name] = Server(f"engine ({name})", cmd, server_cpus, work)
            check_nghttp(servers[name], key, files[key])
        wl = WORKLOADS[key]
        for name, srv in servers.items():
            h2load(srv, [wl.path], files[key].body, 16, 10, max(1, args.duration // 3), 0, loader_cpus)
        for rep in range(args.repeats):
            for name, srv in servers.items():
                fig, output = h2load(
                    srv, [wl.path], files[key].body, 16, 10, args.duration, args.warmup, loader_cpus
                )
                if fig["succeeded"] == 0 or fig["failed"] or fig["errored"]:
                    raise BenchError(f"{name}: failed requests:\n{output[-2000:]}")
                cpu_us = fig["cpu_s"] * 1e6 / fig["succeeded"]
                results[name].append((fig["rps"], cpu_us))
                say(f"observe #{rep + 1} {name:28}: {fig['rps']:>10,.0f} req/s, {cpu_us:6.2f} µs CPU/req")
    finally:
        stop_all_servers()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(c for _, c in results[OBSERVE_CONFIGS[0][0]])
    lines = [
        "# Cost of metrics and the journal",
        "",
        f"`python3 benches/load.py {' '.join(argv)}`: one engine worker pinned to core 0, h2load 16×10 on "
        f"core 1, workload `{key}` (field match, 200 B), {args.repeats} × {args.duration} s per configuration, "
        "repeats alternating; medians.",
        "",
        "| configuration | req/s | µs CPU/req | CPU vs all off |",
        "|---|---:|---:|---:|",
    ]
    for name, _ in OBSERVE_CONFIGS:
        rps = statistics.median(r for r, _ in results[name])
        cpu = statistics.median(c for _, c in results[name])
        lines.append(f"| {name} | {rps:,.0f} | {cpu:.2f} | {cpu / base:.3f}× |")
    out = RESULTS_DIR / "observe.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.observe:
        return observe(args, argv)
    if args.list_workloads:
        for key, wl in WORKLOADS.items():
            print(f"{key:15} {wl.path:32} {wl.title}")
        print(f"\nprotocol cells (--protocols), engine only, the call of `{PROTOCOL_WORKLOAD}`:")
        for key, cell in PROTOCOLS.items():
            print(f"{key:16} {cell.content_type:27} {cell.title}")
        return 0
    if args.soak is not None:
        return soak(args, argv)
    return bench(args, argv)


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        stop_all_servers()
        print(f"[load] error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        stop_all_servers()
        sys.exit(130)
