"""One reconcile pass, as a function from the observed object to the status it should have.

This skeleton validates the spec and reports honestly: an invalid spec is Stalled with pydantic's
message; a valid one is accepted but not Ready, because the reconcilers that prepare weights,
train and serve arrive in later versions. Nothing here claims work that was not done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kimi_operator.api import conditions as cond
from kimi_operator.api.base import ApiModel
from kimi_operator.api.conditions import Condition, Reason, Verdict
from kimi_operator.api.kinds import FINE_TUNE_JOB, KIMI_MODEL, LORA_SERVER, Kind

# What each kind's reconciler will do, for the message while it does not exist yet.
_PENDING_WORK = {
    KIMI_MODEL.kind: "preparing weights on nodes",
    FINE_TUNE_JOB.kind: "running the training Job",
    LORA_SERVER.kind: "starting engine replicas and the router",
}

PHASES = {"ready": "Ready", "progressing": "Progressing", "stalled": "Stalled", "waiting": "Pending"}


@dataclasses.dataclass(frozen=True)
class PassResult:
    verdict: Verdict
    status_patch: dict[str, Any]
    spec: ApiModel | None

    @property
    def changed(self) -> bool:
        return bool(self.status_patch)


def format_validation_error(exc: ValidationError, root: str = "spec") -> str:
    """pydantic's errors as `spec.a.b: message` lines, one per problem."""
    lines = []
    for error in exc.errors(include_url=False):
        path = ".".join([root, *(str(p) for p in error["loc"])])
        lines.append(f"{path}: {error['msg']}")
    return "; ".join(lines)


def current_conditions(status: Mapping[str, Any]) -> list[Condition]:
    """Conditions as stored; entries that do not parse are dropped and rewritten."""
    found = []
    for raw in status.get("conditions") or []:
        try:
            found.append(Condition.model_validate(raw))
        except ValidationError:
            continue
    return found


def evaluate(kind: Kind, body: Mapping[str, Any], now: str) -> PassResult:
    generation = int(body.get("metadata", {}).get("generation") or 0)
    status = body.get("status") or {}
    spec: ApiModel | None = None
    try:
        spec = kind.spec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        verdict = Verdict(state="stalled", reason=Reason.INVALID_SPEC, message=format_validation_error(exc))
    else:
        verdict = Verdict(
            state="waiting",
            reason=Reason.AWAITING_RECONCILER,
            message=f"spec accepted; {_PENDING_WORK[kind.kind]} is not implemented in this operator version",
        )
    existing = current_conditions(status)
    updated = cond.apply_verdict(existing, verdict, generation, now)
    desired = {
        "observedGeneration": generation,
        "conditions": [c.to_wire() for c in updated],
        "phase": PHASES[verdict.state],
    }
    patch = {k: v for k, v in desired.items() if status.get(k) != v}
    if "conditions" in patch:
        # A merge patch replaces lists: always send the whole list.
        patch["conditions"] = desired["conditions"]
    return PassResult(verdict=verdict, status_patch=patch, spec=spec)
