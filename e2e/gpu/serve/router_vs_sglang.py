"""The operator's OpenAI-compatible router in front of a real SGLang engine, without Kubernetes: the
router runs as ``kimi-operator router --spec-file`` against one engine, the official ``openai`` client
talks to both, and every answer is written down (texts, status codes, bodies, stream chunks, the
router's metrics, latencies), so the router's and the SGLang stand-in's (e2e/engines/sglang_standin.py)
assumptions can be checked against the real engine.

    PYTHONPATH=<router wheels>:<sglang site> python3 router_vs_sglang.py \
        --work DIR --site SITE --router-pythonpath PATHS --out OUT

DIR holds what make_tiny.py built (DIR/model, DIR/models/adapters/a0..a3). The engine starts with
a0 and a1 (``--lora-paths``), served as ``kimi-k2.5``; the router's spec lists a0, a1 and a2 (a2 is
never loaded on the engine, a3 is loaded there but not in the spec). The router is started first,
then the engine; both are stopped by their PIDs at the end. Everything goes into OUT/results.json,
rewritten after each section, so a run cut short still leaves what it saw. ``--engine-cmd`` replaces
``python3 -m sglang.launch_server`` (a local dry run against the stand-in).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client as httpclient
import json
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
    import openai
except ImportError as exc:
    print(
        f"FATAL: the openai client cannot be imported ({exc}): put its wheels' directory on PYTHONPATH", file=sys.stderr
    )
    sys.exit(2)

SERVED = "kimi-k2.5"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
COMPLETION_PROMPT = "The capital of France is"
SPEC_ADAPTERS = ["a0", "a1", "a2"]
START_ADAPTERS = ["a0", "a1"]
MAX_TOKENS = 8


# ---------------------------------------------------------------------------------------------
# Plumbing


def http(
    url: str, method: str = "GET", body: Any = None, timeout: float = 60.0, limit: int | None = 20000
) -> dict[str, Any]:
    """One request; the status, the content type, Retry-After and the body verbatim (parsed when JSON)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 (local servers, http URLs built here)
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    t0 = time.monotonic()
    rec: dict[str, Any] = {"method": method, "url": url}
    if body is not None:
        rec["request"] = body
    headers = None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (local servers)
            rec["status"], raw, headers = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        rec["status"], raw, headers = exc.code, exc.read(), exc.headers
    except Exception as exc:  # refused, reset, timeout
        rec["status"], rec["error"] = None, f"{type(exc).__name__}: {exc}"
        rec["seconds"] = round(time.monotonic() - t0, 3)
        return rec
    rec["seconds"] = round(time.monotonic() - t0, 3)
    if headers is not None:
        rec["content_type"] = headers.get("Content-Type")
        if headers.get("Retry-After"):
            rec["retry_after"] = headers.get("Retry-After")
    text = raw.decode(errors="replace")
    try:
        rec["body"] = json.loads(text) if text else ""
    except ValueError:
        rec["body"] = text if limit is None or len(text) <= limit else text[:limit] + "..."
    return rec


