"""One local control plane and one operator for the whole e2e session; a namespace per test.

On a failed test the CRs, Jobs and Pods of its namespace are dumped to the report and to
.cluster-e2e/dumps/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from tests.processes import built

from e2e.helpers import http, wait_for, write_token_kubeconfig
from kimi_operator.devcluster import podprocess
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.devcluster.podplan import Image
from kimi_operator.devcluster.runner import BACKOFF, PodRunner, config_for, running

E2E_DIR = repo_root() / ".cluster-e2e"
DATASET = (
    '{"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]}\n'
    '{"messages": [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye."}]}\n'
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    c = Cluster(E2E_DIR)
    # A previous run that was killed may have left its processes: stop them by their PIDs.
    c.down()
    c.up(crd_dir=repo_root() / "crds")
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(cluster.layout.kubeconfig))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process this session started: SIGTERM, then SIGKILL if it has not gone in 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class OperatorProcess:
    def __init__(self, health: int, metrics: int, log: Path) -> None:
        self.health_url = f"http://127.0.0.1:{health}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        self.log = log

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def get(self, url: str) -> tuple[int, str]:
        return http_get(url)


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET on loopback; 0 and the error while nothing listens."""
    return http(url, timeout=2)


OPERATOR_NAMESPACE = "kimi-system"
CHART = str(repo_root() / "charts" / "kimi-operator")
KUBE_VERSION = "1.37.2"


def render_chart(cluster: Cluster, *args: str, namespace: str = "default") -> str:
    """``helm template`` of the chart for the local cluster's version, with extra arguments."""
    return cluster.tool(
        "helm", "template", "kimi", CHART, "--namespace", namespace, "--kube-version", KUBE_VERSION, *args
    )


def _operator_kubeconfig(cluster: Cluster, api: kubernetes.client.ApiClient) -> Path:
    """Credentials of the chart's ServiceAccount, so every operator test also proves the chart's RBAC."""
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    rbac = render_chart(
        cluster,
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
        namespace=OPERATOR_NAMESPACE,
    )
    cluster.kubectl("apply", "--server-side", "-f", "-", input_text=rbac)
    token = core.create_namespaced_service_account_token(
        "kimi-kimi-operator", OPERATOR_NAMESPACE, {"spec": {"expirationSeconds": 7200}}
    ).status.token
    path = cluster.layout.root / "operator.kubeconfig"
    return write_token_kubeconfig(path, cluster.server(), cluster.layout.pki / "ca.crt", token)


@pytest.fixture(scope="session")
def operator(cluster: Cluster, api: kubernetes.client.ApiClient) -> Iterator[OperatorProcess]:
    health, metrics = _free_port(), _free_port()
    env = {**os.environ, "KUBECONFIG": str(_operator_kubeconfig(cluster, api))}
    log = (cluster.layout.logs / "operator.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kimi_operator",
            "run",
            "--bind-address",
            "127.0.0.1",
            "--health-port",
            str(health),
            "--metrics-port",
            str(metrics),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    handle = OperatorProcess(health, metrics, cluster.layout.logs / "operator.log")
    try:
        wait_for(
            lambda: proc.poll() is not None or handle.get(f"{handle.health_url}/readyz")[0] == 200,
            60,
            "operator /readyz",
        )
        assert proc.poll() is None, handle.log_tail()
        yield handle
        # A status the apiserver refused (a null where the schema wants a value) leaves a stale
        # status behind while later passes may hide it: none may happen in the whole session.
        refused = [line for line in handle.log.read_text().splitlines() if "is invalid: [status." in line]
        assert not refused, "the operator wrote a status the apiserver refused:\n" + "\n".join(refused[:3])
    finally:
        stop(proc)


class PrometheusProcess:
    """A real Prometheus scraping the operator's /metrics every second, and the targets tests add
    (file-based discovery: a router pod's metrics port)."""

    def __init__(self, url: str, targets: Path) -> None:
        self.url = url
        self.targets = targets

    def add_target(self, name: str, address: str, labels: dict[str, str]) -> None:
        """Scrape ``address`` from now on (written whole, then renamed: Prometheus never reads half)."""
        partial = self.targets / f".{name}.json.partial"
        partial.write_text(json.dumps([{"targets": [address], "labels": labels}]))
        partial.rename(self.targets / f"{name}.json")

    def status(self, query: str) -> str:
        """``success``, or Prometheus' error for a query it cannot run."""
        params = urllib.parse.urlencode({"query": query})
        code, body = http_get(f"{self.url}/api/v1/query?{params}")
        reply = json.loads(body) if body.startswith("{") else {"error": f"HTTP {code}: {body}"}
        return str(reply.get("status") if reply.get("status") == "success" else reply.get("error"))

    def vector(self, query: str) -> list[dict[str, Any]]:
        """The samples an instant query returns."""
        params = urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=5) as resp:  # noqa: S310 (loopback)
            result: list[dict[str, Any]] = json.load(resp)["data"]["result"]
        return result

    def value(self, query: str) -> float | None:
        """The single sample an instant query returns, or None while there is none."""
        result = self.vector(query)
        return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.fixture(scope="session")
