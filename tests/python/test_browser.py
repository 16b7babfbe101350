"""A page in headless Chromium calls the engine with @connectrpc/connect-web
and shows the answers (tests/browser/).

The page is served by a small http.server on one loopback port, the engine
listens on another, so every call is cross-origin: the browser sends a CORS
preflight (OPTIONS) before each call (the driver turns the browser's cache,
preflight cache included, off) and only lets the page read what the
engine's CORS headers allow. The page calls, with connect-web's Connect
transport (JSON and binary) and its gRPC-Web transport (binary and JSON):

- helloworld.Greeter/SayHello {"name": "Tom"}: "Hi Tom (from mock)";
- SayHello {"name": "blocked"}: PERMISSION_DENIED "blocked users may not
  say hello", with its trailing metadata error-id: E123;
- chat.v1.Chat/Subscribe {"room": "general"}: three messages, with the
  initial metadata x-room: general;
- SayHello {"name": "admin"} with the request header x-role: root (not
  CORS-safelisted: the preflight must allow it): "Welcome back, root", and
  the response header x-served-by: wirestub, which the page can only read
  when the engine exposes it.

and writes each result into a table, which tests/browser/drive.mjs
(playwright-core driving the system's Chromium) reads back. Three engines:
the default CORS policy (any origin), --cors-origins naming the page's
origin (echoed, with credentials), and --cors-origins naming another origin,
where the browser refuses every call.

Needs Node.js >= 20, npm (tests/browser/node_modules is installed with
`npm ci` when missing or not matching package-lock.json) and Chromium at
/usr/bin/chromium (Debian package `chromium`). Without Chromium the tests
are skipped, except under CI (CI set), where they fail.

Environment:
  WIRESTUB_ENGINE    engine binary (default target/debug/engine)
  WIRESTUB_CHROMIUM  Chromium binary (default /usr/bin/chromium)
  WIRESTUB_NODE      `node` binary (default: node on PATH)
  WIRESTUB_NPM       `npm` binary (default: npm on PATH)
  WIRESTUB_BUF       `buf` binary (default tests/browser/node_modules/.bin/buf)
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import engine_process
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BROWSER_DIR = REPO_ROOT / "tests" / "browser"
CHROMIUM = os.environ.get("WIRESTUB_CHROMIUM", "/usr/bin/chromium")
DRIVE_TIMEOUT = 180
NPM_TIMEOUT = 600

TRANSPORTS = ["connect-json", "connect-binary", "grpc-web-binary", "grpc-web-json"]

# What the page shows for each call, whatever the transport.
EXPECTED = {
    "unary": ("ok", "Hi Tom (from mock)"),
    "error": ("error", "PermissionDenied: blocked users may not say hello (error-id: E123)"),
    "stream": (
        "ok",
        "3 messages: ann: hello (#1) | bob: hi ann (#2) | ann: bye (#3) (x-room: general)",
    ),
    "header": ("ok", "Welcome back, root (x-served-by: wirestub)"),
}

# What connect-web makes of a fetch the browser refused (a TypeError).
REFUSED = ("error", "Unknown: Failed to fetch")


# --------------------------------------------------------------------------
# Chromium, node, npm, the page and its server
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    hint = "install it with `apt-get install -y chromium` or set WIRESTUB_CHROMIUM"
    if os.environ.get("CI"):
        pytest.fail(f"Chromium not found at {CHROMIUM} (CI is set, so this fails): {hint}")
    pytest.skip(f"Chromium not found at {CHROMIUM}: {hint}")


def tool(env_var: str, name: str, hint: str) -> str:
    found = os.environ.get(env_var) or shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` not found on PATH (or set {env_var}): {hint}")
    return found


@pytest.fixture(scope="session")
def node(chromium) -> str:
    node = tool("WIRESTUB_NODE", "node", "install Node.js 20 or later")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    m = re.match(r"v(\d+)\.", version)
    if not m or int(m.group(1)) < 20:
        pytest.fail(f"{node} is Node.js {version or '(unknown version)'}; tests/browser needs 20 or later")
    return node


def installed_matches_lock() -> bool:
    """Whether tests/browser/node_modules holds exactly the packages of
    package-lock.json (npm's record of what it installed says so)."""
    try:
        lock = json.loads((BROWSER_DIR / "package-lock.json").read_text())
        installed = json.loads((BROWSER_DIR / "node_modules" / ".package-lock.json").read_text())
    except (OSError, ValueError):
        return False

    def versions(doc: dict) -> dict[str, str]:
        return {
            path: meta.get("version", "")
            for path, meta in doc.get("packages", {}).items()
            if path and not meta.get("optional")
        }

    return versions(lock) == versions(installed)


@pytest.fixture(scope="session")
def node_modules(node) -> Path:
    """tests/browser/node_modules, installed with `npm ci` when missing or
    stale. playwright-core never downloads a browser; the variable makes
    sure no install step tries to."""
    if not installed_matches_lock():
        npm = tool("WIRESTUB_NPM", "npm", "install npm (Debian: apt-get install npm)")
        cmd = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        env = dict(os.environ, PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1")
        run = subprocess.run(
            cmd,
            cwd=BROWSER_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
        )
        assert run.returncode == 0, (
            f"`{' '.join(cmd)}` in {BROWSER_DIR} exited with {run.returncode}\n"
            f"stdout: {run.stdout}\nstderr: {run.stderr}"
        )
    return BROWSER_DIR / "node_modules"


@pytest.fixture(scope="session")
def page_dir(node, node_modules, tmp_path_factory) -> Path:
    """The page, built by tests/browser/build.mjs: index.html, app.js
    (bundled by esbuild), schema.js (`buf build protos`, base64)."""
    out = tmp_path_factory.mktemp("browser-page")
    env = dict(os.environ)
    if env.get("WIRESTUB_BUF"):
        env["WIRESTUB_BUF"] = str(Path(env["WIRESTUB_BUF"]).resolve())
    cmd = [node, str(BROWSER_DIR / "build.mjs"), str(out)]
    run = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, (
        f"`{' '.join(cmd)}` exited with {run.returncode}\nstdout: {run.stdout}\nstderr: {run.stderr}"
    )
    for name in ("index.html", "app.js", "schema.js"):
        assert (out / name).is_file(), f"build.mjs wrote no {name}"
    return out


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="session")
def page_origin(page_dir):
    """The page's origin: http.server on a loopback port of its own."""
    handler = functools.partial(QuietHandler, directory=str(page_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------


def start_engine(log_dir: Path, *extra: str):
    cmd = [
        str(engine_process.engine_binary()),
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        *extra,
    ]
    return engine_process.start(cmd, log_dir)


@pytest.fixture(scope="module")
def any_origin_engine(tmp_path_factory):
    """The default CORS policy: any origin, without credentials."""
    srv = start_engine(tmp_path_factory.mktemp("browser-any"))
    yield srv
    engine_process.stop(srv.proc)


@pytest.fixture(scope="module")
def listed_origin_engine(tmp_path_factory, page_origin):
    """--cors-origins naming the page's origin (and another)."""
    srv = start_engine(
        tmp_path_factory.mktemp("browser-listed"),
        "--cors-origins",
        f"http://127.0.0.1:1,{page_origin}",
    )
    yield srv
    engine_process.stop(srv.proc)


@pytest.fixture(scope="module")
def other_origin_engine(tmp_path_factory):
    """--cors-origins naming an origin that is not the page's."""
    srv = start_engine(tmp_path_factory.mktemp("browser-other"), "--cors-origins", "http://127.0.0.1:1")
    yield srv
    engine_process.stop(srv.proc)


# --------------------------------------------------------------------------
# Driving the page
# --------------------------------------------------------------------------


def summarize(report: dict) -> str:
    """The report without the bulk, for failure messages."""
    lines = [f"state: {report.get('state')}", f"fatal: {report.get('fatal')}", "rows:"]
    lines += [f"  {r}" for r in report.get("rows", [])]
    lines.append("console:")
    lines += [f"  [{c['source']} {c['level']}] {c['text']}" for c in report.get("console", [])[:30]]
    lines.append("requests:")
    for q in report.get("requests", [])[:40]:
        lines.append(
            f"  {q['method']} {q['url']} -> {q['status']} {q.get('failure') or ''} "
            f"{json.dumps(q.get('responseHeaders'))}"
        )
    if report.get("screenshot"):
        lines.append(f"screenshot: {report['screenshot']}")
    return "\n".join(lines)


def drive(node: str, chromium: str, page_origin: str, engine, tmp_path: Path, name: str) -> dict:
    """Loads the page against `engine`; returns drive.mjs's report."""
    url = f"{page_origin}/index.html?engine=http://127.0.0.1:{engine.port}"
    screenshot = tmp_path / f"{name}.png"
    cmd = [node, str(BROWSER_DIR / "drive.mjs"), url, "--screenshot", str(screenshot)]
    env = dict(os.environ, WIRESTUB_CHROMIUM=chromium)
    try:
        run = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=DRIVE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"`{' '.join(cmd)}` still running after {DRIVE_TIMEOUT}s\nstdout: {e.stdout}\n"
            f"stderr: {e.stderr}\nengine log:\n{engine.log()}"
        )
    try:
        report = json.loads(run.stdout)
    except ValueError:
        pytest.fail(
            f"`{' '.join(cmd)}` exited with {run.returncode} without a report\n"
            f"stdout: {run.stdout[-4000:]}\nstderr: {run.stderr[-4000:]}\nengine log:\n{engine.log()}"
        )
    assert run.returncode == 0 and report["state"] == "done", (
        f"the page did not finish (drive.mjs exited with {run.returncode})\n"
        f"{summarize(report)}\nstderr: {run.stderr[-4000:]}\nengine log:\n{engine.log()}"
    )
    assert engine.alive(), f"the engine exited\n{engine.log()}"
    return report


def shown(report: dict) -> dict[tuple[str, str], tuple[str, str]]:
    return {(r["transport"], r["call"]): (r["outcome"], r["text"]) for r in report["rows"]}


def engine_requests(report: dict, engine, method: str) -> list[dict]:
    prefix = f"http://127.0.0.1:{engine.port}/"
    return [q for q in report["requests"] if q["method"] == method and q["url"].startswith(prefix)]


def header_names(value: str | None) -> set[str]:
    return {n.strip().lower() for n in (value or "").split(",") if n.strip()}


def calls_and_preflights(report: dict, engine) -> tuple[list[dict], list[dict]]:
    """The calls (POST) and preflights (OPTIONS) the browser sent the
    engine: one each per call on the page."""
    posts = engine_requests(report, engine, "POST")
    preflights = engine_requests(report, engine, "OPTIONS")
    calls = len(TRANSPORTS) * len(EXPECTED)
    assert len(posts) == calls and len(preflights) == calls, (
        f"expected {calls} calls, each after its preflight; the browser sent "
        f"{len(posts)} POST and {len(preflights)} OPTIONS\n{summarize(report)}"
    )
    return posts, preflights


def check_answered(report: dict, engine, page_origin: str, allow_origin: str) -> None:
    """Every call shows what the rules answer, every preflight was allowed
    (204, the custom header among the allowed ones), and every response
    carries `allow_origin`."""
    expected = {(t, c): v for t in TRANSPORTS for c, v in EXPECTED.items()}
    assert shown(report) == expected, summarize(report)

    posts, preflights = calls_and_preflights(report, engine)
    for q in preflights:
        h = q["responseHeaders"] or {}
        assert q["requestHeaders"].get("origin") == page_origin, q
        assert q["status"] == 204, q
        assert h.get("access-control-allow-origin") == allow_origin, q
        assert "post" in header_names(h.get("access-control-allow-methods")), q
        requested = header_names(q["requestHeaders"].get("access-control-request-headers"))
        assert requested <= header_names(h.get("access-control-allow-headers")), q
    # The x-role calls (one per transport) asked for x-role and got it.
    asked = [
        q
        for q in preflights
        if "x-role" in header_names(q["requestHeaders"].get("access-control-request-headers"))
    ]
    assert len(asked) == len(TRANSPORTS), summarize(report)
    for q in posts:
        h = q["responseHeaders"] or {}
        assert q["failure"] is None, q
        assert h.get("access-control-allow-origin") == allow_origin, q
        exposed = header_names(h.get("access-control-expose-headers"))
        assert {"grpc-status", "grpc-message"} <= exposed, q
        # Every header the page may need beyond the safelisted ones.
        for name in h:
            if name.startswith(("x-", "trailer-", "grpc-")) or name == "error-id":
                assert name in exposed, (name, q)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_page_calls_engine_from_any_origin(node, chromium, page_origin, any_origin_engine, tmp_path):
    report = drive(node, chromium, page_origin, any_origin_engine, tmp_path, "any-origin")
    check_answered(report, any_origin_engine, page_origin, "*")
    for q in engine_requests(report, any_origin_engine, "POST"):
        assert "access-control-allow-credentials" not in (q["responseHeaders"] or {}), q


def test_page_calls_engine_from_a_listed_origin(node, chromium, page_origin, listed_origin_engine, tmp_path):
    report = drive(node, chromium, page_origin, listed_origin_engine, tmp_path, "listed-origin")
    check_answered(report, listed_origin_engine, page_origin, page_origin)
    for q in engine_requests(report, listed_origin_engine, "POST"):
        h = q["responseHeaders"] or {}
        assert h.get("access-control-allow-credentials") == "true", q
        assert "origin" in header_names(h.get("vary")), q


def post_json(url: str, body: dict, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_other_origin_is_refused(node, chromium, page_origin, other_origin_engine, tmp_path):
    engine = other_origin_engine
    report = drive(node, chromium, page_origin, engine, tmp_path, "other-origin")
    expected = {(t, c): REFUSED for t in TRANSPORTS for c in EXPECTED}
    assert shown(report) == expected, summarize(report)

    # The browser refused each call on the preflight's answer, and said so.
    posts = engine_requests(report, engine, "POST")
    preflights = engine_requests(report, engine, "OPTIONS")
    assert len(posts) == len(expected) and preflights, summarize(report)
    for q in preflights:
        assert q["status"] == 403, q
        assert "access-control-allow-origin" not in (q["responseHeaders"] or {}), q
    for q in posts:
        assert q["status"] is None and q["failure"], q
        assert "Preflight" in q["failure"], q
    engine_url = f"http://127.0.0.1:{engine.port}/"
    refusals = [
        c["text"]
        for c in report["console"]
        if "blocked by CORS policy" in c["text"]
        and engine_url in c["text"]
        and f"from origin '{page_origin}'" in c["text"]
    ]
    assert refusals, summarize(report)

    # The engine itself is up: a client outside a browser gets its answer,
    # and so does the listed origin.
    url = f"{engine_url}helloworld.Greeter/SayHello"
    status, headers, body = post_json(url, {"name": "Tom"}, {})
    assert (status, json.loads(body)) == (200, {"message": "Hi Tom (from mock)"}), (status, headers, body)
    status, headers, body = post_json(url, {"name": "Tom"}, {"origin": "http://127.0.0.1:1"})
    assert status == 200, (status, headers, body)
    assert headers.get("access-control-allow-origin") == "http://127.0.0.1:1", headers
    status, headers, body = post_json(url, {"name": "Tom"}, {"origin": page_origin})
    assert status == 200, (status, headers, body)
    assert "access-control-allow-origin" not in headers, headers