def sse_raw(url: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """A streamed request read as bytes: status, content type and each event verbatim."""
    req = urllib.request.Request(  # noqa: S310 (local servers)
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    rec: dict[str, Any] = {"url": url, "request": body}
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (local servers)
            rec["status"], raw = resp.status, resp.read()
            rec["content_type"] = resp.headers.get("Content-Type")
            rec["transfer_encoding"] = resp.headers.get("Transfer-Encoding")
    except urllib.error.HTTPError as exc:
        rec["status"], raw = exc.code, exc.read()
        rec["content_type"] = exc.headers.get("Content-Type") if exc.headers else None
        rec["retry_after"] = exc.headers.get("Retry-After") if exc.headers else None
    except Exception as exc:
        rec["status"], rec["error"] = None, f"{type(exc).__name__}: {exc}"
        return rec
    text = raw.decode(errors="replace")
    if rec["content_type"] and rec["content_type"].startswith("text/event-stream"):
        rec["events"] = [e for e in text.split("\n\n") if e.strip()]
        rec["ends_with_blank_line"] = text.endswith("\n\n")
    else:
        try:
            rec["body"] = json.loads(text)
        except ValueError:
            rec["body"] = text
    return rec


def events_summary(events: list[str]) -> dict[str, Any]:
    """The shape of an event stream: per event its keys, choices count, delta keys, usage."""
    shapes = []
    text = ""
    for e in events:
        if not e.startswith("data: "):
            shapes.append({"raw": e[:200]})
            continue
        payload = e[len("data: ") :]
        if payload == "[DONE]":
            shapes.append("[DONE]")
            continue
        try:
            data = json.loads(payload)
        except ValueError:
            shapes.append({"unparsed": payload[:200]})
            continue
        choices = data.get("choices")
        shape: dict[str, Any] = {"keys": sorted(data), "n_choices": len(choices) if isinstance(choices, list) else None}
        if "usage" in data:
            shape["usage"] = data["usage"]
        if isinstance(choices, list) and choices:
            c = choices[0]
            shape["choice_keys"] = sorted(c)
            if "delta" in c:
                shape["delta"] = c["delta"]
                text += (c["delta"] or {}).get("content") or ""
            if "text" in c:
                text += c.get("text") or ""
            if c.get("finish_reason"):
                shape["finish_reason"] = c["finish_reason"]
        shapes.append(shape)
    return {"n_events": len(events), "text": text, "shapes": shapes}


def pct(values: list[float], p: float) -> float:
    """The p-th percentile, linear between closest ranks."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats_ms(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": round(1000 * sum(values) / len(values), 3),
        "p50": round(1000 * pct(values, 50), 3),
        "p90": round(1000 * pct(values, 90), 3),
        "p99": round(1000 * pct(values, 99), 3),
        "min": round(1000 * min(values), 3),
        "max": round(1000 * max(values), 3),
    }


class Proc:
    """A server started here in a process group of its own (setsid), its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.argv, self.env, self.log_path = argv, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> int:
        out = open(self.log_path, "wb")  # noqa: SIM115 (kept for the process)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> dict[str, Any]:
        """SIGTERM to the PID, then SIGKILL to its own process group if anything is left after ``grace``."""
        if self.proc is None:
            return {"started": False}
        pid = self.proc.pid
        rec: dict[str, Any] = {"pid": pid}
        t0 = time.monotonic()
        if self.proc.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                rec["sigkill"] = True
                os.kill(pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        rec["returncode"] = self.proc.returncode
        rec["exit_seconds"] = round(time.monotonic() - t0, 2)
        deadline = time.monotonic() + 10
        while group_members(pid) and time.monotonic() < deadline:
            time.sleep(0.3)
        left = [m["pid"] for m in group_members(pid)]
        if left:
            rec["group_killed"] = left
            os.killpg(pid, signal.SIGKILL)
        return rec


# ---------------------------------------------------------------------------------------------
# Latency: plain HTTP/1.1 keep-alive clients (the same for the engine and the router)


class Timer:
    """POST chat completions over one keep-alive connection and time them."""

    def __init__(self, base: str) -> None:
        host_port = base.split("//", 1)[1]
        host, _, port = host_port.partition(":")
        self.host, self.port = host, int(port)
        self.conn = httpclient.HTTPConnection(self.host, self.port, timeout=60)

    def close(self) -> None:
        self.conn.close()

    def _send(self, payload: bytes, headers: dict[str, str]) -> tuple[httpclient.HTTPResponse, bool]:
        """The answer's head, and whether the kept connection had to be replaced for it."""
        try:
            self.conn.request("POST", "/v1/chat/completions", payload, headers)
            return self.conn.getresponse(), False
        except (OSError, httpclient.HTTPException):
            self.conn.close()
            self.conn = httpclient.HTTPConnection(self.host, self.port, timeout=60)
            self.conn.request("POST", "/v1/chat/completions", payload, headers)
            return self.conn.getresponse(), True

    def one(self, model: str, stream: bool, trace_id: str = "", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": PROMPT,
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            **(extra or {}),
        }
        if stream:
            body["stream"] = True
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if trace_id:
            headers["X-Trace-Id"] = trace_id
        started = time.monotonic()
        t0 = time.perf_counter()
        resp, reconnected = self._send(payload, headers)
        first_byte = first_content = None
        buf = b""
        while True:
            piece = resp.read1(65536) if stream else resp.read()
            if not piece:
                break
            now = time.perf_counter()
            if first_byte is None:
                first_byte = now - t0
            if stream and first_content is None:
                buf += piece
                while first_content is None and (end := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[:end], buf[end + 2 :]
                    if event.startswith(b"data: {"):
                        try:
                            delta = json.loads(event[6:])["choices"][0]["delta"]
                        except (ValueError, KeyError, IndexError, TypeError):
                            continue
                        if delta.get("content"):
                            first_content = now - t0
            if not stream:
                break
        total = time.perf_counter() - t0
        if resp.will_close:
            self.conn.close()
            self.conn = httpclient.HTTPConnection(self.host, self.port, timeout=60)
        return {
            "status": resp.status,
            "total": total,
            "first_byte": first_byte,
            "first_content": first_content,
            "id": trace_id,
            "start": started,
            "reconnected": reconnected,
        }


def run_sequential(urls: dict[str, str], model: str, n: int, stream: bool) -> dict[str, Any]:
    """n requests to each target, alternating targets request by request (drift hits both alike)."""
    timers = {name: Timer(u) for name, u in urls.items()}
    got: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    try:
        for t in timers.values():  # warm-up: connection, caches
            for _ in range(3):
                t.one(model, stream)
        for i in range(n):
            order = list(timers) if i % 2 == 0 else list(reversed(timers))
            for name in order:
                got[name].append(timers[name].one(model, stream))
    finally:
        for t in timers.values():
            t.close()
    return summarise(got, stream)


def run_concurrent(
    urls: dict[str, str],
    model: str,
    workers: int,
    per_worker: int,
    stream: bool,
    *,
    label: str = "",
    extras: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``workers`` threads, each with its own connection, ``per_worker`` requests each; the targets in
    A B B A order (each run twice, halves combined). Every request carries an ``X-Trace-Id``
    (label/target/half/worker/i) and its row is kept (``rows``: start on the monotonic clock, first
    byte, total), so slow requests can be matched with the router's trace. ``extras``: request fields
    added for a target."""
    got: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    walls: dict[str, list[float]] = {name: [] for name in urls}
    names = list(urls)
    order = names + list(reversed(names))
    for half, name in enumerate(order):

        def work(w: int, base: str = urls[name], name: str = name, half: int = half) -> list[dict[str, Any]]:
            t = Timer(base)
            extra = (extras or {}).get(name)
            try:
                t.one(model, stream, extra=extra)  # warm-up: the connection
                return [t.one(model, stream, f"{label}/{name}/{half}/{w}/{i}", extra) for i in range(per_worker // 2)]
            finally:
                t.close()

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for rows in pool.map(work, range(workers)):
                got[name].extend(rows)
        walls[name].append(time.perf_counter() - t0)
    out = summarise(got, stream)
    for name in names:
        n = len(got[name])
        out[name]["wall_s"] = [round(w, 3) for w in walls[name]]
        out[name]["requests_per_s"] = round(n / sum(walls[name]), 1) if walls[name] else None
    keys = ("id", "start", "first_byte", "first_content", "total", "status", "reconnected")
    out["rows"] = [[r.get(k) for k in keys] for name in names for r in got[name]]
    out["row_keys"] = list(keys)
    return out


def summarise(got: dict[str, list[dict[str, Any]]], stream: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rows in got.items():
        codes: dict[str, int] = {}
        for r in rows:
            codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
        ok = [r for r in rows if r["status"] == 200]
        out[name] = {"codes": codes, "total_ms": stats_ms([r["total"] for r in ok])}
        if stream:
            out[name]["first_byte_ms"] = stats_ms([r["first_byte"] for r in ok if r["first_byte"] is not None])
            out[name]["first_content_ms"] = stats_ms([r["first_content"] for r in ok if r["first_content"] is not None])
    if "direct" in out and "router" in out:
        added: dict[str, Any] = {}
        for metric in ("total_ms", "first_byte_ms", "first_content_ms"):
            d, r = out["direct"].get(metric), out["router"].get(metric)
            if d and r and d.get("n") and r.get("n"):
                added[metric] = {p: round(r[p] - d[p], 3) for p in ("mean", "p50", "p90", "p99")}
        out["added_by_router_ms"] = added
    return out


# ---------------------------------------------------------------------------------------------
# The openai client


def client_call(
    client: openai.OpenAI, kind: str, model: str, *, stream: bool, include_usage: bool | None = None
) -> dict[str, Any]:
    """One call through the official client; what it returned or raised."""
    kwargs: dict[str, Any] = {
        "model": model,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "extra_body": {"ignore_eos": True},
    }
    if stream:
        kwargs["stream"] = True
        if include_usage is not None:
            kwargs["stream_options"] = {"include_usage": include_usage}
    rec: dict[str, Any] = {"kind": kind, "model": model, "stream": stream}
    if include_usage is not None:
        rec["include_usage"] = include_usage
    t0 = time.monotonic()
    try:
        if kind == "chat":
            result = client.chat.completions.create(messages=PROMPT, **kwargs)
        else:
            result = client.completions.create(prompt=COMPLETION_PROMPT, **kwargs)
        if not stream:
            choice = result.choices[0]
            rec["text"] = choice.message.content if kind == "chat" else choice.text
            rec["model_echoed"] = result.model
            rec["finish_reason"] = choice.finish_reason
            rec["usage"] = result.usage.model_dump() if result.usage else None
            rec["id"] = result.id
        else:
            chunks = []
            text = ""
            for chunk in result:
                dumped = chunk.model_dump()
                chunks.append(dumped)
                for c in chunk.choices:
                    piece = c.delta.content if kind == "chat" else c.text
                    text += piece or ""
            rec["text"] = text
            rec["n_chunks"] = len(chunks)
            rec["models_echoed"] = sorted({c.get("model") for c in chunks})
            rec["usage_chunks"] = [
                {"n_choices": len(c.get("choices") or []), "usage": c.get("usage")} for c in chunks if c.get("usage")
            ]
            rec["empty_choice_chunks"] = sum(1 for c in chunks if not c.get("choices"))
            rec["first_chunk"] = chunks[0] if chunks else None
            rec["last_chunks"] = chunks[-2:]
            rec["finish_reasons"] = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")][-1:]
        rec["ok"] = True
    except openai.APIStatusError as exc:
        rec["ok"] = False
        rec["error_class"] = type(exc).__name__
        rec["status"] = exc.status_code
        rec["body"] = exc.body
        rec["response_text"] = exc.response.text[:2000]
        rec["content_type"] = exc.response.headers.get("content-type")
        rec["retry_after"] = exc.response.headers.get("retry-after")
    except Exception as exc:  # a stream broken by an error event, a connection error
        rec["ok"] = False
        rec["error_class"] = type(exc).__name__
        rec["error"] = str(exc)[:2000]
        body = getattr(exc, "body", None)
        if body is not None:
            rec["body"] = body
    rec["seconds"] = round(time.monotonic() - t0, 3)
    return rec


# ---------------------------------------------------------------------------------------------
# The run


def write_spec(path: Path) -> dict[str, Any]:
    spec = {
        "apiVersion": "kimi-operator.io/v1alpha1",
        "kind": "LoraServer",
        "metadata": {"name": "kimi", "namespace": "default"},
        "spec": {"model": {"name": "kimi"}, "adapters": [{"name": n, "path": f"/x/{n}"} for n in SPEC_ADAPTERS]},
    }
    path.write_text(json.dumps(spec, indent=1))
    return spec


def model_ids(rec: dict[str, Any]) -> list[str] | None:
    body = rec.get("body")
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        return [c.get("id") for c in body["data"]]
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--adapters", type=Path, default=None, help="default: WORK/models/adapters")
    parser.add_argument("--model", type=Path, default=None, help="default: WORK/model")
    parser.add_argument("--site", default="", help="the SGLang site directory (the engine's PYTHONPATH)")
    parser.add_argument("--router-pythonpath", required=True, help="the router's PYTHONPATH (operator/ and its needs)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine-port", type=int, default=30000)
    parser.add_argument("--router-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=9090)
    parser.add_argument("--budget-s", type=float, default=480.0, help="no new section starts after this")
    parser.add_argument(
        "--engine-start-s", type=float, default=330.0, help="how long the engine may take to be healthy"
    )
    parser.add_argument("--engine-cmd", default=None, help="JSON argv replacing `python3 -m sglang.launch_server`")
    parser.add_argument("--n-seq", type=int, default=100, help="sequential requests per target")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--per-worker", type=int, default=20, help="requests per concurrent worker and target")
    parser.add_argument("--stream-rounds", type=int, default=3, help="rounds of the concurrent stream run")
    parser.add_argument(
        "--freeze-gc-after", type=int, default=-1, help="POST the engine's /freeze_gc before this stream round"
    )
    parser.add_argument(
        "--gc-warning-s", type=float, default=0.05, help="the engine's --gc-warning-threshold-secs (0: off)"
    )
    parser.add_argument(
        "--router-trace", action=argparse.BooleanOptionalAction, default=False,
        help="run the router through traced_router.py (OUT/router-trace.jsonl): a timeline per request, at some cost",
    )  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = Results(args.out / "results.json")
    work = args.work.resolve()
    adapters = (args.adapters or work / "models" / "adapters").resolve()
    model_dir = (args.model or work / "model").resolve()
    engine = f"http://127.0.0.1:{args.engine_port}"
    router = f"http://127.0.0.1:{args.router_port}"
    metrics_url = f"http://127.0.0.1:{args.metrics_port}/metrics"

    # -- setup -----------------------------------------------------------------------------------
    spec_path = work / "spec.json"
    spec = write_spec(spec_path)
    keys_dir = work / "keys"
    keys_dir.mkdir(exist_ok=True)
    prefix = json.loads(args.engine_cmd) if args.engine_cmd else [sys.executable, "-m", "sglang.launch_server"]
    engine_argv = [
        *prefix, "--model-path", str(model_dir), "--served-model-name", SERVED, "--enable-lora",
        "--lora-paths", *(f"{n}={adapters / n}" for n in START_ADAPTERS),
        "--max-lora-rank", "16", "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj",
        "--max-loras-per-batch", "4", "--max-loaded-loras", "4", "--lora-backend", "csgmv",
        "--attention-backend", "triton", "--sampling-backend", "pytorch", "--disable-cuda-graph",
        "--mem-fraction-static", "0.3", "--enable-metrics", "--host", "127.0.0.1", "--port", str(args.engine_port),
    ]  # fmt: skip
    if args.gc_warning_s > 0:
        # SGLang logs each collection of its HTTP process that takes longer (LONG GARBAGE COLLECTION).
        engine_argv += ["--gc-warning-threshold-secs", str(args.gc_warning_s)]
    engine_env = {**os.environ, "PYTHONPATH": args.site}
    engine_env.update(
        NCCL_NVLS_ENABLE="0",
        TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
        NVSHMEM_DISABLE_NVLS="1",
        SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION="false",
    )
    launcher = [str(Path(__file__).with_name("traced_router.py"))] if args.router_trace else ["-m", "kimi_operator"]
    router_argv = [
        sys.executable, *launcher, "router", "--spec-file", str(spec_path),
        "--engine", f"e0={engine}", "--host", "127.0.0.1", "--port", str(args.router_port),
        "--metrics-port", str(args.metrics_port), "--keys-dir", str(keys_dir),
    ]  # fmt: skip
    router_env = {**os.environ, "PYTHONPATH": args.router_pythonpath, "PYTHONUNBUFFERED": "1"}
    if args.router_trace:
        router_env["ROUTER_TRACE"] = str((args.out / "router-trace.jsonl").resolve())
    res.put(
        "setup",
        {
            "engine_argv": engine_argv,
            "engine_env": {
                k: engine_env[k]
                for k in sorted(engine_env)
                if k.startswith(("SGLANG_", "NCCL_", "TORCH_SYMM", "NVSHMEM_"))
            },
            "router_argv": router_argv,
            "router_pythonpath": args.router_pythonpath,
            "spec": spec,
            "openai_version": openai.__version__,
            "python": sys.version,
        },
    )
    eng = Proc(engine_argv, engine_env, args.out / "server.log")
    rtr = Proc(router_argv, router_env, args.out / "router.log")
    client_router = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=60)
    client_engine = openai.OpenAI(base_url=f"{engine}/v1", api_key="unused", max_retries=0, timeout=60)

    def section(name: str, fn: Callable[[], Any], *, min_left: float = 0.0) -> Any:
        left = args.budget_s - res.elapsed()
        if left < min_left:
            res.put(name, {"skipped": f"{left:.0f} s of the budget left, {min_left:.0f} needed"})
            return None
        print(f"[{res.elapsed()}s] section {name}", flush=True)
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception:
            value = {"exception": traceback.format_exc()}
        if isinstance(value, dict):
            value["_section_seconds"] = round(time.monotonic() - t0, 2)
        res.put(name, value)
        return value

    def router_lists(name: str) -> bool:
        return name in (model_ids(http(f"{router}/v1/models", timeout=5)) or [])

    def wait_router_listing(name: str, present: bool, limit: float = 10.0, every: float = 0.1) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if router_lists(name) == present:
                return round(time.monotonic() - t0, 2)
            time.sleep(every)
        return None

    try:
        # -- A. startup: the router first, then the engine ------------------------------------------
        def startup() -> dict[str, Any]:
            out: dict[str, Any] = {"router_pid": rtr.start()}
            t0 = time.monotonic()
            while time.monotonic() - t0 < 20 and http(f"{router}/health", timeout=2)["status"] != 200:
                if not rtr.alive():
                    out["router_exited"] = rtr.proc.returncode if rtr.proc else None
                    return out
                time.sleep(0.1)
            out["router_up_s"] = round(time.monotonic() - t0, 2)
            out["router_no_engine"] = {
                "health": http(f"{router}/health", timeout=5),
                "ready": http(f"{router}/ready", timeout=5),
                "models": http(f"{router}/v1/models", timeout=5),
                "chat_base": client_call(client_router, "chat", SERVED, stream=False),
                "chat_a0": client_call(client_router, "chat", "a0", stream=False),
            }
            out["engine_pid"] = eng.start()
            t0 = time.monotonic()
            samples: list[dict[str, Any]] = []
            during_warmup: dict[str, Any] = {}
            warm_thread: threading.Thread | None = None

            def warm_request() -> None:
                during_warmup["request"] = client_call(client_router, "chat", "a0", stream=False)
                during_warmup["engine_health_after"] = http(f"{engine}/health", timeout=5)["status"]

            first: dict[str, float] = {}
            while time.monotonic() - t0 < args.engine_start_s:
                if not eng.alive():
                    out["engine_exited"] = eng.proc.returncode if eng.proc else None
                    break
                t = round(time.monotonic() - t0, 1)
                h = http(f"{engine}/health", timeout=5)["status"]
                m = http(f"{engine}/v1/models", timeout=5)
                r = http(f"{router}/ready", timeout=5)["status"]
                rm = model_ids(http(f"{router}/v1/models", timeout=5))
                sample = {
                    "t": t,
                    "engine_health": h,
                    "engine_models": m["status"],
                    "router_ready": r,
                    "router_models": rm,
                }
                if not samples or {k: v for k, v in samples[-1].items() if k != "t"} != {
                    k: v for k, v in sample.items() if k != "t"
                }:
                    samples.append(sample)
                for key, ok in (
                    ("engine_models_200", m["status"] == 200),
                    ("router_ready_200", r == 200),
                    ("engine_health_200", h == 200),
                ):
                    if ok and key not in first:
                        first[key] = t
                if r == 200 and h != 200 and warm_thread is None:
                    during_warmup["sent_at_s"] = t
                    warm_thread = threading.Thread(target=warm_request, daemon=True)
                    warm_thread.start()
                if h == 200 and r == 200:
                    break
                time.sleep(0.5)
            if warm_thread is not None:
                warm_thread.join(90)
            out.update(first_s=first, changes=samples, request_while_engine_warming=during_warmup)
            out["engine_models"] = http(f"{engine}/v1/models")
            out["router_models"] = http(f"{router}/v1/models")
            out["healthy"] = "engine_health_200" in first and "router_ready_200" in first
            return out

        start = section("startup", startup)
        if not (start and start.get("healthy")):
            print("engine or router never became ready; see server.log / router.log", file=sys.stderr)
            return 1

        # -- B. answers: base, a0, a1 through the router and straight to the engine ---------------------
        def answers() -> dict[str, Any]:
            cases = [
                ("engine", client_engine, SERVED),
                ("engine", client_engine, f"{SERVED}:a0"),
                ("engine", client_engine, f"{SERVED}:a1"),
                ("engine", client_engine, "a0"),
                ("engine", client_engine, "a1"),
                ("router", client_router, SERVED),
                ("router", client_router, "a0"),
                ("router", client_router, f"{SERVED}:a0"),
                ("router", client_router, "a1"),
                ("router", client_router, f"{SERVED}:a1"),
            ]
            calls = []
            for where, client, model in cases:
                for stream, usage in ((False, None), (True, None), (True, True)):
                    rec = client_call(client, "chat", model, stream=stream, include_usage=usage)
                    rec["where"] = where
                    calls.append(rec)
            comp = []
            for where, client, model in (
                ("engine", client_engine, SERVED),
                ("engine", client_engine, f"{SERVED}:a0"),
                ("router", client_router, SERVED),
                ("router", client_router, "a0"),
            ):
                for stream, usage in ((False, None), (True, True)):
                    rec = client_call(client, "completion", model, stream=stream, include_usage=usage)
                    rec["where"] = where
                    comp.append(rec)

            def text(
                where: str, model: str, stream: bool = False, usage: bool | None = None, kind: str = "chat"
            ) -> Any:
                pool = calls if kind == "chat" else comp
                for r in pool:
                    if (
                        r["where"] == where
                        and r["model"] == model
                        and r["stream"] == stream
                        and r.get("include_usage") == usage
                    ):
                        return r.get("text") if r.get("ok") else f"<{r.get('status')}>"
                return None

            base = text("engine", SERVED)
            checks: dict[str, Any] = {}
            for a in ("a0", "a1"):
                ref = text("engine", f"{SERVED}:{a}")
                checks[a] = {
                    "engine_prefixed": ref,
                    "differs_from_base": ref != base,
                    "router_bare_equals_engine_prefixed": text("router", a) == ref,
                    "router_prefixed_equals_engine_prefixed": text("router", f"{SERVED}:{a}") == ref,
                    "router_streams_equal": text("router", a, True) == ref and text("router", a, True, True) == ref,
                    "engine_bare_equals_base": text("engine", a) == base,
                    "engine_bare_text": text("engine", a),
                }
            checks["base"] = {
                "engine": base,
                "router_equals_engine": text("router", SERVED) == base,
                "router_stream_equals": text("router", SERVED, True) == base,
            }
            checks["completion"] = {
                "engine_base": text("engine", SERVED, kind="completion"),
                "engine_a0": text("engine", f"{SERVED}:a0", kind="completion"),
                "router_base_equal": text("router", SERVED, kind="completion")
                == text("engine", SERVED, kind="completion"),
                "router_a0_equal": text("router", "a0", kind="completion")
                == text("engine", f"{SERVED}:a0", kind="completion"),
                "router_a0_stream_equal": text("router", "a0", True, True, kind="completion")
                == text("engine", f"{SERVED}:a0", kind="completion"),
            }
            checks["every_stream_equals_its_sync"] = all(
                r.get("text") == text(r["where"], r["model"]) for r in calls if r["stream"] and r.get("ok")
            )
            checks["all_ok"] = all(r.get("ok") for r in calls + comp)
            # The bytes on the wire, for the stand-in comparison.
            raw: dict[str, Any] = {}
            body = {"messages": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
            for where, base_url, model in (("engine", engine, f"{SERVED}:a0"), ("router", router, "a0")):
                raw[f"{where}_chat"] = http(f"{base_url}/v1/chat/completions", "POST", {"model": model, **body})
                for usage in (None, True, False):
                    extra: dict[str, Any] = {"stream": True}
                    if usage is not None:
                        extra["stream_options"] = {"include_usage": usage}
                    rec = sse_raw(f"{base_url}/v1/chat/completions", {"model": model, **body, **extra})
                    rec["summary"] = events_summary(rec.get("events") or [])
                    raw[f"{where}_chat_stream_usage_{usage}"] = rec
                comp_body = {
                    "model": model,
                    "prompt": COMPLETION_PROMPT,
                    "temperature": 0,
                    "max_tokens": MAX_TOKENS,
                    "ignore_eos": True,
                }
                raw[f"{where}_completion"] = http(f"{base_url}/v1/completions", "POST", comp_body)
                rec = sse_raw(
                    f"{base_url}/v1/completions",
                    {**comp_body, "stream": True, "stream_options": {"include_usage": True}},
                )
                rec["summary"] = events_summary(rec.get("events") or [])
                raw[f"{where}_completion_stream_usage_True"] = rec
            return {"checks": checks, "chat_calls": calls, "completion_calls": comp, "raw": raw}

        section("answers", answers, min_left=60)

        # -- C. latency -------------------------------------------------------------------------------
        urls = {"direct": engine, "router": router}
        model = f"{SERVED}:a0"

        def latency() -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS}
            out["sequential_sync"] = run_sequential(urls, model, args.n_seq, stream=False)
            res.put("latency", out)
            out["sequential_stream"] = run_sequential(urls, model, args.n_seq, stream=True)
            res.put("latency", out)
            out[f"concurrent_{args.concurrency}_sync"] = run_concurrent(
                urls, model, args.concurrency, args.per_worker, stream=False, label="c"
            )
            res.put("latency", out)
            # Streams again, with a third target: the engine asked for usage as the router asks it,
            # in rounds, to tell a one-time stall from a recurring one (each round's rows are kept).
            three = {**urls, "direct_usage": engine}
            usage = {"direct_usage": {"stream_options": {"include_usage": True}}}
            if args.freeze_gc_after >= args.stream_rounds:
                out["freeze_gc"] = {"skipped": f"--freeze-gc-after {args.freeze_gc_after} >= --stream-rounds"}
            for r in range(args.stream_rounds):
                if r == args.freeze_gc_after:
                    # SGLang's own advice against the pauses of its collector (a log line of its
                    # --gc-warning-threshold-secs): freeze what is alive, in its HTTP and scheduler
                    # processes, after warm-up.
                    out["freeze_gc"] = http(f"{engine}/freeze_gc", method="POST", timeout=30)
                    res.put("latency", out)
                out[f"concurrent_{args.concurrency}_stream_{r}"] = run_concurrent(
                    three, model, args.concurrency, args.per_worker, stream=True, label=f"s{r}", extras=usage
                )
                res.put("latency", out)
            return out

        section("latency", latency, min_left=90)

        # -- D. refusals ------------------------------------------------------------------------------
        def refusals() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for label, model_name in (("a2_bare", "a2"), ("a2_prefixed", f"{SERVED}:a2"), ("unknown", "nope"),
                                      ("unknown_prefixed", f"{SERVED}:nope"), ("other_base", "other-base:a0"),
                                      ("a3_not_in_spec", "a3")):  # fmt: skip
                out[f"router_{label}"] = client_call(client_router, "chat", model_name, stream=False)
                out[f"router_{label}_stream"] = client_call(client_router, "chat", model_name, stream=True)
            out["router_a2_raw"] = http(
                f"{router}/v1/chat/completions", "POST", {"model": "a2", "messages": PROMPT, "max_tokens": 2}
            )
            out["router_a2_stream_raw"] = sse_raw(
                f"{router}/v1/chat/completions", {"model": "a2", "messages": PROMPT, "max_tokens": 2, "stream": True}
            )
            out["router_nope_raw"] = http(
                f"{router}/v1/chat/completions", "POST", {"model": "nope", "messages": PROMPT, "max_tokens": 2}
            )
            out["router_lora_path_field"] = http(
                f"{router}/v1/chat/completions",
                "POST",
                {"model": SERVED, "lora_path": "a0", "messages": PROMPT, "max_tokens": 2},
            )
            out["engine_a2_never_loaded"] = client_call(client_engine, "chat", f"{SERVED}:a2", stream=False)
            out["engine_a2_never_loaded_raw"] = http(
                f"{engine}/v1/chat/completions", "POST", {"model": f"{SERVED}:a2", "messages": PROMPT, "max_tokens": 2}
            )
            out["engine_a2_never_loaded_stream_raw"] = sse_raw(
                f"{engine}/v1/chat/completions",
                {"model": f"{SERVED}:a2", "messages": PROMPT, "max_tokens": 2, "stream": True},
            )
            out["engine_a2_completion_raw"] = http(
                f"{engine}/v1/completions",
                "POST",
                {"model": f"{SERVED}:a2", "prompt": COMPLETION_PROMPT, "max_tokens": 2},
            )
            # a3: loaded on the engine, not in the spec: the router's gate.
            out["engine_load_a3"] = http(
                f"{engine}/load_lora_adapter", "POST", {"lora_name": "a3", "lora_path": str(adapters / "a3")}
            )
            time.sleep(2.5)
            out["engine_models_with_a3"] = model_ids(http(f"{engine}/v1/models"))
            out["router_models_with_a3"] = model_ids(http(f"{router}/v1/models"))
            out["router_a3_after_load"] = client_call(client_router, "chat", "a3", stream=False)
            out["engine_a3_after_load"] = client_call(client_engine, "chat", f"{SERVED}:a3", stream=False)
            out["router_models_body"] = http(f"{router}/v1/models")
            out["router_unknown_path"] = http(f"{router}/v1/embeddings", "POST", {"model": SERVED, "input": "x"})
            out["router_get_on_chat"] = http(f"{router}/v1/chat/completions")
            out["router_bad_json"] = http(f"{router}/v1/chat/completions", "POST", "not an object")
            return out

        section("refusals", refusals, min_left=30)

        # -- E. unload at the engine -----------------------------------------------------------------
        def unload() -> dict[str, Any]:
            out: dict[str, Any] = {}
            before = client_call(client_router, "chat", "a1", stream=False)
            out["router_a1_before"] = before
            t_unload = time.monotonic()
            out["engine_unload_a1"] = http(f"{engine}/unload_lora_adapter", "POST", {"lora_name": "a1"})
            out["engine_models_after_unload"] = model_ids(http(f"{engine}/v1/models"))
            # Only listings until the router sees it gone: a request for a1 would make SGLang reload it.
            gone = wait_router_listing("a1", present=False, limit=10)
            out["router_stops_listing_a1_s"] = None if gone is None else round(time.monotonic() - t_unload, 2)
            out["router_a1_after_unload"] = client_call(client_router, "chat", "a1", stream=False)
            out["router_a1_after_unload_prefixed"] = client_call(client_router, "chat", f"{SERVED}:a1", stream=True)
            out["refused_within_s"] = round(time.monotonic() - t_unload, 2)
            out["engine_models_before_direct"] = model_ids(http(f"{engine}/v1/models"))
            direct = client_call(client_engine, "chat", f"{SERVED}:a1", stream=False)
            out["engine_a1_after_unload"] = direct
            out["engine_a1_same_text_as_before"] = direct.get("text") == before.get("text")
            out["engine_models_after_direct"] = model_ids(http(f"{engine}/v1/models"))
            back = wait_router_listing("a1", present=True, limit=8)
            out["router_lists_a1_again_after_s"] = back
            out["router_a1_after_direct"] = client_call(client_router, "chat", "a1", stream=False)
            # The window: unload a0 and ask the router for it at once, before its next poll.
            a0_before = client_call(client_engine, "chat", f"{SERVED}:a0", stream=False)
            out["engine_unload_a0"] = http(f"{engine}/unload_lora_adapter", "POST", {"lora_name": "a0"})
            out["router_a0_right_after_unload"] = client_call(client_router, "chat", "a0", stream=False)
            out["router_a0_right_after_unload_same_text"] = out["router_a0_right_after_unload"].get(
                "text"
            ) == a0_before.get("text")
            out["engine_models_after_router_a0"] = model_ids(http(f"{engine}/v1/models"))
            time.sleep(2.5)
            out["router_a0_after_a_poll"] = client_call(client_router, "chat", "a0", stream=False)
            out["router_models_end"] = model_ids(http(f"{router}/v1/models"))
            return out

        section("unload", unload, min_left=25)

        # -- F. load at the engine: a2 (in the spec) appears; eviction past --max-loaded-loras -----------
        def load() -> dict[str, Any]:
            out: dict[str, Any] = {"engine_models_before": model_ids(http(f"{engine}/v1/models"))}
            t0 = time.monotonic()
            out["engine_load_a2"] = http(
                f"{engine}/load_lora_adapter", "POST", {"lora_name": "a2", "lora_path": str(adapters / "a2")}
            )
            seen = wait_router_listing("a2", present=True, limit=8)
            out["router_lists_a2_after_s"] = None if seen is None else round(time.monotonic() - t0, 2)
            out["router_a2"] = client_call(client_router, "chat", "a2", stream=False)
            out["engine_a2"] = client_call(client_engine, "chat", f"{SERVED}:a2", stream=False)
            # a3 (not in the spec) used last, so the least recently used adapter is one of the spec's.
            out["engine_a3_touch"] = client_call(client_engine, "chat", f"{SERVED}:a3", stream=False).get("ok")
            out["engine_models_full"] = model_ids(http(f"{engine}/v1/models"))
            out["engine_load_extra"] = http(
                f"{engine}/load_lora_adapter", "POST", {"lora_name": "a3-copy", "lora_path": str(adapters / "a3")}
            )
            after = model_ids(http(f"{engine}/v1/models")) or []
            out["engine_models_after_extra"] = after
            evicted = [n for n in SPEC_ADAPTERS if n in (out["engine_models_full"] or []) and n not in after]
            out["evicted_spec_adapters"] = evicted
            if evicted:
                gone = wait_router_listing(evicted[0], present=False, limit=8)
                out["router_stops_listing_evicted_s"] = gone
                out["router_evicted"] = client_call(client_router, "chat", evicted[0], stream=False)
                out["engine_evicted"] = client_call(client_engine, "chat", f"{SERVED}:{evicted[0]}", stream=False)
            out["engine_models_end"] = model_ids(http(f"{engine}/v1/models"))
            return out

        section("load", load, min_left=20)

        # -- G. the router's metrics ------------------------------------------------------------------
        def router_metrics() -> dict[str, Any]:
            m = http(metrics_url, timeout=10, limit=None)
            body = m.get("body") if isinstance(m.get("body"), str) else ""
            lines = [ln for ln in body.splitlines() if ln.startswith("kimi_router_") and "_created" not in ln]
            families = sorted({ln.split("{")[0].split(" ")[0] for ln in lines})
            counters = [
                ln
                for ln in lines
                if ln.startswith(
                    (
                        "kimi_router_requests_total",
                        "kimi_router_upstream",
                        "kimi_router_prompt",
                        "kimi_router_completion",
                        "kimi_router_retries",
                        "kimi_router_replicas",
                        "kimi_router_requests_in_flight",
                    )
                )
            ]
            counts = [ln for ln in lines if "_count{" in ln or "_sum{" in ln]
            return {
                "status": m.get("status"),
                "content_type": m.get("content_type"),
                "families": families,
                "counters": counters,
                "histogram_counts_and_sums": counts,
                "n_lines": len(lines),
            }

        section("router_metrics", router_metrics)

        def engine_lora_metrics() -> dict[str, Any]:
            text = http(f"{engine}/metrics", limit=None).get("body") or ""
            return {"lines": [ln for ln in str(text).splitlines() if "lora" in ln and not ln.startswith("#")]}

        section("engine_metrics_lora", engine_lora_metrics)
    finally:
        # -- H. stop: the router (SIGTERM, graceful), then the engine ----------------------------------
        stopped = {"router": rtr.stop(grace=40), "engine": eng.stop(grace=20)}
        log_text = (args.out / "router.log").read_text(errors="replace") if (args.out / "router.log").exists() else ""
        stopped["router_log_problems"] = [ln for ln in log_text.splitlines() if " ERROR " in ln or " WARNING " in ln][
            :50
        ]
        res.put("stop", stopped)
        res.put("elapsed_s", res.elapsed())
    return 0


if __name__ == "__main__":
    sys.exit(main())
