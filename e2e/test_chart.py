"""The Helm chart: lints, renders for a real apiserver, and carries the CRDs as generated.

The operator fixture runs the operator with the chart's ServiceAccount and RBAC, so every operator
test also proves that the chart grants what the operator needs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest

from e2e.conftest import CHART, KUBE_VERSION, OPERATOR_NAMESPACE, OperatorProcess, PrometheusProcess, render_chart
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.router import metrics as router_metrics  # noqa: F401 (registers the router's families)

pytestmark = pytest.mark.e2e


def test_chart_lints(cluster: Cluster) -> None:
    out = cluster.tool("helm", "lint", "--strict", CHART, "--kube-version", KUBE_VERSION)
    assert "0 chart(s) failed" in out


def test_chart_renders_objects_the_apiserver_accepts(cluster: Cluster, namespace: str) -> None:
    rendered = render_chart(cluster, "--set", "watchNamespaces={a,b}", namespace=namespace)
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered) if d)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=a" in args
    assert "--namespace=b" in args
    assert "--prepare-image=ghcr.io/kimi-operator/prepare:0.1.0" in args
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", "-", input_text=rendered)
    assert out.count("(server dry run)") == len(kinds), out


def test_chart_crds_are_the_generated_ones() -> None:
    for generated in (repo_root() / "crds").glob("*.yaml"):
        assert (repo_root() / "charts" / "kimi-operator" / "crds" / generated.name).read_text() == generated.read_text()


def test_operator_runs_with_the_chart_service_account(cluster: Cluster, operator: OperatorProcess) -> None:
    who = cluster.kubectl(
        "auth",
        "can-i",
        "patch",
        "kimimodels.kimi-operator.io",
        "--subresource=status",
        f"--as=system:serviceaccount:{OPERATOR_NAMESPACE}:kimi-kimi-operator",
        "-n",
        "default",
    )
    assert who.strip() == "yes"
    # Least privilege: the operator's own account cannot read Secrets.
    secrets = cluster.kubectl(
        "auth",
        "can-i",
        "get",
        "secrets",
        f"--as=system:serviceaccount:{OPERATOR_NAMESPACE}:kimi-kimi-operator",
        "-n",
        "default",
        check=False,
    )
    assert secrets.strip() == "no"
    # RBAC denials read 'User "system:serviceaccount:..." cannot <verb> resource ...'.
    denied = [
        line for line in operator.log_tail(5000).splitlines() if "system:serviceaccount" in line and " cannot " in line
    ]
    assert denied == [], "\n".join(denied)


def test_grafana_dashboard_asks_prometheus_only_what_the_operator_exports(
    cluster: Cluster, namespace: str, operator: OperatorProcess, prometheus: PrometheusProcess
) -> None:
    rendered = render_chart(
        cluster,
        "--set",
        "grafanaDashboard.enabled=true",
        "--show-only",
        "templates/grafana-dashboard.yaml",
        namespace=namespace,
    )
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input_text=rendered)
    stored = json.loads(
        cluster.kubectl("get", "configmap", "kimi-kimi-operator-dashboard", "-n", namespace, "-o", "json")
    )
    assert stored["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(stored["data"]["kimi-operator.json"])
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) == 18
    _, exposition = operator.get(operator.metrics_url)
    families = set(re.findall(r"^# TYPE (kimi_operator_[a-z_]+) ", exposition, re.MULTILINE))
    # The serving panels read the routers' metrics: the families the router's own module exports.
    router_exposition = generate_latest(REGISTRY).decode()
    router_families = set(re.findall(r"^# TYPE (kimi_router_[a-z_]+) ", router_exposition, re.MULTILINE))
    assert len(router_families) == 9
    for expr in exprs:
        for name in re.findall(r"kimi_operator_[a-z_]+", expr):
            assert name.removesuffix("_bucket") in families, f"{name} is not exported by the operator"
        for name in re.findall(r"kimi_router_[a-z_]+", expr):
            assert name.removesuffix("_bucket") in router_families, f"{name} is not exported by the router"
        # Grafana puts the namespace selection in $namespace; "all" is ".*".
        assert prometheus.status(expr.replace("$namespace", ".*")) == "success", expr


def test_alert_rules_pass_promtool_and_ship_as_a_prometheus_rule(cluster: Cluster) -> None:
    promtool = Path(os.environ["KIMI_PROMETHEUS"]).with_name("promtool")
    rules = Path(CHART) / "rules"
    checked = subprocess.run(
        [str(promtool), "check", "rules", "kimi-operator.rules.yaml"],
        cwd=rules,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout
    # Each alert fires on the series that should raise it and stays quiet on healthy ones.
    tested = subprocess.run(
        [str(promtool), "test", "rules", "kimi-operator.rules.test.yaml"],
        cwd=rules,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rendered = render_chart(
        cluster, "--set", "prometheusRule.enabled=true", "--show-only", "templates/prometheusrule.yaml"
    )
    (rule,) = [d for d in yaml.safe_load_all(rendered) if d]
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load((rules / "kimi-operator.rules.yaml").read_text())
