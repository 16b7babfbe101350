"""Request validation (`engine run --validation on`) against protovalidate.

tests/cases/validation holds a message with rules of each family the
compiler checks on the wire. A corpus of requests (a valid one, and
mutations of each field across and around its rules) goes to the engine
with grpcio and to Python's `protovalidate` package (the reference
implementation's port); both must agree on validity and on the set of
(field path, rule id) violations. Invalid requests come back
INVALID_ARGUMENT with google.rpc.BadRequest and buf.validate.Violations
details, read with grpc_status.rpc_status; a rule marked `validate: false`
still answers the invalid request it matches; with validation off the
same request is answered by the rules.
"""

import importlib
import importlib.resources
import json
import itertools
import sys
from pathlib import Path

import engine_process
import grpc
import pytest
from grpc_status import rpc_status

REPO_ROOT = Path(__file__).resolve().parents[2]
CASE = REPO_ROOT / "tests" / "cases" / "validation"
BUILTIN = REPO_ROOT / "compiler" / "src" / "builtin"


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("validation_pb")
    wkt = importlib.resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{CASE / 'protos'}", f"-I{BUILTIN}", f"-I{wkt}", f"--python_out={out}"]
    args += ["signup.proto", "predefined.proto", "buf/validate/validate.proto", "google/rpc/error_details.proto"]
    assert protoc.main(args) == 0
    sys.path.insert(0, str(out))
    try:
        signup = importlib.import_module("signup_pb2")
        details = importlib.import_module("google.rpc.error_details_pb2")
        violations = importlib.import_module("buf.validate.validate_pb2")
        import protovalidate

        return signup, details, violations, protovalidate
    finally:
        sys.path.remove(str(out))


def start(tmp_path, validation, stack="native"):
    cmd = [str(engine_process.engine_binary()), "run", "--listen", "127.0.0.1:0", "--admin-listen", "off"]
    cmd += ["--protos", str(CASE / "protos"), "--rules", str(CASE / "rules"), "--validation", validation]
    cmd += ["--http2", stack]
    return engine_process.start(cmd, tmp_path)


@pytest.fixture(scope="module", params=["native", "h2"])
def engine(tmp_path_factory, request):
    srv = start(tmp_path_factory.mktemp("validation"), "on", request.param)
    yield srv
    engine_process.stop(srv.proc)


def valid_user(signup):
    return signup.User(
        name="alice",
        email="a@example.com",
        age=30,
        plan=signup.PRO,
        tags=["a", "b"],
        address=signup.Address(city="Paris", zip="75001"),
        token=b"\x01\x02\x03",
        score=0.5,
        phone="123",
        quota=20,
        country="fr",
        id="123e4567-e89b-12d3-a456-426614174000",
    )


