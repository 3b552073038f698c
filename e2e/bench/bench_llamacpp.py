"""The router in front of a real llama.cpp server, against calling that server directly.

One llama-server (built by ``make llamacpp``) serves a tiny Llama model with three LoRA adapters in
GGUF, started with the command line the operator renders (``render.llamacpp.server_args``). The
same closed-loop load, cycling through the base model and the three adapters with greedy
completions, goes to the server directly (the client sends llama-server's own ``lora`` list, the
chosen adapter at 1 and the others at 0, as the router does) and through our router
(``--engine-api llamacpp``, names ``served:adapter``). Rounds alternate, so both see the same
machine. Reported per concurrency: latency p50 and p99 of each and the difference, throughput of
the router as a share of direct, the router's CPU per request, and answers that differ from the
server's own answer for that adapter (always expected to be none).

    python e2e/bench/bench_llamacpp.py --work DIR --out FILE --train-python PY --llamacpp DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from benchlib import Proc, free_port, parse_levels, pct, start

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))

from kimi_operator.render import llamacpp  # noqa: E402

ENGINES = ROOT / "e2e" / "engines"
SERVED = "kimi-k2.5"
ADAPTERS = ("a0", "a1", "a2")
PROMPT = "hello world"


def post(url: str, body: dict[str, Any]) -> tuple[float, str]:
    """Seconds the whole answer took, and its text."""
    request = urllib.request.Request(  # noqa: S310 (loopback)
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310 (loopback)
        reply = json.load(resp)
    return time.perf_counter() - began, str(reply["choices"][0]["text"])


def wait_ready(url: str, proc: Proc, what: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(f"{what} exited:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback)
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} not ready after 120 s:\n{proc.tail()}")


def build(train_python: str, llamacpp_dir: Path, work: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny model and its adapters, in GGUF (llama.cpp's own converters)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tiny = work / "tiny"
    if not (tiny / "model").exists():
        cmd = [train_python, str(ENGINES / "tiny_lora.py"), str(tiny), "--adapters", str(len(ADAPTERS))]
        subprocess.run(cmd, check=True, capture_output=True, env=env)
    convert = [train_python, str(ENGINES / "gguf_convert.py"), str(llamacpp_dir / "src")]
    base = work / "base.gguf"
    if not base.exists():
        subprocess.run([*convert, "model", str(tiny / "model"), str(base)], check=True, capture_output=True, env=env)
    adapters = {}
    for name in ADAPTERS:
        source = tiny / "adapters" / name
        # Where a node cache keeps it: under the digest the LoraServer names it by.
        digest = hashlib.sha256((source / "adapter_model.safetensors").read_bytes()).hexdigest()
        target = work / "cache" / digest / "adapter.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            lora = [str(source), str(tiny / "model"), str(target)]
            subprocess.run([*convert, "lora", *lora], check=True, capture_output=True, env=env)
        adapters[name] = target
    return base, adapters


class Target:
    """Where a request goes and what it sends: the server itself, or the router."""

    def __init__(self, url: str, *, direct: bool, ids: dict[str, int]) -> None:
        self.url, self.direct, self.ids = url, direct, ids

    def body(self, adapter: str | None, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        if not self.direct:
            return {**body, "model": f"{SERVED}:{adapter}" if adapter else SERVED}
        chosen = self.ids.get(adapter or "")
        lora = [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in sorted(self.ids.values())]
        return {**body, "model": SERVED, "lora": lora, "cache_prompt": False}

    def ask(self, adapter: str | None, max_tokens: int) -> tuple[float, str]:
        return post(f"{self.url}/v1/completions", self.body(adapter, max_tokens))


def round_of(target: Target, concurrency: int, requests: int, max_tokens: int) -> tuple[list[float], float, list[str]]:
    """``requests`` completions, ``concurrency`` at a time: latencies, wall seconds, and the text of
    each answer with the adapter it was for."""
    names: list[str | None] = [None, *ADAPTERS]
    wanted = [names[i % len(names)] for i in range(requests)]
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(lambda a: target.ask(a, max_tokens), wanted))
    wall = time.perf_counter() - began
    return [r[0] for r in replies], wall, [f"{a or 'base'}\0{r[1]}" for a, r in zip(wanted, replies, strict=True)]


def wait_listed(router: str, proc: Proc) -> None:
    """Ready with an engine; each adapter is routable once the router has read the engine's list."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{router}/v1/models", timeout=5) as resp:  # noqa: S310 (loopback)
            if {m["id"] for m in json.load(resp)["data"]} >= {SERVED, *ADAPTERS}:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"the router never listed every adapter:\n{proc.tail()}")
        time.sleep(0.2)


def start_router(work: Path, host: str, port: int, engine: str, adapters: dict[str, Path]) -> Proc:
    spec = {
        "apiVersion": "kimi-operator.io/v1alpha1",
        "kind": "LoraServer",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"name": "kimi"},
            "servedModelName": SERVED,
            "adapters": [{"name": n, "path": f"/models/{n}", "sha256": p.parent.name} for n, p in adapters.items()],
        },
    }
    (work / "lsrv.yaml").write_text(yaml.safe_dump(spec))
    argv = [
        *(sys.executable, "-m", "kimi_operator", "router", "--spec-file", str(work / "lsrv.yaml")),
        *("--engine-api", "llamacpp", "--engine", f"e0={engine}", "--period", "0.5"),
        *("--host", host, "--port", str(port), "--metrics-port", "0", "--keys-dir", str(work)),
    ]
    return start("router", argv, work, env={"PYTHONPATH": str(ROOT / "operator")})


