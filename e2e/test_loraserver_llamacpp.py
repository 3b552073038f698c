"""A LoraServer with ``engine.type: llamacpp`` against the real apiserver, end to end.

The operator renders the llama-server replicas from the spec; the local pod runner runs what each
pod runs, as that pod (e2e/test_loraserver.py's harness): the adapter agent's init container, the
real llama-server (built by ``make llamacpp``) with the engine container's own arguments on the
pod's 127.x IP, the agent beside it, and the router. Through the router, the official
``openai`` client gets transformers + PEFT's own greedy tokens for the base model and each adapter,
also for a base request right after an adapter's on the same slot. An adapter whose export says
llama.cpp would drop trained modules is refused, naming them, until the user accepts the loss.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import openai
import pytest

from e2e.conftest import OperatorProcess
from e2e.helpers import wait_earlier_namespaces_gone, wait_for
from e2e.manifests import GROUP, KIMI_MODEL, VERSION
from e2e.test_finetunejob import ftj, release_training, training_pod_status, wait_phase
from e2e.test_kimimodel import _token_kubeconfig, condition
from e2e.test_llamacpp import PROMPT, SERVED, llamacpp, served  # noqa: F401 (fixtures)
from e2e.test_loraserver import (
    Node,
    Serving,
    adapters_by_name,
    custom,
    exported_adapter,
    get,
    lsrv,
    quick_images,
    restarted,
    started_runner,
)
from e2e.test_router import start_router
from kimi_operator.devcluster.cluster import Cluster
from kimi_operator.devcluster.runner import PodRunner
from kimi_operator.render import llamacpp as llamacpp_facts
from kimi_operator.workloads.report import StatusWriter, progress

pytestmark = pytest.mark.e2e

NODE = "gpu-4090-a"
STORAGE = "/mnt/nvme/kimi"
QUANT = "Q8_0"
ENTRY = "tiny-f32.gguf"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def runner(
    cluster: Cluster,
    api: kubernetes.client.ApiClient,
    train_python: str,
    llamacpp: Path,  # noqa: F811
) -> Iterator[PodRunner]:
    with started_runner(cluster, api, quick_images(train_python, llamacpp=llamacpp)) as handle:
        yield handle


class GgufNode(Node):
    """A simulated node's storage holding the model's gguf variant (what the KimiModel's prepare pod
    would have downloaded)."""

    def __init__(self, cluster: Cluster, name: str, namespace: str, base: Path) -> None:
        super().__init__(cluster, name, namespace)
        quantization = self.storage / namespace / "kimi" / "gguf" / QUANT
        quantization.mkdir(parents=True)
        (quantization / ENTRY).symlink_to(base)

    def put(self, relative: str, peft: Path, gguf: Path | None) -> Path:
        """An adapter directory as an export leaves it: the PEFT files, and adapter.gguf."""
        target = self.storage / relative
        shutil.copytree(peft, target, dirs_exist_ok=True)
        if gguf is not None:
            shutil.copyfile(gguf, target / "adapter.gguf")
        return target


def gguf_model(api: kubernetes.client.ApiClient, cluster: Cluster, namespace: str) -> None:
    """A KimiModel with the gguf variant, Ready on NODE, and the file to load reported by its
    prepare pod (as workloads/prepare/command.py reports it, with the pod's own token)."""
    wait_earlier_namespaces_gone(api)
    model = copy.deepcopy(KIMI_MODEL)
    model["spec"]["placement"] = {"nodeNames": [NODE], "count": 1}
    # bf16 to fine-tune on (a LoraServer serves only adapters trained on its own model), gguf to serve.
    model["spec"]["variants"] = ["bf16", "gguf"]
    model["spec"]["gguf"] = {
        "huggingFace": {"repo": "unsloth/Kimi-K2.5-GGUF", "revision": "abc"},
        "quantization": QUANT,
    }
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "kimimodels", model)
    wait_for(
        lambda: (c := condition(get(api, namespace, "kimimodels", "kimi"), "Ready")) and c["status"] == "True",
        90,
        "KimiModel Ready",
    )
    pod_api = _token_kubeconfig(cluster, api, namespace, "kimi-prepare")
    record = progress("Done", 1, 1, None, None, gguf_revision="f" * 40, gguf_entry=ENTRY)
    StatusWriter(pod_api, namespace, "kimi", NODE).write(record)
    wait_for(lambda: get(api, namespace, "kimimodels", "kimi")["status"].get("ggufEntry") == ENTRY, 30, "ggufEntry")


def finished_fine_tune(
    cluster: Cluster, api: kubernetes.client.ApiClient, namespace: str, name: str, node: GgufNode, **adapter: Any
) -> dict[str, Any]:
    """A FineTuneJob that trained and exported on NODE: its training pod reports the adapter (with
    the fields the export writes for llama.cpp) and ends."""
    hold = {"annotations": {"sim.kimi-operator.io/hold": "true"}}
    tune = ftj(name, podMetadata=hold, resources={"gpus": 1, "cpu": "4", "memory": "16Gi"})
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", tune)
    wait_phase(api, namespace, name, "Running")
    peft, gguf = adapter.pop("peft"), adapter.pop("gguf")
    local = node.put(f"{namespace}/kimi/finetune/{name}/adapter", peft, gguf)
    status = {**exported_adapter(namespace, name, NODE, local), **adapter}
    if gguf is not None:
        status["ggufSha256"] = digest(gguf)
    training_pod_status(cluster, api, namespace, name).apply({"adapter": status})
    release_training(api, namespace, name)
    wait_phase(api, namespace, name, "Succeeded")
    return status


