"""Condition types, reasons and the helpers that keep ``status.conditions`` honest.

Conventions (kstatus, Flux, Argo CD): ``Ready`` is always present; ``Reconciling`` and ``Stalled``
appear only while true, and never together. ``lastTransitionTime`` changes only when the status of
a condition changes.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

from pydantic import Field

from kimi_operator.api.base import ApiModel

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
ABNORMAL_TRUE = (RECONCILING, STALLED)


class Reason:
    """Reasons of conditions, CamelCase as Kubernetes requires."""

    INVALID_SPEC = "InvalidSpec"
    # The spec was accepted, but this operator version has no reconciler that acts on it yet.
    AWAITING_RECONCILER = "AwaitingReconciler"
    SUCCEEDED = "Succeeded"
    PROGRESSING = "Progressing"


ConditionStatus = Literal["True", "False", "Unknown"]
MAX_MESSAGE = 32768


class Condition(ApiModel):
    """The ``metav1.Condition`` shape."""

    type: Annotated[str, Field(min_length=1, max_length=316)] = Field(
        description="Type of condition in CamelCase: Ready, Reconciling or Stalled."
    )
    status: ConditionStatus = Field(description="Status of the condition: True, False or Unknown.")
    observed_generation: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )
    last_transition_time: str = Field(
        description="Last time the condition changed status (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    reason: Annotated[
        str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    ] = Field(description="Machine-readable reason for the last transition, in CamelCase.")
    message: Annotated[str, Field(max_length=MAX_MESSAGE)] = Field(
        default="", description="Human-readable details of the last transition."
    )


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def truncate(message: str, limit: int = MAX_MESSAGE) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def set_condition(
    current: Sequence[Condition],
    *,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[Condition]:
    """Return the conditions with ``type_`` set, keeping the transition time if status is unchanged."""
    previous = next((c for c in current if c.type == type_), None)
    transition = previous.last_transition_time if previous and previous.status == status else now
    updated = Condition(
        type=type_,
        status=status,
        observed_generation=generation,
        last_transition_time=transition,
        reason=reason,
        message=truncate(message),
    )
    return [updated if c.type == type_ else c for c in current] if previous else [*current, updated]


def remove_condition(current: Sequence[Condition], type_: str) -> list[Condition]:
    return [c for c in current if c.type != type_]


def find(current: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in current if c.type == type_), None)


def is_true(current: Iterable[Condition], type_: str) -> bool:
    found = find(current, type_)
    return found is not None and found.status == "True"


class Verdict(ApiModel):
    """What one reconcile pass concluded; turned into conditions by :func:`apply_verdict`.

    ``state`` is one of: ready (work done), progressing (work under way), stalled (cannot proceed
    without a change from the user), waiting (nothing is wrong, but nothing is being done yet).
    """

    state: Literal["ready", "progressing", "stalled", "waiting"]
    reason: str
    message: str


def apply_verdict(current: Sequence[Condition], verdict: Verdict, generation: int, now: str) -> list[Condition]:
    """Conditions for a verdict: Ready always; Reconciling/Stalled only while true, never both."""
    conditions = list(current)
    ready_status: ConditionStatus = "True" if verdict.state == "ready" else "False"
    why = {"reason": verdict.reason, "message": verdict.message}
    conditions = set_condition(conditions, type_=READY, status=ready_status, generation=generation, now=now, **why)
    for type_, state in ((RECONCILING, "progressing"), (STALLED, "stalled")):
        if verdict.state == state:
            conditions = set_condition(conditions, type_=type_, status="True", generation=generation, now=now, **why)
        else:
            conditions = remove_condition(conditions, type_)
    return conditions
