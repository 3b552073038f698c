"""Pure builders for a FineTuneJob's children: the training Job, its ConfigMap and its RBAC."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kimi_operator.api.exitcodes import TrainExit
from kimi_operator.api.finetunejob import EXPORTED_ADAPTER_DIR, KIND, PLURAL, FineTuneJobSpec
from kimi_operator.render.jobs import pinned, workload_job
from kimi_operator.render.kimimodel import MOUNT, READY, model_dir, model_label
from kimi_operator.render.labels import common
from kimi_operator.render.owner import Owner, status_rbac

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONFIG_MOUNT = "/etc/kimi-train"
DATA_MOUNT = "/data"
PUBLISH_MOUNT = "/publish"
COMPONENT = "train"


def owner(namespace: str, name: str, uid: str) -> Owner:
    return Owner(KIND, PLURAL, namespace, name, uid)


def _name(owner: str, suffix: str) -> str:
    return f"{owner[: 63 - len(suffix) - 1]}-{suffix}"


def job_name(owner: str) -> str:
    return _name(owner, "train")


def service_account_name(owner: str) -> str:
    return _name(owner, "train")


def config_map_name(owner: str) -> str:
    return _name(owner, "train")


def base_model_dir(namespace: str, model: str) -> str:
    """The BF16 weights a FineTuneJob trains on, as its pod sees them."""
    return f"{model_dir(namespace, model)}/bf16"


def output_dir(namespace: str, model: str, name: str) -> str:
    """Checkpoints and the adapter, on the node's storage beside the weights they were trained on."""
    return f"{model_dir(namespace, model)}/finetune/{name}"


def adapter_dir(namespace: str, model: str, name: str) -> str:
    """The exported adapter, once complete."""
    return f"{output_dir(namespace, model, name)}/{EXPORTED_ADAPTER_DIR}"


def rbac(owner: Owner) -> list[dict[str, Any]]:
    """The training pod may patch this FineTuneJob's status (progress, adapter) and nothing else."""
    return status_rbac(owner, service_account_name(owner.name), COMPONENT)


def config_map(owner: Owner, files: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owner.metadata(config_map_name(owner.name), COMPONENT),
        "data": files,
    }


def _dataset_volume(spec: FineTuneJobSpec) -> tuple[dict[str, Any] | None, str]:
    """The volume holding the records, and the records' path inside the container."""
    data = spec.dataset
    if data.config_map is not None:
        volume = {"name": "dataset", "configMap": {"name": data.config_map.name}}
        return volume, f"{DATA_MOUNT}/{data.config_map.key}"
    if data.persistent_volume_claim is not None:
        claim = data.persistent_volume_claim
        volume = {"name": "dataset", "persistentVolumeClaim": {"claimName": claim.claim_name, "readOnly": True}}
        return volume, f"{DATA_MOUNT}/{claim.path}"
    if data.host_path is not None:
        parent, _, filename = data.host_path.path.rpartition("/")
        return {"name": "dataset", "hostPath": {"path": parent or "/", "type": "Directory"}}, f"{DATA_MOUNT}/{filename}"
    return None, ""  # from the hub: downloaded by the pod (see train_job)


