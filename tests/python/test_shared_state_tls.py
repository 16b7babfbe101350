"""Shared state over TLS with a password (`--shared-state
rediss://:PASSWORD@HOST:PORT --shared-state-ca/-cert/-key`), against a
real redis-server listening only on TLS and asking for a client
certificate: `times` counts, the shared journal and runtime changes all go
through it; a wrong password, database or CA stops the start with the
cause, while a Redis not there yet is an outage the replica serves
through.

Needs redis-server (skipped without it, except under CI).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from test_shared_state import REDIS, LimitedReplica, require, wait_for
from test_tls import pki, run_engine_expecting_failure  # noqa: F401 (pki: fixture)

REPO_ROOT = Path(__file__).resolve().parents[2]

PASSWORD = "s3cret"


class TlsRedis:
    def __init__(self, tmp: Path, pki):
        require(REDIS, "redis-server", "install it with `apt-get install -y redis-server` or set WIRESTUB_REDIS_SERVER")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        log = open(tmp / "redis-tls.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp), "--requirepass", PASSWORD,
             "--tls-cert-file", str(pki.server.cert_path), "--tls-key-file", str(pki.server.key_path),
             "--tls-ca-cert-file", str(pki.ca.cert_path), "--tls-auth-clients", "yes"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
        context.load_cert_chain(str(pki.client.cert_path), str(pki.client.key_path))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                    with context.wrap_socket(raw, server_hostname="localhost") as s:
                        s.sendall(f"AUTH {PASSWORD}\r\nPING\r\n".encode())
                        time.sleep(0.05)
                        if b"+PONG" in s.recv(64):
                            return
            except (OSError, ssl.SSLError):
                time.sleep(0.1)
        pytest.fail(f"redis-server with TLS did not start:\n{(tmp / 'redis-tls.log').read_text()}")

    def url(self, password: str = PASSWORD) -> str:
        return f"rediss://:{password}@localhost:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def tls_flags(pki) -> list[str]:
    return ["--shared-state-ca", str(pki.ca.cert_path), "--shared-state-cert", str(pki.client.cert_path),
            "--shared-state-key", str(pki.client.key_path)]


class Url:
    """Stands in for the Redis a Replica is given: only its URL is read."""

    def __init__(self, url: str):
        self.url = url


def admin(replica, method: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{replica.admin}{path}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def test_times_journal_and_changes_go_through_a_tls_redis_with_a_password(tmp_path, pki):
    redis = TlsRedis(tmp_path, pki)
    a = LimitedReplica(tmp_path, "a", Url(redis.url()), "--journal", "100", *tls_flags(pki))
    b = LimitedReplica(tmp_path, "b", Url(redis.url()), "--journal", "100", *tls_flags(pki))
    try:
        # `times: 1` once across both.
        answers = [a.hello("once"), b.hello("once"), a.hello("once")]
        assert answers == ["the one", "already taken", "already taken"], answers
        assert a.metric('wirestub_shared_state_claims_total{counted="shared"}') == 2
        # The journal's union.
        assert wait_for(lambda: admin(b, "GET", "/admin/journal/count") == {"count": 3}, timeout=2)
        # A runtime change made on one answers on the other.
        rule = ("service: helloworld.Greeter\nmethod: SayHello\nresponses:\n  - when: { request.name: tls }\n"
                "    body: { message: over tls }\n    priority: 99\n")
        assert admin(a, "PUT", "/admin/rule/grpc/tls.yaml", {"content": rule})["ok"] is True
        assert wait_for(lambda: b.hello("tls") == "over tls", timeout=2), b.log.read_text()[-2000:]
        status = admin(b, "GET", "/admin/status")
        assert status["runtime"]["shared_state"]["up"] is True
        assert PASSWORD not in json.dumps(status) and ":***@" in status["runtime"]["shared_state"]["url"]
        assert status["journal"]["shared"]["up"] is True
    finally:
        a.stop()
        b.stop()
        redis.stop()


def test_a_wrong_password_or_an_untrusted_server_stops_the_start_with_the_cause(tmp_path, pki):
    """Mistakes in the settings are not outages to wait out: the engine
    does not start, and says why, without the password."""
    redis = TlsRedis(tmp_path, pki)
    other_ca = ["--shared-state-ca", str(pki.other_ca.cert_path), "--shared-state-cert", str(pki.client.cert_path),
                "--shared-state-key", str(pki.client.key_path)]
    base = ["run", "--protos", str(REPO_ROOT / "protos"), "--rules", str(REPO_ROOT / "rules"), "--listen",
            "127.0.0.1:0", "--admin-listen", "off"]
    try:
        cases = [
            ([*base, "--shared-state", redis.url("nope"), *tls_flags(pki)], "password"),
            ([*base, "--shared-state", redis.url(), *other_ca], "--shared-state-ca"),
            ([*base, "--shared-state", redis.url() + "/99", *tls_flags(pki)], "database number"),
        ]
        for args, cause in cases:
            done = run_engine_expecting_failure(args)
            assert cause in done.stderr, (args, done.stderr)
            assert PASSWORD not in done.stderr and "nope" not in done.stderr, done.stderr
    finally:
        redis.stop()


def test_redis_away_at_start_is_an_outage_not_a_mistake(tmp_path, pki):
    """A Redis not there yet is waited out: the replica serves under the
    `local` policy and reports the outage."""
    redis = TlsRedis(tmp_path, pki)
    port = redis.port
    redis.stop()
    r = LimitedReplica(tmp_path, "early", Url(f"rediss://:{PASSWORD}@localhost:{port}"), "--journal", "10",
                       *tls_flags(pki))
    try:
        assert r.hello("once") == "the one" and r.hello("once") == "already taken"
        state = admin(r, "GET", "/admin/status")["runtime"]["shared_state"]
        assert state["up"] is False and state["last_error"], state
    finally:
        r.stop()
