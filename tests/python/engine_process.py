"""Starting and stopping an engine (or any server printing the same
`listening on HOST:PORT` line) for the Python end-to-end suites."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on (\S+):(\d+)\s*$")


class EngineProcess:
    """A server process, the port it serves on and its log."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.log_path = log_path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        """Resident memory of the process."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    def logged(self, text: str, timeout: float = 3.0) -> bool:
        """Whether the log shows `text` within `timeout` (the engine logs
        after it has acted, so a client can be ahead of the log)."""
        deadline = time.monotonic() + timeout
        while True:
            if text in self.log_path.read_text(errors="replace"):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def engine_binary() -> Path:
    """The engine under test: WIRESTUB_ENGINE, default target/debug/engine."""
    engine = Path(os.environ.get("WIRESTUB_ENGINE", "target/debug/engine"))
    if not engine.is_absolute():
        engine = REPO_ROOT / engine
    if not engine.exists():
        pytest.fail(
            f"engine binary {engine} not found: build it with "
            "`cargo build -p wirestub-engine` or set WIRESTUB_ENGINE"
        )
    return engine


def start(cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> EngineProcess:
    """Runs `cmd` from the repository root, stderr to a log file in
    `log_dir`, and waits for its `listening on` line."""
    timeout = float(os.environ.get("WIRESTUB_START_TIMEOUT", "120"))
    fd, log_name = tempfile.mkstemp(prefix="engine-", suffix=".log", dir=log_dir)
    log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    lines: list[str] = []
    found: dict[str, int] = {}
    ready = threading.Event()

    def pump() -> None:
        # Reads the first lines, then keeps draining so the pipe never fills.
        assert proc.stdout is not None
        for line in proc.stdout:
            if not ready.is_set():
                lines.append(line)
                m = LISTENING.search(line)
                if m:
                    found["port"] = int(m.group(2))
                    ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout)
    if "port" not in found:
        stop(proc)
        pytest.fail(
            f"{' '.join(cmd)} did not print a `listening on` line within "
            f"{timeout:.0f}s (exit code {proc.returncode}).\nstdout: "
            f"{''.join(lines)!r}\nstderr:\n{log_path.read_text(errors='replace')[-4000:]}"
        )
    return EngineProcess(proc, found["port"], log_path)


LISTENING_BOTH = re.compile(r"wirestub (engine|admin) listening on (\S+):(\d+)\s*$")


def start_reading_ports(
    cmd: list[str],
    log_dir: Path,
    port_of,
    ready_with,
    cwd: Path = REPO_ROOT,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, dict[str, int], Path]:
    """Runs `cmd` (stderr to a log file in `log_dir`) and reads its stdout:
    `port_of(line)` names a port a line announces (a key and the port, or
    None), until `ready_with(ports)` holds. Returns the process, the ports
    and the log file; fails the test if they do not come in time."""
    timeout = float(os.environ.get("WIRESTUB_START_TIMEOUT", "120"))
    log_path = log_dir / f"engine-{len(list(log_dir.glob('engine-*.log')))}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
    lines: list[str] = []
    ports: dict[str, int] = {}
    ready = threading.Event()

    def pump() -> None:
        # Reads the first lines, then keeps draining so the pipe never fills.
        assert proc.stdout is not None
        for line in proc.stdout:
            if ready.is_set():
                continue
            lines.append(line)
            found = port_of(line)
            if found:
                ports[found[0]] = found[1]
            if ready_with(ports):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout)
    if not ready_with(ports):
        stop(proc)
        pytest.fail(
            f"{' '.join(cmd)} did not print its `listening on` lines within {timeout:.0f}s "
            f"(exit code {proc.returncode}).\nstdout: {''.join(lines)!r}\n"
            f"stderr:\n{log_path.read_text(errors='replace')[-4000:]}"
        )
    return proc, ports, log_path


def start_with_admin(
    args: list[str], log_dir: Path, cwd: Path = REPO_ROOT
) -> tuple[subprocess.Popen, int, int, Path]:
    """Starts `engine ARGS...` (which should listen on a port and on an
    admin port), waits for both `listening on` lines and returns the
    process, the gRPC port, the admin port and the log file (stderr)."""

    def port_of(line: str):
        m = LISTENING_BOTH.search(line)
        return (m.group(1), int(m.group(3))) if m else None

    cmd = [str(engine_binary()), *args]
    proc, ports, log_path = start_reading_ports(cmd, log_dir, port_of, lambda p: "engine" in p and "admin" in p, cwd)
    return proc, ports["engine"], ports["admin"], log_path


def stop_cleanly(e: EngineProcess) -> None:
    """Stops an engine a test started, checking it ran to the end: it did
    not exit on its own, it exits 0 on SIGINT, and it never panicked."""
    crashed = e.proc.poll()
    code = stop(e.proc)
    assert crashed is None, f"engine exited during the test ({crashed}):\n{e.log()}"
    assert code == 0, f"engine exited with {code} on SIGINT:\n{e.log()}"
    assert "panicked" not in e.log_path.read_text(errors="replace"), e.log()


def stop(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGINT, then SIGKILL after `grace` seconds; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode
