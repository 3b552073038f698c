"""KimiModel against the real apiserver, with KWOK running the prepare Jobs on simulated GPU nodes."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes
import pytest

from e2e.conftest import OperatorProcess, PrometheusProcess
from e2e.helpers import wait_for
from e2e.manifests import GROUP, KIMI_MODEL, VERSION
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.render.kimimodel import model_label
from kimi_operator.workloads.report import StatusWriter, progress

pytestmark = pytest.mark.e2e
RTX = {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090"}


def km(name: str, **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(KIMI_MODEL)
    obj["metadata"]["name"] = name
    obj["spec"].update(spec)
    return obj


def create(api: kubernetes.client.ApiClient, namespace: str, obj: dict[str, Any]) -> None:
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "kimimodels", obj
    )


def get(api: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "kimimodels", name
    )
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def wait_condition(
    api: kubernetes.client.ApiClient, namespace: str, name: str, type_: str, reason: str | None = None
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = get(api, namespace, name)
        c = condition(obj, type_)
        ok = c is not None and c["status"] == "True" and (reason is None or c["reason"] == reason)
        return obj if ok and obj["status"].get("observedGeneration") == obj["metadata"]["generation"] else None

    return wait_for(check, 60, f"{name}: {type_}=True {reason or ''}")


def jobs(api: kubernetes.client.ApiClient, namespace: str, name: str, component: str = "prepare") -> list[Any]:
    selector = f"kimi-operator.io/kimimodel={name},app.kubernetes.io/component={component}"
    return list(kubernetes.client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=selector).items)


def node_labels(api: kubernetes.client.ApiClient) -> dict[str, dict[str, str]]:
    return {n.metadata.name: n.metadata.labels for n in kubernetes.client.CoreV1Api(api).list_node().items}


def test_two_selected_nodes_get_pinned_jobs_then_labels_and_ready(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    placement = {"nodeSelector": {"matchLabels": RTX}, "count": 2}
    source = {
        "huggingFace": {
            "repo": "moonshotai/Kimi-K2.5",
            "revision": "main",
            "tokenSecretRef": {"name": "hf", "key": "token"},
        }
    }
    create(api, namespace, km("kimi", placement=placement, source=source, variants=["bf16", "cpu-int8"]))
    obj = wait_condition(api, namespace, "kimi", "Ready", "NodesReady")
    status = obj["status"]
    assert status["readyNodes"] == 2
    assert {n["name"]: (n["phase"], n["variants"]) for n in status["nodes"]} == {
        "gpu-4090-a": ("Ready", ["bf16", "cpu-int8"]),
        "gpu-4090-b": ("Ready", ["bf16", "cpu-int8"]),
    }
    assert condition(obj, "Reconciling") is None
    prepare = jobs(api, namespace, "kimi")
    assert len(prepare) == 2
    pinned = set()
    for job in prepare:
        pod = job.spec.template.spec
        terms = pod.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
        (expression,) = terms[0].match_expressions
        assert (expression.key, expression.operator) == ("kubernetes.io/hostname", "In")
        pinned.update(expression.values)
        (container,) = pod.containers
        assert container.resources.requests == {"cpu": "16", "memory": "64Gi"}
        assert container.resources.limits == container.resources.requests
        assert pod.volumes[0].host_path.path == "/mnt/nvme/kimi"
        assert pod.service_account_name == "kimi-prepare"
        assert f"--root=/models/{namespace}/kimi" in container.args
        assert "--variants=bf16,cpu-int8" in container.args
        token = next(e for e in container.env if e.name == "HF_TOKEN")
        assert (token.value_from.secret_key_ref.name, token.value_from.secret_key_ref.key) == ("hf", "token")
        assert job.metadata.owner_references[0].kind == "KimiModel"
        assert job.spec.pod_failure_policy.rules[0].action == "FailJob"
    assert pinned == {"gpu-4090-a", "gpu-4090-b"}
    label = model_label(namespace, "kimi")
    labels = node_labels(api)
    assert labels["gpu-4090-a"][label] == "ready"
    assert labels["gpu-4090-b"][label] == "ready"
    assert label not in labels["gpu-h200-a"]
    role = kubernetes.client.RbacAuthorizationV1Api(api).read_namespaced_role("kimi-prepare", namespace)
    assert role.rules[0].resource_names == ["kimi"]
    assert role.rules[0].resources == ["kimimodels/status"]


def test_ineligible_nodes_are_listed_with_the_reason(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    placement = {"nodeNames": ["gpu-h200-a", "cpu-a", "ghost"], "count": 1}
    create(api, namespace, km("one", placement=placement, variants=["bf16", "cpu-int8"]))
    obj = wait_condition(api, namespace, "one", "Ready", "NodesReady")
    nodes = {n["name"]: n for n in obj["status"]["nodes"]}
    assert nodes["gpu-h200-a"]["phase"] == "Ready"
    assert nodes["cpu-a"]["phase"] == "Ineligible"
    assert nodes["cpu-a"]["message"] == "node has no allocatable nvidia.com/gpu"
    assert nodes["ghost"]["message"] == "node not found"
    assert len(jobs(api, namespace, "one")) == 1


def test_too_few_eligible_nodes_is_stalled(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    placement = {"nodeNames": ["gpu-h200-a", "cpu-a"], "count": 2}
    create(api, namespace, km("short", placement=placement))
    obj = wait_condition(api, namespace, "short", "Stalled", "InsufficientNodes")
    assert "cpu-a: node has no allocatable nvidia.com/gpu" in condition(obj, "Stalled")["message"]  # type: ignore[index]
    assert condition(obj, "Reconciling") is None


def test_disk_failure_stalls_with_the_reason_and_is_not_retried(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    message = (
        "BF16 conversion needs 2199023255552 bytes (2.0 TiB) on /models, "
        "but only 1099511627776 bytes (1.0 TiB) are free"
    )
    pod_metadata = {
        "labels": {"sim.kimi-operator.io/fail": "true"},
        "annotations": {"sim.kimi-operator.io/exit-code": "11", "sim.kimi-operator.io/message": message},
    }
    placement = {"nodeNames": ["gpu-4090-a"], "count": 1}
    create(api, namespace, km("full", placement=placement, podMetadata=pod_metadata))
    obj = wait_condition(api, namespace, "full", "Stalled", "InsufficientDisk")
    assert condition(obj, "Stalled")["message"] == f"node gpu-4090-a: {message}"  # type: ignore[index]
    assert condition(obj, "Ready")["status"] == "False"  # type: ignore[index]
    assert obj["status"]["nodes"][0]["phase"] == "Failed"
    (job,) = jobs(api, namespace, "full")
    assert job.status.failed == 1  # the pod failure policy ended the Job without retries


def _token_kubeconfig(
    cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str, sa: str
) -> kubernetes.client.ApiClient:
    token = (
        kubernetes.client.CoreV1Api(api)
        .create_namespaced_service_account_token(sa, namespace, {"spec": {"expirationSeconds": 600}})
        .status.token
    )
    config = kubernetes.client.Configuration()
    config.host = cluster.server()
    config.ssl_ca_cert = str(cluster.layout.pki / "ca.crt")
    config.api_key = {"authorization": f"Bearer {token}"}
    return kubernetes.client.ApiClient(config)


def test_prepare_pod_writes_only_its_own_progress(
    api: kubernetes.client.ApiClient, namespace: str, prometheus: PrometheusProcess, cluster: Cluster
) -> None:
    hold = {"annotations": {"sim.kimi-operator.io/hold": "true"}}
    placement = {"nodeNames": ["gpu-4090-b"], "count": 1}
    create(api, namespace, km("mine", placement=placement, podMetadata=hold))
    create(api, namespace, km("theirs", placement=placement, podMetadata=hold))
    wait_condition(api, namespace, "mine", "Reconciling", "Preparing")
    pod_api = _token_kubeconfig(cluster, api, namespace, "mine-prepare")
    record = progress("Downloading", 3 * 2**30, 12 * 2**30, 200 * 2**20, "0123abcd")
    StatusWriter(pod_api, namespace, "mine", "gpu-4090-b").write(record)
    node = get(api, namespace, "mine")["status"]["nodes"][0]
    assert node["phase"] == "Preparing"
    assert node["progress"]["step"] == "Downloading"
    assert node["progress"]["percent"] == 25
    assert node["progress"]["eta"] == "0:00:46"
    table = cluster.kubectl("get", "km", "mine", "-n", namespace)
    assert "Downloading" in table
    assert "25" in table
    # The same progress in Prometheus, per node, within a scrape.
    selector = f'{{namespace="{namespace}",name="mine",node="gpu-4090-b"}}'
    wait_for(
        lambda: prometheus.value(f"kimi_operator_model_prepare_percent{selector}") == 25, 30, "percent in Prometheus"
    )
    assert prometheus.value(f"kimi_operator_model_prepare_bytes_done{selector}") == 3 * 2**30
    assert prometheus.value(f"kimi_operator_model_prepare_eta_seconds{selector}") == 46
    assert prometheus.value(f"kimi_operator_model_node_ready{selector}") == 0
    with pytest.raises(kubernetes.client.ApiException) as info:
        StatusWriter(pod_api, namespace, "theirs", "gpu-4090-b").write(record)
    assert info.value.status == 403
    # The operator's next passes keep the pod's fields: change the spec to force one.
    kubernetes.client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "kimimodels", "mine", {"spec": {"podMetadata": {"labels": {"team": "ml"}, **hold}}}
    )
    obj = wait_for(
        lambda: (o := get(api, namespace, "mine"))["status"].get("observedGeneration") == 2 and o, 60, "generation 2"
    )
    assert obj["status"]["nodes"][0]["progress"]["step"] == "Downloading"
    assert obj["status"]["resolvedRevision"] == "0123abcd"


def test_deletion_removes_labels_and_keeps_files(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create(api, namespace, km("keep", placement={"nodeNames": ["gpu-h200-a"], "count": 1}))
    wait_condition(api, namespace, "keep", "Ready")
    label = model_label(namespace, "keep")
    assert node_labels(api)["gpu-h200-a"][label] == "ready"
    kubernetes.client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "kimimodels", "keep"
    )
    wait_for(lambda: label not in node_labels(api)["gpu-h200-a"], 60, "label removed")
    wait_for(
        lambda: (
            not kubernetes.client.CustomObjectsApi(api).list_namespaced_custom_object(
                GROUP, VERSION, namespace, "kimimodels"
            )["items"]
        ),
        60,
        "KimiModel gone",
    )
    assert jobs(api, namespace, "keep", "cleanup") == []


def test_deletion_with_delete_policy_runs_a_cleanup_job_per_node(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    storage = {"hostPath": "/mnt/nvme/kimi", "reclaimPolicy": "Delete"}
    create(api, namespace, km("drop", placement={"nodeNames": ["gpu-4090-a"], "count": 1}, storage=storage))
    wait_condition(api, namespace, "drop", "Ready")
    kubernetes.client.CustomObjectsApi(api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "kimimodels", "drop"
    )
    wait_for(
        lambda: (
            not kubernetes.client.CustomObjectsApi(api).list_namespaced_custom_object(
                GROUP, VERSION, namespace, "kimimodels"
            )["items"]
        ),
        60,
        "KimiModel gone after cleanup",
    )
    (cleanup,) = jobs(api, namespace, "drop", "cleanup")
    assert cleanup.status.succeeded == 1
    terms = cleanup.spec.template.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    assert terms.node_selector_terms[0].match_expressions[0].values == ["gpu-4090-a"]
    assert cleanup.spec.template.spec.containers[0].args == ["remove-model", f"--root=/models/{namespace}/drop"]


def test_another_variant_adds_work_without_redoing_the_first(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    create(api, namespace, km("grow", placement={"nodeNames": ["gpu-h200-a"], "count": 1}, variants=["bf16"]))
    wait_condition(api, namespace, "grow", "Ready")
    (first,) = jobs(api, namespace, "grow")
    kubernetes.client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "kimimodels", "grow", {"spec": {"variants": ["bf16", "cpu-int8"]}}
    )
    obj = wait_for(
        lambda: (o := get(api, namespace, "grow"))["status"]["nodes"][0]["variants"] == ["bf16", "cpu-int8"] and o,
        60,
        "both variants ready",
    )
    assert condition(obj, "Ready")["status"] == "True"  # type: ignore[index]
    names = {j.metadata.name for j in jobs(api, namespace, "grow")}
    assert first.metadata.name in names
    assert len(names) == 2
