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

import contextlib
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


def require(path: str, name: str, hint: str) -> None:
    """Skips the test when the tool at `path` is missing, except under CI
    (CI set), where it fails."""
    if os.path.exists(path):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{name} not found (CI is set, so this fails): {hint}")
    pytest.skip(f"{name} not found: {hint}")


class Redis:
    def __init__(self, tmp: Path):
        require(REDIS, "redis-server", "install it with `apt-get install -y redis-server` or set WIRESTUB_REDIS_SERVER")
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
             "--dir", str(self.tmp), "--enable-debug-command", "local"],
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
    def __init__(self, tmp: Path, name: str, redis: Redis, *flags: str, extra_rules: str = "", rules: str = "rules"):
        """An engine in `tmp/name` with its own copy of the example's rules
        in `rules` (and `extra_rules` as limited.yaml there), sharing
        `redis`."""
        home = tmp / name
        shutil.copytree(REPO_ROOT / "rules", home / rules)
        if extra_rules:
            (home / rules / "limited.yaml").write_text(extra_rules)
        self.proc, self.port, self.admin, self.log = engine_process.start_with_admin(
            ["run", "--protos", str(REPO_ROOT / "protos"), "--rules", rules, "--listen", "127.0.0.1:0",
             "--admin-listen", "127.0.0.1:0", "--shared-state", redis.url, *flags],
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


def test_any_replica_shows_which_plan_every_replica_serves(cluster):
    _, replicas, _ = cluster

    def seen() -> list[dict]:
        return replicas[0].admin_call("GET", "/admin/status")["runtime"]["shared_state"]["replicas"]

    ports = {str(r.port) for r in replicas}

    def grpc_ports(listed: list[dict]) -> set[str]:
        return {l.rsplit(":", 1)[1] for e in listed for l in e["listeners"] if l.startswith("grpc ")}

    # A replica's first word may come before its listeners are up: the
    # next one (2 s later) names them.
    assert wait_for(lambda: grpc_ports(seen()) == ports, timeout=10, poll=0.2) is not None, seen()
    identities = {r.admin_call("GET", "/admin/status")["plan"]["identity"] for r in replicas}
    assert len(identities) == 1, "the same sources compile to the same plan"
    listed = seen()
    assert {e["identity"] for e in listed} == identities
    assert sum(e["this_one"] for e in listed) == 1
    assert len(listed) == 3 and grpc_ports(listed) == ports
    # A change moves every replica to the new plan, and the list says so.
    replicas[1].admin_call("PUT", "/admin/rule/grpc/extra.yaml", {"content": SHARED_RULE.format(text="x")})
    new = replicas[1].admin_call("GET", "/admin/status")["plan"]["identity"]
    assert new not in identities
    assert wait_for(lambda: {e["identity"] for e in seen()} == {new}, timeout=10, poll=0.2) is not None, seen()


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


# --------------------------------------------------------------------------
# `times` counted across replicas, behind nginx
# --------------------------------------------------------------------------

LIMITED_RULES = """service: helloworld.Greeter
method: SayHello
responses:
  - when: { request.name: "once" }
    body: { message: "the one" }
    times: 1
    priority: 50
  - when: { request.name: "once" }
    body: { message: "already taken" }
    priority: 40
  - when: { request.name: "retry" }
    trailers: { grpc-status: UNAVAILABLE, grpc-message: "try again" }
    times: 1
    priority: 33
  - when: { request.name: "retry" }
    body: { message: "second" }
    times: 1
    priority: 32
  - when: { request.name: "retry" }
    body: { message: "steady" }
    priority: 31
---
service: chat.v1.Chat
method: Upload
responses:
  - when: { request.count: 2 }
    body: { note: "first pair" }
    times: 1
    priority: 9
"""

NGINX = os.environ.get("WIRESTUB_NGINX", shutil.which("nginx") or "/usr/sbin/nginx")


class Nginx:
    """nginx in front of the replicas: HTTP/2 on one loopback port,
    `grpc_pass` to them round robin."""

    def __init__(self, tmp: Path, ports: list[int]):
        require(NGINX, "nginx", "install it with `apt-get install -y nginx` or set WIRESTUB_NGINX")
        self.port = free_port()
        home = tmp / "nginx"
        home.mkdir()
        servers = "\n".join(f"    server 127.0.0.1:{p};" for p in ports)
        temp = "\n".join(f"  {k}_temp_path {home}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (home / "nginx.conf").write_text(
            f"""worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  upstream engines {{
{servers}
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{self.port} http2;
    location / {{
      grpc_pass grpc://engines;
      grpc_read_timeout 30s;
    }}
  }}
}}
"""
        )
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(home), "-c", str(home / "nginx.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(home / "stderr.log", "wb"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        pytest.fail(f"nginx did not start:\n{(home / 'stderr.log').read_text()}\n{(home / 'error.log').read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class LimitedReplica(Replica):
    def __init__(self, tmp: Path, name: str, redis: Redis, *flags: str, rules: str = "rules"):
        super().__init__(tmp, name, redis, *flags, extra_rules=LIMITED_RULES, rules=rules)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@contextlib.contextmanager
def behind_nginx(tmp_path, prefix: str, *flags: str):
    """Three replicas (the middle one on the reference HTTP/2 stack) with
    `flags`, one Redis, nginx in front: (redis, replicas, a channel to
    nginx)."""
    redis = Redis(tmp_path)
    replicas = [
        LimitedReplica(tmp_path, f"{prefix}0", redis, *flags),
        LimitedReplica(tmp_path, f"{prefix}1", redis, "--http2", "h2", *flags),
        LimitedReplica(tmp_path, f"{prefix}2", redis, *flags),
    ]
    lb = Nginx(tmp_path, [r.port for r in replicas])
    channel = grpc.insecure_channel(f"127.0.0.1:{lb.port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield redis, replicas, channel
    finally:
        channel.close()
        lb.stop()
        for r in replicas:
            r.stop()
        redis.stop()


@pytest.fixture
def balanced(tmp_path):
    with behind_nginx(tmp_path, "n") as cluster:
        yield cluster


def hello_bytes(name: str) -> bytes:
    data = name.encode()
    return b"\x0a" + bytes([len(data)]) + data


def reply_text(reply: bytes) -> str:
    return reply[2 : 2 + reply[1]].decode() if reply[:1] == b"\x0a" else ""


def test_times_1_answers_once_across_replicas_under_1000_concurrent_calls(balanced):
    _, replicas, channel = balanced
    call = channel.unary_unary("/helloworld.Greeter/SayHello")
    futures = [call.future(hello_bytes("once"), timeout=60) for _ in range(1000)]
    answers = [reply_text(f.result()) for f in futures]
    assert answers.count("the one") == 1, {a: answers.count(a) for a in set(answers)}
    assert answers.count("already taken") == 999
    # Every replica took calls, and counted them in Redis.
    for r in replicas:
        assert r.metric('wirestub_shared_state_claims_total{counted="shared"}') > 0, r.log.read_text()[-2000:]
        assert r.metric('wirestub_shared_state_claims_total{counted="local"}') == 0


def test_a_sequence_answers_in_order_across_replicas(balanced):
    _, replicas, channel = balanced
    call = channel.unary_unary("/helloworld.Greeter/SayHello")
    seen = []
    for _ in range(5):
        try:
            seen.append(reply_text(call(hello_bytes("retry"), timeout=10)))
        except grpc.RpcError as e:
            seen.append(f"{e.code().name}: {e.details()}")
    assert seen == ["UNAVAILABLE: try again", "second", "steady", "steady", "steady"]
    # A client stream counts the same way, on either stack.
    upload = [r.channel.stream_unary("/chat.v1.Chat/Upload") for r in replicas]
    message = b"\x0a\x03ann\x12\x02hi"
    notes = [u(iter([message, message]), timeout=10) for u in upload]
    assert notes[0] == b"\x0a\x0afirst pair"
    assert notes[1] != notes[0] and notes[2] != notes[0], notes


def test_redis_killed_mid_load_loses_no_call_and_counting_recovers(balanced):
    redis, replicas, channel = balanced
    call = channel.unary_unary("/helloworld.Greeter/SayHello")
    failures = []
    answers = []
    stop = time.monotonic() + 3.0
    done = 0

    def one(i: int) -> None:
        name = "once" if i % 2 else "Tom"
        try:
            answers.append(reply_text(call(hello_bytes(name), timeout=20)))
        except grpc.RpcError as e:
            failures.append(f"{e.code().name}: {e.details()}")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        i = 0
        killed = False
        while time.monotonic() < stop and i < 20_000:
            list(pool.map(one, range(i, i + 64)))
            i += 64
            if not killed and time.monotonic() > stop - 2.0:
                redis.stop()
                killed = True
        done = i
    assert done > 0 and not failures, failures[:5]
    # Policy `local`: while Redis was away each replica counted by itself.
    assert sum(r.metric('wirestub_shared_state_claims_total{counted="local"}') for r in replicas) > 0
    assert all(r.metric("wirestub_shared_state_up") == 0 for r in replicas if
               r.metric('wirestub_shared_state_claims_total{counted="local"}') > 0)
    redis.start()
    time.sleep(1.2)  # each worker leaves Redis alone for a second after a failure
    recovered = wait_for(
        lambda: all(reply_text(r.say_hello(hello_bytes("once"), timeout=10)) for r in replicas)
        and all(r.metric("wirestub_shared_state_up") == 1 for r in replicas),
        timeout=20,
        poll=0.2,
    )
    assert recovered is not None, [r.log.read_text()[-1500:] for r in replicas]
    for r in replicas:
        assert "Redis unreachable" in r.log.read_text() and "Redis reachable again" in r.log.read_text()


def test_the_refuse_policy_answers_unavailable_while_redis_is_down(tmp_path):
    redis = Redis(tmp_path)
    r = LimitedReplica(tmp_path, "refusing", redis, "--shared-state-policy", "refuse")
    try:
        assert r.hello("once") == "the one"
        redis.stop()
        with pytest.raises(grpc.RpcError) as refused:
            r.hello("once")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "--shared-state-policy refuse" in refused.value.details()
        # Calls that reach no limited rule are answered as always.
        assert r.hello("Tom") == "Hi Tom (from mock)"
        assert r.metric('wirestub_shared_state_claims_total{counted="refused"}') >= 1
    finally:
        r.stop()
        redis.stop()


def test_counts_hold_across_directory_names_and_other_changes_until_reset(tmp_path):
    """Replicas whose rules sit in directories of other names (so their
    plans differ) count a response together; a runtime change elsewhere
    keeps the counts; DELETE /admin/shared/times starts them again."""
    redis = Redis(tmp_path)
    replicas = [LimitedReplica(tmp_path, f"d{i}", redis, rules=f"rules-{i}") for i in range(3)]
    a, b, c = replicas
    try:
        identities = {r.admin_call("GET", "/admin/status")["plan"]["identity"] for r in replicas}
        assert len(identities) == 3, identities  # the rules' origins name their directories
        assert [a.hello("once"), b.hello("once"), c.hello("once")] == ["the one", "already taken", "already taken"]
        # A rule added to the same method: its responses are unchanged.
        other = SHARED_RULE.format(text="added")
        assert a.admin_call("PUT", "/admin/rule/grpc/other.yaml", {"content": other})["ok"] is True
        assert wait_for(lambda: all(r.hello("shared") == "added" for r in replicas), timeout=2)
        assert len({r.admin_call("GET", "/admin/status")["plan"]["identity"] for r in replicas}) == 3
        assert [c.hello("once"), a.hello("once")] == ["already taken", "already taken"]
        removed = b.admin_call("DELETE", "/admin/shared/times")
        assert removed["removed"] >= 1, removed
        assert [c.hello("once"), a.hello("once")] == ["the one", "already taken"]
    finally:
        for r in replicas:
            r.stop()
        redis.stop()
