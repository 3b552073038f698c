"""A LoraServer's status from what the pods and the engines say (pure: table-tested, no I/O).

Nothing here trusts the plan: an adapter is Loaded on a replica only when that replica's pod is
ready, its agent reports the engine up, and the engine's own /v1/models lists the adapter with
the files the plan asks for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from kimi_operator.api.conditions import Reason, Verdict


class LsReason(Reason):
    MODEL_NOT_READY = "ModelNotReady"
    VARIANT_MISSING = "VariantMissing"
    NO_ELIGIBLE_NODE = "NoEligibleNode"
    STARTING = "StartingReplicas"
    LOADING = "LoadingAdapters"
    ROUTER = "StartingRouter"
    ADAPTER_FAILED = "AdapterFailed"
    SERVING = "Serving"


@dataclasses.dataclass(frozen=True)
class Wanted:
    """One adapter of the spec, resolved against its source."""

    name: str
    kind: str  # Shared, Expert or Unknown (source not resolved yet)
    placed: tuple[str, ...] = ()
    sha256: str | None = None
    source: str | None = None
    # Why it cannot be placed or loaded (source not ready, files out of reach, refused before any
    # engine sees it): Pending, Unavailable or Failed with this message, whatever the engines say.
    blocked: tuple[str, str] | None = None
    # llama.cpp: trained modules the engines will not apply, accepted by the user.
    dropped: tuple[str, ...] = ()
    # Loaded only when an engine starts (llama.cpp): waiting means waiting for replicas to restart.
    at_start: bool = False


@dataclasses.dataclass(frozen=True)
class Replica:
    name: str
    pod_ready: bool
    node: str | None = None
    uid: str | None = None
    # The scheduler's word on a pod it cannot place (Insufficient nvidia.com/gpu, affinity, ...).
    unschedulable: str | None = None
    # Why its engine keeps exiting (it is not running): an expert engine that cannot start with its
    # adapter (a rank above maxLoraRank, corrupt files) says so only this way.
    crashed: str | None = None


@dataclasses.dataclass(frozen=True)
class RouterState:
    """The router pods: how many are wanted and ready, and the Service URL they answer on."""

    desired: int
    ready: int
    endpoint: str


@dataclasses.dataclass(frozen=True)
class Observation:
    verdict: Verdict
    status: dict[str, Any]


def _serving(replica: Replica, report: Mapping[str, Any] | None) -> bool:
    if not (replica.pod_ready and report and report.get("engineUp")):
        return False
    # A report of an earlier pod of the same name says nothing about this one's engine.
    return replica.uid is None or report.get("podUid") == replica.uid


def _lists(report: Mapping[str, Any] | None, adapter: Wanted) -> bool:
    if not report or adapter.name not in (report.get("adapters") or []):
        return False
    loaded = (report.get("loadedSha256") or {}).get(adapter.name)
    # A listed adapter loaded from other files (an older export) is not the one asked for.
    return adapter.sha256 is None or loaded == adapter.sha256


def _problem(report: Mapping[str, Any] | None, adapter: Wanted) -> tuple[str, str] | None:
    """(state, message) of an adapter a replica reports it cannot serve: Failed when its engine
    refused the files, Unavailable when the agent could not get them."""
    for error in (report or {}).get("errors") or []:
        if error.get("name") != adapter.name:
            continue
        if adapter.sha256 is not None and error.get("sha256") not in (None, adapter.sha256):
            continue  # about other files than the ones asked for now
        state = "Unavailable" if error.get("reason") == "Unavailable" else "Failed"
        return state, str(error.get("message") or "refused by the engine")
    return None


def _current(replica: Replica, report: Mapping[str, Any] | None) -> bool:
    return bool(report) and (replica.uid is None or (report or {}).get("podUid") == replica.uid)


def _bounded(message: str, limit: int = 4000) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _refused_at_start(adapter: Wanted, name: str, replicas: Mapping[str, Replica], serving: set[str]) -> str | None:
    """Why the replica's engine keeps exiting, when that says it refused this adapter: a dedicated
    engine loads its one adapter at start; one that starts with several (llama.cpp) refused this
    one only if its words name its files."""
    replica = replicas.get(name)
    if replica is None or not replica.crashed or name in serving:
        return None
    if adapter.kind == "Expert" or (adapter.at_start and adapter.sha256 and adapter.sha256 in replica.crashed):
        return replica.crashed
    return None


def adapter_status(
    adapter: Wanted, replicas: Mapping[str, Replica], reports: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    serving = {n for n, r in replicas.items() if _serving(r, reports.get(n))}
    listing = sorted(n for n in serving if _lists(reports.get(n), adapter))
    entry: dict[str, Any] = {
        "name": adapter.name,
        "kind": adapter.kind,
        "placed": list(adapter.placed),
        "replicas": listing,
    }
    if adapter.sha256:
        entry["sha256"] = adapter.sha256
    if adapter.source:
        entry["source"] = adapter.source
    if adapter.dropped:
        entry["llamacppDroppedModules"] = list(adapter.dropped)
    # Only the reports of this pod's agent count (serving or not: a refusal needs no engine up).
    problems = [
        (n, p)
        for n in adapter.placed
        if n in replicas and _current(replicas[n], reports.get(n)) and (p := _problem(reports.get(n), adapter))
    ]
    crashes = [(n, why) for n in adapter.placed if (why := _refused_at_start(adapter, n, replicas, serving))]
    if adapter.blocked is not None:
        entry["state"], entry["message"] = adapter.blocked
    elif crashes:
        name, why = crashes[0]
        entry["state"], entry["message"] = "Failed", _bounded(f"replica {name}: the engine exits at start: {why}")
    elif problems:
        name, (state, message) = problems[0]
        entry["state"], entry["message"] = state, _bounded(f"replica {name}: {message}")
    elif not adapter.placed:
        entry["state"], entry["message"] = (
            "Pending",
            "placed on no replica: no shared replica has room for it (raise engine.maxLoadedLoras or replicas)"
            if adapter.kind == "Shared"
            else "placed on no replica yet",
        )
    elif set(adapter.placed) <= set(listing):
        entry["state"] = "Loaded"
    else:
        missing = [n for n in adapter.placed if n not in listing]
        down = [n for n in missing if n not in serving]
        why = f"not yet listed by {', '.join(missing)}"
        if down:
            why += f" ({', '.join(down)} not serving)"
        if adapter.at_start:
            why += "; llama.cpp loads adapters only at start: the replicas restart one at a time to take this list"
            crashed = [
                f"{n}: the engine exits at start: {replicas[n].crashed}"
                for n in down
                if n in replicas and replicas[n].crashed
            ]
            if crashed:
                why += f" ({'; '.join(crashed)})"
        entry["state"], entry["message"] = "Pending", why
    return entry


@dataclasses.dataclass(frozen=True)
class ModelState:
    """What the LoraServer's KimiModel says of itself."""

    name: str
    ready_nodes: int = 1
    # The KimiModel's own Stalled message: preparation failed and will not finish by itself.
    stalled: str | None = None


