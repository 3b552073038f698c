"""The local pod runner: what a kubelet would run for a pod, as tables; then its processes and
workers, with real short-lived local processes and a fake API."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import signal
import stat
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import kubernetes
import pytest
import urllib3

from kimi_operator.devcluster import podenv, podplan, podprocess, podprotocol, runner
from kimi_operator.devcluster.podenv import MissingReference, PlanError, References
from kimi_operator.devcluster.podplan import ContainerPlan, Image, RunnerConfig
from kimi_operator.devcluster.podprocess import Process
from kimi_operator.devcluster.runner import PodRunner
from tests.processes import wait_until

CLUSTER = Path("/c")
TRAINER = Image(
    programs={("kimi-operator",): ("/venv/train/bin/python", "-m", "kimi_operator")},
    entrypoint=("kimi-operator",),
    env={"PYTHONPATH": "/repo/operator"},
)
ENGINE = Image(
    programs={
        ("kimi-operator",): ("/venv/dev/bin/python", "-m", "kimi_operator"),
        ("python", "-m", "sglang.launch_server"): ("/venv/train/bin/python", "/repo/e2e/engines/sglang_standin.py"),
        ("python",): ("/venv/engine/bin/python",),
    },
)
LLAMA = Image(programs={("llama-server",): ("/opt/llama/bin/llama-server",)})
CONFIG = RunnerConfig(
    cluster_dir=CLUSTER,
    images={
        "ghcr.io/kimi-operator/trainer": TRAINER,
        "ghcr.io/kimi-operator/engine": ENGINE,
        "ghcr.io/kimi-operator/llamacpp": LLAMA,
    },
    server="https://127.0.0.1:6443",
    ca_file=Path("/c/pki/ca.crt"),
    base_env={"PATH": "/usr/bin"},
)
REFS = References(
    secrets={"hub": {"token": b"hf_secret"}, "key": {"api-key": b"k1", "other": b"o"}},
    config_maps={"data": {"train.jsonl": b"{}\n"}, "kube-root-ca.crt": {"ca.crt": b"CA"}},
    tokens={"": "tok"},
    allocatable={"cpu": "94", "memory": "1008Gi"},
)
SA_VOLUME = {
    "name": "kube-api-access-x",
    "projected": {
        "defaultMode": 420,
        "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        ],
    },
}
SA_MOUNT = {"name": "kube-api-access-x", "mountPath": podplan.SERVICE_ACCOUNT_DIR, "readOnly": True}


def pod(**spec: Any) -> dict[str, Any]:
    """A training pod as the apiserver returns it once KWOK runs it on gpu-4090-a."""
    base: dict[str, Any] = {
        "metadata": {
            "name": "train-abc",
            "namespace": "ns",
            "uid": "u-1",
            "labels": {"app": "train"},
            "annotations": {podprotocol.RUN_ANNOTATION: "true", podprotocol.HOLD_ANNOTATION: "true"},
            "ownerReferences": [{"kind": "Job", "name": "train"}],
        },
        "spec": {
            "nodeName": "gpu-4090-a",
            "serviceAccountName": "trainer",
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "train",
                    "image": "ghcr.io/kimi-operator/trainer:0.1.0",
                    "args": ["train", "--config=/models/ns/cfg.yaml", "--out", "/models/ns/out"],
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    "resources": {"limits": {"cpu": "3500m", "memory": "16Gi"}},
                    "volumeMounts": [{"name": "models", "mountPath": "/models"}, SA_MOUNT],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                }
            ],
            "volumes": [
                {"name": "models", "hostPath": {"path": "/mnt/nvme/kimi", "type": "DirectoryOrCreate"}},
                SA_VOLUME,
            ],
        },
        "status": {"phase": "Running", "podIP": "127.64.0.7", "hostIP": "127.1.0.1", "podIPs": [{"ip": "127.64.0.7"}]},
    }
    base["spec"].update(spec)
    return base


def container(**fields: Any) -> dict[str, Any]:
    return {"name": "c", "image": "ghcr.io/kimi-operator/engine:0.1.0", **fields}


# -- quantities and references -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", Fraction(1)),
        ("500m", Fraction(1, 2)),
        ("3.5", Fraction(7, 2)),
        ("16Gi", Fraction(16 * 2**30)),
        ("1k", Fraction(1000)),
        ("1M", Fraction(10**6)),
        ("1e3", Fraction(1000)),
        ("1E", Fraction(10**18)),
        ("2Ki", Fraction(2048)),
        (".5", Fraction(1, 2)),
        (4, Fraction(4)),
    ],
)
def test_quantities_parse_exactly(text: str | int, value: Fraction) -> None:
    assert podenv.quantity(text) == value


def test_a_malformed_quantity_is_an_error() -> None:
    with pytest.raises(PlanError, match="not a quantity"):
        podenv.quantity("16 GB")


@pytest.mark.parametrize(
    ("resource", "amount", "divisor", "value"),
    [
        ("limits.cpu", "3500m", None, "4"),  # whole cores, rounded up
        ("limits.cpu", "2", None, "2"),
        ("limits.cpu", "1500m", "0", "2"),  # the apiserver's default divisor
        ("limits.cpu", "250m", "1m", "250"),
        ("limits.cpu", "1", "100m", "10"),
        ("requests.cpu", "1m", None, "1"),
        ("limits.memory", "16Gi", None, str(16 * 2**30)),
        ("limits.memory", "16Gi", "1Mi", str(16 * 1024)),
        ("limits.memory", "1500", "1Ki", "2"),
        ("requests.memory", None, None, "0"),
        ("limits.ephemeral-storage", "1G", "1M", "1000"),
    ],
)
def test_resource_values_are_rounded_as_the_kubelet_does(
    resource: str, amount: str | None, divisor: str | None, value: str
) -> None:
    assert podenv.resource_value(resource, amount, divisor) == value


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("metadata.name", "train-abc"),
        ("metadata.namespace", "ns"),
        ("metadata.uid", "u-1"),
        ("spec.nodeName", "gpu-4090-a"),
        ("spec.serviceAccountName", "trainer"),
        ("status.podIP", "127.64.0.7"),
        ("status.podIPs", "127.64.0.7"),
        ("status.hostIP", "127.1.0.1"),
        ("metadata.labels['app']", "train"),
        ("metadata.labels['none']", ""),
        ("metadata.labels", 'app="train"'),
    ],
)
def test_field_references(path: str, value: str) -> None:
    assert podenv.field_value(pod(), path) == value


def test_unknown_field_reference_is_an_error() -> None:
    with pytest.raises(PlanError, match="not supported"):
        podenv.field_value(pod(), "status.phase")


# -- expansion and paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("--host=$(POD_IP)", "--host=127.0.0.9"),
        ("$(POD_IP):$(PORT)", "127.0.0.9:30000"),
        ("$$(POD_IP)", "$(POD_IP)"),  # escaped
        ("$$$(POD_IP)", "$127.0.0.9"),
        ("$(MISSING)", "$(MISSING)"),  # unknown: as written
        ("$(POD_IP", "$(POD_IP"),  # unclosed
        ("cost $5", "cost $5"),
        ("ends with $", "ends with $"),
        ("$()", "$()"),
        ("a$$b", "a$b"),
    ],
)
def test_expansion_follows_kubernetes(text: str, value: str) -> None:
    assert podenv.expand(text, {"POD_IP": "127.0.0.9", "PORT": "30000"}) == value


MOUNTS = {
    "/models": Path("/c/nodes/a/mnt/nvme/kimi"),
    "/models/cache": Path("/c/pods/u/cache"),
    "/adapter-cache": Path("/c/nodes/a/cache"),
}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("/models", "/c/nodes/a/mnt/nvme/kimi"),
        ("/models/ns/x", "/c/nodes/a/mnt/nvme/kimi/ns/x"),
        ("/models/cache/y", "/c/pods/u/cache/y"),  # the longest mount wins
        ("--model-path=/models/ns", "--model-path=/c/nodes/a/mnt/nvme/kimi/ns"),
        ("a=/adapter-cache/1,b=/adapter-cache/2", "a=/c/nodes/a/cache/1,b=/c/nodes/a/cache/2"),
        ("/adapter-cache/1,/models/2", "/c/nodes/a/cache/1,/c/nodes/a/mnt/nvme/kimi/2"),
        ("/modelsX/y", "/modelsX/y"),  # not a whole component
        ("x/models/y", "x/models/y"),  # not where a path starts
        ("print('/models')", "print('/models')"),
        ("http://h/models", "http://h/models"),
    ],
)
def test_mount_paths_are_rewritten_where_a_path_starts(text: str, value: str) -> None:
    assert podplan.localize(text, MOUNTS) == value


@pytest.mark.parametrize(
    ("image", "repo"),
    [
        ("ghcr.io/kimi-operator/trainer:0.1.0", "ghcr.io/kimi-operator/trainer"),
        ("ghcr.io/kimi-operator/trainer@sha256:abc", "ghcr.io/kimi-operator/trainer"),
        ("ghcr.io/kimi-operator/trainer:0.1@sha256:abc", "ghcr.io/kimi-operator/trainer"),
        ("localhost:5000/x/y:1", "localhost:5000/x/y"),
        ("localhost:5000/x/y", "localhost:5000/x/y"),
        ("python", "python"),
    ],
)
def test_image_repository(image: str, repo: str) -> None:
    assert podplan.repository(image) == repo


@pytest.mark.parametrize(
    ("argv", "local"),
    [
        (["kimi-operator", "serve-agent"], ["/venv/dev/bin/python", "-m", "kimi_operator", "serve-agent"]),
        (
            ["python", "-m", "sglang.launch_server", "--port", "1"],
            ["/venv/train/bin/python", "/repo/e2e/engines/sglang_standin.py", "--port", "1"],
        ),
        (["python", "-c", "x"], ["/venv/engine/bin/python", "-c", "x"]),  # a shorter prefix
    ],
)
def test_longest_program_prefix_wins(argv: list[str], local: list[str]) -> None:
    program, rest = podplan.local_program(ENGINE, argv, "c")
    assert [*program, *rest] == local


def test_a_program_without_mapping_is_an_error() -> None:
    with pytest.raises(PlanError, match="no local program for 'llama-server --port 1'"):
        podplan.local_program(ENGINE, ["llama-server", "--port", "1"], "c")


# -- which pods --------------------------------------------------------------------------------


def _with(change: dict[str, Any]) -> dict[str, Any]:
    p = pod()
    for path, value in change.items():
        target = p
        *head, last = path.split(".")
        for part in head:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return p


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"metadata.annotations": {podprotocol.HOLD_ANNOTATION: "true"}}, "no sim.kimi-operator.io/run"),
        ({"metadata.annotations": {podprotocol.RUN_ANNOTATION: "true"}}, "Job pod without"),
        ({"metadata.annotations": {podprotocol.RUN_ANNOTATION: "true"}, "metadata.ownerReferences": None}, None),
        ({"metadata.deletionTimestamp": "2026-01-01T00:00:00Z"}, "being deleted"),
        ({"spec.nodeName": "real-node"}, "not on a simulated node"),
        ({"status.phase": "Pending"}, "not running yet"),
        ({"status.podIP": None}, "not running yet"),
    ],
)
def test_which_pods_are_run(change: dict[str, Any], reason: str | None) -> None:
    found = podprotocol.skip_reason(_with(change), {"gpu-4090-a"})
    assert (found is None) if reason is None else (found is not None and reason in found)


@pytest.mark.parametrize(
    ("change", "grace"),
    [
        ({}, 30),
        ({"spec.terminationGracePeriodSeconds": 120}, 120),
        ({"spec.terminationGracePeriodSeconds": 120, "metadata.deletionGracePeriodSeconds": 0}, 0),
    ],
)
def test_grace_period(change: dict[str, Any], grace: int) -> None:
    assert podprotocol.grace_seconds(_with(change)) == grace


def test_needs_lists_every_reference() -> None:
    p = pod(
        containers=[
            container(
                envFrom=[{"secretRef": {"name": "s1"}}, {"configMapRef": {"name": "c1"}}],
                env=[
                    {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s2", "key": "k"}}},
                    {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "c2", "key": "k"}}},
                ],
            )
        ],
        volumes=[
            {"name": "v1", "secret": {"secretName": "s3"}},
            {"name": "v2", "configMap": {"name": "c3"}},
            SA_VOLUME,
            {"name": "v3", "projected": {"sources": [{"serviceAccountToken": {"audience": "vault", "path": "t"}}]}},
        ],
    )
    assert podplan.needs(p) == podplan.Needs(
        frozenset({"s1", "s2", "s3"}), frozenset({"c1", "c2", "c3", "kube-root-ca.crt"}), frozenset({"", "vault"})
    )


# -- env -----------------------------------------------------------------------------------------


def test_env_resolves_every_source_in_kubernetes_order() -> None:
    c = container(
        resources={"limits": {"cpu": "3500m"}, "requests": {"memory": "1Gi"}},
        envFrom=[{"secretRef": {"name": "key"}, "prefix": "KEY_"}, {"configMapRef": {"name": "data"}}],
        env=[
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "URL", "value": "http://$(POD_IP):$(PORT)/$$(POD_IP)"},
            {"name": "PORT", "value": "30000"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}},
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Gi"}}},
            {"name": "REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "nope", "optional": True}}},
            {"name": "KEY_other", "value": "overridden"},
        ],
    )
    p = pod(containers=[c])
    assert podenv.container_env(p, c, REFS) == {
        "KEY_api-key": "k1",
        "KEY_other": "overridden",
        "train.jsonl": "{}\n",  # dots are allowed in Kubernetes variable names
        "POD_IP": "127.64.0.7",
        "URL": "http://127.64.0.7:$(PORT)/$(POD_IP)",  # PORT is defined after URL
        "PORT": "30000",
        "TOKEN": "hf_secret",
        "CPUS": "4",
        "MEM": "1008",  # no memory limit: the node's allocatable
        "REQ": "1024",
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ([{"name": "T", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}], "Secret 'gone' not found"),
        (
            [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "k"}}}],
            "key 'k' in Secret 'hub' not found",
        ),
        ([{"name": "T", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}}], "ConfigMap 'gone'"),
    ],
)
def test_missing_references_wait(env: list[dict[str, Any]], message: str) -> None:
    c = container(env=env)
    with pytest.raises(MissingReference, match=message):
        podenv.container_env(pod(containers=[c]), c, REFS)


# -- the whole plan --------------------------------------------------------------------------------


def test_training_pod_plan() -> None:
    plan = podplan.plan(pod(), CONFIG, REFS)
    (train,) = plan.containers
    node = CLUSTER / "nodes" / "gpu-4090-a" / "mnt" / "nvme" / "kimi"
    assert train.argv == (
        "/venv/train/bin/python",
        "-m",
        "kimi_operator",
        "train",
        f"--config={node}/ns/cfg.yaml",
        "--out",
        f"{node}/ns/out",
    )
    assert train.env == {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/repo/operator",
        "HOSTNAME": "train-abc",
        "POD_IP": "127.64.0.7",
        "KUBECONFIG": "/c/pods/u-1/kubeconfig",
    }
    assert train.cwd == CLUSTER / "pods" / "u-1"
    assert train.log == CLUSTER / "logs" / "ns.train-abc.train.log"
    assert train.termination_file == CLUSTER / "pods" / "u-1" / "termination" / "train"
    assert train.fallback_to_logs
    assert node in plan.dirs
    files = {f.path: f for f in plan.files}
    sa = CLUSTER / "pods" / "u-1" / "volumes" / "kube-api-access-x"
    assert files[sa / "token"].data == b"tok"
    assert files[sa / "ca.crt"].data == b"CA"
    assert files[sa / "namespace"].data == b"ns"
    assert files[sa / "token"].mode == 0o644
    kubeconfig = json.loads(files[CLUSTER / "pods" / "u-1" / "kubeconfig"].data)
    assert kubeconfig["users"][0]["user"] == {"tokenFile": str(sa / "token")}
    assert kubeconfig["clusters"][0]["cluster"] == {
        "server": "https://127.0.0.1:6443",
        "certificate-authority": "/c/pki/ca.crt",
    }
    assert files[train.termination_file].data == b""
    assert (plan.namespace, plan.name, plan.uid, plan.node, plan.restart_policy, plan.job_owned) == (
        "ns",
        "train-abc",
        "u-1",
        "gpu-4090-a",
        "Never",
        True,
    )


def test_engine_pod_plan_with_init_container_and_sidecar() -> None:
    args = ["--host=$(POD_IP)", "--model-path", "/models/ns/kimi", "--lora-paths", "a=/adapter-cache/x"]
    p = pod(
        restartPolicy="Always",
        initContainers=[
            container(name="fetch", command=["kimi-operator"], args=["fetch", "--cache", "/adapter-cache"]),
            container(name="side", command=["kimi-operator"], args=["serve-agent"], restartPolicy="Always"),
        ],
        containers=[
            container(
                name="engine",
                command=["python", "-m", "sglang.launch_server"],
                args=args,
                env=[{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                volumeMounts=[
                    {"name": "models", "mountPath": "/models", "readOnly": True},
                    {"name": "models", "mountPath": "/adapter-cache", "subPath": "adapter-cache"},
                    {"name": "shm", "mountPath": "/scratch"},
                ],
                workingDir="/models",
            ),
            container(name="llama", image="ghcr.io/kimi-operator/llamacpp:0.1.0", command=["llama-server"]),
        ],
        volumes=[{"name": "models", "hostPath": {"path": "/mnt/nvme/kimi"}}, {"name": "shm", "emptyDir": {}}],
    )
    plan = podplan.plan(p, CONFIG, REFS)
    node = CLUSTER / "nodes" / "gpu-4090-a" / "mnt" / "nvme" / "kimi"
    assert [c.name for c in plan.init_containers] == ["fetch", "side"]
    assert [c.sidecar for c in plan.init_containers] == [False, True]
    # No mount of the cache in the init container: its argument stays as written.
    assert plan.init_containers[0].argv[-1] == "/adapter-cache"
    engine, llama = plan.containers
    assert engine.argv == (
        "/venv/train/bin/python",
        "/repo/e2e/engines/sglang_standin.py",
        "--host=127.64.0.7",
        "--model-path",
        f"{node}/ns/kimi",
        "--lora-paths",
        f"a={node}/adapter-cache/x",
    )
    assert engine.cwd == node
    assert "KUBECONFIG" not in engine.env  # no ServiceAccount volume mounted
    assert llama.argv == ("/opt/llama/bin/llama-server",)
    assert CLUSTER / "pods" / "u-1" / "volumes" / "shm" in plan.dirs
    assert plan.restart_policy == "Always"


@pytest.mark.parametrize(
    ("fields", "argv"),
    [
        ({}, ("/venv/train/bin/python", "-m", "kimi_operator", "train", "--help")),  # ENTRYPOINT + CMD
        ({"args": ["prepare"]}, ("/venv/train/bin/python", "-m", "kimi_operator", "prepare")),  # args replace CMD
        ({"command": ["kimi-operator"]}, ("/venv/train/bin/python", "-m", "kimi_operator")),  # command drops CMD
        (
            {"command": ["kimi-operator"], "args": ["x", "$(A)"], "env": [{"name": "A", "value": "1"}]},
            ("/venv/train/bin/python", "-m", "kimi_operator", "x", "1"),
        ),
    ],
)
def test_entrypoint_and_cmd(fields: dict[str, Any], argv: tuple[str, ...]) -> None:
    config = RunnerConfig(
        cluster_dir=CLUSTER,
        images={"ghcr.io/kimi-operator/trainer": Image(**{**TRAINER.__dict__, "cmd": ("train", "--help")})},
    )
    c = {"name": "c", "image": "ghcr.io/kimi-operator/trainer:0.1.0", **fields}
    (planned,) = podplan.plan(pod(containers=[c], volumes=[]), config, REFS).containers
    assert planned.argv == argv


def test_volumes_of_secrets_config_maps_and_the_downward_api() -> None:
    p = pod(
        containers=[
            container(
                args=[],
                command=["python", "/etc/key/api-key", "/etc/info/cpu"],
                terminationMessagePath="/var/log/msg",
                volumeMounts=[
                    {"name": "key", "mountPath": "/etc/key"},
                    {"name": "info", "mountPath": "/etc/info"},
                    {"name": "data", "mountPath": "/data"},
                    {"name": "store", "mountPath": "/store"},
                ],
                env=[{"name": "MSG", "value": "/var/log/msg"}],
            )
        ],
        volumes=[
            {
                "name": "key",
                "secret": {"secretName": "key", "items": [{"key": "api-key", "path": "api-key", "mode": 256}]},
            },
            {
                "name": "info",
                "downwardAPI": {
                    "items": [
                        {"path": "cpu", "resourceFieldRef": {"containerName": "c", "resource": "limits.cpu"}},
                        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    ]
                },
            },
            {"name": "data", "configMap": {"name": "data", "defaultMode": 0o600}},
            {"name": "opt", "secret": {"secretName": "nope", "optional": True}},
            {"name": "store", "persistentVolumeClaim": {"claimName": "adapters"}},
        ],
    )
    plan = podplan.plan(p, CONFIG, REFS)
    files = {
        str(f.path.relative_to(CLUSTER / "pods" / "u-1" / "volumes")): f
        for f in plan.files
        if "volumes" in f.path.parts
    }
    assert {k: (v.data, v.mode) for k, v in files.items()} == {
        "key/api-key": (b"k1", 256),
        "info/cpu": (b"94", 0o644),  # no limit: the node's allocatable
        "info/labels": (b'app="train"', 0o644),
        "data/train.jsonl": (b"{}\n", 0o600),
    }
    (c,) = plan.containers
    volumes = CLUSTER / "pods" / "u-1" / "volumes"
    assert c.argv == ("/venv/engine/bin/python", f"{volumes}/key/api-key", f"{volumes}/info/cpu")
    assert c.termination_file == CLUSTER / "pods" / "u-1" / "termination" / "c"
    assert c.env["MSG"] == str(c.termination_file)  # the termination path is rewritten too
    assert CLUSTER / "claims" / "ns" / "adapters" in plan.dirs
    assert not c.fallback_to_logs


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"volumes": [{"name": "models", "nfs": {"server": "x"}}]}, "nfs is not supported"),
        (
            {"containers": [{**pod()["spec"]["containers"][0], "image": "docker.io/busybox:1"}]},
            "image 'docker.io/busybox' has no local mapping",
        ),
        ({"volumes": [{"name": "other", "emptyDir": {}}]}, "volumeMount names no volume 'models'"),
    ],
)
def test_pods_that_cannot_run_here(change: dict[str, Any], error: str) -> None:
    with pytest.raises(PlanError, match=error):
        podplan.plan(pod(**change), CONFIG, REFS)


def test_a_missing_secret_volume_waits() -> None:
    p = pod(volumes=[*pod()["spec"]["volumes"], {"name": "k", "secret": {"secretName": "absent"}}])
    with pytest.raises(MissingReference, match="volume k: secret 'absent' not found"):
        podplan.plan(p, CONFIG, REFS)


def test_no_kubeconfig_without_a_server() -> None:
    plan = podplan.plan(pod(), RunnerConfig(cluster_dir=CLUSTER, images=CONFIG.images), REFS)
    assert "KUBECONFIG" not in plan.containers[0].env


def test_plan_does_not_change_the_pod() -> None:
    p = pod()
    before = copy.deepcopy(p)
    podplan.plan(p, CONFIG, REFS)
    assert p == before


# -- the outcome --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "status"),
    [(0, (0, "Completed")), (3, (3, "Error")), (-15, (143, "Error")), (-9, (137, "Error"))],
)
def test_exit_status(returncode: int, status: tuple[int, str]) -> None:
    assert podprotocol.exit_status(returncode) == status


LOG = b"".join(f"line {i}\n".encode() for i in range(200))


@pytest.mark.parametrize(
    ("file", "log", "code", "fallback", "message"),
    [
        (b"disk full", LOG, 3, True, "disk full"),  # the file wins
        (b"", LOG, 3, True, "".join(f"line {i}\n" for i in range(120, 200))),  # last 80 lines
        (b"", LOG, 0, True, ""),  # success: no fallback
        (b"", LOG, 3, False, ""),  # File policy: no fallback
        (b"x" * 5000, b"", 3, False, "x" * 4096),  # the file's last 4096 bytes
        (b"", b"y" * 3000, 1, True, "y" * 2048),  # the log's last 2048 bytes
        (b"  \n", b"boom\n", 1, True, "  \n"),  # only a file of zero bytes falls back, as in the kubelet
    ],
)
def test_termination_message(file: bytes, log: bytes, code: int, fallback: bool, message: str) -> None:
    assert podprotocol.termination_message(file, log, code, fallback) == message


def test_outcome_patches() -> None:
    assert podprotocol.outcome_patch("u", 0, "Completed", "") == {
        "metadata": {"uid": "u", "annotations": {podprotocol.HOLD_ANNOTATION: None}}
    }
    assert podprotocol.outcome_patch("u", 3, "Error", "bad") == {
        "metadata": {
            "uid": "u",
            "labels": {podprotocol.FAIL_LABEL: "true"},
            "annotations": {
                podprotocol.EXIT_CODE_ANNOTATION: "3",
                podprotocol.REASON_ANNOTATION: "Error",
                podprotocol.MESSAGE_ANNOTATION: "bad",
            },
        }
    }


@pytest.mark.parametrize(
    ("results", "outcome"),
    [
        ([(0, "Completed", "")], (0, "Completed", "")),
        ([(0, "Completed", ""), (2, "Error", "b"), (3, "Error", "c")], (2, "Error", "b")),
        ([], (0, "Completed", "")),
    ],
)
def test_pod_result(results: list[tuple[int, str, str]], outcome: tuple[int, str, str]) -> None:
    assert podprotocol.pod_result(results) == outcome


# -- binding, subPaths, FileOrCreate, file modes ---------------------------------------------------


ANY_V4 = "0.0.0.0"  # noqa: S104 (the value refused)


@pytest.mark.parametrize(
    ("args", "env", "refused"),
    [
        ([f"--host={ANY_V4}"], [], True),
        (["--host", ANY_V4], [], True),
        (["--host", "::"], [], True),
        (["--host=::"], [], True),
        ([], [{"name": "HOST", "value": ANY_V4}], True),
        (["--host=$(H)"], [{"name": "H", "value": ANY_V4}], True),  # after expansion
        (["--host=127.0.0.1"], [{"name": "HOST", "value": "127.0.0.1"}], False),
        (["--allow=0.0.0.0/0"], [], False),
    ],
)
def test_binding_every_interface_is_refused(args: list[str], env: list[dict[str, Any]], refused: bool) -> None:
    c = container(command=["python", "serve.py"], args=args, env=env)
    p = pod(containers=[c], volumes=[])
    if refused:
        with pytest.raises(PlanError, match="would bind every interface"):
            podplan.plan(p, CONFIG, REFS)
    else:
        podplan.plan(p, CONFIG, REFS)


def _modes_pod(volume: dict[str, Any]) -> dict[str, Any]:
    return pod(containers=[container(command=["python"])], volumes=[volume])


@pytest.mark.parametrize(
    ("volume", "mode"),
    [
        ({"secret": {"secretName": "hub"}}, 0o644),  # no defaultMode: the kubelet's 0644
        ({"secret": {"secretName": "hub", "defaultMode": 0o400}}, 0o400),
        ({"secret": {"secretName": "hub", "defaultMode": 0}}, 0),  # zero is a mode, not "absent"
        ({"secret": {"secretName": "hub", "items": [{"key": "token", "path": "token", "mode": 0}]}}, 0),
        ({"projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}, 0o644),
        ({"projected": {"defaultMode": 0o440, "sources": [{"serviceAccountToken": {"path": "token"}}]}}, 0o440),
    ],
)
def test_volume_file_modes_follow_default_mode(volume: dict[str, Any], mode: int) -> None:
    plan = podplan.plan(_modes_pod({"name": "v", **volume}), CONFIG, REFS)
    (token,) = [f for f in plan.files if f.path.name == "token"]
    assert token.mode == mode


def test_subpath_directories_and_file_or_create_are_planned() -> None:
    p = pod(
        containers=[
            container(
                command=["python"],
                volumeMounts=[
                    {"name": "models", "mountPath": "/cache", "subPath": "adapter-cache"},
                    {"name": "sock", "mountPath": "/run/x.sock"},
                ],
            )
        ],
        volumes=[
            {"name": "models", "hostPath": {"path": "/mnt/nvme/kimi"}},
            {"name": "sock", "hostPath": {"path": "/run/x.sock", "type": "FileOrCreate"}},
        ],
    )
    plan = podplan.plan(p, CONFIG, REFS)
    node = CLUSTER / "nodes" / "gpu-4090-a"
    assert plan.subpaths == (node / "mnt" / "nvme" / "kimi" / "adapter-cache",)
    assert plan.touch == (node / "run" / "x.sock",)
    assert node / "run" in plan.dirs
    assert plan.pod_dir == CLUSTER / "pods" / "u-1"


def _keys_pod(**mount: Any) -> dict[str, Any]:
    """A router-like container: two Secret volumes under /keys, which it is told as --keys-dir."""
    return pod(
        containers=[
            container(
                command=[
                    "python",
                    "--keys-dir=/keys",
                    "/keys/key/api-key",
                    "/keysX",
                    "/keys/a",
                    "/keys/,/x",
                ],
                volumeMounts=[
                    {"name": "key", "mountPath": "/keys/key", **mount},
                    {"name": "hub", "mountPath": "/keys/hub"},
                ],
            )
        ],
        volumes=[{"name": "key", "secret": {"secretName": "key"}}, {"name": "hub", "secret": {"secretName": "hub"}}],
    )


def test_a_directory_holding_mounts_is_a_directory_of_links() -> None:
    assert podplan.mount_parents(["/keys/a", "/keys/b/", "/models", "/var/run/sa", "/var/run/sa/x"]) == [
        "/keys",
        "/var",
        "/var/run",
    ]
    plan = podplan.plan(_keys_pod(), CONFIG, REFS)
    (c,) = plan.containers
    rootfs = CLUSTER / "pods" / "u-1" / "rootfs" / "c"
    volumes = CLUSTER / "pods" / "u-1" / "volumes"
    # Exactly the directory (a trailing '/' or list item too): its local copy; a mount inside it: the
    # mount; a longer name, or a path below it that is no mount (the image's): untouched.
    assert c.argv[1:] == (
        f"--keys-dir={rootfs}/keys",
        f"{volumes}/key/api-key",
        "/keysX",
        "/keys/a",
        f"{rootfs}/keys,/x",
    )
    assert set(plan.links) == {(rootfs / "keys" / "key", volumes / "key"), (rootfs / "keys" / "hub", volumes / "hub")}
    # The termination file's /dev is the image's: not a directory of links.
    assert (
        "--x=/dev"
        in podplan.plan(pod(containers=[container(command=["python", "--x=/dev"])]), CONFIG, REFS).containers[0].argv
    )


@pytest.mark.parametrize("order", [1, -1], ids=["outer-first", "inner-first"])
def test_a_mount_inside_another_is_reached_through_the_outer_link(order: int) -> None:
    mounts = [{"name": "out", "mountPath": "/srv/a"}, {"name": "inner", "mountPath": "/srv/a/b"}]
    p = pod(
        containers=[container(command=["python", "/srv"], volumeMounts=mounts[::order])],
        volumes=[{"name": "out", "emptyDir": {}}, {"name": "inner", "emptyDir": {}}],
    )
    plan = podplan.plan(p, CONFIG, REFS)
    rootfs = CLUSTER / "pods" / "u-1" / "rootfs" / "c"
    assert plan.links == ((rootfs / "srv" / "a", CLUSTER / "pods" / "u-1" / "volumes" / "out"),)


def test_materialized_links_show_the_mounts(tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, cluster_dir=tmp_path)
    plan = podplan.plan(_keys_pod(), config, REFS)
    keys = tmp_path / "pods" / "u-1" / "rootfs" / "c" / "keys"
    keys.mkdir(parents=True)
    (keys / "key").symlink_to(tmp_path / "elsewhere")  # left by an earlier run
    runner.materialize(plan)
    runner.materialize(plan)  # again (a restart): the links stay
    assert (keys / "key" / "api-key").read_bytes() == b"k1"
    assert sorted(p.name for p in keys.iterdir()) == ["hub", "key"]


def test_changed_secrets_rewrite_their_volume_files_but_not_subpath_mounts() -> None:
    old = podplan.plan(_keys_pod(), CONFIG, REFS)
    rotated = dataclasses.replace(REFS, secrets={**REFS.secrets, "key": {"api-key": b"k2", "other": b"o"}})
    volumes = CLUSTER / "pods" / "u-1" / "volumes"
    assert podplan.refreshed(old, podplan.plan(_keys_pod(), CONFIG, REFS)) == ([], [])
    assert podplan.refreshed(old, podplan.plan(_keys_pod(), CONFIG, rotated)) == (
        [podplan.File(volumes / "key" / "api-key", b"k2")],
        [],
    )
    # A key added to a Secret appears, one removed goes; a container that mounts one file by subPath
    # keeps its start.
    added = dataclasses.replace(REFS, secrets={**REFS.secrets, "hub": {"token": b"hf_secret", "new": b"n"}})
    writes, removals = podplan.refreshed(old, podplan.plan(_keys_pod(), CONFIG, added))
    assert ([f.path.name for f in writes], removals) == (["new"], [])
    removed = dataclasses.replace(REFS, secrets={**REFS.secrets, "key": {"api-key": b"k1"}})
    assert podplan.refreshed(old, podplan.plan(_keys_pod(), CONFIG, removed)) == ([], [volumes / "key" / "other"])
    by_subpath = _keys_pod(subPath="api-key")
    assert podplan.refreshed(podplan.plan(by_subpath, CONFIG, REFS), podplan.plan(by_subpath, CONFIG, rotated)) == (
        [],
        [],
    )
    assert podplan.updatable(_keys_pod())
    assert podplan.updatable(pod())  # the ServiceAccount volume's kube-root-ca.crt
    assert not podplan.updatable(pod(volumes=[{"name": "models", "hostPath": {"path": "/mnt/nvme/kimi"}}]))


# -- the runner, with real short-lived processes and a fake API --------------------------------------

LOCAL = Image(programs={("python",): (sys.executable,)})
# Ignores SIGTERM, writes its PID (and a child's, in its group) and waits.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
if len(sys.argv) > 2:
    sys.exit(int(sys.argv[2]))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    return podprocess.start_time(pid) is not None


def _wait(check: Callable[[], bool], seconds: float, what: str) -> None:
    wait_until(check, seconds, what, interval=0.02)


def _plan(tmp_path: Path, argv: Sequence[str], *, fallback: bool = False) -> ContainerPlan:
    return ContainerPlan(
        name="c",
        argv=(sys.executable, *argv),
        env={"PATH": os.environ.get("PATH", "")},
        cwd=tmp_path,
        log=tmp_path / "logs" / "c.log",
        termination_file=tmp_path / "termination" / "c",
        fallback_to_logs=fallback,
    )


def _pids(path: Path) -> list[int]:
    _wait(path.exists, 20, f"{path} written")
    return [int(x) for x in path.read_text().split()]


def test_a_reaped_leader_takes_its_group_along_and_its_record(tmp_path: Path) -> None:
    process = Process(_plan(tmp_path, ["-c", STUBBORN, str(tmp_path / "pids"), "0"]), tmp_path)
    process.start()
    leader, child = _pids(tmp_path / "pids")
    (record,) = podprocess.records_dir(tmp_path).glob("*.json")
    recorded = json.loads(record.read_text())
    assert recorded["pid"] == leader
    assert recorded["started"].isdigit()  # field 22 of /proc/<pid>/stat
    _wait(lambda: process.poll() is not None, 20, "leader exited")
    _wait(lambda: not _alive(child), 5, "the leader's child killed when the leader was reaped")
    assert not list(podprocess.records_dir(tmp_path).glob("*.json"))


def test_no_signal_reaches_the_group_of_a_reaped_leader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    process = Process(_plan(tmp_path, ["-c", "pass"]), tmp_path)
    process.start()
    _wait(lambda: process.poll() is not None, 20, "exited")
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append((pid, sig)))
    process.signal(signal.SIGTERM)
    process.stop(time.monotonic())
    assert process.poll() == 0
    assert sent == []


def test_a_failed_restart_is_a_start_error(tmp_path: Path) -> None:
    process = Process(_plan(tmp_path, ["-c", "import sys; sys.exit(3)"]), tmp_path)
    process.start()
    _wait(lambda: process.poll() is not None, 20, "exited")
    assert process.result()[0] == 3
    process.container = dataclasses.replace(process.container, argv=(str(tmp_path / "missing"),))
    process.start()
    code, reason, message = process.result()
    assert (code, reason) == (128, "StartError")
    assert "missing" in message


def test_each_start_has_its_own_termination_message_and_log_tail(tmp_path: Path) -> None:
    write = "import sys; open(sys.argv[1], 'w').write('first'); print('old output'); sys.exit(1)"
    process = Process(_plan(tmp_path, ["-c", write, str(tmp_path / "termination" / "c")], fallback=True), tmp_path)
    process.start()
    _wait(lambda: process.poll() is not None, 20, "exited")
    assert process.result() == (1, "Error", "first")
    process.container = dataclasses.replace(
        process.container, argv=(sys.executable, "-c", "import sys; print('new output'); sys.exit(2)")
    )
    process.start()
    _wait(lambda: process.poll() is not None, 20, "exited")
    # The file of the first run is gone; the fallback reads only what this run logged.
    assert process.result() == (2, "Error", "new output\n")


def test_a_shorter_grace_cuts_a_stop_in_progress(tmp_path: Path) -> None:
    process = Process(_plan(tmp_path, ["-c", STUBBORN, str(tmp_path / "pids")]), tmp_path)
    process.start()
    leader, child = _pids(tmp_path / "pids")
    stopper = threading.Thread(target=process.stop, args=(time.monotonic() + 120,))
    stopper.start()
    time.sleep(0.5)
    assert _alive(leader)  # SIGTERM ignored
    started = time.monotonic()
    process.hurry(time.monotonic())
    stopper.join(10)
    assert not stopper.is_alive()
    assert time.monotonic() - started < 5
    assert not _alive(leader)
    _wait(lambda: not _alive(child), 5, "the group killed")


def test_leftovers_of_a_killed_run_are_stopped(tmp_path: Path) -> None:
    process = Process(_plan(tmp_path, ["-c", STUBBORN, str(tmp_path / "pids")]), tmp_path)
    process.start()
    leader, child = _pids(tmp_path / "pids")
    assert set(podprocess.leftovers(tmp_path)) == {leader, child}
    # The runner was killed: nothing stops the process but the records it left.
    assert set(podprocess.stop_leftovers(tmp_path, grace=0.5)) == {leader, child}
    assert not _alive(leader)
    _wait(lambda: not _alive(child), 5, "child stopped")
    assert podprocess.leftovers(tmp_path) == []
    assert not list(podprocess.records_dir(tmp_path).glob("*.json"))


class FakeCore:
    """The part of CoreV1Api the runner uses; reads may fail a few times first."""

    def __init__(self, secrets: dict[str, dict[str, bytes]] | None = None, failures: Sequence[Exception] = ()) -> None:
        self.secrets = secrets or {}
        self.failures = list(failures)
        self.reports: list[tuple[dict[str, Any], Any]] = []
        self.reported = threading.Event()
        self.at_report: Callable[[], Any] = lambda: None

    @staticmethod
    def _reply(doc: dict[str, Any]) -> Any:
        return types.SimpleNamespace(data=json.dumps(doc).encode())

    def read_namespaced_secret(self, name: str, namespace: str, _preload_content: bool = True) -> Any:
        if self.failures:
            raise self.failures.pop(0)
        if name not in self.secrets:
            raise kubernetes.client.ApiException(status=404)
        return self._reply({"data": {k: base64.b64encode(v).decode() for k, v in self.secrets[name].items()}})

    def read_node(self, name: str, _preload_content: bool = True) -> Any:
        return self._reply({"status": {"allocatable": {"cpu": "4"}}})

    def patch_namespaced_pod(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.reports.append((body, self.at_report()))
        self.reported.set()


def local_pod(containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-9", "annotations": {podprotocol.RUN_ANNOTATION: "true"}},
        "spec": {"nodeName": "n", "restartPolicy": "Never", "containers": containers, **spec},
        "status": {"phase": "Running", "podIP": "127.0.0.1"},
    }


def py(name: str, code: str, *args: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "example.test/python:1", "command": ["python", "-c", code, *args], **fields}


@pytest.fixture
def make_runner(tmp_path: Path) -> Iterator[Callable[[FakeCore], PodRunner]]:
    made: list[PodRunner] = []

    def make(core: FakeCore) -> PodRunner:
        config = RunnerConfig(cluster_dir=tmp_path, images={"example.test/python": LOCAL}, base_env=runner.base_env())
        made.append(PodRunner(config, cast(Any, core), backoff=(0.1, 0.4)))
        made[-1].nodes = {"n"}
        return made[-1]

    yield make
    for handle in made:
        handle.stop(grace=0)
    assert podprocess.leftovers(tmp_path) == []


def test_stop_reaches_deleted_pods_in_their_grace_period(tmp_path: Path, make_runner: Any) -> None:
    handle = make_runner(FakeCore())
    pod_ = local_pod([py("c", STUBBORN, str(tmp_path / "pids"))], terminationGracePeriodSeconds=120)
    handle.handle("ADDED", pod_)
    leader, child = _pids(tmp_path / "pids")
    deleting = copy.deepcopy(pod_)
    deleting["metadata"].update(deletionTimestamp="2026-01-01T00:00:00Z", deletionGracePeriodSeconds=120)
    handle.handle("MODIFIED", deleting)
    handle.handle("DELETED", deleting)
    assert handle.workers == {}  # forgotten, yet still in its 120 s grace period
    time.sleep(0.3)
    assert _alive(leader)
    started = time.monotonic()
    handle.stop(grace=0.5)  # an upper bound: it cuts the 120 s short
    assert time.monotonic() - started < 10
    assert not _alive(leader)
    _wait(lambda: not _alive(child), 5, "child stopped")
    _wait(lambda: not (tmp_path / "pods" / "u-9").exists(), 5, "the gone pod's directory removed")


def test_transient_api_errors_are_retried(tmp_path: Path, make_runner: Any) -> None:
    core = FakeCore(
        {"hub": {"token": b"t"}},
        failures=[
            kubernetes.client.ApiException(status=500),
            urllib3.exceptions.ProtocolError("connection reset"),
            TimeoutError("timed out"),
        ],
    )
    handle = make_runner(core)
    code = "import os, sys; sys.exit(0 if os.environ['T'] == 't' else 5)"
    env = [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}]
    handle.handle("ADDED", local_pod([py("c", code, env=env)]))
    assert core.reported.wait(30)
    assert core.reports[0][0] == podprotocol.outcome_patch("u-9", 0, "Completed", "")


def test_other_errors_building_the_plan_are_reported(tmp_path: Path, make_runner: Any) -> None:
    core = FakeCore({"hub": {"token": b"t"}}, failures=[ValueError("not JSON")])
    handle = make_runner(core)
    env = [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}]
    handle.handle("ADDED", local_pod([py("c", "pass", env=env)]))
    assert core.reported.wait(30)
    annotations = core.reports[0][0]["metadata"]["annotations"]
    assert annotations[podprotocol.REASON_ANNOTATION] == "StartError"
    assert "not JSON" in annotations[podprotocol.MESSAGE_ANNOTATION]


def test_a_rotated_secret_reaches_the_running_pods_volume(tmp_path: Path, make_runner: Any) -> None:
    core = FakeCore({"key": {"api-key": b"k1"}})
    handle = make_runner(core)
    handle.refresh = 0.1
    seen = tmp_path / "seen"
    # Waits until the mounted file says k2, then exits 0 (the pod completes).
    watch = (
        "import sys, time\nfrom pathlib import Path\n"
        "while Path(sys.argv[1]).read_text() != 'k2': time.sleep(0.05)\n"
        "Path(sys.argv[2]).write_text('rotated')"
    )
    mounts = [{"name": "key", "mountPath": "/keys/key"}]
    c = py("c", watch, "/keys/key/api-key", str(seen), volumeMounts=mounts)
    handle.handle("ADDED", local_pod([c], volumes=[{"name": "key", "secret": {"secretName": "key"}}]))
    wait_until((tmp_path / "pods" / "u-9" / "volumes" / "key" / "api-key").exists, 10, "the volume written")
    assert not core.reported.is_set()
    core.secrets["key"] = {"api-key": b"k2"}
    assert core.reported.wait(30)
    assert core.reports[0][0] == podprotocol.outcome_patch("u-9", 0, "Completed", "")
    assert seen.read_text() == "rotated"


SIDECAR = """
import signal, sys, time
from pathlib import Path
runs = Path(sys.argv[1])
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
if len(runs.read_text()) < 3:
    sys.exit(1)  # exits twice: restarted each time
