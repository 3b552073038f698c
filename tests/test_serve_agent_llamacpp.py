"""The adapter agent beside a llama.cpp engine: which planned adapter each file of the server's
``/lora-adapters`` is, the report it makes of that answer (read by the operator's status code as an
SGLang agent's report is), and ``--once`` checking that each cache entry holds the GGUF file.

The server here is a stand-in that answers only what it is given; e2e/test_llamacpp_agent.py runs
the agent against a real llama-server."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kimi_operator.api.serving import (
    GGUF_ADAPTER_FILE,
    AdapterFiles,
    EngineApi,
    PlannedAdapter,
    ReplicaPlan,
    ServingPlan,
)
from kimi_operator.controller.loraserver_status import Replica, Wanted, adapter_status
from kimi_operator.workloads.serve.agent import Agent, fill_once
from kimi_operator.workloads.serve.engine import Engine, EngineDown, LlamaServer
from kimi_operator.workloads.serve.llamacpp import NO_GGUF, adapters_of_files

CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["o_proj"]}).encode()
SERVED = "kimi-k2.5"
UID = "uid-1"


def weights(name: str) -> bytes:
    return b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + name.encode() * 16


SHA = {name: hashlib.sha256(weights(name)).hexdigest() for name in ("a", "b", "c", "nogguf", "old")}
C = Path("/adapter-cache")


@pytest.mark.parametrize(
    ("files", "digests", "expected"),
    [
        ([], {"a": SHA["a"]}, {}),
        ([f"{C}/{SHA['a']}/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"]}, {"a": f"{C}/{SHA['a']}"}),
        (
            [f"{C}/{SHA['b']}/{GGUF_ADAPTER_FILE}", f"{C}/{SHA['a']}/{GGUF_ADAPTER_FILE}"],
            {"a": SHA["a"], "b": SHA["b"]},
            {"a": f"{C}/{SHA['a']}", "b": f"{C}/{SHA['b']}"},
        ),
        # Planned but not among the server's files (its pod is being replaced): not listed.
        ([f"{C}/{SHA['a']}/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"], "b": SHA["b"]}, {"a": f"{C}/{SHA['a']}"}),
        # A file of an adapter no longer planned: names nothing.
        ([f"{C}/{SHA['old']}/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"]}, {}),
        # Named by its digest but outside the cache: never checked by the agent, so not counted.
        ([f"/elsewhere/{SHA['a']}/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"]}, {}),
        # The digest must be the directory holding the file, not any directory above it.
        ([f"{C}/{SHA['a']}/sub/{GGUF_ADAPTER_FILE}"], {"a": SHA["a"]}, {}),
        # Two names for the same files: the server has both.
        (
            [f"{C}/{SHA['a']}/{GGUF_ADAPTER_FILE}"],
            {"a": SHA["a"], "a2": SHA["a"]},
            {"a": f"{C}/{SHA['a']}", "a2": f"{C}/{SHA['a']}"},
        ),
        ([""], {"a": SHA["a"]}, {}),
    ],
    ids=["none", "one", "two", "not-yet", "old-plan", "outside", "nested", "same-files", "empty-path"],
)
def test_adapters_of_files(files: list[str], digests: dict[str, str], expected: dict[str, str]) -> None:
    assert adapters_of_files(files, digests, C) == expected


class StandIn:
    """A llama-server that answers /health and /lora-adapters as it is told, and records every
    request it gets."""

    def __init__(self) -> None:
        self.health = 200
        self.lora: tuple[int, Any] = (200, [])
        self.seen: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.seen.append((self.command, self.path))
                if self.path == "/health":
                    code, body = outer.health, {"status": "ok"} if outer.health == 200 else {"error": {"code": 503}}
                elif self.path == "/lora-adapters":
                    code, body = outer.lora
                else:
                    code, body = 404, {"error": {"code": 404, "message": "File Not Found"}}
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn()
    try:
        yield server
    finally:
        server.close()


def source(models: Path, name: str, *, gguf: bool = True) -> Path:
    """An adapter directory as a FineTuneJob's export leaves it (adapter.gguf beside the weights)."""
    path = models / "adapters" / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_bytes(CONFIG)
    (path / "adapter_model.safetensors").write_bytes(weights(name))
    if gguf:
        (path / GGUF_ADAPTER_FILE).write_bytes(b"GGUF" + name.encode())
    return path


def planned(name: str, *, sha: bool = True) -> PlannedAdapter:
    files = AdapterFiles(kind="node", path=f"adapters/{name}")
    return PlannedAdapter(name=name, sha256=SHA[name] if sha else None, files=files)


