"""The local pod runner against the real apiserver: pods on KWOK nodes run their real command here.

The image ``example.test/python`` maps ``python`` to this interpreter; the pods opt in with
``sim.kimi-operator.io/run`` (and a Job's pod with ``sim.kimi-operator.io/hold``).
"""

from __future__ import annotations

import functools
import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from e2e.conftest import pod_runner
from e2e.helpers import wait_for
from kimi_operator.devcluster import podplan, podprocess, podprotocol
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.devcluster.podplan import Image
from kimi_operator.devcluster.runner import PodRunner

pytestmark = pytest.mark.e2e

NODE = "gpu-4090-a"
STORAGE = "/mnt/nvme/kimi"
IMAGE = "example.test/python:3.11"
RUN = {podprotocol.RUN_ANNOTATION: "true", podprotocol.HOLD_ANNOTATION: "true"}

# Reads a Secret and the downward API from its env, authenticates with its ServiceAccount the way the
# workloads do (kimi_operator.kubeconfig), writes into the node's storage and a termination message.
SUCCESS = """
import json, os, sys
from pathlib import Path
import kubernetes
from kimi_operator.kubeconfig import load_client
out = Path(sys.argv[1]) / os.environ["NAMESPACE"]
out.mkdir(parents=True, exist_ok=True)
review = kubernetes.client.AuthenticationV1Api(load_client()).create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
)
user = review.status.user_info
result = {k: os.environ[k] for k in ("TOKEN", "POD_NAME", "POD_IP", "CPUS", "NAMESPACE")}
result.update(user=user.username, extra=user.extra, cwd=os.getcwd(), sa=sorted(os.listdir(sys.argv[3])))
(out / "result.json").write_text(json.dumps(result))
Path(sys.argv[2]).write_text("all done")
"""
FAIL_WITH_FILE = """
import sys
from pathlib import Path
print("reading the dataset")
Path(sys.argv[1]).write_text("bad input on line 3")
sys.exit(3)
"""
FAIL_WITH_LOG = """
import sys
print("loading", flush=True)
print("error: no GPU visible", file=sys.stderr)
sys.exit(4)
"""
# Serves on the pod's IP; the stubborn one ignores SIGTERM (SIGKILL after the grace period).
# The polite one has a long grace period: only its SIGTERM can end it within the test.
SERVE = """
import http.server, os, signal, sys
from pathlib import Path
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
Path(sys.argv[2]).write_text(str(os.getpid()))
server = http.server.HTTPServer((os.environ["POD_IP"], 8080), http.server.SimpleHTTPRequestHandler)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def runner(cluster: Cluster, api: kubernetes.client.ApiClient) -> Iterator[PodRunner]:
    python = Image(programs={("python",): (sys.executable,)}, env={"PYTHONPATH": str(repo_root() / "operator")})
    with pod_runner(cluster, api, {"example.test/python": python}) as handle:
        yield handle


def env(extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [
        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        *(extra or []),
    ]


def pod_spec(command: list[str], **container: Any) -> dict[str, Any]:
    return {
        "restartPolicy": "Never",
        "nodeSelector": {"kubernetes.io/hostname": NODE},
        "containers": [
            {
                "name": "main",
                "image": IMAGE,
                "command": command,
                "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                **container,
            }
        ],
        "volumes": [{"name": "models", "hostPath": {"path": STORAGE, "type": "DirectoryOrCreate"}}],
    }


def job(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"annotations": RUN}, "spec": spec}},
    }


def job_condition(batch: Any, name: str, namespace: str) -> str | None:
    conditions = batch.read_namespaced_job_status(name, namespace).status.conditions or []
    done = [c.type for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"]
    return done[0] if done else None


def job_pod(core: Any, name: str, namespace: str) -> Any:
    (pod,) = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
    return pod


def test_job_runs_its_command_and_completes(
    cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str, runner: PodRunner
) -> None:
    # The client's models are typed; these tests pass plain dicts.
    batch: Any = kubernetes.client.BatchV1Api(api)
    core: Any = kubernetes.client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "hub"}, "stringData": {"token": "hf_abc"}})
    spec = pod_spec(
        ["python", "-c", SUCCESS, "/models", "/dev/termination-log", podplan.SERVICE_ACCOUNT_DIR],
        env=env(
            [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}},
                {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            ]
        ),
        resources={"limits": {"cpu": "1500m", "memory": "1Gi"}},
    )
    batch.create_namespaced_job(namespace, job("ok", spec))
    finished = wait_for(functools.partial(job_condition, batch, "ok", namespace), 90, "Job finished")
    pod = job_pod(core, "ok", namespace)
    log = cluster.layout.logs / f"{namespace}.{pod.metadata.name}.main.log"
    assert finished == "Complete", log.read_text() if log.exists() else pod.metadata.annotations
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0

    # The file is in the node's directory, written with what the pod was given.
    result = json.loads(
        (cluster.layout.root / "nodes" / NODE / STORAGE.lstrip("/") / namespace / "result.json").read_text()
    )
    assert result["TOKEN"] == "hf_abc"
    assert result["POD_NAME"] == pod.metadata.name
    assert result["POD_IP"] == pod.status.pod_ip
    assert result["POD_IP"].startswith("127.64.")
    assert result["CPUS"] == "2"  # 1500m rounded up to whole cores
    assert result["NAMESPACE"] == namespace
    # Its ServiceAccount's token, bound to the pod.
    assert result["user"] == f"system:serviceaccount:{namespace}:default"
    assert result["extra"]["authentication.kubernetes.io/pod-name"] == [pod.metadata.name]
    assert result["sa"] == ["ca.crt", "namespace", "token"]
    assert (cluster.layout.root / "pods" / pod.metadata.uid / "termination" / "main").read_text() == "all done"


def test_failing_jobs_report_exit_code_and_message(
    api: kubernetes.client.ApiClient, namespace: str, runner: PodRunner
) -> None:
    # The client's models are typed; these tests pass plain dicts.
    batch: Any = kubernetes.client.BatchV1Api(api)
    core: Any = kubernetes.client.CoreV1Api(api)
    batch.create_namespaced_job(
        namespace, job("file", pod_spec(["python", "-c", FAIL_WITH_FILE, "/dev/termination-log"]))
    )
    fallback = pod_spec(["python", "-c", FAIL_WITH_LOG], terminationMessagePolicy="FallbackToLogsOnError")
    batch.create_namespaced_job(namespace, job("logs", fallback))
    for name, code, message in (("file", 3, "bad input on line 3"), ("logs", 4, "loading\nerror: no GPU visible\n")):
        finished = wait_for(functools.partial(job_condition, batch, name, namespace), 90, f"Job {name} finished")
        assert finished == "Failed"
        pod = job_pod(core, name, namespace)
        assert pod.status.phase == "Failed"
        terminated = pod.status.container_statuses[0].state.terminated
        assert (terminated.exit_code, terminated.reason, terminated.message) == (code, "Error", message)


def _alive(pid: int) -> bool:
    return podprocess.start_time(pid) is not None


def _serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback)
            return bool(resp.status == 200)
    except OSError:
        return False


def test_deleted_pods_processes_end(
    cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str, runner: PodRunner
) -> None:
    core: Any = kubernetes.client.CoreV1Api(api)
    pids: dict[str, Path] = {}
    grace = {"polite": 120, "stubborn": 2}
    for kind in ("polite", "stubborn"):
        pid_file = f"/models/{namespace}/{kind}.pid"
        spec = pod_spec(["python", "-c", SERVE, kind, pid_file], env=env(), workingDir="/models")
        spec["terminationGracePeriodSeconds"] = grace[kind]
        meta = {"name": kind, "annotations": {podprotocol.RUN_ANNOTATION: "true"}}
        core.create_namespaced_pod(namespace, {"metadata": meta, "spec": spec})
        pids[kind] = cluster.layout.root / "nodes" / NODE / STORAGE.lstrip("/") / namespace / f"{kind}.pid"
    for kind, pid_path in pids.items():
        wait_for(pid_path.exists, 60, f"{kind} started")
        ip = core.read_namespaced_pod(kind, namespace).status.pod_ip
        # Bound to the pod's own loopback address, serving the node directory (its workingDir).
        url = f"http://{ip}:8080/{namespace}/"
        wait_for(functools.partial(_serving, url), 30, f"{kind} serving on {ip}")
    running = {kind: int(path.read_text()) for kind, path in pids.items()}
    uids = [core.read_namespaced_pod(kind, namespace).metadata.uid for kind in running]
    assert all(_alive(pid) for pid in running.values())
    deleted = time.monotonic()
    for kind in running:
        core.delete_namespaced_pod(kind, namespace)
    ended: dict[str, float] = {}

    def ended_now() -> bool:
        for kind, pid in running.items():
            if kind not in ended and not _alive(pid):
                ended[kind] = time.monotonic() - deleted
        return len(ended) == len(running)

    wait_for(ended_now, 20, "both processes ended")
    assert ended["polite"] < 10, "the polite process ended on SIGTERM, well within its 120 s grace"
    assert ended["stubborn"] >= 1.5, "the stubborn process lived through its 2 s grace period"
    log = (cluster.layout.logs / f"{namespace}.stubborn.main.log").read_text()
    assert "ignoring SIGTERM" in log
    # Both pods are gone; their directories go with them.
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, 30, "pods gone")
    wait_for(
        lambda: not any((cluster.layout.root / "pods" / uid).exists() for uid in uids), 30, "pod directories removed"
    )
