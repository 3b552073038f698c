"""The adapter agent beside a real llama.cpp server (built from source by `make llamacpp`): its
``--once`` step fills the node cache with exactly the entries of the pod's command line and refuses
an adapter without its GGUF file; the server is started as the operator renders it, from those cache
entries; each step then reports the planned adapters the server's own ``/lora-adapters`` has, in the
form the operator's status code reads, and never asks the server to change anything.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests import llamacpp_tools
from tests.processes import free_port

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
    return llamacpp_tools.build()


@pytest.fixture(scope="module")
def models(llamacpp: Path, train_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model storage as the agent sees it: the tiny model in GGUF (base.gguf), and PEFT adapters
    under adapters/, each with adapter.gguf beside its weights as a FineTuneJob's export leaves it."""
    work = tmp_path_factory.mktemp("llamacpp-agent")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tiny = [train_python, str(ENGINES / "tiny_lora.py"), str(work), "--adapters", str(len(CONVERTED))]
    subprocess.run(tiny, check=True, capture_output=True, env=env, timeout=600)
    model = work / "model"
    llamacpp_tools.convert_model(train_python, llamacpp, model, work / "base.gguf")
    for name in CONVERTED:
        adapter = work / "adapters" / name
        llamacpp_tools.convert_lora(train_python, llamacpp, adapter, model, adapter / GGUF_ADAPTER_FILE)
    return work


def digest(models: Path, name: str, file: str = "adapter_model.safetensors") -> str:
    return hashlib.sha256((models / "adapters" / name / file).read_bytes()).hexdigest()


def plan_of(models: Path, names: list[str], *, declared: bool = True) -> ServingPlan:
    """The plan as the operator writes it: every adapter with the digest of its weights (the cache
    entry its pod's command line names). ``declared=False``: a1 without it, as a path adapter may be
    planned (the agent learns it from the files). a0 is planned as a FineTuneJob's export is, with
    the digest of its adapter.gguf, which --once checks."""
    adapters = [
        PlannedAdapter(
            name=n,
            sha256=None if n == "a1" and not declared else digest(models, n),
            files=AdapterFiles(kind="node", path=f"adapters/{n}"),
            gguf_sha256=digest(models, n, GGUF_ADAPTER_FILE) if n == "a0" else None,
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
    current: list[ServingPlan | None] = [plan_of(models, ["a0", "a1", NO_GGUF])]

    def plan() -> ServingPlan | None:
        return current[0]  # the plan as the operator writes it now

    agent = Agent(
        replica="r0",
        engine=Engine(url),
        plan=plan,
        models_dir=models,
        cache_dir=cache,
        pod_uid=UID,
        engine_api="llamacpp",
    )

    # --once (the pod's init container, given the digests of its command line): the adapter without
    # its GGUF file fails it, by name. The operator cannot know a path or hub adapter lacks the file
    # (it does not read their sources): it stays in the plan and in the pod's list, and its status
    # says why, until the LoraServer no longer names it or its source carries an adapter.gguf.
    written: list[dict[str, Any]] = []
    digests = [digest(models, n) for n in ("a0", "a1", NO_GGUF)]
    assert fill_once(agent, current[0], written.append, digests) == 1
    (error,) = written[-1]["engines"][0]["errors"]
    assert (error["name"], error["reason"], error["sha256"]) == (NO_GGUF, "Unavailable", digest(models, NO_GGUF))
    assert f"no {GGUF_ADAPTER_FILE}" in error["message"]
    # Taken out of the LoraServer: the plan and the next pod's command line no longer name it, and
    # that pod's init container succeeds.
    current[0] = plan_of(models, ["a0", "a1"])
    assert fill_once(agent, current[0], written.append, digests[:2]) == 0
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
    argv = [str(llamacpp / "bin" / "llama-server"), *llamacpp_render.server_args(options)]
    with llamacpp_tools.running(argv, url, tmp_path / "llama-server.log"):
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
        current[0] = plan_of(models, ["a0", "a1", "a2"], declared=False)
        report = agent.step()
        assert report == serving
        assert (cache / digest(models, "a2") / GGUF_ADAPTER_FILE).is_file()
        assert states(models, report, ["a2"]) == {"a2": "Pending"}
        listed = llamacpp_tools.http_json(f"{url}/lora-adapters")
        assert [(e["path"], e["scale"]) for e in listed] == [(f, 0.0) for f in files]

        # No plan readable (the ConfigMap being recreated): reported against the last plan read.
        current[0] = None
        assert agent.step() == serving

        # A file no planned adapter has (a1 removed from the plan) names nothing.
        current[0] = plan_of(models, ["a0"], declared=False)
        assert agent.step()["adapters"] == ["a0"]
    # Gone: down, nothing listed.
    down = agent.step()
    assert (down["engineUp"], down["adapters"], down["errors"]) == (False, [], [])
