"""The SGLang stand-in of the e2e tests answers as SGLang's HTTP server does (shared/gpu/SGLANG.md,
REFERENCE.md) and really generates: a tiny Llama and PEFT adapters are built here in the training
environment, the stand-in serves them on a free port of 127.0.0.1, and what it generates is compared
with plain transformers+peft. The client is the standard library's, as a router's would be plain HTTP."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ENGINES = Path(__file__).parents[1] / "e2e" / "engines"
STANDIN, TINY = ENGINES / "sglang_standin.py", ENGINES / "tiny_lora.py"
SERVED = "tiny-kimi"
PROMPT = "the capital of france is"
TOKENS = 12
# Generation is greedy everywhere, so answers are comparable token for token.
GREEDY = {"temperature": 0, "max_tokens": TOKENS}
NEVER_LOADED = "Got LoRA adapter that has never been loaded: nope\nAll loaded adapters: dict_keys("
STARTUP_S = 120.0


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Answer:
    status: int
    raw: bytes

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

    def call(self, method: str, path: str, body: Any = None) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return Answer(response.status, response.read())
        finally:
            conn.close()

    def get(self, path: str) -> Answer:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Answer:
        return self.call("POST", path, body)

    def complete(self, model: str, **extra: Any) -> Answer:
        return self.post("/v1/completions", {"model": model, "prompt": PROMPT, **GREEDY, **extra})

    def text(self, model: str, **extra: Any) -> str:
        answer = self.complete(model, **extra)
        assert answer.status == 200, answer.raw
        return str(answer.json()["choices"][0]["text"])

    def cards(self) -> dict[str, dict[str, Any]]:
        return {card["id"]: card for card in self.get("/v1/models").json()["data"]}

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_healthy(self) -> None:
        """Polls /ready and /health until healthy, recording what each answered on the way."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the stand-in exited {self.proc.returncode}:\n{self.output()}"
            with contextlib.suppress(OSError):
                self.seen.append(self.get("/ready").status)
                self.seen.append(self.get("/health").status)
                if self.seen[-1] == 200:
                    return
            time.sleep(0.05)
        pytest.fail(f"the stand-in was not healthy within {STARTUP_S} s:\n{self.output()}")


