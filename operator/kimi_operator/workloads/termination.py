"""How a workload pod fails: a JSON error line on stderr and the kubelet's termination message."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from kimi_operator.api.exitcodes import WorkloadExit

# The kubelet creates this file in every container and shows its text as the termination message.
TERMINATION_LOG = Path("/dev/termination-log")
MAX_MESSAGE = 4000


class WorkloadError(RuntimeError):
    """A failure a retry cannot fix, with the exit code that says which."""

    def __init__(self, code: WorkloadExit, message: str) -> None:
        super().__init__(message)
        self.code = code


def fail(code: WorkloadExit, message: str) -> int:
    """Report a permanent failure and return the exit code the operator maps back to its reason."""
    sys.stderr.write(json.dumps({"event": "error", "reason": code.reason, "message": message}) + "\n")
    if TERMINATION_LOG.exists():
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(message[:MAX_MESSAGE])
    return int(code)
