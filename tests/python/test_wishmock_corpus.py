"""Wishmock's own example tree (tests/corpus/wishmock: its protos, with the
google, validate and other files it vendors, and its rules/grpc) served
as Wishmock users have it.

The tree compiles under `--lenient` with the warnings Wishmock's
behaviour implies (a .proto defining names another already defines, a
rule file named after no method, a `when` on a field the message lacks),
one listing the validation rules not checked yet, and no error. Then every unary method is probed with requests derived from
its rules' `when` clauses (and the document's `match` gate), and each
answer is compared with the one Wishmock's documented selection gives:
among the `when` entries that hold, the highest priority (the earlier on
ties); else the highest-priority fallback; the gate, when it fails, leaves
only the fallbacks. The oracle below evaluates the conditions itself, from
the rule files and the message types protoc reads from the same protos.
"""

import importlib.resources
import re
import subprocess
import sys
from pathlib import Path

import engine_process
import grpc
import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor

from test_cases_grpcio import Yaml12Loader

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS = REPO_ROOT / "tests" / "corpus" / "wishmock"
PROTOS = CORPUS / "protos"
RULES = CORPUS / "rules"
# What the compiler leaves out of this tree, each a warning: (file, text).
EXPECTED_WARNINGS = [
    ("validation_examples_client.proto", "already defined"),
    ("helloworld.greeter.bufmessageoneofcheck.yaml", "unknown field `e`"),
    ("streaming.streamservice.getmessages.error.yaml", "does not name a method"),
    ("streaming.streamservice.realtimedata.yaml", "does not name a method"),
    # Its validation annotations use rules not checked yet (one warning).
    ("", "validation rule(s) are not enforced yet"),
]


def pool_of_tree(out: Path) -> descriptor_pool.DescriptorPool:
    """Every file of the tree protoc compiles, leaving out those it refuses
    (as Wishmock does)."""
    wkt = importlib.resources.files("grpc_tools") / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    target = out / "set.pb"
    for _ in range(len(files)):
        args = ["protoc", f"-I{PROTOS}", f"-I{wkt}", "--include_imports", f"--descriptor_set_out={target}", *files]
        # In a child process: protoc reports on the process's stderr.
        code = "import sys; from grpc_tools import protoc; sys.exit(protoc.main(sys.argv[1:]))"
        run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        if run.returncode == 0:
            break
        named = {m.group(1) for m in re.finditer(r"^([\w/.-]+\.proto):\d+", run.stderr, re.M)}
        bad = {str(Path(n).relative_to(PROTOS)) if Path(n).is_absolute() else n for n in named}
        assert bad & set(files), run.stderr
        files = [f for f in files if f not in bad]
    fds = descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    return pool


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wishmock")
    cmd = [str(engine_process.engine_binary()), "run", "--listen", "127.0.0.1:0", "--admin-listen", "off"]
    cmd += ["--lenient", "--protos", str(PROTOS), "--rules", str(RULES)]
    srv = engine_process.start(cmd, tmp)
    yield srv, pool_of_tree(tmp)
    engine_process.stop(srv.proc)


