"""One reconcile pass, as a function from the observed object to the status it should have.

The spec is validated first: an invalid spec is Stalled with pydantic's message. A valid spec is
handed to the kind's reconciler when this version has one (KimiModel); the others are accepted
but not Ready, because training and serving arrive in later versions. Nothing here claims work
that was not done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from kimi_operator.api import conditions as cond
from kimi_operator.api.base import ApiModel
from kimi_operator.api.conditions import Condition, Reason, Verdict
from kimi_operator.api.kinds import LORA_SERVER, Kind

# What each kind's reconciler will do, for the message while it does not exist yet.
_PENDING_WORK = {LORA_SERVER.kind: "starting engine replicas and the router"}

PHASES = {"ready": "Ready", "progressing": "Progressing", "stalled": "Stalled", "waiting": "Pending"}
# Fields of status written by workload pods (progress, the exported adapter, the agents' engine
# reports), not by the operator.
_POD_OWNED = ("progress", "adapter", "latestCheckpoint", "engines")

# Given a valid spec, do the kind's work and return the verdict and the kind's own status fields.
Work = Callable[[Any], tuple[Verdict, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class PassResult:
    verdict: Verdict
    status: dict[str, Any]
    changed: bool
    spec: ApiModel | None


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


def _operator_view(value: Any) -> Any:
    """A status value without the fields the pods own, for comparing with what we would write."""
    if isinstance(value, list):
        return [_operator_view(v) for v in value]
    if isinstance(value, dict):
        return {k: _operator_view(v) for k, v in value.items() if k not in _POD_OWNED}
    return value


def kept_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """The kind's own status fields as the last pass wrote them, for a pass that could not observe
    anew (a refused write): re-applied as they are, so server-side apply does not drop them."""
    own = ("observedGeneration", "conditions", "phase", *_POD_OWNED)
    # Nested entries lose the pods' fields too (a node's progress), or the forced apply would take
    # them over.
    return {k: _operator_view(v) for k, v in status.items() if k not in own}


def evaluate(kind: Kind, body: Mapping[str, Any], now: str, work: Work | None = None) -> PassResult:
    generation = int(body.get("metadata", {}).get("generation") or 0)
    status = body.get("status") or {}
    spec: ApiModel | None = None
    extra: dict[str, Any] = {}
    try:
        spec = kind.spec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        verdict = Verdict(state="stalled", reason=Reason.INVALID_SPEC, message=format_validation_error(exc))
    else:
        if work is not None:
            verdict, extra = work(spec)
        else:
            verdict = Verdict(
                state="waiting",
                reason=Reason.AWAITING_RECONCILER,
                message=(
                    f"spec accepted; {_PENDING_WORK.get(kind.kind, 'its work')} is not implemented "
                    "in this operator version"
                ),
            )
    updated = cond.apply_verdict(current_conditions(status), verdict, generation, now)
    desired = {
        "observedGeneration": generation,
        "conditions": [c.to_wire() for c in updated],
        "phase": PHASES[verdict.state],
        **extra,
    }
    changed = any(_operator_view(status.get(k)) != _operator_view(v) for k, v in desired.items())
    return PassResult(verdict=verdict, status=desired, changed=changed, spec=spec)
