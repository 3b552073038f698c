"""What the drivers of this directory (agent_vs_sglang.py, router_vs_sglang.py, lora_abort_leak.py)
share: the results file and the processes of a group. Standard library only: each driver runs with
its own PYTHONPATH and finds this module beside it (the script's directory is first on sys.path)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Results:
    """A JSON file rewritten whole after each entry, so a run cut short still leaves what it saw."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}
        self.t0 = time.monotonic()

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 1)


def group_members(pgid: int) -> list[dict[str, Any]]:
    """Live processes of a process group (a server's main process and the children it spawned)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            found.append({"pid": int(entry.name), "state": fields[0], "cmdline": cmd[:200]})
        except (OSError, ValueError):
            continue
    return found
