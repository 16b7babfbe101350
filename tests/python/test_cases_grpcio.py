"""The data-driven cases of tests/cases/, replayed with grpcio.

Each case's `calls.yaml` lists calls and the answers expected (the same
files `tests/e2e.rs` replays with the Rust client). Here every call goes
through grpcio against the engine serving the case's protos and rules;
requests and expected bodies are read as the method's message types from a
descriptor set protoc writes, so answers compare as messages.
"""

import importlib.resources
from pathlib import Path

import engine_process
import grpc
import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

REPO_ROOT = Path(__file__).resolve().parents[2]
CASES = REPO_ROOT / "tests" / "cases"
# The protos the compiler has built in (google/rpc/*, ...).
BUILTIN_PROTOS = REPO_ROOT / "compiler" / "src" / "builtin"
# Every case; calls with inputs only the Rust client sends (hand-made bytes)
# or details compared as JSON are left to tests/e2e.rs.
GRPCIO_CASES = sorted(p.name for p in CASES.iterdir() if p.is_dir())


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans, as the compiler reads them: `yes` and `on` are
    text (a field may be called `yes`)."""


Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
for first in "tTfF":
    Yaml12Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", __import__("re").compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), [first]
    )


def descriptor_set(protos: Path, out: Path) -> descriptor_pool.DescriptorPool:
    from grpc_tools import protoc

    wkt = importlib.resources.files("grpc_tools") / "_proto"
    files = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    # Details in bodies (google.protobuf.Any) name these types.
    files += ["google/rpc/error_details.proto"]
    target = out / "set.pb"
    args = ["protoc", f"-I{protos}", f"-I{BUILTIN_PROTOS}", f"-I{wkt}", "--include_imports", f"--descriptor_set_out={target}", *files]
    assert protoc.main(args) == 0, f"protoc failed: {' '.join(args)}"
    fds = descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    return pool


@pytest.mark.parametrize("case", GRPCIO_CASES)
def test_case_with_grpcio(case, tmp_path):
    case_dir = CASES / case
    source = case_dir if (case_dir / "protos").is_dir() else REPO_ROOT
    spec = yaml.load((case_dir / "calls.yaml").read_text(), Loader=Yaml12Loader)
    pool = descriptor_set(source / "protos", tmp_path)
    cmd = [str(engine_process.engine_binary()), "run", "--listen", "127.0.0.1:0", "--admin-listen", "off"]
    cmd += ["--protos", str(source / "protos"), "--rules", str(source / "rules")]
    if spec.get("no_match") == "empty-ok":
        cmd += ["--no-match", "empty-ok"]
    if spec.get("validation") == "on":
        cmd += ["--validation", "on"]
    srv = engine_process.start(cmd, tmp_path)
    failures = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            for call in spec["calls"]:
                if "request_hex" in call or "details" in call.get("expect", {}):
                    continue
                problems = run_call(channel, pool, call)
                if problems:
                    failures.append(f"{call['name']}:\n  " + "\n  ".join(problems))
    finally:
        engine_process.stop(srv.proc)
    assert not failures, f"{len(failures)} of {len(spec['calls'])} calls failed:\n" + "\n".join(failures)


def run_call(channel, pool, call) -> list[str]:
    service, name = call["method"].split("/")
    method = pool.FindServiceByName(service).methods_by_name[name]
    request_class = message_factory.GetMessageClass(method.input_type)
    reply_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{service}/{name}"
    args = dict(
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=reply_class.FromString,
    )
    requests = [json_format.ParseDict(r or {}, request_class(), descriptor_pool=pool) for r in call.get("requests", [call.get("request")])]
    metadata = [(k, str(v)) for k, v in (call.get("metadata") or {}).items()]
    timeout = call.get("timeout_ms", 10_000) / 1000
    bodies, code, message, headers, trailers = [], grpc.StatusCode.OK, "", [], []
    try:
        if method.server_streaming:
            if method.client_streaming:
                it = channel.stream_stream(path, **args)(iter(requests), metadata=metadata, timeout=timeout)
            else:
                it = channel.unary_stream(path, **args)(requests[0], metadata=metadata, timeout=timeout)
            # Replies before an error count too.
            for reply in it:
                bodies.append(reply)
            headers, trailers = it.initial_metadata(), it.trailing_metadata()
        elif method.client_streaming:
            reply, c = channel.stream_unary(path, **args).with_call(iter(requests), metadata=metadata, timeout=timeout)
            bodies, headers, trailers = [reply], c.initial_metadata(), c.trailing_metadata()
        else:
            reply, c = channel.unary_unary(path, **args).with_call(requests[0], metadata=metadata, timeout=timeout)
            bodies, headers, trailers = [reply], c.initial_metadata(), c.trailing_metadata()
    except grpc.RpcError as e:
        code, message = e.code(), e.details() or ""
        headers, trailers = e.initial_metadata() or [], e.trailing_metadata() or []
    expect = call.get("expect", {})
    problems = []
    want_status = expect.get("status", "OK")
    if code.name != want_status:
        problems.append(f"status {code.name} ({message!r}), expected {want_status}")
    if "message" in expect and message != expect["message"]:
        problems.append(f"message {message!r}, expected {expect['message']!r}")
    if "body" in expect:
        want = json_format.ParseDict(expect["body"], reply_class(), descriptor_pool=pool)
        if bodies != [want]:
            problems.append(f"body {[str(b) for b in bodies]}, expected {want}")
    if "bodies" in expect:
        want = [json_format.ParseDict(b, reply_class(), descriptor_pool=pool) for b in expect["bodies"]]
        got = bodies
        if expect.get("any_order"):
            got = sorted(got, key=lambda m: m.SerializeToString(deterministic=True))
            want = sorted(want, key=lambda m: m.SerializeToString(deterministic=True))
        if got != want:
            problems.append(f"stream {[str(b) for b in bodies]}, expected {[str(w) for w in want]}")
    seen = [(k, v) for k, v in list(headers or []) + list(trailers or [])]
    for k, v in (expect.get("metadata") or {}).items():
        if (k, str(v)) not in seen:
            problems.append(f"metadata {k}: {v} missing from {seen}")
    return problems
