"""Replicas loading the same plan from elsewhere than a local file
(`engine run --plan URL|shared:`):
- from an http:// URL (through a redirect) and an https:// one with
  `--plan-ca`, the identity `compiler build` printed checked with
  `--plan-identity`; `/admin/reload` fetches again, and a plan of another
  identity is refused at start and on reload (the old one kept serving);
- a URL that answers 404, or bytes that are not a plan, stop the start with
  a message naming the URL and the cause;
- from the shared state's Redis (`--plan shared:`), stored with redis-cli:
  two replicas serve it, and a new plan stored and announced (`PUBLISH
  PREFIX:changes plan`) is served by both within a second, each replica's
  status listing the identity every replica serves.

Needs redis-server and redis-cli for the shared store (skipped without
them, except under CI).
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import engine_process
import grpc
import pytest
from test_runtime_api import compiler_binary
from test_shared_state import Redis, require
from test_tls import pki, run_engine_expecting_failure  # noqa: F401 (pki: fixture)

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"

EXTRA = """service: helloworld.Greeter
method: SayHello
responses:
  - when: { request.name: "version" }
    body: { message: "{text}" }
    priority: 99
"""


def build(tmp: Path, name: str, text: str) -> tuple[Path, str]:
    """The bundled example plus a rule answering "version" with `text`,
    compiled; the plan file and the identity `compiler build` printed."""
    src = tmp / f"src-{name}"
    shutil.copytree(REPO_ROOT / "rules", src / "rules")
    (src / "rules" / "version.yaml").write_text(EXTRA.replace("{text}", text))
    out = tmp / f"{name}.bin"
    run = subprocess.run(
        [str(compiler_binary()), "build", "--protos", str(REPO_ROOT / "protos"), "--rules", str(src / "rules"),
         "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    m = re.search(r"identity ([0-9a-f]{16})\)", run.stderr + run.stdout)
    assert m, run.stderr + run.stdout
    return out, m.group(1)


class PlanServer:
    """Serves files of a directory over HTTP(S) on loopback; `/moved/X`
    redirects to `/X`."""

    def __init__(self, root: Path, tls: ssl.SSLContext | None = None):
        self.root = root
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                outer.requests.append(self.path)
                if self.path.startswith("/moved/") or self.path.startswith("/to-http/"):
                    self.send_response(302)
                    if self.path.startswith("/to-http/"):
                        port, rest = self.path[len("/to-http/"):].split("/", 1)
                        self.send_header("Location", f"http://127.0.0.1:{port}/{rest}")
                    else:
                        self.send_header("Location", self.path[len("/moved"):])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def say(port: int, name: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        data = name.encode()
        reply = ch.unary_unary("/helloworld.Greeter/SayHello")(b"\x0a" + bytes([len(data)]) + data, timeout=10)
    return reply[2 : 2 + reply[1]].decode()


def admin(port: int, method: str, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def start(tmp: Path, name: str, *args: str):
    home = tmp / name
    home.mkdir()
    proc, port, admin_port, log = engine_process.start_with_admin(
        ["run", *args, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"], home, cwd=home
    )
    return engine_process.EngineProcess(proc, port, log), admin_port


def test_a_plan_from_a_url_with_its_identity_checked_and_fetched_again_on_reload(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    one, one_id = build(tmp_path, "one", "v1")
    two, two_id = build(tmp_path, "two", "v2")
    assert one_id != two_id
    shutil.copy(one, served / "plan.bin")
    server = PlanServer(served)
    url = f"http://127.0.0.1:{server.port}/moved/plan.bin"
    e, admin_port = start(tmp_path, "follows", "--plan", url)
    pinned, pinned_admin = start(tmp_path, "pinned", "--plan", url, "--plan-identity", one_id)
    try:
        for port, ap in ((e.port, admin_port), (pinned.port, pinned_admin)):
            assert say(port, "version") == "v1"
            assert admin(ap, "GET", "/admin/status")[1]["plan"]["identity"] == one_id
        assert "/moved/plan.bin" in server.requests and "/plan.bin" in server.requests
        # A new plan at the URL: a reload fetches it; the pinned replica
        # refuses it and keeps serving the one it has.
        shutil.copy(two, served / "plan.bin")
        status, body = admin(admin_port, "POST", "/admin/reload")
        assert status == 200, body
        assert say(e.port, "version") == "v2"
        assert admin(admin_port, "GET", "/admin/status")[1]["plan"]["identity"] == two_id
        status, body = admin(pinned_admin, "POST", "/admin/reload")
        assert status >= 400 and two_id in json.dumps(body) and "--plan-identity" in json.dumps(body), body
        assert say(pinned.port, "version") == "v1"
        # The URL unreachable: the reload fails, the plan stays.
        server.stop()
        status, body = admin(admin_port, "POST", "/admin/reload")
        assert status >= 400 and "cannot fetch" in json.dumps(body), body
        assert say(e.port, "version") == "v2"
    finally:
        engine_process.stop_cleanly(e)
        engine_process.stop_cleanly(pinned)


def test_bad_plan_urls_stop_the_start_with_the_cause(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    (served / "junk.bin").write_bytes(b"this is no plan")
    one, one_id = build(tmp_path, "one", "v1")
    shutil.copy(one, served / "plan.bin")
    server = PlanServer(served)
    base = f"http://127.0.0.1:{server.port}"
    try:
        cases = [
            (["--plan", f"{base}/missing.bin"], ["missing.bin", "404"]),
            (["--plan", f"{base}/junk.bin"], ["junk.bin", "not usable"]),
            (["--plan", f"{base}/plan.bin", "--plan-identity", "0123456789abcdef"], [one_id, "0123456789abcdef"]),
            (["--plan", "shared:"], ["--shared-state"]),
            (["--plan", f"{base}/plan.bin", "--watch"], ["--watch"]),
            (["--plan", "ftp://127.0.0.1/plan.bin"], ["ftp://", "not a way to fetch a plan"]),
            (["--plan", f"{base}/plan.bin", "--plan-identity", "xyz"], ["xyz", "16 hex digits"]),
            (["--plan", "shared:", "--shared-state", "redis://127.0.0.1:1", "--plan-ca", "ca.pem"], ["--plan-ca"]),
            (["--plan", "shared:", "--shared-state", "http://127.0.0.1:6379"], ["not a Redis URL", "redis://"]),
            # Credentials in a URL are not shown.
            (["--plan", f"http://user:s3cret@127.0.0.1:{server.port}/missing.bin?sig=abc"], ["404", "missing.bin"]),
        ]
        for args, words in cases:
            done = run_engine_expecting_failure(["run", *args, "--listen", "127.0.0.1:0", "--admin-listen", "off"])
            for w in words:
                assert w in done.stderr, (args, done.stderr)
            assert "s3cret" not in done.stderr and "sig=abc" not in done.stderr, done.stderr
    finally:
        server.stop()


def test_a_plan_from_an_https_url_with_a_private_ca(tmp_path, pki):
    served = tmp_path / "www"
    served.mkdir()
    one, one_id = build(tmp_path, "one", "over https")
    shutil.copy(one, served / "plan.bin")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server.cert_path), str(pki.server.key_path))
    server = PlanServer(served, tls=context)
    url = f"https://localhost:{server.port}/plan.bin"
    try:
        e, _ = start(tmp_path, "https", "--plan", url, "--plan-ca", str(pki.ca.cert_path), "--plan-identity", one_id)
        try:
            assert say(e.port, "version") == "over https"
        finally:
            engine_process.stop_cleanly(e)
        # Another CA: the server's certificate is not trusted.
        done = run_engine_expecting_failure(
            ["run", "--plan", url, "--plan-ca", str(pki.other_ca.cert_path), "--listen", "127.0.0.1:0",
             "--admin-listen", "off"]
        )
        assert "cannot fetch" in done.stderr and "certificate" in done.stderr.lower(), done.stderr
        assert "--plan-ca" in done.stderr, done.stderr
        # A redirect from https to http is refused.
        plain = PlanServer(served)
        try:
            done = run_engine_expecting_failure(
                ["run", "--plan", f"https://localhost:{server.port}/to-http/{plain.port}/plan.bin", "--plan-ca",
                 str(pki.ca.cert_path), "--listen", "127.0.0.1:0", "--admin-listen", "off"]
            )
            assert "not https, is refused" in done.stderr, done.stderr
            assert "/plan.bin" not in plain.requests
            # An http server asked for https: said so.
            done = run_engine_expecting_failure(
                ["run", "--plan", f"https://127.0.0.1:{plain.port}/plan.bin", "--plan-ca", str(pki.ca.cert_path),
                 "--listen", "127.0.0.1:0", "--admin-listen", "off"]
            )
            assert "does not speak TLS" in done.stderr, done.stderr
        finally:
            plain.stop()
    finally:
        server.stop()


def test_replicas_serve_the_plan_stored_in_the_shared_state_and_follow_a_new_one(tmp_path):
    require(REDIS_CLI, "redis-cli", "install it with `apt-get install -y redis-tools`")
    redis = Redis(tmp_path)
    one, one_id = build(tmp_path, "one", "stored v1")
    two, two_id = build(tmp_path, "two", "stored v2")

    def cli(*args: str, stdin: Path | None = None) -> str:
        run = subprocess.run(
            [REDIS_CLI, "-p", str(redis.port), *args],
            stdin=open(stdin, "rb") if stdin else subprocess.DEVNULL, capture_output=True, timeout=30,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.decode().strip()

    try:
        # Nothing stored yet: the start says how to store one.
        done = run_engine_expecting_failure(
            ["run", "--plan", "shared:", "--shared-state", redis.url, "--listen", "127.0.0.1:0", "--admin-listen",
             "off"]
        )
        assert "wirestub:plan" in done.stderr and "redis-cli" in done.stderr, done.stderr
        assert cli("-x", "SET", "wirestub:plan", stdin=one) == "OK"
        replicas = [start(tmp_path, f"s{i}", "--plan", "shared:", "--shared-state", redis.url) for i in range(2)]
        try:
            for e, _ in replicas:
                assert say(e.port, "version") == "stored v1"
            assert cli("-x", "SET", "wirestub:plan", stdin=two) == "OK"
            cli("PUBLISH", "wirestub:changes", "plan")
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and any(say(e.port, "version") != "stored v2" for e, _ in replicas):
                time.sleep(0.02)
            assert [say(e.port, "version") for e, _ in replicas] == ["stored v2"] * 2
            # Any replica's status lists what every replica serves.
            def identities():
                shared = admin(replicas[0][1], "GET", "/admin/status")[1]["runtime"]["shared_state"]
                return sorted(r["identity"] for r in shared["replicas"])
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and identities() != [two_id, two_id]:
                time.sleep(0.1)
            assert identities() == [two_id, two_id]
            # Redis restarted empty: the replicas store their plan again, so
            # that one starting later finds it.
            redis.stop()
            redis.start()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and cli("EXISTS", "wirestub:plan") != "1":
                time.sleep(0.2)
            assert cli("EXISTS", "wirestub:plan") == "1"
            late, _ = start(tmp_path, "late", "--plan", "shared:", "--shared-state", redis.url)
            try:
                assert say(late.port, "version") == "stored v2"
            finally:
                engine_process.stop_cleanly(late)
        finally:
            for e, _ in replicas:
                engine_process.stop_cleanly(e)
    finally:
        redis.stop()