def prometheus(cluster: Cluster, operator: OperatorProcess) -> Iterator[PrometheusProcess]:
    binary = built("KIMI_PROMETHEUS", "a prometheus binary", "e2e")
    root = cluster.layout.root / "prometheus"
    root.mkdir(exist_ok=True)
    target = urllib.parse.urlsplit(operator.metrics_url).netloc
    targets = root / "targets"
    targets.mkdir(exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "kimi-operator", "static_configs": [{"targets": [target]}]},
            {
                "job_name": "kimi-router",
                "file_sd_configs": [{"files": [str(targets / "*.json")], "refresh_interval": "1s"}],
            },
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    with (cluster.layout.logs / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    handle = PrometheusProcess(f"http://127.0.0.1:{port}", targets)
    try:
        wait_for(lambda: proc.poll() is not None or http_get(f"{handle.url}/-/ready")[0] == 200, 60, "prometheus")
        assert proc.poll() is None, (cluster.layout.logs / "prometheus.log").read_text()[-3000:]
        yield handle
    finally:
        stop(proc)


def _dump(cluster: Cluster, namespace: str, test: str) -> str:
    out = []
    for what in ("kimimodels,finetunejobs,loraservers", "jobs", "pods", "events"):
        out.append(f"--- {what} in {namespace} ---")
        out.append(cluster.kubectl("get", what, "-n", namespace, "-o", "yaml", check=False))
    text = "\n".join(out)
    dumps = E2E_DIR.parent / ".cluster-e2e-dumps"
    dumps.mkdir(exist_ok=True)
    (dumps / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', test)}.yaml").write_text(text)
    return text


@pytest.fixture
def namespace(request: pytest.FixtureRequest, cluster: Cluster, api: kubernetes.client.ApiClient) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(3)}"
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": {"kimi-operator.io/e2e": "true"}}})
    # Pods can be created once the ServiceAccount controller has made the default account.
    wait_for(lambda: bool(core.list_namespaced_service_account(name).items), 30, f"default ServiceAccount in {name}")
    # The dataset the base FineTuneJob of e2e/manifests.py names (the operator checks it is there).
    core.create_namespaced_config_map(name, {"metadata": {"name": "data"}, "data": {"train.jsonl": DATASET}})
    yield name
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        sys.stdout.write(_dump(cluster, name, request.node.name))
    core.delete_namespace(name)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Leave no dump directory from an earlier run when this one passed."""
    dumps = Path(E2E_DIR.parent / ".cluster-e2e-dumps")
    if exitstatus == 0 and dumps.exists():
        for f in dumps.iterdir():
            f.unlink()
        dumps.rmdir()


@pytest.fixture(scope="session")
def train_python() -> str:
    """The training environment (LLaMA-Factory 0.9.5, torch), built by `make train-env`."""
    return built("KIMI_TRAIN_PYTHON", "the training environment's python", "e2e")


@pytest.fixture(scope="session")
def oracle_python() -> str:
    """compressed-tensors' environment (`make oracle-env`), which packs the tiny model's experts."""
    return built("KIMI_ORACLE_PYTHON", "the oracle environment's python", "e2e")


@contextlib.contextmanager
def pod_runner(
    cluster: Cluster,
    api: kubernetes.client.ApiClient,
    images: Mapping[str, Image],
    backoff: tuple[float, float] = BACKOFF,
) -> Iterator[PodRunner]:
    """The local pod runner on this session's cluster, for the pods that opt in; when it stops,
    every process it started has ended, its children included."""
    config = config_for(cluster.layout.root, images)
    with running(config, kubernetes.client.CoreV1Api(api), grace=5, backoff=backoff) as handle:
        yield handle
    assert podprocess.leftovers(config.cluster_dir) == []
