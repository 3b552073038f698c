"""The Job that removes files an object left on a node, when its reclaimPolicy is Delete."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from kimi_operator.api.base import PodMetadata
from kimi_operator.render.jobs import pinned, template_metadata
from kimi_operator.render.kimimodel_paths import MOUNT, NODE_LABEL
from kimi_operator.render.labels import bounded, common
from kimi_operator.render.owner import Owner


def cleanup_job(
    owner: Owner,
    *,
    node: str,
    storage_path: str,
    root: str | Sequence[str],
    image: str,
    pod_metadata: PodMetadata | None = None,
) -> dict[str, Any]:
    """Delete ``root`` (paths under the storage mount) on ``node``.

    Not owned by the object: it must outlive what it cleans up after.
    """
    roots = [root] if isinstance(root, str) else list(root)
    digest = hashlib.sha256(f"{node}:{':'.join(roots)}".encode()).hexdigest()[:8]
    name = f"{owner.name[: 63 - len('-cleanup-') - 8]}-cleanup-{digest}"
    labels = {**common(owner.kind, owner.name, "cleanup"), NODE_LABEL: bounded(node)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": owner.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 3,
            # A node that went away leaves the pod Pending forever: the Job fails instead, and the
            # finalizer waiting for it lets the object go (saying the files may remain).
            "activeDeadlineSeconds": 1800,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": template_metadata(pod_metadata or PodMetadata(), labels),
                "spec": {
                    "restartPolicy": "Never",
                    "affinity": pinned(node),
                    "containers": [
                        {
                            "name": "cleanup",
                            "image": image,
                            # Every image of ours has the command; the engine image sets no entrypoint.
                            "command": ["kimi-operator"],
                            "args": ["remove-model", *(f"--root={r}" for r in roots)],
                            "volumeMounts": [{"name": "models", "mountPath": MOUNT}],
                        }
                    ],
                    "volumes": [{"name": "models", "hostPath": {"path": storage_path, "type": "Directory"}}],
                },
            },
        },
    }
