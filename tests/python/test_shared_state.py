"""Replicas sharing runtime changes through Redis (`engine run
--shared-state redis://...`), against a real redis-server on loopback.

Three engines, each with its own copy of the bundled example's rules (as
pods each have theirs), share one Redis:
- a rule file added through one replica's runtime API answers on all three
  within a second, and its deletion reaches all three;
- a replica started after the change serves it from its first call (it
  catches up before it listens);
- with Redis stopped, every replica keeps serving (no call fails), a change
  made on one applies there at once, and once Redis is back (restarted
  empty) every replica converges on it;
- `/admin/status` shows the shared state: up, the URL, what was applied.

Needs redis-server (Debian package `redis-server`): skipped without it,
except under CI (CI set), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import engine_process
import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS = os.environ.get("WIRESTUB_REDIS_SERVER", shutil.which("redis-server") or "/usr/bin/redis-server")

SHARED_RULE = """service: helloworld.Greeter
method: SayHello
responses:
  - when:
      request.name: "shared"
    body:
      message: "{text}"
    priority: 99
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, tmp: Path):
        if not os.path.exists(REDIS):
            hint = "install it with `apt-get install -y redis-server` or set WIRESTUB_REDIS_SERVER"
            if os.environ.get("CI"):
                pytest.fail(f"redis-server not found (CI is set, so this fails): {hint}")
            pytest.skip(f"redis-server not found: {hint}")
        self.port = free_port()
        self.tmp = tmp
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.tmp / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"redis-server did not start on {self.port}:\n{(self.tmp / 'redis.log').read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Replica:
    def __init__(self, tmp: Path, name: str, redis: Redis):
        home = tmp / name
        shutil.copytree(REPO_ROOT / "rules", home / "rules")
        self.proc, self.port, self.admin, self.log = engine_process.start_with_admin(
            ["run", "--protos", str(REPO_ROOT / "protos"), "--rules", "rules", "--listen", "127.0.0.1:0",
             "--admin-listen", "127.0.0.1:0", "--shared-state", redis.url],
            home,
            cwd=home,
        )
        self.home = home
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.say_hello = self.channel.unary_unary("/helloworld.Greeter/SayHello")

    def hello(self, name: str) -> str:
        data = name.encode()
        reply = self.say_hello(b"\x0a" + bytes([len(data)]) + data, timeout=10)
        assert reply[:1] == b"\x0a", reply
        return reply[2 : 2 + reply[1]].decode()

    def admin_call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def stop(self) -> None:
        self.channel.close()
        engine_process.stop_cleanly(engine_process.EngineProcess(self.proc, self.port, self.log))


@pytest.fixture
def cluster(tmp_path):
    redis = Redis(tmp_path)
    replicas = [Replica(tmp_path, f"r{i}", redis) for i in range(3)]
    yield redis, replicas, tmp_path
    for r in replicas:
        r.stop()
    redis.stop()


def wait_for(check, timeout: float, poll: float = 0.02):
    """Polls `check` until it is true; returns the seconds it took, or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(poll)
    return None


def test_a_rule_added_on_one_replica_answers_on_all(cluster):
    redis, (a, b, c), _ = cluster
    assert [r.hello("shared") for r in (a, b, c)] == ["Hello, stranger"] * 3
    answer = a.admin_call("PUT", "/admin/rule/grpc/extra.yaml", {"content": SHARED_RULE.format(text="shared!")})
    assert answer["ok"] is True
    assert a.hello("shared") == "shared!"
    took = wait_for(lambda: b.hello("shared") == "shared!" and c.hello("shared") == "shared!", timeout=5)
    assert took is not None, "the rule did not reach the other replicas"
    assert took < 1.0, f"the rule took {took:.2f} s to reach the other replicas"
    # Written to each replica's own rules directory, as a change made there.
    for r in (b, c):
        assert (r.home / "rules" / "extra.yaml").read_text() == SHARED_RULE.format(text="shared!")
    status = b.admin_call("GET", "/admin/status")["runtime"]["shared_state"]
    assert status["up"] is True and status["url"] == redis.url and status["applied_from_peers"] >= 1

    # Deleted on another replica: gone everywhere.
    c.admin_call("DELETE", "/admin/rule/grpc/extra.yaml")
    took = wait_for(lambda: all(r.hello("shared") == "Hello, stranger" for r in (a, b, c)), timeout=5)
    assert took is not None and took < 1.0, took
    assert not (a.home / "rules" / "extra.yaml").exists()


def test_a_late_replica_catches_up_before_it_serves(cluster):
    redis, (a, _, _), tmp = cluster
    a.admin_call("PUT", "/admin/rule/grpc/extra.yaml", {"content": SHARED_RULE.format(text="from before")})
    late = Replica(tmp, "late", redis)
    try:
        assert late.hello("shared") == "from before"
    finally:
        late.stop()


def test_redis_down_loses_no_call_and_replicas_converge_when_it_is_back(cluster):
    redis, (a, b, c), _ = cluster
    redis.stop()
    # Every replica keeps serving while Redis is down.
    for _ in range(50):
        assert [r.hello("Tom") for r in (a, b, c)] == ["Hi Tom (from mock)"] * 3
    b.admin_call("PUT", "/admin/rule/grpc/extra.yaml", {"content": SHARED_RULE.format(text="made while down")})
    assert b.hello("shared") == "made while down"
    assert a.hello("shared") == "Hello, stranger"
    status = b.admin_call("GET", "/admin/status")["runtime"]["shared_state"]
    assert status["up"] is False and status["errors"] >= 1 and status["pending"] == 1, status
    redis.start()  # empty: it kept nothing
    took = wait_for(lambda: all(r.hello("shared") == "made while down" for r in (a, b, c)), timeout=20, poll=0.1)
    assert took is not None, "the replicas did not converge once Redis was back"
    for r in (a, b, c):
        assert r.admin_call("GET", "/admin/status")["runtime"]["shared_state"]["up"] is True
        assert "Redis unreachable" in r.log.read_text()
