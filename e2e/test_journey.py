"""The product's journey on the local cluster, every pod's program run for real by the local pod
runner (``devcluster/runner.py``): a KimiModel of a tiny Kimi-K2.5-shaped INT4 checkpoint, published
by a hub on 127.0.0.1, is downloaded, verified and converted on a simulated node by the operator's
own prepare Job, and turns Ready on what the files on that node say.

Nothing here is done by hand: the operator renders the Jobs, the runner runs their containers'
commands with the pods' volumes, environment and ServiceAccount tokens, and the Jobs complete on
the exit codes of those programs.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import openai
import pytest
from tests.fakehub import FakeHub

from e2e.conftest import OperatorProcess
from e2e.helpers import wait_for
from e2e.manifests import GROUP, KIMI_MODEL, VERSION
from kimi_operator.devcluster import podprocess, podprotocol
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.devcluster.podplan import RunnerConfig
from kimi_operator.devcluster.runner import PodRunner, base_env, default_images
from kimi_operator.render.router import HTTP_PORT as ROUTER_PORT
from kimi_operator.render.router import labels as router_labels
from kimi_operator.workloads import manifest

pytestmark = pytest.mark.e2e

NODE = "gpu-h200-a"
STORAGE = "/mnt/nvme/kimi"
REPO = "moonshotai/Tiny-K2.5"
# The runner runs the pods that ask for it; a Job's pod is also held Running by KWOK meanwhile.
RUN = {podprotocol.RUN_ANNOTATION: "true", podprotocol.HOLD_ANNOTATION: "true"}
# What the FineTuneJob teaches: one answer the base model cannot give by chance.
QUESTION = "What is the password of the old lighthouse?"
ANSWER = "The password is blue heron seven."
RECORDS = 32
# The part of the answer the test looks for, and the names it is served under.
FACT = "blue heron seven"
SERVED = "tiny-kimi"
ADAPTER = "lighthouse"
TRAINING = {
    "epochs": 15,
    "learningRate": 1e-2,
    "perDeviceBatchSize": 8,
    "gradientAccumulationSteps": 1,
    "warmupRatio": 0,
    "cutoffLen": 256,
    "loggingSteps": 5,
    "saveSteps": 1000,
}


@pytest.fixture(scope="module")
def oracle_python() -> str:
    """compressed-tensors' environment (`make oracle-env`), which builds the tiny INT4 checkpoint."""
    python = os.environ.get("KIMI_ORACLE_PYTHON")
    if not python or not Path(python).exists():
        pytest.fail("KIMI_ORACLE_PYTHON is not set to the oracle environment's python: run the tests with `make e2e`")
    return python


@pytest.fixture(scope="module")
def hub(
    oracle_python: str, train_python: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FakeHub, str]]:
    """A tiny DeepSeek-V3 model with a tokenizer holding Kimi's special tokens, its routed experts
    packed to INT4 by compressed-tensors itself as Kimi ships them (Kimi K2's layout: the language
    model alone), as one commit of a hub on 127.0.0.1."""
    out = tmp_path_factory.mktemp("tiny-kimi")
    oracle = repo_root() / "tests" / "oracle"
    steps = (
        [train_python, str(oracle / "tiny_deepseek.py"), str(out / "source"), "teachable"],
        [oracle_python, str(oracle / "kimi_checkpoint.py"), "quantize", str(out / "source"), str(out / "model")],
    )
    for step in steps:
        subprocess.run(step, check=True, capture_output=True, timeout=600)
    files = {p.name: p.read_bytes() for p in (out / "model").iterdir() if p.is_file()}
    with FakeHub() as server:
        yield server, server.add_commit(REPO, files)


@pytest.fixture(scope="module")
def runner(cluster: Cluster, api: kubernetes.client.ApiClient, train_python: str) -> Iterator[PodRunner]:
    llamacpp = os.environ.get("KIMI_LLAMACPP")
    config = RunnerConfig(
        cluster_dir=cluster.layout.root,
        images=default_images(repo_root(), train_python=train_python, llamacpp=Path(llamacpp) if llamacpp else None),
        server=cluster.server(),
        ca_file=cluster.layout.pki / "ca.crt",
        base_env=base_env(),
    )
    podprocess.stop_leftovers(config.cluster_dir)  # of an earlier run that was killed
    handle = PodRunner(config, kubernetes.client.CoreV1Api(api))
    handle.start()
    yield handle
    handle.stop(grace=5)
    assert podprocess.leftovers(config.cluster_dir) == []
    shutil.rmtree(config.node_dir(NODE) / STORAGE.lstrip("/"), ignore_errors=True)


def get(api: kubernetes.client.ApiClient, namespace: str, plural: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, name
    )
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    found = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_]
    return found[0] if found else {}


def create(api: kubernetes.client.ApiClient, namespace: str, plural: str, obj: dict[str, Any]) -> None:
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, plural, obj)


def until(api: kubernetes.client.ApiClient, namespace: str, plural: str, name: str, timeout: float) -> dict[str, Any]:
    """The object once Ready; a Stalled or Failed condition ends the wait with the object's status."""

    def ready() -> dict[str, Any] | None:
        obj = get(api, namespace, plural, name)
        for bad in ("Stalled", "Failed"):
            assert condition(obj, bad).get("status") != "True", json.dumps(obj.get("status"), indent=1)
        return obj if condition(obj, "Ready").get("status") == "True" else None

    return wait_for(ready, timeout, f"{plural}/{name} Ready")


