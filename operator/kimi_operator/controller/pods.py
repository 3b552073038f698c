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


def crashed(pod: Mapping[str, Any], container: str) -> str | None:
    """Why ``container`` keeps ending (the kubelet backs off restarting it): its last termination's
    message (the tail of its log, FallbackToLogsOnError) or reason and exit code. Not a single exit
    (an OOM after days of serving, a rollout's stop): only a crash loop."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if status.get("name") != container or (state.get("waiting") or {}).get("reason") != "CrashLoopBackOff":
            continue
        last = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
        if not last:
            continue
        message = str(last.get("message") or "").strip()
        tail = message.splitlines()[-1] if message else ""
        reason = f"{last.get('reason') or 'exited'} (exit code {last.get('exitCode')})"
        return f"{reason}: {tail}" if tail else reason
    return None


def unscheduled(pod: Mapping[str, Any]) -> str | None:
    """The scheduler's word on a pod it has not placed (e.g. Insufficient nvidia.com/gpu)."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return str(c.get("message") or c.get("reason") or "not scheduled")
    return None