def train_job(owner: Owner, spec: FineTuneJobSpec, node: str, *, storage_path: str, image: str) -> dict[str, Any]:
    """The batch Job: validates the dataset, trains, exports the adapter; pinned to ``node``.

    ``storage_path`` is the KimiModel's ``spec.storage.hostPath``: the one place it is declared.
    """
    model = spec.model.name
    labels = common(KIND, owner.name, COMPONENT)
    meta = owner.metadata(job_name(owner.name), COMPONENT)
    if spec.queue_name:
        meta["labels"] = {**meta["labels"], KUEUE_QUEUE_LABEL: spec.queue_name}
    resources = {
        "nvidia.com/gpu": str(spec.resources.gpus),
        "cpu": str(spec.resources.cpu),
        "memory": str(spec.resources.memory),
    }
    dataset_volume, dataset_path = _dataset_volume(spec)
    volumes: list[dict[str, Any]] = [
        {"name": "models", "hostPath": {"path": storage_path, "type": "Directory"}},
        {"name": "config", "configMap": {"name": config_map_name(owner.name)}},
        # NCCL and the data loaders share memory through /dev/shm; the container default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.resources.shared_memory)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "models", "mountPath": MOUNT},
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 (the shared-memory mount, not a temp file)
    ]
    if dataset_volume is not None:
        volumes.append(dataset_volume)
        mounts.append({"name": "dataset", "mountPath": DATA_MOUNT, "readOnly": True})
    args = [
        "train",
        f"--config-dir={CONFIG_MOUNT}",
        f"--dataset={dataset_path}",
        f"--output-dir={output_dir(owner.namespace, model, owner.name)}",
        f"--report={owner.namespace}/{owner.name}",
        "--node=$(NODE_NAME)",
        f"--adapter-name={spec.output.adapter_name or owner.name}",
        f"--base-model={model}",
        # The paths the pod mounts are arguments, not only configuration: the training command
        # derives LLaMA-Factory's paths from them (a runner that cannot mount rewrites arguments).
        f"--model-dir={base_model_dir(owner.namespace, model)}",
    ]
    if spec.dataset.messages_key is not None:
        # Unset: the pod detects the key from the records.
        args.append(f"--messages-key={spec.dataset.messages_key}")
    if spec.lora.experts:
        args.append("--lora-experts")
    if spec.resources.gpus > 1:
        # One training process per GPU (accelerate launch, FSDP2): LLaMA-Factory refuses several GPUs in
        # one plain process, and under KT one such process takes the DataParallel path, which fails.
        args.append(f"--processes={spec.resources.gpus}")
    if spec.output.publish is not None:
        claim = spec.output.publish.persistent_volume_claim.claim_name
        volumes.append({"name": "publish", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "publish", "mountPath": PUBLISH_MOUNT})
        args += [f"--publish-dir={PUBLISH_MOUNT}", f"--publish-claim={claim}", f"--publish-namespace={owner.namespace}"]
    env: list[dict[str, Any]] = [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        # kt-kernel sizes its CPU expert thread pool from the host's cores unless told: the pod's
        # CPU limit is what it may use.
        {"name": "ACCELERATE_KT_NUM_THREADS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
    ]
    hub = spec.dataset.hugging_face
    if hub is not None:
        args = [a for a in args if not a.startswith("--dataset=")]
        args += [f"--dataset-repo={hub.repo}", f"--dataset-revision={hub.revision}", f"--dataset-file={hub.path}"]
        if hub.token_secret_ref is not None:
            secret = {"name": hub.token_secret_ref.name, "key": hub.token_secret_ref.key}
            env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": secret}})
    job = workload_job(
        meta,
        pod_labels=labels,
        pod_metadata=spec.pod_metadata,
        backoff_limit=spec.backoff_limit,
        # Bad data or config fail at once; crashes and OOM kills count against backoffLimit and
        # resume from the newest checkpoint; node loss and evictions do not count.
        permanent_exit_codes=TrainExit,
        service_account=service_account_name(owner.name),
        # A node holding the model's weights, and the one the checkpoints of earlier attempts are on.
        affinity=pinned(node, {"key": model_label(owner.namespace, model), "operator": "In", "values": [READY]}),
        container="train",
        image=image,
        args=args,
        env=env,
        resources=resources,
        mounts=mounts,
        volumes=volumes,
    )
    job["spec"]["suspend"] = spec.suspend
    return job


def job_update(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that brings a live training Job's changeable fields to ``desired``: suspend
    and the Kueue queue label. Nothing else of a live Job is touched (its template is immutable, and
    an operator upgrade that renders it differently must not fight a running Job). None when equal.

    A queued Job's suspend belongs to Kueue (its webhook suspends the Job, admission resumes it):
    it is never patched while the Job carries a queue label, or the two would fight.
    """
    patch: dict[str, Any] = {}
    live_queue = ((live.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    want_queue = ((desired.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    want_suspend = bool((desired.get("spec") or {}).get("suspend"))
    if not live_queue and not want_queue and bool((live.get("spec") or {}).get("suspend")) != want_suspend:
        patch["spec"] = {"suspend": want_suspend}
    if live_queue != want_queue:
        patch["metadata"] = {"labels": {KUEUE_QUEUE_LABEL: want_queue}}
    return patch or None
