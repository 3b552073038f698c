"""``kimi-operator router``: the router pod's program."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import sys
from pathlib import Path

import aiohttp
from prometheus_client import start_http_server

from kimi_operator.router import metrics
from kimi_operator.router.app import Keys, Router, error_body
from kimi_operator.router.config import KEYS_MOUNT
from kimi_operator.router.fleet import ENGINE_APIS, Fleet
from kimi_operator.router.httpserver import Limits, Server
from kimi_operator.router.sources import KubeSource, static_config, static_members

log = logging.getLogger("kimi_operator.router")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kimi-operator router", description="The OpenAI-compatible LoRA router.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--loraserver", help="NAMESPACE/NAME: read it and watch its engine pods")
    where.add_argument("--spec-file", type=Path, help="a LoraServer manifest, for a router outside a cluster")
    p.add_argument("--engine-selector", help="with --loraserver: the label selector of its engine pods")
    p.add_argument(
        "--engine-api",
        choices=ENGINE_APIS,
        default="sglang",
        help="sglang: adapters by name (served:adapter); llamacpp: llama-server's adapter ids",
    )
    p.add_argument("--engine", action="append", default=[], help="with --spec-file: NAME=URL of a shared engine")
    p.add_argument(
        "--dedicated-engine", action="append", default=[], help="with --spec-file: NAME=URL of an expert engine"
    )
    p.add_argument("--host", default="0.0.0.0", help="address to serve on")  # noqa: S104 (a pod's port)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics; 0: none")
    p.add_argument("--keys-dir", type=Path, default=Path(KEYS_MOUNT), help="where the key Secrets are mounted")
    p.add_argument("--period", type=float, default=2.0, help="seconds between reads of the engines and the spec")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a request's headers may take")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds a request's body may take")
    p.add_argument(
        "--read-timeout",
        type=float,
        default=900.0,
        help="seconds an engine may send nothing (a prefill included) before its request fails (504 or an error event)",
    )
    p.add_argument("--upstream-keepalive", type=float, default=4.0, help="seconds an idle engine connection is kept")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to finish answers on SIGTERM")
    p.add_argument(
        "--drain-delay",
        type=float,
        default=5.0,
        help="seconds between SIGTERM and closing the listener, answering /ready 503 meanwhile",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    # Idle connections to an engine are dropped before the engine drops them (SGLang's uvicorn keeps
    # them 5 s): a request never goes out on a connection the engine is closing.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=args.upstream_keepalive)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
    ) as session:
        fleet = Fleet(session, period=args.period, api=args.engine_api, name_of=lambda path: _adapter_of(router, path))
        keys = Keys(args.keys_dir)
        router = Router(fleet, session, keys, read_timeout=args.read_timeout)
        source: KubeSource | None = None
        limits = Limits(header_seconds=args.header_timeout, body_seconds=args.body_timeout)
        if args.spec_file is not None:
            config = static_config(args.spec_file)
            limits = dataclasses.replace(limits, body_bytes=config.max_body_bytes)
            router.set_config(config)
            fleet.set_members(static_members(args.engine, args.dedicated_engine))
        else:
            namespace, _, name = args.loraserver.partition("/")
            source = KubeSource(
                loop,
                namespace=namespace,
                name=name,
                selector=args.engine_selector
                or f"kimi-operator.io/loraserver={name},app.kubernetes.io/component=engine",
                on_members=fleet.set_members,
                on_config=router.set_config,
                period=args.period,
            )
            source.start()
        server = Server(router.handle, error_body, limits, gate=router.gate)
        # What exists now (modules, the API models, the configuration) lives as long as the process:
        # out of the collector's generations, so a full collection, which stops the event loop
        # while it runs, walks only what requests left behind (tens of milliseconds less each).
        gc.collect()
        gc.freeze()

        listener = await server.serve(args.host, args.port)
        tasks = [asyncio.ensure_future(fleet.run()), asyncio.ensure_future(_refresh_loop(router, keys, server, fleet))]
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        log.info("router on %s:%d", args.host, args.port)
        await stopping.wait()
        # Not ready first, still accepting: endpoints drop the pod before its port closes.
        router.draining = True
        server.drain()
        log.info(
            "stopping: /ready 503 for %.0f s, then no new connections and %.0f s for answers in progress",
            args.drain_delay,
            args.grace,
        )
        await asyncio.sleep(args.drain_delay)
        listener.close()
        deadline = loop.time() + args.grace
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_drained(server), args.grace)
        # Whole answers still fetched for clients that left: closing the session would abort them,
        # which is what they are detached to avoid (SGLang leaks the adapter of an aborted one).
        if router.detached():
            await asyncio.wait(router.detached(), timeout=max(0.0, deadline - loop.time()))
        await server.close()
        for task in tasks:
            task.cancel()
        if source is not None:
            source.stop()
    return 0


async def _refresh_loop(router: Router, keys: Keys, server: Server, fleet: Fleet) -> None:
    """Keys and the body limit from the files and the spec, and the replica gauges, each second."""
    while True:
        try:
            if router.config is not None:
                keys.refresh(router.config)
                if server.limits.body_bytes != router.config.max_body_bytes:
                    server.limits = dataclasses.replace(server.limits, body_bytes=router.config.max_body_bytes)
            ready = sum(1 for r in fleet.replicas() if r.ready)
            metrics.REPLICAS.labels("true").set(ready)
            metrics.REPLICAS.labels("false").set(len(fleet.engines) - ready)
        except Exception:  # a bad read must not end the loop: key rotation would stop with it
            log.exception("refreshing keys and limits")
        await asyncio.sleep(keys.period)


def _adapter_of(router: Router, path: str) -> str | None:
    return router.config.adapter_of_file(path) if router.config is not None else None


async def _drained(server: Server) -> None:
    while server.busy():
        await asyncio.sleep(0.1)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host)
    return asyncio.run(serve(args))
