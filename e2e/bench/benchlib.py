"""What the benchmarks bench_http_stack.py and bench_router.py share (standard library only: each runs
as a script and finds this module beside it)."""

from __future__ import annotations

import math
import socket
from pathlib import Path


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile, linear between the nearest ranks."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def parse_levels(text: str) -> list[tuple[int, int, int]]:
    """``CONCURRENCY:REQUESTS:ROUNDS,...``."""
    levels = []
    for part in text.split(","):
        concurrency, n, rounds = (int(v) for v in part.split(":"))
        levels.append((concurrency, n, rounds))
    return levels
