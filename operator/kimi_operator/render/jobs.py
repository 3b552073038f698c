"""Pieces every batch Job of the operator shares: pinning to a node, the pod failure policy, the pod
template's metadata, and the Job around one workload container."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kimi_operator.api.base import PodMetadata


def pinned(node: str, *also: Mapping[str, Any]) -> dict[str, Any]:
    """Required affinity to ``node`` (and any further match expressions, in the same term).

    Affinity rather than nodeName: the scheduler still accounts for the Job's resources.
    """
    expressions = [*also, {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": expressions}]}
        }
    }


def failure_policy(permanent_exit_codes: Iterable[int]) -> dict[str, Any]:
    """Exit codes a retry cannot fix end the Job at once; node loss and evictions are not counted."""
    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [int(c) for c in permanent_exit_codes]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def template_metadata(user: PodMetadata, labels: Mapping[str, str]) -> dict[str, Any]:
    """The pod's labels and annotations: the user's, with ours taking precedence."""
    return {"labels": {**user.labels, **labels}, "annotations": dict(user.annotations)}


def workload_job(
    metadata: dict[str, Any],
    *,
    pod_labels: Mapping[str, str],
    pod_metadata: PodMetadata,
    backoff_limit: int,
    permanent_exit_codes: Iterable[int],
    service_account: str,
    affinity: dict[str, Any],
    container: str,
    image: str,
    args: list[str],
    env: list[dict[str, Any]],
    resources: dict[str, str],
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """A Job running one workload container (requests equal to limits), retried by the rules of
    ``failure_policy``, its termination message read back by the operator."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": backoff_limit,
            "podFailurePolicy": failure_policy(permanent_exit_codes),
            "template": {
                "metadata": template_metadata(pod_metadata, pod_labels),
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": service_account,
                    "affinity": affinity,
                    "containers": [
                        {
                            "name": container,
                            "image": image,
                            "args": args,
                            "env": env,
                            "resources": {"requests": resources, "limits": resources},
                            "volumeMounts": mounts,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }
