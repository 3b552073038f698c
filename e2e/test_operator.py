"""The operator against the real apiserver: status conventions, observedGeneration, metrics."""

from __future__ import annotations

from typing import Any

import kubernetes
import pytest
import yaml

from e2e.conftest import OperatorProcess
from e2e.helpers import wait_for
from e2e.manifests import GROUP, KIMI_MODEL, LORA_SERVER, PLURALS, VERSION
from kimi_operator.devcluster.paths import repo_root

pytestmark = pytest.mark.e2e


def _get(api: kubernetes.client.ApiClient, namespace: str, kind: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[kind], name
    )
    return obj


def _observed(api: kubernetes.client.ApiClient, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    obj = _get(api, namespace, kind, name)
    status = obj.get("status") or {}
    return obj if status.get("observedGeneration") == obj["metadata"]["generation"] else None


@pytest.mark.parametrize("base", [LORA_SERVER], ids=lambda b: b["kind"])
def test_status_follows_the_conventions(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, base: dict[str, Any]
) -> None:
    kind, name = base["kind"], base["metadata"]["name"]
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[kind], base
    )
    obj = wait_for(lambda: _observed(api, namespace, kind, name), 60, f"{kind} observedGeneration")
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    # Its KimiModel does not exist: not Ready, Reconciling with the reason, never Stalled with it.
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "WaitingForModel"
    assert conditions["Ready"]["observedGeneration"] == 1
    assert conditions["Reconciling"]["status"] == "True"
    assert conditions["Reconciling"]["observedGeneration"] == 1
    assert "Stalled" not in conditions
    assert obj["status"]["phase"] == "Progressing"


def test_observed_generation_follows_spec_changes(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", LORA_SERVER)
    first = wait_for(lambda: _observed(api, namespace, "LoraServer", "serve"), 60, "generation 1 observed")
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", "serve", {"spec": {"replicas": 3}})
    second = wait_for(lambda: _observed(api, namespace, "LoraServer", "serve"), 60, "generation 2 observed")
    assert second["metadata"]["generation"] == 2
    assert second["status"]["observedGeneration"] == 2
    before = {c["type"]: c for c in first["status"]["conditions"]}["Ready"]
    after = {c["type"]: c for c in second["status"]["conditions"]}["Ready"]
    assert after["observedGeneration"] == 2
    # Still False: no transition, so the transition time is kept.
    assert after["lastTransitionTime"] == before["lastTransitionTime"]


def test_examples_reconcile_and_show_in_printer_columns(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess, cluster: Any
) -> None:
    for path in sorted((repo_root() / "examples").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "ConfigMap":
            # The example dataset (the namespace fixture's own "data" dataset is another name).
            kubernetes.client.CoreV1Api(api).create_namespaced_config_map(namespace, doc)
            continue
        kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURALS[doc["kind"]], doc
        )
        wait_for(lambda d=doc: _observed(api, namespace, d["kind"], d["metadata"]["name"]), 60, f"{path.name} observed")
    table = cluster.kubectl("get", "km,ftj,lsrv", "-n", namespace)
    assert "READY-NODES" in table
    assert "PROGRESS" in table
    assert "ADAPTERS" in table
    # Simulated engine pods run no engine: the LoraServer never claims to serve.
    (row,) = [line for line in table.splitlines() if line.startswith("loraserver.")]
    assert row.split()[1] in ("Progressing", "Stalled"), table


def test_health_and_metrics_endpoints(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    assert operator.get(f"{operator.health_url}/healthz") == (200, "ok\n")
    assert operator.get(f"{operator.health_url}/readyz")[0] == 200
    custom = kubernetes.client.CustomObjectsApi(api)
    # The operator serves every test of the session: its counters must grow, not merely exist.
    passes = {
        series: _sample(operator.get(operator.metrics_url)[1], series)
        for series in (
            'kimi_operator_reconcile_total{kind="LoraServer",result="progressing"}',
            'kimi_operator_reconcile_total{kind="KimiModel",result="ready"}',
        )
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", LORA_SERVER)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "kimimodels", KIMI_MODEL)
    wait_for(lambda: _observed(api, namespace, "LoraServer", "serve"), 60, "LoraServer observed")
    wait_for(
        lambda: (_observed(api, namespace, "KimiModel", "kimi") or {}).get("status", {}).get("phase") == "Ready",
        60,
        "KimiModel Ready",
    )
    expected: list[str] = []
    for kind, name, ready in (("LoraServer", "serve", "0.0"), ("KimiModel", "kimi", "1.0")):
        series = f'kimi_operator_resource_condition{{kind="{kind}",name="{name}",namespace="{namespace}",type="Ready"}}'
        expected.append(f"{series} {ready}")

    def missing() -> list[str]:
        status, text = operator.get(operator.metrics_url)
        assert status == 200
        grown = [series for series, before in passes.items() if _sample(text, series) <= before]
        return grown + [line for line in expected if line not in text]

    # The gauges follow the status write that the wait above saw, in the same pass but a moment
    # after it: they must catch up, and stay consistent with it.
    wait_for(lambda: not missing(), 30, f"the metrics to show all of {expected} and more passes of {list(passes)}")


def _sample(exposition: str, series: str) -> float:
    """The value of one series in a Prometheus exposition; 0 while it does not exist."""
    for line in exposition.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
