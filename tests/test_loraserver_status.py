"""A LoraServer's status from pods and engine reports, as tables built from small helpers (the
way JobSet's failure-policy tests build their cases)."""

from __future__ import annotations

from typing import Any

import pytest

from kimi_operator.controller.loraserver_status import (
    ModelState,
    Replica,
    RouterState,
    Wanted,
    adapter_status,
    observe,
)
from kimi_operator.controller.pods import crashed

SHA1, SHA2 = "1" * 64, "2" * 64


def ready(*names: str) -> dict[str, Replica]:
    return {n: Replica(n, pod_ready=True) for n in names}


def not_ready(*names: str) -> dict[str, Replica]:
    return {n: Replica(n, pod_ready=False) for n in names}


def report(
    *adapters: str, up: bool = True, sha: str = SHA1, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "engineUp": up,
        "adapters": list(adapters),
        "loadedSha256": dict.fromkeys(adapters, sha),
        "errors": errors or [],
    }


def shared(name: str, *placed: str, sha: str | None = SHA1) -> Wanted:
    return Wanted(name, "Shared", tuple(placed), sha)


@pytest.mark.parametrize(
    ("adapter", "replicas", "reports", "state", "listed"),
    [
        (shared("a", "r0", "r1"), ready("r0", "r1"), {"r0": report("a"), "r1": report("a")}, "Loaded", ["r0", "r1"]),
        (shared("a", "r0", "r1"), ready("r0", "r1"), {"r0": report("a"), "r1": report()}, "Pending", ["r0"]),
        # The engine of r1 is down: whatever it listed before does not count.
        (
            shared("a", "r0", "r1"),
            ready("r0", "r1"),
            {"r0": report("a"), "r1": report("a", up=False)},
            "Pending",
            ["r0"],
        ),
        # The pod is not ready: its engine's listing does not count either.
        (shared("a", "r0"), not_ready("r0"), {"r0": report("a")}, "Pending", []),
        # Listed, but loaded from older files than the ones asked for.
        (shared("a", "r0", sha=SHA2), ready("r0"), {"r0": report("a", sha=SHA1)}, "Pending", []),
        # No digest asked for (a path without sha256): any listing counts.
        (shared("a", "r0", sha=None), ready("r0"), {"r0": report("a")}, "Loaded", ["r0"]),
        # Refused by the engine, with its words.
        (
            shared("a", "r0"),
            ready("r0"),
            {"r0": report(errors=[{"name": "a", "sha256": SHA1, "message": "rank 32 > max_lora_rank 16"}])},
            "Failed",
            [],
        ),
        # A refusal of older files does not fail the new ones.
        (
            shared("a", "r0", sha=SHA2),
            ready("r0"),
            {"r0": report(errors=[{"name": "a", "sha256": SHA1, "message": "old"}])},
            "Pending",
            [],
        ),
        # Placed nowhere.
        (shared("a"), ready("r0"), {"r0": report()}, "Pending", []),
        # Listed on a replica it is not placed on (an LRU reload): reported as listed, not required.
        (shared("a", "r0"), ready("r0", "r1"), {"r0": report("a"), "r1": report("a")}, "Loaded", ["r0", "r1"]),
        # The source is not ready: Pending with its reason, whatever engines list.
        (
            Wanted("a", "Unknown", blocked=("Pending", "waiting for FineTuneJob t")),
            ready("r0"),
            {"r0": report()},
            "Pending",
            [],
        ),
    ],
    ids=[
        "loaded",
        "one-missing",
        "engine-down",
        "pod-not-ready",
        "old-files",
        "no-digest",
        "refused",
        "old-refusal",
        "unplaced",
        "extra-listing",
        "blocked",
    ],
)
def test_adapter_state(
    adapter: Wanted, replicas: dict[str, Replica], reports: dict[str, dict[str, Any]], state: str, listed: list[str]
) -> None:
    entry = adapter_status(adapter, replicas, reports)
    assert entry["state"] == state, entry
    assert entry["replicas"] == listed
    if state == "Failed":
        assert entry["message"] == "replica r0: rank 32 > max_lora_rank 16"


