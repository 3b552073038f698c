"""The product's journey on the development cluster, for real (``make run``).

Builds the tiny model once (a DeepSeek-V3 in Kimi K2.5's multimodal wrapper, its routed experts
packed to INT4 by compressed-tensors as Kimi ships them: the tests' own builders, ``tests/oracle``,
with their own modelling code for the wrapper; and, where
llama.cpp is built, its GGUF by llama.cpp's own converter), publishes both with a local hub on
127.0.0.1, runs the pods of the simulated nodes with the local pod runner, applies
``examples/dev/journey.yaml`` (the hub's address filled in) and follows what a user would watch with
``kubectl get km,ftj,lsrv -w``. Once every LoraServer's router answers (the real llama-server, and
the SGLang stand-in), it prints ready-to-paste ``curl`` and ``openai`` snippets, what they return,
and where the metrics are; then it keeps the hub and the runner going until it is stopped (SIGINT
or SIGTERM). Without llama.cpp the overlay's llama.cpp parts are left out.

    python -m kimi_operator.devcluster.demo --dir .cluster   (KIMI_TRAIN_PYTHON, KIMI_ORACLE_PYTHON,
                                                             KIMI_LLAMACPP from the Makefile)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from kimi_operator.api.base import GROUP
from kimi_operator.devcluster.hub import FakeHub
from kimi_operator.devcluster.paths import cache_root, repo_root, state_root
from kimi_operator.devcluster.runner import config_for, images_from_env, running
from kimi_operator.render.router import HTTP_PORT, METRICS_PORT
from kimi_operator.render.router import labels as router_labels
from kimi_operator.workloads.prepare.convert import convert

log = logging.getLogger(__name__)

VERSION = "v1alpha1"
MANIFESTS = Path("examples") / "dev" / "journey.yaml"
PLURALS = {"KimiModel": "kimimodels", "FineTuneJob": "finetunejobs", "LoraServer": "loraservers"}
ENGINES = {"llamacpp": "the real llama-server", "sglang": "the SGLang stand-in: SGLang needs a GPU"}
BUILDERS = (
    "tests/oracle/tiny_deepseek.py",
    "tests/oracle/kimi_k25_wrap.py",
    "tests/oracle/kimi_k25/configuration_kimi_k25.py",
    "tests/oracle/kimi_k25/modeling_kimi_k25.py",
    "tests/oracle/kimi_checkpoint.py",
)
# What the GGUF is made with besides: the operator's converter (the bf16 variant the fine-tune
# trains on) and llama.cpp's, called by the tests' wrapper.
GGUF_BUILDERS = (
    "operator/kimi_operator/workloads/prepare/convert.py",
    "operator/kimi_operator/workloads/prepare/dequant.py",
    "operator/kimi_operator/workloads/prepare/native/dequant_int4.c",
    "e2e/engines/gguf_convert.py",
)
# One file at the top of the GGUF repository: quantization F32 (prepare/gguf.py reads the name's
# tail), llama.cpp's unquantized format, so that it computes what transformers computes.
GGUF_FILE = "tiny-kimi-F32.gguf"


@dataclasses.dataclass(frozen=True)
class Built:
    checkpoint: Path  # the INT4 checkpoint as Kimi ships it: the KimiModel's hub repository
    gguf: Path | None  # a directory holding its GGUF (spec.gguf's repository), where llama.cpp is


def _digest(files: Sequence[str]) -> str:
    return hashlib.sha256(b"".join((repo_root() / f).read_bytes() for f in files)).hexdigest()[:12]


def model_cache(cache: Path) -> Path:
    """Where the built model is kept, keyed by its builders' text (a change builds it again)."""
    return cache / f"tiny-kimi-{_digest(BUILDERS)}"


def _keep(built: Path, final: Path) -> None:
    """``built`` renamed to ``final``; a complete ``final`` another build renamed first is kept."""
    try:
        built.rename(final)
    except OSError:
        if not final.is_dir():
            raise


def _run(step: Sequence[str], what: str, env: Mapping[str, str] | None = None) -> None:
    done = subprocess.run(step, capture_output=True, text=True, check=False, timeout=900, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"building the tiny model: {what} failed:\n{done.stderr[-3000:]}")


