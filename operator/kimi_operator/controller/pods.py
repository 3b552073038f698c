"""What a pod's status says, read the same way by every controller."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def ready(pod: Mapping[str, Any]) -> bool:
    """Ready, and not on its way out."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def unscheduled(pod: Mapping[str, Any]) -> str | None:
    """The scheduler's word on a pod it has not placed (e.g. Insufficient nvidia.com/gpu)."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return str(c.get("message") or c.get("reason") or "not scheduled")
    return None