def plan_of(adapters: list[PlannedAdapter], engine: EngineApi = "llamacpp") -> ServingPlan:
    replicas = [ReplicaPlan(replica="r0", adapters=adapters)]
    return ServingPlan(served_model_name=SERVED, generation=1, engine=engine, replicas=replicas)


def make_agent(tmp_path: Path, url: str, plan: ServingPlan | None) -> Agent:
    return Agent(
        replica="r0",
        engine=Engine(url),
        plan=lambda: plan,
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
        pod_uid=UID,
    )


def entry(tmp_path: Path, name: str) -> str:
    return f"{tmp_path / 'cache' / SHA[name] / GGUF_ADAPTER_FILE}"


def listing(*paths: str) -> list[dict[str, Any]]:
    return [{"id": i, "path": p, "scale": 0.0, "task_name": "", "prompt_prefix": ""} for i, p in enumerate(paths)]


# Each case: the plan's adapters (name, declared sha256), the server's /health code and
# /lora-adapters answer (paths with {cache} for the node cache), and the report's fields.
CASES: list[tuple[str, list[tuple[str, bool]], int, tuple[int, Any], dict[str, Any]]] = [
    (
        "every-planned-adapter-listed",
        [("a", True), ("b", True)],
        200,
        (200, ["a", "b"]),
        {"engineUp": True, "adapters": ["a", "b"], "loadedSha256": {"a": SHA["a"], "b": SHA["b"]}, "errors": []},
    ),
    (
        # Planned since the server started: not listed, and no error (a restart brings it).
        "planned-after-start",
        [("a", True), ("b", True), ("c", True)],
        200,
        (200, ["a", "b"]),
        {"engineUp": True, "adapters": ["a", "b"], "loadedSha256": {"a": SHA["a"], "b": SHA["b"]}, "errors": []},
    ),
    (
        # A file of an adapter removed from the plan names nothing.
        "removed-from-plan",
        [("a", True)],
        200,
        (200, ["a", "old"]),
        {"engineUp": True, "adapters": ["a"], "loadedSha256": {"a": SHA["a"]}, "errors": []},
    ),
    (
        # Planned without a digest: the one its files had names its file.
        "planned-without-digest",
        [("a", False)],
        200,
        (200, ["a"]),
        {"engineUp": True, "adapters": ["a"], "loadedSha256": {"a": SHA["a"]}, "errors": []},
    ),
    (
        "started-without-adapters",
        [("a", True)],
        200,
        (200, []),
        {"engineUp": True, "adapters": [], "loadedSha256": {}, "errors": []},
    ),
    (
        # Still loading the model: /health answers 503.
        "loading",
        [("a", True)],
        503,
        (503, {"error": {"code": 503, "message": "Loading model"}}),
        {"engineUp": False, "adapters": [], "loadedSha256": {}, "errors": []},
    ),
    (
        "not-a-llama-server",
        [("a", True)],
        200,
        (200, {"object": "list", "data": []}),
        {"engineUp": False, "adapters": [], "loadedSha256": {}, "errors": []},
    ),
    (
        # One its pod could not have started with: reported, as --once reports it.
        "planned-without-gguf",
        [("a", True), ("nogguf", True)],
        200,
        (200, ["a"]),
        {
            "engineUp": True,
            "adapters": ["a"],
            "loadedSha256": {"a": SHA["a"]},
            "errors": [{"name": "nogguf", "reason": "Unavailable", "message": NO_GGUF, "sha256": SHA["nogguf"]}],
        },
    ),
]


