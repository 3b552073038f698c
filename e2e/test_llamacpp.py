"""The router in front of a real llama.cpp server (built from source by `make llamacpp`), called
with the official ``openai`` client: for the base model and each adapter, the same greedy tokens as
transformers + PEFT, also for a base request right after an adapter request on the same slot.

llama-server fixes its adapters at start and picks them per request by id; its traps (REFERENCE.md)
are the router's to avoid: a request without the full list of ids runs every adapter at its start
scale, and the prompt cache of a slot leaks its last adapter into the next request that has no list.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from tests.processes import free_port

from e2e.conftest import stop
from e2e.helpers import wait_for
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.render import llamacpp as llamacpp_facts
from kimi_operator.workloads.train.adapter import check_for_sglang

pytestmark = pytest.mark.e2e

ENGINES = repo_root() / "e2e" / "engines"
TINY_DEEPSEEK = repo_root() / "tests" / "oracle" / "tiny_deepseek.py"
OPERATOR = repo_root() / "operator"
SERVED = "kimi-k2.5"
PROMPT = "hello world"
ADAPTERS = ("a0", "a1", "a2")


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (loopback)
            return int(resp.status), json.load(resp)
    except OSError as exc:
        return 0, str(exc)


@pytest.fixture(scope="module")
def llamacpp() -> Path:
    found = os.environ.get("KIMI_LLAMACPP")
    if not found or not (Path(found) / "bin" / "llama-server").exists():
        pytest.fail("KIMI_LLAMACPP is not set to a llama.cpp build: run the tests with `make e2e`")
    return Path(found)


@pytest.fixture(scope="module")
def served(llamacpp: Path, train_python: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model and three adapters in GGUF, where a node cache keeps them (by digest), and
    transformers + PEFT's own greedy continuations of the prompt."""
    work = tmp_path_factory.mktemp("llamacpp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(
        [
            *(train_python, str(ENGINES / "tiny_lora.py"), str(work / "tiny"), "--adapters", str(len(ADAPTERS))),
            *("--reference-prompt", PROMPT, "--max-tokens", "8"),
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    convert = [train_python, str(ENGINES / "gguf_convert.py"), str(llamacpp / "src")]
    model = work / "tiny" / "model"
    subprocess.run([*convert, "model", str(model), str(work / "base.gguf")], check=True, capture_output=True, env=env)
    files = {}
    for name in ADAPTERS:
        source = work / "tiny" / "adapters" / name
        digest = hashlib.sha256((source / "adapter_model.safetensors").read_bytes()).hexdigest()
        target = work / "cache" / digest / "adapter.gguf"
        target.parent.mkdir(parents=True)
        subprocess.run(
            [*convert, "lora", str(source), str(model), str(target)], check=True, capture_output=True, env=env
        )
        files[name] = (digest, target)
    references = json.loads((work / "tiny" / "references.json").read_text())
    return {"work": work, "files": files, "references": references}


class Process:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def stack(llamacpp: Path, served: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """llama-server with the adapters at scale 0 and its prompt cache on (one slot: a request reuses
    the previous one's slot), and the router in front of it."""
    work = served["work"]
    host = "127.0.0.71"
    engine_port, router_port = free_port(host), free_port(host)
    files = ",".join(f"{path}:0" for _, path in served["files"].values())
    engine = Process(
        [
            *(str(llamacpp / "bin" / "llama-server"), "-m", str(work / "base.gguf"), "--lora-scaled", files),
            *("--alias", SERVED, "--host", host, "--port", str(engine_port), "-c", "512", "-np", "1", "-t", "1"),
        ],
        tmp_path / "llama-server.log",
    )
    spec = {
        "apiVersion": "kimi-operator.io/v1alpha1",
        "kind": "LoraServer",
        "metadata": {"name": "gguf"},
        "spec": {
            "model": {"name": "kimi"},
            "servedModelName": SERVED,
            # Added where a request leaves it out (llama-server's own default samples at 0.8).
            "sampling": {"temperature": 0},
            "adapters": [
                {"name": name, "path": f"/models/{name}", "sha256": digest}
                for name, (digest, _) in served["files"].items()
            ],
        },
    }
    (tmp_path / "lsrv.yaml").write_text(yaml.safe_dump(spec))
    router = Process(
        [
            *(sys.executable, "-m", "kimi_operator", "router", "--spec-file", str(tmp_path / "lsrv.yaml")),
            *("--engine-api", "llamacpp", "--engine", f"e0=http://{host}:{engine_port}", "--period", "0.5"),
            *("--host", host, "--port", str(router_port), "--metrics-port", "0", "--keys-dir", str(tmp_path)),
        ],
        tmp_path / "router.log",
        env={**os.environ, "PYTHONPATH": str(OPERATOR)},
    )
    try:
        wait_for(lambda: not engine.alive() or get(f"http://{host}:{engine_port}/health")[0] == 200, 60, "llama-server")
        assert engine.alive(), engine.log.read_text()[-3000:]
        wait_for(lambda: not router.alive() or get(f"http://{host}:{router_port}/ready")[0] == 200, 60, "router")
        assert router.alive(), router.log.read_text()[-3000:]
        yield {"engine": f"http://{host}:{engine_port}", "router": f"http://{host}:{router_port}", "log": router.log}
    finally:
        stop(router.proc)
        stop(engine.proc)


def direct_stream(engine: str, lora: list[dict[str, Any]]) -> str:
    """The engine's own stream of the prompt with this list of adapter scales."""
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True, "lora": lora}
    request = urllib.request.Request(  # noqa: S310 (loopback)
        f"{engine}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    text = []
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (loopback)
        for line in resp.read().decode().splitlines():
            if line.startswith("data: {"):
                text.extend(c.get("text") or "" for c in json.loads(line[6:]).get("choices") or [])
    return "".join(text)


def test_each_adapter_through_the_router_gives_transformers_own_tokens(
    stack: dict[str, Any], served: dict[str, Any]
) -> None:
    client = openai.OpenAI(base_url=f"{stack['router']}/v1", api_key="unused", max_retries=0, timeout=60)
    wait_for(lambda: {m.id for m in client.models.list()} == {SERVED, *ADAPTERS}, 30, "every adapter listed")
    expected = served["references"]["completion"]
    assert len({expected[n]["text"] for n in ("base", *ADAPTERS)}) == 4

    def complete(model: str, *, stream: bool = False) -> str:
        if stream:
            chunks = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks if c.choices)
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text

    # Each adapter after another, and the base right after each: one slot, its cache on.
    for name in ADAPTERS:
        for model in (name, f"{SERVED}:{name}"):
            assert complete(model) == expected[name]["text"], model
            assert complete(SERVED) == expected["base"]["text"], f"base after {model}"
    # The LoraServer's sampling defaults fill what a request leaves out: greedy here.
    for name in ("a2", SERVED):
        reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=8)
        assert reply.choices[0].text == expected["base" if name == SERVED else name]["text"]

    # Streams: event by event as the engine sends them. (llama-server holds back the bytes of a
    # character its last tokens leave unfinished, which transformers decodes as U+FFFD: a stream's
    # text is the engine's own stream, a prefix of the whole answer.)
    _, listed = get(f"{stack['engine']}/lora-adapters")
    ids = {name: next(e["id"] for e in listed if str(path) == e["path"]) for name, (_, path) in served["files"].items()}
    for name in ("a1", None):
        lora = [{"id": i, "scale": 1.0 if i == ids.get(name or "") else 0.0} for i in sorted(ids.values())]
        through = complete(name or SERVED, stream=True)
        assert through == direct_stream(stack["engine"], lora)
        assert expected[name or "base"]["text"].startswith(through)
        assert through

    # The trap the router avoids, shown on the engine itself: a request without the list of ids,
    # right after an adapter's request on the same slot, gets that adapter's cached prefix.
    a0 = ids["a0"]

    def direct(**extra: Any) -> str:
        body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
        request = urllib.request.Request(  # noqa: S310 (loopback)
            f"{stack['engine']}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (loopback)
            return str(json.load(resp)["choices"][0]["text"])

    assert direct(lora=[{"id": a0, "scale": 1.0}]) == expected["a0"]["text"]
    assert direct() != expected["base"]["text"]


def test_the_rendered_server_drops_exactly_the_modules_the_export_names(
    llamacpp: Path, train_python: str, tmp_path: Path
) -> None:
    """llama-server started with the command line the operator renders, on a tiny Kimi-shaped
    (DeepSeek-V3, MLA) model, one adapter per kind of module: the export's reading of each
    (``status.adapter.llamacppDroppedModules``) against what llama.cpp's own converter and server
    do with it. Every adapter changes transformers + PEFT's answer; llama-server
    gives PEFT's answer for the ones the export says it applies, the base model's for the ones it
    says are dropped, and its converter refuses the one it says cannot be converted."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(
        [train_python, str(ENGINES / "mla_lora.py"), str(tmp_path)], check=True, capture_output=True, env=env
    )
    model, adapters = tmp_path / "model", tmp_path / "adapters"
    references = json.loads((tmp_path / "references.json").read_text())
    convert = [train_python, str(ENGINES / "gguf_convert.py"), str(llamacpp / "src")]
    subprocess.run(
        [*convert, "model", str(model), str(tmp_path / "base.gguf")], check=True, capture_output=True, env=env
    )
    said: dict[str, list[str]] = {}
    converted: dict[str, Path] = {}
    for adapter in sorted(adapters.iterdir()):
        # What the export reads of an adapter, and what it reports.
        said[adapter.name] = llamacpp_facts.dropped_modules(check_for_sglang(adapter).modules)
        target = tmp_path / f"{adapter.name}.gguf"
        lora = [*convert, "lora", str(adapter), str(model), str(target)]
        if subprocess.run(lora, check=False, capture_output=True, env=env).returncode == 0:
            converted[adapter.name] = target
    assert said == {
        "kv_a_proj_with_mqa": ["kv_a_proj_with_mqa"],
        "kv_b_proj": ["kv_b_proj"],
        "mlp": [],
        "o_proj": [],
        "q_a_proj": ["q_a_proj"],
        "q_b_proj": ["q_b_proj"],
    }
    # The one the export says cannot be converted is the one llama.cpp's converter refuses.
    assert sorted(said.keys() - converted.keys()) == ["kv_b_proj"]

    # f32 on both sides: llama.cpp's log probabilities differ from torch's by about 2e-5.
    tolerance = 2e-4

    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return bool(a["tokens"] == b["tokens"] and abs(a["logprob"] - b["logprob"]) < tolerance)

    # Each adapter has an effect under transformers + PEFT that the comparison can see (q_a_proj's
    # update goes through a norm: it moves the log probabilities, not the tokens).
    base = references["base"]
    for name in said:
        assert (
            references[name]["tokens"] != base["tokens"]
            or abs(references[name]["logprob"] - base["logprob"]) > 3 * tolerance
        )

    host = "127.0.0.72"
    port = free_port(host)
    names = sorted(converted)
    # The engine's command line as the operator renders it (the guide's defaults: experts in RAM,
    # Jinja, Kimi's sampling), here on a CPU build with one thread and a small context.
    options = llamacpp_facts.ServerOptions(
        model=str(tmp_path / "base.gguf"),
        alias=SERVED,
        adapters=tuple(str(converted[n]) for n in names),
        context_size=512,
        threads=1,
        host=host,
        port=port,
    )
    engine = Process(
        [str(llamacpp / "bin" / "llama-server"), *llamacpp_facts.server_args(options)], tmp_path / "llama-server.log"
    )
    try:
        wait_for(lambda: not engine.alive() or get(f"http://{host}:{port}/health")[0] == 200, 60, "llama-server")
        assert engine.alive(), engine.log.read_text()[-3000:]
        _, listed = get(f"http://{host}:{port}/lora-adapters")
        ids = {Path(e["path"]).stem: e["id"] for e in listed}

        def answer(name: str | None) -> dict[str, Any]:
            # Always the full list of ids: one left out would run at its start scale.
            lora = [{"id": i, "scale": 1.0 if i == ids.get(name or "") else 0.0} for i in sorted(ids.values())]
            body = {"prompt": references["prompt"], "n_predict": len(base["tokens"]), "temperature": 0}
            # As the router sends it: the slot's prompt cache would restore another adapter's prefix.
            body.update(ignore_eos=True, return_tokens=True, n_probs=1, lora=lora, cache_prompt=False)
            request = urllib.request.Request(
                f"http://{host}:{port}/completion",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 (loopback)
                reply = json.load(resp)
            return {"tokens": reply["tokens"], "logprob": reply["completion_probabilities"][0]["logprob"]}

        served = {name: answer(name) for name in names}
        served_base = answer(None)
    finally:
        stop(engine.proc)
    assert same(served_base, base), (served_base, base)
    for name in names:
        expected = base if said[name] else references[name]
        assert same(served[name], expected), (name, served[name], expected)
