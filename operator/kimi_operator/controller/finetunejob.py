"""The FineTuneJob reconcile pass: pin to a node holding the BF16 weights, run the training Job,
report what the Job and its pods say.

The training pod reports progress, the latest checkpoint and the exported adapter itself (server-side
apply under its own field manager); this pass owns the phase, the node, the attempts and conditions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kimi_operator.api.conditions import Reason, Verdict
from kimi_operator.api.exitcodes import OOM_EXIT, TrainExit
from kimi_operator.api.finetunejob import FineTuneJobSpec
from kimi_operator.api.kinds import KIMI_MODEL
from kimi_operator.controller.kimimodel import cleanup_waiting, job_state, model_or_wait
from kimi_operator.controller.kube import Kube
from kimi_operator.controller.pods import unscheduled
from kimi_operator.render import cleanup, llamafactory
from kimi_operator.render import finetunejob as render


class FtjReason(Reason):
    WAITING_FOR_WEIGHTS = "WaitingForWeights"
    WAITING_FOR_DATASET = "WaitingForDataset"
    SUSPENDED = "Suspended"
    STARTING = "Starting"
    TRAINING = "Training"
    OOM_KILLED = "OOMKilled"
    FAILED = "TrainingFailed"
    ADAPTER_MISSING = "AdapterMissing"


@dataclasses.dataclass(frozen=True)
class Settings:
    trainer_image: str


def _bf16_node(model: Mapping[str, Any], preferred: str | None) -> str | None:
    ready = [
        n["name"]
        for n in (model.get("status") or {}).get("nodes") or []
        if n.get("phase") == "Ready" and "bf16" in (n.get("variants") or [])
    ]
    if preferred in ready:
        return preferred
    return ready[0] if ready else None


def _last_failure(pods: list[dict[str, Any]]) -> tuple[int, str, str] | None:
    """(exit code, reason, message) of the most recent failed training pod."""
    failures = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") not in (None, 0):
                failures.append(
                    (
                        terminated.get("finishedAt") or "",
                        int(terminated["exitCode"]),
                        terminated.get("reason") or "",
                        (terminated.get("message") or "").strip(),
                    )
                )
    if not failures:
        return None
    _, code, reason, message = max(failures)
    return code, reason, message


def _oom_advice(spec: FineTuneJobSpec, attempt: int) -> str:
    t, r = spec.training, spec.resources
    return (
        f"attempt {attempt} was OOMKilled: lower spec.training.cutoffLen ({t.cutoff_len}) or "
        f"spec.training.perDeviceBatchSize ({t.per_device_batch_size}), or raise spec.resources.memory "
        f"({r.memory}) in a new FineTuneJob"
    )


def reconcile(
    kube: Kube, settings: Settings, body: Mapping[str, Any], spec: FineTuneJobSpec
) -> tuple[Verdict, dict[str, Any]]:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status = body.get("status") or {}
    model = model_or_wait(kube, namespace, spec.model.name)
    if isinstance(model, Verdict):
        return model, {}
    problem = _config_map_dataset_problem(kube, namespace, spec)
    if problem is not None:
        return problem, {}
    node = _bf16_node(model, status.get("node"))
    if node is None:
        return Verdict(
            state="progressing",
            reason=FtjReason.WAITING_FOR_WEIGHTS,
            message=f"waiting for KimiModel {spec.model.name} to hold the bf16 variant on a node",
        ), {}

    owner = render.owner(namespace, name, meta["uid"])
    for obj in render.rbac(owner):
        kube.apply(obj)
    output = render.output_dir(namespace, spec.model.name, name)
    files = llamafactory.config_files(
        spec,
        model_path=render.base_model_dir(namespace, spec.model.name),
        dataset_file=f"{output}/dataset.jsonl",
        output_dir=output,
        config_dir=render.CONFIG_MOUNT,
    )
    # Created with the Job and, like it, never changed: the pods of every attempt read the
    # configuration their Job was made with, whatever a later operator version renders.
    kube.create(render.config_map(owner, files))
    storage = model["spec"]["storage"]["hostPath"]
    desired = render.train_job(owner, spec, node, storage_path=storage, image=settings.trainer_image)
    # A Job's pod template cannot change: the Job is created once; later passes change only the
    # fields a live Job accepts (suspend, the queue label), and only when they differ.
    job = kube.create(desired)
    update = render.job_update(job, desired)
    if update:
        job = kube.merge_patch(job, update)
    node = _pinned_node(job) or node
    return _observe(kube, spec, namespace=namespace, job=job, node=node, status=status)


def _config_map_dataset_problem(kube: Kube, namespace: str, spec: FineTuneJobSpec) -> Verdict | None:
    """A dataset in a ConfigMap is at hand: one that is missing or has no records stops here, before
    a training pod takes a node's GPUs (the pod checks every record again before training)."""
    source = spec.dataset.config_map
    if source is None:
        return None
    found = kube.get("v1", "ConfigMap", namespace, source.name)
    if found is None:
        message = f"ConfigMap {source.name} (spec.dataset.configMap) does not exist in namespace {namespace}"
        return Verdict(state="progressing", reason=FtjReason.WAITING_FOR_DATASET, message=message)
    data = found.get("data") or {}
    if source.key not in data:
        keys = ", ".join(sorted(data)) or "none"
        message = f"ConfigMap {source.name} has no key {source.key} (spec.dataset.configMap.key); keys: {keys}"
        return Verdict(state="stalled", reason=TrainExit.INVALID_DATASET.reason, message=message)
    if not any(line.strip() for line in str(data[source.key]).split("\n")):
        message = f"ConfigMap {source.name} key {source.key}: no records: the dataset is empty"
        return Verdict(state="stalled", reason=TrainExit.INVALID_DATASET.reason, message=message)
    return None