# Each mutation: a field and values around and across its rules.
MUTATIONS = {
    "name": ["", "ab", "abc", "é" * 3, "é" * 11, "abcdefghij", "abcdefghijk"],
    "email": ["", "no-at", "x@y", "a@b@c"],
    "age": [0, 17, 18, 129, 130, -5],
    "plan": [0, 1, 2, 7],
    "tags": [[], ["a"] * 3, ["a"] * 4, ["ok", "", "toolong"], ["", ""]],
    "scores": [[], [0, 10], [-1, 5, 11], [3], [3, 3], [1, 2, 1, 2]],
    "contact_email": ["", "a@b", "a@b.c", "a.b+c@x-y.example.org", "no-at", "a@-b.c", "a@b..c", "é@x.y", "a@" + "x" * 64 + ".com"],
    "id": ["", "123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000", "123e4567e89b12d3a456426614174000", "xyz"],
    "even": [0, 2, 3, -7],
    "items": [[], [("ab", 1)], [("ab", 1), ("x", 0), ("abc", 2)], [("", 0)], [("ab", 101), ("abc", 101)],
              [("ab", 1, "#x"), ("ab", 1, "x"), ("ab", 101, "y")]],
    "limits": [{}, {"ab": 1}, {"a": 1}, {"ab": -1, "cd": 2}, {"a": -1}, {"aa": 1, "bb": 1, "cc": 1, "dd": 1}],
    "nickname_same": [None],
    "host": ["", "example.com", "a-b.c", "example.com.", "-a.com", "a-.com", "a..b", "123", "1.2.3.4", "x" * 63 + ".com", "x" * 64 + ".com", "a_b.com", "UPPER.Case", "é.com"],
    "any_ip": ["", "1.2.3.4", "::1", "fe80::1%eth0", "1.2.3", "::ffff:1.2.3.4", "x"],
    "v6": ["", "::1", "2001:db8::1", "1.2.3.4", "2001:db8::1::2", "::ffff:1.2.3.4", "fe80::1%eth0"],
    "server": ["", "1.2.3.4", "255.255.255.255", "256.1.1.1", "01.2.3.4", "1.2.3", "::1"],
    "nickname": [None, "", "n-x", "x"],
    "address": [None, "empty", "bad-zip"],
    "code": ["", "abcd", "abc", "éééé"],
    "token": [b"", b"\x01", b"\x01" * 8, b"\x01" * 9],
    "score": [0.0, 0.0001, 1.0, 1.5, -1.0, float("nan")],
    "contact": [None, "phone", "fax"],
    "quota": [0, 10, 11, 30],
    "country": ["", "fr", "de", "it"],
    "site": ["", "https://example.com/a?b#c", "example.com", "mailto:a@b.c", "http://[::1]:80/", "http://exa mple.com",
             "1http://x", "http://x/%zz", "urn:isbn:0451450523", "http://user@host:8a/", "file:///etc/hosts",
             "http://[fe80::1%25eth0]/", "http://[v1.fe]/"],
    "link": ["", "../a", "/a b", "https://example.com", "?q#f", "//host/p", "a:b", "%", "a/b:c"],
    "addr": ["", "example.com", "1.2.3.4", "::1", "-bad", "a b", "fe80::1%eth0"],
    "endpoint": ["", "example.com:443", "[::1]:80", "1.2.3.4:0", "example.com", "example.com:65536", "example.com:080",
                 "::1:80", "[::1]", "1.2.3.4:65535", ":80"],
    "net": ["", "10.0.0.0/8", "10.0.0.1/8", "::/0", "2001:db8::/32", "2001:db8::1/32", "10.0.0.0/33", "10.0.0.0/08",
            "10.0.0.0", "0.0.0.0/0"],
    "net4": ["", "10.0.0.1/8", "10.0.0.1/32", "10.0.0.1/33", "::1/8", "10.0.0.1", "10.0.0.1/"],
    "net6": ["", "2001:db8::/32", "2001:db8::1/32", "2001:db8::/129", "10.0.0.0/8", "::/0"],
    "alias": ["", "a@b.com", "bad", "a@b@c"],
    "labels": [[], ["a", "b"], ["a", "a"]],
    "gateway": ["", "1.2.3.4", "2001:db8::/32", "::1", "x", "2001:db8::1/32"],
    "ratio": [0.0, float("nan"), float("inf"), float("-inf"), 2.5],
    "greeting": ["", "hi bob", "hi al"],
    "sku": ["", "SKU-1", "SKU-", "sku-1", "x"],
    "motto": ["", "one two", "one two three", "a café\"x b", "café", "ééééééééééé"],
    "lucky": [0, 13, -4, 4, 14],
    "born": [None, (1, 0), (0, 0), (-5, 0), (4102444800, 0), (1700000000, 5)],
    "expires": [None, "now", "now+600", "now-600", "now+7200", "now-7200"],
    # Not 1 ns off: Python's timestamps keep microseconds (protovalidate
    # would find the two equal, CEL and the engine do not).
    "at": [None, (1700000000, 0), (1700000000, 1000), (0, 0)],
    "ttl": [None, (0, 0), (1, 0), (0, 999999999), (59, 999999999), (60, 0), (-1, 0)],
    "step": [None, (5, 0), (0, 500000000), (1, 0)],
    # Python's durations keep microseconds: values a microsecond apart.
    "tick": [None, (0, 62998929), (0, 62999929), (0, 62997000)],
    "gap": [None, (2, 0), (1, 0), (-3, 0), (-2, -500000000), (0, 0)],
    "extra": [None, "Address", "Item", "Reply", ""],
    "other": [None, "Address", "Item"],
    "reach": [None, "none", "pager", "pigeon", "badges", "pager+pigeon", "all", "pager-long"],
    "coupon": [0, 5, "voucher", "both", "voucher-false", "both-false"],
    "stock": [{}, {"a": ("ab", 1)}, {"b": ("x", 0), "c": ("abc", 2)}, {"d": None}, {"e": ("ab", 500, "z")}],
    "mask": [None, [], ["name"], ["address.city"], ["age"], ["name", "namex"]],
    "exact": [None, ["a", "b"], ["b", "a"], ["a"]],
    "lottery": [[], [1, 2], [7], [3, -1]],
    "header": ["", "x-role", ":path", "bad header", "a\x7f", "é"],
    "hval": ["", "ok value", "a\x01b", "a\nb", "a\rb"],
    "hval_strict": ["", "ok value", "a\x01b", "a\tb", "a\x7fb"],
    "web": ["", "example.com:80", "example.com", "https://x.y/z", "/path", "not a host"],
}


