"""One small protocol every kind's controller implements, and the registry of them.

``handlers.py`` wires kopf to whatever is registered here; a new kind adds a controller and one
line in :func:`build`, and no branch anywhere else (Kueue's jobframework interface is the model).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Protocol

from kimi_operator.api.conditions import Verdict
from kimi_operator.api.kinds import FINE_TUNE_JOB, KIMI_MODEL, LORA_SERVER, Kind
from kimi_operator.controller import finetunejob, kimimodel, loraserver, metrics
from kimi_operator.controller.kube import Kube
from kimi_operator.render import loraserver as loraserver_render
from kimi_operator.render.labels import MANAGED_BY, OPERATOR


class Controller(Protocol):
    """What the handlers need from one kind's controller."""

    @property
    def kind(self) -> Kind: ...

    @property
    def follows_status(self) -> bool:
        """Pods write facts into this kind's status that its conditions are computed from (the
        agents' engine reports): every status change then runs a pass."""
        ...

    def reconcile(self, body: Mapping[str, Any], spec: Any) -> tuple[Verdict, dict[str, Any]]:
        """Do the kind's work for a valid spec; return the verdict and the kind's own status fields."""
        ...

    def finalize(self, body: Mapping[str, Any], spec: Any | None) -> list[str]:
        """Undo what the object put outside the cluster's garbage collection; the cleanup Jobs still
        running (empty when done). ``spec`` is None for an object whose spec never validated."""
        ...

    def record(self, body: Mapping[str, Any] | None, namespace: str, name: str) -> None:
        """Export what the pods wrote into status as metrics (None: the object is gone)."""
        ...

    @property
    def watched_pods(self) -> Mapping[str, str] | None:
        """Labels of the long-running pods whose changes run a pass of their owner (None: none)."""
        ...

    def owner_of(self, pod: Mapping[str, Any]) -> str | None:
        """The name of the object of this kind a watched pod belongs to."""
        ...

    @property
    def refers_to(self) -> Mapping[str, Refers]:
        """By kind name: the objects of that kind (in the same namespace) an object of this kind
        reads in its pass. When what one of them shows changes, the pass runs at once, not at the
        next resync."""
        ...

    def shown(self, body: Mapping[str, Any]) -> Hashable:
        """What objects that refer to this one read of its status (not its progress)."""
        ...


@dataclasses.dataclass(frozen=True)
class Images:
    prepare: str
    trainer: str
    engine: str
    router: str
    llamacpp: str


# An object's body -> the names of the objects of one kind it refers to (same namespace).
Refers = Callable[[Mapping[str, Any]], Iterable[str]]
Reconcile = Callable[[Mapping[str, Any], Any], tuple[Verdict, dict[str, Any]]]
Finalize = Callable[[Mapping[str, Any], Any], list[str]]
Record = Callable[[Mapping[str, Any] | None, str, str], None]


def _no_owner(pod: Mapping[str, Any]) -> str | None:
    return None


def _nothing_shown(body: Mapping[str, Any]) -> Hashable:
    return None


@dataclasses.dataclass(frozen=True)
class KindController:
    """A kind's controller assembled from its module's functions (the protocol above)."""

    kind: Kind
    reconcile_fn: Reconcile
    finalize_fn: Finalize
    record_fn: Record
    follows_status: bool = False
    watched_pods: Mapping[str, str] | None = None
    owner_fn: Callable[[Mapping[str, Any]], str | None] = _no_owner
    refers_to: Mapping[str, Refers] = dataclasses.field(default_factory=dict)
    shown_fn: Callable[[Mapping[str, Any]], Hashable] = _nothing_shown

    def reconcile(self, body: Mapping[str, Any], spec: Any) -> tuple[Verdict, dict[str, Any]]:
        return self.reconcile_fn(body, spec)

    def finalize(self, body: Mapping[str, Any], spec: Any | None) -> list[str]:
        return self.finalize_fn(body, spec)

    def record(self, body: Mapping[str, Any] | None, namespace: str, name: str) -> None:
        self.record_fn(body, namespace, name)

    def owner_of(self, pod: Mapping[str, Any]) -> str | None:
        return self.owner_fn(pod)

    def shown(self, body: Mapping[str, Any]) -> Hashable:
        return self.shown_fn(body)