def _pinned_node(job: Mapping[str, Any]) -> str | None:
    """The node an existing Job is pinned to (it may predate a change of the model's ready nodes)."""
    affinity = ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get("affinity") or {}
    terms = (
        affinity.get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    for term in terms:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == "kubernetes.io/hostname" and expr.get("values"):
                return str(expr["values"][0])
    return None


def _failed(spec: FineTuneJobSpec, failure: tuple[int, str, str] | None, attempts: int) -> tuple[str, str]:
    """(reason, message) of a training Job that failed for good."""
    if failure is not None and failure[0] in TrainExit._value2member_map_:
        code = TrainExit(failure[0])
        return code.reason, failure[2] or code.reason
    if failure is not None and (failure[0] == OOM_EXIT or failure[1] == "OOMKilled"):
        return FtjReason.OOM_KILLED, _oom_advice(spec, attempts)
    if failure is not None:
        return FtjReason.FAILED, f"exit code {failure[0]}: {failure[2] or failure[1]}"
    return FtjReason.FAILED, "the training Job failed"


def _observe(
    kube: Kube, spec: FineTuneJobSpec, *, namespace: str, job: Mapping[str, Any], node: str, status: Mapping[str, Any]
) -> tuple[Verdict, dict[str, Any]]:
    job_status = job.get("status") or {}
    counts = [int(job_status.get(k) or 0) for k in ("failed", "active", "succeeded")]
    attempts = sum(counts)
    starting = bool(counts[1] and not job_status.get("ready"))
    # The Job's pods, listed once when a failed or a starting attempt needs a look at them.
    pods = kube.list_pods(namespace, f"job-name={job['metadata']['name']}") if counts[0] or starting else []
    failure = _last_failure(pods) if counts[0] else None
    state = job_state(job)
    suspended = any(
        c.get("type") == "Suspended" and c.get("status") == "True" for c in job_status.get("conditions") or []
    )
    if state == "complete" and status.get("adapter"):
        verdict = Verdict(state="ready", reason=Reason.SUCCEEDED, message=f"adapter exported on {node}")
        phase = "Succeeded"
    elif state == "complete":
        message = "the training Job succeeded but its pod reported no adapter"
        verdict, phase = Verdict(state="stalled", reason=FtjReason.ADAPTER_MISSING, message=message), "Failed"
    elif state == "failed":
        reason, message = _failed(spec, failure, attempts)
        verdict, phase = Verdict(state="stalled", reason=reason, message=message), "Failed"
    elif suspended or (spec.suspend and not counts[1]):
        message = "the training Job is suspended (spec.suspend, or waiting for admission by its queue)"
        verdict, phase = Verdict(state="waiting", reason=FtjReason.SUSPENDED, message=message), "Suspended"
    elif starting:
        why = next((w for p in pods if (w := unscheduled(p))), None)
        message = f"attempt {attempts} is waiting for the pod to start on {node}" + (f": {why}" if why else "")
        verdict, phase = Verdict(state="progressing", reason=FtjReason.STARTING, message=message), "Pending"
    elif counts[1]:
        oom = failure is not None and (failure[0] == OOM_EXIT or failure[1] == "OOMKilled")
        reason, message = FtjReason.TRAINING, f"attempt {attempts} running on {node}"
        if oom:
            reason = FtjReason.OOM_KILLED
            message = f"{_oom_advice(spec, attempts - 1)}; retrying from the latest checkpoint"
        verdict, phase = Verdict(state="progressing", reason=reason, message=message), "Running"
    else:
        verdict = Verdict(state="progressing", reason=FtjReason.STARTING, message=f"starting on {node}")
        phase = "Pending"
    return verdict, {"node": node, "attempts": attempts, "phase": phase}


def finalize(kube: Kube, settings: Settings, body: Mapping[str, Any], spec: FineTuneJobSpec | None) -> list[str]:
    """Remove the outputs when the spec asks for it; return the cleanup Jobs still running.

    The training Job and its pods go with the FineTuneJob (owner references). Checkpoints and the
    adapter stay on the node unless ``spec.output.reclaimPolicy`` is Delete.
    """
    node = (body.get("status") or {}).get("node")
    if spec is None or spec.output.reclaim_policy != "Delete" or not node:
        return []
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    model = kube.get(KIMI_MODEL.api_version, KIMI_MODEL.kind, namespace, spec.model.name)
    if model is None:
        # The storage path is declared only in the KimiModel; without it there is nothing to mount.
        return []
    job = cleanup.cleanup_job(
        render.owner(namespace, name, meta["uid"]),
        node=node,
        storage_path=model["spec"]["storage"]["hostPath"],
        root=render.output_dir(namespace, spec.model.name, name),
        image=settings.trainer_image,
        pod_metadata=spec.pod_metadata,
    )
    return cleanup_waiting(job, kube.create(job))
