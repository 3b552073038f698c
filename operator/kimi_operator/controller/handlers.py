"""kopf handlers: thin adapters from kopf's events to one reconcile pass per kind.

A pass is: validate into the model -> compute conditions -> one status patch -> metrics and
events, the latter only after the patch succeeded.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from kimi_operator.api.base import GROUP, VERSION
from kimi_operator.api.conditions import Reason, now_rfc3339
from kimi_operator.api.kinds import KINDS, Kind
from kimi_operator.controller import metrics
from kimi_operator.controller.kube import Kube
from kimi_operator.controller.reconcile import evaluate

ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/finalizer"


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


def make_reconciler(kind: Kind, kube: Kube) -> Any:
    def reconcile(body: kopf.Body, namespace: str, name: str, logger: kopf.Logger, **_: Any) -> None:
        started = time.monotonic()
        try:
            result = evaluate(kind, body, now_rfc3339())
            if result.changed:
                kube.patch_status(kind, namespace, name, result.status_patch)
        except Exception:
            metrics.RECONCILE_TOTAL.labels(kind.kind, "error").inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.labels(kind.kind).observe(time.monotonic() - started)
        verdict = result.verdict
        metrics.RECONCILE_TOTAL.labels(kind.kind, verdict.state).inc()
        true_types = {"Ready"} if verdict.state == "ready" else set()
        true_types |= {"Stalled"} if verdict.state == "stalled" else set()
        true_types |= {"Reconciling"} if verdict.state == "progressing" else set()
        metrics.record_conditions(kind.kind, namespace, name, true_types)
        if result.changed and verdict.reason == Reason.INVALID_SPEC:
            kopf.warn(body, reason=verdict.reason, message=verdict.message)
        logger.info("reconciled: %s (%s)", verdict.state, verdict.reason)

    reconcile.__name__ = f"reconcile_{kind.singular}"
    return reconcile


def make_forgetter(kind: Kind) -> Any:
    def forget(namespace: str, name: str, **_: Any) -> None:
        metrics.forget(kind.kind, namespace, name)

    forget.__name__ = f"forget_{kind.singular}"
    return forget


def register(registry: kopf.OperatorRegistry, kube: Kube) -> None:
    for kind in KINDS:
        reconcile = make_reconciler(kind, kube)
        resource = (GROUP, VERSION, kind.plural)
        # Level-triggered: the same pass on create, on spec change, and for every object at start.
        kopf.on.resume(*resource, registry=registry, id="reconcile")(reconcile)
        kopf.on.create(*resource, registry=registry, id="reconcile")(reconcile)
        kopf.on.update(*resource, registry=registry, id="reconcile", field="spec")(reconcile)
        # optional=True: no finalizer is needed just to forget metric series.
        kopf.on.delete(*resource, registry=registry, id="forget", optional=True)(make_forgetter(kind))
