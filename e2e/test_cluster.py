"""The local control plane itself: CRDs, discovery, simulated GPU nodes, KWOK pod lifecycle."""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest

from e2e.helpers import wait_for
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.paths import repo_root

pytestmark = pytest.mark.e2e

GPU_NODES = {"gpu-4090-a": 2, "gpu-4090-b": 2, "gpu-h200-a": 8}


def test_server_reports_the_real_release(cluster: Cluster) -> None:
    assert "Server Version: v1.37.2" in cluster.kubectl("version")


def test_crds_are_established(api: kubernetes.client.ApiClient) -> None:
    ext = kubernetes.client.ApiextensionsV1Api(api)
    for name in ("kimimodels", "finetunejobs", "loraservers"):
        crd = ext.read_custom_resource_definition(f"{name}.kimi-operator.io")
        established = [c for c in crd.status.conditions if c.type == "Established"]
        assert established[0].status == "True"


def test_explain_teaches_the_fields(cluster: Cluster) -> None:
    def explain(field: str) -> str:
        return " ".join(cluster.kubectl("explain", field).split())  # kubectl wraps lines

    out = explain("ftj.spec")
    assert "Desired state of the FineTuneJob" in out
    assert "KimiModel (same namespace) whose bf16 variant is trained on" in out
    assert "resolved once to a commit sha" in explain("km.spec.source.huggingFace.revision")


def test_examples_pass_server_side_dry_run(cluster: Cluster) -> None:
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", str(repo_root() / "examples"))
    assert out.count("serverside-applied (server dry run)") == 4, out


def test_gpu_nodes_have_capacity_and_labels(api: kubernetes.client.ApiClient) -> None:
    nodes = {n.metadata.name: n for n in kubernetes.client.CoreV1Api(api).list_node().items}
    for name, gpus in GPU_NODES.items():
        node = nodes[name]
        assert node.status.capacity["nvidia.com/gpu"] == str(gpus)
        assert node.status.allocatable["nvidia.com/gpu"] == str(gpus)
        assert node.metadata.labels["nvidia.com/gpu.count"] == str(gpus)
        assert [c.status for c in node.status.conditions if c.type == "Ready"] == ["True"]
        assert node.status.addresses[0].address.startswith("127.")
    assert nodes["gpu-4090-a"].metadata.labels["feature.node.kubernetes.io/cpu-cpuid.AMXINT8"] == "true"
    assert "feature.node.kubernetes.io/cpu-cpuid.AMXINT8" not in nodes["gpu-h200-a"].metadata.labels


def _pod(name: str, gpus: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "example.invalid/none",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ]
        },
    }


def test_pod_with_two_gpus_runs_on_a_gpu_node(api: kubernetes.client.ApiClient, namespace: str) -> None:
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, _pod("two-gpus", 2))
    pod = wait_for(
        lambda: (p := core.read_namespaced_pod("two-gpus", namespace)).status.phase == "Running" and p,
        60,
        "pod Running",
    )
    assert pod.spec.node_name in GPU_NODES
    assert pod.status.pod_ip.startswith("127.")


def test_pod_with_eight_gpus_only_fits_the_h200_node(api: kubernetes.client.ApiClient, namespace: str) -> None:
    core = kubernetes.client.CoreV1Api(api)

    def gpu_pods_left() -> list[str]:
        # Pods of earlier tests whose namespaces are still being deleted may hold GPUs for a while.
        pods = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=gpu-h200-a").items
        return [
            f"{p.metadata.namespace}/{p.metadata.name}"
            for p in pods
            if p.status.phase in ("Pending", "Running")
            and "nvidia.com/gpu" in (p.spec.containers[0].resources.requests or {})
        ]

    wait_for(lambda: not gpu_pods_left() or None, 120, f"a whole H200 node (GPU pods there: {gpu_pods_left()})")
    core.create_namespaced_pod(namespace, _pod("eight-gpus", 8))
    pod = wait_for(
        lambda: (p := core.read_namespaced_pod("eight-gpus", namespace)).status.phase == "Running" and p,
        60,
        "pod Running",
    )
    assert pod.spec.node_name == "gpu-h200-a"


def test_pod_with_too_many_gpus_stays_pending(api: kubernetes.client.ApiClient, namespace: str) -> None:
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, _pod("sixteen-gpus", 16))

    def unschedulable() -> bool:
        conditions = core.read_namespaced_pod("sixteen-gpus", namespace).status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conditions)

    wait_for(unschedulable, 60, "PodScheduled=False/Unschedulable")
    message = next(
        c.message
        for c in core.read_namespaced_pod("sixteen-gpus", namespace).status.conditions
        if c.type == "PodScheduled"
    )
    assert "Insufficient nvidia.com/gpu" in message


def _job(name: str, template_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": template_meta or {},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "example.invalid/none"}]},
            },
        },
    }


def _job_condition(batch: kubernetes.client.BatchV1Api, name: str, namespace: str, type_: str) -> bool:
    conditions = batch.read_namespaced_job_status(name, namespace).status.conditions or []
    return any(c.type == type_ and c.status == "True" for c in conditions)


def test_job_pod_succeeds(api: kubernetes.client.ApiClient, namespace: str) -> None:
    batch = kubernetes.client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, _job("ok"))
    wait_for(lambda: _job_condition(batch, "ok", namespace, "Complete"), 60, "Job Complete")
    (pod,) = kubernetes.client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=ok").items
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_job_pod_fails_with_chosen_exit_code_and_reason(api: kubernetes.client.ApiClient, namespace: str) -> None:
    batch = kubernetes.client.BatchV1Api(api)
    meta = {
        "labels": {"sim.kimi-operator.io/fail": "true"},
        "annotations": {"sim.kimi-operator.io/exit-code": "137", "sim.kimi-operator.io/reason": "OOMKilled"},
    }
    batch.create_namespaced_job(namespace, _job("oom", meta))
    wait_for(lambda: _job_condition(batch, "oom", namespace, "Failed"), 60, "Job Failed")
    (pod,) = kubernetes.client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=oom").items
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled")


def test_held_job_pod_keeps_running_until_released(api: kubernetes.client.ApiClient, namespace: str) -> None:
    batch, core = kubernetes.client.BatchV1Api(api), kubernetes.client.CoreV1Api(api)
    batch.create_namespaced_job(namespace, _job("held", {"annotations": {"sim.kimi-operator.io/hold": "true"}}))
    pod = wait_for(
        lambda: [
            p
            for p in core.list_namespaced_pod(namespace, label_selector="job-name=held").items
            if p.status.phase == "Running"
        ],
        60,
        "held pod Running",
    )[0]
    assert not _job_condition(batch, "held", namespace, "Complete")
    core.patch_namespaced_pod(
        pod.metadata.name, namespace, {"metadata": {"annotations": {"sim.kimi-operator.io/hold": None}}}
    )
    wait_for(lambda: _job_condition(batch, "held", namespace, "Complete"), 60, "Job Complete after release")
