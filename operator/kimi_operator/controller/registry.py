"""One small protocol every kind's controller implements, and the registry of them.

``handlers.py`` wires kopf to whatever is registered here; a new kind adds a controller and one
line in :func:`build`, and no branch anywhere else (Kueue's jobframework interface is the model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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


@dataclasses.dataclass(frozen=True)
class Images:
    prepare: str
    trainer: str
    engine: str


@dataclasses.dataclass(frozen=True)
class KimiModelController:
    kube: Kube
    settings: kimimodel.Settings
    kind: Kind
    follows_status: bool = False
    watched_pods: Mapping[str, str] | None = None

    def owner_of(self, pod: Mapping[str, Any]) -> str | None:
        return None

    def reconcile(self, body: Mapping[str, Any], spec: Any) -> tuple[Verdict, dict[str, Any]]:
        observed = kimimodel.reconcile(self.kube, self.settings, body, spec)
        return observed.verdict, observed.status

    def finalize(self, body: Mapping[str, Any], spec: Any | None) -> list[str]:
        return kimimodel.finalize(self.kube, self.settings, body, spec)

    def record(self, body: Mapping[str, Any] | None, namespace: str, name: str) -> None:
        metrics.record_model(namespace, name, None if body is None else (body.get("status") or {}).get("nodes"))


@dataclasses.dataclass(frozen=True)
class FineTuneJobController:
    kube: Kube
    settings: finetunejob.Settings
    kind: Kind
    follows_status: bool = False
    watched_pods: Mapping[str, str] | None = None

    def owner_of(self, pod: Mapping[str, Any]) -> str | None:
        return None

    def reconcile(self, body: Mapping[str, Any], spec: Any) -> tuple[Verdict, dict[str, Any]]:
        return finetunejob.reconcile(self.kube, self.settings, body, spec)

    def finalize(self, body: Mapping[str, Any], spec: Any | None) -> list[str]:
        return finetunejob.finalize(self.kube, self.settings, body, spec)

    def record(self, body: Mapping[str, Any] | None, namespace: str, name: str) -> None:
        metrics.record_training(namespace, name, None if body is None else (body.get("status") or {}).get("progress"))


@dataclasses.dataclass(frozen=True)
class LoraServerController:
    kube: Kube
    settings: loraserver.Settings
    kind: Kind
    follows_status: bool = True
    watched_pods: Mapping[str, str] | None = dataclasses.field(
        default_factory=lambda: {MANAGED_BY: OPERATOR, "app.kubernetes.io/component": loraserver_render.ENGINE}
    )

    def owner_of(self, pod: Mapping[str, Any]) -> str | None:
        # Label values are bounded; the full name rides in an annotation.
        return ((pod.get("metadata") or {}).get("annotations") or {}).get(loraserver_render.OWNER_ANNOTATION)

    def reconcile(self, body: Mapping[str, Any], spec: Any) -> tuple[Verdict, dict[str, Any]]:
        return loraserver.reconcile(self.kube, self.settings, body, spec)

    def finalize(self, body: Mapping[str, Any], spec: Any | None) -> list[str]:
        return loraserver.finalize(self.kube, self.settings, body, spec)

    def record(self, body: Mapping[str, Any] | None, namespace: str, name: str) -> None:
        return None


def build(kube: Kube, images: Images) -> dict[str, Controller]:
    """The controllers of this operator version, by kind name. A kind without one is accepted and
    validated but reported as awaiting its reconciler."""
    controllers: list[Controller] = [
        KimiModelController(kube, kimimodel.Settings(prepare_image=images.prepare), KIMI_MODEL),
        FineTuneJobController(kube, finetunejob.Settings(trainer_image=images.trainer), FINE_TUNE_JOB),
        LoraServerController(kube, loraserver.Settings(engine_image=images.engine), LORA_SERVER),
    ]
    return {c.kind.kind: c for c in controllers}
