"""Free-space checks before each expensive write, with both numbers in the error."""

from __future__ import annotations

import os
from pathlib import Path


class InsufficientDisk(RuntimeError):
    """Not enough free space; ``needed`` and ``free`` are in bytes."""

    def __init__(self, path: Path, needed: int, free: int, what: str) -> None:
        self.path, self.needed, self.free, self.what = path, needed, free, what
        super().__init__(
            f"{what} needs {needed} bytes ({human(needed)}) on {path}, but only {free} bytes ({human(free)}) are free"
        )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``.

    KIMI_OPERATOR_DISK_LIMIT_BYTES caps the figure: a quota the filesystem does not report (and the
    way tests simulate a small disk without mounting one).
    """
    probe = path
    while not probe.exists():
        probe = probe.parent
    stat = os.statvfs(probe)
    free = stat.f_bavail * stat.f_frsize
    limit = os.environ.get("KIMI_OPERATOR_DISK_LIMIT_BYTES")
    return min(free, int(limit)) if limit else free


def require_free(path: Path, needed: int, *, what: str) -> None:
    free = free_bytes(path)
    if needed > free:
        raise InsufficientDisk(path, needed, free, what)