def build_model(cache: Path, train_python: str, oracle_python: str, llamacpp: Path | None = None) -> Built:
    """The tiny model's files: a transformers model with its tokenizer, wrapped as Kimi K2.5
    (training environment), then its routed experts packed by compressed-tensors (oracle
    environment); with ``llamacpp``, the
    GGUF of what the KimiModel's bf16 variant holds (the experts unpacked by the operator's own
    converter). Each built under a temporary name and renamed, so an interrupted build is never
    taken for a model."""
    final = model_cache(cache)
    checkpoint = final / "int4"
    oracle = repo_root() / "tests" / "oracle"
    final.mkdir(parents=True, exist_ok=True)
    if not (checkpoint / "config.json").is_file():
        with tempfile.TemporaryDirectory(dir=final, prefix="building-") as tmp:
            _run([train_python, str(oracle / "tiny_deepseek.py"), f"{tmp}/source", "teachable"], "tiny_deepseek.py")
            _run([train_python, str(oracle / "kimi_k25_wrap.py"), f"{tmp}/source", f"{tmp}/k25"], "kimi_k25_wrap.py")
            _run(
                [oracle_python, str(oracle / "kimi_checkpoint.py"), "quantize", f"{tmp}/k25", f"{tmp}/int4"],
                "kimi_checkpoint.py quantize",
            )
            _keep(Path(tmp, "int4"), checkpoint)
    if llamacpp is None:
        return Built(checkpoint, None)
    # Keyed by the llama.cpp build and the converters too.
    gguf = final / f"gguf-{llamacpp.name}-{_digest(GGUF_BUILDERS)}"
    if not (gguf / GGUF_FILE).is_file():
        with tempfile.TemporaryDirectory(dir=final, prefix="building-") as tmp:
            convert(checkpoint, Path(tmp, "bf16"))
            Path(tmp, "gguf").mkdir()
            converter = repo_root() / "e2e" / "engines" / "gguf_convert.py"
            step = [
                train_python,
                str(converter),
                str(llamacpp / "src"),
                "model",
                f"{tmp}/bf16",
                f"{tmp}/gguf/{GGUF_FILE}",
            ]
            _run(step, "gguf_convert.py", env={**os.environ, "HF_HUB_OFFLINE": "1"})
            _keep(Path(tmp, "gguf"), gguf)
    return Built(checkpoint, gguf)


def manifests(path: Path, endpoint: str | None = None) -> list[dict[str, Any]]:
    """The overlay's objects; with ``endpoint``, each KimiModel's hub source pointed at it."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if endpoint is not None:
        point_at(docs, endpoint)
    return docs


def point_at(docs: Sequence[dict[str, Any]], endpoint: str) -> None:
    """Each KimiModel of ``docs`` takes its weights (and its GGUF) from the hub at ``endpoint``."""
    for doc in docs:
        if doc["kind"] == "KimiModel":
            doc["spec"]["source"]["huggingFace"]["endpoint"] = endpoint
            if "gguf" in doc["spec"]:
                doc["spec"]["gguf"]["huggingFace"]["endpoint"] = endpoint


def repositories(docs: Sequence[Mapping[str, Any]], built: Built) -> dict[str, Path]:
    """The hub repositories the overlay's KimiModel names, each with the directory it publishes."""
    (model,) = [d for d in docs if d["kind"] == "KimiModel"]
    repos = {str(model["spec"]["source"]["huggingFace"]["repo"]): built.checkpoint}
    if "gguf" in model["spec"]:
        if built.gguf is None:
            raise RuntimeError("the overlay names a GGUF repository, but no GGUF was built (no llama.cpp)")
        repos[str(model["spec"]["gguf"]["huggingFace"]["repo"])] = built.gguf
    return repos