@pytest.mark.parametrize(("plan", "health", "answer", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_report_of_a_lora_adapters_answer(
    standin: StandIn,
    tmp_path: Path,
    plan: list[tuple[str, bool]],
    health: int,
    answer: tuple[int, Any],
    expected: dict[str, Any],
) -> None:
    for name in SHA:
        source(tmp_path / "models", name, gguf=name != "nogguf")
    agent = make_agent(tmp_path, standin.url, plan_of([planned(n, sha=s) for n, s in plan]))
    code, body = answer
    standin.health = health
    standin.lora = (code, listing(*(entry(tmp_path, n) for n in body)) if isinstance(body, list) else body)
    assert agent.step() == {"name": "r0", **expected, "podUid": UID}
    # Nothing is ever sent to the server: it is only asked.
    assert {method for method, _ in standin.seen} == {"GET"}
    assert {path for _, path in standin.seen} <= {"/health", "/lora-adapters"}


def test_the_operator_reads_the_report_as_an_sglang_agents(standin: StandIn, tmp_path: Path) -> None:
    for name in ("a", "b"):
        source(tmp_path / "models", name)
    plan = plan_of([planned("a"), planned("b")])
    agent = make_agent(tmp_path, standin.url, plan)
    assert fill_once(agent, plan, lambda status: None) == 0
    standin.lora = (200, listing(entry(tmp_path, "a")))
    report = agent.step()
    replicas = {"r0": Replica("r0", pod_ready=True, uid=UID)}
    state = {
        name: adapter_status(Wanted(name, "Shared", ("r0",), SHA[name]), replicas, {"r0": report})["state"]
        for name in ("a", "b")
    }
    assert state == {"a": "Loaded", "b": "Pending"}


def test_the_plan_chooses_the_engine_api(standin: StandIn, tmp_path: Path) -> None:
    """The same agent asks SGLang's /v1/models under an sglang plan, and never under a llamacpp one."""
    source(tmp_path / "models", "a")
    current: list[ServingPlan | None] = [plan_of([planned("a")], engine="sglang")]
    agent = Agent(
        replica="r0",
        engine=Engine(standin.url),
        plan=lambda: current[0],
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
    )
    agent.step()
    assert ("GET", "/v1/models") in standin.seen
    standin.seen.clear()
    current[0] = plan_of([planned("a")])
    standin.lora = (200, listing(str(tmp_path / "cache" / SHA["a"] / GGUF_ADAPTER_FILE)))
    assert agent.step()["adapters"] == ["a"]
    # Without a plan (the ConfigMap being recreated) it keeps to the last plan's engine.
    current[0] = None
    assert agent.step()["engineUp"] is True
    assert {path for _, path in standin.seen} == {"/health", "/lora-adapters"}


def test_a_server_that_does_not_answer_is_down() -> None:
    with pytest.raises(EngineDown):
        LlamaServer("http://127.0.0.1:9").adapter_files()


def test_once_fails_naming_the_adapter_without_its_gguf_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source(tmp_path / "models", "a")
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("a"), planned("nogguf")])
    agent = make_agent(tmp_path, "http://127.0.0.1:9", plan)
    written: list[dict[str, Any]] = []
    assert fill_once(agent, plan, written.append) == 1
    ((report,),) = [w["engines"] for w in written]
    assert report["engineUp"] is False
    assert report["errors"] == [
        {"name": "nogguf", "reason": "Unavailable", "message": NO_GGUF, "sha256": SHA["nogguf"]}
    ]
    assert "adapter.gguf" in NO_GGUF
    assert json.loads(capsys.readouterr().err)["event"] == "unavailable"
    # The good one is in the cache, GGUF file included.
    assert (tmp_path / "cache" / SHA["a"] / GGUF_ADAPTER_FILE).read_bytes() == b"GGUFa"


def test_an_adapter_planned_without_a_digest_is_reported_with_the_one_its_files_have(tmp_path: Path) -> None:
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("nogguf", sha=False)])
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "", plan), plan, written.append) == 1
    assert [e["sha256"] for e in written[0]["engines"][0]["errors"]] == [SHA["nogguf"]]


def test_once_for_sglang_needs_no_gguf_file(tmp_path: Path) -> None:
    source(tmp_path / "models", "nogguf", gguf=False)
    plan = plan_of([planned("nogguf")], engine="sglang")
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "http://127.0.0.1:9", plan), plan, written.append) == 0
    assert written == []


def test_once_adds_the_gguf_file_to_an_entry_cached_without_it(tmp_path: Path) -> None:
    """An entry an SGLang server's agent cached from a source without the GGUF file: a later source
    of the same weights that carries it completes the entry, and the files there stay as they were."""
    models = tmp_path / "models"
    first = source(models, "a", gguf=False)
    sglang = plan_of([planned("a")], "sglang")
    assert fill_once(make_agent(tmp_path, "", sglang), sglang, print) == 0
    cached = tmp_path / "cache" / SHA["a"]
    before = (cached / "adapter_model.safetensors").stat().st_ino
    plan = plan_of([planned("a")])
    written: list[dict[str, Any]] = []
    assert fill_once(make_agent(tmp_path, "", plan), plan, written.append) == 1
    (first / GGUF_ADAPTER_FILE).write_bytes(b"GGUFa")
    assert fill_once(make_agent(tmp_path, "", plan), plan, written.append) == 0
    assert (cached / GGUF_ADAPTER_FILE).read_bytes() == b"GGUFa"
    assert (cached / "adapter_model.safetensors").stat().st_ino == before
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [SHA["a"]]


def test_once_without_a_plan_has_nothing_to_fetch(tmp_path: Path) -> None:
    assert fill_once(make_agent(tmp_path, "", None), None, print) == 0
