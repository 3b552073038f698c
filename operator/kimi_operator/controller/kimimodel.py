"""The KimiModel reconcile pass: choose nodes, run one prepare Job per node, label ready nodes.

Level-triggered: every pass recomputes the whole picture from the API (nodes, Jobs, pods) and the
spec; running it twice creates nothing twice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kimi_operator.api.conditions import Reason, Verdict
from kimi_operator.api.exitcodes import PERMANENT, PrepareExit
from kimi_operator.api.kimimodel import KimiModelSpec, NodeStatus
from kimi_operator.api.kinds import KIMI_MODEL
from kimi_operator.controller.kube import Kube, controlled_by
from kimi_operator.render import kimimodel as render
from kimi_operator.render.labels import common, selector

log = logging.getLogger("kimi_operator.controller")


class KmReason(Reason):
    # For the kinds that use a KimiModel: it does not exist (yet).
    WAITING_FOR_MODEL = "WaitingForModel"

    NODES_READY = "NodesReady"
    PREPARING = "Preparing"
    INSUFFICIENT_NODES = "InsufficientNodes"
    PREPARE_FAILED = "PrepareFailed"


@dataclasses.dataclass(frozen=True)
class Settings:
    prepare_image: str


@dataclasses.dataclass
class Observed:
    verdict: Verdict
    status: dict[str, Any]


def node_facts(node: Mapping[str, Any]) -> render.NodeFacts:
    status = node.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return render.NodeFacts(
        name=node["metadata"]["name"],
        labels=node["metadata"].get("labels") or {},
        allocatable=status.get("allocatable") or {},
        ready=ready,
        unschedulable=bool((node.get("spec") or {}).get("unschedulable")),
    )


def _candidates(kube: Kube, spec: KimiModelSpec) -> tuple[list[render.NodeFacts], dict[str, str]]:
    """Candidate nodes, and the names asked for that do not exist."""
    if spec.placement.node_names is not None:
        found = {n["metadata"]["name"]: node_facts(n) for n in kube.list_nodes()}
        missing = {n: "node not found" for n in spec.placement.node_names if n not in found}
        return [found[n] for n in spec.placement.node_names if n in found], missing
    assert spec.placement.node_selector is not None
    nodes = kube.list_nodes(selector(spec.placement.node_selector.match_labels))
    return sorted((node_facts(n) for n in nodes), key=lambda f: f.name), {}


def _failure(kube: Kube, namespace: str, job: Mapping[str, Any]) -> tuple[str, str, bool]:
    """(reason, message, permanent) of a failed prepare Job, from its pods' exit codes."""
    name = job["metadata"]["name"]
    for pod in kube.list_pods(namespace, f"job-name={name}"):
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            code = terminated.get("exitCode")
            if code is None or code == 0:
                continue
            detail = (terminated.get("message") or terminated.get("reason") or "").strip()
            if code >= PERMANENT and code in PrepareExit._value2member_map_:
                return PrepareExit(code).reason, detail or f"exit code {code}", True
            return KmReason.PREPARE_FAILED, detail or f"exit code {code}", False
    conditions = (job.get("status") or {}).get("conditions") or []
    failed: dict[str, Any] = next((c for c in conditions if c.get("type") == "Failed"), {})
    return KmReason.PREPARE_FAILED, failed.get("message") or "prepare Job failed", True


def model_or_wait(kube: Kube, namespace: str, name: str) -> dict[str, Any] | Verdict:
    """The KimiModel a FineTuneJob or a LoraServer names, or the verdict of waiting for it."""
    model = kube.get(KIMI_MODEL.api_version, KIMI_MODEL.kind, namespace, name)
    if model is not None:
        return model
    message = f"KimiModel {name} does not exist in namespace {namespace}"
    return Verdict(state="progressing", reason=KmReason.WAITING_FOR_MODEL, message=message)


def cleanup_waiting(job: Mapping[str, Any], created: Mapping[str, Any] | None) -> list[str]:
    """What a finalizer still waits for after creating (or finding) a cleanup Job: nothing once it
    completed, or once it failed (its files stay: said in the log, the deletion is not held forever
    by a node that is gone or a directory that cannot be removed)."""
    state = job_state(created)
    if state == "failed":
        log.warning(
            "cleanup Job %s/%s failed; its files may remain on the node: %s",
            job["metadata"]["namespace"],
            job["metadata"]["name"],
            " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"]),
        )
    return [] if state in ("complete", "failed") else [f"cleanup Job {job['metadata']['name']}"]


def job_state(job: Mapping[str, Any] | None) -> str:
    if job is None:
        return "missing"
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            return str(c["type"]).lower()
    return "running"