def _model_of(body: Mapping[str, Any]) -> list[str]:
    name = ((body.get("spec") or {}).get("model") or {}).get("name")
    return [name] if isinstance(name, str) else []


def _fine_tunes_of(body: Mapping[str, Any]) -> list[str]:
    adapters = (body.get("spec") or {}).get("adapters") or []
    return [
        a["fineTuneJob"]["name"] for a in adapters if isinstance(a, dict) and (a.get("fineTuneJob") or {}).get("name")
    ]


def _conditions(status: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    return sorted(
        (c.get("type"), c.get("status"), c.get("reason"), c.get("message")) for c in status.get("conditions") or []
    )


def _model_shown(body: Mapping[str, Any]) -> Hashable:
    """A KimiModel as the FineTuneJobs and LoraServers on it read it: its conditions, where it is
    ready with which variants, its resolved revisions and GGUF file; not its download progress."""
    status = body.get("status") or {}
    nodes = [(n.get("name"), n.get("phase"), sorted(n.get("variants") or [])) for n in status.get("nodes") or []]
    facts = {k: status.get(k) for k in ("resolvedRevision", "resolvedGgufRevision", "ggufEntry")}
    return json.dumps([_conditions(status), sorted(nodes, key=str), facts], sort_keys=True, default=str)


def _fine_tune_shown(body: Mapping[str, Any]) -> Hashable:
    """A FineTuneJob as the LoraServers serving its adapter read it: its phase, conditions, node
    and exported adapter; not its training progress."""
    status = body.get("status") or {}
    facts = {k: status.get(k) for k in ("phase", "node", "adapter")}
    return json.dumps([_conditions(status), facts], sort_keys=True, default=str)


def _status_field(body: Mapping[str, Any] | None, field: str) -> Any:
    return None if body is None else (body.get("status") or {}).get(field)


def _pair(observed: kimimodel.Observed) -> tuple[Verdict, dict[str, Any]]:
    return observed.verdict, observed.status


def _engine_owner(pod: Mapping[str, Any]) -> str | None:
    # Label values are bounded; the full name rides in an annotation.
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(loraserver_render.OWNER_ANNOTATION)


def build(kube: Kube, images: Images) -> dict[str, Controller]:
    """The controllers of this operator version, by kind name. A kind without one is accepted and
    validated but reported as awaiting its reconciler."""
    km = kimimodel.Settings(prepare_image=images.prepare)
    ftj = finetunejob.Settings(trainer_image=images.trainer)
    ls = loraserver.Settings(engine_image=images.engine, router_image=images.router, llamacpp_image=images.llamacpp)
    controllers: list[Controller] = [
        KindController(
            KIMI_MODEL,
            lambda body, spec: _pair(kimimodel.reconcile(kube, km, body, spec)),
            lambda body, spec: kimimodel.finalize(kube, km, body, spec),
            lambda body, ns, name: metrics.record_model(ns, name, _status_field(body, "nodes")),
            shown_fn=_model_shown,
        ),
        KindController(
            FINE_TUNE_JOB,
            lambda body, spec: finetunejob.reconcile(kube, ftj, body, spec),
            lambda body, spec: finetunejob.finalize(kube, ftj, body, spec),
            lambda body, ns, name: metrics.record_training(ns, name, _status_field(body, "progress")),
            refers_to={KIMI_MODEL.kind: _model_of},
            shown_fn=_fine_tune_shown,
        ),
        KindController(
            LORA_SERVER,
            lambda body, spec: loraserver.reconcile(kube, ls, body, spec),
            lambda body, spec: loraserver.finalize(kube, ls, body, spec),
            lambda body, ns, name: None,
            # The agents' engine reports are the facts its conditions follow.
            follows_status=True,
            # Engine and router pods (both carry the owner annotation owner_of reads).
            watched_pods={MANAGED_BY: OPERATOR},
            owner_fn=_engine_owner,
            refers_to={KIMI_MODEL.kind: _model_of, FINE_TUNE_JOB.kind: _fine_tunes_of},
        ),
    ]
    return {c.kind.kind: c for c in controllers}