def corpus(signup):
    out = [valid_user(signup)]
    for field, values in MUTATIONS.items():
        for v in values:
            u = valid_user(signup)
            if field == "address":
                u.ClearField("address")
                if v == "empty":
                    u.address.SetInParent()
                elif v == "bad-zip":
                    u.address.city, u.address.zip = "X", "123"
            elif field == "contact":
                u.ClearField("contact")
                if v == "phone":
                    u.phone = "1"
                elif v == "fax":
                    u.fax = "2"
            elif field == "nickname_same":
                u.nickname = "n-" + u.name
                u.name = u.nickname
            elif field == "nickname":
                u.ClearField("nickname")
                if v is not None:
                    u.nickname = v
            elif field in ("mask", "exact"):
                u.ClearField(field)
                if v is not None:
                    getattr(u, field).SetInParent()
                    getattr(u, field).paths.extend(v)
            elif field == "stock":
                for k, item in v.items():
                    if item is None:
                        u.stock[k].SetInParent()
                    else:
                        u.stock[k].sku, u.stock[k].qty = item[:2]
                        if len(item) > 2:
                            u.stock[k].note = item[2]
            elif field == "limits":
                for k, n in v.items():
                    u.limits[k] = n
            elif field == "items":
                for item in v:
                    u.items.add(sku=item[0], qty=item[1], note=item[2] if len(item) > 2 else "")
            elif field in ("born", "expires", "at", "ttl", "step", "gap", "tick"):
                if v is None:
                    u.ClearField(field)
                else:
                    if isinstance(v, str):
                        import time as _time
                        offset = int(v[3:] or 0)
                        v = (int(_time.time()) + offset, 0)
                    getattr(u, field).seconds, getattr(u, field).nanos = v
            elif field in ("extra", "other"):
                u.ClearField(field)
                if v is not None:
                    getattr(u, field).type_url = f"type.googleapis.com/signup.{v}" if v else ""
                    getattr(u, field).value = b""
                    if not v:
                        getattr(u, field).SetInParent()
            elif field == "reach":
                u.ClearField("reach")
                if v is not None:
                    u.reach.SetInParent()
                if v in ("pager", "pager+pigeon", "all"):
                    u.reach.pager = "p"
                if v in ("pigeon", "pager+pigeon", "all"):
                    u.reach.pigeon.sku = "ab"
                    u.reach.pigeon.qty = 1
                if v in ("badges", "all"):
                    u.reach.badges.append("b")
                if v == "pager-long":
                    u.reach.pager = "pp"
            elif field == "coupon":
                if isinstance(v, int):
                    u.coupon = v
                if v in ("voucher", "both"):
                    u.voucher = True
                if v == "both":
                    u.coupon = 3
                if v == "voucher-false":
                    u.voucher = False
                if v == "both-false":
                    u.coupon, u.voucher = 5, False
            elif field in ("tags", "scores", "labels", "lottery"):
                del getattr(u, field)[:]
                getattr(u, field).extend(v)
            else:
                setattr(u, field, v)
            out.append(u)
    # A few with several violations at once.
    for a, b in itertools.combinations(["name", "age", "token", "country"], 2):
        u = valid_user(signup)
        setattr(u, a, MUTATIONS[a][1])
        setattr(u, b, MUTATIONS[b][1])
        out.append(u)
    return out


def path_text(field_path):
    parts = []
    for e in field_path.elements:
        part = e.field_name
        if e.HasField("index"):
            part += f"[{e.index}]"
        elif e.HasField("string_key"):
            part += "[" + json.dumps(e.string_key) + "]"
        elif e.HasField("int_key"):
            part += f"[{e.int_key}]"
        parts.append(part)
    return ".".join(parts)


