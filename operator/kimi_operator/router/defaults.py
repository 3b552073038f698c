"""The LoraServer's sampling defaults, applied only where a request leaves a field out (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def merged(body: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` with each default added where the field is absent; a field the client sent (even
    null) is the client's."""
    out = dict(body)
    for name, value in defaults.items():
        if value is not None and name not in out:
            out[name] = value
    return out