def test_an_adapter_waiting_on_a_stuck_engine_fails_with_the_agents_words() -> None:
    """An unload that never returns holds every later update: the adapter is Failed, not Pending for ever."""
    stuck = {"name": "a", "reason": "EngineStuck", "message": "the engine's adapter updates are stuck; restart"}
    entry = adapter_status(shared("a", "r0"), ready("r0"), {"r0": report(errors=[stuck])})
    assert (entry["state"], entry["message"]) == (
        "Failed",
        "replica r0: the engine's adapter updates are stuck; restart",
    )


def test_ready_only_when_every_replica_serves_and_every_adapter_is_loaded() -> None:
    wanted = [shared("a", "r0", "r1"), Wanted("x", "Expert", ("x0",), SHA1)]
    reports = {"r0": report("a"), "r1": report("a"), "x0": report("x")}
    result = observe(
        wanted=wanted, desired_replicas=["r0", "r1", "x0"], replicas=ready("r0", "r1", "x0"), reports=reports
    )
    assert result.verdict.state == "ready"
    assert result.status["readyReplicas"] == 3
    assert (result.status["adaptersLoaded"], result.status["adaptersTotal"]) == (2, 2)


def test_a_replica_missing_is_progressing_and_named() -> None:
    wanted = [shared("a", "r0", "r1")]
    result = observe(wanted=wanted, desired_replicas=["r0", "r1"], replicas=ready("r0"), reports={"r0": report("a")})
    assert result.verdict.state == "progressing"
    assert result.verdict.reason == "StartingReplicas"
    assert "r1" in result.verdict.message
    assert result.status["replicas"] == 1


def test_a_refused_adapter_stalls_while_the_others_stay_loaded() -> None:
    wanted = [shared("a", "r0"), shared("bad", "r0")]
    errors = [{"name": "bad", "sha256": SHA1, "message": "corrupt safetensors"}]
    result = observe(
        wanted=wanted, desired_replicas=["r0"], replicas=ready("r0"), reports={"r0": report("a", errors=errors)}
    )
    assert result.verdict.state == "stalled"
    assert result.verdict.reason == "AdapterFailed"
    assert "bad: replica r0: corrupt safetensors" in result.verdict.message
    states = {a["name"]: a["state"] for a in result.status["adapters"]}
    assert states == {"a": "Loaded", "bad": "Failed"}


def test_loading_adapters_is_progressing() -> None:
    result = observe(
        wanted=[shared("a", "r0")], desired_replicas=["r0"], replicas=ready("r0"), reports={"r0": report()}
    )
    assert result.verdict.reason == "LoadingAdapters"


def test_a_report_of_an_earlier_pod_of_the_name_counts_for_nothing() -> None:
    # The pod was replaced: its new agent has not reported yet, the old report still lists "a".
    replicas = {"r0": Replica("r0", pod_ready=True, uid="new")}
    stale = {"r0": {**report("a"), "podUid": "old"}}
    entry = adapter_status(shared("a", "r0"), replicas, stale)
    assert entry["state"] == "Pending"
    assert entry["replicas"] == []
    fresh = {"r0": {**report("a"), "podUid": "new"}}
    assert adapter_status(shared("a", "r0"), replicas, fresh)["state"] == "Loaded"


def test_files_out_of_reach_are_unavailable_not_failed() -> None:
    errors = [{"name": "a", "reason": "Unavailable", "message": "not on this node (it is on node n2)"}]
    entry = adapter_status(shared("a", "r0"), ready("r0"), {"r0": report(errors=errors)})
    assert entry["state"] == "Unavailable"
    assert entry["message"] == "replica r0: not on this node (it is on node n2)"


def test_an_unplaced_shared_adapter_says_there_is_no_room() -> None:
    entry = adapter_status(shared("a"), ready("r0"), {"r0": report()})
    assert "no shared replica has room" in entry["message"]


