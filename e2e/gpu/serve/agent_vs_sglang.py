"""The operator's adapter agent against a real SGLang engine, without Kubernetes: every answer the
engine gives is written down verbatim, so the SGLang stand-in (e2e/engines/sglang_standin.py) and
the agent's own assumptions can be checked against it.

    PYTHONPATH=operator:<sglang site> python3 agent_vs_sglang.py --work DIR --site SITE --out OUT

DIR holds what make_tiny.py built (DIR/model, DIR/models/adapters/...). The engine is started here
with SITE as its only extra PYTHONPATH and no adapters, killed by its PID, and started again with the
same argv. Its environment has SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false, as the operator's engine
pods do (``--health-generation on`` leaves SGLang's default), and a thread polls ``GET /health`` every
2 s (5 s timeout, as the pods' probes) from each start on, recording every code and latency. The
agent is ``kimi_operator.workloads.serve.agent.Agent`` with a plan given in code; ``step()`` returns
the report it would write into the LoraServer's status. Everything goes into OUT/results.json,
rewritten after each section, so a run cut short still leaves what it saw.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plumbing import Results, group_members

try:
    from kimi_operator.api.serving import AdapterFiles, PlannedAdapter, ReplicaPlan, ServingPlan
    from kimi_operator.workloads.serve.agent import Agent
    from kimi_operator.workloads.serve.engine import Engine
except ImportError as exc:
    print(
        f"FATAL: the operator's agent cannot be imported ({exc}). It needs pydantic: put a directory holding "
        "pydantic (the SGLang pack's site does) on PYTHONPATH after operator/.",
        file=sys.stderr,
    )
    sys.exit(2)

SERVED = "kimi-k2.5"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
GOOD = ["a0", "a1", "a2", "a3"]
BAD = ["wrong-rank", "corrupt"]
WEIGHTS = "adapter_model.safetensors"

log = logging.getLogger("agent_vs_sglang")


# ---------------------------------------------------------------------------------------------
# Plumbing


def http(url: str, method: str = "GET", body: Any = None, timeout: float = 60.0) -> dict[str, Any]:
    """One request; the status and the body verbatim (JSON parsed when it is JSON)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 (the local engine, an http URL built here)
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    t0 = time.monotonic()
    rec: dict[str, Any] = {"method": method, "path": "/" + url.split("/", 3)[-1]}
    if body is not None:
        rec["request"] = body
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (the local engine)
            rec["status"], raw = resp.status, resp.read()
            rec["content_type"] = resp.headers.get("Content-Type")
    except urllib.error.HTTPError as exc:
        rec["status"], raw = exc.code, exc.read()
        rec["content_type"] = exc.headers.get("Content-Type") if exc.headers else None
    except Exception as exc:  # refused, reset, timeout
        rec["status"], rec["error"] = None, f"{type(exc).__name__}: {exc}"
        rec["seconds"] = round(time.monotonic() - t0, 3)
        return rec
    rec["seconds"] = round(time.monotonic() - t0, 3)
    text = raw.decode(errors="replace")
    try:
        rec["body"] = json.loads(text) if text else ""
    except ValueError:
        rec["body"] = text
    return rec


