"""The adapter agent's node cache: adapters from a node path or from the hub (the real
huggingface_hub client against the fake hub), checked against their sha256 before any engine
could see them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kimi_operator.api.serving import AdapterFiles, PlannedAdapter, ReplicaPlan, ServingPlan
from kimi_operator.devcluster.hub import FakeHub
from kimi_operator.workloads.serve.agent import Agent
from kimi_operator.workloads.serve.engine import Engine, EngineDown

CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}).encode()
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\x00" * 64
SHA = hashlib.sha256(WEIGHTS).hexdigest()
TOKEN = "hf_secret_token"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(token=TOKEN) as server:
        yield server


def agent(tmp_path: Path) -> Agent:
    # No engine is asked anything here: materialising only fills the cache.
    return Agent(
        replica="r0",
        engine=Engine("http://127.0.0.1:9"),
        plan=lambda: None,
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
    )


def from_hub(hub: FakeHub, sha: str | None, revision: str, subfolder: str | None = "lora") -> PlannedAdapter:
    files = AdapterFiles(
        kind="hub", repo="acme/kimi-lora", revision=revision, subfolder=subfolder, endpoint=hub.endpoint
    )
    return PlannedAdapter(name="sql", sha256=sha, files=files)


def test_a_hub_adapter_lands_in_the_cache_under_its_digest(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = hub.add_commit(
        "acme/kimi-lora",
        {"lora/adapter_config.json": CONFIG, "lora/adapter_model.safetensors": WEIGHTS, "README.md": b"x"},
    )
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    a = agent(tmp_path)
    desired = a.materialise([from_hub(hub, SHA, commit)])
    assert a.unavailable == {}
    assert desired["sql"].path == str(tmp_path / "cache" / SHA)
    assert sorted(p.name for p in (tmp_path / "cache" / SHA).iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # No partial directory is left behind.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [SHA]
    # Cached: a second step does not go to the hub again.
    before = len(hub.seen)
    a.materialise([from_hub(hub, SHA, commit)])
    assert len(hub.seen) == before


def test_files_that_do_not_match_their_digest_never_reach_the_cache(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = hub.add_commit(
        "acme/kimi-lora", {"lora/adapter_config.json": CONFIG, "lora/adapter_model.safetensors": WEIGHTS + b"x"}
    )
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    a = agent(tmp_path)
    assert a.materialise([from_hub(hub, SHA, commit)]) == {}
    sha, message = a.unavailable["sql"]
    assert sha == SHA
    assert f"expected {SHA}" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_without_the_token_a_private_adapter_is_unavailable_with_the_hubs_answer(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = hub.add_commit(
        "acme/kimi-lora", {"lora/adapter_config.json": CONFIG, "lora/adapter_model.safetensors": WEIGHTS}
    )
    monkeypatch.delenv("HF_TOKEN", raising=False)
    a = agent(tmp_path)
    assert a.materialise([from_hub(hub, SHA, commit)]) == {}
    assert a.unavailable["sql"][1].startswith("download failed:")


def test_a_node_adapter_missing_here_names_the_node_that_holds_it(tmp_path: Path) -> None:
    files = AdapterFiles(kind="node", path="ml/kimi/finetune/tune/adapter", node="gpu-a")
    a = agent(tmp_path)
    assert a.materialise([PlannedAdapter(name="tune", sha256=SHA, files=files)]) == {}
    message = a.unavailable["tune"][1]
    assert "is not on this node (it is on node gpu-a)" in message


def test_a_node_adapter_is_copied_then_served_from_the_cache(tmp_path: Path) -> None:
    source = tmp_path / "models" / "adapters" / "legal"
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_bytes(CONFIG)
    (source / "adapter_model.safetensors").write_bytes(WEIGHTS)
    a = agent(tmp_path)
    desired = a.materialise(
        [PlannedAdapter(name="legal", sha256=SHA, files=AdapterFiles(kind="node", path="adapters/legal"))]
    )
    assert desired["legal"].path == str(tmp_path / "cache" / SHA)


def test_an_adapter_without_a_digest_is_fetched_once_until_its_files_change(tmp_path: Path) -> None:
    source = tmp_path / "models" / "adapters" / "legal"
    source.mkdir(parents=True)
    (source / "adapter_config.json").write_bytes(CONFIG)
    (source / "adapter_model.safetensors").write_bytes(WEIGHTS)
    a = agent(tmp_path)
    planned = [PlannedAdapter(name="legal", files=AdapterFiles(kind="node", path="adapters/legal"))]
    first = a.materialise(planned)["legal"].path
    (source / "adapter_config.json").unlink()  # a fetch now would fail: it must not happen
    assert a.materialise(planned)["legal"].path == first
    assert a.unavailable == {}
    # New files (another size): fetched again, and the missing config is reported.
    (source / "adapter_model.safetensors").write_bytes(WEIGHTS + b"more")
    assert a.materialise(planned) == {}
    assert "no adapter_config.json" in a.unavailable["legal"][1]


@pytest.mark.parametrize("path", ["../../etc", "/etc", "adapters/../../.."])
def test_a_path_from_status_cannot_leave_its_volume(tmp_path: Path, path: str) -> None:
    (tmp_path / "models").mkdir()
    a = agent(tmp_path)
    assert a.materialise([PlannedAdapter(name="x", files=AdapterFiles(kind="node", path=path))]) == {}
    assert "is not a path inside" in a.unavailable["x"][1]


def test_the_token_goes_only_to_the_hub_it_is_for(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = hub.add_commit(
        "acme/kimi-lora", {"lora/adapter_config.json": CONFIG, "lora/adapter_model.safetensors": WEIGHTS}
    )
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    a = agent(tmp_path)
    assert a.materialise([from_hub(hub, SHA, commit)]) == {}
    assert hub.seen
    assert all(seen.token is None for seen in hub.seen)


class FreezingEngine(Engine):
    """An engine whose health, listing and /freeze_gc answers a test sets; the freezes are counted."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9")
        self.up, self.warm, self.freezes = True, True, 0
        self.answer: int | None = 200

    def models(self, served: str) -> dict[str, str]:
        if not self.up:
            raise EngineDown("connection refused")
        return {}

    def healthy(self) -> bool:
        return self.warm

    def freeze_gc(self) -> int | None:
        self.freezes += 1
        return self.answer