def launch(python: str, logs: Path, name: str, args: list[str]) -> Engine:
    port, log = free_port(), logs / f"{name}.log"
    command = [python, str(STANDIN), "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env())
    return Engine(proc, port, log)


def stop(engine: Engine) -> None:
    engine.proc.terminate()
    try:
        engine.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        engine.proc.kill()
        engine.proc.wait()


@contextlib.contextmanager
def running(python: str, logs: Path, name: str, args: list[str]) -> Iterator[Engine]:
    engine = launch(python, logs, name, args)
    try:
        engine.wait_healthy()
        yield engine
    finally:
        stop(engine)


@pytest.fixture(scope="session")
def tiny(train_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-lora")
    proc = subprocess.run(
        [train_python, str(TINY), str(out), "--adapters", "4"], capture_output=True, text=True, env=env(), check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def adapter(tiny: Path, name: str) -> str:
    return str(tiny / "adapters" / name)


@pytest.fixture(scope="session")
def references(train_python: str, tiny: Path) -> dict[str, dict[str, Any]]:
    """transformers+peft's greedy continuations, computed side by side."""
    model = str(tiny / "model")
    cases = {
        "base": [PROMPT],
        "a0": [adapter(tiny, "a0"), PROMPT],
        "a1": [adapter(tiny, "a1"), PROMPT],
        "chat-a1": [adapter(tiny, "a1"), PROMPT, "--chat"],
    }
    procs = {
        name: subprocess.Popen(
            [train_python, str(TINY), "reference", model, *args, "--max-tokens", str(TOKENS), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env(),
        )
        for name, args in cases.items()
    }
    found = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()[-4000:]
        found[name] = json.loads(stdout)
    return found


@pytest.fixture(scope="session")
def standin(train_python: str, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A shared replica as the operator renders it: an empty pool declared at start, plus one adapter,
    and sglang-kt flags the stand-in accepts without using them."""
    args = [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED, "--enable-lora"),
        *("--lora-paths", f"a0={adapter(tiny, 'a0')}", "--max-lora-rank", "16"),
        *("--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "--lora-backend", "csgmv"),
        *("--max-loras-per-batch", "4", "--max-loaded-loras", "8", "--enable-metrics", "--trust-remote-code"),
        *("--kt-method", "AMXINT4", "--kt-cpuinfer", "2", "--tool-call-parser", "kimi_k2"),
        *("--standin-startup-delay", "1"),
    ]
    with running(train_python, tmp_path_factory.mktemp("logs"), "shared", args) as engine:
        yield engine


def test_health_is_503_while_loading_then_200(standin: Engine) -> None:
    assert 503 in standin.seen
    assert standin.seen[-2:] == [200, 200]
    health = standin.get("/health_generate")
    assert (health.status, health.raw) == (200, b"")


def test_models_lists_the_base_then_each_adapter(standin: Engine, tiny: Path) -> None:
    listing = standin.get("/v1/models").json()
    assert listing["object"] == "list"
    base, start = listing["data"][:2]
    assert base["id"] == SERVED and base["root"] == SERVED and base["parent"] is None
    assert base["max_model_len"] == 2048 and base["owned_by"] == "sglang" and base["object"] == "model"
    assert start == start | {"id": "a0", "root": adapter(tiny, "a0"), "parent": SERVED, "max_model_len": None}


def test_load_adds_a_card_and_a_second_load_of_the_name_is_refused(standin: Engine, tiny: Path) -> None:
    loaded = standin.post("/load_lora_adapter", {"lora_name": "t-load", "lora_path": adapter(tiny, "a2")})
    assert loaded.status == 200, loaded.raw
    body = loaded.json()
    assert body["success"] is True and body["error_message"] == ""
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
        ("corrupt", "header"),
        ("dora", "Failed to load bad-dora because LoRA serving currently doesn't support DoRA adapters"),
        ("no-config", "No such file or directory"),
        ("expert", "carries KT expert LoRA"),
    ],
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
    assert body["success"] is False and message in body["error_message"], body
    assert f"bad-{name}" not in body["loaded_adapters"]
    assert f"bad-{name}" not in standin.cards()


def test_adapters_generate_what_peft_generates(
    standin: Engine, tiny: Path, references: dict[str, dict[str, Any]]
) -> None:
    assert standin.text(SERVED) == references["base"]["text"]
    # The base part of "base:adapter" is not checked.
    assert standin.text(f"{SERVED}:a0") == standin.text("whatever:a0") == references["a0"]["text"]
    loaded = standin.post("/load_lora_adapter", {"lora_name": "t-a1", "lora_path": adapter(tiny, "a1")})
    assert loaded.status == 200, loaded.raw
    answer = standin.complete(f"{SERVED}:t-a1").json()
    assert answer["choices"][0]["text"] == references["a1"]["text"]
    assert answer["model"] == f"{SERVED}:t-a1" and answer["object"] == "text_completion"
    prompt_tokens = len(references["a1"]["prompt_ids"])
    assert answer["usage"] == answer["usage"] | {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": TOKENS,
        "total_tokens": prompt_tokens + TOKENS,
    }
    assert answer["choices"][0]["finish_reason"] == "length"
    assert len({references[name]["text"] for name in ("base", "a0", "a1")}) == 3
    chat = standin.post(
        "/v1/chat/completions",
        {"model": f"{SERVED}:t-a1", "messages": [{"role": "user", "content": PROMPT}], **GREEDY},
    )
    assert chat.status == 200, chat.raw
    assert chat.json()["choices"][0]["message"]["content"] == references["chat-a1"]["text"]
    assert chat.json()["object"] == "chat.completion" and chat.json()["id"].startswith("chatcmpl-")


def test_a_bare_adapter_name_runs_the_base_model(standin: Engine) -> None:
    bare = standin.complete("a0").json()
    assert bare["model"] == "a0"
    assert bare["choices"][0]["text"] == standin.text(SERVED)


def test_the_lora_path_field_selects_the_adapter(standin: Engine) -> None:
    assert standin.text(SERVED, lora_path="a0") == standin.text(f"{SERVED}:a0") != standin.text(SERVED)


def test_an_adapter_never_loaded_is_a_400_with_sglangs_message(standin: Engine) -> None:
    refused = standin.complete(f"{SERVED}:nope")
    assert refused.status == 400
    body = refused.json()
    assert body["object"] == "error" and body["type"] == "BadRequestError" and body["code"] == 400
    assert body["message"].startswith(NEVER_LOADED) and "'a0'" in body["message"]


def test_unload_hides_the_card_but_a_request_reloads_the_adapter(standin: Engine, tiny: Path) -> None:
    loaded = standin.post("/load_lora_adapter", {"lora_name": "t-unload", "lora_path": adapter(tiny, "a1")})
    assert loaded.status == 200, loaded.raw
    before = standin.text(f"{SERVED}:t-unload")
    unloaded = standin.post("/unload_lora_adapter", {"lora_name": "t-unload"})
    assert unloaded.status == 200 and unloaded.json()["success"] is True
    assert "t-unload" not in unloaded.json()["loaded_adapters"]
    assert "t-unload" not in standin.cards()
    # SGLang remembers every name it ever loaded: the request reloads it, and its card is back.
    assert standin.text(f"{SERVED}:t-unload") == before
    assert "t-unload" in standin.cards()
    missing = standin.post("/unload_lora_adapter", {"lora_name": "never"})
    assert missing.status == 400 and "LoRA with name never does not exist" in missing.json()["error_message"]


def test_chat_streams_in_sglangs_order(standin: Engine) -> None:
    request = {"model": f"{SERVED}:a0", "messages": [{"role": "user", "content": PROMPT}], **GREEDY}
    whole = standin.post("/v1/chat/completions", request).json()
    streamed = standin.post("/v1/chat/completions", request | {"stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status == 200
    events = streamed.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["model"] == f"{SERVED}:a0" and chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    first, *content, finish, last = chunks
    assert first["choices"][0]["delta"] | {"role": "assistant", "content": ""} == first["choices"][0]["delta"]
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in [first, *content])
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in content) == whole["choices"][0]["message"][
        "content"
    ]
    assert finish["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == TOKENS
    assert last["usage"] == whole["usage"]


def test_a_stream_for_an_unknown_adapter_ends_with_an_error_event(standin: Engine) -> None:
    request = {"model": f"{SERVED}:nope", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    events = standin.post("/v1/chat/completions", request).events()
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["error"]["message"].startswith(NEVER_LOADED)


def test_metrics_carry_sglangs_names(standin: Engine) -> None:
    assert standin.text(SERVED)
    metrics = standin.get("/metrics")
    assert metrics.status == 200
    text = metrics.raw.decode()
    for name in (
        "num_running_reqs",
        "num_queue_reqs",
        "token_usage",
        "gen_throughput",
        "lora_pool_slots_used",
        "lora_pool_slots_total",
        "lora_pool_utilization",
    ):
        assert f'sglang:{name}{{model_name="{SERVED}",engine_type="unified"' in text, name
    for name in ("prompt_tokens_total", "generation_tokens_total"):
        assert f'sglang:{name}{{model_name="{SERVED}"}}' in text, name
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds"):
        assert f"# TYPE sglang:{name} histogram" in text
        assert f'sglang:{name}_bucket{{le="+Inf",model_name="{SERVED}"}}' in text
    assert f'sglang:lora_pool_slots_total{{model_name="{SERVED}",engine_type="unified",tp_rank="0",pp_rank="0"' in text


def test_a_small_pool_pins_and_evicts_as_sglang_does(train_python: str, tiny: Path, tmp_path: Path) -> None:
    args = [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED),
        *("--lora-paths", f"a0={adapter(tiny, 'a0')}", "--max-loras-per-batch", "2", "--max-loaded-loras", "2"),
    ]
    with running(train_python, tmp_path, "small", args) as engine:
        pinned = {"lora_name": "p1", "lora_path": adapter(tiny, "a1"), "pinned": True}
        assert engine.post("/load_lora_adapter", pinned).status == 200
        second = engine.post("/load_lora_adapter", pinned | {"lora_name": "p2", "lora_path": adapter(tiny, "a2")})
        assert second.status == 400 and "It is not allowed to pin all slots" in second.json()["error_message"]
        # A third adapter is past --max-loaded-loras: the least recently used unpinned one goes.
        third = engine.post("/load_lora_adapter", {"lora_name": "b", "lora_path": adapter(tiny, "a3")})
        assert third.status == 200, third.raw
        assert set(third.json()["loaded_adapters"]) == {"p1", "b"}
        assert list(engine.cards()) == [SERVED, "p1", "b"]
        # The evicted adapter still answers (reloaded), and now "b" is the one evicted.
        assert engine.text(f"{SERVED}:a0") == engine.text(f"{SERVED}:a0")
        assert list(engine.cards()) == [SERVED, "p1", "a0"]


def test_an_expert_adapter_is_statically_paired(
    train_python: str, tiny: Path, tmp_path: Path, references: dict[str, dict[str, Any]]
) -> None:
    args = [
        *("--model-path", str(tiny / "model"), "--served-model-name", SERVED, "--enable-lora"),
        *("--lora-paths", f"kt={adapter(tiny, 'expert')}", "--max-lora-rank", "16", "--max-loras-per-batch", "2"),
        *("--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj"),
        *("--disable-cuda-graph", "--pp-size", "1", "--kt-num-gpu-experts", "0", "--max-running-requests", "4"),
    ]
    with running(train_python, tmp_path, "expert", args) as engine:
        for path, body in [
            ("/load_lora_adapter", {"lora_name": "a1", "lora_path": adapter(tiny, "a1")}),
            ("/unload_lora_adapter", {"lora_name": "kt"}),
        ]:
            refused = engine.post(path, body)
            assert refused.status == 400
            assert refused.json()["success"] is False
            assert "Dynamic LoRA loading is disabled because KT expert LoRA is statically paired" in (
                refused.json()["error_message"]
            )
        for model in (SERVED, f"{SERVED}:a0", "kt"):
            refused = engine.complete(model)
            assert refused.status == 400 and "statically paired" in refused.json()["message"], model
        # Only the non-expert part applies to the tiny model, and it is a0's.
        assert engine.text(f"{SERVED}:kt") == references["a0"]["text"]
        assert list(engine.cards()) == [SERVED, "kt"]


def test_an_expert_adapter_must_be_the_only_one(train_python: str, tiny: Path, tmp_path: Path) -> None:
    engine = launch(
        train_python,
        tmp_path,
        "two",
        [
            *("--model-path", str(tiny / "model"), "--disable-cuda-graph"),
            *("--lora-paths", f"kt={adapter(tiny, 'expert')}", f"a1={adapter(tiny, 'a1')}"),
        ],
    )
    try:
        assert engine.proc.wait(timeout=STARTUP_S) != 0
    finally:
        stop(engine)
    assert "KT expert LoRA is statically paired" in engine.output()
