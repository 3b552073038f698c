"""LoraServer against the real apiserver, with each engine pod's programs run by the local pod runner.

KWOK runs the engine pods' phases; the local pod runner (``devcluster/runner.py``) runs what each
pod runs, as that pod: the SGLang stand-in (a tiny model with real PEFT adapters) bound to the pod's
127.x IP with the engine container's own arguments, the adapter agent with the pod's
ServiceAccount token, the router, and the cleanup Jobs. A simulated node's storage is a directory
of the cluster (``<cluster>/nodes/<node>``), which the tests fill with what the KimiModel's and
FineTuneJobs' pods would have left there. (The rolling-update test needs no programs: no runner.)
The runner restarts a container that dies: each test ends by checking that only the containers
it killed on purpose were restarted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from e2e.conftest import OperatorProcess, pod_runner
from e2e.helpers import http, wait_earlier_namespaces_gone, wait_for
from e2e.manifests import GROUP, KIMI_MODEL, VERSION
from e2e.test_finetunejob import ftj, release_training, training_pod_status, wait_phase
from e2e.test_kimimodel import condition
from kimi_operator.devcluster import podprotocol
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.devcluster.podplan import Image
from kimi_operator.devcluster.podprocess import Process
from kimi_operator.devcluster.runner import PodRunner, default_images
from kimi_operator.render.kimimodel import model_label
from kimi_operator.workloads.train.adapter import publish

pytestmark = pytest.mark.e2e

ENGINES = repo_root() / "e2e" / "engines"
STORAGE = "/mnt/nvme/kimi"
NODES = ["gpu-4090-a", "gpu-4090-b"]
SMALL = {"gpus": 1, "cpu": "4", "memory": "16Gi", "sharedMemory": "1Gi"}
# The pods the runner runs (a Job's pod is held Running by KWOK until its programs end).
RUN = {"annotations": {podprotocol.RUN_ANNOTATION: "true", podprotocol.HOLD_ANNOTATION: "true"}}
# A crashed container's first restart comes this long after (the kubelet's back-off, made longer,
# doubling for the next ones): long enough for the agents and the operator to report it down.
RESTART_AFTER = 20.0


def custom(api: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api)


def get(api: kubernetes.client.ApiClient, namespace: str, plural: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom(api).get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    return obj


@pytest.fixture(scope="module")
def tiny(train_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with five PEFT adapters and the bad ones, built once (no downloads)."""
    out = tmp_path_factory.mktemp("tiny-lora")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(
        [train_python, str(ENGINES / "tiny_lora.py"), str(out), "--adapters", "5"],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    return out


def quick_images(train_python: str, *, llamacpp: Path | None = None, standin: tuple[str, ...] = ()) -> dict[str, Image]:
    """The project's images on this machine, with the agents and routers checking every 0.5 s (the
    tests wait on what they learn) and ``standin`` added to the SGLang stand-in's arguments."""
    operator = ("kimi-operator",)
    images = default_images(repo_root(), train_python=train_python, llamacpp=llamacpp)
    sglang = ("python", "-m", "sglang.launch_server")
    quick = {}
    for repo, image in images.items():
        programs = dict(image.programs)
        programs[(*operator, "serve-agent")] = (*programs[operator], "serve-agent", "--interval=0.5")
        programs[(*operator, "router")] = (*programs[operator], "router", "--period=0.5")
        if sglang in programs:
            programs[sglang] = (*programs[sglang], *standin)
        quick[repo] = dataclasses.replace(image, programs=programs)
    return quick


@pytest.fixture
def runner(cluster: Cluster, api: kubernetes.client.ApiClient, train_python: str) -> Iterator[PodRunner]:
    with started_runner(cluster, api, quick_images(train_python)) as handle:
        yield handle


@contextlib.contextmanager
def started_runner(cluster: Cluster, api: kubernetes.client.ApiClient, images: dict[str, Image]) -> Iterator[PodRunner]:
    """The runner, once the earlier tests' namespaces are gone (it must not run their pods again)."""
    wait_earlier_namespaces_gone(api)
    with pod_runner(cluster, api, images, backoff=(RESTART_AFTER, 300.0)) as handle:
        yield handle


def container_process(runner: PodRunner, uid: str, container: str) -> Process:
    """The process the runner runs for a container of a pod."""
    process = runner.process(uid, container)
    assert process is not None, f"pod {uid}: no {container} process"
    return process


def restarted(runner: PodRunner) -> dict[str, int]:
    """The containers the runner started again, by ``namespace/pod/container``."""
    return {k: v for k, v in runner.restarts().items() if v}


def exported_adapter(namespace: str, name: str, node: str, source: Path) -> dict[str, Any]:
    """``status.adapter`` as a training pod reports the adapter it exported on ``node``."""
    return {
        "name": name,
        "node": node,
        "path": f"/models/{namespace}/kimi/finetune/{name}/adapter",
        "sizeBytes": 1,
        "sha256": sha256(source),
        "baseModel": "kimi",
        "rank": 8,
        "expertLora": False,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


class Node:
    """A simulated node's storage: the runner's directory for that node, emptied for each test."""

    def __init__(self, cluster: Cluster, name: str, namespace: str) -> None:
        self.storage = cluster.layout.root / "nodes" / name / STORAGE.lstrip("/")
        # The ReadWriteMany claim "adapters": one directory every node sees.
        self.store = cluster.layout.root / "claims" / namespace / "adapters"
        shutil.rmtree(self.storage, ignore_errors=True)
        (self.storage / "adapter-cache").mkdir(parents=True)

    def holds(self, namespace: str, variant: str, files: Path) -> None:
        """The KimiModel's variant as its prepare pod would have left it (a link to ``files``)."""
        target = self.storage / namespace / "kimi" / variant
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(files)

    def put_adapter(self, source: Path, name: str) -> str:
        """Copy an adapter directory under the storage; its path as the node sees it."""
        target = self.storage / "adapters" / name
        shutil.copytree(source, target, dirs_exist_ok=True)
        return f"{STORAGE}/adapters/{name}"


class EnginePod:
    """One engine pod as the runner runs it: its address, and its engine container's process."""

    def __init__(self, pod: Any, node: Node, runner: PodRunner) -> None:
        self.name, self.ip, self.uid = pod.metadata.name, pod.status.pod_ip, pod.metadata.uid
        self.node, self.runner = node, runner
        self.spec = {c.name: c for c in pod.spec.containers}

    @property
    def url(self) -> str:
        return f"http://{self.ip}:30000"

    def engine(self) -> Process:
        return container_process(self.runner, self.uid, "engine")

    def crash(self) -> float:
        """The engine dies (SIGKILL); the runner starts it again after its back-off. When it died."""
        self.engine().signal(signal.SIGKILL)
        return time.monotonic()

    def restarted_since(self, moment: float) -> bool:
        return self.engine().started_at > moment

    def answering(self) -> bool:
        return http(f"{self.url}/health")[0] == 200

    def listed(self) -> list[str]:
        code, body = http(f"{self.url}/v1/models")
        assert code == 200, body
        return sorted(c["id"] for c in json.loads(body)["data"] if c.get("parent"))

    def chat(self, model: str) -> str:
        code, body = http(
            f"{self.url}/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": "hello world"}],
                "max_tokens": 8,
                "temperature": 0,
            },
        )
        assert code == 200, body
        return str(json.loads(body)["choices"][0]["message"]["content"])