def freezing_agent(tmp_path: Path, engine: FreezingEngine) -> Agent:
    plan = ServingPlan(served_model_name="kimi", generation=1, replicas=[ReplicaPlan(replica="r0", adapters=[])])
    return Agent(
        replica="r0", engine=engine, plan=lambda: plan, models_dir=tmp_path / "models", cache_dir=tmp_path / "cache"
    )


def test_the_heap_is_frozen_once_per_engine_start_after_its_warm_up(tmp_path: Path) -> None:
    engine = FreezingEngine()
    agent = freezing_agent(tmp_path, engine)
    engine.warm = False  # SGLang's /health says 503 during its warm-up generation
    agent.step()
    assert engine.freezes == 0
    engine.warm = True
    agent.step()
    agent.step()
    assert engine.freezes == 1
    engine.up = False  # a restart: the new process's heap is frozen again once it is warm
    assert agent.step()["engineUp"] is False
    engine.up = True
    agent.step()
    agent.step()
    assert engine.freezes == 2


@pytest.mark.parametrize("answer", [None, 500, 503])
def test_a_freeze_without_success_is_tried_again_at_the_next_step(tmp_path: Path, answer: int | None) -> None:
    engine = FreezingEngine()
    agent = freezing_agent(tmp_path, engine)
    engine.answer = answer
    agent.step()
    agent.step()
    assert engine.freezes == 2
    engine.answer = 200
    agent.step()
    agent.step()
    assert engine.freezes == 3


@pytest.mark.parametrize("answer", [404, 405])
def test_an_engine_without_freeze_gc_is_not_asked_again_even_after_a_restart(tmp_path: Path, answer: int) -> None:
    engine = FreezingEngine()
    agent = freezing_agent(tmp_path, engine)
    engine.answer = answer
    agent.step()
    agent.step()
    engine.up = False
    agent.step()
    engine.up = True
    agent.step()
    assert engine.freezes == 1