def observe(
    *,
    wanted: Sequence[Wanted],
    desired_replicas: Sequence[str],
    replicas: Mapping[str, Replica],
    reports: Mapping[str, Mapping[str, Any]],
    model: ModelState | None = None,
    router: RouterState | None = None,
) -> Observation:
    """The verdict and the operator's status fields of a LoraServer whose children exist."""
    adapters = [adapter_status(a, replicas, reports) for a in wanted]
    serving = sorted(n for n in desired_replicas if n in replicas and _serving(replicas[n], reports.get(n)))
    loaded = sum(a["state"] == "Loaded" for a in adapters)
    status: dict[str, Any] = {
        "replicas": sum(n in replicas for n in desired_replicas),
        "readyReplicas": len(serving),
        "desiredReplicas": len(desired_replicas),
        "adaptersLoaded": loaded,
        "adaptersTotal": len(adapters),
        "adapters": adapters,
    }
    if router is not None:
        status["routerReadyReplicas"] = router.ready
        # The URL is given only while a router answers on it (a router is ready only while it
        # knows a ready engine replica). Left out otherwise: server-side apply then removes it
        # (a null is refused by the schema).
        if router.ready > 0:
            status["endpoint"] = router.endpoint
    verdict = _verdict(adapters, serving, desired_replicas, replicas, model or ModelState(name=""), router=router)
    return Observation(verdict, status)


def _verdict(
    adapters: Sequence[Mapping[str, Any]],
    serving: Sequence[str],
    desired: Sequence[str],
    replicas: Mapping[str, Replica],
    model: ModelState,
    *,
    router: RouterState | None = None,
) -> Verdict:
    """The first that holds, in order: what will not get better by itself (Stalled), then what is
    still on its way (Progressing), then Ready."""
    failed = [a for a in adapters if a["state"] in ("Failed", "Unavailable")]
    unplaced = [(n, replicas[n].unschedulable) for n in desired if n in replicas and replicas[n].unschedulable]
    waiting = [n for n in desired if n not in serving]
    pending = [a["name"] for a in adapters if a["state"] != "Loaded"]
    checks: list[tuple[bool, str, str, str]] = [
        (
            bool(failed),
            "stalled",
            LsReason.ADAPTER_FAILED,
            "; ".join(f"{a['name']}: {a['message']}" for a in failed),
        ),
        (
            model.stalled is not None,
            "stalled",
            LsReason.MODEL_NOT_READY,
            f"KimiModel {model.name} is stalled: {model.stalled}",
        ),
        (
            bool(waiting) and model.ready_nodes == 0,
            "progressing",
            LsReason.NO_ELIGIBLE_NODE,
            f"no node holds KimiModel {model.name} yet; {len(desired)} replicas wait for its ready label",
        ),
        (
            # The model is on nodes, but none of them can take these replicas (GPUs, memory taken).
            bool(unplaced),
            "stalled",
            LsReason.NO_ELIGIBLE_NODE,
            "; ".join(f"replica {n} cannot be scheduled: {why}" for n, why in unplaced),
        ),
        (
            bool(waiting),
            "progressing",
            LsReason.STARTING,
            f"{len(serving)}/{len(desired)} replicas serving; waiting for {', '.join(waiting)}",
        ),
        (
            bool(pending),
            "progressing",
            LsReason.LOADING,
            f"{len(adapters) - len(pending)}/{len(adapters)} adapters loaded; pending: {', '.join(pending)}",
        ),
        (
            # Without any engine replica (scaled to zero) no router can be ready: nothing to wait for.
            router is not None and router.ready == 0 and bool(desired),
            "progressing",
            LsReason.ROUTER,
            f"no router pod is ready yet (0/{router.desired if router else 0})",
        ),
    ]
    for holds, state, reason, message in checks:
        if holds:
            return Verdict(state=state, reason=reason, message=message)
    message = f"{len(serving)} replicas serving the base model and {len(adapters)} adapters"
    return Verdict(state="ready", reason=LsReason.SERVING, message=message)