class Serving:
    """One LoraServer's engine pods, as the runner runs them."""

    def __init__(
        self, api: kubernetes.client.ApiClient, namespace: str, name: str, nodes: dict[str, Node], runner: PodRunner
    ) -> None:
        self.api, self.namespace, self.name, self.nodes, self.runner = api, namespace, name, nodes, runner
        self.pods: dict[str, EnginePod] = {}

    def live_pods(self) -> list[Any]:
        core = kubernetes.client.CoreV1Api(self.api)
        selector = f"kimi-operator.io/loraserver={self.name},app.kubernetes.io/component=engine"
        return list(core.list_namespaced_pod(self.namespace, label_selector=selector).items)

    def start(self, count: int) -> None:
        """Wait for ``count`` running engine pods whose engines answer."""
        pods = wait_for(
            lambda: (
                (found := [p for p in self.live_pods() if p.status.phase == "Running" and p.status.pod_ip])
                and len(found) == count
                and found
            ),
            90,
            f"{count} running engine pods of {self.name}",
        )
        for pod in pods:
            if pod.metadata.name not in self.pods:
                self.pods[pod.metadata.name] = EnginePod(pod, self.nodes[pod.spec.node_name], self.runner)
        wait_for(lambda: all(p.answering() for p in self.pods.values()), 180, f"the engines of {self.name}")