def reference(protovalidate, user):
    try:
        protovalidate.validate(user)
        return set()
    except protovalidate.ValidationError as e:
        return {(path_text(v.proto.field), v.proto.rule_id) for v in e.violations}


def call(port, user, signup, details_pb, violations_pb):
    """(status name, set of (field, rule id), BadRequest fields)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        create = ch.unary_unary(
            "/signup.Signup/Create",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=signup.Reply.FromString,
        )
        try:
            create(user, timeout=10)
            return "OK", set(), set()
        except grpc.RpcError as e:
            status = rpc_status.from_call(e)
            found, bad = set(), set()
            for d in status.details if status else []:
                if d.Is(violations_pb.Violations.DESCRIPTOR):
                    vs = violations_pb.Violations()
                    d.Unpack(vs)
                    found |= {(path_text(v.field), v.rule_id) for v in vs.violations}
                if d.Is(details_pb.BadRequest.DESCRIPTOR):
                    br = details_pb.BadRequest()
                    d.Unpack(br)
                    bad |= {f.field for f in br.field_violations}
            return e.code().name, found, bad


def test_engine_agrees_with_protovalidate_on_a_corpus(engine, modules):
    signup, details_pb, violations_pb, protovalidate = modules
    users = corpus(signup)
    disagreements = []
    invalid = 0
    for user in users:
        want = reference(protovalidate, user)
        code, got, bad = call(engine.port, user, signup, details_pb, violations_pb)
        expected_code = "INVALID_ARGUMENT" if want else "OK"
        invalid += bool(want)
        if code != expected_code or got != want or bad != {f for f, _ in want}:
            disagreements.append(f"{user}: engine {code} {sorted(got)}, protovalidate {sorted(want)}")
    assert invalid >= 30 and len(users) - invalid >= 10, (invalid, len(users))
    assert not disagreements, f"{len(disagreements)} of {len(users)} differ:\n" + "\n".join(disagreements)


def test_a_rule_that_opts_out_answers_an_invalid_request(engine, modules):
    signup, details_pb, violations_pb, _ = modules
    user = valid_user(signup)
    user.name = "x"
    code, _, _ = call(engine.port, user, signup, details_pb, violations_pb)
    assert code == "ALREADY_EXISTS"


def test_validation_off_answers_by_the_rules(tmp_path, modules):
    signup, details_pb, violations_pb, _ = modules
    srv = start(tmp_path, "off")
    try:
        user = valid_user(signup)
        user.age = 3
        assert call(srv.port, user, signup, details_pb, violations_pb)[0] == "OK"
    finally:
        engine_process.stop(srv.proc)


def test_a_client_stream_is_validated_message_by_message(engine, modules):
    signup, details_pb, violations_pb, _ = modules
    with grpc.insecure_channel(f"127.0.0.1:{engine.port}") as ch:
        upload = ch.stream_unary(
            "/signup.Signup/Upload",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=signup.Reply.FromString,
        )
        good = [valid_user(signup) for _ in range(3)]
        assert upload(iter(good), timeout=10).text == "3 users"
        bad = [valid_user(signup) for _ in range(3)]
        bad[1].age = 3
        bad[2].token = b""
        with pytest.raises(grpc.RpcError) as e:
            upload(iter(bad), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(e.value)
        found = set()
        for d in status.details:
            if d.Is(violations_pb.Violations.DESCRIPTOR):
                vs = violations_pb.Violations()
                d.Unpack(vs)
                found |= {(path_text(v.field), v.rule_id) for v in vs.violations}
        assert found == {("age", "int32.gte_lt"), ("token", "bytes.min_len")}


def test_connect_clients_get_the_violations_as_error_details(engine, modules):
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"name": "ab", "email": "a@b", "age": 30, "plan": "PRO", "phone": "1",
                       "address": {"city": "P", "zip": "75001"}, "token": "AQID", "score": 0.5,
                       "quota": 20, "country": "fr"}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{engine.port}/signup.Signup/Create",
        data=body,
        headers={"content-type": "application/json", "connect-protocol-version": "1"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
    error = json.loads(e.value.read())
    assert error["code"] == "invalid_argument"
    assert "name" in error["message"] and "string.min_len" in error["message"]
    types = {d["type"] for d in error.get("details", [])}
    assert types == {"google.rpc.BadRequest", "buf.validate.Violations"}, error


@pytest.mark.parametrize("stack", ["native", "h2"])
def test_metrics_and_the_journal_record_failures_per_field_and_rule(tmp_path, modules, stack):
    import urllib.request

    signup, details_pb, violations_pb, _ = modules
    args = ["run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--validation", "on"]
    args += ["--protos", str(CASE / "protos"), "--rules", str(CASE / "rules"), "--http2", stack, "--journal", "100"]
    proc, port, admin, _ = engine_process.start_with_admin(args, tmp_path)
    try:
        user = valid_user(signup)
        user.age = 3
        for _ in range(2):
            assert call(port, user, signup, details_pb, violations_pb)[0] == "INVALID_ARGUMENT"
        user = valid_user(signup)
        user.tags.append("")
        user.address.zip = "7"
        assert call(port, user, signup, details_pb, violations_pb)[0] == "INVALID_ARGUMENT"
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        line = (
            'wirestub_validation_failures_total{grpc_service="signup.Signup",grpc_method="Create",'
            'field="age",rule="int32.gte_lt"} 2'
        )
        assert line in metrics, metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/journal", timeout=10) as r:
            entries = json.loads(r.read())["entries"]
        assert [e["status"]["name"] for e in entries] == ["INVALID_ARGUMENT"] * 3, entries
        assert [(v["field"], v["rule"]) for v in entries[0]["violations"]] == [("age", "int32.gte_lt")]
        assert [(v["field"], v["rule"]) for v in entries[2]["violations"]] == [
            ("tags[2]", "string.min_len"),
            ("address.zip", "string.len_bytes"),
        ], entries[2]
        assert all(v["message"] for v in entries[2]["violations"])
    finally:
        engine_process.stop(proc)


def test_the_rule_source_picks_the_annotations(tmp_path):
    """tests/cases/validation-pgv has protoc-gen-validate rules only: they
    count under `auto` and `pgv`, not under `protovalidate`."""
    case = REPO_ROOT / "tests" / "cases" / "validation-pgv"
    # Account { owner: "a" }: too short, and more.
    request = b"\x0a\x01a"
    for source, expected in [("auto", "INVALID_ARGUMENT"), ("pgv", "INVALID_ARGUMENT"), ("protovalidate", "OK")]:
        cmd = [str(engine_process.engine_binary()), "run", "--listen", "127.0.0.1:0", "--admin-listen", "off"]
        cmd += ["--protos", str(case / "protos"), "--rules", str(case / "rules"), "--validation", "on"]
        cmd += ["--validation-source", source]
        srv = engine_process.start(cmd, tmp_path / source if (tmp_path / source).mkdir() is None else tmp_path)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                try:
                    ch.unary_unary("/legacy.Accounts/Open")(request, timeout=10)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
            assert code == expected, source
        finally:
            engine_process.stop(srv.proc)


def test_per_message_mode_ends_a_client_stream_at_its_first_invalid_message(tmp_path, modules):
    signup, details_pb, violations_pb, _ = modules
    for stack in ("native", "h2"):
        cmd = [str(engine_process.engine_binary()), "run", "--listen", "127.0.0.1:0", "--admin-listen", "off"]
        cmd += ["--protos", str(CASE / "protos"), "--rules", str(CASE / "rules"), "--validation", "on"]
        cmd += ["--validation-mode", "per-message", "--http2", stack]
        (tmp_path / stack).mkdir()
        srv = engine_process.start(cmd, tmp_path / stack)
        sent = []

        def messages():
            # An invalid message, then more that the engine need not read:
            # the call ends before the client finishes.
            bad = valid_user(signup)
            bad.age = 1
            sent.append(1)
            yield bad
            import time as _t

            for _ in range(50):
                _t.sleep(0.05)
                sent.append(1)
                yield valid_user(signup)

        try:
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                upload = ch.stream_unary(
                    "/signup.Signup/Upload",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=signup.Reply.FromString,
                )
                with pytest.raises(grpc.RpcError) as e:
                    upload(messages(), timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, stack
                assert "int32.gte_lt" in e.value.details()
                assert len(sent) < 50, f"{stack}: the call waited for the whole stream"
        finally:
            engine_process.stop(srv.proc)


def test_validation_per_service_from_the_flags_and_the_configuration_file(tmp_path, modules):
    """One engine serves signup.Signup (protovalidate rules) and
    legacy.Accounts (protoc-gen-validate rules): --validation-for turns
    validation on or off for one service over --validation, on the command
    line and as a list in the configuration file; a bad entry is an error
    naming the file and line."""
    signup, details_pb, violations_pb, _ = modules
    pgv = REPO_ROOT / "tests" / "cases" / "validation-pgv"
    user = valid_user(signup)
    user.age = 3

    def codes(*flags, config=None):
        cmd = [str(engine_process.engine_binary()), "run", "--listen", "127.0.0.1:0", "--admin-listen", "off"]
        cmd += ["--protos", str(CASE / "protos"), "--rules", str(CASE / "rules")]
        cmd += ["--protos", str(pgv / "protos"), "--rules", str(pgv / "rules"), *flags]
        if config is not None:
            path = tmp_path / "wirestub.yaml"
            path.write_text(config)
            cmd += ["--config", str(path)]
        log_dir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        log_dir.mkdir()
        srv = engine_process.start(cmd, log_dir)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                try:
                    ch.unary_unary("/legacy.Accounts/Open")(b"\x0a\x01a", timeout=10)
                    legacy = "OK"
                except grpc.RpcError as e:
                    legacy = e.code().name
            return call(srv.port, user, signup, details_pb, violations_pb)[0], legacy
        finally:
            engine_process.stop(srv.proc)

    assert codes("--validation", "on") == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert codes("--validation-for", "signup.Signup=on") == ("INVALID_ARGUMENT", "OK")
    assert codes("--validation", "on", "--validation-for", "legacy.Accounts=off") == ("INVALID_ARGUMENT", "OK")
    config = "validation: \"on\"\nvalidation-for:\n  - signup.Signup=off\n"
    assert codes(config=config) == ("OK", "INVALID_ARGUMENT")
    # The command line wins over the file, as for every flag.
    assert codes("--validation-for", "legacy.Accounts=off", config=config) == ("INVALID_ARGUMENT", "OK")

    bad = tmp_path / "bad.yaml"
    bad.write_text("validation-for:\n  - signup.Signup=maybe\n")
    import subprocess

    r = subprocess.run(
        [str(engine_process.engine_binary()), "run", "--listen", "127.0.0.1:0", "--config", str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    assert "bad.yaml" in r.stderr and "SERVICE=on|off" in r.stderr and "signup.Signup=maybe" in r.stderr, r.stderr


def test_connect_node_reads_the_violations_on_every_protocol(engine, modules, node, node_modules, tmp_path):
    """@connectrpc/connect-node (tests/node/validation.mjs) sends one invalid
    request over Connect (proto and JSON), gRPC-Web and gRPC, on HTTP/1.1
    and HTTP/2, and finds in its ConnectError, with `findDetails`, the
    google.rpc.BadRequest and buf.validate.Violations details: the same
    field paths and rule ids as protovalidate's, on every transport."""
    import subprocess

    from google.protobuf import json_format
    from grpc_tools import protoc

    signup, _, _, protovalidate = modules
    descriptors = tmp_path / "signup.binpb"
    wkt = importlib.resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{CASE / 'protos'}", f"-I{BUILTIN}", f"-I{wkt}", "--include_imports"]
    args += [f"--descriptor_set_out={descriptors}", "signup.proto", "google/rpc/error_details.proto"]
    assert protoc.main(args) == 0
    user = valid_user(signup)
    user.age = 3
    user.tags.append("")
    user.address.zip = "7"
    want = reference(protovalidate, user)
    assert len(want) >= 3, want
    run = subprocess.run(
        [node, str(REPO_ROOT / "tests" / "node" / "validation.mjs"), str(descriptors), json_format.MessageToJson(user)],
        cwd=REPO_ROOT / "tests" / "node",
        env={"WIRESTUB_ADDR": f"127.0.0.1:{engine.port}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(seen) == 6, run.stdout
    for s in seen:
        assert s["code"] == "InvalidArgument", s
        assert {tuple(v) for v in s["violations"]} == want, s
        assert set(s["badRequest"]) == {f for f, _ in want}, s
        assert "int32.gte_lt" in s["message"], s
