"""Pure builders for a KimiModel's children: node eligibility, prepare Jobs, their RBAC, cleanup Jobs.

Inputs are the validated spec and facts observed by the controller; outputs are manifest dicts for
server-side apply. Nothing here performs I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from kimi_operator.api.base import GROUP
from kimi_operator.api.exitcodes import PrepareExit
from kimi_operator.api.kimimodel import FROM_CHECKPOINT, KIND, PLURAL, GgufSource, KimiModelSpec, Variant
from kimi_operator.render import cleanup
from kimi_operator.render.jobs import pinned, workload_job
from kimi_operator.render.kimimodel_paths import MOUNT, NODE_LABEL, model_dir
from kimi_operator.render.labels import bounded, common
from kimi_operator.render.owner import Owner, status_rbac

__all__ = ["MOUNT", "NODE_LABEL", "model_dir"]
from kimi_operator.render.quantity import parse_quantity

SOURCE_MOUNT = "/source"
READY = "ready"
# kt-kernel's CPU expert kernels (AMXINT8/AMXINT4 and their AVX-512 fallbacks) need these.
CPU_VARIANT_FEATURES = ("AVX512F", "AVX512BW")
NFD_CPUID = "feature.node.kubernetes.io/cpu-cpuid."


def owner(namespace: str, name: str, uid: str) -> Owner:
    return Owner(KIND, PLURAL, namespace, name, uid)


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """What the API says about a candidate node."""

    name: str
    labels: Mapping[str, str]
    allocatable: Mapping[str, str]
    ready: bool
    unschedulable: bool


def model_label(namespace: str, name: str) -> str:
    """The node label that marks a node holding this model's requested variants."""
    return f"{GROUP}/{bounded(f'model.{namespace}.{name}')}"


def ineligible_reason(node: NodeFacts, spec: KimiModelSpec) -> str | None:
    """Why a node cannot hold this model, from what the API tells; None when it can."""
    if not node.ready:
        return "node is not Ready"
    if node.unschedulable:
        return "node is cordoned (unschedulable)"
    gpus = int(node.allocatable.get("nvidia.com/gpu", "0") or 0)
    if gpus < 1:
        return "node has no allocatable nvidia.com/gpu"
    if any(v.startswith("cpu-") for v in spec.variants):
        missing = [f for f in CPU_VARIANT_FEATURES if node.labels.get(NFD_CPUID + f) != "true"]
        if missing:
            return (
                f"kt-kernel CPU expert weights need {' and '.join(CPU_VARIANT_FEATURES)}; the node lacks "
                f"{', '.join(missing)} (labels {NFD_CPUID}*)"
            )
    for resource, wanted in (("memory", spec.resources.memory), ("cpu", spec.resources.cpu)):
        have = node.allocatable.get(resource)
        if have is not None and parse_quantity(have) < parse_quantity(wanted):
            return f"prepare Job requests {resource} {wanted}, node allocatable is {have}"
    return None


def job_name(model: str, node: str, variants: Sequence[Variant], gguf: GgufSource | None = None) -> str:
    """One name per (node, variants, GGUF quantization): a spec asking for other variants, or for
    another quantization after spec.gguf was dropped and set anew, gets a new Job."""
    what = f"{node}/{','.join(sorted(variants))}"
    if gguf is not None:
        what += f"/{gguf.hugging_face.repo}@{gguf.hugging_face.revision}/{gguf.quantization}"
    digest = hashlib.sha256(what.encode()).hexdigest()[:8]
    return f"{model[: 63 - len('-prepare-') - 8]}-prepare-{digest}"


def service_account_name(model: str) -> str:
    return f"{model[: 63 - len('-prepare')]}-prepare"


def prepare_rbac(owner: Owner) -> list[dict[str, Any]]:
    """The prepare pods may patch this KimiModel's status (their progress) and nothing else."""
    return status_rbac(owner, service_account_name(owner.name), "prepare")


def prepare_job(owner: Owner, spec: KimiModelSpec, node: str, *, image: str) -> dict[str, Any]:
    """The Job that downloads, verifies and converts the weights on one node."""
    name = job_name(owner.name, node, spec.variants, spec.gguf)
    labels = {**common(KIND, owner.name, "prepare"), NODE_LABEL: bounded(node)}
    args = [
        "prepare",
        f"--root={model_dir(owner.namespace, owner.name)}",
        f"--variants={','.join(spec.variants)}",
        f"--report={owner.namespace}/{owner.name}",
        "--node=$(NODE_NAME)",
        f"--download-concurrency={spec.resources.download_concurrency}",
    ]
    env: list[dict[str, Any]] = [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        # Threads follow the CPU the pod was given, not the node's core count.
        {"name": "PREPARE_THREADS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "models", "hostPath": {"path": spec.storage.host_path, "type": "DirectoryOrCreate"}}
    ]
    mounts: list[dict[str, Any]] = [{"name": "models", "mountPath": MOUNT}]
    # The guide's GGUF path alone reads nothing of the INT4 checkpoint: neither its repository nor
    # its directory (a hostPath of type Directory would keep the pod from starting without it).
    checkpoint = any(v in FROM_CHECKPOINT for v in spec.variants)
    hub = spec.source.hugging_face if checkpoint else None
    if hub is not None:
        args += [f"--repo={hub.repo}", f"--revision={hub.revision}"]
        if hub.endpoint:
            args.append(f"--endpoint={hub.endpoint}")
        if hub.token_secret_ref is not None:
            # The token reaches the pod only as an environment variable: never in args or status.
            env.append(
                {
                    "name": "HF_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": hub.token_secret_ref.name, "key": hub.token_secret_ref.key}},
                }
            )
    elif checkpoint and spec.source.path is not None:
        args.append(f"--source-path={SOURCE_MOUNT}")
        volumes.append({"name": "source", "hostPath": {"path": spec.source.path.path, "type": "Directory"}})
        mounts.append({"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True})
    if spec.gguf is not None:
        repo = spec.gguf.hugging_face
        args += [f"--gguf-repo={repo.repo}", f"--gguf-revision={repo.revision}"]
        args.append(f"--gguf-quantization={spec.gguf.quantization}")
        if repo.endpoint:
            args.append(f"--gguf-endpoint={repo.endpoint}")
        if repo.token_secret_ref is not None:
            secret = {"name": repo.token_secret_ref.name, "key": repo.token_secret_ref.key}
            env.append({"name": "HF_TOKEN_GGUF", "valueFrom": {"secretKeyRef": secret}})
    resources = {"cpu": str(spec.resources.cpu), "memory": str(spec.resources.memory)}
    meta = owner.metadata(name, "prepare")
    meta["labels"] = labels
    return workload_job(
        meta,
        pod_labels=labels,
        pod_metadata=spec.pod_metadata,
        backoff_limit=3,
        # Failures a retry cannot fix end the Job at once; crashes and evictions are retried.
        permanent_exit_codes=PrepareExit,
        service_account=service_account_name(owner.name),
        affinity=pinned(node),
        container="prepare",
        image=image,
        args=args,
        env=env,
        resources=resources,
        mounts=mounts,
        volumes=volumes,
    )


def cleanup_job(owner: Owner, spec: KimiModelSpec, node: str, *, image: str) -> dict[str, Any]:
    """The Job that removes the model's files from one node (reclaimPolicy Delete)."""
    return cleanup.cleanup_job(
        owner,
        node=node,
        storage_path=spec.storage.host_path,
        root=model_dir(owner.namespace, owner.name),
        image=image,
        pod_metadata=spec.pod_metadata,
    )