def lsrv(name: str, **spec: Any) -> dict[str, Any]:
    """A LoraServer whose engine, router and cleanup pods the runner runs."""
    router = {"podMetadata": RUN, **spec.pop("router", {})}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoraServer",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "kimi"},
            "resources": SMALL,
            "engine": {"maxLoraRank": 16, "loraTargetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "podMetadata": RUN,
            "router": router,
            **spec,
        },
    }


def model_on(api: kubernetes.client.ApiClient, namespace: str, nodes: list[str]) -> None:
    wait_earlier_namespaces_gone(api)
    model = copy.deepcopy(KIMI_MODEL)
    model["spec"]["placement"] = {"nodeNames": nodes, "count": len(nodes)}
    model["spec"]["variants"] = ["bf16", "cpu-int8"]
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "kimimodels", model)
    wait_for(
        lambda: (c := condition(get(api, namespace, "kimimodels", "kimi"), "Ready")) and c["status"] == "True",
        90,
        "KimiModel Ready",
    )


def adapters_by_name(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in (obj.get("status") or {}).get("adapters") or []}


def shared_and_expert_adapters(tiny: Path, nodes: dict[str, Node]) -> list[dict[str, Any]]:
    """a0..a3 and the expert adapter "legal", copied onto every node, as spec entries."""
    adapters: list[dict[str, Any]] = []
    for name, directory in [(f"a{i}", f"a{i}") for i in range(4)] + [("legal", "expert")]:
        source = tiny / "adapters" / directory
        path = ""
        for node in nodes.values():
            path = node.put_adapter(source, directory)
        adapters.append({"name": name, "path": path, "sha256": sha256(source)})
    adapters[-1]["expert"] = True
    return adapters


@pytest.fixture
def nodes(cluster: Cluster, namespace: str, tiny: Path, runner: PodRunner) -> dict[str, Node]:
    """Both nodes holding the tiny model where the engines read the KimiModel's INT4 checkpoint
    (emptied once the runner has started: no earlier test's pod runs any more)."""
    found = {n: Node(cluster, n, namespace) for n in NODES}
    for node in found.values():
        node.holds(namespace, "int4", tiny / "model")
    return found


@pytest.fixture
def serving(api: kubernetes.client.ApiClient, namespace: str, nodes: dict[str, Node], runner: PodRunner) -> Serving:
    return Serving(api, namespace, "serve", nodes, runner)