@pytest.mark.timeout(900)
def test_a_llamacpp_loraserver_serves_the_exported_gguf_adapters_through_the_router(
    cluster: Cluster,
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    served: dict[str, Any],  # noqa: F811 (the fixture)
    runner: PodRunner,
) -> None:
    work = served["work"]
    tiny = work / "tiny"
    node = GgufNode(cluster, NODE, namespace, work / "base.gguf")
    gguf_model(api, cluster, namespace)
    # Two exports: one llama.cpp applies whole (a1's files), one it would cut short (the export
    # names the MLA projections it would drop: what render/llamacpp.py reads of such an adapter).
    files = {name: path for name, (_, path) in served["files"].items()}
    finished_fine_tune(
        cluster,
        api,
        namespace,
        "tune",
        node,
        peft=tiny / "adapters" / "a1",
        gguf=files["a1"],
        llamacppDroppedModules=[],
    )
    mla = llamacpp_facts.dropped_modules(["model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_b_proj"])
    finished_fine_tune(
        cluster, api, namespace, "mla", node, peft=tiny / "adapters" / "a2", gguf=files["a2"],
        llamacppDroppedModules=mla,
    )  # fmt: skip
    # A path adapter carrying its own adapter.gguf, with its sha256.
    a0 = node.put("adapters/a0", tiny / "adapters" / "a0", files["a0"])
    spec = {
        "replicas": 1,
        "servedModelName": SERVED,
        # One slot: a base request after an adapter's lands on the same slot.
        "engine": {"type": "llamacpp", "llamacpp": {"contextSize": 256, "parallel": 1, "threads": 1}},
        "sampling": {"temperature": 0},
        "resources": {"gpus": 1, "cpu": "1", "memory": "4Gi", "sharedMemory": "1Gi"},
        "adapters": [
            {"name": "a0", "path": f"{STORAGE}/adapters/a0", "sha256": digest(a0 / "adapter_model.safetensors")},
            {"name": "support", "fineTuneJob": {"name": "tune"}},
            {"name": "mla", "fineTuneJob": {"name": "mla"}},
        ],
    }
    custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", lsrv("serve", **spec))
    serving = Serving(api, namespace, "serve", {NODE: node}, runner)
    serving.start(1)
    (engine,) = serving.pods.values()
    # llama-server runs with the command line the operator rendered: the model's gguf entry, each
    # served adapter's file at scale 0 (a0's, then the export's), on the pod's address.
    container = engine.spec["engine"]
    assert container.command == ["llama-server"]
    args = container.args
    assert args[args.index("-m") + 1] == f"/models/{namespace}/kimi/gguf/{QUANT}/{ENTRY}"
    support = digest(tiny / "adapters" / "a1" / "adapter_model.safetensors")
    a0_sha = digest(a0 / "adapter_model.safetensors")
    assert args[args.index("--lora-scaled") + 1] == (
        f"/adapter-cache/{a0_sha}/adapter.gguf:0,/adapter-cache/{support}/adapter.gguf:0"
    )
    assert args[args.index("--host") + 1] == "$(POD_IP)"

    def settled() -> dict[str, dict[str, Any]] | None:
        states = adapters_by_name(get(api, namespace, "loraservers", "serve"))
        wanted = {"a0": "Loaded", "support": "Loaded", "mla": "Failed"}
        return states if {n: s.get("state") for n, s in states.items()} == wanted else None

    states = wait_for(settled, 120, "a0 and support Loaded, mla Failed")
    for words in ("q_a_proj", "kv_b_proj", "cannot convert it", "acceptDroppedModules: true"):
        assert words in states["mla"]["message"], states["mla"]
    verdict = condition(get(api, namespace, "loraservers", "serve"), "Stalled")
    assert verdict is not None
    assert (verdict["status"], verdict["reason"]) == ("True", "AdapterFailed")

    router = start_router(api, namespace, "serve", runner)
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
    wait_for(lambda: {m.id for m in client.models.list()} == {SERVED, "a0", "support"}, 30, "a0 and support listed")
    expected = served["references"]["completion"]

    def complete(model: str, *, stream: bool = False) -> str:
        if stream:
            chunks = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, stream=True)
            return "".join(c.choices[0].text for c in chunks if c.choices)
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=8).choices[0].text

    # The LoraServer's sampling (greedy) fills what the requests leave out.
    for model, source in (("a0", "a0"), (f"{SERVED}:support", "a1"), ("support", "a1")):
        assert complete(model) == expected[source]["text"], model
        assert complete(SERVED) == expected["base"]["text"], f"base right after {model}"
    assert expected["a1"]["text"].startswith(complete("support", stream=True))
    # The router knows it from the spec, and says why no replica serves it.
    with pytest.raises(openai.InternalServerError, match="acceptDroppedModules: true"):
        complete("mla")

    # Accepting the loss: the adapter is now planned, and waits for replicas that start with it.
    patch = {"spec": {"adapters": [*spec["adapters"][:2], {**spec["adapters"][2], "acceptDroppedModules": True}]}}
    custom(api).patch_namespaced_custom_object(GROUP, VERSION, namespace, "loraservers", "serve", patch)
    waiting = wait_for(
        lambda: (
            (s := adapters_by_name(get(api, namespace, "loraservers", "serve")).get("mla"))
            and s.get("state") == "Pending"
            and s
        ),
        60,
        "mla Pending",
    )
    assert waiting["llamacppDroppedModules"] == mla
    assert "llama.cpp loads adapters only at start" in waiting["message"]
    sets = kubernetes.client.AppsV1Api(api).read_namespaced_stateful_set("serve-shared", namespace)
    lora = next(a for a in sets.spec.template.spec.containers[0].args if a.endswith(".gguf:0"))
    assert lora.count("adapter.gguf:0") == 3
    assert restarted(runner) == {}