def test_the_tree_compiles_under_lenient_with_only_the_expected_warnings(tmp_path):
    compiler = engine_process.engine_binary().with_name("compiler")
    run = subprocess.run(
        [str(compiler), "build", "--lenient", "--protos", str(PROTOS), "--rules", str(RULES), "-o", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    warnings = [w for w in run.stderr.split("\n\n") if w.startswith("warning:")]
    assert len(warnings) == len(EXPECTED_WARNINGS), run.stderr
    for file, text in EXPECTED_WARNINGS:
        assert any(file in w and text in w for w in warnings), (file, run.stderr)


# --------------------------------------------------------------------------
# The oracle: Wishmock's selection, from the rule files
# --------------------------------------------------------------------------

MISSING = object()


def field_at(desc, path):
    """The field a dotted path names, or None."""
    field = None
    for seg in path.split("."):
        if desc is None:
            return None
        field = desc.fields_by_name.get(seg) or next((f for f in desc.fields if f.json_name == seg), None)
        if field is None:
            return None
        desc = field.message_type
    return field


def default_of(field):
    if field.is_repeated:
        return []
    if field.type == FieldDescriptor.TYPE_STRING or field.type == FieldDescriptor.TYPE_BYTES:
        return ""
    if field.type == FieldDescriptor.TYPE_BOOL:
        return False
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return MISSING
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[0].name
    return 0


def satisfying(op, field):
    """A value for which the condition holds, or MISSING."""
    if not isinstance(op, dict):
        return op
    if field is None or field.type == FieldDescriptor.TYPE_MESSAGE:
        return MISSING
    repeated = field.is_repeated
    for name, v in op.items():
        value = {
            "eq": v,
            "in": (v or [MISSING])[0] if isinstance(v, list) else MISSING,
            "contains": v,
            "gt": v + 1 if isinstance(v, (int, float)) else MISSING,
            "gte": v,
            "lt": v - 1 if isinstance(v, (int, float)) else MISSING,
            "lte": v,
            "prefix": v,
            "suffix": v,
            "exists": ("x" if field.type == FieldDescriptor.TYPE_STRING else 1) if v is True else MISSING,
        }.get(name, MISSING)
        if value is not MISSING:
            return [value] if repeated and name in ("contains", "exists") else value
    return MISSING


def holds(op, value, present):
    if not isinstance(op, dict):
        return value == op
    for name, v in op.items():
        ok = {
            "eq": lambda: value == v,
            "ne": lambda: value != v,
            "in": lambda: value in v,
            "exists": lambda: present == v,
            "contains": lambda: isinstance(value, (str, list)) and v in value,
            "gt": lambda: isinstance(value, (int, float)) and value > v,
            "gte": lambda: isinstance(value, (int, float)) and value >= v,
            "lt": lambda: isinstance(value, (int, float)) and value < v,
            "lte": lambda: isinstance(value, (int, float)) and value <= v,
            "prefix": lambda: isinstance(value, str) and value.startswith(v),
            "suffix": lambda: isinstance(value, str) and value.endswith(v),
            "regex": lambda: isinstance(value, str) and re.search(v, value) is not None,
        }.get(name)
        if ok is None or not ok():
            return False
    return True


class Probe:
    def __init__(self):
        self.request = {}  # dotted path -> value
        self.metadata = {}

    def set(self, key, value):
        if key.startswith("metadata."):
            self.metadata[key[len("metadata.") :].lower()] = str(value)
        else:
            self.request[key.removeprefix("request.")] = value

    def read(self, key, desc):
        """(value, present) as a rule reads it."""
        if key.startswith("metadata."):
            v = self.metadata.get(key[len("metadata.") :].lower(), MISSING)
            return ("" if v is MISSING else v), v is not MISSING
        path = key.removeprefix("request.")
        v = self.request.get(path, MISSING)
        field = field_at(desc, path)
        if v is MISSING:
            return (default_of(field) if field else MISSING), False
        return v, True

    def message(self, cls):
        nested = {}
        for path, v in self.request.items():
            *parents, last = path.split(".")
            at = nested
            for p in parents:
                at = at.setdefault(p, {})
            at[last] = v
        return json_format.ParseDict(nested, cls())


def conditions_hold(conds, probe, desc):
    return all(holds(op, *probe.read(k, desc)) for k, op in conds.items())


def gate_of(doc):
    gate = {}
    for k, v in ((doc.get("match") or {}).get("request") or {}).items():
        gate[f"request.{k}"] = v
    for k, v in ((doc.get("match") or {}).get("metadata") or {}).items():
        gate[f"metadata.{k}"] = v
    return gate


def expected(doc, probe, desc):
    """The entry Wishmock answers the probe with, or None for no match."""
    entries = doc.get("responses") or []
    gate = conditions_hold(gate_of(doc), probe, desc)
    best = None
    if gate:
        for e in entries:
            if e.get("when") and conditions_hold(e["when"], probe, desc):
                if best is None or e.get("priority", 0) > best.get("priority", 0):
                    best = e
    if best is None:
        for e in entries:
            if not e.get("when") and (best is None or e.get("priority", 0) > best.get("priority", 0)):
                best = e
    return best


def probes_of(doc, desc):
    """A probe per `when` entry satisfying the gate and the entry, one
    satisfying the entry alone (when there is a gate), and an empty one."""
    out = [Probe()]
    gate = gate_of(doc)
    for e in doc.get("responses") or []:
        when = e.get("when") or {}
        if not when:
            continue
        for with_gate in ([True, False] if gate else [True]):
            p = Probe()
            conds = {**(gate if with_gate else {}), **when}
            usable = True
            for k, op in conds.items():
                field = None if k.startswith("metadata.") else field_at(desc, k.removeprefix("request."))
                if not k.startswith("metadata.") and field is None:
                    usable = False
                    break
                v = satisfying(op, field) if field or not isinstance(op, dict) else satisfying(op, None)
                if k.startswith("metadata.") and isinstance(op, dict):
                    v = (op.get("in") or [op.get("eq", MISSING)])[0] if ("in" in op or "eq" in op) else MISSING
                if v is MISSING:
                    usable = False
                    break
                p.set(k, v)
            if usable:
                out.append(p)
    return out


def rule_documents(pool):
    """(document, method descriptor) of every rule file naming a unary
    method, as Wishmock reads them."""
    methods = {}
    for path in sorted(RULES.rglob("*.yaml")):
        doc = yaml.load(path.read_text(), Loader=Yaml12Loader)
        stem = path.name[: -len(".yaml")]
        parts = stem.split(".")
        method = None
        for cut in range(len(parts) - 2, 0, -1):
            pkg, service, name = ".".join(parts[:cut]), parts[cut], ".".join(parts[cut + 1 :])
            svc = find_service(pool, pkg, service)
            if svc:
                method = next((m for m in svc.methods if m.name.lower() == name.lower()), None)
                break
        methods[path.name] = (doc, method)
    return methods


def find_service(pool, pkg, service):
    for name in (f"{pkg}.{service}",):
        try:
            return pool.FindServiceByName(name)
        except KeyError:
            pass
    # Wishmock matches names case-insensitively.
    for fd_name in SERVICE_FILES:
        try:
            fd = pool.FindFileByName(fd_name)
        except KeyError:
            continue
        for s in fd.services_by_name.values():
            if s.full_name.lower() == f"{pkg}.{service}".lower():
                return s
    return None


SERVICE_FILES = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def wishmock_json(value, desc):
    """A body as Wishmock writes it, in the protobuf JSON mapping: the
    well-known types it writes field by field (`{seconds, nanos}`,
    `{value}`, `{paths}`) in their JSON forms."""
    from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

    name = desc.full_name
    if isinstance(value, dict) and name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        cls = timestamp_pb2.Timestamp if name.endswith("Timestamp") else duration_pb2.Duration
        return cls(seconds=int(value.get("seconds", 0)), nanos=int(value.get("nanos", 0))).ToJsonString()
    if isinstance(value, dict) and name == "google.protobuf.FieldMask":
        return field_mask_pb2.FieldMask(paths=value.get("paths", [])).ToJsonString()
    if isinstance(value, dict) and name.startswith("google.protobuf.") and name.endswith("Value") and set(value) <= {"value"}:
        return value.get("value")
    if not isinstance(value, dict) or name.startswith("google.protobuf."):
        return value
    out = {}
    for k, v in value.items():
        field = desc.fields_by_name.get(k) or next((f for f in desc.fields if f.json_name == k), None)
        if field is not None and field.message_type is not None and not field.message_type.GetOptions().map_entry:
            v = [wishmock_json(x, field.message_type) for x in v] if isinstance(v, list) else wishmock_json(v, field.message_type)
        out[k] = v
    return out


def test_unary_probes_answer_as_wishmock_selects(corpus):
    srv, pool = corpus
    docs = rule_documents(pool)
    checked, failures = 0, []
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        for file, (doc, method) in docs.items():
            if method is None or method.client_streaming or method.server_streaming:
                continue
            desc = method.input_type
            req_cls = message_factory.GetMessageClass(desc)
            reply_cls = message_factory.GetMessageClass(method.output_type)
            path = f"/{method.containing_service.full_name}/{method.name}"
            call = channel.unary_unary(
                path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=reply_cls.FromString
            )
            for probe in probes_of(doc, desc):
                entry = expected(doc, probe, desc)
                want_body, want_code = None, "NOT_FOUND"
                if entry is not None:
                    if "{{" in repr(entry.get("body")):
                        continue
                    status = (entry.get("trailers") or {}).get("grpc-status", 0)
                    code = grpc.StatusCode.OK
                    if str(status).isdigit():
                        code = next(c for c in grpc.StatusCode if c.value[0] == int(status))
                    else:
                        code = grpc.StatusCode[str(status).upper()]
                    want_code = code.name
                    if code == grpc.StatusCode.OK:
                        want_body = json_format.ParseDict(
                            wishmock_json(entry.get("body") or {}, method.output_type), reply_cls(), descriptor_pool=pool
                        )
                label = f"{file} {probe.request} {probe.metadata}"
                try:
                    request = probe.message(req_cls)
                except json_format.ParseError as e:
                    failures.append(f"{label}: probe does not fit the message: {e}")
                    continue
                checked += 1
                try:
                    reply = call(request, metadata=list(probe.metadata.items()), timeout=10)
                    got_code = "OK"
                except grpc.RpcError as e:
                    reply, got_code = None, e.code().name
                if got_code != want_code or (want_body is not None and reply != want_body):
                    failures.append(f"{label}: got {got_code} {reply}, Wishmock answers {want_code} {want_body}")
    print(f"{checked} probes checked")
    assert checked >= 20, checked
    assert not failures, f"{len(failures)} of {checked} probes differ:\n" + "\n".join(failures)