@pytest.mark.timeout(900)
def test_shared_and_expert_adapters_are_served_where_the_engines_list_them(
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    tiny: Path,
    nodes: dict[str, Node],
    serving: Serving,
) -> None:
    model_on(api, namespace, NODES)
    adapters = shared_and_expert_adapters(tiny, nodes)
    custom(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "loraservers", lsrv("serve", replicas=2, adapters=adapters)
    )
    serving.start(3)

    # Every engine pod is on a node holding the model.
    label = model_label(namespace, "kimi")
    core = kubernetes.client.CoreV1Api(api)
    for pod in serving.live_pods():
        assert core.read_node(pod.spec.node_name).metadata.labels.get(label) == "ready"

    def all_loaded() -> dict[str, Any] | None:
        obj = get(api, namespace, "loraservers", "serve")
        found = adapters_by_name(obj)
        ok = len(found) == 5 and all(a["state"] == "Loaded" for a in found.values())
        return obj if ok and condition(obj, "Ready") and condition(obj, "Ready")["status"] == "True" else None  # type: ignore[index]

    obj = wait_for(all_loaded, 120, "every adapter Loaded and the LoraServer Ready")
    found = adapters_by_name(obj)
    shared = sorted(n for n in serving.pods if "-shared-" in n)
    (dedicated,) = [n for n in serving.pods if "-x-" in n]
    for i in range(4):
        assert found[f"a{i}"]["kind"] == "Shared"
        assert found[f"a{i}"]["replicas"] == shared
    assert found["legal"]["kind"] == "Expert"
    assert found["legal"]["replicas"] == [dedicated]
    assert obj["status"]["readyReplicas"] == 3
    # What status says is what the engines list.
    for name in shared:
        assert serving.pods[name].listed() == ["a0", "a1", "a2", "a3"]
    assert serving.pods[dedicated].listed() == ["legal"]
    # And the adapters really are applied: each answers differently from the base model.
    engine = serving.pods[shared[0]]
    base = engine.chat("kimi-k2.5")
    assert len({engine.chat(f"kimi-k2.5:a{i}") for i in range(4)} | {base}) == 5

    # One engine dies and comes back empty (the runner restarts it after its back-off): the status
    # never shows adapters on it meanwhile, and its agent loads them again.
    victim = serving.pods[shared[1]]
    uids = {p.metadata.name: p.metadata.uid for p in serving.live_pods()}
    killed = victim.crash()
    seen_down = threading.Event()
    violations: list[str] = []
    done = threading.Event()

    errors: list[BaseException] = []

    def watch_status() -> None:
        try:
            watching()
        except BaseException as exc:  # re-raised by the test after join
            errors.append(exc)
            seen_down.set()

    def watching() -> None:
        while not done.is_set():
            status = get(api, namespace, "loraservers", "serve").get("status") or {}
            # Read after the status: if the engine was still down then, the status was computed
            # while it was down.
            up = victim.restarted_since(killed)
            report = next((e for e in status.get("engines") or [] if e["name"] == victim.name), {})
            # From the first status the operator computed after the agent reported the engine down
            # (fewer replicas serving), until the engine is started again, nothing may be on it.
            if report.get("engineUp") is False and status.get("readyReplicas", 3) < 3:
                seen_down.set()
            if seen_down.is_set() and not up:
                for a in status.get("adapters") or []:
                    if victim.name in a.get("replicas", []):
                        violations.append(f"{a['name']} on {victim.name} while its engine is down")
            done.wait(0.1)

    watcher = threading.Thread(target=watch_status)
    watcher.start()
    try:
        wait_for(seen_down.is_set, 30, "the agent to report its engine down and the operator to see it")
        assert not victim.restarted_since(killed), "restarted before the operator saw it down"
        wait_for(
            lambda: (c := condition(get(api, namespace, "loraservers", "serve"), "Ready")) and c["status"] == "False",
            30,
            "Ready False while an engine is down",
        )
        wait_for(lambda: victim.restarted_since(killed), RESTART_AFTER + 30, "the engine restarted by the runner")
        wait_for(all_loaded, 180, "adapters loaded again on the restarted engine")
    finally:
        done.set()
        watcher.join()
    if errors:
        raise errors[0]
    assert violations == []
    assert victim.listed() == ["a0", "a1", "a2", "a3"]

    # An adapter added and one removed: loaded and unloaded in place, no pod restarted.
    source = tiny / "adapters" / "a4"
    for node in nodes.values():
        a4 = node.put_adapter(source, "a4")
    spec_adapters = [a for a in adapters if a["name"] != "a0"] + [{"name": "a4", "path": a4, "sha256": sha256(source)}]
    custom(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "loraservers", "serve", {"spec": {"adapters": spec_adapters}}
    )
    wait_for(
        lambda: all(serving.pods[n].listed() == ["a1", "a2", "a3", "a4"] for n in shared),
        60,
        "a4 loaded and a0 unloaded on every shared engine",
    )
    obj = wait_for(all_loaded, 60, "the new set Loaded")
    assert set(adapters_by_name(obj)) == {"a1", "a2", "a3", "a4", "legal"}
    assert {p.metadata.name: p.metadata.uid for p in serving.live_pods()} == uids

    # A corrupt adapter and one of too high a rank: Failed with the engine's words, the rest serve.
    bad = []
    for name in ("corrupt", "wrong-rank"):
        source = tiny / "adapters" / name
        for node in nodes.values():
            path = node.put_adapter(source, name)
        bad.append({"name": name, "path": path})
    custom(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "loraservers", "serve", {"spec": {"adapters": spec_adapters + bad}}
    )

    def failed() -> dict[str, Any] | None:
        found = adapters_by_name(get(api, namespace, "loraservers", "serve"))
        return found if {found.get(n, {}).get("state") for n in ("corrupt", "wrong-rank")} == {"Failed"} else None

    found = wait_for(failed, 60, "the bad adapters Failed")
    # The status carries the engine's own words: ask the engine the same question.
    for name in ("corrupt", "wrong-rank"):
        replica = found[name]["message"].split(":", 1)[0].removeprefix("replica ")
        pod = serving.pods[replica]
        cached = pod.node.storage / "adapter-cache" / sha256(tiny / "adapters" / name)
        code, body = http(f"{pod.url}/load_lora_adapter", {"lora_name": name, "lora_path": str(cached)})
        assert code == 400, body
        assert found[name]["message"] == f"replica {replica}: {json.loads(body)['error_message']}"
    assert "rank" in found["wrong-rank"]["message"]
    assert all(found[n]["state"] == "Loaded" for n in ("a1", "a2", "a3", "a4", "legal"))
    stalled = condition(get(api, namespace, "loraservers", "serve"), "Stalled")
    assert stalled is not None
    assert stalled["reason"] == "AdapterFailed"
    # Nothing but the engine killed on purpose ever needed a restart.
    assert restarted(victim.runner) == {f"{namespace}/{victim.name}/engine": 1}


