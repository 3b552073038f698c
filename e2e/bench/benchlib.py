"""What the benchmarks (bench_http_stack.py, bench_router.py, bench_llamacpp.py) share (standard library only: each runs
as a script and finds this module beside it)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import subprocess
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc CPU times come in these (10 ms on Linux)


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


@dataclasses.dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_times(self) -> tuple[float, float]:
        """User and system time of the process and all its threads so far, seconds."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def memory(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak), bytes."""
        return proc_memory(self.pid)

    def stop(self) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""


def start(name: str, argv: list[str], work: Path, env: dict[str, str] | None = None) -> Proc:
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return Proc(name, popen, log)