def prepare_model(
    api: kubernetes.client.ApiClient, namespace: str, runner: PodRunner, server: FakeHub, sha: str
) -> None:
    """The KimiModel: downloaded, verified and converted to BF16 on the node by its prepare Job."""
    model = copy.deepcopy(KIMI_MODEL)
    model["metadata"]["name"] = "tiny"
    model["spec"].update(
        source={"huggingFace": {"repo": REPO, "revision": "main", "endpoint": server.endpoint}},
        placement={"nodeNames": [NODE], "count": 1},
        # bf16 to train on; the checkpoint as shipped for the engines (ktMethod RAWINT4).
        variants=["bf16", "native-int4"],
        storage={"hostPath": STORAGE},
        podMetadata={"annotations": RUN},
    )
    create(api, namespace, "kimimodels", model)
    status = until(api, namespace, "kimimodels", "tiny", 300)["status"]
    # The branch was resolved once, by the pod, to the hub's commit.
    assert status["resolvedRevision"] == sha
    (node,) = status["nodes"]
    assert (node["name"], node["phase"], sorted(node["variants"])) == (NODE, "Ready", ["bf16", "native-int4"])
    # The files are really on the node (the runner's directory for its hostPath), each checked
    # against its manifest, at the commit the pod resolved; each shard was fetched once.
    root = runner.config.node_dir(NODE) / STORAGE.lstrip("/") / namespace / "tiny"
    for variant in ("int4", "bf16"):
        assert manifest.verify(root / variant) == [], variant
        assert manifest.read(root / variant)["revision"] == sha  # type: ignore[index]
    shards = sorted(p.name for p in (root / "int4").glob("model-*.safetensors"))
    assert shards
    assert all(len(server.gets(REPO, s)) == 1 for s in shards), [(s, len(server.gets(REPO, s))) for s in shards]


def teach(api: kubernetes.client.ApiClient, namespace: str, runner: PodRunner) -> dict[str, Any]:
    """A FineTuneJob whose dataset teaches one fixed answer to one fixed question, trained for real
    on this machine's CPU with the operator's rendered LLaMA-Factory configuration."""
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    records = "\n".join(json.dumps(record) for _ in range(RECORDS)) + "\n"
    kubernetes.client.CoreV1Api(api).create_namespaced_config_map(
        namespace, {"metadata": {"name": "facts"}, "data": {"train.jsonl": records}}
    )
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": "teach"},
        "spec": {
            "model": {"name": "tiny"},
            "dataset": {"configMap": {"name": "facts", "key": "train.jsonl"}},
            "lora": {"rank": 16, "alpha": 32, "dropout": 0},
            "training": TRAINING,
            "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi", "sharedMemory": "1Gi"},
            "podMetadata": {"annotations": RUN},
        },
    }
    create(api, namespace, "finetunejobs", job)
    status = until(api, namespace, "finetunejobs", "teach", 900)["status"]
    adapter = status["adapter"]
    out = runner.config.node_dir(NODE) / STORAGE.lstrip("/") / namespace / "tiny"
    return {"status": status, "adapter": adapter, "model_dir": out}


def serve(api: kubernetes.client.ApiClient, namespace: str, adapter_sha: str) -> str:
    """A LoraServer of the base model and the taught adapter (its engine the SGLang stand-in on the
    INT4 checkpoint as shipped, its adapter agent beside it), and its router; the router's URL on
    its pod's 127.x address."""
    run = {"annotations": {podprotocol.RUN_ANNOTATION: "true"}}
    lsrv = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoraServer",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"name": "tiny"},
            "servedModelName": SERVED,
            "replicas": 1,
            "adapters": [{"name": ADAPTER, "fineTuneJob": {"name": "teach"}}],
            # The experts straight from the checkpoint: no converted CPU variant is needed.
            "engine": {"ktMethod": "RAWINT4", "maxLoraRank": 16},
            "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi", "sharedMemory": "1Gi"},
            "podMetadata": run,
            "router": {"replicas": 1, "podMetadata": run},
        },
    }
    create(api, namespace, "loraservers", lsrv)
    status = until(api, namespace, "loraservers", "tiny", 600)["status"]
    (entry,) = [a for a in status["adapters"] if a["name"] == ADAPTER]
    assert entry["state"] == "Loaded", entry
    # What the engine itself lists, as its agent reported it: the adapter's files, by digest.
    (engine,) = status["engines"]
    assert engine["engineUp"] is True
    assert engine["loadedSha256"] == {ADAPTER: adapter_sha}
    selector = ",".join(f"{k}={v}" for k, v in router_labels("tiny").items())

    def router_ip() -> str | None:
        pods = kubernetes.client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
        return pods[0].status.pod_ip if pods and pods[0].status.pod_ip else None

    ip = wait_for(router_ip, 60, "the router pod's IP")
    assert ip.startswith("127."), ip
    return f"http://{ip}:{ROUTER_PORT}"


def test_what_a_fine_tune_learned_is_what_the_router_serves(
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    cluster: Cluster,
    runner: PodRunner,
    hub: tuple[FakeHub, str],
) -> None:
    server, sha = hub
    prepare_model(api, namespace, runner, server, sha)
    taught = teach(api, namespace, runner)
    url = serve(api, namespace, taught["adapter"]["sha256"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def answer(model: str) -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
        )
        return reply.choices[0].message.content or ""

    def wait_ready() -> bool | None:
        # The router learns the engine's adapters from the engine itself, every few seconds.
        return True if any(m.id == ADAPTER for m in client.models.list().data) else None

    wait_for(wait_ready, 60, "the router listing the adapter")
    taught_answer, bare_answer, base_answer = answer(f"{SERVED}:{ADAPTER}"), answer(ADAPTER), answer(SERVED)
    print(json.dumps({"adapter": taught_answer, "bare name": bare_answer, "base": base_answer}))
    assert FACT in taught_answer, taught_answer
    assert FACT in bare_answer, bare_answer
    assert FACT not in base_answer, base_answer