@pytest.mark.timeout(600)
def test_a_finished_fine_tune_is_served_and_a_newer_export_replaces_it_in_place(
    cluster: Cluster,
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    tiny: Path,
    nodes: dict[str, Node],
    serving: Serving,
) -> None:
    node = "gpu-4090-a"
    model_on(api, namespace, [node])
    hold = {"annotations": {"sim.kimi-operator.io/hold": "true"}}
    tune = ftj("tune", podMetadata=hold, resources={"gpus": 1, "cpu": "4", "memory": "16Gi"})
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", tune)
    wait_phase(api, namespace, "tune", "Running")
    spec = {"replicas": 1, "adapters": [{"name": "support", "fineTuneJob": {"name": "tune"}}]}
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", lsrv("serve", **spec))
    serving.start(1)
    (engine,) = serving.pods.values()

    def support() -> dict[str, Any]:
        return adapters_by_name(get(api, namespace, "loraservers", "serve")).get("support", {})

    waiting = wait_for(lambda: (s := support()) and s.get("state") == "Pending" and s, 60, "support Pending")
    assert "waiting for FineTuneJob tune to export its adapter" in waiting["message"]
    assert engine.listed() == []

    # The training pod exports the adapter on its node and reports it with its own token.
    local = nodes[node].storage / namespace / "kimi" / "finetune" / "tune" / "adapter"

    def export(source: Path) -> str:
        shutil.copytree(source, local, dirs_exist_ok=True)
        adapter = exported_adapter(namespace, "tune", node, source)
        training_pod_status(cluster, api, namespace, "tune").apply({"adapter": adapter})
        return str(adapter["sha256"])

    first = export(tiny / "adapters" / "a1")
    release_training(api, namespace, "tune")
    wait_phase(api, namespace, "tune", "Succeeded")
    loaded = wait_for(lambda: (s := support()) and s.get("state") == "Loaded" and s, 90, "support Loaded")
    assert loaded["sha256"] == first
    assert loaded["kind"] == "Shared"
    assert engine.listed() == ["support"]
    base, tuned = engine.chat("kimi-k2.5"), engine.chat("kimi-k2.5:support")
    assert tuned != base
    uid = serving.live_pods()[0].metadata.uid

    # A newer export (other files, another digest) replaces it on the engine without a restart.
    second = export(tiny / "adapters" / "a2")
    replaced = wait_for(
        lambda: (s := support()) and s.get("state") == "Loaded" and s.get("sha256") == second and s,
        90,
        "the newer export Loaded",
    )
    assert replaced["replicas"] == [engine.name]
    assert engine.chat("kimi-k2.5:support") not in (tuned, base)
    assert serving.live_pods()[0].metadata.uid == uid
    assert restarted(serving.runner) == {}


