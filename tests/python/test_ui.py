"""The engine's web UI (/ui/ on the admin listener) in headless Chromium,
driven by tests/browser/ui.mjs (playwright-core and the system's Chromium).

main: an engine on a copy of the bundled example (protos/, rules/; the
runtime API writes edits into the copy) with --journal and --admin-token.
The page asks for the token, then:
- Services lists the example's services; SayHello shows its request
  fields and its five rules in evaluation order, with their origins, their
  conditions in words and a "never hit" marker;
- Try it sends SayHello {"name": "Tom"} over Connect JSON to the serving
  port and shows "Hi Tom (from mock)"; Subscribe streams three messages
  and the x-room header; an endless stream runs until its 1 s deadline
  without the page falling behind; Upload takes a list of two messages and answers
  once; SearchProducts {"query": "zzz"} gets NOT_FOUND;
- Calls shows the calls, and a call made while it is open appears at the
  top without a reload; the SearchProducts call opens to the rule that came
  closest, its failing condition and the value received;
- Edit: a misspelt field in the SayHello rule file is refused with the
  diagnostic at its line (and the line marked); fixed, it applies, and
  Try it gets the new answer;
- Load draws the calls per second and SayHello's percentiles;
- Status shows the plan identity and reloads it;
- the keyboard reaches the links with a visible focus outline.
No request is refused once the token is given, and the page logs no error.

scale: a method with 10,000 rules and a journal of 10,000 calls: the rules
and the calls are shown a page at a time, and more on request.

Screenshots of every view go to WIRESTUB_UI_SCREENSHOTS (default
artifacts/ui-screenshots/ in the repository), which CI keeps.

Needs what test_browser.py needs: Node.js >= 20, npm, Chromium at
/usr/bin/chromium (skipped without it, except under CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import engine_process
import grpc
import pytest
from test_browser import BROWSER_DIR, REPO_ROOT, chromium, node, node_modules  # noqa: F401 - fixtures

TOKEN = "ui-s3cret"
SCREENSHOTS = Path(os.environ.get("WIRESTUB_UI_SCREENSHOTS", REPO_ROOT / "artifacts" / "ui-screenshots"))
DRIVE_TIMEOUT = 240


def start(tmp: Path, rules: Path, *flags: str):
    proc, port, admin, log = engine_process.start_with_admin(
        [
            "run",
            "--protos",
            str(REPO_ROOT / "protos"),
            "--rules",
            rules.name,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            *flags,
        ],
        tmp,
        cwd=rules.parent,
    )
    return proc, port, admin, log


def drive(node: str, chromium: str, admin: int, scenario: str, *extra: str) -> dict:  # noqa: F811
    cmd = [
        node,
        str(BROWSER_DIR / "ui.mjs"),
        f"http://127.0.0.1:{admin}",
        "--scenario",
        scenario,
        "--screenshots",
        str(SCREENSHOTS),
        *extra,
    ]
    env = dict(os.environ, WIRESTUB_CHROMIUM=chromium)
    try:
        run = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=DRIVE_TIMEOUT
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} ran over {DRIVE_TIMEOUT}s\nstdout: {e.stdout}\nstderr: {e.stderr}")
    try:
        report = json.loads(run.stdout)
    except ValueError:
        pytest.fail(f"ui.mjs printed no report (exit {run.returncode})\nstdout: {run.stdout}\nstderr: {run.stderr}")
    return report


def steps(report: dict) -> dict:
    failed = [s for s in report["steps"] if not s["ok"]]
    assert not failed, "steps failed:\n" + "\n".join(f"  {s['name']}: {s['error']}" for s in failed) + (
        "\nconsole:\n" + "\n".join(f"  [{c['level']}] {c['text']}" for c in report["console"][:30])
    )
    return {s["name"]: s["seen"] for s in report["steps"]}


def test_the_ui_end_to_end(tmp_path, node, chromium, node_modules):  # noqa: F811
    rules = tmp_path / "rules"
    shutil.copytree(REPO_ROOT / "rules", rules)
    proc, port, admin, log = start(tmp_path, rules, "--journal", "10000", "--admin-token", TOKEN)
    try:
        # The UI's files need no token, its data does.
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ui/", timeout=10) as r:
            assert r.status == 200 and b'src="app.js"' in r.read()
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/stats", timeout=10)
        assert refused.value.code == 401

        report = drive(node, chromium, admin, "main", "--token", TOKEN)
        seen = steps(report)
    finally:
        engine_process.stop(proc)
    assert "panicked" not in log.read_text(errors="replace")

    services = seen["services"]
    assert services["services"][:3] == ["chat.v1.Chat", "helloworld.Greeter", "shop.v1.Catalog"]
    assert services["rules"] == 5
    assert services["origins"][:2] == [
        "rules/helloworld.greeter.sayhello.yaml:12:9",
        "rules/helloworld.greeter.sayhello.yaml:6:9",
    ], "evaluation order: priority 20 before priority 10"
    assert services["conditions"][1] == 'request.name == "Tom"'
    assert services["conditions"][-1] == "always"
    assert services["neverHit"] == 5
    assert services["fields"] == ["name", "email", "age"]

    assert seen["try it"]["status"] == "OK"
    assert json.loads(seen["try it"]["messages"][0]) == {"message": "Hi Tom (from mock)"}
    stream = seen["try it: a streaming answer"]
    assert stream["status"] == "OK" and len(stream["messages"]) == 3
    assert json.loads(stream["messages"][2]) == {"user": "ann", "text": "bye", "seq": 3}
    assert "x-room\tgeneral" in stream["headers"]
    # A stream that never ends by itself: the page keeps up (the first 500
    # messages shown, the rest counted) until the deadline ends it.
    firehose = seen["try it: an endless stream until its deadline"]
    assert firehose["status"] == "DEADLINE_EXCEEDED", firehose["status"]
    assert firehose["shown"] == 500 and "more messages received" in firehose["more"], firehose
    upload = seen["try it: a client stream"]
    assert upload["status"] == "OK" and [json.loads(m) for m in upload["messages"]] == [{"note": "uploaded"}]
    missed = seen["try it: a call no rule answers"]
    assert missed["status"] == "NOT_FOUND"
    assert "no rule matches" in missed["message"]

    live = seen["calls, live"]
    assert live["answered"]["status"] == 200
    assert live["after"] == live["before"] + 1 and live["newSeqAbove"]
    assert "/helloworld.Greeter/SayHello" in live["firstRow"]
    assert live["answered"]["body"] == {"message": "Hello, stranger"}

    text = seen["calls: what clients send stays text"]
    assert json.loads(text["request"]) == {"name": "<img src=x onerror=window.__pwned=1>"}
    assert "<script>window.__pwned=2</script>" in text["metadata"]
    assert text["images"] == 0 and text["pwned"] is None, text
    assert text["focused"] == "call-detail", "opening a call moves the focus to it"

    why = seen["calls: a call that missed"]
    assert why["condition"] == "request.category == 2"
    assert why["actual"] == "(absent)"
    assert "does not hold" in why["reason"]
    assert json.loads(why["request"]) == {"query": "zzz"}

    mistake = seen["edit: a mistake"]
    assert mistake["diagnosticLine"] == mistake["line"] == 9
    assert mistake["gutterMarked"] == ["9"] or [m.strip() for m in mistake["gutterMarked"]] == ["9"]
    assert "unknown field `mesage`" in mistake["diagnostic"] and "did you mean `message`" in mistake["diagnostic"]
    assert "not applied" in mistake["result"]
    assert "Applied" in seen["edit: fixed"]["result"]
    assert json.loads(seen["try it after the edit"]["messages"][0]) == {"message": "Hi Tom (edited)"}
    # The edit went through the runtime API into the rules directory.
    assert 'message: "Hi Tom (edited)"' in (rules / "helloworld.greeter.sayhello.yaml").read_text()

    load = seen["load"]
    assert load["row"].startswith("/helloworld.Greeter/SayHello\t")
    assert load["lines"] >= 3 and load["rules"] >= 1

    status = seen["status and reload"]
    assert len(status["identity"]) == 16
    assert "Reloaded: generation" in status["reload"]

    focus = seen["keyboard focus"]
    assert focus["focusVisible"] and focus["outline"] == "solid", focus

    assert not [r for r in report["refused"] if r["afterToken"]], report["refused"]
    # The answers that are errors by design: the call no rule answers
    # (Connect's 404 for NOT_FOUND) and the save refused with diagnostics.
    expected = {("/shop.v1.Catalog/SearchProducts", 404), ("/admin/rule/grpc/helloworld.greeter.sayhello.yaml", 422)}
    failed = {(urllib.parse.urlsplit(f["url"]).path, f["status"]) for f in report["failed"]}
    assert failed == expected, report["failed"]
    errors = [c for c in report["console"] if c["level"] == "pageerror" or (
        c["level"] == "error" and "Failed to load resource" not in c["text"])]
    assert not errors, errors
    names = sorted(Path(p).name for p in report["screenshots"])
    assert names == sorted(["services.png", "try-it.png", "calls.png", "edit.png", "load.png", "status.png"]), names


def hello(name: str) -> bytes:
    data = name.encode()
    return b"\x0a" + bytes([len(data)]) + data


def test_the_ui_with_10000_rules_and_10000_calls(tmp_path, node, chromium, node_modules):  # noqa: F811
    rules = tmp_path / "rules"
    rules.mkdir()
    lines = ["responses:"]
    for i in range(10_000):
        lines.append(f'  - when:\n      request.name: "user-{i}"\n    body:\n      message: "Hello user {i}"')
    lines.append('  - body:\n      message: "Hello, stranger"')
    (rules / "helloworld.greeter.sayhello.yaml").write_text("\n".join(lines) + "\n")
    proc, port, admin, log = start(tmp_path, rules, "--journal", "10000")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/helloworld.Greeter/SayHello")
            grpc.channel_ready_future(channel).result(timeout=30)
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda i: call(hello(f"user-{i}"), timeout=30), range(10_000)))
        assert len(answers) == 10_000
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/journal/count", timeout=10) as r:
            assert json.load(r)["count"] == 10_000
        seen = steps(drive(node, chromium, admin, "scale"))
    finally:
        engine_process.stop(proc)
    rules_seen = seen["10,000 rules, a page at a time"]
    assert rules_seen["first"] == 200 and rules_seen["second"] == 400
    assert rules_seen["button"] == "Show 200 more of 9801"
    assert rules_seen["heading"] == "Rules (10001), in evaluation order"
    calls_seen = seen["10,000 calls, a page at a time"]
    assert calls_seen["first"] == 100 and calls_seen["older"] and calls_seen["second"] == 200
