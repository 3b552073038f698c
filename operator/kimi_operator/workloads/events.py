"""One JSON event per line on a pod's output, for the operator's logs and the tests that read them."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


def emit(event: dict[str, Any], stream: TextIO | None = None) -> None:
    """The event and its newline in one write: ``print`` writes them separately, and with an
    unbuffered stream (PYTHONUNBUFFERED) another process sharing the pipe can land in between."""
    out = stream or sys.stdout
    out.write(json.dumps(event) + "\n")
    out.flush()