def test_an_engine_setting_change_rolls_one_replica_at_a_time(
    api: kubernetes.client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """The StatefulSet controller replaces the replicas with the new engine command one at a time,
    never leaving fewer than replicas - 1 ready (KWOK makes a started pod ready)."""
    model_on(api, namespace, NODES)
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", lsrv("roll", replicas=3))
    apps, core = kubernetes.client.AppsV1Api(api), kubernetes.client.CoreV1Api(api)
    selector = "kimi-operator.io/loraserver=roll,app.kubernetes.io/component=engine"

    def ready_pods() -> list[Any]:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        return [
            p
            for p in pods
            if not p.metadata.deletion_timestamp
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]

    wait_for(lambda: len(ready_pods()) == 3, 90, "three ready engine pods")
    before = apps.read_namespaced_stateful_set("roll-shared", namespace).status.update_revision
    custom(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "loraservers", "roll", {"spec": {"engine": {"maxLoraRank": 32}}}
    )
    fewest = 3

    def rolled() -> bool:
        nonlocal fewest
        pods = ready_pods()
        fewest = min(fewest, len(pods))
        status = apps.read_namespaced_stateful_set("roll-shared", namespace).status
        revisions = {p.metadata.labels.get("controller-revision-hash") for p in pods}
        return bool(status.update_revision != before and len(pods) == 3 and revisions == {status.update_revision})

    wait_for(rolled, 180, "every replica on the new engine command", interval=0.05)
    assert fewest >= 2
    (pod,) = [p for p in ready_pods() if p.metadata.name == "roll-shared-0"]
    engine = next(c for c in pod.spec.containers if c.name == "engine")
    assert engine.args[engine.args.index("--max-lora-rank") + 1] == "32"


def shared_volume(api: kubernetes.client.ApiClient, namespace: str, claim: str) -> None:
    """A ReadWriteMany PersistentVolume bound to a claim (nothing mounts it in the simulation: the
    programs run here see it as one directory)."""
    core = kubernetes.client.CoreV1Api(api)
    volume = f"{namespace}-{claim}"[:63]
    core.create_persistent_volume(
        {
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "hostPath": {"path": f"/srv/{volume}"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": claim},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    )


@pytest.mark.timeout(600)
def test_an_adapter_reaches_another_node_through_the_shared_store(
    cluster: Cluster,
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    tiny: Path,
    nodes: dict[str, Node],
    serving: Serving,
) -> None:
    """Two FineTuneJobs train on gpu-4090-a; one publishes its adapter to the shared store. A replica
    on each node: the published adapter is loaded on both; the other is loaded where it was trained
    and Unavailable on the other node, its status saying where it is and what to do."""
    model_on(api, namespace, NODES)
    shared_volume(api, namespace, "adapters")
    hold = {"annotations": {"sim.kimi-operator.io/hold": "true"}}
    one_gpu = {"gpus": 1, "cpu": "4", "memory": "16Gi"}
    for name, output in (("shared", {"publish": {"persistentVolumeClaim": {"claimName": "adapters"}}}), ("local", {})):
        job = ftj(name, podMetadata=hold, resources=one_gpu, output=output)
        custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", job)
    train_node = {}
    for name in ("shared", "local"):
        train_node[name] = wait_phase(api, namespace, name, "Running")["status"]["node"]
    # What each training pod does at its end: export on its node, publish when asked, report.
    store = nodes[NODES[0]].store
    for name, source in (("shared", tiny / "adapters" / "a1"), ("local", tiny / "adapters" / "a2")):
        node = train_node[name]
        final = nodes[node].storage / namespace / "kimi" / "finetune" / name / "adapter"
        shutil.copytree(source, final)
        report = exported_adapter(namespace, name, node, source)
        if name == "shared":
            report["published"] = {
                "claimName": "adapters",
                "path": publish(final, store, namespace=namespace, name=name),
            }
        training_pod_status(cluster, api, namespace, name).apply({"adapter": report})
        release_training(api, namespace, name)
        wait_phase(api, namespace, name, "Succeeded")
    # Two GPUs a replica: one replica on each node.
    spec = {
        "replicas": 2,
        "resources": {**SMALL, "gpus": 2},
        "adapterStore": {"persistentVolumeClaim": {"name": "adapters"}},
        "adapters": [
            {"name": "shared", "fineTuneJob": {"name": "shared"}},
            {"name": "local", "fineTuneJob": {"name": "local"}},
        ],
    }
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", lsrv("serve", **spec))
    serving.start(2)
    assert {p.spec.node_name for p in serving.live_pods()} == set(NODES)
    on = {p.spec.node_name: p.metadata.name for p in serving.live_pods()}
    trained, other = train_node["local"], next(n for n in NODES if n != train_node["local"])

    def settled() -> dict[str, dict[str, Any]] | None:
        found = adapters_by_name(get(api, namespace, "loraservers", "serve"))
        states = {n: found.get(n, {}).get("state") for n in ("shared", "local")}
        return found if states == {"shared": "Loaded", "local": "Unavailable"} else None

    found = wait_for(settled, 120, "shared Loaded everywhere, local Unavailable on the other node")
    assert found["shared"]["replicas"] == sorted(on.values())
    assert (
        found["shared"]["source"]
        == f"FineTuneJob shared: {namespace}/shared/{sha256(tiny / 'adapters' / 'a1')} on volume adapters"
    )
    assert found["local"]["replicas"] == [on[trained]]
    message = found["local"]["message"]
    assert message.startswith(f"replica {on[other]}: ")
    assert f"is not on this node (it is on node {trained})" in message
    assert "spec.output.publish" in message
    assert serving.pods[on[other]].listed() == ["shared"]
    assert serving.pods[on[trained]].listed() == ["local", "shared"]
    assert restarted(serving.runner) == {}


@pytest.mark.timeout(600)
def test_deletion_removes_the_pods_and_only_the_cache_entries_no_other_server_uses(
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    tiny: Path,
    nodes: dict[str, Node],
    runner: PodRunner,
) -> None:
    node_name = "gpu-4090-a"
    model_on(api, namespace, [node_name])
    node = nodes[node_name]
    paths = {}
    for name in ("a0", "a1"):
        paths[name] = {"name": name, "path": node.put_adapter(tiny / "adapters" / name, name)}
        paths[name]["sha256"] = sha256(tiny / "adapters" / name)
    # "drop" reclaims its cache entries; "keep" serves a1 too (and keeps its own on deletion).
    servers = {
        "drop": lsrv("drop", adapters=[paths["a0"], paths["a1"]], adapterCache={"reclaimPolicy": "Delete"}),
        "keep": lsrv("keep", adapters=[paths["a1"]]),
    }
    handles = {n: Serving(api, namespace, n, nodes, runner) for n in servers}
    for name, obj in servers.items():
        custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", obj)
        handles[name].start(1)
    for name, want in (("drop", {"a0", "a1"}), ("keep", {"a1"})):

        def loaded(name: str = name, want: set[str] = want) -> bool:
            found = adapters_by_name(get(api, namespace, "loraservers", name))
            return set(found) == want and all(s["state"] == "Loaded" for s in found.values())

        wait_for(loaded, 120, f"{name}'s adapters Loaded")
    assert restarted(runner) == {}
    cache = node.storage / "adapter-cache"

    def cached() -> set[str]:
        return {p.name for p in cache.iterdir() if not p.name.startswith(".")}

    assert cached() == {paths["a0"]["sha256"], paths["a1"]["sha256"]}

    for name in ("drop", "keep"):
        custom(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", name)
        # The engine pods go first ("drop": its finalizer deletes them before any cleanup, or the
        # agents would copy the files back; "keep": the garbage collector, after it).
        wait_for(lambda name=name: not handles[name].live_pods(), 90, f"{name}'s engine pods deleted")

        def gone(name: str = name) -> bool:
            try:
                get(api, namespace, "loraservers", name)
            except kubernetes.client.ApiException as exc:
                return exc.status == 404
            return False

        # "drop"'s finalizer waits for its cleanup Job, which the runner runs on the node.
        wait_for(gone, 120, f"LoraServer {name} deleted (its finalizer done)")
        if name == "drop":
            # a0's copy is gone; a1 stays: "keep" still served it when "drop" went.
            assert cached() == {paths["a1"]["sha256"]}

    # One cleanup Job, for "drop", on the node of the model, that ran to its end.
    batch = kubernetes.client.BatchV1Api(api)
    jobs = batch.list_namespaced_job(namespace, label_selector="app.kubernetes.io/component=cleanup").items
    (job,) = jobs
    assert job.metadata.labels["kimi-operator.io/loraserver"] == "drop"
    assert job.status.succeeded == 1
    (container,) = job.spec.template.spec.containers
    assert container.args == ["remove-model", f"--root=/models/adapter-cache/{paths['a0']['sha256']}"]
    terms = job.spec.template.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    assert terms.node_selector_terms[0].match_expressions[0].values == [node_name]
    assert cached() == {paths["a1"]["sha256"]}
