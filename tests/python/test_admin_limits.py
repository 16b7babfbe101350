"""What the admin API and the journal hold, and that clients cannot starve
the probes, against the real engine process (see test_admin.py for how it
is started).

- Idle and slow admin connections: more idle connections than the admin
  server's limit (256), or as many dribbling a request head, must not keep
  `/healthz`, `/readyz` and `/metrics` from answering at once; a connection
  that sends nothing, or a head byte by byte, is closed by the head
  deadline (`--admin-head-timeout-ms`).
- The journal's memory: client streams of 100 messages of 200 KB recorded
  with a small budget (`--journal-bytes`, `--journal-messages`,
  `--journal-message-bytes`) leave the engine's resident memory
  (/proc/PID/status) under a stated ceiling, the journal JSON marks the cut
  and left-out messages, `/metrics` shows the bytes held, and a second
  client's unary calls are served meanwhile.
- Journal queries: listings are pages (`limit`, `before`, `"page"`), and
  eight concurrent listings of a full journal raise the peak resident
  memory (VmHWM) by a bounded amount.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from test_admin import TOKEN, eventually, start_engine, stop_engine, stubs  # noqa: F401 (fixture)

MAX_CONNECTIONS = 256
MIB = 1024 * 1024
UPLOAD = "/chat.v1.Chat/Upload"


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status value in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def http_get(port: int, path: str, token: str | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def open_sockets(port: int, n: int, send: bytes = b"") -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if send:
            s.sendall(send)
        out.append(s)
    return out


def closed_within(s: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Whether the server closes `s` within `timeout`; what it sent."""
    s.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except (socket.timeout, TimeoutError):
        return False, got
    except ConnectionResetError:
        return True, got


def probes_answer_quickly(eng, limit: float = 2.0) -> None:
    for path, token in (("/healthz", None), ("/readyz", None), ("/metrics", TOKEN)):
        start = time.monotonic()
        status, body = http_get(eng.admin_port, path, token=token, timeout=limit)
        took = time.monotonic() - start
        assert status == 200, (path, status, body[:200])
        assert took < limit, f"{path} took {took:.2f}s"


@pytest.fixture
def admin_engine(tmp_path):
    eng = start_engine(tmp_path, "--admin-head-timeout-ms", "1500", token=TOKEN)
    yield eng
    stop_engine(eng)


# --------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------


def test_idle_connections_do_not_lock_out_the_probes(admin_engine):
    idle = open_sockets(admin_engine.admin_port, MAX_CONNECTIONS + 44)
    try:
        time.sleep(0.2)
        probes_answer_quickly(admin_engine)
        # Still so with the connections of a second wave, and for a route
        # that is not a probe.
        idle += open_sockets(admin_engine.admin_port, MAX_CONNECTIONS)
        probes_answer_quickly(admin_engine)
        status, body = http_get(admin_engine.admin_port, "/admin/status", token=TOKEN)
        assert status == 200, body
    finally:
        for s in idle:
            s.close()
    assert admin_engine.alive()


def test_slow_heads_do_not_lock_out_the_probes(admin_engine):
    # Connections that each sent part of a head and then nothing more.
    slow = open_sockets(admin_engine.admin_port, MAX_CONNECTIONS + 20, send=b"GET /admin/status HTTP/1.1\r\nHo")
    try:
        time.sleep(0.2)
        probes_answer_quickly(admin_engine)
    finally:
        for s in slow:
            s.close()


def test_the_head_deadline_closes_silent_and_dribbling_connections(admin_engine):
    port = admin_engine.admin_port
    # Nothing sent: closed once the head timeout (1.5 s) has passed.
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    start = time.monotonic()
    closed, got = closed_within(silent, 5.0)
    took = time.monotonic() - start
    silent.close()
    assert closed and got == b"", got
    assert 1.0 < took < 3.5, f"closed after {took:.2f}s"

    # A slowloris: one byte of the head every 100 ms, never finishing.
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    start = time.monotonic()
    cut = None
    for b in head:
        try:
            slow.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            cut = time.monotonic() - start
            break
        time.sleep(0.1)
        if time.monotonic() - start > 6:
            break
    if cut is None:
        closed, got = closed_within(slow, 1.0)
        cut = time.monotonic() - start
        assert closed, "the dribbling connection is still open"
        assert got.startswith(b"HTTP/1.1 408"), got
    slow.close()
    assert cut < 4.0, f"cut after {cut:.2f}s"

    # A well-behaved keep-alive client is not affected: two requests, a
    # pause longer than the head timeout in between.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b'{"status":"ok"}\n'
    time.sleep(2.0)
    conn.request("GET", "/readyz")
    assert conn.getresponse().status == 200
    conn.close()


