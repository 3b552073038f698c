from kimi_operator.api import conditions as cond
from kimi_operator.api.conditions import Verdict

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def types(conditions: list[cond.Condition]) -> dict[str, str]:
    return {c.type: c.status for c in conditions}


def test_ready_is_always_present_and_abnormal_conditions_only_while_true() -> None:
    waiting = cond.apply_verdict([], Verdict(state="waiting", reason="AwaitingReconciler", message="m"), 1, T0)
    assert types(waiting) == {"Ready": "False"}

    progressing = cond.apply_verdict(waiting, Verdict(state="progressing", reason="Progressing", message="m"), 1, T1)
    assert types(progressing) == {"Ready": "False", "Reconciling": "True"}

    stalled = cond.apply_verdict(progressing, Verdict(state="stalled", reason="InvalidSpec", message="bad"), 2, T1)
    # Never Reconciling and Stalled together.
    assert types(stalled) == {"Ready": "False", "Stalled": "True"}

    ready = cond.apply_verdict(stalled, Verdict(state="ready", reason="Succeeded", message="done"), 3, T1)
    assert types(ready) == {"Ready": "True"}
    assert all(c.observed_generation == 3 for c in ready)


def test_transition_time_moves_only_when_status_changes() -> None:
    first = cond.apply_verdict([], Verdict(state="waiting", reason="A", message="one"), 1, T0)
    same_status = cond.apply_verdict(first, Verdict(state="stalled", reason="B", message="two"), 2, T1)
    ready = cond.find(same_status, "Ready")
    assert ready is not None
    assert ready.last_transition_time == T0  # still False: no transition
    assert ready.reason == "B"
    assert ready.message == "two"
    flipped = cond.apply_verdict(same_status, Verdict(state="ready", reason="C", message="ok"), 3, T1)
    ready = cond.find(flipped, "Ready")
    assert ready is not None
    assert ready.last_transition_time == T1


def test_long_messages_are_truncated_to_the_api_limit() -> None:
    out = cond.apply_verdict([], Verdict(state="stalled", reason="X", message="x" * 40000), 1, T0)
    assert all(len(c.message) == cond.MAX_MESSAGE for c in out)
    assert out[0].message.endswith("...")


def test_wire_form_is_metav1_condition() -> None:
    (ready,) = cond.apply_verdict([], Verdict(state="waiting", reason="AwaitingReconciler", message="m"), 4, T0)
    assert ready.to_wire() == {
        "type": "Ready",
        "status": "False",
        "observedGeneration": 4,
        "lastTransitionTime": T0,
        "reason": "AwaitingReconciler",
        "message": "m",
    }
