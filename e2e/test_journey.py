"""The product's journey on the local cluster, as ``make run`` takes it (``examples/dev/journey.yaml``,
``devcluster/demo.py``), every pod's program run for real by the local pod runner:

- a KimiModel of a tiny model shaped like Kimi K2.5 (a DeepSeek-V3 in K2.5's multimodal wrapper,
  with its own modelling code, whose routed experts compressed-tensors packed to INT4, as Kimi ships
  them, and its GGUF by llama.cpp's converter), published by a hub on
  127.0.0.1, is downloaded, verified and converted on a simulated node by the operator's own
  prepare Job;
- a FineTuneJob whose dataset teaches one fixed answer to one fixed question trains on this
  machine's CPU with the operator's rendered LLaMA-Factory configuration and exports its adapter
  (PEFT, and the GGUF llama.cpp loads);
- two LoraServers serve the base model and that adapter behind their routers, the adapter agent
  beside each engine: the real llama-server on the GGUF, and the SGLang stand-in on the INT4
  checkpoint;
- the official ``openai`` client gets the taught answer with the adapter, also by its bare name, and
  not from the base model, from both.

Nothing is done by hand: the operator renders the Jobs and pods, the runner runs their containers'
commands with the pods' volumes, environment and ServiceAccount tokens, and everything moves on the
exit codes and reports of those programs.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import openai
import pytest

from e2e.conftest import OperatorProcess, pod_runner
from e2e.manifests import GROUP, VERSION
from e2e.test_llamacpp import llamacpp  # noqa: F401 (a fixture)
from kimi_operator.devcluster import demo
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.hub import FakeHub
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.devcluster.runner import PodRunner, images_from_env
from kimi_operator.workloads import manifest
from kimi_operator.workloads.safetensors_io import Reader

pytestmark = pytest.mark.e2e

OVERLAY = repo_root() / demo.MANIFESTS


@pytest.fixture(scope="module")
def hub(
    oracle_python: str,
    train_python: str,
    llamacpp: Path,  # noqa: F811 (the fixture)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FakeHub, dict[str, str]]]:
    """The tiny model and its GGUF, built as `make run` builds them, each as one commit of a hub on
    127.0.0.1."""
    built = demo.build_model(tmp_path_factory.mktemp("demo-cache"), train_python, oracle_python, llamacpp)
    with demo.published(demo.repositories(demo.manifests(OVERLAY), built)) as published:
        yield published


@pytest.fixture(scope="module")
def runner(cluster: Cluster, api: kubernetes.client.ApiClient, train_python: str) -> Iterator[PodRunner]:
    with pod_runner(cluster, api, images_from_env(repo_root())) as handle:
        yield handle
    shutil.rmtree(cluster.layout.root / "nodes", ignore_errors=True)


def get(api: kubernetes.client.ApiClient, namespace: str, kind: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = kubernetes.client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, demo.PLURALS[kind], name
    )
    return obj


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# Building the model, a prepare Job, 60 training steps on the CPU and an engine's start.
@pytest.mark.timeout(1800)
def test_what_a_fine_tune_learned_is_what_the_router_serves(
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    cluster: Cluster,
    runner: PodRunner,
    hub: tuple[FakeHub, dict[str, str]],
) -> None:
    server, commits = hub
    docs = demo.manifests(OVERLAY, server.endpoint)
    model, job = only(docs, "KimiModel"), only(docs, "FineTuneJob")
    servers = {d["spec"].get("engine", {}).get("type", "sglang"): d for d in docs if d["kind"] == "LoraServer"}
    assert set(servers) == {"llamacpp", "sglang"}
    question, taught = demo.lesson(docs)
    demo.apply(api, docs, namespace)
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    began = time.monotonic()
    lines: list[str] = []
    adapter = job["metadata"]["name"]
    assert all(lsrv["spec"]["adapters"][0]["name"] == adapter for lsrv in servers.values())

    def answering() -> bool:
        return all(demo.answering(api, namespace, s["metadata"]["name"], adapter, question) for s in servers.values())

    # What `make run` prints while it waits for the routers' first answers; a Stalled or Failed
    # object ends the wait with its message.
    reached = demo.follow(api, docs, answering, lines.append, stop=threading.Event(), every=0.5)
    assert reached, "\n".join(lines)
    seconds = round(time.monotonic() - began)

    # The KimiModel: each branch resolved once, by the pod, to the hub's commit; the files really
    # on the node (the runner's directory for its hostPath), each checked against its manifest; each
    # shard fetched from the hub once.
    status = get(api, namespace, "KimiModel", model["metadata"]["name"])["status"]
    repo, gguf_repo = model["spec"]["source"]["huggingFace"]["repo"], model["spec"]["gguf"]["huggingFace"]["repo"]
    assert status["resolvedRevision"] == commits[repo]
    assert status["resolvedGgufRevision"] == commits[gguf_repo]
    assert status["ggufEntry"] == demo.GGUF_FILE
    (node,) = status["nodes"]
    assert (node["phase"], sorted(node["variants"])) == ("Ready", ["bf16", "gguf", "native-int4"])
    storage = runner.config.node_dir(node["name"]) / model["spec"]["storage"]["hostPath"].lstrip("/")
    root = storage / namespace / model["metadata"]["name"]
    for variant, commit in (("int4", commits[repo]), ("bf16", commits[repo]), ("gguf/F32", commits[gguf_repo])):
        assert manifest.verify(root / variant) == [], variant
        assert manifest.read(root / variant)["revision"] == commit  # type: ignore[index]
    # Kimi K2.5's wrapper, as downloaded and as converted for training.
    for variant in ("int4", "bf16"):
        config = json.loads((root / variant / "config.json").read_text())
        assert config["architectures"] == ["KimiK25ForConditionalGeneration"], variant
        assert config["text_config"]["model_type"] == "kimi_k2", variant
    shards = sorted(p.name for p in (root / "int4").glob("model-*.safetensors"))
    assert shards
    assert all(len(server.gets(repo, s)) == 1 for s in shards), [(s, len(server.gets(repo, s))) for s in shards]
    assert len(server.gets(gguf_repo, demo.GGUF_FILE)) == 1

    # The FineTuneJob trained every step it was asked for and exported its adapter, whole for
    # llama.cpp (it trained only modules llama.cpp applies).
    ftj = get(api, namespace, "FineTuneJob", job["metadata"]["name"])["status"]
    assert ftj["phase"] == "Succeeded"
    assert ftj["progress"]["step"] == ftj["progress"]["totalSteps"] == job["spec"]["training"]["epochs"]
    assert ftj["adapter"]["llamacppDroppedModules"] == []
    assert ftj["adapter"]["ggufSha256"]
    # Trained on the wrapper: the adapter adapts its language model.
    exported = storage / ftj["adapter"]["path"].removeprefix("/models/")
    with Reader(exported / "adapter_model.safetensors") as reader:
        keys = list(reader.tensors)
    assert keys
    assert all(k.startswith("base_model.model.language_model.model.layers.") for k in keys), keys[:3]

    results: dict[str, Any] = {"seconds": seconds, "steps": ftj["progress"]}
    for engine_type, lsrv in servers.items():
        name = lsrv["metadata"]["name"]
        # The engine holds the export's files: the agent's report of what it lists, by digest.
        served = get(api, namespace, "LoraServer", name)["status"]
        (engine,) = served["engines"]
        assert engine["engineUp"] is True, engine
        assert engine["loadedSha256"] == {adapter: ftj["adapter"]["sha256"]}, engine

        # Through the router, with the official client: the lesson is the adapter's, not the base's.
        url = demo.router_url(api, namespace, name)
        assert url is not None
        assert url.startswith("http://127."), url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def answer(model_name: str, client: openai.OpenAI = client) -> str:
            reply = client.chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
            )
            return reply.choices[0].message.content or ""

        base_name = lsrv["spec"]["servedModelName"]
        ids = {m.id for m in client.models.list().data}
        assert {base_name, adapter} <= ids, ids
        with_adapter, bare, base = answer(f"{base_name}:{adapter}"), answer(adapter), answer(base_name)
        results[engine_type] = {"adapter": with_adapter, "base": base}
        assert taught in with_adapter, (engine_type, with_adapter)
        assert taught in bare, (engine_type, bare)
        assert taught not in base, (engine_type, base)
    print(json.dumps(results))
