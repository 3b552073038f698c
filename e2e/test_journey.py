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
from kimi_operator.workloads import manifest

pytestmark = pytest.mark.e2e

NODE = "gpu-h200-a"
STORAGE = "/mnt/nvme/kimi"
REPO = "moonshotai/Tiny-K2.5"
# The runner runs the pods that ask for it; a Job's pod is also held Running by KWOK meanwhile.
RUN = {podprotocol.RUN_ANNOTATION: "true", podprotocol.HOLD_ANNOTATION: "true"}


@pytest.fixture(scope="module")
def oracle_python() -> str:
    """compressed-tensors' environment (`make oracle-env`), which builds the tiny INT4 checkpoint."""
    python = os.environ.get("KIMI_ORACLE_PYTHON")
    if not python or not Path(python).exists():
        pytest.fail("KIMI_ORACLE_PYTHON is not set to the oracle environment's python: run the tests with `make e2e`")
    return python


@pytest.fixture(scope="module")
def hub(oracle_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeHub, str]]:
    """The tiny checkpoint (compressed-tensors' own packing), as one commit of a hub on 127.0.0.1."""
    out = tmp_path_factory.mktemp("tiny-k25")
    script = repo_root() / "tests" / "oracle" / "kimi_checkpoint.py"
    subprocess.run([oracle_python, str(script), "make", str(out)], check=True, capture_output=True, timeout=600)
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


def test_a_kimimodel_downloads_verifies_and_converts_the_tiny_model_on_its_node(
    api: kubernetes.client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    cluster: Cluster,
    runner: PodRunner,
    hub: tuple[FakeHub, str],
) -> None:
    server, sha = hub
    model = copy.deepcopy(KIMI_MODEL)
    model["metadata"]["name"] = "tiny"
    model["spec"].update(
        source={"huggingFace": {"repo": REPO, "revision": "main", "endpoint": server.endpoint}},
        placement={"nodeNames": [NODE], "count": 1},
        variants=["bf16"],
        storage={"hostPath": STORAGE},
        podMetadata={"annotations": RUN},
    )
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "kimimodels", model
    )

    def ready() -> dict[str, Any] | None:
        obj = get(api, namespace, "kimimodels", "tiny")
        failed = condition(obj, "Stalled")
        assert failed.get("status") != "True", json.dumps(obj.get("status"), indent=1)
        return obj if condition(obj, "Ready").get("status") == "True" else None

    obj = wait_for(ready, 300, "the tiny KimiModel Ready")
    status = obj["status"]
    # The branch was resolved once, by the pod, to the hub's commit.
    assert status["resolvedRevision"] == sha
    (node,) = status["nodes"]
    assert (node["name"], node["phase"], node["variants"]) == (NODE, "Ready", ["bf16"])
    # The files are really on the node (the runner's directory for its hostPath), each checked
    # against its manifest, at the commit the pod resolved.
    root = runner.config.node_dir(NODE) / STORAGE.lstrip("/") / namespace / "tiny"
    for variant in ("int4", "bf16"):
        assert manifest.verify(root / variant) == [], variant
        assert manifest.read(root / variant)["revision"] == sha  # type: ignore[index]
    assert (root / "bf16" / "config.json").is_file()
    # The shards were fetched from the hub once each.
    shards = sorted(p.name for p in (root / "int4").glob("model-*.safetensors"))
    assert shards
    assert all(len(server.gets(REPO, s)) == 1 for s in shards), [(s, len(server.gets(REPO, s))) for s in shards]
