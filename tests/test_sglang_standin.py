"""The SGLang stand-in of the e2e tests answers as SGLang's HTTP server does (REFERENCE.md,
gpu/SGLANG.md, e2e/gpu/serve/RESULTS.md: what a real sglang 0.5.16 answered) and really generates:
a tiny Llama and PEFT adapters are built here in the training environment, the stand-in serves them
on a free port of 127.0.0.1, and what it generates is compared with plain transformers+peft. The
client is the standard library's: a router speaks plain HTTP too."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.engines import sglang_standin

from kimi_operator.api.serving import AdapterFiles, PlannedAdapter, ReplicaPlan, ServingPlan
from kimi_operator.workloads.serve import engine as serve_engine
from kimi_operator.workloads.serve.agent import Agent
from tests.processes import free_port, stop, wait_until

ENGINES = Path(__file__).parents[1] / "e2e" / "engines"
STANDIN, TINY = ENGINES / "sglang_standin.py", ENGINES / "tiny_lora.py"
SERVED = "tiny-kimi"
PROMPT = "the capital of france is"
TOKENS = 12
# Generation is greedy everywhere, so answers are comparable token for token.
GREEDY = {"temperature": 0, "max_tokens": TOKENS}
KT_DYNAMIC_REFUSED = "Dynamic LoRA loading is disabled because KT expert LoRA is statically paired"
NEVER_LOADED = "Got LoRA adapter that has never been loaded: nope\nAll loaded adapters: dict_keys("
STARTUP_S = 120.0
# What the operator sets in the engine pods (a real SGLang has no /ready): /health does not generate.
CHEAP_HEALTH = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false"}
# SGLang looks whether a client left after each wait this long (4 s by default) without an output for it.
LOOK_S = 1

Refs = dict[str, dict[str, Any]]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    base = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return {**os.environ, **base, **(extra or {})}


@dataclasses.dataclass
class Answer:
    status: int
    raw: bytes
    content_type: str | None

    def json(self) -> Any:
        return json.loads(self.raw)

    def events(self) -> list[str]:
        """The data of each server-sent event, in order."""
        return [line.removeprefix("data: ") for line in self.raw.decode().splitlines() if line.startswith("data: ")]


@dataclasses.dataclass
class Engine:
    """A running stand-in."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    seen: list[int] = dataclasses.field(default_factory=list)
    warm_up: dict[str, Any] = dataclasses.field(default_factory=dict)

    def call(self, method: str, path: str, body: Any = None, *, timeout: float = 120) -> Answer:
        """The answer; TimeoutError when none came within ``timeout`` (the client then leaves)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return Answer(response.status, response.read(), response.getheader("Content-Type"))
        finally:
            conn.close()

    def get(self, path: str) -> Answer:
        return self.call("GET", path)

    def post(self, path: str, body: Any, *, timeout: float = 120) -> Answer:
        return self.call("POST", path, body, timeout=timeout)

    def complete(self, model: str, *, timeout: float = 120, **extra: Any) -> Answer:
        return self.post("/v1/completions", {"model": model, "prompt": PROMPT, **GREEDY, **extra}, timeout=timeout)

    def text(self, model: str, **extra: Any) -> str:
        answer = self.complete(model, **extra)
        assert answer.status == 200, answer.raw
        return str(answer.json()["choices"][0]["text"])

    def cards(self) -> dict[str, dict[str, Any]]:
        return {card["id"]: card for card in self.get("/v1/models").json()["data"]}

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_healthy(self) -> None:
        """Polls /health until it is 200, recording what it answered once the port was open."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the stand-in exited {self.proc.returncode}:\n{self.output()}"
            with contextlib.suppress(OSError):
                self.seen.append(self.get("/health").status)
                if self.seen[-1] == 200:
                    return
            time.sleep(0.05)
        pytest.fail(f"the stand-in was not healthy within {STARTUP_S} s:\n{self.output()}")


