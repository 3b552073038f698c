"""How a workload pod fails: a JSON error line on stderr and the kubelet's termination message."""

from __future__ import annotations

import contextlib
import enum
import json
import sys
from pathlib import Path

# The kubelet creates this file in every container and shows its text as the termination message.
TERMINATION_LOG = Path("/dev/termination-log")
MAX_MESSAGE = 4000


def fail(code: enum.IntEnum, reason: str, message: str) -> int:
    """Report a permanent failure and return the exit code the operator maps back to ``reason``."""
    sys.stderr.write(json.dumps({"event": "error", "reason": reason, "message": message}) + "\n")
    if TERMINATION_LOG.exists():
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(message[:MAX_MESSAGE])
    return int(code)
