#!/usr/bin/env python3
"""Instructions per call, counted with callgrind: a measure of the request
path's cost that repeats from run to run (CPU time on a shared 2-core
machine varies by several per cent), for comparing two engine builds or
the protocols of one build.

The engine (`--workers 1 --metrics off`, the bench plan and the bundled
example compiled into one plan beforehand) runs under `valgrind
--tool=callgrind`; h2load sends N calls of one workload (4 connections ×
10 streams, or 4 HTTP/1.1 connections one call at a time); the engine is
stopped with SIGINT and callgrind's total is read. The figure per call is
(total at N=60,000 - total at N=20,000) / 40,000, so start-up, plan
loading and shutdown cancel out.

    python3 benches/instructions.py --engine new=target/release/engine \\
        --engine old=/path/to/older/engine --workloads static-200B,match-200B,grpc

Needs valgrind and h2load (Debian: valgrind, nghttp2-client).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))

from load import bench_request, grpc_frame as framed, pb_string  # noqa: E402  (the bench's own encoders)

TOM = pb_string(1, "Tom")
HELLO = "/helloworld.Greeter/SayHello"
BENCH = "/bench.v1.Bench/"

# name: (path, body, headers, HTTP/1.1)
WORKLOADS = {
    "static-200B": (BENCH + "StaticRule", framed(bench_request("medium", 200)), ["content-type: application/grpc", "te: trailers"], False),
    "match-200B": (BENCH + "FieldMatch", framed(bench_request("medium", 200)), ["content-type: application/grpc", "te: trailers"], False),
    "grpc": (HELLO, framed(TOM), ["content-type: application/grpc", "te: trailers"], False),
    "connect-proto": (HELLO, TOM, ["content-type: application/proto", "connect-protocol-version: 1"], False),
    "connect-json": (HELLO, b'{"name":"Tom"}', ["content-type: application/json", "connect-protocol-version: 1"], False),
    "grpc-web-proto": (HELLO, framed(TOM), ["content-type: application/grpc-web+proto", "x-grpc-web: 1"], False),
    "connect-proto-h1": (HELLO, TOM, ["content-type: application/proto", "connect-protocol-version: 1"], True),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the engine did not listen on {port} within {timeout} s")


def total_instructions(engine: str, plan: Path, workload: str, calls: int, tmp: Path) -> int:
    path, body, headers, h1 = WORKLOADS[workload]
    port = free_port()
    out = tmp / f"callgrind.{os.getpid()}.{port}"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", engine, "run", str(plan),
         "--listen", f"127.0.0.1:{port}", "--admin-listen", "off", "--workers", "1", "--metrics", "off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, 120)
        data = tmp / "body.bin"
        data.write_bytes(body)
        cmd = ["h2load", f"http://127.0.0.1:{port}{path}", "-d", str(data), "-n", str(calls), "-t", "1"]
        cmd += ["--h1", "-c", "4", "-m", "1"] if h1 else ["-c", "4", "-m", "10"]
        for h in headers:
            cmd += ["-H", h]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        ok = re.search(r"(\d+) succeeded", run.stdout)
        two = re.search(r"status codes: (\d+) 2xx", run.stdout)
        if not ok or int(ok.group(1)) != calls or not two or int(two.group(1)) != calls:
            raise SystemExit(f"h2load did not complete {calls} calls of {workload}:\n{run.stdout}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    text = out.read_text()
    out.unlink()
    m = re.search(r"^(?:totals|summary): (\d+)", text, re.M)
    if not m:
        raise SystemExit("no total in callgrind's output")
    return int(m.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", required=True, help="LABEL=PATH, repeatable")
    p.add_argument("--workloads", default="static-200B,match-200B,grpc,connect-proto,connect-json,grpc-web-proto,connect-proto-h1")
    p.add_argument("--compiler", default=str(ROOT / "target/release/compiler"))
    p.add_argument("--small", type=int, default=20_000)
    p.add_argument("--large", type=int, default=60_000)
    a = p.parse_args()
    engines = [e.split("=", 1) for e in a.engine]
    workloads = a.workloads.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        plan = tmp / "plan.bin"
        subprocess.run(
            [a.compiler, "build", "--protos", str(ROOT / "benches/plan/protos"), "--protos", str(ROOT / "protos"),
             "--rules", str(ROOT / "benches/plan/rules"), "--rules", str(ROOT / "rules"), "-o", str(plan)],
            check=True, capture_output=True,
        )
        print("| workload | " + " | ".join(label for label, _ in engines) + " |")
        print("|---|" + "---:|" * len(engines))
        for w in workloads:
            cells = []
            for _, engine in engines:
                small = total_instructions(engine, plan, w, a.small, tmp)
                large = total_instructions(engine, plan, w, a.large, tmp)
                cells.append(f"{(large - small) / (a.large - a.small):,.0f}")
            print(f"| {w} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
