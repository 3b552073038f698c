"""For the tests that start servers of their own on 127.0.0.1 (the router, the SGLang stand-in)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not gone in 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(check: Callable[[], bool], seconds: float, what: str, *, interval: float = 0.1) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(interval)


def built(variable: str, what: str, target: str) -> str:
    """The path ``variable`` names (an environment's python, a binary the Makefile built); the test
    fails, never skips, when it is not set to one: ``make target`` sets it."""
    found = os.environ.get(variable)
    if not found or not Path(found).exists():
        pytest.fail(f"{variable} is not set to {what}: run the tests with `make {target}`")
    return found