class RecordingEngine(Engine):
    """The agent's own engine client; every call it makes is kept with the engine's answer."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: list[dict[str, Any]] = []

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *rest: Any) -> tuple[int, Any]:
        # *rest: the timeout, in the engine client versions that take one
        rec: dict[str, Any] = {"method": method, "path": path}
        if body is not None:
            rec["request"] = body
        try:
            code, answer = super()._call(method, path, body, *rest)  # type: ignore[call-arg,unused-ignore]
        except Exception as exc:  # no answer: the client turns this into EngineDown or a failed Answer
            rec["engine_down"] = f"{type(exc).__name__}: {exc}"
            self.calls.append(rec)
            raise
        rec["status"] = code
        # /v1/models is recorded separately, verbatim; here only which ids it listed
        rec["response"] = (
            [c.get("id") for c in answer.get("data", [])]
            if path == "/v1/models" and isinstance(answer, dict)
            else answer
        )
        self.calls.append(rec)
        return code, answer

    def _status(self, method: str, path: str) -> int | None:
        # /health and /freeze_gc, whose bodies the client does not read
        status = super()._status(method, path)
        self.calls.append({"method": method, "path": path, "status": status})
        return status

    def take(self) -> list[dict[str, Any]]:
        calls, self.calls = self.calls, []
        return calls


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gpu_memory_used() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


class HealthPoller(threading.Thread):
    """``GET /health`` every ``every`` seconds with a 5 s timeout (the engine pods' probe), each answer
    kept with the phase it fell in ("start 1", "killed 1", ...) and the seconds since that phase began."""

    def __init__(self, url: str, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.url, self.every = url, every
        self.samples: list[dict[str, Any]] = []
        self.phase: str | None = None
        self.phase_t0 = 0.0
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def mark(self, phase: str) -> None:
        with self.lock:
            self.phase, self.phase_t0 = phase, time.monotonic()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.monotonic()
            with self.lock:
                phase, since = self.phase, self.phase_t0
            if phase is not None:
                r = http(self.url + "/health", timeout=5)
                sample = {"phase": phase, "t": round(t0 - since, 1), "status": r["status"], "seconds": r["seconds"]}
                if r.get("error"):
                    sample["error"] = r["error"][:100]
                with self.lock:
                    self.samples.append(sample)
            self.halt.wait(max(0.0, self.every - (time.monotonic() - t0)) if phase is not None else 0.1)

    def summary(self) -> dict[str, Any]:
        """Per phase: runs of the same outcome (code, or the error's kind) with their first and last
        times, and the latencies of the 200s."""
        with self.lock:
            samples = list(self.samples)
        out: dict[str, Any] = {}
        for phase in dict.fromkeys(s["phase"] for s in samples):
            mine = [s for s in samples if s["phase"] == phase]
            runs: list[dict[str, Any]] = []
            for s in mine:
                outcome = s["status"] if s["status"] is not None else s.get("error", "")[:70]
                if runs and runs[-1]["outcome"] == outcome:
                    runs[-1].update(last_t=s["t"], n=runs[-1]["n"] + 1)
                    runs[-1]["max_seconds"] = max(runs[-1]["max_seconds"], s["seconds"])
                else:
                    runs.append(
                        {"outcome": outcome, "first_t": s["t"], "last_t": s["t"], "n": 1, "max_seconds": s["seconds"]}
                    )
            ok = sorted(s["seconds"] for s in mine if s["status"] == 200)
            out[phase] = {
                "runs": runs,
                "first_200_t": next((s["t"] for s in mine if s["status"] == 200), None),
                "latency_200": {"n": len(ok), "min": ok[0], "median": ok[len(ok) // 2], "max": ok[-1]} if ok else None,
            }
        return out


class EngineProcess:
    def __init__(
        self, argv: list[str], env: dict[str, str], url: str, log_dir: Path, poller: HealthPoller | None = None
    ) -> None:
        self.argv, self.env, self.url, self.log_dir, self.poller = argv, env, url, log_dir, poller
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> int:
        self.starts += 1
        out = open(self.log_dir / f"server-{self.starts}.log", "wb")  # noqa: SIM115 (kept for the process)
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        if self.poller is not None:
            self.poller.mark(f"start {self.starts}")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, limit_s: float, on_tick: Callable[[float], None] | None = None) -> dict[str, Any]:
        """Poll /health and /v1/models every 0.5 s; when each first answered, and what."""
        t0 = time.monotonic()
        seen: dict[str, Any] = {"health_codes_seen": [], "models_first_200_s": None, "healthy_s": None}
        while time.monotonic() - t0 < limit_s:
            if not self.alive():
                seen["exited"] = self.proc.returncode if self.proc else None
                return seen
            h = http(self.url + "/health", timeout=5)
            if h["status"] not in seen["health_codes_seen"]:
                seen["health_codes_seen"].append(h["status"])
            if seen["models_first_200_s"] is None:
                m = http(self.url + "/v1/models", timeout=5)
                if m["status"] == 200:
                    seen["models_first_200_s"] = round(time.monotonic() - t0, 1)
                    seen["models_first_body"] = m["body"]
                    seen["health_when_models_first_200"] = h["status"]
            if h["status"] == 200:
                seen["healthy_s"] = round(time.monotonic() - t0, 1)
                return seen
            if on_tick is not None:
                on_tick(time.monotonic() - t0)
            time.sleep(0.5)
        seen["timeout_s"] = limit_s
        return seen

    def kill(self, sig: int = signal.SIGKILL) -> dict[str, Any]:
        """Kill the main process by its PID (as a crash would), then say which children outlived it;
        those are ours (same process group) and are ended too, so the port and the GPU come free."""
        assert self.proc is not None
        pid = self.proc.pid
        rec: dict[str, Any] = {"pid": pid, "signal": signal.Signals(sig).name, "group_before": group_members(pid)}
        os.kill(pid, sig)
        if self.poller is not None:
            self.poller.mark(f"{signal.Signals(sig).name} {self.starts}")
        self.proc.wait(timeout=30)
        rec["returncode"] = self.proc.returncode
        deadline = time.monotonic() + 15
        while group_members(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        rec["group_survivors_after_s"] = round(15 - max(0.0, deadline - time.monotonic()), 1)
        survivors = group_members(pid)
        rec["group_survivors"] = survivors
        if survivors:
            os.killpg(pid, signal.SIGKILL)
            time.sleep(2)
        rec["port_after"] = http(self.url + "/health", timeout=3).get("status")
        rec["gpu_memory_used_after"] = gpu_memory_used()
        return rec


# ---------------------------------------------------------------------------------------------
# The run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--site", required=True, help="the SGLang site directory (the engine's PYTHONPATH)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new sections after this")
    parser.add_argument("--engine-cmd", default=None, help="JSON argv replacing SGLang's (local dry runs)")
    parser.add_argument(
        "--health-generation",
        choices=["off", "on"],
        default="off",
        help="off: SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false in the engine's env (as the operator sets it)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    res = Results(args.out / "results.json")
    url = f"http://127.0.0.1:{args.port}"
    work = args.work.resolve()
    models_dir, cache_dir = work / "models", work / "cache"
    adapters = models_dir / "adapters"
    sha = {p.name: sha256_of(p / WEIGHTS) for p in sorted(adapters.iterdir()) if (p / WEIGHTS).is_file()}
    cached = {n: str(cache_dir / s) for n, s in sha.items()}

    argv = json.loads(args.engine_cmd) if args.engine_cmd else [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(work / "model"),
        "--served-model-name", SERVED, "--enable-lora",
        "--max-lora-rank", "16", "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj",
        "--max-loras-per-batch", "4", "--max-loaded-loras", "4", "--lora-backend", "csgmv",
        "--attention-backend", "triton", "--sampling-backend", "pytorch", "--disable-cuda-graph",
        "--mem-fraction-static", "0.3", "--enable-metrics", "--host", "127.0.0.1", "--port", str(args.port),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": args.site}
    for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        env[key] = {"NCCL_NVLS_ENABLE": "0"}.get(key, "1")
    env.pop("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", None)
    if args.health_generation == "off":
        env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] = "false"
    engine_env = {k: v for k, v in env.items() if k.startswith(("SGLANG_", "NCCL_", "TORCH_SYMM", "NVSHMEM_"))}
    res.put(
        "setup",
        {"argv": argv, "engine_env": engine_env, "served": SERVED, "adapters_sha256": sha, "cache_paths": cached},
    )

    state: dict[str, Any] = {"names": list(GOOD)}

    def plan_of(names: list[str]) -> ServingPlan:
        return ServingPlan(
            served_model_name=SERVED,
            generation=1,
            replicas=[
                ReplicaPlan(
                    replica="r0",
                    adapters=[
                        PlannedAdapter(name=n, sha256=sha[n], files=AdapterFiles(kind="node", path=f"adapters/{n}"))
                        for n in names
                    ],
                )
            ],
        )

    engine_client = RecordingEngine(url)
    agent = Agent(
        replica="r0",
        engine=engine_client,
        plan=lambda: plan_of(state["names"]),
        models_dir=models_dir,
        cache_dir=cache_dir,
    )

    def step(label: str) -> dict[str, Any]:
        t0 = time.monotonic()
        report = agent.step()
        return {
            "label": label,
            "plan": list(state["names"]),
            "seconds": round(time.monotonic() - t0, 3),
            "report": report,
            "engine_calls": engine_client.take(),
        }

    def models() -> dict[str, Any]:
        return http(url + "/v1/models")

    def chat(model: str, **extra: Any) -> dict[str, Any]:
        body = {"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": 8, "ignore_eos": True, **extra}
        rec = http(url + "/v1/chat/completions", "POST", body)
        try:
            rec["text"] = rec["body"]["choices"][0]["message"]["content"]
            rec["model_echoed"] = rec["body"]["model"]
        except Exception:
            rec["text"] = None
        return rec

    def short(rec: dict[str, Any]) -> dict[str, Any]:
        return {k: rec.get(k) for k in ("status", "text", "model_echoed", "seconds")}

    def section(name: str, fn: Callable[[], Any], *, min_left: float = 0.0) -> Any:
        left = args.budget_s - res.elapsed()
        if left < min_left:
            res.put(name, {"skipped": f"{left:.0f} s of the budget left, {min_left:.0f} needed"})
            return None
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception:
            value = {"exception": traceback.format_exc()}
        if isinstance(value, dict):
            value["_section_seconds"] = round(time.monotonic() - t0, 2)
            value["_at_s"] = res.elapsed()
            value["_engine_alive"] = proc.alive()
        res.data["health_poll"] = poller.summary()
        res.put(name, value)
        print(f"[{res.elapsed()}s] {name}: done", file=sys.stderr, flush=True)
        return value

    poller = HealthPoller(url)
    poller.start()
    proc = EngineProcess(argv, env, url, args.out, poller)
    texts: dict[str, Any] = {}

    def server_log_counts(start: int) -> dict[str, int]:
        """What the engine's log shows of health checks: one-token prefills of an uncached prompt are
        what a health check's generation (input_ids [0], one new token) looks like."""
        path = args.out / f"server-{start}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        lines = text.splitlines()
        return {
            "prefill_batches": sum("Prefill batch" in ln for ln in lines),
            "one_token_uncached_prefills": sum("#new-token: 1, #cached-token: 0," in ln for ln in lines),
            "get_health_200": sum('"GET /health HTTP/1.1" 200' in ln for ln in lines),
            "get_health_503": sum('"GET /health HTTP/1.1" 503' in ln for ln in lines),
            "get_health_generate": sum('"GET /health_generate HTTP/1.1"' in ln for ln in lines),
            "health_check_failed": sum("Health check failed" in ln for ln in lines),
        }

    # 1. start, no adapters
    def launch() -> dict[str, Any]:
        pid = proc.start()
        seen = proc.wait_healthy(300)
        return {"pid": pid, **seen, "models": models()}

    started = section("launch", launch)
    if not started or not started.get("healthy_s"):
        proc_log = (args.out / "server-1.log").read_text(errors="replace")[-4000:]
        res.put("fatal", {"message": "the engine did not become healthy", "server_log_tail": proc_log})
        if proc.alive():
            proc.kill()
        return 1

    # 2. the plan holds a0..a3: one agent step
    def step1() -> dict[str, Any]:
        s = step("plan a0..a3")
        m = models()
        s["models"] = m
        listed = [c["id"] for c in m["body"]["data"]] if m["status"] == 200 else []
        s["all_four_loaded"] = all(n in listed for n in GOOD)
        s["loadedSha256_as_expected"] = s["report"]["loadedSha256"] == {n: sha[n] for n in GOOD}
        s["report_keys"] = sorted(s["report"])
        s["podUid_absent"] = "podUid" not in s["report"]
        s["second_step_calls"] = step("again, nothing to do")["engine_calls"]
        return s

    section("step1_load_four", step1)

    def outputs() -> dict[str, Any]:
        out = {"base": chat(SERVED)}
        for n in GOOD:
            out[f"{SERVED}:{n}"] = chat(f"{SERVED}:{n}")
        for k, v in out.items():
            texts[k] = v.get("text")
        return {
            "full_response_example": out[f"{SERVED}:a0"],
            "texts": {k: short(v) for k, v in out.items()},
            "adapters_differ_from_base": {n: texts[f"{SERVED}:{n}"] != texts["base"] for n in GOOD},
        }

    section("outputs_after_step1", outputs)

    # 3. wrong-rank and corrupt join the plan
    def step2() -> dict[str, Any]:
        state["names"] = GOOD + BAD
        s = step("plan a0..a3 + wrong-rank + corrupt")
        s["models"] = models()
        s["health_after"] = http(url + "/health", timeout=30)["status"]
        s["next_step"] = step("again: refusals are not retried")
        errors = s["report"]["errors"]
        s["error_reasons"] = {e["name"]: e["reason"] for e in errors}
        s["both_refused"] = s["error_reasons"] == dict.fromkeys(sorted(BAD), "Refused")
        s["loads_sent"] = [c["request"]["lora_name"] for c in s["engine_calls"] if c["path"] == "/load_lora_adapter"]
        s["next_step_loads_sent"] = [
            c["request"]["lora_name"] for c in s["next_step"]["engine_calls"] if c["path"] == "/load_lora_adapter"
        ]
        s["next_step_errors_kept"] = s["next_step"]["report"]["errors"] == errors
        s["podUid_absent"] = "podUid" not in s["report"]
        return s

    section("step2_bad_adapters", step2)

    def direct() -> dict[str, Any]:
        out = {}
        for name, path in [
            ("direct-wrong-rank", str(adapters / "wrong-rank")),
            ("direct-corrupt", str(adapters / "corrupt")),
            ("direct-missing", str(work / "no-such-adapter")),
        ]:
            out[name] = http(url + "/load_lora_adapter", "POST", {"lora_name": name, "lora_path": path})
        out["unload-never-loaded"] = http(url + "/unload_lora_adapter", "POST", {"lora_name": "never-loaded"})
        out["load-missing-field"] = http(url + "/load_lora_adapter", "POST", {"lora_name": "x"})
        out["models_after"] = models()
        out["health_after"] = http(url + "/health", timeout=30)["status"]
        return out

    section("direct_bad_loads", direct)

    # 4. a0 leaves the plan
    def step3() -> dict[str, Any]:
        state["names"] = GOOD[1:] + BAD
        s = step("plan a1..a3 + wrong-rank + corrupt")
        m = models()
        s["models"] = m
        s["a0_unloaded"] = m["status"] == 200 and "a0" not in [c["id"] for c in m["body"]["data"]]
        s["calls_sent"] = [
            (c["path"], (c.get("request") or {}).get("lora_name")) for c in s["engine_calls"] if c["method"] == "POST"
        ]
        return s

    section("step3_remove_a0", step3)

    def after_unload() -> dict[str, Any]:
        r = chat(f"{SERVED}:a0")
        return {
            "request": r,
            "equals_a0_before_unload": r.get("text") == texts.get(f"{SERVED}:a0"),
            "equals_base": r.get("text") == texts.get("base"),
            "models_after_request": models(),
            "agent_step_after": step("a0 requested after unload"),
            "models_after_agent_step": models(),
        }

    section("request_unloaded_a0", after_unload)

    def bare() -> dict[str, Any]:
        out = {
            "base": chat(SERVED),
            "bare a1": chat("a1"),
            f"{SERVED}:a1": chat(f"{SERVED}:a1"),
            "lora_path field a1": chat(SERVED, lora_path="a1"),
            "other-base:a1": chat("other-base:a1"),
        }
        t = {k: v.get("text") for k, v in out.items()}
        return {
            "texts": {k: short(v) for k, v in out.items()},
            "bare_equals_base": t["bare a1"] == t["base"],
            "bare_equals_colon": t["bare a1"] == t[f"{SERVED}:a1"],
            "colon_equals_a1_before": t[f"{SERVED}:a1"] == texts.get(f"{SERVED}:a1"),
            "lora_path_field_equals_colon": t["lora_path field a1"] == t[f"{SERVED}:a1"],
            "other_base_prefix_equals_colon": t["other-base:a1"] == t[f"{SERVED}:a1"],
            "bare_full_response": out["bare a1"],
        }

    section("bare_vs_colon", bare)

    def stream(model: str) -> dict[str, Any]:
        body = {
            "model": model,
            "messages": PROMPT,
            "temperature": 0,
            "max_tokens": 8,
            "ignore_eos": True,
            "stream": True,
        }
        req = urllib.request.Request(  # noqa: S310
            url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        rec: dict[str, Any] = {"request": body}
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
                rec["status"], rec["content_type"], raw = resp.status, resp.headers.get("Content-Type"), resp.read()
        except urllib.error.HTTPError as exc:
            rec["status"], raw = exc.code, exc.read()
            rec["content_type"] = exc.headers.get("Content-Type") if exc.headers else None
        text = raw.decode(errors="replace")
        lines = text.split("\n")
        events = [line for line in lines if line.strip()]
        rec.update(
            lines_total=len(lines),
            events_total=len(events),
            blank_line_between_events=all(lines[i + 1] == "" for i, ln in enumerate(lines[:-1]) if ln.strip()),
            first_5=events[:5],
            last_3=events[-3:],
        )
        if len(events) <= 8:
            rec["all"] = events
        return rec

    section("never_loaded", lambda: {"chat": chat(f"{SERVED}:never"), "stream": stream(f"{SERVED}:never")})

    section("stream", lambda: {"a1": stream(f"{SERVED}:a1"), "base": stream(SERVED)})

    def probes() -> dict[str, Any]:
        out = {}
        for path in ("/ready", "/health", "/health_generate", "/v1/models/" + SERVED, "/v1/models/a1", "/model_info"):
            r = http(url + path, timeout=30)
            out[path] = {k: r.get(k) for k in ("status", "body", "content_type", "seconds")}
        return out

    section("probes", probes)

    def metrics() -> dict[str, Any]:
        r = http(url + "/metrics", timeout=30)
        body = r.get("body") if isinstance(r.get("body"), str) else json.dumps(r.get("body"))
        lines = body.splitlines()
        matching = [line for line in lines if "sglang:" in line]
        families = sorted({line.split()[2] for line in lines if line.startswith("# TYPE ")})
        return {
            "status": r["status"],
            "content_type": r.get("content_type"),
            "first_60_sglang_lines": matching[:60],
            "families": families,
            "lora_lines": [line for line in lines if "lora" in line.lower() and not line.startswith("#")],
            "samples_total": sum(1 for line in lines if line and not line.startswith("#")),
        }

    section("metrics", metrics)

    def health_idle() -> dict[str, Any]:
        """Does /health generate? The engine's log before and after five sequential /health calls,
        then after two /health_generate calls (which always generate)."""
        time.sleep(1)
        before = server_log_counts(proc.starts)
        health = [http(url + "/health", timeout=30) for _ in range(5)]
        time.sleep(1.5)
        after_health = server_log_counts(proc.starts)
        generate = [http(url + "/health_generate", timeout=30) for _ in range(2)]
        time.sleep(1.5)
        after_generate = server_log_counts(proc.starts)
        return {
            "health": [{k: r.get(k) for k in ("status", "body", "content_type", "seconds")} for r in health],
            "health_generate": [{k: r.get(k) for k in ("status", "seconds")} for r in generate],
            "log_before": before,
            "log_after_5_health": after_health,
            "log_after_2_health_generate": after_generate,
            "note": "the poller's /health calls fall in these windows too",
        }

    section("health_idle", health_idle)

    # 5. the engine dies and comes back with the same argv
    def restart() -> dict[str, Any]:
        out: dict[str, Any] = {"before": step("before the kill"), "models_before": models()}
        out["gpu_memory_used_before"] = gpu_memory_used()
        out["kill"] = proc.kill(signal.SIGKILL)
        out["step_while_down"] = step("engine killed")
        t0 = time.monotonic()
        out["new_pid"] = proc.start()
        ticks: list[dict[str, Any]] = []
        last = [0.0]

        def tick(now: float) -> None:  # the agent keeps its 2 s interval while the engine starts
            if now - last[0] >= 2.0:
                last[0] = now
                s = step("engine starting")
                calls = [
                    (
                        c["path"],
                        (c.get("request") or {}).get("lora_name"),
                        c.get("status"),
                        c.get("engine_down", "")[:80],
                    )
                    for c in s["engine_calls"]
                ]
                report = s["report"]
                ticks.append(
                    {
                        "at_s": round(now, 1),
                        "engineUp": report["engineUp"],
                        "adapters": report["adapters"],
                        "calls": calls,
                    }
                )

        out["wait"] = proc.wait_healthy(180, on_tick=tick)
        out["restart_to_healthy_s"] = round(time.monotonic() - t0, 1)
        out["agent_steps_while_starting"] = ticks
        out["models_at_healthy"] = models()
        out["after"] = step("engine healthy again")
        m = models()
        out["models_after"] = m
        listed = [c["id"] for c in m["body"]["data"]] if m["status"] == 200 else []
        out["reloaded_all_planned_good"] = all(n in listed for n in GOOD[1:])
        out["outputs_after"] = {n: short(chat(f"{SERVED}:{n}")) for n in GOOD[1:]}
        out["outputs_equal_before"] = {
            n: out["outputs_after"][n]["text"] == texts.get(f"{SERVED}:{n}") for n in GOOD[1:]
        }
        first_up = next((t for t in ticks if t["engineUp"]), None)
        out["first_agent_step_engine_up"] = first_up
        # every load the agent sent to the new engine, by name (each refused file should be tried once)
        sent = [c[1] for t in ticks for c in t["calls"] if c[0] == "/load_lora_adapter"]
        sent += [
            (c.get("request") or {}).get("lora_name")
            for c in out["after"]["engine_calls"]
            if c["path"] == "/load_lora_adapter"
        ]
        out["loads_sent_to_new_engine"] = {n: sent.count(n) for n in sorted(set(sent), key=str)}
        out["after_error_reasons"] = {e["name"]: e["reason"] for e in out["after"]["report"]["errors"]}
        return out

    section("restart", restart, min_left=100)

    # 6. a second load under a loaded name; pinned loads and the pin limit
    def duplicate() -> dict[str, Any]:
        def load(name: str, path: str) -> dict[str, Any]:
            return http(url + "/load_lora_adapter", "POST", {"lora_name": name, "lora_path": path})

        return {
            "same_name_same_path": load("a1", cached["a1"]),
            "same_name_other_path": load("a1", cached["a2"]),
            "other_name_same_path": load("a1-copy", cached["a1"]),
            "models_after": models(),
        }

    section("duplicate", duplicate)

    def pinned() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, n in enumerate(GOOD):
            out[f"p{i}"] = http(
                url + "/load_lora_adapter", "POST", {"lora_name": f"p{i}", "lora_path": cached[n], "pinned": True}
            )
        out["models_after"] = models()
        out["request_p0"] = short(chat(f"{SERVED}:p0"))
        out["p0_equals_a0"] = out["request_p0"]["text"] == texts.get(f"{SERVED}:a0")
        out["agent_step_after"] = step("pinned p* present, not planned")
        out["models_after_agent_step"] = models()
        return out

    section("pinned", pinned)

    def scheduler_stopped() -> dict[str, Any]:
        """The scheduler process stopped (SIGSTOP), as a hung engine: what /health, /v1/models, the
        agent and /health_generate say, then the same after SIGCONT."""
        assert proc.proc is not None
        members = group_members(proc.proc.pid)
        sched = [m for m in members if "scheduler" in m["cmdline"]]
        if not sched:
            return {"skipped": "no scheduler process in the engine's group", "group": members}
        pid = sched[0]["pid"]
        out: dict[str, Any] = {"scheduler_pid": pid, "before": server_log_counts(proc.starts)}
        keep = ("status", "seconds", "error")
        os.kill(pid, signal.SIGSTOP)
        try:
            out["health_while_stopped"] = [
                {k: v for k, v in http(url + "/health", timeout=5).items() if k in keep} for _ in range(3)
            ]
            out["models_while_stopped"] = {k: v for k, v in models().items() if k in keep}
            out["agent_step_while_stopped"] = step("scheduler stopped")["report"]
            out["health_generate_while_stopped"] = http(url + "/health_generate", timeout=40)
            out["health_after_failed_generate"] = [
                {k: v for k, v in http(url + "/health", timeout=5).items() if k in keep} for _ in range(2)
            ]
        finally:
            os.kill(pid, signal.SIGCONT)
        out["health_generate_after_cont"] = {
            k: v for k, v in http(url + "/health_generate", timeout=40).items() if k in keep
        }
        out["health_after_cont"] = {k: v for k, v in http(url + "/health", timeout=5).items() if k in keep}
        out["chat_after_cont"] = short(chat(SERVED))
        time.sleep(1)
        out["after"] = server_log_counts(proc.starts)
        return out

    section("scheduler_stopped", scheduler_stopped, min_left=60)

    def finish() -> dict[str, Any]:
        out = {
            "health": http(url + "/health", timeout=30)["status"],
            "kill": proc.kill(signal.SIGTERM) if proc.alive() else None,
            "server_logs": {f"server-{n}.log": server_log_counts(n) for n in range(1, proc.starts + 1)},
        }
        return out

    section("finish", finish)
    poller.halt.set()
    poller.join(timeout=10)
    res.put("health_poll_samples", poller.samples)
    res.put("total_s", res.elapsed())
    return 0


if __name__ == "__main__":
    sys.exit(main())
