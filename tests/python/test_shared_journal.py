"""The journal shared by replicas (`--shared-state redis://...` with
`--journal N`), against a real redis-server and nginx `grpc_pass` in front
of three replicas (one on the reference HTTP/2 stack):
- `verify`, count and the listing on any replica see every replica's calls,
  numbered once across all, each naming the replica that served it;
- `since` polling and `before` paging walk the union without a gap;
- `scope=local` reads one replica's own calls, and those add up to the union;
- a failed verification shows the closest calls, from any replica;
- deleting the journal on one replica empties it for all;
- with Redis down the union cannot be read (503, saying so) while calls are
  still served and recorded; once it is back, the calls made meanwhile are
  in the union;
- past `--journal-bytes` of calls waiting for Redis, calls are left out of
  the union and counted, while another client is still served;
- the web UI of one replica (headless Chromium) lists every replica's
  calls, each naming its replica, and its status shows the shared journal.

Needs redis-server and nginx (skipped without them, except under CI).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from test_browser import chromium, node, node_modules  # noqa: F401 - fixtures
from test_shared_state import LimitedReplica, Redis, behind_nginx, hello_bytes, reply_text, wait_for
from test_ui import drive, steps

CALLS = 300
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
SAY_HELLO = "helloworld.Greeter/SayHello"


def get(replica, path: str, **query) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{replica.admin}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def post(replica, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{replica.admin}{path}", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def count(replica, **query) -> int:
    status, body = get(replica, "/admin/journal/count", **query)
    assert status == 200, body
    return body["count"]


@pytest.fixture
def journaled(tmp_path):
    with behind_nginx(tmp_path, "j", "--journal", "2000") as cluster:
        yield cluster


def send(channel, names: list[str], threads: int = 16) -> None:
    call = channel.unary_unary("/helloworld.Greeter/SayHello")
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(lambda n: reply_text(call(hello_bytes(n), timeout=20)), names))
    assert all(answers), answers[:5]


def test_verify_count_and_listing_on_any_replica_see_every_replicas_calls(journaled):
    _, replicas, channel = journaled
    send(channel, [f"j{i}" for i in range(CALLS)])
    # No wait: a count and a verification first ask every replica to append
    # what it recorded, so they see every call answered before they began.
    for r in replicas:
        assert count(r, method=SAY_HELLO) == CALLS
        status, v = post(r, "/admin/journal/verify", {"method": SAY_HELLO, "times": CALLS})
        assert status == 200 and v["ok"] is True and v["scope"] == "all", v
        status, v = post(r, "/admin/journal/verify", {"method": SAY_HELLO, "body": {"name": "j123"}, "times": 1})
        assert v["ok"] is True, v
        # GripMock's verify too.
        status, v = post(r, "/api/verify", {"service": "helloworld.Greeter", "method": "SayHello",
                                            "expectedCount": CALLS})
        assert status == 200 and v["message"] == "ok", v
    # Each replica's own calls add up to the union, and all took some.
    local = [count(r, method=SAY_HELLO, scope="local") for r in replicas]
    assert sum(local) == CALLS and all(n > 0 for n in local), local
    status, v = post(replicas[0], "/admin/journal/verify", {"method": SAY_HELLO, "times": CALLS, "scope": "local"})
    assert v["ok"] is False and v["count"] == local[0] and v["scope"] == "local", v

    # The listing, paged with `before`: every call once, numbered in
    # increasing order, each naming its replica.
    seen, before = [], None
    while True:
        query = {"method": SAY_HELLO, "limit": 64, **({"before": before} if before else {})}
        status, page = get(replicas[1], "/admin/journal", **query)
        assert status == 200 and page["scope"] == "all" and page["matched"] >= len(page["entries"]), page
        seen = page["entries"] + seen
        if not page["page"]["more"]:
            break
        before = page["page"]["before"]
    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == CALLS, seqs[:10]
    assert sorted(e["request"]["name"] for e in seen) == sorted(f"j{i}" for i in range(CALLS))
    assert len({e["replica"] for e in seen}) == 3
    assert all(e["status"]["name"] == "OK" and e["rule"]["origin"] and e["replica_seq"] >= 1 for e in seen)

    # Polling with `since` gets exactly the newer calls.
    _, page = get(replicas[2], "/admin/journal", limit=1)
    last = page["recorded"]
    send(channel, [f"later{i}" for i in range(7)], threads=4)
    assert wait_for(lambda: get(replicas[2], "/admin/journal", since=last)[1]["matched"] == 7, timeout=1.0)
    _, page = get(replicas[0], "/admin/journal", since=last)
    assert sorted(e["request"]["name"] for e in page["entries"]) == sorted(f"later{i}" for i in range(7))

    # A failed verification shows the closest calls, whichever replica
    # served them.
    status, v = post(replicas[2], "/admin/journal/verify", {"method": SAY_HELLO, "body": {"name": "j12"}, "times": 2})
    assert v["ok"] is False and v["count"] == 1, v
    status, v = post(replicas[2], "/admin/journal/verify", {"method": SAY_HELLO, "body": {"name": "nobody"}})
    assert v["ok"] is False and v["count"] == 0 and len(v["closest"]) == 3, v
    assert v["closest"][0]["differences"][0]["at"] == "request.name" and v["closest"][0]["call"]["replica"]

    # Deleting on one replica empties the union for all.
    req = urllib.request.Request(f"http://127.0.0.1:{replicas[0].admin}/admin/journal", method="DELETE")
    with urllib.request.urlopen(req, timeout=30) as r:
        removed = json.load(r)
    assert removed["removed_shared"] == CALLS + 7, removed
    assert [count(r) for r in replicas] == [0, 0, 0]


def test_redis_down_the_union_says_so_and_calls_made_meanwhile_arrive_after(journaled):
    redis, replicas, channel = journaled
    send(channel, [f"before{i}" for i in range(30)])
    assert count(replicas[0]) == 30
    last_before = get(replicas[0], "/admin/journal", limit=1)[1]["recorded"]
    redis.stop()
    send(channel, [f"during{i}" for i in range(60)])
    status, body = get(replicas[0], "/admin/journal/count")
    assert status == 503 and "scope=local" in body["error"] and "Redis" in body["error"], body
    status, body = post(replicas[1], "/admin/journal/verify", {"method": SAY_HELLO})
    assert status == 503, body
    # This replica's own journal still answers.
    assert count(replicas[0], scope="local") > 0
    # Back, empty: the calls that waited are appended.
    redis.start()
    took = wait_for(lambda: get(replicas[2], "/admin/journal/count")[0] == 200
                    and count(replicas[2], body=json.dumps({"name": "during7"})) == 1
                    and count(replicas[2]) == 60, timeout=10, poll=0.2)
    assert took is not None, [r.log.read_text()[-1500:] for r in replicas]
    # Redis lost its numbering with its data: the numbers go on above the
    # old ones, so a client polling with `since` misses nothing.
    _, page = get(replicas[1], "/admin/journal", since=last_before)
    assert page["matched"] == 60 and min(e["seq"] for e in page["entries"]) > last_before, page["page"]
    for r in replicas:
        _, status = get(r, "/admin/status")
        shared = status["journal"]["shared"]
        assert shared["up"] is True and shared["dropped"] == 0 and shared["errors"] >= 1, shared
        assert "shared journal: Redis unreachable" in r.log.read_text()


def test_calls_waiting_past_journal_bytes_are_dropped_and_counted_while_others_are_served(tmp_path):
    redis = Redis(tmp_path)
    r = LimitedReplica(tmp_path, "small", redis, "--journal", "10000", "--journal-bytes", "200000")
    try:
        redis.stop()
        big = r.channel.unary_unary("/helloworld.Greeter/SayHello")
        name = "x" * 100
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(big, b"\x0a\x64" + name.encode(), timeout=20) for _ in range(3000)]
            # A second client is served meanwhile.
            assert r.hello("Tom") == "Hi Tom (from mock)"
            for f in futures:
                f.result()
        metrics = r.metric("wirestub_shared_journal_dropped_total")
        assert metrics > 0
        _, status = get(r, "/admin/status")
        shared = status["journal"]["shared"]
        assert shared["waiting_bytes"] <= shared["bytes_limit"] == 200000, shared
        redis.start()
        assert wait_for(lambda: r.metric("wirestub_shared_journal_waiting_bytes") == 0, timeout=10, poll=0.2)
        appended = r.metric("wirestub_shared_journal_appended_total")
        assert 0 < appended < 3001, appended
        # The stream keeps what --journal-bytes holds at 4 KiB a call.
        status = get(r, "/admin/status")[1]["journal"]["shared"]
        assert status["stream_capacity"] == 200000 // 4096 and status["left_out"] > 0, status
        code, counted = get(r, "/admin/journal/count")
        assert code == 200 and counted["count"] == min(appended, status["stream_capacity"]), counted
        # Calls were left out: a count says it may be short, a verification
        # cannot pass an upper bound.
        assert counted["complete"] is False and "left out" in counted["incomplete"], counted
        _, v = post(r, "/admin/journal/verify", {"method": SAY_HELLO, "at_most": 5000})
        assert v["ok"] is False and v["complete"] is False and "cannot verify" in v["message"], v
        _, v = post(r, "/admin/journal/verify", {"method": SAY_HELLO, "at_least": 1})
        assert v["ok"] is True and v["complete"] is False, v
        # A call whose view passes --journal-bytes / the calls kept (here
        # the 4 KiB floor) is stored without its request, and says where it is.
        long = "y" * 5000
        assert r.say_hello(b"\x0a\x88\x27" + long.encode(), timeout=10)[:1] == b"\x0a"  # 5000 = varint 88 27
        assert wait_for(lambda: get(r, "/admin/journal", limit=1)[1]["entries"][0].get("omitted") == ["request"],
                        timeout=2)
        _, page = get(r, "/admin/journal", limit=1)
        stored = page["entries"][0]
        assert "request" not in stored and "scope=local" in stored["request_omitted"], stored
        assert get(r, "/admin/status")[1]["journal"]["shared"]["view_bytes"] == 200000 // (200000 // 4096)
        _, own = get(r, "/admin/journal", limit=1, scope="local")
        assert own["entries"][0]["request"]["name"] == long and own["scope"] == "local"
        # A filter on the request cannot tell for that call: said, and an
        # upper bound is not passed.
        _, v = post(r, "/admin/journal/verify", {"method": SAY_HELLO, "body": {"name": "nobody"}, "times": 0})
        assert v["ok"] is False and "without the part the filters read" in v["incomplete"], v
        # Emptied, the journal starts again: complete.
        req = urllib.request.Request(f"http://127.0.0.1:{r.admin}/admin/journal", method="DELETE")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.load(resp)["removed_shared"] > 0
        assert get(r, "/admin/journal/count") == (200, {"count": 0})
    finally:
        r.stop()
        redis.stop()


def test_the_web_ui_of_one_replica_shows_every_replicas_calls(journaled, node, chromium, node_modules):  # noqa: F811
    _, replicas, channel = journaled
    send(channel, [f"ui{i}" for i in range(30)])
    assert wait_for(lambda: count(replicas[0]) == 30, timeout=1.0)
    report = drive(node, chromium, replicas[0].admin, "shared")
    seen = steps(report)["every replica's calls"]
    assert seen["rows"] == 30, seen
    ids = {r.admin_call("GET", "/admin/status")["runtime"]["shared_state"]["replica"] for r in replicas}
    assert None not in seen["replicas"] and set(seen["replicas"]) <= ids and len(set(seen["replicas"])) >= 2, seen
    assert "appending to wirestub:journal" in seen["status"] and "0 left out" in seen["status"], seen["status"]
    assert not report["failed"] and not [c for c in report["console"] if c["level"] in ("error", "pageerror")], report


def test_a_batch_sent_again_after_a_slow_answer_is_appended_once(tmp_path):
    """Redis stalls longer than a replica waits for its answer: the replica
    sends the batch again, and the calls are in the shared journal once."""
    redis = Redis(tmp_path)
    r = LimitedReplica(tmp_path, "slow", redis, "--journal", "100")
    try:
        assert r.hello("Tom") == "Hi Tom (from mock)"
        assert count(r) == 1
        stall = subprocess.Popen(
            [REDIS_CLI, "-p", str(redis.port), "DEBUG", "SLEEP", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(0.2)
        assert r.hello("dup") == "Hello, stranger"
        stall.wait(20)
        assert wait_for(lambda: r.metric("wirestub_shared_journal_waiting_bytes") == 0, timeout=15, poll=0.2)
        _, v = post(r, "/admin/journal/verify", {"method": SAY_HELLO, "body": {"name": "dup"}, "times": 1})
        assert v["ok"] is True and v["count"] == 1, v
    finally:
        r.stop()
        redis.stop()
