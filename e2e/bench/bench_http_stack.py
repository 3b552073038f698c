"""Benchmark of the router's HTTP front end: its own server against aiohttp.web (not a test).

The router answers clients with a small HTTP/1.1 server of its own on asyncio streams
(kimi_operator/router/httpserver.py); the habitual choice would be aiohttp.web, already a dependency
for the engine client. This measures what each costs per request, serving the same Router:
  ours      httpserver.Server(router.handle, error_body, limits, gate=router.gate), as router/main.py
  aiohttp   an aiohttp.web Application (AppRunner, TCPSite) with one catch-all handler that turns a
            web.Request into a router Request and gives the Router a Response-compatible object
            writing to a web.Response (whole answers) or a web.StreamResponse (streams)
Each stack is a process of its own (this script with ``--serve``), both pinned to the same core (one
under load at a time), the load generator on the other cores (the server core's SMT siblings left
out). The Router has a static configuration (two adapters) and no engine, so every answer is its
own and the HTTP stack is most of the cost; the requests rotate over three kinds:
  models      GET /v1/models                                    200, the model list
  no_replica  POST /v1/chat/completions, a valid body naming an adapter no replica holds
              (JSON parse, checks, name resolution, routing)    503 no_replica
  malformed   POST /v1/chat/completions, a body that is not JSON 400
The load generator is a few processes (aiohttp client, keep-alive, closed loop) sharing the
concurrency; at each concurrency the two stacks are measured in interleaved rounds. Per stack and
concurrency: requests per second, latency p50 and p99 (at the client), the server's CPU per request
(utime + stime from /proc/<pid>/stat, 10 ms ticks, and the nanosecond run time of its threads from
/proc/<pid>/task/*/schedstat), its RSS, and the connections the clients opened (keep-alive holds:
after the warm-up, none).

What is not compared: the behaviour the router's own server has for its clients' sake (OpenAI-shaped
answers to malformed HTTP, bounds on slow headers and bodies, cancelling the engine's request when a
client leaves); aiohttp.web answers bad HTTP its own way and does not cancel handlers by default.

  PYTHONPATH=operator python e2e/bench/bench_http_stack.py --out bench-results/http-stack.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import free_port, parse_levels, pct, proc_memory

ROOT = Path(__file__).resolve().parents[2]
STACKS = ("ours", "aiohttp")
SERVED = "kimi-k2.5"
ADAPTERS = ("a0", "a1")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
JSON_HEADERS = {"Content-Type": "application/json"}
# (name, method, path, body, the status the router answers it with)
KINDS: tuple[tuple[str, str, str, bytes | None, int], ...] = (
    ("models", "GET", "/v1/models", None, 200),
    (
        "no_replica",
        "POST",
        "/v1/chat/completions",
        json.dumps(
            {"model": f"{SERVED}:a0", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 16}
        ).encode(),
        503,
    ),
    ("malformed", "POST", "/v1/chat/completions", b'{"model": "kimi-k2.5:a0", "messages": [{"role": ', 400),
)


# ---------------------------------------------------------------------------------------------
# The servers (--serve)


def _router_parts() -> tuple[Any, Any, Any]:
    """The Router with its static configuration, the Limits its server takes, and error_body."""
    import aiohttp  # noqa: PLC0415 (only the server processes need the router)

    from kimi_operator.router.app import Keys, Router, error_body  # noqa: PLC0415
    from kimi_operator.router.config import AdapterState, RouterConfig  # noqa: PLC0415
    from kimi_operator.router.fleet import Fleet  # noqa: PLC0415
    from kimi_operator.router.httpserver import Limits  # noqa: PLC0415

    session = aiohttp.ClientSession()
    router = Router(Fleet(session), session, Keys(Path(tempfile.mkdtemp(prefix="bench-http-keys-"))))
    config = RouterConfig(
        served=SERVED,
        adapters=frozenset(ADAPTERS),
        defaults={"temperature": 0.7, "max_tokens": 256},
        states={"a0": AdapterState("Loading", "waiting for a replica")},
    )
    router.set_config(config)
    return router, Limits(body_bytes=config.max_body_bytes), error_body


async def _serve_ours(host: str, port: int) -> None:
    from kimi_operator.router.httpserver import Server  # noqa: PLC0415

    router, limits, error_body = _router_parts()
    server = Server(router.handle, error_body, limits, gate=router.gate)
    listener = await server.serve(host, port)
    await _until_stopped()
    listener.close()
    await server.close()
    await router.session.close()


class WebResponse:
    """The router's Response, answered through aiohttp.web: a whole answer is a web.Response the
    handler returns; a stream is a web.StreamResponse, prepared at its start."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.keep_alive = True
        self.head_only = request.method == "HEAD"
        self.chunked = request.version >= (1, 1)
        self.status: int | None = None
        self.streaming = False
        self.finished = False
        self.started = False
        self.web: Any = None

    async def send(self, status: int, body: bytes, content_type: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        from aiohttp import web  # noqa: PLC0415
        from multidict import CIMultiDict  # noqa: PLC0415

        assert not self.started, "an answer was already started"
        self.status, self.started, self.finished = status, True, True
        self.web = web.Response(
            status=status, body=body, headers=CIMultiDict([("Content-Type", content_type), *headers])
        )

    async def start_stream(self, status: int, content_type: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        from aiohttp import web  # noqa: PLC0415
        from multidict import CIMultiDict  # noqa: PLC0415

        assert not self.started, "an answer was already started"
        self.status, self.started, self.streaming = status, True, True
        fields = CIMultiDict([("Content-Type", content_type), ("Cache-Control", "no-cache"), *headers])
        self.web = web.StreamResponse(status=status, headers=fields)
        if self.chunked:
            self.web.enable_chunked_encoding()
        await self.web.prepare(self._request)

    async def write(self, data: bytes) -> None:
        if data and not self.head_only:
            await self.web.write(data)

    async def end(self) -> None:
        if self.streaming and not self.finished:
            self.finished = True
            await self.web.write_eof()


async def _serve_aiohttp(host: str, port: int) -> None:
    from aiohttp import web  # noqa: PLC0415

    from kimi_operator.router.httpserver import Request  # noqa: PLC0415

    router, limits, error_body = _router_parts()
    log = logging.getLogger("bench.aiohttp")

    def whole(status: int, body: bytes, content_type: str, close: bool = False) -> Any:
        headers = {"Content-Type": content_type, **({"Connection": "close"} if close else {})}
        return web.Response(status=status, body=body, headers=headers)

    async def handle(request: web.Request) -> web.StreamResponse:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        target = request.raw_path
        refused = router.gate(request.method, target.split("?", 1)[0], headers)
        if refused is not None:
            return whole(*refused, close=True)
        try:
            body = await request.read()
        except web.HTTPException as exc:  # e.g. over client_max_size: answered in OpenAI's shape
            return whole(*error_body(exc.status, exc.reason), close=True)
        peer_info = request.transport.get_extra_info("peername") if request.transport else None
        peer = f"{peer_info[0]}:{peer_info[1]}" if isinstance(peer_info, tuple) else "?"
        version = f"HTTP/{request.version.major}.{request.version.minor}"
        response = WebResponse(request)
        try:
            await router.handle(Request(request.method, target, version, headers, body, peer), response)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            if response.started:
                raise  # a stream already under way: aiohttp drops the connection
            return whole(*error_body(500, "internal error"), close=True)
        if not response.started:
            return whole(*error_body(500, "the handler gave no answer"), close=True)
        await response.end()
        return response.web

    app = web.Application(client_max_size=limits.body_bytes)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    await _until_stopped()
    await runner.cleanup()
    await router.session.close()


async def _until_stopped() -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()


def serve(stack: str, host: str, port: int, cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    # After PYTHONPATH: the working tree's router when none is given.
    sys.path.append(str(ROOT / "operator"))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve_ours(host, port) if stack == "ours" else _serve_aiohttp(host, port))


# ---------------------------------------------------------------------------------------------
# The load generator's processes (--client): one command (a JSON line) in, one result line out


async def _load(session: Any, url: str, n: int, concurrency: int, offset: int) -> dict[str, Any]:
    """``n`` requests to ``url``, ``concurrency`` at a time, request i of the kind (offset + i) % 3."""
    import aiohttp  # noqa: PLC0415

    latencies: list[float] = []
    kinds: list[int] = []
    wrong: dict[str, int] = {}
    indices = iter(range(n))

    async def worker() -> None:
        for i in indices:
            k = (offset + i) % len(KINDS)
            _, method, path, body, expected = KINDS[k]
            began = time.perf_counter()
            try:
                async with session.request(
                    method, url + path, data=body, headers=JSON_HEADERS if body else None
                ) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                wrong[type(exc).__name__] = wrong.get(type(exc).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - began)
            kinds.append(k)
            if status != expected:
                wrong[str(status)] = wrong.get(str(status), 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "kinds": kinds, "wrong": wrong, "start": start, "end": time.monotonic()}


async def _client(cpus: list[int]) -> None:
    import aiohttp  # noqa: PLC0415

    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
    opened = 0

    async def on_create(*_: Any) -> None:
        nonlocal opened
        opened += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=600)
    timeout = aiohttp.ClientTimeout(total=60)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, trace_configs=[trace]
    ) as session:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            opened = 0
            out = await _load(session, cmd["url"], cmd["n"], cmd["concurrency"], cmd["offset"])
            print(json.dumps({**out, "connections_opened": opened}), flush=True)