# --------------------------------------------------------------------------
# The journal's memory
# --------------------------------------------------------------------------


def upload(stubs, channel, n: int, size: int):
    chat = stubs["chat"]
    text = "x" * size
    items = (chat.ChatMessage(user="bob", text=text, seq=i) for i in range(n))
    return stubs["chat_grpc"].ChatStub(channel).Upload(items, timeout=60)


def grpc_channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.enable_http_proxy", 0),
            ("grpc.max_send_message_length", 8 * MIB),
            ("grpc.max_receive_message_length", 8 * MIB),
        ],
    )


def test_client_streams_are_journaled_within_the_budget(tmp_path, stubs):  # noqa: F811
    eng = start_engine(
        tmp_path,
        "--journal", "1000",
        "--journal-bytes", str(4 * MIB),
        "--journal-messages", "4",
        "--journal-message-bytes", "4096",
        token=TOKEN,
    )  # fmt: skip
    channel = grpc_channel(eng.port)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        hello = stubs["hello"]
        greeter = stubs["hello_grpc"].GreeterStub(channel)
        assert greeter.SayHello(hello.HelloRequest(name="Tom"), timeout=10).message == "Hi Tom (from mock)"
        before = proc_status(eng.proc.pid, "VmRSS")

        # A second client, on its own connection, keeps calling meanwhile.
        served, failures, done = [0], [], threading.Event()

        def second_client():
            ch = grpc_channel(eng.port)
            stub = stubs["hello_grpc"].GreeterStub(ch)
            try:
                while not done.is_set():
                    try:
                        assert stub.SayHello(hello.HelloRequest(name="Tom"), timeout=10).message
                        served[0] += 1
                    except Exception as e:  # noqa: BLE001
                        failures.append(repr(e))
                    time.sleep(0.02)
            finally:
                ch.close()

        other = threading.Thread(target=second_client)
        other.start()
        try:
            # 8 streams of 100 messages of 200 KB: 160 MB sent, which the
            # journal used to keep whole.
            for _ in range(8):
                assert upload(stubs, channel, 100, 200_000).note == "uploaded"
        finally:
            done.set()
            other.join(30)
        assert not failures, failures[:3]
        assert served[0] > 0, "the second client was not served"

        after = proc_status(eng.proc.pid, "VmRSS")
        growth_mib = (after - before) / 1024
        print(f"RSS {before} -> {after} KiB ({growth_mib:+.1f} MiB); second client: {served[0]} calls")
        # Ceiling: the journal's 4 MiB, connection buffers (a few MiB) and
        # allocator slack; keeping the streams whole would add 160 MB.
        assert growth_mib < 48, f"RSS grew by {growth_mib:.1f} MiB ({before} -> {after} KiB)"

        listing = eventually(
            lambda: (lambda b: b if len(b["entries"]) == 8 else None)(
                eng.get("/admin/journal", method="chat.v1.Chat/Upload")
            ),
            "eight uploads in the journal",
        )
        for e in listing["entries"]:
            assert e["message_count"] == 100, e["message_count"]
            assert e["truncated"] is True
            assert e["omitted_messages"] == {"count": 95, "first_index": 4, "last_index": 98}
            messages = e["messages"]
            assert len(messages) == 5
            size = len(stubs["chat"].ChatMessage(user="bob", text="x" * 200_000, seq=1).SerializeToString())
            for i, m in zip([0, 1, 2, 3, 99], messages):
                assert m["user"] == "bob" and "text" not in m, m.keys()
                assert m["@truncated"]["kept_bytes"] == 4096
                assert abs(m["@truncated"]["size"] - size) <= 2, m["@truncated"]
            # Partial matching on what was kept.
        assert eng.get("/admin/journal/count", body=json.dumps({"user": "bob"})) == {"count": 8}

        status = eng.get("/admin/status")["journal"]
        assert status["limits"] == {"bytes": 4 * MIB, "messages": 4, "message_bytes": 4096}
        assert 8 * 5 * 4096 < status["bytes"] <= 4 * MIB, status
        _, _, metrics = eng.admin("GET", "/metrics")
        lines = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines() if ln and not ln.startswith("#")}
        assert lines["wirestub_journal_bytes"] == status["bytes"]
        assert lines["wirestub_journal_entries"] == status["size"]
        assert lines["wirestub_journal_bytes_limit"] == 4 * MIB
        assert "wirestub_buffered_request_bytes" in lines
    finally:
        channel.close()
        stop_engine(eng)


