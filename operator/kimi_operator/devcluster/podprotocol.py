"""The local pod runner's protocol with KWOK (``e2e/cluster/kwok-stages.yaml``): which pods it runs,
and how a pod's outcome is written so that KWOK turns it into the pod's status.

- A pod opts in with ``sim.kimi-operator.io/run: "true"``; a Job's pod also needs
  ``sim.kimi-operator.io/hold: "true"``, or KWOK completes it at once (``job-pod-succeeded``).
- Success: the hold annotation is removed; KWOK marks the pod Succeeded.
- Failure: the ``sim.kimi-operator.io/fail`` label, with the exit code, reason and termination
  message as annotations; KWOK marks the pod Failed with them (``pod-failed``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

RUN_ANNOTATION = "sim.kimi-operator.io/run"
HOLD_ANNOTATION = "sim.kimi-operator.io/hold"
FAIL_LABEL = "sim.kimi-operator.io/fail"
EXIT_CODE_ANNOTATION = "sim.kimi-operator.io/exit-code"
REASON_ANNOTATION = "sim.kimi-operator.io/reason"
MESSAGE_ANNOTATION = "sim.kimi-operator.io/message"

DEFAULT_GRACE_SECONDS = 30
# The kubelet's limits: the file's last 4096 bytes; on FallbackToLogsOnError the log's last 80 lines
# within 2048 bytes.
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048

Result = tuple[int, str, str]  # exit code, reason, termination message


def pod_annotations(pod: Mapping[str, Any]) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("annotations") or {}


def wants_run(pod: Mapping[str, Any]) -> bool:
    return pod_annotations(pod).get(RUN_ANNOTATION) == "true"


def job_owned(pod: Mapping[str, Any]) -> bool:
    return any(ref.get("kind") == "Job" for ref in (pod.get("metadata") or {}).get("ownerReferences") or [])


def skip_reason(pod: Mapping[str, Any], nodes: Collection[str]) -> str | None:
    """None when the runner should run this pod now, else why not."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    if not wants_run(pod):
        return f"no {RUN_ANNOTATION} annotation"
    if meta.get("deletionTimestamp"):
        return "being deleted"
    if spec.get("nodeName") not in nodes:
        return f"not on a simulated node ({spec.get('nodeName')})"
    if status.get("phase") != "Running" or not status.get("podIP"):
        return f"not running yet ({status.get('phase')})"
    if job_owned(pod) and pod_annotations(pod).get(HOLD_ANNOTATION) != "true":
        return f"a Job pod without the {HOLD_ANNOTATION} annotation (KWOK would complete it at once)"
    return None


def grace_seconds(pod: Mapping[str, Any]) -> int:
    """The deletion's grace period, else the pod's terminationGracePeriodSeconds."""
    value = (pod.get("metadata") or {}).get("deletionGracePeriodSeconds")
    return spec_grace_seconds(pod) if value is None else int(value)


def spec_grace_seconds(pod: Mapping[str, Any]) -> int:
    value = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
    return DEFAULT_GRACE_SECONDS if value is None else int(value)


def exit_status(returncode: int) -> tuple[int, str]:
    """Exit code and reason as the kubelet reports them (a signal N is 128+N)."""
    code = 128 - returncode if returncode < 0 else returncode
    return code, ("Completed" if code == 0 else "Error")


def termination_message(file_tail: bytes, log_tail: bytes, exit_code: int, fallback_to_logs: bool) -> str:
    """The termination message: the file's last 4096 bytes; with FallbackToLogsOnError, a file of
    zero bytes and a non-zero exit, the log's last 80 lines within 2048 bytes."""
    message = file_tail[-MAX_MESSAGE_BYTES:]
    if not message and fallback_to_logs and exit_code != 0:
        lines = log_tail.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
        message = b"".join(lines)[-FALLBACK_LOG_BYTES:]
    return message.decode(errors="replace")


def pod_result(results: Sequence[Result]) -> Result:
    """The pod's outcome from its containers' results, in spec order: the first failure, else success."""
    for result in results:
        if result[0] != 0:
            return result
    return (0, "Completed", "")


def outcome_patch(uid: str, exit_code: int, reason: str, message: str) -> dict[str, Any]:
    """The merge patch that makes KWOK finish the pod with this outcome. The uid makes the patch
    fail on a newer pod of the same name."""
    if exit_code == 0:
        return {"metadata": {"uid": uid, "annotations": {HOLD_ANNOTATION: None}}}
    return {
        "metadata": {
            "uid": uid,
            "labels": {FAIL_LABEL: "true"},
            "annotations": {
                EXIT_CODE_ANNOTATION: str(exit_code),
                REASON_ANNOTATION: reason,
                MESSAGE_ANNOTATION: message,
            },
        }
    }