def without_llamacpp(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The overlay without its llama.cpp parts (no llama.cpp build here): no gguf variant, and no
    LoraServer on llama.cpp."""
    kept = []
    for doc in copy.deepcopy(list(docs)):
        if doc["kind"] == "KimiModel":
            doc["spec"].pop("gguf", None)
            doc["spec"]["variants"] = [v for v in doc["spec"]["variants"] if v != "gguf"]
        if doc["kind"] == "LoraServer" and (doc["spec"].get("engine") or {}).get("type") == "llamacpp":
            continue
        kept.append(doc)
    return kept


def apply(api: kubernetes.client.ApiClient, docs: Sequence[Mapping[str, Any]], namespace: str | None = None) -> None:
    """Create each object (in ``namespace`` when given), as ``kubectl create`` would."""
    core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
    for original in docs:
        doc = copy.deepcopy(dict(original))
        ns = namespace or doc["metadata"].get("namespace") or "default"
        doc["metadata"]["namespace"] = ns
        if doc["kind"] == "ConfigMap":
            # The client takes a plain dict as the body.
            core.create_namespaced_config_map(ns, doc)  # type: ignore[arg-type]
        else:
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[doc["kind"]], doc)


def _line(kind: str, obj: Mapping[str, Any]) -> str:
    """What ``kubectl get`` would show of an object: its phase and progress, in one line."""
    status = obj.get("status") or {}
    name = f"{kind.lower()}/{obj['metadata']['name']}"
    ready: Mapping[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    words = [name, str(status.get("phase") or ready.get("reason") or "Pending")]
    if kind == "KimiModel":
        for node in status.get("nodes") or []:
            progress = node.get("progress") or {}
            step = progress.get("step")
            words.append(
                f"{node['name']}: {node.get('phase')}" + (f" ({step} {progress.get('percent')}%)" if step else "")
            )
    elif kind == "FineTuneJob":
        progress = status.get("progress") or {}
        if progress.get("step") is not None:
            loss = progress.get("loss")
            words.append(
                f"step {progress['step']}/{progress.get('totalSteps')}" + (f" loss {loss:.3f}" if loss else "")
            )
    elif kind == "LoraServer":
        states = [f"{a['name']}: {a.get('state')}" for a in status.get("adapters") or []]
        words += states
    if ready.get("status") == "True":
        words.append("Ready")
    return "  ".join(words)


def follow(
    api: kubernetes.client.ApiClient,
    docs: Sequence[Mapping[str, Any]],
    done: Callable[[], bool],
    out: Callable[[str], None],
    *,
    stop: threading.Event,
    every: float = 1.0,
) -> bool:
    """Print each object's line when it changes until ``done()`` (True) or ``stop`` (False); a
    Stalled or Failed condition ends it too, printed with its message (False)."""
    custom = kubernetes.client.CustomObjectsApi(api)
    seen: dict[str, str] = {}
    watched = [d for d in docs if d["kind"] in PLURALS]
    while not stop.is_set():
        for doc in watched:
            meta = doc["metadata"]
            obj: dict[str, Any] = custom.get_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, meta.get("namespace") or "default", PLURALS[doc["kind"]], meta["name"]
            )
            line = _line(doc["kind"], obj)
            if seen.get(meta["name"] + doc["kind"]) != line:
                seen[meta["name"] + doc["kind"]] = line
                out(line)
            for c in (obj.get("status") or {}).get("conditions") or []:
                if c.get("type") in ("Stalled", "Failed") and c.get("status") == "True":
                    out(f"{doc['kind']} {meta['name']}: {c.get('reason')}: {c.get('message')}")
                    return False
        if done():
            return True
        stop.wait(every)
    return False


def router_url(api: kubernetes.client.ApiClient, namespace: str, server: str) -> str | None:
    """The router pod's own address (a 127.x pod IP on this cluster), once it has one."""
    selector = ",".join(f"{k}={v}" for k, v in router_labels(server).items())
    pods = kubernetes.client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    ips = [p.status.pod_ip for p in pods if p.status and p.status.pod_ip]
    return f"http://{ips[0]}:{HTTP_PORT}" if ips else None


def ask(url: str, model: str, question: str) -> str:
    """One chat answer from the router (plain HTTP: what the printed curl does)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 24}
    request = urllib.request.Request(  # noqa: S310 (the router's 127.x address)
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310
        return str(json.loads(resp.read())["choices"][0]["message"]["content"])


def snippets(url: str, model: str, question: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0})
    return "\n".join(
        [
            f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"  -d '{body}'",
            "",
            "python - <<'PY'",
            "import openai",
            f'client = openai.OpenAI(base_url="{url}/v1", api_key="none")',
            f"reply = client.chat.completions.create(model={model!r}, temperature=0,",
            f'    messages=[{{"role": "user", "content": {question!r}}}])',
            "print(reply.choices[0].message.content)",
            "PY",
        ]
    )


@contextlib.contextmanager
def published(repos: Mapping[str, Path]) -> Iterator[tuple[FakeHub, dict[str, str]]]:
    """Each directory's files as one commit of its repository on a local hub; the hub and the
    commits, by repository."""
    with FakeHub() as hub:
        commits = {
            repo: hub.add_commit(repo, {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()})
            for repo, files in repos.items()
        }
        yield hub, commits


def answering(api: kubernetes.client.ApiClient, namespace: str, server: str, model: str, question: str) -> bool:
    """Whether the LoraServer's router answers ``question`` for ``model`` (what a user waits for)."""
    url = router_url(api, namespace, server)
    if url is None:
        return False
    try:
        return bool(ask(url, model, question))
    except (OSError, ValueError, KeyError):
        return False


def lesson(docs: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The question the overlay's dataset asks and the answer it teaches."""
    (data,) = [d for d in docs if d["kind"] == "ConfigMap"]
    record = json.loads(next(iter(data["data"].values())).splitlines()[0])
    messages = record["messages"]
    return str(messages[0]["content"]), str(messages[1]["content"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kimi_operator.devcluster.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="cluster directory (default: .cluster in the checkout)")
    parser.add_argument("--manifests", default=str(repo_root() / MANIFESTS), help="the overlay to apply")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    train_python, oracle_python = os.environ.get("KIMI_TRAIN_PYTHON"), os.environ.get("KIMI_ORACLE_PYTHON")
    if not train_python or not oracle_python:
        print(
            "demo: KIMI_TRAIN_PYTHON and KIMI_ORACLE_PYTHON must name the training and oracle environments", flush=True
        )
        return 2
    root = Path(args.dir) if args.dir else state_root()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    def say(text: str) -> None:
        print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)

    began = time.monotonic()
    found = os.environ.get("KIMI_LLAMACPP")
    llamacpp = Path(found) if found and (Path(found) / "src" / "convert_hf_to_gguf.py").is_file() else None
    if found and llamacpp is None:
        say(f"KIMI_LLAMACPP={found} holds no llama.cpp build (src/convert_hf_to_gguf.py): not using it")
    say("building the tiny model (once; cached)")
    built = build_model(cache_root() / "demo", train_python, oracle_python, llamacpp)
    if stop.is_set():
        return 0
    config = config_for(root, images_from_env(repo_root()))
    api = kubernetes.config.new_client_from_config(config_file=str(root / "kubeconfig"))  # type: ignore[no-untyped-call]
    docs = manifests(Path(args.manifests))
    if built.gguf is None:
        say("no llama.cpp build (KIMI_LLAMACPP): serving with the SGLang stand-in only")
        docs = without_llamacpp(docs)
    repos = repositories(docs, built)
    with published(repos) as (hub, _), running(config, kubernetes.client.CoreV1Api(api), grace=5):
        point_at(docs, hub.endpoint)
        apply(api, docs)
        say(f"applied {args.manifests} (the model from the hub at {hub.endpoint}); following it:")
        servers = [d for d in docs if d["kind"] == "LoraServer"]
        question, _ = lesson(docs)

        def where(lsrv: Mapping[str, Any]) -> tuple[str, str, str, str]:
            meta, spec = lsrv["metadata"], lsrv["spec"]
            return (
                meta.get("namespace") or "default",
                meta["name"],
                spec["servedModelName"],
                spec["adapters"][0]["name"],
            )

        def answers() -> bool:
            return all(answering(api, ns, name, adapter, question) for ns, name, _, adapter in map(where, servers))

        if follow(api, docs, answers, say, stop=stop):
            say(f"first answers {time.monotonic() - began:.0f} s after start; ask them yourself:")
            for lsrv in servers:
                namespace, name, served, adapter = where(lsrv)
                url = router_url(api, namespace, name) or ""
                engine = (lsrv["spec"].get("engine") or {}).get("type") or "sglang"
                print(f"\n# LoraServer {name} ({ENGINES.get(engine, engine)}), its router at {url}", flush=True)
                print(snippets(url, adapter, question), flush=True)
                print(f"\n  with the adapter ({adapter}): {ask(url, adapter, question)!r}", flush=True)
                print(f"  the base model ({served}):   {ask(url, served, question)!r}", flush=True)
                print(f"  metrics: {url.rsplit(':', 1)[0]}:{METRICS_PORT}/metrics", flush=True)
            say(
                "the operator's metrics: http://127.0.0.1:8080/metrics; the Grafana dashboard to import: "
                "charts/kimi-operator/dashboards/kimi-operator.json. Ctrl-C stops everything."
            )
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
