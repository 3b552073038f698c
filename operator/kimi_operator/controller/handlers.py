"""kopf handlers: thin adapters from kopf's events to one reconcile pass per object.

A pass is: validate into the model -> do the kind's work -> compute conditions -> one status apply
-> metrics and events, the latter only after the status write succeeded. Every kind is handled the
same way through its controller (``registry.Controller``); nothing here names a kind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Hashable, Mapping
from typing import Any

import kopf

from kimi_operator.api.base import GROUP, VERSION
from kimi_operator.api.conditions import Reason, Verdict, now_rfc3339
from kimi_operator.api.kinds import KINDS, Kind, by_kind
from kimi_operator.controller import metrics
from kimi_operator.controller.kube import Kube, NotOurs, Rejected
from kimi_operator.controller.reconcile import PassResult, Work, evaluate, kept_status
from kimi_operator.controller.registry import Controller
from kimi_operator.render.labels import MANAGED_BY, OPERATOR

ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/finalizer"
# A safety net behind the Job watch: also catches node changes (labels, readiness, new nodes).
RESYNC_SECONDS = 30.0

log = logging.getLogger(__name__)

# kopf serialises handlers per object, but a Job event reconciles its owner from another object's
# handler: one lock per object keeps passes on the same object from interleaving.
_locks: defaultdict[tuple[str, str, str], threading.Lock] = defaultdict(threading.Lock)
# Objects whose finalizer has undone their work, by uid: a pass that began from a body read before
# the deletion (a child's event) must not put back what the finalizer just removed (node labels).
_finalized: set[str] = set()


class ChildReason(Reason):
    # The apiserver or an admission webhook refused a child the pass had to write.
    REJECTED = "ChildRejected"
    # A child's name is taken by an object of another owner (an orphan of an earlier object).
    CONFLICT = "ChildConflict"


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
    def __init__(self, kube: Kube, controllers: Mapping[str, Controller]) -> None:
        self.kube = kube
        self.controllers = controllers
        # By (kind, namespace, name): the uid and what the object showed at its last event
        # (Controller.shown), for the kinds that others refer to.
        self._shown: dict[tuple[str, str, str], tuple[Any, Hashable]] = {}
        self._shown_lock = threading.Lock()

    def referrers(self, kind: Kind, body: Mapping[str, Any], gone: bool = False) -> list[tuple[Kind, dict[str, Any]]]:
        """The objects whose pass reads this one, when what it shows changed since its last event
        (never at the first event seen of an object, by uid: the passes at start and on creation
        read it then)."""
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid")
        controller = self.controllers.get(kind.kind)
        referring = [c for c in self.controllers.values() if kind.kind in c.refers_to]
        if controller is None or not referring:
            return []
        key = (kind.kind, namespace, name)
        shown = None if gone else controller.shown(body)
        with self._shown_lock:
            before = self._shown.get(key)
            if gone:
                # Only this object's entry: a new one of the same name may already be seen.
                if before is not None and before[0] == uid:
                    del self._shown[key]
            else:
                self._shown[key] = (uid, shown)
        if before is None or before[0] != uid or before[1] == shown:
            return []
        found = []
        try:
            for other in referring:
                for obj in self.kube.list_objects(other.kind.api_version, other.kind.kind, namespace):
                    if name in other.refers_to[kind.kind](obj):
                        found.append((other.kind, obj))
        except Exception:
            # Seen as before: the next event tries again (the resync is the safety net).
            with self._shown_lock:
                self._shown[key] = before
            raise
        return found

    def forget(self, kind: Kind, namespace: str, name: str) -> None:
        """An object finalized: nothing is remembered of what it showed."""
        with self._shown_lock:
            self._shown.pop((kind.kind, namespace, name), None)

    def _work(self, kind: Kind, body: Mapping[str, Any]) -> Work | None:
        controller = self.controllers.get(kind.kind)
        if controller is None:
            return None

        def work(spec: Any) -> tuple[Verdict, dict[str, Any]]:
            try:
                return controller.reconcile(body, spec)
            except (Rejected, NotOurs) as exc:
                # Retrying the same write cannot succeed: say so in status, for this generation,
                # and keep the rest of what the last pass observed. The next pass tries again.
                reason = ChildReason.REJECTED if isinstance(exc, Rejected) else ChildReason.CONFLICT
                verdict = Verdict(state="stalled", reason=reason, message=str(exc))
                return verdict, kept_status(body.get("status") or {})

        return work

    def run(self, kind: Kind, body: Mapping[str, Any]) -> PassResult | None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if meta.get("deletionTimestamp"):
            return None
        with _locks[(kind.kind, namespace, name)]:
            if meta.get("uid") in _finalized:
                return None
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
            # Named after the object whose status changed, whichever event started the pass.
            log.info(
                "[%s/%s] %s status: %s (%s) %s",
                namespace,
                name,
                kind.kind,
                verdict.state,
                verdict.reason,
                verdict.message,
            )
        return result

    def finalize(self, kind: Kind, body: Mapping[str, Any]) -> list[str]:
        """Undo what the object put on nodes; what is still to end (empty when done)."""
        controller = self.controllers[kind.kind]
        try:
            spec = kind.spec.model_validate(body.get("spec") or {})
        except ValueError:
            spec = None  # an object that never validated left nothing to undo beyond labels
        meta = body["metadata"]
        # Under the object's lock: a pass in flight ends before the finalizer undoes its work, and
        # none runs after it (one queued from a body read before the deletion would put it back).
        with _locks[(kind.kind, meta["namespace"], meta["name"])]:
            waiting = controller.finalize(body, spec)
            if not waiting:
                _finalized.add(str(meta.get("uid")))
        return waiting


def register(registry: kopf.OperatorRegistry, kube: Kube, controllers: Mapping[str, Controller]) -> None:
    reconciler = Reconciler(kube, controllers)
    for kind in KINDS:
        resource = (GROUP, VERSION, kind.plural)

        def reconcile(body: kopf.Body, kind: Kind = kind, **_: Any) -> None:
            reconciler.run(kind, body)

        # Level-triggered: the same pass on create, on spec change, for every object at start, and
        # on a timer as a safety net behind the child watches (node changes, missed events).
        kopf.on.resume(*resource, registry=registry, id="reconcile")(reconcile)
        kopf.on.create(*resource, registry=registry, id="reconcile")(reconcile)
        kopf.on.update(*resource, registry=registry, id="reconcile", field="spec")(reconcile)

        controller = controllers.get(kind.kind)
        if controller is None:

            def forget(body: kopf.Body, kind: Kind = kind, **_: Any) -> None:
                metrics.forget(kind.kind, body["metadata"]["namespace"], body["metadata"]["name"])

            # optional=True: no finalizer is needed just to forget metric series.
            kopf.on.delete(*resource, registry=registry, id="forget", optional=True)(forget)
            continue

        kopf.timer(*resource, registry=registry, id="resync", interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)(
            reconcile
        )

        # Every status write of a pod reaches Prometheus at once, not at the next pass; for a kind
        # whose conditions follow what pods report, it also runs a pass (which writes nothing when
        # the conditions do not change, so its own write ends the chain).
        def record(
            event: kopf.RawEvent, body: kopf.Body, kind: Kind = kind, controller: Controller = controller, **_: Any
        ) -> None:
            gone = event.get("type") == "DELETED"
            controller.record(None if gone else body, body["metadata"]["namespace"], body["metadata"]["name"])
            if controller.follows_status and not gone:
                reconciler.run(kind, body)
            # A KimiModel turned Ready, a FineTuneJob exported: what waits on it moves now. One
            # that fails does not hold back the others (its resync runs it again).
            for other, obj in reconciler.referrers(kind, body, gone):
                try:
                    reconciler.run(other, obj)
                except Exception:
                    log.exception(
                        "[%s/%s] %s pass failed", obj["metadata"]["namespace"], obj["metadata"]["name"], other.kind
                    )

        kopf.on.event(*resource, registry=registry, id="record")(record)

        # Deletion waits for what the object put on nodes to be undone (labels, files if asked).
        def finalize(body: kopf.Body, kind: Kind = kind, **_: Any) -> None:
            waiting = reconciler.finalize(kind, body)
            if waiting:
                raise kopf.TemporaryError(f"waiting for {', '.join(waiting)}", delay=5)
            metrics.forget(kind.kind, body["metadata"]["namespace"], body["metadata"]["name"])
            reconciler.forget(kind, body["metadata"]["namespace"], body["metadata"]["name"])

        kopf.on.delete(*resource, registry=registry, id="finalize")(finalize)

        if controller.watched_pods:
            # Long-running pods of the kind (engines): a pod that starts, becomes ready or goes
            # changes the owner's replicas.
            def pod_changed(body: kopf.Body, kind: Kind = kind, controller: Controller = controller, **_: Any) -> None:
                name = controller.owner_of(body)
                owner = kube.get(kind.api_version, kind.kind, body["metadata"]["namespace"], name) if name else None
                if owner is not None:
                    reconciler.run(kind, owner)

            kopf.on.event(
                "", "v1", "pods", registry=registry, id=f"{kind.singular}-pods", labels=dict(controller.watched_pods)
            )(pod_changed)

    @kopf.on.event("batch", "v1", "jobs", registry=registry, labels={MANAGED_BY: OPERATOR})
    def child_job_changed(body: kopf.Body, **_: Any) -> None:
        # A Job's status changed: run a pass of the object that owns it (its status follows the Job).
        for ref in body["metadata"].get("ownerReferences") or []:
            if not ref.get("controller") or ref.get("apiVersion") != f"{GROUP}/{VERSION}":
                continue
            kind = by_kind(ref["kind"])
            owner = kube.get(kind.api_version, kind.kind, body["metadata"]["namespace"], ref["name"])
            if owner is not None:
                reconciler.run(kind, owner)


__all__ = ["FINALIZER", "ChildReason", "Reconciler", "configure", "register"]