def level(
    targets: dict[str, Target], ours: Proc, truth: dict[str, str], shape: tuple[int, int, int], max_tokens: int
) -> dict[str, Any]:
    """One concurrency, direct and router rounds alternating."""
    concurrency, requests, rounds = shape
    latency: dict[str, list[float]] = {label: [] for label in targets}
    wall = dict.fromkeys(targets, 0.0)
    wrong = dict.fromkeys(targets, 0)
    cpu = 0.0
    for _ in range(rounds):
        for label, target in targets.items():
            before = ours.cpu_seconds()
            took, seconds, answers = round_of(target, concurrency, requests, max_tokens)
            if label == "router":
                cpu += ours.cpu_seconds() - before
            latency[label] += took
            wall[label] += seconds
            wrong[label] += sum(truth[a.split("\0", 1)[0]] != a.split("\0", 1)[1] for a in answers)
    row: dict[str, Any] = {"concurrency": concurrency, "requests": requests * rounds}
    for label in targets:
        row[label] = {
            "p50_ms": round(1000 * (pct(latency[label], 0.5) or 0), 2),
            "p99_ms": round(1000 * (pct(latency[label], 0.99) or 0), 2),
            "requests_per_s": round(requests * rounds / wall[label], 1),
            "wrong_answers": wrong[label],
        }
    row["added_p50_ms"] = round(row["router"]["p50_ms"] - row["direct"]["p50_ms"], 2)
    row["added_p99_ms"] = round(row["router"]["p99_ms"] - row["direct"]["p99_ms"], 2)
    row["throughput_x_direct"] = round(row["router"]["requests_per_s"] / row["direct"]["requests_per_s"], 3)
    row["router_cpu_ms_per_request"] = round(1000 * cpu / (requests * rounds), 2)
    return row


def print_table(levels: list[dict[str, Any]]) -> None:
    print(
        "| concurrency | direct p50 / p99 ms | router p50 / p99 ms | added p50 / p99 ms | throughput x direct "
        "| router CPU ms/request | wrong answers |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in levels:
        d, r = row["direct"], row["router"]
        print(
            f"| {row['concurrency']} | {d['p50_ms']} / {d['p99_ms']} | {r['p50_ms']} / {r['p99_ms']} "
            f"| {row['added_p50_ms']} / {row['added_p99_ms']} | {row['throughput_x_direct']} "
            f"| {row['router_cpu_ms_per_request']} | {d['wrong_answers'] + r['wrong_answers']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-python", required=True, help="python of the training environment (converters)")
    parser.add_argument("--llamacpp", type=Path, required=True, help="the llama.cpp build (make llamacpp)")
    parser.add_argument("--levels", default="1:40:3,4:80:3", help="CONCURRENCY:REQUESTS:ROUNDS,...")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--host", default="127.0.0.78")
    opts = parser.parse_args()
    opts.work.mkdir(parents=True, exist_ok=True)
    base, adapters = build(opts.train_python, opts.llamacpp, opts.work)
    engine_port, router_port = free_port(opts.host), free_port(opts.host)
    # The engine's command line as the operator renders it; one thread and a small context here.
    options = llamacpp.ServerOptions(
        model=str(base),
        alias=SERVED,
        adapters=tuple(str(adapters[n]) for n in ADAPTERS),
        context_size=4096,
        threads=1,
        host=opts.host,
        port=engine_port,
    )
    server = [str(opts.llamacpp / "bin" / "llama-server"), *llamacpp.server_args(options)]
    procs = [start("llama-server", server, opts.work)]
    engine, router = f"http://{opts.host}:{engine_port}", f"http://{opts.host}:{router_port}"
    try:
        wait_ready(f"{engine}/health", procs[0], "llama-server")
        with urllib.request.urlopen(f"{engine}/lora-adapters", timeout=5) as resp:  # noqa: S310 (loopback)
            by_path = {str(p): n for n, p in adapters.items()}
            ids = {by_path[e["path"]]: int(e["id"]) for e in json.load(resp)}
        ours = start_router(opts.work, opts.host, router_port, engine, adapters)
        procs.append(ours)
        wait_ready(f"{router}/ready", ours, "router")
        wait_listed(router, ours)
        targets = {"direct": Target(engine, direct=True, ids=ids), "router": Target(router, direct=False, ids=ids)}
        # Each adapter's own answer, from the server directly: what every later answer must be.
        truth = {a or "base": targets["direct"].ask(a, opts.max_tokens)[1] for a in (None, *ADAPTERS)}
        if len(set(truth.values())) != len(truth):
            raise SystemExit(f"the adapters do not change the answer, nothing to check: {truth}")
        levels = []
        for shape in parse_levels(opts.levels):
            levels.append(level(targets, ours, truth, shape, opts.max_tokens))
            print(json.dumps(levels[-1]), flush=True)
        result = {"engine": "llama-server", "max_tokens": opts.max_tokens, "cpus": os.cpu_count(), "levels": levels}
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(result, indent=2) + "\n")
        print_table(levels)
        if any(row["router"]["wrong_answers"] or row["direct"]["wrong_answers"] for row in levels):
            raise SystemExit("an answer differed from the server's own answer for its adapter")
    finally:
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    main()
