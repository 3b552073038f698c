"""The adapter agent beside a real llama.cpp server (built from source by `make llamacpp`): its
``--once`` step fills the node cache and refuses an adapter without its GGUF file; the server is
started as the operator renders it, from those cache entries; each step then reports the planned
adapters the server's own ``/lora-adapters`` has, in the form the operator's status code reads,
and never asks the server to change anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import stop
from e2e.helpers import wait_for
from kimi_operator.api.serving import GGUF_ADAPTER_FILE, AdapterFiles, PlannedAdapter, ReplicaPlan, ServingPlan
from kimi_operator.controller.loraserver_status import Replica, Wanted, adapter_status
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.render import llamacpp as llamacpp_render
from kimi_operator.workloads.serve.agent import Agent, fill_once
from kimi_operator.workloads.serve.engine import Engine

pytestmark = pytest.mark.e2e

ENGINES = repo_root() / "e2e" / "engines"
SERVED = "kimi-k2.5"
UID = "uid-1"
# a0 and a1 are in the server's start list, a2 is planned after its start; wrong-rank is left
# without a GGUF file (a hub or path adapter that does not carry one).
CONVERTED = ("a0", "a1", "a2")
NO_GGUF = "wrong-rank"


@pytest.fixture(scope="module")
def llamacpp() -> Path:
    found = os.environ.get("KIMI_LLAMACPP")
    if not found or not (Path(found) / "bin" / "llama-server").exists():
        pytest.fail("KIMI_LLAMACPP is not set to a llama.cpp build: run the tests with `make e2e`")
    return Path(found)


@pytest.fixture(scope="module")
def models(llamacpp: Path, train_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model storage as the agent sees it: the tiny model in GGUF (base.gguf), and PEFT adapters
    under adapters/, each with adapter.gguf beside its weights as a FineTuneJob's export leaves it."""
    work = tmp_path_factory.mktemp("llamacpp-agent")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tiny = [train_python, str(ENGINES / "tiny_lora.py"), str(work), "--adapters", str(len(CONVERTED))]
    subprocess.run(tiny, check=True, capture_output=True, env=env, timeout=600)
    convert = [train_python, str(ENGINES / "gguf_convert.py"), str(llamacpp / "src")]
    model = work / "model"
    subprocess.run([*convert, "model", str(model), str(work / "base.gguf")], check=True, capture_output=True, env=env)
    for name in CONVERTED:
        adapter = work / "adapters" / name
        lora = [*convert, "lora", str(adapter), str(model), str(adapter / GGUF_ADAPTER_FILE)]
        subprocess.run(lora, check=True, capture_output=True, env=env, timeout=600)
    return work


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def digest(models: Path, name: str) -> str:
    return hashlib.sha256((models / "adapters" / name / "adapter_model.safetensors").read_bytes()).hexdigest()


def plan_of(models: Path, names: list[str]) -> ServingPlan:
    # a1 is planned without its digest (a path adapter): the agent learns it from the files.
    adapters = [
        PlannedAdapter(
            name=n,
            sha256=None if n == "a1" else digest(models, n),
            files=AdapterFiles(kind="node", path=f"adapters/{n}"),
        )
        for n in names
    ]
    return ServingPlan(
        served_model_name=SERVED,
        generation=1,
        engine="llamacpp",
        replicas=[ReplicaPlan(replica="r0", adapters=adapters)],
    )


def states(models: Path, report: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Each adapter's state as the operator computes it from this report."""
    replicas = {"r0": Replica("r0", pod_ready=True, uid=UID)}
    return {
        n: adapter_status(Wanted(n, "Shared", ("r0",), digest(models, n)), replicas, {"r0": report})["state"]
        for n in names
    }


def test_the_agent_reports_what_a_real_llama_server_has(llamacpp: Path, models: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    host = "127.0.0.73"
    port = free_port(host)
    url = f"http://{host}:{port}"
    current = [plan_of(models, ["a0", "a1", NO_GGUF])]

    def plan() -> ServingPlan:
        return current[0]  # the plan as the operator writes it now

    agent = Agent(replica="r0", engine=Engine(url), plan=plan, models_dir=models, cache_dir=cache, pod_uid=UID)

    # --once (the pod's init container): the adapter without its GGUF file fails it, by name.
    written: list[dict[str, Any]] = []
    assert fill_once(agent, current[0], written.append) == 1
    (error,) = written[-1]["engines"][0]["errors"]
    assert (error["name"], error["reason"], error["sha256"]) == (NO_GGUF, "Unavailable", digest(models, NO_GGUF))
    assert f"no {GGUF_ADAPTER_FILE}" in error["message"]
    # The operator takes it out of the plan: the init container succeeds.
    current[0] = plan_of(models, ["a0", "a1"])
    assert fill_once(agent, current[0], written.append) == 0
    files = tuple(str(cache / digest(models, n) / GGUF_ADAPTER_FILE) for n in ("a0", "a1"))
    assert all(Path(f).is_file() for f in files)

    # Not started yet: down, nothing listed, no error.
    assert agent.step() == {
        "name": "r0",
        "engineUp": False,
        "adapters": [],
        "loadedSha256": {},
        "errors": [],
        "podUid": UID,
    }

    # llama-server with the command line the operator renders: the cache entries' files at scale 0.
    options = llamacpp_render.ServerOptions(
        model=str(models / "base.gguf"),
        alias=SERVED,
        adapters=files,
        context_size=512,
        threads=1,
        parallel=1,
        host=host,
        port=port,
    )
    log = tmp_path / "llama-server.log"
    with log.open("ab") as out:
        engine = subprocess.Popen(
            [str(llamacpp / "bin" / "llama-server"), *llamacpp_render.server_args(options)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: engine.poll() is not None or agent.step()["engineUp"], 60, "llama-server up")
        assert engine.poll() is None, log.read_text()[-3000:]
        serving = {
            "name": "r0",
            "engineUp": True,
            "adapters": ["a0", "a1"],
            "loadedSha256": {"a0": digest(models, "a0"), "a1": digest(models, "a1")},
            "errors": [],
            "podUid": UID,
        }
        assert agent.step() == serving
        assert states(models, serving, ["a0", "a1"]) == {"a0": "Loaded", "a1": "Loaded"}

        # a2 planned after the server's start (its pod is being replaced): brought into the cache
        # for the next pod, not listed, no error, and nothing asked of the server.
        current[0] = plan_of(models, ["a0", "a1", "a2"])
        report = agent.step()
        assert report == serving
        assert (cache / digest(models, "a2") / GGUF_ADAPTER_FILE).is_file()
        assert states(models, report, ["a2"]) == {"a2": "Pending"}
        with urllib.request.urlopen(f"{url}/lora-adapters", timeout=10) as resp:  # noqa: S310 (loopback)
            assert [(e["path"], e["scale"]) for e in json.load(resp)] == [(f, 0.0) for f in files]

        # A file no planned adapter has (a1 removed from the plan) names nothing.
        current[0] = plan_of(models, ["a0"])
        assert agent.step()["adapters"] == ["a0"]
    finally:
        stop(engine)
    # Gone: down, nothing listed.
    down = agent.step()
    assert (down["engineUp"], down["adapters"], down["errors"]) == (False, [], [])
