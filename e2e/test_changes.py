"""Edits of live objects and an idle cluster, against the real apiserver.

A FineTuneJob edited while it trains is refused at admission for what shapes its pod, changed in
place for what a live Job accepts, and Stalled (with the apiserver's words and the current
generation) for what the apiserver still refuses. An idle cluster costs the apiserver no writes.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import kubernetes
import pytest

from e2e.conftest import OperatorProcess
from e2e.helpers import api_error, wait_earlier_namespaces_gone, wait_for
from e2e.manifests import GROUP, VERSION
from e2e.test_finetunejob import HOLD, SMALL, custom, ftj, get, job, ready_model, wait_phase
from e2e.test_kimimodel import condition
from kimi_operator.devcluster.cluster import Cluster

pytestmark = pytest.mark.e2e


def patch_ftj(api: kubernetes.client.ApiClient, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = custom(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", name, patch
    )
    return obj


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"spec": {"podMetadata": {"labels": {"team": "legal"}}}}, "spec.podMetadata"),
        ({"spec": {"backoffLimit": 7}}, "spec.backoffLimit"),
        ({"spec": {"output": {"adapterName": "renamed"}}}, "spec.output.adapterName"),
        ({"spec": {"output": {"publish": {"persistentVolumeClaim": {"claimName": "a"}}}}}, "spec.output.publish"),
    ],
    ids=["podMetadata", "backoffLimit", "adapterName", "publish"],
)
def test_an_edit_of_what_shapes_the_pod_is_refused_at_admission(
    api: kubernetes.client.ApiClient, namespace: str, patch: dict[str, Any], field: str
) -> None:
    # podMetadata is absent at creation here: adding it must be refused as changing it is.
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", ftj("fixed"))
    with pytest.raises(kubernetes.client.ApiException) as info:
        patch_ftj(api, namespace, "fixed", patch)
    assert info.value.status == 422, info.value.body
    message, fields = api_error(info.value)
    assert field in fields or f"{field}:" in message, (fields, message)
    assert "is immutable" in message, message
    assert "create a new FineTuneJob" in message, message
    assert get(api, namespace, "finetunejobs", "fixed")["metadata"]["generation"] == 1


def test_a_running_job_takes_the_changes_a_live_job_accepts(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("live", podMetadata=HOLD, resources=SMALL)
    )
    wait_phase(api, namespace, "live", "Running")
    before = job(api, namespace, "live")
    updated = patch_ftj(
        api, namespace, "live", {"spec": {"queueName": "night-queue", "output": {"reclaimPolicy": "Delete"}}}
    )
    assert updated["metadata"]["generation"] == 2
    obj = wait_phase(api, namespace, "live", "Running")
    assert obj["status"]["observedGeneration"] == 2
    assert condition(obj, "Stalled") is None
    after = job(api, namespace, "live")
    assert after.metadata.uid == before.metadata.uid
    assert after.metadata.labels["kueue.x-k8s.io/queue-name"] == "night-queue"
    # The template is the one the Job was created with.
    assert after.spec.template.metadata.labels == before.spec.template.metadata.labels
    assert after.spec.template.spec.containers[0].args == before.spec.template.spec.containers[0].args


def test_a_child_the_apiserver_refuses_is_stalled_with_its_words_then_recovers(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}}
    )
    # Until the quota controller has counted the namespace, admission says "status unknown".
    wait_for(
        lambda: (
            (
                core.read_namespaced_resource_quota("no-jobs", namespace).status
                or kubernetes.client.V1ResourceQuotaStatus()
            ).hard
        ),
        60,
        "the quota counted",
    )
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("refused", podMetadata=HOLD, resources=SMALL)
    )

    def stalled() -> dict[str, Any] | None:
        obj = get(api, namespace, "finetunejobs", "refused")
        found = condition(obj, "Stalled")
        current = (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
        return found if current and found and found["status"] == "True" else None

    found = wait_for(stalled, 60, "Stalled with the quota's refusal")
    assert found["reason"] == "ChildRejected"
    assert f"Job {namespace}/refused-train" in found["message"]
    assert "exceeded quota: no-jobs" in found["message"]
    # The quota goes: the next pass (at the latest the resync timer) creates the Job.
    core.delete_namespaced_resource_quota("no-jobs", namespace)
    obj = wait_phase(api, namespace, "refused", "Running")
    assert condition(obj, "Stalled") is None


def test_an_empty_dataset_stops_before_any_pod_is_scheduled(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "empty"}, "data": {"train.jsonl": "\n \n"}})
    dataset = {"configMap": {"name": "empty", "key": "train.jsonl"}}
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("empty", dataset=dataset)
    )
    obj = wait_phase(api, namespace, "empty", "Stalled")
    stalled = condition(obj, "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "InvalidDataset"
    assert stalled["message"] == "ConfigMap empty key train.jsonl: no records: the dataset is empty"
    jobs = (
        kubernetes.client.BatchV1Api(api)
        .list_namespaced_job(namespace, label_selector="kimi-operator.io/finetunejob")
        .items
    )
    assert [j.metadata.name for j in jobs] == []


def test_a_leftover_child_of_an_earlier_object_is_not_adopted(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("again", podMetadata=HOLD, resources=SMALL)
    )
    wait_phase(api, namespace, "again", "Running")
    old = job(api, namespace, "again")
    # Deleted without its children: the Job is orphaned, then a new FineTuneJob takes the name.
    custom(api).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", "again", propagation_policy="Orphan"
    )
    wait_for(
        lambda: not custom(api).list_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs")["items"],
        60,
        "the first FineTuneJob gone",
    )
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", ftj("again", podMetadata=HOLD, resources=SMALL)
    )
    obj = wait_phase(api, namespace, "again", "Stalled")
    stalled = condition(obj, "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "ChildConflict"
    # Orphaned: the garbage collector took their owner references. A new object adopts none of what
    # belongs to another run (its training configuration, its Job); its own RBAC it may.
    assert stalled["message"].startswith(f"ConfigMap {namespace}/again-train exists but belongs to no controller")
    assert job(api, namespace, "again").metadata.uid == old.metadata.uid
    # The orphans go: the new object creates its own.
    kubernetes.client.CoreV1Api(api).delete_namespaced_config_map("again-train", namespace)
    kubernetes.client.BatchV1Api(api).delete_namespaced_job("again-train", namespace, propagation_policy="Background")
    wait_phase(api, namespace, "again", "Running")
    assert job(api, namespace, "again").metadata.uid != old.metadata.uid


# What the operator writes: its own kinds (status included) and the children it creates.
CHILDREN = {"serviceaccounts", "roles", "rolebindings", "configmaps", "jobs", "nodes", "statefulsets", "services"}
OWN = {"kimimodels", "finetunejobs", "loraservers"}
WRITES = {"APPLY", "PATCH", "POST", "PUT", "DELETE", "DELETECOLLECTION"}
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def apiserver_writes(cluster: Cluster) -> Counter[str]:
    """Writes the apiserver has served on the resources the operator writes, by resource and verb."""
    counts: Counter[str] = Counter()
    for line in cluster.kubectl("get", "--raw", "/metrics").splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        resource, sub, verb = labels.get("resource"), labels.get("subresource", ""), labels.get("verb")
        # Children's status subresources are written by their own controllers (Jobs) and KWOK (nodes).
        ours = resource in OWN or (resource in CHILDREN and not sub)
        if ours and verb in WRITES:
            counts[f"{verb} {resource}{'/' + sub if sub else ''}"] += int(float(match["value"]))
    return counts


def operator_errors(operator: OperatorProcess) -> float:
    _, text = operator.get(operator.metrics_url)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kimi_operator_reconcile_total{") and 'result="error"' in line
    )


def operator_passes(operator: OperatorProcess) -> float:
    _, text = operator.get(operator.metrics_url)
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("kimi_operator_reconcile_total{")
    )


def test_an_idle_cluster_costs_no_writes(
    cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    ready_model(api, namespace)
    for name, spec in (
        ("idle-running", {"podMetadata": HOLD, "resources": SMALL}),
        ("idle-suspended", {"suspend": True, "resources": SMALL}),
        ("idle-waiting", {"model": {"name": "absent"}, "resources": SMALL}),
    ):
        custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", ftj(name, **spec))
    wait_phase(api, namespace, "idle-running", "Running")
    wait_phase(api, namespace, "idle-suspended", "Suspended")
    wait_for(
        lambda: condition(get(api, namespace, "finetunejobs", "idle-waiting"), "Reconciling"),
        60,
        "idle-waiting observed",
    )
    # A LoraServer whose simulated engine pods run no engine: it stays Progressing, and its every
    # event (pods, status) runs a pass.
    server = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoraServer",
        "metadata": {"name": "idle-serving"},
        "spec": {"model": {"name": "kimi"}, "replicas": 1, "resources": SMALL, "engine": {"ktMethod": "BF16"}},
    }
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", server)
    wait_for(
        lambda: (get(api, namespace, "loraservers", "idle-serving").get("status") or {}).get("replicas") == 1,
        60,
        "the LoraServer's engine pod observed",
    )
    # Namespaces of earlier tests still being emptied would count the garbage collector's writes.
    wait_earlier_namespaces_gone(api)
    # A pass of every object (at least the resync timer's) has run since they settled.
    settled = operator_passes(operator)
    wait_for(lambda: operator_passes(operator) >= settled + 6, 90, "a resync pass of every object")
    before, passes, errors = apiserver_writes(cluster), operator_passes(operator), operator_errors(operator)
    # The counters are the ones the operator's writes land in: this test's objects are there.
    assert before["POST finetunejobs"] >= 3, before
    assert before["APPLY statefulsets"] >= 1, before
    # The measurement itself: an idle minute, two resync periods of every object in the cluster.
    wait_for(lambda: operator_passes(operator) >= passes + 12, 90, "two more resync passes of every object")
    after = apiserver_writes(cluster)
    assert after - before == Counter(), f"writes during an idle minute: {dict(after - before)}"
    # Passes that fail would write nothing either: none did.
    assert operator_errors(operator) == errors
