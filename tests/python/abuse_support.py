"""What tests/python/test_abuse.py runs beside its attacks: a well-behaved
client that must be served throughout (`Bystander`), a sampler of the
engine's resident memory with a ceiling (`RssWatch`), and grpcio calls of
every kind with raw-bytes messages of a chosen size on the test-only
`abuse.v1.Abuse` service (abuse_protos/, abuse_rules/).

Nothing here knows the engine's internals: only its port and its pid.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
ABUSE_PROTOS = HERE / "abuse_protos"
ABUSE_RULES = HERE / "abuse_rules"

SAY_HELLO = "/helloworld.Greeter/SayHello"
# HelloRequest { name: "Tom" }, answered "Hi Tom (from mock)".
TOM = b"\x0a\x03Tom"
HI_TOM = "Hi Tom (from mock)"

# abuse.v1.Abuse (abuse_protos/abuse.proto).
FLOOD = "/abuse.v1.Abuse/Flood"
UNARY = "/abuse.v1.Abuse/Unary"
GATHER = "/abuse.v1.Abuse/Gather"
CONVERSE = "/abuse.v1.Abuse/Converse"
ECHO = "/abuse.v1.Abuse/Echo"

MIB = 1 << 20

# Resident memory the engine must stay under during every test, whatever
# the attack (a debug build idles at about 10-20 MiB).
RSS_CEILING_KIB = 150 * 1024
# Past this the sampler kills the engine (SIGKILL) so that a runaway cannot
# take the machine down; the test then fails on the ceiling.
RSS_KILL_KIB = 768 * 1024


# --------------------------------------------------------------------------
# Protobuf by hand (the few messages the tests need)
# --------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def blob(tag: str, size: int | None = None, payload: bytes = b"") -> bytes:
    """abuse.v1.Blob { tag, payload }; with `size`, the payload is chosen so
    that the encoded message is exactly `size` bytes."""
    head = b"\x0a" + varint(len(tag)) + tag.encode()
    if size is None:
        return head + (b"\x12" + varint(len(payload)) + payload if payload else b"")
    n = size - len(head) - 2
    while len(head) + 1 + len(varint(n)) + n > size:
        n -= 1
    assert n >= 0, f"{size} bytes cannot hold tag {tag!r}"
    out = head + b"\x12" + varint(n) + b"p" * n
    if len(out) < size:  # a varint one byte shorter than the room: pad the tag side
        return blob(tag + "_" * (size - len(out)), size)
    assert len(out) == size, (len(out), size)
    return out


def grpc_frame(message: bytes, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message."""
    return bytes([1 if compressed else 0]) + len(message).to_bytes(4, "big") + message


