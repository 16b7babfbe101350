#!/usr/bin/env python3
"""End-to-end load bench: the wirestub engine against the tonic baseline.

One command, standard library only:

    python3 benches/load.py            # full run (3 cells, 2 layouts, repeats)
    python3 benches/load.py --quick    # 16x10 only, 1 repeat, ~1 minute

What it does, following shared/guides/performance.md:
  1. builds the engine, the compiler and the baseline in release mode
     (`cargo build --release ...`, honouring CARGO_TARGET_DIR) and compiles
     the example plan from protos/ and rules/ with the compiler;
  2. writes the gRPC request body (5-byte prefix + protobuf bytes, encoded by
     hand) for helloworld.Greeter/SayHello {name: "Tom"};
  3. checks correctness with a real HTTP/2 client before timing anything:
     `nghttp` (same Debian package as h2load) must see grpc-status 0 and the
     expected reply bytes; grpcio is used as well when it is importable;
  4. runs h2load against each server in turn (engine, baseline, engine,
     baseline, ...) after a warm-up run, in two layouts: "pinned" (server on
     CPU 0 with --workers 1, h2load on CPU 1, both via taskset) and "shared"
     (nothing pinned, --workers 2);
  5. measures server CPU per request: utime+stime from /proc/PID/stat,
     sampled when h2load announces the start and the end of its measurement
     window (so its warm-up is excluded), divided by the succeeded requests;
  6. prints a markdown report with medians, ranges and engine/baseline ratios
     and writes it to benches/results/latest.md (raw runs in latest.json).

h2load 1.52 prints no latency percentiles, so latency is reported as the mean
and the max of its "time for request" line. h2load counts any HTTP 200 as a
success even when grpc-status says otherwise; hence the correctness check
with nghttp before and after the timed runs.

Servers listen on 127.0.0.1 only, every h2load run is bounded by -D and a
subprocess timeout, and every server started here is stopped at the end, on
error too. Nothing is installed by this script: it fails with a clear message
when h2load is missing (Debian package nghttp2-client).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benches" / "results"
LISTENING = re.compile(r"listening on (\S+):(\d+)\s*$")
CLK_TCK = os.sysconf("SC_CLK_TCK")

FULL_CELLS = [(1, 1), (16, 10), (64, 100)]
QUICK_CELLS = [(16, 10)]


class BenchError(Exception):
    """A failure that makes the bench meaningless; reported, exit code 1."""


def say(msg: str) -> None:
    print(f"[load] {msg}", flush=True)


# --------------------------------------------------------------------------
# Protobuf and gRPC framing, by hand
# --------------------------------------------------------------------------


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_bytes(field_no: int, data: bytes) -> bytes:
    return varint(field_no << 3 | 2) + varint(len(data)) + data


def pb_string(field_no: int, text: str) -> bytes:
    return pb_bytes(field_no, text.encode())


def pb_varint(field_no: int, value: int) -> bytes:
    return varint(field_no << 3) + varint(value)


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def pb_fields(buf: bytes) -> list[tuple[int, int, object]]:
    """Top-level (field, wire type, value) triples, sorted, for comparison
    independent of the order in which an encoder emits fields."""
    out = []
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        out.append((field_no, wire, value))
    return sorted(out, key=lambda t: (t[0], t[1]))


def grpc_messages(body: bytes) -> list[bytes]:
    msgs = []
    pos = 0
    while pos < len(body):
        if pos + 5 > len(body):
            raise ValueError("truncated gRPC frame prefix")
        if body[pos] != 0:
            raise ValueError("compressed gRPC frame")
        n = int.from_bytes(body[pos + 1 : pos + 5], "big")
        msgs.append(body[pos + 5 : pos + 5 + n])
        pos += 5 + n
    if pos != len(body):
        raise ValueError("truncated gRPC message")
    return msgs


@dataclass
class Workload:
    name: str
    path: str
    request: bytes
    reply: bytes


WORKLOADS = {
    "hello": Workload(
        name='SayHello {name: "Tom"} (field-matched rule)',
        path="/helloworld.Greeter/SayHello",
        request=pb_string(1, "Tom"),
        reply=pb_string(1, "Hi Tom (from mock)"),
    ),
    "product": Workload(
        name='GetProduct {sku: "X"} (fallback behind a failed match gate)',
        path="/shop.v1.Catalog/GetProduct",
        request=pb_string(1, "X"),
        reply=pb_string(1, "UNKNOWN") + pb_string(2, "Mystery box") + pb_varint(3, 2),
    ),
}


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    say("+ " + " ".join(cmd))
    try:
        return subprocess.run(cmd, cwd=ROOT, timeout=timeout, check=True, **kwargs)
    except subprocess.CalledProcessError as e:
        raise BenchError(f"command failed with exit code {e.returncode}: {' '.join(cmd)}") from e
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"command timed out after {timeout:.0f}s: {' '.join(cmd)}") from e


class Server:
    """A server process started here, with the port it printed."""

    def __init__(self, name: str, cmd: list[str], cpus: str | None, log_dir: Path):
        self.name = name
        full = (["taskset", "-c", cpus] if cpus else []) + cmd
        self.log_path = log_dir / f"{name}-{int(time.time() * 1000)}.log"
        say(f"starting {name}: {' '.join(full)}")
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C on the driver reaches the servers only
            # through stop(), which then waits for them properly.
            self.proc = subprocess.Popen(
                full,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        SERVERS.append(self)
        self.port = self._wait_for_port(timeout=60)
        say(f"{name} listening on 127.0.0.1:{self.port} (pid {self.proc.pid})")

    def _wait_for_port(self, timeout: float) -> int:
        found: dict[str, int] = {}
        first: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:  # keeps draining so the pipe never fills
                if not ready.is_set():
                    first.append(line)
                    m = LISTENING.search(line)
                    if m:
                        found["port"] = int(m.group(2))
                        ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(timeout)
        if "port" not in found:
            self.stop()
            raise BenchError(
                f"{self.name} printed no `listening on` line within {timeout:.0f}s "
                f"(exit code {self.proc.returncode}); stdout: {''.join(first)!r}; "
                f"stderr tail:\n{self.log_tail()}"
            )
        return found["port"]

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_ticks(self) -> int:
        """utime + stime of the whole process, in clock ticks."""
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        rest = stat[stat.rindex(")") + 2 :].split()
        return int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5)

    def memory_kib(self) -> dict[str, int]:
        out = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        out[key] = int(value.split()[0])
        except OSError:
            pass
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        if self in SERVERS:
            SERVERS.remove(self)


SERVERS: list[Server] = []


def stop_all_servers() -> None:
    for srv in list(SERVERS):
        try:
            srv.stop()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"[load] could not stop {srv.name} (pid {srv.pid}): {e}", file=sys.stderr)


# --------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------


def check_server(srv: Server, wl: Workload, body_file: Path) -> list[str]:
    """Verifies one real response; returns notes, raises BenchError on failure."""
    url = f"http://127.0.0.1:{srv.port}{wl.path}"
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    notes = []
    # 1. nghttp: the reply bytes.
    out = subprocess.run(
        ["nghttp", "-d", str(body_file), *headers, url],
        capture_output=True,
        timeout=15,
    )
    if out.returncode != 0:
        raise BenchError(f"{srv.name}: nghttp failed ({out.returncode}): {out.stderr.decode(errors='replace')}")
    try:
        msgs = grpc_messages(out.stdout)
    except ValueError as e:
        raise BenchError(f"{srv.name}: bad gRPC body {out.stdout!r}: {e}") from e
    if len(msgs) != 1 or pb_fields(msgs[0]) != pb_fields(wl.reply):
        raise BenchError(f"{srv.name}: unexpected reply {out.stdout!r}, expected {grpc_frame(wl.reply)!r}")
    # 2. nghttp -v: the status headers and trailers.
    out = subprocess.run(
        ["nghttp", "-v", "-n", "-d", str(body_file), *headers, url],
        capture_output=True,
        text=True,
        timeout=15,
    )
    status = re.findall(r"recv \(stream_id=\d+\) :status: (\d+)", out.stdout)
    grpc_status = re.findall(r"recv \(stream_id=\d+\) grpc-status: (\d+)", out.stdout)
    if status != ["200"] or grpc_status != ["0"]:
        raise BenchError(
            f"{srv.name}: expected :status 200 and grpc-status 0, got {status} / {grpc_status}"
        )
    notes.append(f"{srv.name}: nghttp saw :status 200, grpc-status 0 and the expected reply")
    # 3. grpcio, when this interpreter has it.
    try:
        import grpc  # type: ignore[import-not-found]
    except ImportError:
        notes.append(f"{srv.name}: grpcio not importable here, grpcio check skipped")
        return notes
    with grpc.insecure_channel(
        f"127.0.0.1:{srv.port}", options=[("grpc.enable_http_proxy", 0)]
    ) as ch:
        call = ch.unary_unary(wl.path)  # no serializers: raw bytes in and out
        try:
            reply = call(wl.request, timeout=10)
        except grpc.RpcError as e:
            raise BenchError(f"{srv.name}: grpcio call failed: {e.code()} {e.details()}") from e
    if pb_fields(reply) != pb_fields(wl.reply):
        raise BenchError(f"{srv.name}: grpcio got {reply!r}, expected {wl.reply!r}")
    notes.append(f"{srv.name}: grpcio got the expected reply")
    return notes


# --------------------------------------------------------------------------
# h2load
# --------------------------------------------------------------------------


@dataclass
class RunResult:
    layout: str
    cell: str
    server: str
    repeat: int
    rps: float
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    cpu_s: float
    cpu_us_per_req: float | None
    lat_mean_us: float | None
    lat_max_us: float | None
    window_s: float


UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * UNITS[m.group(2)]


def h2load(
    srv: Server,
    wl: Workload,
    body_file: Path,
    conns: int,
    streams: int,
    duration: int,
    warmup: int,
    cpus: str | None,
) -> tuple[dict, str]:
    """One bounded h2load run; returns parsed figures and the raw output."""
    cmd = (["taskset", "-c", cpus] if cpus else []) + [
        "h2load",
        f"http://127.0.0.1:{srv.port}{wl.path}",
        "-d", str(body_file),
        "-H", "content-type: application/grpc",
        "-H", "te: trailers",
        "-c", str(conns),
        "-m", str(streams),
        "-t", "1",
        "-D", str(int(duration)),
        "--warm-up-time", str(int(warmup)),
    ]  # fmt: skip
    limit = duration + warmup + 30
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    killed = threading.Event()

    def watchdog() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(limit, watchdog)
    timer.start()
    lines = []
    cpu0 = cpu1 = t0 = t1 = None
    start_ticks = srv.cpu_ticks()
    start_time = time.monotonic()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            # h2load flushes these lines as the events happen: sample the
            # server's CPU exactly over the measurement window.
            if "Main benchmark duration is started" in line and cpu0 is None:
                cpu0, t0 = srv.cpu_ticks(), time.monotonic()
            elif "Main benchmark duration is over" in line and cpu1 is None:
                cpu1, t1 = srv.cpu_ticks(), time.monotonic()
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    if killed.is_set():
        raise BenchError(f"h2load killed after {limit:.0f}s:\n{output[-2000:]}")
    if rc != 0:
        raise BenchError(f"h2load exited with {rc}:\n{output[-2000:]}")
    if cpu0 is None or cpu1 is None:  # older h2load: whole run, warm-up included
        cpu0, t0 = start_ticks, start_time
        cpu1, t1 = srv.cpu_ticks(), time.monotonic()
    fig = parse_h2load(output)
    fig["cpu_s"] = (cpu1 - cpu0) / CLK_TCK
    fig["window_s"] = t1 - t0
    return fig, output


def parse_h2load(output: str) -> dict:
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    r = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        output,
    )
    if not m or not r:
        raise BenchError(f"cannot parse h2load output:\n{output[-2000:]}")
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", output)
    fig = {
        "rps": float(m.group(1)),
        "done": int(r.group(3)),
        "succeeded": int(r.group(4)),
        "failed": int(r.group(5)),
        "errored": int(r.group(6)),
        "timeout": int(r.group(7)),
        "lat_mean_us": None,
        "lat_max_us": None,
    }
    if lat:
        try:
            fig["lat_max_us"] = to_us(lat.group(2))
            fig["lat_mean_us"] = to_us(lat.group(3))
        except ValueError:
            pass
    return fig


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def fmt_num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fmt_us(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 1e6:
        return f"{v / 1e6:.2f} s"
    if v >= 1e3:
        return f"{v / 1e3:.2f} ms"
    return f"{v:.0f} µs"


def spread(values: list[float | None], fmt) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(vals))}–{fmt(max(vals))})"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def build_report(meta: dict, runs: list[RunResult], notes: list[str], memory: list[str]) -> str:
    lines = [
        "# End-to-end load bench: wirestub engine vs tonic baseline",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['cpus']} CPUs ({meta['cpu_model']}), {meta['kernel']}",
        f"- load generator: {meta['h2load']}, `-t 1`, `-D {meta['duration']:g}` s after "
        f"`--warm-up-time {meta['warmup']:g}` s, one untimed warm-up run per server and cell",
        f"- request: {meta['workload']}",
        f"- repeats: {meta['repeats']} per server and cell, alternating engine, baseline, engine, ...",
        "- layouts: **pinned** = server `taskset -c 0` with `--workers 1`, h2load `taskset -c 1`; "
        "**shared** = nothing pinned, servers with `--workers 2`",
        "",
        "Statistics: every cell shows the median over repeats and (min–max). "
        "*req/s* is h2load's rate over its measurement window. "
        "*CPU/req* is the server's utime+stime (from /proc/PID/stat, sampled when h2load starts "
        "and ends its measurement window) divided by succeeded requests. "
        "*lat mean* and *lat max* are the mean and the maximum of h2load's \"time for request\" "
        "in a run (h2load 1.52 prints no percentiles, so no p50/p99 here). "
        "Ratios are engine/baseline per repeat pair: above 1 is better for req/s, "
        "below 1 is better for CPU/req and latency.",
        "",
        "| layout | c×m | server | req/s | CPU µs/req | lat mean | lat max |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    keys = []
    for r in runs:
        k = (r.layout, r.cell)
        if k not in keys:
            keys.append(k)
    for layout, cell in keys:
        for server in ("engine", "baseline"):
            rs = [r for r in runs if (r.layout, r.cell, r.server) == (layout, cell, server)]
            if not rs:
                continue
            flag = " ⚠" if any(r.failed or r.errored or r.timeout or r.succeeded != r.done for r in rs) else ""
            lines.append(
                f"| {layout} | {cell} | {server}{flag} "
                f"| {spread([r.rps for r in rs], fmt_num)} "
                f"| {spread([r.cpu_us_per_req for r in rs], lambda v: fmt_num(v, 2))} "
                f"| {spread([r.lat_mean_us for r in rs], fmt_us)} "
                f"| {spread([r.lat_max_us for r in rs], fmt_us)} |"
            )
    lines += [
        "",
        "| layout | c×m | req/s engine/baseline | CPU/req engine/baseline | lat mean engine/baseline | lat max engine/baseline |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for layout, cell in keys:
        eng = {r.repeat: r for r in runs if (r.layout, r.cell, r.server) == (layout, cell, "engine")}
        base = {r.repeat: r for r in runs if (r.layout, r.cell, r.server) == (layout, cell, "baseline")}
        pairs = [(eng[i], base[i]) for i in sorted(eng) if i in base]
        cols = []
        for attr in ("rps", "cpu_us_per_req", "lat_mean_us", "lat_max_us"):
            cols.append(spread([ratio(getattr(e, attr), getattr(b, attr)) for e, b in pairs], fmt_ratio))
        lines.append(f"| {layout} | {cell} | " + " | ".join(cols) + " |")
    if memory:
        lines += ["", "Memory after the runs of each layout (VmRSS / peak VmHWM):", ""]
        lines += [f"- {m}" for m in memory]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def target_dir() -> Path:
    env = os.environ.get("CARGO_TARGET_DIR")
    if env:
        return (ROOT / env).resolve()
    try:
        out = subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return Path(json.loads(out.stdout)["target_directory"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return ROOT / "target"


def machine_meta() -> dict:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        h2 = subprocess.run(["h2load", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        h2 = "h2load"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "h2load": h2 or "h2load",
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16x10 only, 1 repeat, short runs (~1 min)")
    p.add_argument("--duration", type=int, help="whole seconds measured per h2load run (default 10, quick 3)")
    p.add_argument("--warmup", type=int, help="h2load --warm-up-time seconds (default 2, quick 1)")
    p.add_argument("--repeats", type=int, help="timed runs per server and cell (default 3, quick 1)")
    p.add_argument("--cells", help="comma-separated CxM list, e.g. 1x1,16x10,64x100")
    p.add_argument("--layouts", default="pinned,shared", help="pinned, shared or both (default both)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="hello", help="request to drive (default hello)")
    p.add_argument("--no-build", action="store_true", help="use the binaries already built")
    p.add_argument("--engine", help="engine binary (default TARGET/release/engine)")
    p.add_argument("--baseline", help="baseline binary (default TARGET/release/baseline)")
    p.add_argument("--compiler", help="compiler binary (default TARGET/release/compiler)")
    p.add_argument("--out", default=str(RESULTS_DIR / "latest.md"), help="markdown report path")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.cells:
        cells = []
        for part in args.cells.split(","):
            c, _, m = part.strip().lower().partition("x")
            cells.append((int(c), int(m)))
        args.cells = cells
    else:
        args.cells = QUICK_CELLS if args.quick else FULL_CELLS
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for layout in args.layouts:
        if layout not in ("pinned", "shared"):
            p.error(f"unknown layout {layout!r}")
    if args.duration <= 0 or args.warmup < 0 or args.repeats < 1:
        p.error("--duration must be positive, --warmup not negative, --repeats at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()

    for tool in ("h2load", "nghttp"):
        if shutil.which(tool) is None:
            raise BenchError(
                f"`{tool}` not found: install the Debian package nghttp2-client "
                "(apt-get install -y nghttp2-client); this script installs nothing"
            )

    notes: list[str] = []
    layouts = list(args.layouts)
    if "pinned" in layouts and ((os.cpu_count() or 1) < 2 or shutil.which("taskset") is None):
        layouts.remove("pinned")
        notes.append("pinned layout skipped: needs 2 CPUs and taskset")
    if not layouts:
        raise BenchError("no layout left to run")

    tdir = target_dir()
    release = tdir / "release"
    if not args.no_build:
        run(
            ["cargo", "build", "--release", "-p", "wirestub-engine", "-p", "wirestub-compiler", "-p", "wirestub-benches"],
            timeout=3600,
        )
    engine = Path(args.engine) if args.engine else release / "engine"
    baseline = Path(args.baseline) if args.baseline else release / "baseline"
    compiler = Path(args.compiler) if args.compiler else release / "compiler"
    for binary in (engine, baseline, compiler):
        if not binary.exists():
            raise BenchError(f"{binary} does not exist (build it, or drop --no-build)")

    wl = WORKLOADS[args.workload]
    work = Path(tempfile.mkdtemp(prefix="wirestub-load-"))
    try:
        plan = work / "plan.bin"
        run([str(compiler), "build", "--protos", "protos", "--rules", "rules", "-o", str(plan)], timeout=300)
        if not plan.exists():
            raise BenchError(f"the compiler wrote no plan at {plan}")
        body = work / "body.bin"
        body.write_bytes(grpc_frame(wl.request))
        say(f"request body {body.read_bytes().hex(' ')} for {wl.path}")

        meta = machine_meta()
        meta.update(
            date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            command=" ".join(["python3", "benches/load.py", *argv]),
            duration=args.duration,
            warmup=args.warmup,
            repeats=args.repeats,
            workload=f"{wl.path}: {wl.name}, {len(grpc_frame(wl.request))}-byte body",
        )
        runs: list[RunResult] = []
        memory: list[str] = []
        for layout in layouts:
            pinned = layout == "pinned"
            server_cpus, loader_cpus = ("0", "1") if pinned else (None, None)
            workers = "1" if pinned else "2"
            servers = {
                "engine": Server(
                    "engine",
                    [str(engine), "run", str(plan), "--listen", "127.0.0.1:0", "--workers", workers],
                    server_cpus,
                    work,
                ),
                "baseline": Server(
                    "baseline",
                    [str(baseline), "--listen", "127.0.0.1:0", "--workers", workers],
                    server_cpus,
                    work,
                ),
            }
            for srv in servers.values():
                for note in check_server(srv, wl, body):
                    say(note)
                    if note not in notes:
                        notes.append(note)
            for conns, streams in args.cells:
                cell = f"{conns}×{streams}"
                for name, srv in servers.items():  # untimed warm-up
                    say(f"{layout} {cell} warm-up {name}")
                    h2load(srv, wl, body, conns, streams, max(1, args.duration // 3), 0, loader_cpus)
                for rep in range(args.repeats):
                    for name, srv in servers.items():
                        fig, output = h2load(
                            srv, wl, body, conns, streams, args.duration, args.warmup, loader_cpus
                        )
                        if not srv.alive():
                            raise BenchError(f"{name} died during the run:\n{srv.log_tail()}")
                        if fig["succeeded"] == 0:
                            raise BenchError(f"{name}: no request succeeded at {cell}:\n{output[-2000:]}")
                        res = RunResult(
                            layout=layout, cell=cell, server=name, repeat=rep,
                            rps=fig["rps"], done=fig["done"], succeeded=fig["succeeded"],
                            failed=fig["failed"], errored=fig["errored"], timeout=fig["timeout"],
                            cpu_s=fig["cpu_s"],
                            cpu_us_per_req=fig["cpu_s"] * 1e6 / fig["succeeded"],
                            lat_mean_us=fig["lat_mean_us"], lat_max_us=fig["lat_max_us"],
                            window_s=fig["window_s"],
                        )  # fmt: skip
                        runs.append(res)
                        say(
                            f"{layout} {cell} #{rep + 1} {name:8}: {res.rps:>10,.0f} req/s, "
                            f"{res.cpu_us_per_req:6.2f} µs CPU/req, lat mean {fmt_us(res.lat_mean_us)}, "
                            f"max {fmt_us(res.lat_max_us)}, {res.succeeded} ok, "
                            f"{res.failed + res.errored + res.timeout} bad"
                        )
                        if res.failed or res.errored or res.timeout:
                            notes.append(
                                f"{layout} {cell} #{rep + 1} {name}: h2load counted {res.failed} failed, "
                                f"{res.errored} errored, {res.timeout} timed-out requests"
                            )
            for name, srv in servers.items():  # still answering correctly after the load
                check_server(srv, wl, body)
                mem = srv.memory_kib()
                if mem:
                    memory.append(
                        f"{layout}, {name}: {mem.get('VmRSS', 0) / 1024:.1f} MiB / {mem.get('VmHWM', 0) / 1024:.1f} MiB"
                    )
                srv.stop()
            notes.append(f"{layout}: both servers still answered correctly after the timed runs")

        report = build_report(meta, runs, notes, memory)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "runs": [asdict(r) for r in runs]}, indent=1) + "\n"
        )
        print()
        print(report, flush=True)
        say(f"wrote {out} and {out.with_suffix('.json')} in {time.monotonic() - started:.0f}s")
        return 0
    finally:
        stop_all_servers()
        shutil.rmtree(work, ignore_errors=True)


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        stop_all_servers()
        print(f"[load] error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        stop_all_servers()
        sys.exit(130)
