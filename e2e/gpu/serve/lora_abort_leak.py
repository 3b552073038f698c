"""Does a request whose client leaves keep its adapter from ever being unloaded on SGLang 0.5.16?

In the router run (RESULTS.md, "The router against the real engine") a request for a0 was abandoned
by its client while the engine was still warming up; later ``POST /unload_lora_adapter`` for a0 never
answered, and every load and unload after it waited behind it. SGLang counts each adapter's requests
in flight (``LoRARegistry.acquire``/``release``) and unloads only once the count is zero; this run
checks, straight against the engine (no router), which kind of abandoned request leaves the count up:

- a0: abandoned while waiting (sent while the engine warms up, the client gives up after 3 s);
- a3: a stream abandoned while it runs (the client reads a few events and closes);
- a2: a non-streamed request abandoned while it runs (client timeout 0.5 s, 1500 tokens asked);
- a1: the control, whose requests all finish.

Then the unloads, each with a 15 s limit, in the order a1, a3, a2, a0 (a hung unload holds SGLang's
LoRA update lock, so every later one waits too: the order puts the suspected one last).

    PYTHONPATH=<router wheels>:<sglang site> python3 lora_abort_leak.py --work DIR --site SITE --out OUT
"""

from __future__ import annotations

import argparse
import http.client as httpclient
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plumbing import Results
from router_vs_sglang import MAX_TOKENS, PROMPT, SERVED, Proc, http, model_ids


def chat(engine: str, model: str, *, timeout: float = 60.0, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    body = {"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    rec = http(f"{engine}/v1/chat/completions", "POST", body, timeout=timeout)
    out = {k: rec.get(k) for k in ("status", "seconds", "error")}
    try:
        out["text"] = rec["body"]["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        out["body"] = rec.get("body")
    return out


def stream_and_leave(engine: str, model: str, events: int = 3) -> dict[str, Any]:
    """A stream of 1500 tokens; read ``events`` events, then close the connection."""
    host, _, port = engine.split("//", 1)[1].partition(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=30)
    body = {
        "model": model,
        "messages": PROMPT,
        "temperature": 0,
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    seen = b""
    while seen.count(b"\n\n") < events:
        piece = resp.read1(65536)
        if not piece:
            break
        seen += piece
    conn.close()
    return {"status": resp.status, "events_read": seen.count(b"\n\n"), "left_after_s": round(time.monotonic() - t0, 3)}


def lora_lines(engine: str) -> list[str]:
    text = http(f"{engine}/metrics", limit=None).get("body") or ""
    keep = ("lora", "num_running_reqs", "num_queue_reqs", "num_aborted")
    return [ln for ln in str(text).splitlines() if any(k in ln for k in keep) and not ln.startswith("#")]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--site", default="")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine-port", type=int, default=30000)
    parser.add_argument("--engine-cmd", default=None, help="JSON argv replacing `python3 -m sglang.launch_server`")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = Results(args.out / "abort_leak.json")
    work = args.work.resolve()
    adapters = work / "models" / "adapters"
    engine = f"http://127.0.0.1:{args.engine_port}"
    prefix = json.loads(args.engine_cmd) if args.engine_cmd else [sys.executable, "-m", "sglang.launch_server"]
    argv = [
        *prefix, "--model-path", str(work / "model"), "--served-model-name", SERVED, "--enable-lora",
        "--lora-paths", f"a0={adapters / 'a0'}", f"a1={adapters / 'a1'}",
        "--max-lora-rank", "16", "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj",
        "--max-loras-per-batch", "4", "--max-loaded-loras", "4", "--lora-backend", "csgmv",
        "--attention-backend", "triton", "--sampling-backend", "pytorch", "--disable-cuda-graph",
        "--mem-fraction-static", "0.3", "--enable-metrics", "--host", "127.0.0.1", "--port", str(args.engine_port),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": args.site, "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false"}
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    eng = Proc(argv, env, args.out / "server-abort.log")
    res.put("argv", argv)
    try:
        eng.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300 and http(f"{engine}/v1/models", timeout=3)["status"] != 200:
            if not eng.alive():
                res.put("engine_exited", eng.proc.returncode if eng.proc else None)
                return 1
            time.sleep(0.3)
        res.put("port_open_s", round(time.monotonic() - t0, 1))
        res.put("health_when_sent", http(f"{engine}/health", timeout=3)["status"])
        # a0: abandoned while waiting; a1: the control, waits and finishes.
        control: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: control.update(chat(engine, f"{SERVED}:a1", timeout=200)), daemon=True)
        thread.start()
        res.put("a0_abandoned_waiting", chat(engine, f"{SERVED}:a0", timeout=3))
        while time.monotonic() - t0 < 300 and http(f"{engine}/health", timeout=3)["status"] != 200:
            time.sleep(0.3)
        res.put("healthy_s", round(time.monotonic() - t0, 1))
        thread.join(60)
        res.put("a1_control_waiting", control)
        time.sleep(1)
        steps: dict[str, Any] = {"metrics_idle_start": lora_lines(engine)}
        for name in ("a2", "a3"):
            steps[f"load_{name}"] = http(
                f"{engine}/load_lora_adapter", "POST", {"lora_name": name, "lora_path": str(adapters / name)}
            ).get("status")
        steps["a3_stream_abandoned_running"] = stream_and_leave(engine, f"{SERVED}:a3")
        steps["a2_abandoned_running"] = chat(engine, f"{SERVED}:a2", timeout=0.5, max_tokens=1500)
        steps["a1_finished"] = chat(engine, f"{SERVED}:a1")
        time.sleep(3)  # the abandoned generations end (1500 tokens take about a second here)
        steps["metrics_idle_after"] = lora_lines(engine)
        steps["models_before_unloads"] = model_ids(http(f"{engine}/v1/models"))
        res.put("steps", steps)
        unloads: dict[str, Any] = {}
        for name in ("a1", "a3", "a2", "a0"):
            rec = http(f"{engine}/unload_lora_adapter", "POST", {"lora_name": name}, timeout=15)
            unloads[name] = {k: rec.get(k) for k in ("status", "seconds", "error", "body")}
            unloads[f"models_after_{name}"] = model_ids(http(f"{engine}/v1/models"))
            res.put("unloads", unloads)
        res.put("metrics_end", lora_lines(engine))
        res.put("chat_after", {n: chat(engine, f"{SERVED}:{n}", timeout=20).get("status") for n in ("a1", "a0")})
    finally:
        res.put("stop", eng.stop(grace=20))
        log = (args.out / "server-abort.log").read_text(errors="replace")
        keys = ("abort", "Abort", "disconnect", "state was deleted", "unload", "Unload", "Reloading")
        res.put("log_lines", [ln[:300] for ln in log.splitlines() if any(k in ln for k in keys)][:80])
    return 0


if __name__ == "__main__":
    sys.exit(main())