def fields(message: bytes) -> dict[int, list]:
    """Fields of a protobuf message: varints as ints, length-delimited as
    bytes (enough for Tag and HelloReply)."""
    out: dict[int, list] = {}
    i = 0
    while i < len(message):
        key, i = _read_varint(message, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(message, i)
        elif wire == 2:
            n, i = _read_varint(message, i)
            value, i = message[i : i + n], i + n
        else:
            raise AssertionError(f"unexpected wire type {wire} in {message[:40]!r}")
        out.setdefault(number, []).append(value)
    return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return n, i


def tag_of(reply: bytes) -> tuple[str, int]:
    """abuse.v1.Tag { text, count } as (text, count)."""
    f = fields(reply)
    return (f.get(1, [b""])[-1].decode(), f.get(2, [0])[-1])


def hello_text(reply: bytes) -> str:
    """HelloReply { message }."""
    return fields(reply).get(1, [b""])[-1].decode()


# --------------------------------------------------------------------------
# grpcio
# --------------------------------------------------------------------------


def channel(port: int, fresh: bool = True) -> grpc.Channel:
    """An insecure channel without message size limits on our side. `fresh`:
    its own connection (grpcio otherwise shares connections between channels
    with the same target and options)."""
    options = [
        ("grpc.enable_http_proxy", 0),
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
        # No transparent retries: a failure must show.
        ("grpc.enable_retries", 0),
    ]
    if fresh:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


def call_kind(ch: grpc.Channel, kind: str, messages: list[bytes], timeout: float) -> list[bytes]:
    """One call of `kind` (unary, client-stream, bidi, duplex) on the Abuse
    service with raw message bytes; the replies (raises grpc.RpcError)."""
    if kind == "unary":
        (m,) = messages
        return [ch.unary_unary(UNARY)(m, timeout=timeout)]
    if kind == "client-stream":
        return [ch.stream_unary(GATHER)(iter(messages), timeout=timeout)]
    path = {"bidi": CONVERSE, "duplex": ECHO}[kind]
    return list(ch.stream_stream(path)(iter(messages), timeout=timeout))


# --------------------------------------------------------------------------
# The bystander
# --------------------------------------------------------------------------


@dataclass
class Bystander:
    """A well-behaved client in a thread: grpcio SayHello(Tom) with a
    `deadline`, one call after another (`pause` between), each on a new
    connection (so that every worker and the acceptor are exercised), from
    start() to stop(). Every call that fails, answers wrongly or takes
    longer than its deadline is a problem, reported with its time since
    start()."""

    port: int
    deadline: float = 2.0
    pause: float = 0.1
    calls: int = 0
    problems: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def start(self) -> "Bystander":
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            at = start - self._t0
            try:
                with channel(self.port) as ch:
                    reply = ch.unary_unary(SAY_HELLO)(TOM, timeout=self.deadline)
                took = time.monotonic() - start
                if hello_text(reply) != HI_TOM:
                    self.problems.append(f"at {at:.2f}s: wrong reply {reply!r}")
                elif took > self.deadline:
                    self.problems.append(f"at {at:.2f}s: took {took:.2f}s")
            except grpc.RpcError as e:
                took = time.monotonic() - start
                self.problems.append(f"at {at:.2f}s: {e.code().name} after {took:.2f}s: {e.details()}")
            except Exception as e:  # noqa: BLE001 (a bystander must not die silently)
                took = time.monotonic() - start
                self.problems.append(f"at {at:.2f}s: {type(e).__name__}: {e}")
            self.calls += 1
            self.slowest = max(self.slowest, took)
            self._stop.wait(self.pause)

    def stop(self) -> "Bystander":
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.deadline + 5.0)
            self._thread = None
        return self

    def report(self) -> str:
        shown = self.problems[:8] + ([f"... {len(self.problems) - 8} more"] if len(self.problems) > 8 else [])
        return (
            f"bystander: {self.calls} calls, {len(self.problems)} failed "
            f"(deadline {self.deadline}s, slowest {self.slowest:.2f}s)" + "".join(f"\n  {p}" for p in shown)
        )

    def check(self, min_calls: int = 0) -> None:
        """Asserts every call so far was served in time (and that at least
        `min_calls` were made)."""
        assert not self.problems, self.report()
        assert self.calls >= min_calls, self.report()


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def rss_kib_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None  # gone (or a zombie: no VmRSS)


class RssWatch:
    """Samples the engine's VmRSS every `period` seconds in a thread and keeps
    the peak; kills the engine past RSS_KILL_KIB (a runaway would otherwise
    eat the machine's memory within seconds)."""

    def __init__(self, pid: int, period: float = 0.02):
        self.pid = pid
        self.period = period
        self.peak = 0
        self.peak_at = 0.0
        self.killed = False
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_kib_of(self.pid)
            if rss is None:
                return
            if rss > self.peak:
                self.peak, self.peak_at = rss, time.monotonic() - self._t0
            if rss > RSS_KILL_KIB and not self.killed:
                self.killed = True
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                return
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def report(self) -> str:
        text = f"engine peak RSS {self.peak / 1024:.1f} MiB at {self.peak_at:.2f}s"
        if self.killed:
            text += f" (killed by the test past {RSS_KILL_KIB // 1024} MiB)"
        return text

    def check(self, ceiling_kib: int = RSS_CEILING_KIB) -> None:
        assert not self.killed and self.peak < ceiling_kib, (
            f"{self.report()}; ceiling {ceiling_kib / 1024:.0f} MiB"
        )


def ending_problems(e, crashed, code) -> list[str]:
    """What went wrong with an engine a test has stopped (`e` has `rss`,
    `reported`, `log()` and `log_path`; `crashed` is its exit status before
    the stop, if it had exited; `code` the status of the stop): over the
    memory ceiling, exited early, a bad exit on SIGINT, or a panic (a
    panicking worker thread would not change the exit code)."""
    problems = []
    if e.rss.killed or e.rss.peak >= RSS_CEILING_KIB:
        if not e.reported:
            problems.append(f"{e.rss.report()}, over the ceiling")
    elif crashed is not None:
        problems.append(f"engine exited during the test ({crashed}):\n{e.log()}")
    elif code != 0:
        problems.append(f"engine exited with {code} on SIGINT:\n{e.log()}")
    if "panicked" in e.log_path.read_text(errors="replace"):
        problems.append(f"the engine panicked:\n{e.log()}")
    return problems
