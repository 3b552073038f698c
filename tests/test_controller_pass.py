"""A pass through the handlers' Reconciler, with a controller of the registry's protocol and a
recording stand-in for the API client's one status write: refusals of children, and log lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import api_exception

from kimi_operator.api.conditions import Verdict
from kimi_operator.api.kinds import FINE_TUNE_JOB, KIMI_MODEL, LORA_SERVER, Kind
from kimi_operator.controller import kube as kube_module
from kimi_operator.controller.handlers import Reconciler
from kimi_operator.controller.kube import Rejected, digest
from kimi_operator.controller.registry import Images, build

JOB = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "t-train", "namespace": "ml"}}
SPEC = {"model": {"name": "kimi"}, "dataset": {"configMap": {"name": "d", "key": "k"}}}


def api_error(status: int, message: str) -> Exception:
    exc = ApiException(status=status, reason="Refused")
    exc.body = json.dumps({"kind": "Status", "message": message, "details": {"huge": "x" * 5000}})
    return api_exception(exc)


class StatusRecorder:
    """Takes the place of the API client for a pass that writes only status."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str, str, dict[str, Any]]] = []

    def apply_status(self, kind: Kind, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.writes.append((kind.kind, namespace, name, dict(status)))


class Refusing:
    kind = FINE_TUNE_JOB

    def __init__(self, error: Exception) -> None:
        self.error = error

    def reconcile(self, body: Mapping[str, Any], spec: Any) -> tuple[Verdict, dict[str, Any]]:
        raise self.error

    def finalize(self, body: Mapping[str, Any], spec: Any | None) -> list[str]:
        return []

    def record(self, body: Mapping[str, Any] | None, namespace: str, name: str) -> None:
        return None


def body(generation: int = 2, status: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {"name": "t", "namespace": "ml", "generation": generation, "uid": "u"}
    return {"metadata": meta, "spec": SPEC, "status": status or {}}


@pytest.mark.parametrize(
    ("status", "rejected"),
    [(400, True), (403, True), (422, True), (404, False), (409, False), (429, False), (500, False), (503, False)],
)
def test_which_answers_are_refusals(status: int, rejected: bool) -> None:
    error = kube_module._refused(JOB, api_error(status, "no"))  # type: ignore[arg-type]
    assert isinstance(error, Rejected) is rejected


def test_a_refusal_names_the_object_and_carries_only_the_apiservers_message() -> None:
    error = kube_module._refused(JOB, api_error(422, 'Job.batch "t-train" is invalid: field is immutable'))  # type: ignore[arg-type]
    assert str(error) == 'the apiserver refused Job ml/t-train: Job.batch "t-train" is invalid: field is immutable'


def test_a_refused_child_stalls_the_current_generation_and_keeps_what_was_observed() -> None:
    recorder = StatusRecorder()
    previous = {"observedGeneration": 1, "phase": "Running", "node": "n1", "attempts": 1, "progress": {"step": 3}}
    reconciler = Reconciler(
        recorder, {FINE_TUNE_JOB.kind: Refusing(Rejected(JOB, api_error(403, "exceeded quota: q")))}
    )  # type: ignore[arg-type]
    result = reconciler.run(FINE_TUNE_JOB, body(status=previous))
    assert result is not None
    ((kind, namespace, name, status),) = recorder.writes
    assert (kind, namespace, name) == ("FineTuneJob", "ml", "t")
    assert status["observedGeneration"] == 2
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "ChildRejected"
    assert stalled["message"] == "the apiserver refused Job ml/t-train: exceeded quota: q"
    # What only the last pass could observe is re-applied, so server-side apply keeps it; the pod's
    # own fields are not the operator's to write.
    assert (status["node"], status["attempts"]) == ("n1", 1)
    assert "progress" not in status


def test_an_error_a_retry_may_fix_is_raised_for_kopf_to_retry() -> None:
    recorder = StatusRecorder()
    reconciler = Reconciler(recorder, {FINE_TUNE_JOB.kind: Refusing(api_error(409, "conflict"))})  # type: ignore[arg-type]
    with pytest.raises(Exception, match="conflict"):
        reconciler.run(FINE_TUNE_JOB, body())
    assert recorder.writes == []


def test_the_status_line_names_the_object_not_the_event_source(caplog: pytest.LogCaptureFixture) -> None:
    # A child Job's event starts a pass of its owner: the line must be filed under the owner.
    caplog.set_level(logging.INFO, logger="kimi_operator.controller.handlers")
    reconciler = Reconciler(StatusRecorder(), {})  # type: ignore[arg-type]
    reconciler.run(LORA_SERVER, {"metadata": {"name": "support", "namespace": "ml", "generation": 1}, "spec": {}})
    (record,) = [r for r in caplog.records if "status:" in r.getMessage()]
    assert record.getMessage().startswith("[ml/support] LoraServer status: ")


def test_an_unchanged_pass_writes_nothing() -> None:
    recorder = StatusRecorder()
    reconciler = Reconciler(recorder, {})  # type: ignore[arg-type]
    first = reconciler.run(LORA_SERVER, {"metadata": {"name": "s", "namespace": "ml", "generation": 1}, "spec": {}})
    assert first is not None
    assert len(recorder.writes) == 1
    again = {"metadata": {"name": "s", "namespace": "ml", "generation": 1}, "spec": {}, "status": first.status}
    reconciler.run(LORA_SERVER, again)
    assert len(recorder.writes) == 1


def test_the_applied_digest_ignores_key_order_and_sees_any_change() -> None:
    a = {"kind": "ConfigMap", "metadata": {"name": "x", "namespace": "n"}, "data": {"a": "1", "b": "2"}}
    b = {"data": {"b": "2", "a": "1"}, "metadata": {"namespace": "n", "name": "x"}, "kind": "ConfigMap"}
    assert digest(a) == digest(b)
    assert digest(a) != digest({**a, "data": {"a": "1", "b": "3"}})


@pytest.mark.parametrize(
    ("live", "wanted", "expected"),
    [
        ({"spec": {"replicas": 2, "serviceName": "x"}}, {"spec": {"replicas": 2}}, True),
        # Scaled by hand while the operator was down.
        ({"spec": {"replicas": 0}}, {"spec": {"replicas": 2}}, False),
        # Defaults the apiserver adds inside list items are not ours.
        ({"c": [{"name": "a", "terminationMessagePath": "/dev/x"}]}, {"c": [{"name": "a"}]}, True),
        ({"c": [{"name": "a"}, {"name": "b"}]}, {"c": [{"name": "a"}]}, False),
        # A Role's rules edited.
        ({"rules": [{"verbs": ["get", "list"]}]}, {"rules": [{"verbs": ["get"]}]}, False),
        ({"port": 30000}, {"port": 30000}, True),
        ({"cpu": "4"}, {"cpu": 4}, True),
        ({"suspend": "True"}, {"suspend": True}, False),
        # What the apiserver rewrites or drops.
        ({"memory": "2Gi", "cpu": "1"}, {"memory": "2048Mi", "cpu": "1000m"}, True),
        ({"memory": "2Gi"}, {"memory": "3Gi"}, False),
        ({"clusterIP": "None"}, {"clusterIP": "None", "publishNotReadyAddresses": False}, True),
        ({}, {"readOnly": True}, False),
        ({}, {"args": []}, True),
    ],
    ids=[
        "same",
        "scaled",
        "defaults",
        "extra-item",
        "rules",
        "int",
        "int-or-string",
        "bool",
        "quantities",
        "other-quantity",
        "false-dropped",
        "true-missing",
        "empty-dropped",
    ],
)
def test_what_a_child_must_still_hold(live: dict[str, Any], wanted: dict[str, Any], expected: bool) -> None:
    assert kube_module.holds(live, wanted) is expected


class Finalizing(Refusing):
    """A controller whose finalizer is done at once, and whose passes count."""

    def __init__(self) -> None:
        super().__init__(RuntimeError("unused"))
        self.passes = 0

    def reconcile(self, body: Mapping[str, Any], spec: Any) -> tuple[Verdict, dict[str, Any]]:
        self.passes += 1
        return Verdict(state="progressing", reason="Working", message=""), {}


def test_no_pass_runs_after_the_finalizer_undid_the_objects_work() -> None:
    """A pass queued from a body read before the deletion (a child's event) would put back what the
    finalizer removed, such as a node label, with nothing left to remove it again."""
    controller = Finalizing()
    reconciler = Reconciler(StatusRecorder(), {FINE_TUNE_JOB.kind: controller})  # type: ignore[arg-type]
    stale = body()
    assert reconciler.run(FINE_TUNE_JOB, stale) is not None
    assert controller.passes == 1
    assert reconciler.finalize(FINE_TUNE_JOB, {**stale, "metadata": {**stale["metadata"], "uid": "u-gone"}}) == []
    assert reconciler.run(FINE_TUNE_JOB, {**stale, "metadata": {**stale["metadata"], "uid": "u-gone"}}) is None
    assert controller.passes == 1
    # Another object of the same name (a new uid) is reconciled as usual.
    assert reconciler.run(FINE_TUNE_JOB, {**stale, "metadata": {**stale["metadata"], "uid": "u-new"}}) is not None
    assert controller.passes == 2


class Listing(StatusRecorder):
    """The API client's list, over objects by kind."""

    def __init__(self, objects: dict[str, list[dict[str, Any]]]) -> None:
        super().__init__()
        self.objects = objects
        self.lists: list[tuple[str, str | None]] = []

    def list_objects(self, api_version: str, kind: str, namespace: str | None) -> list[dict[str, Any]]:
        self.lists.append((kind, namespace))
        return [o for o in self.objects.get(kind, []) if o["metadata"]["namespace"] == namespace]


def obj(name: str, namespace: str = "ml", spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": name}, "spec": spec or {}, "status": status}


def ready(*conditions: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"type": t, "status": s, "reason": "R", "lastTransitionTime": "now"} for t, s in conditions]


def names(found: list[tuple[Kind, dict[str, Any]]]) -> list[tuple[str, str]]:
    return [(k.kind, o["metadata"]["name"]) for k, o in found]


def test_what_waits_on_a_model_or_a_fine_tune_is_reconciled_when_it_changes() -> None:
    tune = obj("tune", spec={"model": {"name": "kimi"}})
    other_tune = obj("other", spec={"model": {"name": "other-model"}})
    elsewhere = obj("tune", namespace="prod", spec={"model": {"name": "kimi"}})
    adapters = [{"name": "a", "fineTuneJob": {"name": "tune"}}]
    server = obj("serve", spec={"model": {"name": "kimi"}, "adapters": adapters})
    kube = Listing({"FineTuneJob": [tune, other_tune, elsewhere], "LoraServer": [server]})
    reconciler = Reconciler(kube, build(kube, Images("p", "t", "e", "r", "l")))  # type: ignore[arg-type]
    on_model = [("FineTuneJob", "tune"), ("LoraServer", "serve")]

    # The first event of an object is only remembered: the passes at start and on creation read it.
    model = obj("kimi", conditions=ready(("Ready", "False")), nodes=[{"name": "n", "phase": "Preparing"}])
    assert reconciler.referrers(KIMI_MODEL, model) == []
    # Its download progress moves: nothing waits on that.
    moving = {"name": "n", "phase": "Preparing", "progress": {"percent": 50}}
    assert reconciler.referrers(KIMI_MODEL, {**model, "status": {**model["status"], "nodes": [moving]}}) == []
    # Ready: what is on it in its namespace (not the fine-tune on another model, nor elsewhere).
    done = obj("kimi", conditions=ready(("Ready", "True")), nodes=[{"name": "n", "phase": "Ready"}])
    assert names(reconciler.referrers(KIMI_MODEL, done)) == on_model
    assert reconciler.referrers(KIMI_MODEL, done) == []  # the same again: nothing
    # Each fact alone: the GGUF file reported, a node's variants.
    gguf = {**done, "status": {**done["status"], "ggufEntry": "x.gguf"}}
    assert names(reconciler.referrers(KIMI_MODEL, gguf)) == on_model
    more = {**gguf, "status": {**gguf["status"], "nodes": [{"name": "n", "phase": "Ready", "variants": ["gguf"]}]}}
    assert names(reconciler.referrers(KIMI_MODEL, more)) == on_model

    # A FineTuneJob that exports its adapter: the LoraServer serving it; its training steps: nothing.
    running = obj("tune", spec=tune["spec"], phase="Running", progress={"step": 1})
    assert reconciler.referrers(FINE_TUNE_JOB, running) == []
    assert (
        reconciler.referrers(FINE_TUNE_JOB, {**running, "status": {**running["status"], "progress": {"step": 2}}}) == []
    )
    exported = {**running, "status": {**running["status"], "adapter": {"sha256": "abc"}}}
    assert names(reconciler.referrers(FINE_TUNE_JOB, exported)) == [("LoraServer", "serve")]
    # Another FineTuneJob of the same name (a new uid): its first event.
    again = {**exported, "metadata": {**exported["metadata"], "uid": "new"}}
    assert reconciler.referrers(FINE_TUNE_JOB, again) == []
    # Deleted: what referred to it learns at once too; the old one's deletion forgets nothing of it.
    assert reconciler.referrers(FINE_TUNE_JOB, exported, gone=True) == []
    assert names(reconciler.referrers(FINE_TUNE_JOB, again, gone=True)) == [("LoraServer", "serve")]
    # Nothing refers to a LoraServer: nothing is remembered of it.
    assert reconciler.referrers(LORA_SERVER, server) == []
    assert ("LoraServer", "ml", "serve") not in reconciler._shown


def test_a_failed_list_keeps_the_change_for_the_next_event() -> None:
    kube = Listing({})
    reconciler = Reconciler(kube, build(kube, Images("p", "t", "e", "r", "l")))  # type: ignore[arg-type]
    reconciler.referrers(KIMI_MODEL, obj("kimi", conditions=ready(("Ready", "False"))))

    def refuse(*_: Any) -> list[dict[str, Any]]:
        raise api_error(500, "try again")

    kube.list_objects = refuse  # type: ignore[method-assign]
    done = obj("kimi", conditions=ready(("Ready", "True")))
    with pytest.raises(ApiException):
        reconciler.referrers(KIMI_MODEL, done)
    kube.list_objects = Listing({"FineTuneJob": [obj("tune", spec={"model": {"name": "kimi"}})]}).list_objects  # type: ignore[method-assign]
    assert names(reconciler.referrers(KIMI_MODEL, done)) == [("FineTuneJob", "tune")]
