"""kopf handlers: thin adapters from kopf's events to one reconcile pass per object.

A pass is: validate into the model -> do the kind's work -> compute conditions -> one status apply
-> metrics and events, the latter only after the status write succeeded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from kimi_operator.api.base import GROUP, VERSION
from kimi_operator.api.conditions import Reason, Verdict, now_rfc3339
from kimi_operator.api.finetunejob import FineTuneJobSpec
from kimi_operator.api.kimimodel import KimiModelSpec
from kimi_operator.api.kinds import FINE_TUNE_JOB, KIMI_MODEL, KINDS, LORA_SERVER, Kind, by_kind
from kimi_operator.controller import finetunejob, kimimodel, metrics
from kimi_operator.controller.kube import Kube
from kimi_operator.controller.reconcile import PassResult, evaluate
from kimi_operator.render.labels import MANAGED_BY, OPERATOR

ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/finalizer"
# A safety net behind the Job watch: also catches node changes (labels, readiness, new nodes).
RESYNC_SECONDS = 30.0

# kopf serialises handlers per object, but a Job event reconciles its owner from another object's
# handler: one lock per object keeps passes on the same object from interleaving.
_locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)


def configure(settings: kopf.OperatorSettings) -> None:
    """Our own annotation prefix and finalizer name, so nothing collides with other kopf operators."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


class Reconciler:
    def __init__(self, kube: Kube, km_settings: kimimodel.Settings, ftj_settings: finetunejob.Settings) -> None:
        self.kube = kube
        self.km_settings = km_settings
        self.ftj_settings = ftj_settings

    def _work(self, kind: Kind, body: Mapping[str, Any]) -> Any:
        if kind is KIMI_MODEL:

            def work_km(spec: KimiModelSpec) -> tuple[Verdict, dict[str, Any]]:
                observed = kimimodel.reconcile(self.kube, self.km_settings, body, spec)
                return observed.verdict, observed.status

            return work_km
        if kind is FINE_TUNE_JOB:

            def work_ftj(spec: FineTuneJobSpec) -> tuple[Verdict, dict[str, Any]]:
                return finetunejob.reconcile(self.kube, self.ftj_settings, body, spec)

            return work_ftj
        return None

    def run(self, kind: Kind, body: Mapping[str, Any], logger: logging.Logger | kopf.Logger) -> PassResult | None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if meta.get("deletionTimestamp"):
            return None
        with _locks[(kind.kind, namespace, name)]:
            started = time.monotonic()
            try:
                result = evaluate(kind, body, now_rfc3339(), self._work(kind, body))
                if result.changed:
                    self.kube.apply_status(kind, namespace, name, result.status)
            except Exception:
                metrics.RECONCILE_TOTAL.labels(kind.kind, "error").inc()
                raise
            finally:
                metrics.RECONCILE_SECONDS.labels(kind.kind).observe(time.monotonic() - started)
        verdict = result.verdict
        metrics.RECONCILE_TOTAL.labels(kind.kind, verdict.state).inc()
        true_types = {c["type"] for c in result.status.get("conditions") or [] if c.get("status") == "True"}
        metrics.record_conditions(kind.kind, namespace, name, true_types)
        if result.changed and verdict.state == "stalled" and isinstance(body, kopf.Body):
            kopf.warn(body, reason=verdict.reason, message=verdict.message)
        if result.changed:
            logger.info("status: %s (%s) %s", verdict.state, verdict.reason, verdict.message)
        return result


def register(
    registry: kopf.OperatorRegistry,
    kube: Kube,
    km_settings: kimimodel.Settings,
    ftj_settings: finetunejob.Settings,
) -> None:
    reconciler = Reconciler(kube, km_settings, ftj_settings)
    for kind in KINDS:
        resource = (GROUP, VERSION, kind.plural)

        def reconcile(body: kopf.Body, logger: kopf.Logger, kind: Kind = kind, **_: Any) -> None:
            reconciler.run(kind, body, logger)

        def forget(body: kopf.Body, kind: Kind = kind, **_: Any) -> None:
            metrics.forget(kind.kind, body["metadata"]["namespace"], body["metadata"]["name"])

        # Level-triggered: the same pass on create, on spec change, and for every object at start.
        kopf.on.resume(*resource, registry=registry, id="reconcile")(reconcile)
        kopf.on.create(*resource, registry=registry, id="reconcile")(reconcile)
        kopf.on.update(*resource, registry=registry, id="reconcile", field="spec")(reconcile)
        if kind is LORA_SERVER:
            # optional=True: no finalizer is needed just to forget metric series.
            kopf.on.delete(*resource, registry=registry, id="forget", optional=True)(forget)

    for kind in (KIMI_MODEL, FINE_TUNE_JOB):

        def resync(body: kopf.Body, logger: kopf.Logger, kind: Kind = kind, **_: Any) -> None:
            reconciler.run(kind, body, logger)

        kopf.timer(
            GROUP,
            VERSION,
            kind.plural,
            registry=registry,
            id="resync",
            interval=RESYNC_SECONDS,
            initial_delay=RESYNC_SECONDS,
        )(resync)

    @kopf.on.event("batch", "v1", "jobs", registry=registry, labels={MANAGED_BY: OPERATOR})
    def child_job_changed(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        # A Job's status changed: run a pass of the object that owns it (its status follows the Job).
        for ref in body["metadata"].get("ownerReferences") or []:
            if not ref.get("controller") or ref.get("apiVersion") != KIMI_MODEL.api_version:
                continue
            kind = by_kind(ref["kind"])
            owner = kube.get(kind.api_version, kind.kind, body["metadata"]["namespace"], ref["name"])
            if owner is not None:
                reconciler.run(kind, owner, logger)

    # Every status write of a pod (training or prepare) reaches Prometheus at once, not at the next pass.
    @kopf.on.event(GROUP, VERSION, FINE_TUNE_JOB.plural, registry=registry)
    def training_progress(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        progress = None if event.get("type") == "DELETED" else (body.get("status") or {}).get("progress")
        metrics.record_training(namespace, name, progress)

    @kopf.on.event(GROUP, VERSION, KIMI_MODEL.plural, registry=registry)
    def prepare_progress(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        nodes = None if event.get("type") == "DELETED" else (body.get("status") or {}).get("nodes")
        metrics.record_model(namespace, name, nodes)

    # Deletion waits for what the object put on nodes to be undone (labels, files if asked).
    finalizers: tuple[tuple[Kind, Callable[[Mapping[str, Any], Any], list[str]]], ...] = (
        (KIMI_MODEL, lambda body, spec: kimimodel.finalize(kube, km_settings, body, spec)),
        (FINE_TUNE_JOB, lambda body, spec: finetunejob.finalize(kube, ftj_settings, body, spec)),
    )
    for kind, undo in finalizers:

        def finalize(
            body: kopf.Body,
            kind: Kind = kind,
            undo: Callable[[Mapping[str, Any], Any], list[str]] = undo,
            **_: Any,
        ) -> None:
            try:
                spec = kind.spec.model_validate(body.get("spec") or {})
            except ValueError:
                spec = None  # an object that never validated left nothing to undo beyond labels
            waiting = undo(body, spec)
            if waiting:
                raise kopf.TemporaryError(f"waiting for cleanup Jobs {', '.join(waiting)}", delay=5)
            metrics.forget(kind.kind, body["metadata"]["namespace"], body["metadata"]["name"])

        kopf.on.delete(GROUP, VERSION, kind.plural, registry=registry, id="finalize")(finalize)


__all__ = ["FINALIZER", "Reason", "configure", "register"]