def test_the_journal_drops_the_oldest_calls_beyond_its_bytes(tmp_path, stubs):  # noqa: F811
    eng = start_engine(tmp_path, "--journal", "100000", "--journal-bytes", str(MIB), token=TOKEN)
    channel = grpc_channel(eng.port)
    try:
        for _ in range(40):
            upload(stubs, channel, 20, 100_000)
        status = eventually(
            lambda: (lambda s: s if s["recorded"] == 40 else None)(eng.get("/admin/status")["journal"]),
            "forty calls recorded",
        )
        # Each call keeps 16 + 1 messages of 64 KiB: about 1.1 MiB, so the
        # newest one alone is over the budget and is all that is kept.
        assert status["size"] == 1 and status["evicted"] == 39, status
        assert eng.get("/admin/journal")["entries"][0]["seq"] == 40
    finally:
        channel.close()
        stop_engine(eng)


# --------------------------------------------------------------------------
# Journal queries
# --------------------------------------------------------------------------


def test_journal_listings_are_pages(tmp_path, stubs):  # noqa: F811
    eng = start_engine(tmp_path, "--journal", "1000", token=TOKEN)
    channel = grpc_channel(eng.port)
    try:
        greeter = stubs["hello_grpc"].GreeterStub(channel)
        for i in range(250):
            greeter.SayHello(stubs["hello"].HelloRequest(name=f"n{i}"), timeout=10)
        eventually(lambda: eng.get("/admin/journal/count") == {"count": 250}, "250 calls")

        first = eng.get("/admin/journal")
        assert len(first["entries"]) == 100 and first["matched"] == 250
        assert first["page"] == {"limit": 100, "more": True, "before": first["entries"][0]["seq"]}
        names = []
        page = first
        while True:
            names = [e["request"]["name"] for e in page["entries"]] + names
            if not page["page"]["more"]:
                break
            page = eng.get("/admin/journal", before=str(page["page"]["before"]))
        assert names == [f"n{i}" for i in range(250)]
        assert eng.get("/admin/journal", limit="5000")["page"]["limit"] == 1000
    finally:
        channel.close()
        stop_engine(eng)


def test_concurrent_journal_queries_stay_bounded(tmp_path, stubs):  # noqa: F811
    eng = start_engine(tmp_path, "--journal", "10000", "--journal-bytes", str(32 * MIB), token=TOKEN)
    channel = grpc_channel(eng.port)
    try:
        # About 30 MiB of journal: calls keeping 17 whole messages of 60 KB
        # (so their JSON is as large as can be).
        for _ in range(30):
            upload(stubs, channel, 20, 60_000)
        status = eventually(
            lambda: (lambda s: s if s["recorded"] == 30 else None)(eng.get("/admin/status")["journal"]),
            "30 calls recorded",
        )
        assert status["bytes"] > 24 * MIB, status
        peak_before = proc_status(eng.proc.pid, "VmHWM")
        rss_before = proc_status(eng.proc.pid, "VmRSS")

        results, errors = [], []

        def query():
            try:
                c = http.client.HTTPConnection("127.0.0.1", eng.admin_port, timeout=120)
                c.request("GET", "/admin/journal?limit=1000", headers={"Authorization": f"Bearer {TOKEN}"})
                r = c.getresponse()
                body = r.read()
                c.close()
                results.append((r.status, len(body), json.loads(body)["page"]))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=query) for _ in range(8)]
        for t in threads:
            t.start()
        # The probes answer while the queries run.
        probes_answer_quickly(eng, limit=3.0)
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert all(status == 200 for status, _, _ in results) and len(results) == 8
        for _, size, page in results:
            assert size <= 5 * MIB and page["more"] is True, (size, page)
        peak_after = proc_status(eng.proc.pid, "VmHWM")
        growth_mib = (peak_after - max(peak_before, rss_before)) / 1024
        print(f"journal {status['bytes']} bytes; VmHWM {peak_before} -> {peak_after} KiB ({growth_mib:+.1f} MiB)")
        # Two queries at a time, each holding about a 4 MiB page twice over
        # and the JSON of an entry or two, plus what the allocator keeps
        # for the threads that rendered them (measured: +25 MiB for one
        # query, +55 to +65 MiB for eight at once). Rendering the whole
        # journal (30 MiB) once or more per query would need hundreds.
        assert growth_mib < 96, f"peak RSS grew by {growth_mib:.1f} MiB ({peak_before} -> {peak_after} KiB)"
    finally:
        channel.close()
        stop_engine(eng)