def launch(python: str, logs: Path, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> Engine:
    port, log = free_port(), logs / f"{name}.log"
    command = [python, str(STANDIN), "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env(extra_env))
    return Engine(proc, port, log)


@pytest.fixture(scope="session")
def tiny(train_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model, its adapters, and transformers+peft's greedy continuations of PROMPT (references.json)."""
    out = tmp_path_factory.mktemp("tiny-lora")
    command = [train_python, str(TINY), str(out), "--adapters", "4", "--reference-prompt", PROMPT]
    proc = subprocess.run(
        [*command, "--max-tokens", str(TOKENS)], capture_output=True, text=True, env=env(), check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def adapter(tiny: Path, name: str) -> str:
    return str(tiny / "adapters" / name)


@pytest.fixture(scope="session")
def completions(tiny: Path) -> Refs:
    """transformers+peft's continuations of PROMPT, by ``base`` or adapter directory name."""
    found: Refs = json.loads((tiny / "references.json").read_text())["completion"]
    return found


@pytest.fixture(scope="session")
def chats(tiny: Path) -> Refs:
    """The same, of PROMPT as a user turn under the chat template."""
    found: Refs = json.loads((tiny / "references.json").read_text())["chat"]
    return found


def shared_args(tiny: Path) -> list[str]:
    """A shared replica as the operator renders one: the pool declared at start (here with one adapter
    in it), and sglang-kt's flags, which the stand-in accepts without using them. Its warm-up is
    stretched so that /health is seen answering 503."""
    return [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED, "--enable-lora"),
        *("--lora-paths", f"a0={adapter(tiny, 'a0')}", "--max-lora-rank", "16"),
        *("--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "--lora-backend", "csgmv"),
        *("--max-loras-per-batch", "4", "--max-loaded-loras", "8", "--enable-metrics", "--trust-remote-code"),
        *("--kt-method", "AMXINT4", "--kt-cpuinfer", "2", "--tool-call-parser", "kimi_k2", "--tp", "1"),
        *("--standin-startup-delay", "1"),
    ]


def agent_args(tiny: Path) -> list[str]:
    """A shared replica started without adapters, for an adapter agent of its own."""
    return [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED, "--enable-lora"),
        *("--max-lora-rank", "16", "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj"),
        *("--max-loaded-loras", "8", "--enable-metrics"),
    ]


def small_args(tiny: Path) -> list[str]:
    """Two slots, two adapters in memory at most (and the benchmarks' per-token delay and replay)."""
    return [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED),
        *("--lora-paths", json.dumps({"lora_name": "a0", "lora_path": adapter(tiny, "a0"), "pinned": False})),
        *("--max-loras-per-batch", "2", "--max-loaded-loras", "2", "--standin-token-delay", "0.001"),
        "--standin-batched",
    ]


def expert_args(tiny: Path) -> list[str]:
    """A dedicated replica as the operator renders one for an expert adapter."""
    return [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED, "--enable-lora"),
        *("--lora-paths", f"kt={adapter(tiny, 'expert')}", "--max-lora-rank", "16", "--max-loras-per-batch", "2"),
        *("--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj"),
        *("--disable-cuda-graph", "--pp-size", "1", "--kt-num-gpu-experts", "0", "--max-running-requests", "4"),
    ]


def wedge_args(tiny: Path) -> list[str]:
    """A replica to wedge with an abandoned request (its adapter updates hang for good after that):
    a warm-up long enough to send requests during it, and tokens slow enough to leave one running."""
    return [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED, "--enable-lora"),
        *("--lora-paths", f"a0={adapter(tiny, 'a0')}", f"a1={adapter(tiny, 'a1')}", "--max-lora-rank", "16"),
        *("--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "--enable-metrics"),
        *("--standin-startup-delay", "5", "--standin-token-delay", "0.005"),
    ]


def during_warm_up(engine: Engine) -> dict[str, Any]:
    """As soon as the port is open (the warm-up running): a request for a1 that waits for its answer,
    and one for a0 whose client gives up after a second; then /health until it is 200."""
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert engine.proc.poll() is None, f"the stand-in exited {engine.proc.returncode}:\n{engine.output()}"
        assert time.monotonic() < deadline, f"the port did not open within {STARTUP_S} s:\n{engine.output()}"
        with contextlib.suppress(OSError):
            seen: dict[str, Any] = {"models": engine.get("/v1/models").status}
            break
        time.sleep(0.05)
    seen["health"] = engine.get("/health").status
    held: dict[str, Any] = {"sent": time.monotonic()}

    def wait_for_answer() -> None:
        answer = engine.complete(f"{SERVED}:a1")
        held.update(answered=time.monotonic(), status=answer.status, body=answer.json())

    waiting = threading.Thread(target=wait_for_answer, daemon=True)
    waiting.start()
    try:
        engine.complete(f"{SERVED}:a0", timeout=1, max_tokens=2000, ignore_eos=True)
        seen["abandoned"] = "answered"
    except TimeoutError:
        seen["abandoned"] = "left"
    while (health := engine.get("/health").status) != 200:
        assert health == 503
        seen["unhealthy_until"] = time.monotonic()
        time.sleep(0.05)
    waiting.join(60)
    return seen | {"held": held}


@pytest.fixture(scope="session")
def engines(train_python: str, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    """The stand-ins of these tests, started side by side (each spends seconds importing torch)."""
    logs = tmp_path_factory.mktemp("logs")
    wedge_env = CHEAP_HEALTH | {"SGLANG_REQUEST_STATE_WAIT_TIMEOUT": str(LOOK_S)}
    started = {
        "shared": launch(train_python, logs, "shared", shared_args(tiny), CHEAP_HEALTH),
        "small": launch(train_python, logs, "small", small_args(tiny)),
        "expert": launch(train_python, logs, "expert", expert_args(tiny)),
        "wedge": launch(train_python, logs, "wedge", wedge_args(tiny), wedge_env),
        "agent": launch(train_python, logs, "agent", agent_args(tiny), CHEAP_HEALTH),
    }
    wedge = started["wedge"]

    def observe() -> None:
        try:
            wedge.warm_up.update(during_warm_up(wedge))
        except Exception as exc:  # the warm-up's test reports it
            wedge.warm_up["error"] = f"{exc!r}\n{wedge.output()}"

    # The others' warm-ups are watched meanwhile: they are shorter.
    observing = threading.Thread(target=observe, daemon=True)
    observing.start()
    try:
        for engine in started.values():
            if engine is wedge:
                observing.join(STARTUP_S)
            engine.wait_healthy()
        yield started
    finally:
        for engine in started.values():
            stop(engine.proc)


@pytest.fixture
def standin(engines: dict[str, Engine]) -> Engine:
    return engines["shared"]


def test_health_is_503_during_the_warm_up_then_200(standin: Engine) -> None:
    assert standin.seen[0] == 503
    assert standin.seen[-1] == 200
    assert standin.get("/health").raw == b""
    began = time.monotonic()
    health = standin.get("/health_generate")
    # It generates, and looks once a second whether a token came.
    assert (health.status, health.raw, health.content_type) == (200, b"", None)
    assert time.monotonic() - began >= 1.0
    ready = standin.get("/ready")
    assert (ready.status, ready.json()) == (404, {"detail": "Not Found"})


def test_requests_sent_during_the_warm_up_wait_for_its_end(engines: dict[str, Engine], completions: Refs) -> None:
    """As sglang 0.5.16 did (RESULTS.md, "The router against the real engine"): while /health is 503,
    /v1/models answers, and a generation request is held until the warm-up is over, then answered."""
    seen = engines["wedge"].warm_up
    assert "error" not in seen, seen["error"]
    assert (seen["models"], seen["health"]) == (200, 503)
    held = seen["held"]
    assert held["status"] == 200, held
    assert held["body"]["choices"][0]["text"] == completions["a1"]["text"]
    assert held["answered"] > seen["unhealthy_until"]
    assert held["answered"] - held["sent"] > 2  # the warm-up lasts 5 s from the port's opening
    assert seen["abandoned"] == "left"


def test_models_lists_the_base_then_each_adapter(standin: Engine, tiny: Path) -> None:
    listing = standin.get("/v1/models").json()
    assert listing["object"] == "list"
    base, cards = listing["data"][0], {card["id"]: card for card in listing["data"][1:]}
    expected = {"id": SERVED, "object": "model", "owned_by": "sglang", "root": SERVED, "parent": None}
    assert base.items() >= (expected | {"max_model_len": 2048}).items()
    assert cards["a0"].items() >= {"root": adapter(tiny, "a0"), "parent": SERVED, "max_model_len": None}.items()
    assert standin.get(f"/v1/models/{SERVED}").json()["id"] == SERVED
    missing = standin.get("/v1/models/a0")
    assert missing.status == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_load_adds_a_card_and_a_second_load_of_the_name_is_refused(standin: Engine, tiny: Path) -> None:
    loaded = standin.post("/load_lora_adapter", {"lora_name": "t-load", "lora_path": adapter(tiny, "a2")})
    assert loaded.status == 200, loaded.raw
    body = loaded.json()
    assert body == body | {"success": True, "error_message": "", "rid": None, "http_worker_ipc": None}
    assert body["loaded_adapters"]["t-load"] == adapter(tiny, "a2")
    assert standin.cards()["t-load"]["parent"] == SERVED
    again = standin.post("/load_lora_adapter", {"lora_name": "t-load", "lora_path": adapter(tiny, "a3")})
    assert again.status == 400
    assert again.json()["success"] is False
    assert again.json()["error_message"] == "Failed to load LoRA adapter t-load because it is already loaded"
    assert standin.cards()["t-load"]["root"] == adapter(tiny, "a2")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("wrong-rank", "LoRA adapter bad-wrong-rank with rank 32 is incompatible with the current LoRA memory pool"),
        ("corrupt", "Error while deserializing header: incomplete metadata, file not fully covered"),
        ("dora", "Failed to load bad-dora because LoRA serving currently doesn't support DoRA adapters"),
        ("no-config", "No such file or directory"),
        ("missing-dir", "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
        # Its expert modules are no part of the pool (the stand-in refuses expert LoRA at run time anyway).
        ("expert", "LoRA adapter bad-expert with rank 8 is incompatible"),
    ],
    ids=["wrong-rank", "corrupt", "dora", "no-config", "missing-dir", "expert"],
)
def test_adapters_sglang_cannot_load_are_refused(
    standin: Engine, tiny: Path, tmp_path: Path, name: str, message: str
) -> None:
    path = adapter(tiny, name)
    if name == "no-config":
        path = str(shutil.copytree(adapter(tiny, "a0"), tmp_path / "no-config"))
        (tmp_path / "no-config" / "adapter_config.json").unlink()
    refused = standin.post("/load_lora_adapter", {"lora_name": f"bad-{name}", "lora_path": path})
    assert refused.status == 400
    body = refused.json()
    assert body["success"] is False
    assert message in body["error_message"]
    assert "a0" in body["loaded_adapters"]
    assert f"bad-{name}" not in body["loaded_adapters"]
    assert f"bad-{name}" not in standin.cards()


def test_a_load_without_a_path_is_a_bad_request(standin: Engine) -> None:
    refused = standin.post("/load_lora_adapter", {"lora_name": "no-path"})
    assert refused.status == 400
    assert refused.json() == refused.json() | {"object": "error", "type": "Bad Request", "param": None, "code": 400}
    assert "Field required" in refused.json()["message"]


def test_adapters_generate_what_peft_generates(standin: Engine, tiny: Path, completions: Refs, chats: Refs) -> None:
    assert standin.text(SERVED) == completions["base"]["text"]
    # The base part of "base:adapter" is not checked.
    assert standin.text(f"{SERVED}:a0") == standin.text("whatever:a0") == completions["a0"]["text"]
    loaded = standin.post("/load_lora_adapter", {"lora_name": "t-a1", "lora_path": adapter(tiny, "a1")})
    assert loaded.status == 200, loaded.raw
    answer = standin.complete(f"{SERVED}:t-a1").json()
    assert answer["choices"][0]["text"] == completions["a1"]["text"]
    assert answer["model"] == f"{SERVED}:t-a1"
    assert answer["object"] == "text_completion"
    prompt_tokens = len(completions["a1"]["prompt_ids"])
    counted = {"prompt_tokens": prompt_tokens, "completion_tokens": TOKENS, "total_tokens": prompt_tokens + TOKENS}
    assert answer["usage"].items() >= counted.items()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert len({completions[name]["text"] for name in ("base", "a0", "a1")}) == 3
    chat = standin.post(
        "/v1/chat/completions",
        {"model": f"{SERVED}:t-a1", "messages": [{"role": "user", "content": PROMPT}], **GREEDY},
    )
    assert chat.status == 200, chat.raw
    assert chat.json()["choices"][0]["message"]["content"] == chats["a1"]["text"]
    assert chat.json()["object"] == "chat.completion"
    assert re.fullmatch("[0-9a-f]{32}", chat.json()["id"])


def test_a_batched_engine_replays_each_greedy_answer_as_generated(
    engines: dict[str, Engine], completions: Refs
) -> None:
    """The benchmarks' engines answer a repeated greedy request from the first answer: the same text,
    per adapter, as transformers+peft, streamed or not."""
    small = engines["small"]
    replayed = small.log.read_text().count("Replaying a greedy answer")
    for _ in range(3):
        assert small.text(SERVED) == completions["base"]["text"]
        assert small.text(f"{SERVED}:a0") == completions["a0"]["text"]
    streamed = small.post("/v1/completions", {"model": f"{SERVED}:a0", "prompt": PROMPT, "stream": True, **GREEDY})
    assert streamed.status == 200, streamed.raw
    events = [json.loads(data) for data in streamed.events() if data != "[DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == completions["a0"]["text"]
    assert len(events) == TOKENS
    # The first of each (base, a0) may have been generated by this test; the others were replayed.
    assert small.log.read_text().count("Replaying a greedy answer") - replayed >= 5


def test_a_bare_adapter_name_runs_the_base_model(standin: Engine) -> None:
    bare = standin.complete("a0").json()
    assert bare["model"] == "a0"
    assert bare["choices"][0]["text"] == standin.text(SERVED)


def test_the_lora_path_field_selects_the_adapter(standin: Engine) -> None:
    assert standin.text(SERVED, lora_path="a0") == standin.text(f"{SERVED}:a0") != standin.text(SERVED)


def test_native_generate_takes_the_adapter_name(standin: Engine, completions: Refs) -> None:
    request = {
        "input_ids": completions["a0"]["prompt_ids"],
        "sampling_params": {"max_new_tokens": TOKENS, "temperature": 0},
        "lora_path": "a0",
        "return_logprob": True,
    }
    answer = standin.post("/generate", request)
    assert answer.status == 200, answer.raw
    body = answer.json()
    assert body["output_ids"] == completions["a0"]["ids"]
    assert [token for _, token, _ in body["meta_info"]["output_token_logprobs"]] == completions["a0"]["ids"]
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": TOKENS}


def test_an_adapter_never_loaded_is_a_400_with_sglangs_message(standin: Engine) -> None:
    refused = standin.complete(f"{SERVED}:nope")
    assert refused.status == 400
    body = refused.json()
    assert body == body | {"object": "error", "type": "BadRequestError", "param": None, "code": 400}
    assert body["message"].startswith(NEVER_LOADED)
    assert "'a0'" in body["message"]
    # Streamed, the same 400 comes before any event.
    streamed = standin.post(
        "/v1/chat/completions",
        {"model": f"{SERVED}:nope", "messages": [{"role": "user", "content": PROMPT}], "stream": True},
    )
    assert (streamed.status, streamed.content_type) == (400, "application/json")
    assert streamed.json()["message"].startswith(NEVER_LOADED)


def test_unload_hides_the_card_but_a_request_reloads_the_adapter(standin: Engine, tiny: Path) -> None:
    loaded = standin.post("/load_lora_adapter", {"lora_name": "t-unload", "lora_path": adapter(tiny, "a1")})
    assert loaded.status == 200, loaded.raw
    before = standin.text(f"{SERVED}:t-unload")
    unloaded = standin.post("/unload_lora_adapter", {"lora_name": "t-unload"})
    assert unloaded.status == 200
    assert unloaded.json()["success"] is True
    assert "t-unload" not in unloaded.json()["loaded_adapters"]
    assert "t-unload" not in standin.cards()
    # SGLang remembers every name it ever loaded: the request reloads it, and its card is back, last.
    assert standin.text(f"{SERVED}:t-unload") == before
    assert list(standin.cards())[-1] == "t-unload"
    missing = standin.post("/unload_lora_adapter", {"lora_name": "never"})
    assert missing.status == 400
    assert missing.json()["loaded_adapters"] is None
    assert missing.json()["error_message"].startswith("LoRA with name never does not exist. Loaded LoRAs: odict_keys([")


def test_chat_streams_as_sglang_does(standin: Engine) -> None:
    request = {"model": f"{SERVED}:a0", "messages": [{"role": "user", "content": PROMPT}], **GREEDY}
    whole = standin.post("/v1/chat/completions", request).json()
    streamed = standin.post(
        "/v1/chat/completions", request | {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert (streamed.status, streamed.content_type) == (200, "text/event-stream; charset=utf-8")
    events = streamed.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    first, *content, finish, last = chunks
    for chunk in [first, *content, finish]:
        assert list(chunk) == ["id", "object", "created", "model", "choices"]
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == f"{SERVED}:a0"
        assert re.fullmatch("[0-9a-f]{32}", chunk["id"])
    assert first["choices"][0]["delta"] == {"reasoning_content": None, "role": "assistant", "content": ""}
    assert all(list(chunk["choices"][0]["delta"]) == ["reasoning_content", "content"] for chunk in content)
    assert (
        "".join(chunk["choices"][0]["delta"]["content"] for chunk in content)
        == (whole["choices"][0]["message"]["content"])
    )
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in [first, *content])
    assert (
        finish["choices"][0] | {"delta": {"reasoning_content": None}, "finish_reason": "length"}
        == (finish["choices"][0])
    )
    assert last["choices"] == []
    assert last["usage"] == whole["usage"]


@pytest.mark.parametrize("model", [SERVED, f"{SERVED}:a0"], ids=["base", "adapter"])
def test_completions_stream_a_chunk_per_token_each_with_usage_null(
    standin: Engine, completions: Refs, model: str
) -> None:
    """As sglang 0.5.16 streams completions: a chunk for every token (text or not), each with
    ``"usage": null`` whether usage was asked or not; the usage alone after them when it was."""
    request = {"model": model, "prompt": PROMPT, **GREEDY, "ignore_eos": True}
    whole = standin.post("/v1/completions", request).json()
    if model == SERVED:
        # The tiny base model's continuation starts with bytes that make no character: they go out as
        # "" chunks, then as replacement characters with the first token that ends cleanly.
        assert completions["base"]["text"].startswith("\ufffd")
        assert whole["choices"][0]["text"] == completions["base"]["text"]
    for options in ({}, {"stream_options": {"include_usage": True}}):
        streamed = standin.post("/v1/completions", request | {"stream": True} | options)
        assert (streamed.status, streamed.content_type) == (200, "text/event-stream; charset=utf-8")
        events = streamed.events()
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        tokens = [chunk for chunk in chunks if chunk["choices"]]
        assert len(tokens) == TOKENS, options
        for chunk in tokens:
            assert list(chunk) == ["id", "object", "created", "model", "choices", "usage"]
            assert chunk["usage"] is None
            assert list(chunk["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "matched_stop"]
            assert (chunk["object"], chunk["model"]) == ("text_completion", model)
            assert chunk["id"] == tokens[0]["id"]
        assert re.fullmatch("[0-9a-f]{32}", tokens[0]["id"])
        assert [chunk["choices"][0]["finish_reason"] for chunk in tokens] == [None] * (TOKENS - 1) + ["length"]
        texts = [chunk["choices"][0]["text"] for chunk in tokens]
        assert "".join(texts) == whole["choices"][0]["text"]
        if model == SERVED:
            assert texts[0] == ""
            assert next(text for text in texts if text).startswith("\ufffd")
        if not options:
            assert chunks == tokens
            continue
        (last,) = chunks[len(tokens) :]
        assert last["choices"] == []
        assert last["usage"] == {
            "prompt_tokens": whole["usage"]["prompt_tokens"],
            "total_tokens": whole["usage"]["total_tokens"],
            "completion_tokens": TOKENS,
            "reasoning_tokens": 0,
        }
        assert list(last["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens", "reasoning_tokens"]


def test_streamed_text_is_released_as_sglangs_detokenizer_releases_it() -> None:
    """SGLang's incremental detokenizer, on bytes: the texts of the tokens of the real engine's
    completion stream (RESULTS.md): bytes that make no character yet go out as "", and as replacement
    characters once a later token ends cleanly (or at the end)."""
    pieces = {1: b"The", 2: b" capital", 3: b"llo", 4: b"\xff", 5: b"\xfe", 6: b"query", 7: b"\xe4"}
    pieces |= {8: b" is \xe4", 9: b"\xbd\xa0", 10: b"</s>"}

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode(errors="replace")

    def feed(detokenizer: Any, ids: list[int], finish: dict[str, Any]) -> list[str]:
        return [detokenizer.feed([i], None) for i in ids[:-1]] + [detokenizer.feed(ids[-1:], finish)]

    length = {"type": "length", "length": 8}
    released = feed(sglang_standin.Detokenizer(decode, [1, 2]), [3, 3, 4, 5, 6, 3, 3, 7], length)
    assert released == ["llo", "llo", "", "", "\ufffd\ufffdquery", "llo", "llo", "\ufffd"]
    # Half a character: the text up to the last space goes out, the rest once the character is whole.
    assert feed(sglang_standin.Detokenizer(decode, [1]), [3, 8, 9, 6], length) == ["llo", " is ", "\u4f60", "query"]
    # A matched stop token is cut, and so is a matched stop string (what was sent stays sent).
    assert feed(sglang_standin.Detokenizer(decode, [1]), [3, 6, 10], {"type": "stop", "matched": 10}) == [
        "llo",
        "query",
        "",
    ]
    assert feed(sglang_standin.Detokenizer(decode, [1]), [3, 6, 3], {"type": "stop", "matched": "query"}) == [
        "llo",
        "query",
        "",
    ]


def test_a_client_gone_mid_stream_frees_its_adapter(standin: Engine, tiny: Path) -> None:
    assert standin.post("/load_lora_adapter", {"lora_name": "t-gone", "lora_path": adapter(tiny, "a3")}).status == 200
    request = {"model": f"{SERVED}:t-gone", "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(request), headers={"Content-Type": "application/json"})
    assert conn.getresponse().read(6) == b"data: "
    conn.close()
    # Unload waits for the adapter's requests: it answers once the stand-in has stopped generating.
    began = time.monotonic()
    assert standin.post("/unload_lora_adapter", {"lora_name": "t-gone"}).status == 200
    assert time.monotonic() - began < 20


def test_an_unload_waiting_for_requests_still_generating_is_not_taken_for_a_stuck_engine(
    standin: Engine, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter agent's bound on an unload: past it, an engine still generating is waiting for
    those requests (an unload waits for them), not stuck; only one generating nothing is."""
    assert standin.post("/load_lora_adapter", {"lora_name": "t-busy", "lora_path": adapter(tiny, "a3")}).status == 200
    request = {"model": f"{SERVED}:t-busy", "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(request), headers={"Content-Type": "application/json"})
    assert conn.getresponse().read(6) == b"data: "
    monkeypatch.setattr(serve_engine, "UNLOAD_TIMEOUT", 1.0)
    try:
        answer = serve_engine.Engine(f"http://127.0.0.1:{standin.port}").unload("t-busy")
    finally:
        conn.close()
    assert (answer.ok, answer.timed_out, answer.stuck) == (False, True, False)
    assert answer.message.endswith("gave no answer in 1 s, 1 requests running"), answer.message
    # The stream gone, the unload that waited for it goes through.
    wait_until(lambda: "t-busy" not in standin.cards(), 30, "t-busy unloaded")


def stream_and_leave(engine: Engine, body: dict[str, Any], events: int) -> None:
    """A stream whose client reads ``events`` events, then closes the connection."""
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response, seen = conn.getresponse(), b""
    while seen.count(b"\n\n") < events:
        piece = response.read1(65536)
        assert piece, seen
        seen += piece
    conn.close()


def plan_of(*adapters: PlannedAdapter) -> ServingPlan:
    """A serving plan placing ``adapters`` on the one replica r0."""
    return ServingPlan(
        served_model_name=SERVED, generation=1, replicas=[ReplicaPlan(replica="r0", adapters=list(adapters))]
    )


def agent_for(engine: Engine, plan: Callable[[], ServingPlan], tiny: Path, tmp_path: Path) -> Agent:
    """Replica r0's adapter agent in front of ``engine``, its node adapters those of ``tiny``."""
    return Agent(
        replica="r0",
        engine=serve_engine.Engine(f"http://127.0.0.1:{engine.port}"),
        plan=plan,
        models_dir=tiny / "adapters",
        cache_dir=tmp_path / "cache",
    )


def test_an_abandoned_non_streamed_request_keeps_its_adapter_from_ever_unloading(
    engines: dict[str, Engine], tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sglang 0.5.16's leak (RESULTS.md, "The real engine against what the router assumes"): a
    non-streamed request whose client leaves is aborted without its adapter's count of requests
    going down, so the adapter's unload waits for good, holding the lock that every later load,
    unload and implicit reload waits on; generation with loaded adapters and /health go on. A stream
    abandoned while it runs is released. The engine also needs killing: a SIGTERM waits for the
    requests in flight, and one waits behind the hung unload."""
    wedge = engines["wedge"]
    for name in ("a2", "a3"):
        loaded = wedge.post("/load_lora_adapter", {"lora_name": name, "lora_path": adapter(tiny, name)})
        assert loaded.status == 200, loaded.raw
    long = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    stream_and_leave(wedge, long | {"model": f"{SERVED}:a3", "stream": True}, events=3)
    unloaded = wedge.post("/unload_lora_adapter", {"lora_name": "a3"}, timeout=20)
    assert (unloaded.status, unloaded.json()["success"]) == (200, True)
    with pytest.raises(TimeoutError):
        wedge.post("/v1/completions", long | {"model": f"{SERVED}:a2"}, timeout=0.5)
    # The stand-in looks every LOOK_S seconds (SGLang every 4): it finds the client gone and stops.
    running = re.compile(r"^sglang:num_running_reqs\{[^}]*\} 0\.0$", re.MULTILINE)
    wait_until(lambda: bool(running.search(wedge.get("/metrics").raw.decode())), 20, "the generation stopped")
    assert "but the state was deleted in TokenizerManager" in wedge.output()
    # Three requests aborted: a0 (during the warm-up), the a3 stream and the a2 request.
    labels = f'engine_type="unified",model_name="{SERVED}"'
    assert f"sglang:num_aborted_requests_total{{{labels}}} 3.0" in wedge.get("/metrics").raw.decode()
    assert wedge.complete(f"{SERVED}:a1").status == 200
    assert wedge.get("/health").status == 200
    # The unload of a2 never answers: only the client's own timeout ends its wait.
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        wedge.post("/unload_lora_adapter", {"lora_name": "a2"}, timeout=3)
    assert time.monotonic() - began >= 3
    assert "a2" not in wedge.cards()  # no longer listed, as SGLang lists it meanwhile
    # Everything that needs the LoRA lock waits behind it: a load, the unload of a0 (abandoned during
    # the warm-up: leaked too, but here it cannot be told apart), a request that reloads a3.
    with pytest.raises(TimeoutError):
        wedge.post("/load_lora_adapter", {"lora_name": "later", "lora_path": adapter(tiny, "a3")}, timeout=1.5)
    with pytest.raises(TimeoutError):
        wedge.post("/unload_lora_adapter", {"lora_name": "a0"}, timeout=1.5)
    with pytest.raises(TimeoutError):
        wedge.complete(f"{SERVED}:a3", timeout=1.5)
    # Loaded adapters still generate, and /health is still 200.
    assert wedge.complete(f"{SERVED}:a0").status == 200
    assert wedge.get("/health").status == 200

    # The adapter agent in front of such an engine: its first unload gets no answer within its bound,
    # it sends nothing more, and every adapter planned here and not listed is reported stuck.
    monkeypatch.setattr(serve_engine, "UNLOAD_TIMEOUT", 2.0)
    plan = plan_of(PlannedAdapter(name="later", files=AdapterFiles(kind="node", path="a1")))
    agent = agent_for(wedge, lambda: plan, tiny, tmp_path)
    report = agent.step()
    assert report["engineUp"] is True
    (error,) = report["errors"]
    assert (error["name"], error["reason"]) == ("later", "EngineStuck")
    assert "gave no answer in 2 s" in error["message"]
    assert "restart this replica's pod" in error["message"]
    began = time.monotonic()
    assert agent.step()["errors"] == [error]
    assert time.monotonic() - began < 2.0  # no update sent: it would have waited its bound again
    wedge.proc.terminate()
    with pytest.raises(subprocess.TimeoutExpired):
        wedge.proc.wait(timeout=3)
    assert "Gracefully exiting... Remaining number of requests 1." in wedge.output()
    wedge.proc.kill()
    wedge.proc.wait()
    # Gone: reported as down, not stuck; its restart gets every update again.
    down = agent.step()
    assert (down["engineUp"], down["errors"], agent.stuck) == (False, [], None)


def test_freeze_gc_answers_as_sglang_does(engines: dict[str, Engine]) -> None:
    engine = engines["small"]
    for method in ("POST", "GET"):
        answer = engine.call(method, "/freeze_gc")
        assert (answer.status, answer.raw, answer.content_type) == (200, b"Garbage collection frozen.\n", None)
    assert "Freezing GC in Tokenizer Manager process. gen0: " in engine.log.read_text()
    # An engine without the endpoint (an older SGLang) is told apart from one not answering now.
    assert serve_engine.Engine(f"http://127.0.0.1:{engine.port}/older").freeze_gc() == 404
    assert serve_engine.Engine(f"http://127.0.0.1:{free_port()}").freeze_gc() is None


def test_the_agent_freezes_the_engines_heap_once_it_is_warm(
    engines: dict[str, Engine], tiny: Path, tmp_path: Path
) -> None:
    """SGLang's advice against the pauses of its garbage collector, which on a real engine held
    every request in flight about 0.4 s (e2e/gpu/serve/RESULTS.md): the agent freezes the engine's
    heap once its warm-up is over, and not again at later steps, loads included."""
    engine = engines["agent"]
    assert engine.get("/health").status == 200

    def freezes() -> int:
        return engine.log.read_text(errors="replace").count("Freezing GC in Tokenizer Manager process")

    plan = plan_of()
    agent = agent_for(engine, lambda: plan, tiny, tmp_path)
    assert freezes() == 0
    assert agent.step()["engineUp"] is True
    assert freezes() == 1
    agent.step()
    assert freezes() == 1
    plan = plan_of(PlannedAdapter(name="sql", files=AdapterFiles(kind="node", path="a1")))
    assert agent.step()["adapters"] == ["sql"]
    assert freezes() == 1


def test_metrics_carry_sglangs_names_and_labels(standin: Engine) -> None:
    assert standin.text(SERVED)
    metrics = standin.get("/metrics")
    assert (metrics.status, metrics.content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
    text = metrics.raw.decode()
    engine = f'engine_type="unified",model_name="{SERVED}",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
    for name in ("num_running_reqs", "num_queue_reqs", "token_usage", "gen_throughput", "lora_pool_utilization"):
        assert f"sglang:{name}{{{engine}}} " in text, name
    # Slots are those of the running requests: none at idle.
    assert f"sglang:lora_pool_slots_used{{{engine}}} 0.0" in text
    assert f"sglang:lora_pool_slots_total{{{engine}}} 4.0" in text
    request = f'engine_type="unified",model_name="{SERVED}"'
    for name in ("prompt_tokens_total", "generation_tokens_total", "num_requests_total"):
        assert f"sglang:{name}{{{request}}} " in text, name
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds"):
        assert f"# TYPE sglang:{name} histogram" in text
        assert f'sglang:{name}_bucket{{{request},le="+Inf"}} ' in text
    assert 'sglang:http_requests_total{endpoint="/v1/completions",method="POST"} ' in text
    assert not re.search(r"\{[^}]*(adapter|lora_name)=", text)  # no metric is per adapter


def test_a_small_pool_pins_and_evicts_as_sglang_does(engines: dict[str, Engine], tiny: Path, completions: Refs) -> None:
    small = engines["small"]
    pinned = {"lora_name": "p1", "lora_path": adapter(tiny, "a1"), "pinned": True}
    assert small.post("/load_lora_adapter", pinned).status == 200
    # One slot stays free for unpinned adapters and the base model.
    second = small.post("/load_lora_adapter", pinned | {"lora_name": "p2", "lora_path": adapter(tiny, "a2")})
    assert second.status == 400
    assert "It is not allowed to pin all slots" in second.json()["error_message"]
    # A third adapter is past --max-loaded-loras: the least recently used unpinned one (a0) goes.
    third = small.post("/load_lora_adapter", {"lora_name": "b", "lora_path": adapter(tiny, "a3")})
    assert third.status == 200, third.raw
    assert set(third.json()["loaded_adapters"]) == {"p1", "b"}
    assert list(small.cards()) == [SERVED, "p1", "b"]
    # The evicted adapter still answers (reloaded), and now b is the least recently used.
    assert small.text(f"{SERVED}:a0") == completions["a0"]["text"]
    assert list(small.cards()) == [SERVED, "p1", "a0"]


def test_an_expert_adapter_is_statically_paired(engines: dict[str, Engine], tiny: Path, completions: Refs) -> None:
    expert = engines["expert"]
    for path, body in [
        ("/load_lora_adapter", {"lora_name": "a1", "lora_path": adapter(tiny, "a1")}),
        ("/unload_lora_adapter", {"lora_name": "kt"}),
    ]:
        refused = expert.post(path, body)
        assert refused.status == 400
        assert refused.json()["success"] is False
        assert refused.json()["error_message"] == KT_DYNAMIC_REFUSED
    for model in (SERVED, "kt", f"{SERVED}:a0"):
        refused = expert.complete(model)
        assert refused.status == 400, model
        assert "statically paired" in refused.json()["message"]
    # Only the non-expert part applies to the tiny model, and it is a0's.
    assert expert.text(f"{SERVED}:kt") == completions["a0"]["text"]
    assert list(expert.cards()) == [SERVED, "kt"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-paths", "kt={expert}", "a1={a1}", "--disable-cuda-graph"], "KT expert LoRA is statically paired"),
        (["--lora-paths", "kt={expert}"], "CUDA graphs must be off (--disable-cuda-graph)"),
        (
            ["--enable-lora", "--max-lora-rank", "8"],
            "you need to specify both --max-lora-rank and --lora-target-modules",
        ),
        (["--lora-paths", "{a1}", "--max-loaded-loras", "1"], "max_loaded_loras (1) should be greater than or equal"),
        (["--lora-paths", "gone=/nonexistent"], "Failed to load LoRA adapter gone: Repo id must be in the form"),
    ],
    ids=["expert-not-alone", "expert-with-cuda-graphs", "empty-pool-undeclared", "max-loaded-too-small", "missing"],
)
def test_flags_sglang_refuses_stop_the_server_at_once(
    train_python: str, tiny: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    paths = {"expert": adapter(tiny, "expert"), "a1": adapter(tiny, "a1")}
    args = ["--model-path", str(tiny / "model"), *(flag.format(**paths) for flag in flags)]
    engine = launch(train_python, tmp_path, "refused", args)
    try:
        assert engine.proc.wait(timeout=STARTUP_S) != 0
    finally:
        stop(engine.proc)
    assert message in engine.output()