def term(*_):
    time.sleep(0.5)
    Path(sys.argv[2]).write_text("stopped")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
time.sleep(600)
"""


def test_sidecars_restart_and_stop_before_the_outcome(tmp_path: Path, make_runner: Any) -> None:
    core = FakeCore()
    stopped = tmp_path / "sidecar-stopped"
    core.at_report = stopped.exists
    handle = make_runner(core)
    runs = tmp_path / "runs"
    wait_for_sidecar = (
        f"import time; from pathlib import Path\nr = Path({str(runs)!r})\n"
        "while not r.exists() or r.read_text() != 'xxx': time.sleep(0.05)"
    )
    sidecar = py("side", SIDECAR, str(runs), str(stopped), restartPolicy="Always")
    handle.handle("ADDED", local_pod([py("main", wait_for_sidecar)], initContainers=[sidecar]))
    assert core.reported.wait(30)
    ((patch, sidecar_stopped),) = core.reports
    assert patch == podprotocol.outcome_patch("u-9", 0, "Completed", "")
    assert sidecar_stopped  # reported only after the sidecar had ended


def test_restarts_are_counted_and_a_stopped_runner_leaves_no_pod_files(tmp_path: Path, make_runner: Any) -> None:
    handle = make_runner(FakeCore())
    runs = tmp_path / "runs"
    # Exits twice (restarted each time by restartPolicy Always), then stays.
    flaky = (
        "import sys, time\nfrom pathlib import Path\nr = Path(sys.argv[1])\n"
        "r.write_text(r.read_text() + 'x' if r.exists() else 'x')\n"
        "sys.exit(1) if len(r.read_text()) < 3 else time.sleep(600)"
    )
    handle.handle(
        "ADDED", local_pod([py("c", flaky, str(runs)), py("d", "import time; time.sleep(600)")], restartPolicy="Always")
    )
    wait_until(lambda: runs.exists() and runs.read_text() == "xxx", 30, "the third start")
    assert handle.restarts() == {"ns/p/c": 2, "ns/p/d": 0}
    assert (tmp_path / "pods" / "u-9").is_dir()
    handle.stop(grace=1)
    assert not (tmp_path / "pods" / "u-9").exists()


def test_materialize_modes_and_directories(tmp_path: Path) -> None:
    p = pod(
        containers=[
            container(
                command=["python"],
                volumeMounts=[
                    {"name": "models", "mountPath": "/cache", "subPath": "adapter-cache"},
                    {"name": "key", "mountPath": "/etc/key.txt", "subPath": "api-key"},
                    {"name": "sock", "mountPath": "/run/x.sock"},
                    SA_MOUNT,
                ],
            )
        ],
        volumes=[
            {"name": "models", "hostPath": {"path": "/mnt/nvme/kimi"}},
            {"name": "sock", "hostPath": {"path": "/run/x.sock", "type": "FileOrCreate"}},
            {"name": "key", "secret": {"secretName": "key", "defaultMode": 0o640}},
            SA_VOLUME,
        ],
    )
    plan = podplan.plan(p, dataclasses.replace(CONFIG, cluster_dir=tmp_path), REFS)
    runner.materialize(plan)
    pod_dir = tmp_path / "pods" / "u-1"
    assert stat.S_IMODE(pod_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((pod_dir / "volumes" / "key" / "api-key").stat().st_mode) == 0o640
    assert stat.S_IMODE((pod_dir / "volumes" / "kube-api-access-x" / "token").stat().st_mode) == 0o644
    assert stat.S_IMODE((pod_dir / "kubeconfig").stat().st_mode) == 0o600
    node = tmp_path / "nodes" / "gpu-4090-a"
    assert (node / "mnt" / "nvme" / "kimi" / "adapter-cache").is_dir()
    assert (pod_dir / "volumes" / "key" / "api-key").read_bytes() == b"k1"  # a file subPath stays a file
    sock = node / "run" / "x.sock"
    assert sock.is_file()
    sock.write_text("kept")
    runner.materialize(plan)
    assert sock.read_text() == "kept"
    assert not list(pod_dir.rglob(".*.tmp"))