def reconcile(kube: Kube, settings: Settings, body: Mapping[str, Any], spec: KimiModelSpec) -> Observed:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    owner = render.owner(namespace, name, meta["uid"])
    label = render.model_label(namespace, name)
    previous = {n.get("name"): n for n in (body.get("status") or {}).get("nodes") or []}

    candidates, missing = _candidates(kube, spec)
    ineligible = dict(missing)
    eligible = []
    for facts in candidates:
        why = render.ineligible_reason(facts, spec)
        if why:
            ineligible[facts.name] = why
        else:
            eligible.append(facts.name)
    # Nodes already at work keep their place; new ones are taken in name order.
    kept = [n for n in eligible if previous.get(n, {}).get("phase") in ("Preparing", "Ready", "Failed")]
    chosen = (kept + [n for n in eligible if n not in kept])[: spec.placement.count]

    for obj in render.prepare_rbac(owner):
        kube.apply(obj)
    # Jobs of an earlier KimiModel of the same name (not yet collected) say nothing about this one.
    jobs = {
        j["metadata"]["name"]: j
        for j in kube.list_jobs(namespace, _job_selector(name))
        if controlled_by(j, meta["uid"])
    }
    nodes: list[NodeStatus] = []
    stalled: list[tuple[str, str]] = []
    for node in chosen:
        desired = render.prepare_job(owner, spec, node, image=settings.prepare_image)
        job_name = desired["metadata"]["name"]
        if job_name not in jobs:
            # Created once: a prepare Job is never updated (its pod template is immutable).
            jobs[job_name] = kube.create(desired)
        state = job_state(jobs.get(job_name))
        if state == "complete":
            nodes.append(NodeStatus(name=node, phase="Ready", variants=list(spec.variants), job=job_name))
        elif state == "failed":
            reason, message, permanent = _failure(kube, namespace, jobs[job_name])
            nodes.append(NodeStatus(name=node, phase="Failed", job=job_name, message=f"{reason}: {message}"))
            if permanent:
                stalled.append((reason, f"node {node}: {message}"))
        else:
            nodes.append(NodeStatus(name=node, phase="Preparing", job=job_name))
    for node_name, why in sorted(ineligible.items()):
        nodes.append(NodeStatus(name=node_name, phase="Ineligible", message=why))

    ready = sorted(n.name for n in nodes if n.phase == "Ready")
    _sync_labels(kube, label, set(ready))
    verdict = _verdict(spec, ready, chosen, ineligible, stalled)
    status: dict[str, Any] = {
        "readyNodes": len(ready),
        "nodes": [n.to_wire() for n in nodes],
    }
    status.update(_resolved(previous.values()))
    return Observed(verdict, status)


def _resolved(nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The commits the prepare pods resolved the requested revisions to, and the GGUF file to load,
    as they reported them."""
    resolved = {}
    for field, key in (
        ("revision", "resolvedRevision"),
        ("ggufRevision", "resolvedGgufRevision"),
        ("ggufEntry", "ggufEntry"),
    ):
        found = next((n["progress"][field] for n in nodes if (n.get("progress") or {}).get(field)), None)
        if found:
            resolved[key] = found
    return resolved


def _job_selector(name: str) -> str:
    return selector(common(KIMI_MODEL.kind, name, "prepare"))


def _sync_labels(kube: Kube, label: str, ready: set[str]) -> None:
    labelled = {n["metadata"]["name"] for n in kube.list_nodes(label)}
    for node in sorted(ready - labelled):
        kube.label_node(node, label, render.READY)
    for node in sorted(labelled - ready):
        kube.label_node(node, label, None)


def _verdict(
    spec: KimiModelSpec,
    ready: Sequence[str],
    chosen: Sequence[str],
    ineligible: Mapping[str, str],
    stalled: Sequence[tuple[str, str]],
) -> Verdict:
    want = spec.placement.count
    variants = ", ".join(spec.variants)
    if len(ready) >= want:
        return Verdict(state="ready", reason=KmReason.NODES_READY, message=f"{len(ready)}/{want} nodes hold {variants}")
    if stalled:
        reason = stalled[0][0]
        return Verdict(state="stalled", reason=reason, message="; ".join(m for _, m in stalled))
    if len(chosen) < want:
        why = "; ".join(f"{n}: {r}" for n, r in sorted(ineligible.items())) or "no candidate nodes"
        return Verdict(
            state="stalled",
            reason=KmReason.INSUFFICIENT_NODES,
            message=f"{want} nodes wanted, {len(chosen)} eligible; ineligible: {why}",
        )
    waiting = [n for n in chosen if n not in ready]
    return Verdict(
        state="progressing",
        reason=KmReason.PREPARING,
        message=f"{len(ready)}/{want} nodes ready; preparing {variants} on {', '.join(waiting)}",
    )


def finalize(kube: Kube, settings: Settings, body: Mapping[str, Any], spec: KimiModelSpec | None) -> list[str]:
    """Undo what the model put on nodes; return the cleanup Jobs still running (empty when done)."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    label = render.model_label(namespace, name)
    for node in kube.list_nodes(label):
        kube.label_node(node["metadata"]["name"], label, None)
    if spec is None or spec.storage.reclaim_policy != "Delete":
        return []
    owner = render.owner(namespace, name, meta["uid"])
    holding = [n.get("name") for n in (body.get("status") or {}).get("nodes") or [] if n.get("phase") != "Ineligible"]
    waiting = []
    for node in holding:
        job = render.cleanup_job(owner, spec, node, image=settings.prepare_image)
        waiting += cleanup_waiting(job, kube.create(job))
    return waiting
