from typing import Any

from kimi_operator.api.conditions import Verdict
from kimi_operator.api.kinds import FINE_TUNE_JOB, KIMI_MODEL, LORA_SERVER
from kimi_operator.controller.reconcile import evaluate

NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"


def body(spec: dict[str, Any], generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "x", "namespace": "ns", "generation": generation}, "spec": spec, "status": status}


VALID_KM = {
    "source": {"path": {"path": "/models/kimi"}},
    "placement": {"nodeNames": ["n1"]},
    "storage": {"hostPath": "/mnt/nvme"},
}


def test_valid_spec_is_accepted_but_never_claimed_ready() -> None:
    result = evaluate(KIMI_MODEL, body(VALID_KM, generation=3), NOW)
    patch = result.status
    assert result.changed
    assert patch["observedGeneration"] == 3
    assert patch["phase"] == "Pending"
    (ready,) = patch["conditions"]
    assert ready["type"] == "Ready"
    assert ready["status"] == "False"
    assert ready["reason"] == "AwaitingReconciler"
    assert "not implemented" in ready["message"]


def test_invalid_spec_is_stalled_with_the_field_named() -> None:
    bad = {**VALID_KM, "placement": {"nodeNames": ["n1"], "count": 0}}
    result = evaluate(KIMI_MODEL, body(bad), NOW)
    by_type = {c["type"]: c for c in result.status["conditions"]}
    assert by_type["Stalled"]["status"] == "True"
    assert by_type["Stalled"]["reason"] == "InvalidSpec"
    assert "spec.placement.count" in by_type["Stalled"]["message"]
    assert by_type["Ready"]["status"] == "False"
    assert "Reconciling" not in by_type
    assert result.status["phase"] == "Stalled"


def test_missing_spec_is_stalled_not_a_crash() -> None:
    result = evaluate(FINE_TUNE_JOB, {"metadata": {"generation": 1}}, NOW)
    message = result.status["conditions"][0]["message"]
    assert "spec.model: Field required" in message
    assert "spec.dataset: Field required" in message


def test_second_pass_on_same_generation_patches_nothing() -> None:
    spec = {"model": {"name": "kimi"}}
    first = evaluate(LORA_SERVER, body(spec, generation=2), NOW)
    second = evaluate(LORA_SERVER, body(spec, generation=2, status=first.status), LATER)
    assert second.status == first.status
    assert not second.changed


def test_spec_change_updates_observed_generation_and_keeps_transition_time() -> None:
    spec = {"model": {"name": "kimi"}}
    first = evaluate(LORA_SERVER, body(spec, generation=1), NOW)
    second = evaluate(LORA_SERVER, body(spec, generation=2, status=first.status), LATER)
    assert second.status["observedGeneration"] == 2
    (ready,) = second.status["conditions"]
    assert ready["observedGeneration"] == 2
    assert ready["lastTransitionTime"] == NOW


def test_pod_owned_progress_does_not_count_as_a_change() -> None:
    def work(spec: object) -> tuple[Verdict, dict[str, Any]]:
        return Verdict(state="progressing", reason="Preparing", message="m"), {
            "nodes": [{"name": "n1", "phase": "Preparing"}]
        }

    first = evaluate(KIMI_MODEL, body(VALID_KM), NOW, work)
    stored = {**first.status, "nodes": [{"name": "n1", "phase": "Preparing", "progress": {"step": "Downloading"}}]}
    again = evaluate(KIMI_MODEL, body(VALID_KM, status=stored), LATER, work)
    assert not again.changed
    assert [c["type"] for c in again.status["conditions"]] == ["Ready", "Reconciling"]


def test_recovery_from_invalid_removes_stalled() -> None:
    bad = evaluate(KIMI_MODEL, body({}, generation=1), NOW)
    fixed = evaluate(KIMI_MODEL, body(VALID_KM, generation=2, status=bad.status), LATER)
    assert [c["type"] for c in fixed.status["conditions"]] == ["Ready"]