@pytest.mark.parametrize(
    ("replicas", "model", "state", "reason", "words"),
    [
        # The model is still being prepared: nothing is wrong yet.
        (
            not_ready("r0"),
            ModelState("kimi", ready_nodes=0),
            "progressing",
            "NoEligibleNode",
            "no node holds KimiModel kimi",
        ),
        # Its preparation failed: the LoraServer cannot serve until the user acts.
        (
            not_ready("r0"),
            ModelState("kimi", stalled="InsufficientDisk: node n1: 2 TB needed"),
            "stalled",
            "ModelNotReady",
            "InsufficientDisk",
        ),
        # On nodes, but the scheduler has no room for the replica.
        (
            {
                "r0": Replica(
                    "r0", pod_ready=False, unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
                )
            },
            ModelState("kimi"),
            "stalled",
            "NoEligibleNode",
            "replica r0 cannot be scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        ),
        # Scheduled, starting.
        (not_ready("r0"), ModelState("kimi"), "progressing", "StartingReplicas", "0/1 replicas serving"),
    ],
    ids=["model-preparing", "model-stalled", "no-room", "starting"],
)
def test_the_model_and_the_scheduler_say_why_replicas_do_not_serve(
    replicas: dict[str, Replica], model: ModelState, state: str, reason: str, words: str
) -> None:
    result = observe(wanted=[], desired_replicas=["r0"], replicas=replicas, reports={}, model=model)
    assert (result.verdict.state, result.verdict.reason) == (state, reason)
    assert words in result.verdict.message


ROUTER_URL = "http://serve-router.ml.svc:8000/v1"


@pytest.mark.parametrize(
    ("router_ready", "state", "endpoint"),
    [(1, "ready", ROUTER_URL), (0, "progressing", None)],
    ids=["router-ready", "no-router-ready"],
)
def test_the_endpoint_is_given_only_while_a_router_answers_on_it(
    router_ready: int, state: str, endpoint: str | None
) -> None:
    result = observe(
        wanted=[shared("a", "r0")],
        desired_replicas=["r0"],
        replicas=ready("r0"),
        reports={"r0": report("a")},
        router=RouterState(desired=1, ready=router_ready, endpoint=ROUTER_URL),
    )
    assert result.verdict.state == state
    assert result.status.get("endpoint") == endpoint
    # Never a null: the schema refuses it, and leaving the field out removes it (server-side apply).
    assert None not in result.status.values()
    assert result.status["routerReadyReplicas"] == router_ready
    if state != "ready":
        assert result.verdict.reason == "StartingRouter"


def test_an_expert_engine_that_exits_at_start_fails_its_adapter_with_the_engines_words() -> None:
    crashing = {
        "x0": Replica("x0", pod_ready=False, crashed="Error (exit code 1): ValueError: LoRA rank 32 > max_lora_rank 16")
    }
    entry = adapter_status(Wanted("x", "Expert", ("x0",), SHA1), crashing, {})
    assert entry["state"] == "Failed"
    assert entry["message"] == (
        "replica x0: the engine exits at start: Error (exit code 1): ValueError: LoRA rank 32 > max_lora_rank 16"
    )
    # A shared engine that crashed says nothing about one adapter: it is only not serving.
    shared_crash = {"r0": Replica("r0", pod_ready=False, crashed="OOMKilled (exit code 137)")}
    assert adapter_status(shared("a", "r0"), shared_crash, {})["state"] == "Pending"


def test_crashed_reads_the_last_termination_of_the_container() -> None:
    pod = {
        "status": {
            "containerStatuses": [
                {"name": "adapter-agent", "state": {"running": {}}},
                {
                    "name": "engine",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {
                        "terminated": {"reason": "Error", "exitCode": 1, "message": "loading\nValueError: rank 32"}
                    },
                },
            ]
        }
    }
    assert crashed(pod, "engine") == "Error (exit code 1): ValueError: rank 32"
    assert crashed(pod, "adapter-agent") is None
    running = {"status": {"containerStatuses": [{"name": "engine", "state": {"running": {}}, "lastState": {}}]}}
    assert crashed(running, "engine") is None
    # One exit is not a crash loop (the kubelet restarts it at once), nor is a pod on its way out.
    once = {
        "status": {
            "containerStatuses": [{"name": "engine", "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]
        }
    }
    assert crashed(once, "engine") is None
    assert crashed({**pod, "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}, "engine") is None