# ---------------------------------------------------------------------------------------------
# The coordinator


@dataclasses.dataclass
class ServerProc:
    stack: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def cpu_ticks(self) -> float:
        """utime + stime of the process and all its threads, seconds (10 ms resolution)."""
        stat = Path(f"/proc/{self.popen.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def cpu_run_time(self) -> float:
        """The run time of all its threads, seconds, from schedstat (nanoseconds)."""
        total = 0
        for task in Path(f"/proc/{self.popen.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def memory(self) -> dict[str, int]:
        return proc_memory(self.popen.pid)


class Clients:
    """The load generator's processes, each pinned to its share of the load cores."""

    def __init__(self, count: int, cpus: list[int], work: Path) -> None:
        self.procs = []
        for i in range(count):
            share = cpus[i::count] if len(cpus) >= count else cpus
            log = (work / f"client-{i}.log").open("wb")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--client", "--cpus", ",".join(map(str, share))],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            )

    def run(self, url: str, concurrency: int, n: int) -> list[dict[str, Any]]:
        """``n`` requests, ``concurrency`` at a time over as many processes as that allows."""
        used = self.procs[: min(len(self.procs), concurrency)]
        offset = 0
        for i, p in enumerate(used):
            share_n = n // len(used) + (i < n % len(used))
            share_c = concurrency // len(used) + (i < concurrency % len(used))
            assert p.stdin is not None
            p.stdin.write(
                (json.dumps({"url": url, "n": share_n, "concurrency": share_c, "offset": offset}) + "\n").encode()
            )
            p.stdin.flush()
            offset += share_n
        results = []
        for p in used:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                sys.exit("a load generator process exited")
            results.append(json.loads(line))
        return results

    def stop(self) -> None:
        for p in self.procs:
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def siblings(cpu: int) -> set[int]:
    """The CPUs sharing ``cpu``'s core (SMT), itself included."""
    found = {cpu}
    with contextlib.suppress(OSError, ValueError):
        text = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            found.update(range(int(lo), int(hi or lo) + 1))
    return found


def fetch(url: str, method: str, body: bytes | None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=JSON_HEADERS if body else {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (local servers, URLs built here)
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def start_server(stack: str, host: str, cpu: int, work: Path) -> ServerProc:
    port = free_port(host)
    log = work / f"server-{stack}.log"
    with log.open("wb") as out:
        argv = [sys.executable, __file__, "--serve", stack, "--host", host, "--port", str(port), "--cpu", str(cpu)]
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    proc = ServerProc(stack, popen, f"http://{host}:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            sys.exit(f"the {stack} server exited:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError):
            if fetch(proc.url + "/health", "GET", None)[0] == 200:
                return proc
        time.sleep(0.2)
    sys.exit(f"the {stack} server did not answer /health in 60 s")


def parity(servers: dict[str, ServerProc]) -> dict[str, Any]:
    """Each kind of request once on each stack: the same status, content type and JSON body."""
    out: dict[str, Any] = {}
    for name, method, path, body, expected in KINDS:
        seen = {}
        for stack, proc in servers.items():
            status, headers, raw = fetch(proc.url + path, method, body)
            seen[stack] = {
                "status": status,
                "content_type": headers.get("content-type"),
                "retry_after": headers.get("retry-after"),
                "header_names": sorted(headers),
                "body": json.loads(raw),
            }
        first = seen[STACKS[0]]
        same = all(
            s["status"] == first["status"] == expected and s[k] == first[k]
            for s in seen.values()
            for k in ("content_type", "retry_after", "body")
        )
        out[name] = {"same": same, "expected_status": expected, "stacks": seen}
    return out


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


@dataclasses.dataclass
class Run:
    latencies: list[float] = dataclasses.field(default_factory=list)
    kinds: list[int] = dataclasses.field(default_factory=list)
    wrong: dict[str, int] = dataclasses.field(default_factory=dict)
    wall: float = 0.0
    cpu_ticks: float = 0.0
    cpu_run_time: float = 0.0
    rss: int = 0
    connections_opened: int = 0

    def add(self, results: list[dict[str, Any]]) -> None:
        for r in results:
            self.latencies += r["latencies"]
            self.kinds += r["kinds"]
            for k, v in r["wrong"].items():
                self.wrong[k] = self.wrong.get(k, 0) + v
            self.connections_opened += r["connections_opened"]
        self.wall += max(r["end"] for r in results) - min(r["start"] for r in results)

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        per_kind = {
            name: ms(pct([lat for lat, k in zip(self.latencies, self.kinds, strict=True) if k == i], 0.5))
            for i, (name, *_) in enumerate(KINDS)
        }
        return {
            "requests": n,
            "wrong": self.wrong,
            "requests_per_s": round(n / self.wall, 1) if self.wall else None,
            "latency_ms": {"p50": ms(pct(self.latencies, 0.5)), "p99": ms(pct(self.latencies, 0.99))},
            "latency_p50_ms_by_kind": per_kind,
            "server_cpu_s": round(self.cpu_ticks, 2),
            "server_cpu_ms_per_request": round(self.cpu_ticks / n * 1000, 4) if n else None,
            "server_run_time_s": round(self.cpu_run_time, 4),
            "server_run_time_us_per_request": round(self.cpu_run_time / n * 1e6, 2) if n else None,
            "server_cpu_busy": round(self.cpu_run_time / self.wall, 3) if self.wall else None,
            "server_rss_mib": round(self.rss / 2**20, 1),
            "connections_opened": self.connections_opened,
        }


def measure_one(clients: Clients, proc: ServerProc, concurrency: int, n: int, run: Run) -> None:
    ticks, run_time = proc.cpu_ticks(), proc.cpu_run_time()
    results = clients.run(proc.url, concurrency, n)
    run.cpu_ticks += proc.cpu_ticks() - ticks
    run.cpu_run_time += proc.cpu_run_time() - run_time
    run.rss = max(run.rss, proc.memory()["VmRSS"])
    run.add(results)


def row(label: str, values: list[Any], width: int = 14) -> str:
    cells = ["-" if v is None else f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else str(v) for v in values]
    return f"{label:<30}" + "".join(f"{c:>{width}}" for c in cells)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(b / a, 2) if a and b is not None else None


def print_table(result: dict[str, Any]) -> None:
    print()
    print(
        f"servers pinned to CPU {result['server_cpu']}, load generator ({result['client_processes']} processes) "
        f"on CPUs {result['load_cpus']}; {result['cores']} CPUs; python {result['python']}, "
        f"aiohttp {result['aiohttp']}; kinds rotated: {', '.join(k[0] for k in KINDS)}"
    )
    for level in result["levels"]:
        per = level["stacks"]
        print()
        print(
            f"concurrency {level['concurrency']}: {level['requests_per_stack']} requests per stack, "
            f"{level['rounds']} interleaved rounds"
        )
        print(row("", [*STACKS, "aiohttp/ours"]))

        def line(label: str, key: str, sub: str | None = None, p: dict[str, Any] = per) -> None:
            values = [p[s][key][sub] if sub else p[s][key] for s in STACKS]
            print(row(label, [*values, ratio(values[0], values[1])]))

        line("requests / s", "requests_per_s")
        line("latency p50 ms", "latency_ms", "p50")
        line("latency p99 ms", "latency_ms", "p99")
        for name, *_ in KINDS:
            line(f"  p50 ms, {name}", "latency_p50_ms_by_kind", name)
        line("server CPU ms / request (stat)", "server_cpu_ms_per_request")
        line("server CPU us / req (schedstat)", "server_run_time_us_per_request")
        line("server core busy (0-1)", "server_cpu_busy")
        line("server RSS MiB", "server_rss_mib")
        print(row("wrong answers / errors", [sum(per[s]["wrong"].values()) for s in STACKS]))
        print(row("connections opened", [per[s]["connections_opened"] for s in STACKS]))
    print()
    for name, p in result["parity"].items():
        print(f"parity {name}: {'same status, content type, Retry-After and JSON body' if p['same'] else 'DIFFERENT'}")
    print(f"idle server RSS MiB: {result['idle_rss_mib']}; peak RSS MiB: {result['peak_rss_mib']}")


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Start both servers and the load generator, and measure every level."""
    import aiohttp  # noqa: PLC0415

    started = time.monotonic()
    load_at_start = os.getloadavg()
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    server_cpu = args.server_cpu if args.server_cpu is not None else allowed[min(1, len(allowed) - 1)]
    load_cpus = [c for c in allowed if c not in siblings(server_cpu)] or allowed
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(load_cpus))
    work = Path(tempfile.mkdtemp(prefix="bench-http-stack-"))
    servers: dict[str, ServerProc] = {}
    clients: Clients | None = None
    try:
        for stack in STACKS:
            servers[stack] = start_server(stack, args.host, server_cpu, work)
        idle_rss = {s: round(p.memory()["VmRSS"] / 2**20, 1) for s, p in servers.items()}
        checked = parity(servers)
        clients = Clients(max(1, min(args.client_processes, len(load_cpus))), load_cpus, work)
        for stack in STACKS:
            clients.run(servers[stack].url, 16, args.warmup)
        levels = []
        for concurrency, n, rounds in parse_levels(args.levels):
            runs = {s: Run() for s in STACKS}
            for r in range(rounds):
                for stack in STACKS if r % 2 == 0 else reversed(STACKS):
                    measure_one(clients, servers[stack], concurrency, n // rounds, runs[stack])
            level = {
                "concurrency": concurrency,
                "requests_per_stack": n // rounds * rounds,
                "rounds": rounds,
                "stacks": {s: runs[s].summary() for s in STACKS},
            }
            levels.append(level)
            print(json.dumps({"concurrency": concurrency, **{s: level["stacks"][s]["requests_per_s"] for s in STACKS}}))
        peak = {s: round(p.memory()["VmHWM"] / 2**20, 1) for s, p in servers.items()}
    finally:
        if clients is not None:
            clients.stop()
        for p in servers.values():
            if p.popen.poll() is None:
                p.popen.terminate()
        for p in servers.values():
            try:
                p.popen.wait(15)
            except subprocess.TimeoutExpired:
                p.popen.kill()
    return {
        "cores": os.cpu_count(),
        "server_cpu": server_cpu,
        "load_cpus": load_cpus,
        "client_processes": len(clients.procs) if clients else 0,
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "load_average_at_start": load_at_start,
        "kinds": {name: {"method": m, "path": p, "status": s} for name, m, p, _, s in KINDS},
        "parity": checked,
        "idle_rss_mib": idle_rss,
        "peak_rss_mib": peak,
        "levels": levels,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--out", type=Path, help="JSON result file")
    parser.add_argument(
        "--levels",
        default="1:9000:3,16:18000:3,64:18000:3",
        help="CONCURRENCY:REQUESTS:ROUNDS,... (requests per stack, split over interleaved rounds)",
    )
    parser.add_argument("--warmup", type=int, default=1500, help="requests per stack before measuring")
    parser.add_argument("--server-cpu", type=int, default=None, help="default: the second CPU this may use")
    parser.add_argument("--client-processes", type=int, default=8, help="at most; never more than the load CPUs")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.host, args.port, args.cpu)
        return
    if args.client:
        asyncio.run(_client([int(c) for c in args.cpus.split(",") if c]))
        return
    if args.out is None:
        parser.error("--out is required")
    result = bench(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"written to {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
