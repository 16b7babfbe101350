"""Fixtures the Python suites share: Node.js and the pinned npm packages
of tests/node (the protocol clients: connect-node, connect-web, grpc-js,
protobuf-ts), installed with `npm ci` on first use."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


def tool(env_var: str, name: str, hint: str) -> str:
    configured = os.environ.get(env_var)
    found = configured or shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` not found on PATH (or set {env_var}): {hint}")
    return found


@pytest.fixture(scope="session")
def node() -> str:
    node = tool("WIRESTUB_NODE", "node", "install Node.js 20 or later")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    m = re.match(r"v(\d+)\.", version)
    if not m or int(m.group(1)) < 20:
        pytest.fail(
            f"{node} is Node.js {version or '(unknown version)'}; "
            "tests/node needs Node.js 20 or later (@connectrpc/connect-node 2)"
        )
    return node


@pytest.fixture(scope="session")
def node_modules(node) -> Path:
    """tests/node/node_modules, installed with `npm ci` (exactly the
    versions of tests/node/package-lock.json) when missing."""
    modules = NODE_DIR / "node_modules"
    if not (modules / ".package-lock.json").exists():
        npm = tool("WIRESTUB_NPM", "npm", "install npm (Debian: apt-get install npm)")
        cmd = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        run = subprocess.run(
            cmd,
            cwd=NODE_DIR,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, (
            f"`{' '.join(cmd)}` in {NODE_DIR} exited with {run.returncode}\n"
            f"stdout: {run.stdout}\nstderr: {run.stderr}"
        )
    return modules
