"""Run the operator: kopf with our handlers, plus the health and metrics servers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import kopf

from kimi_operator.controller import handlers, health, registry
from kimi_operator.controller.kube import Kube, load_config

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
    namespaces: tuple[str, ...] = ()
    health_port: int = 8081
    metrics_port: int = 8080
    bind_address: str = "0.0.0.0"  # noqa: S104 (probes and scrapes come from outside the pod)
    priority: int = 0
    prepare_image: str = "ghcr.io/kimi-operator/prepare:0.1.0"
    trainer_image: str = "ghcr.io/kimi-operator/trainer:0.1.0"
    engine_image: str = "ghcr.io/kimi-operator/engine:0.1.0"
    router_image: str = "ghcr.io/kimi-operator/router:0.1.0"
    llamacpp_image: str = "ghcr.io/kimi-operator/llamacpp:0.1.0"


async def _operate(options: Options) -> None:
    kube = Kube(load_config())
    kopf_registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=kopf_registry)
    def _settings(settings: kopf.OperatorSettings, **_: Any) -> None:
        handlers.configure(settings)

    @kopf.on.login(registry=kopf_registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as our own client: in-cluster, else the kubeconfig.
        info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
        return info

    controllers = registry.build(
        kube,
        registry.Images(
            prepare=options.prepare_image,
            trainer=options.trainer_image,
            engine=options.engine_image,
            router=options.router_image,
            llamacpp=options.llamacpp_image,
        ),
    )
    handlers.register(kopf_registry, kube, controllers)
    ready = asyncio.Event()
    runners = []
    if options.health_port:
        runners.append(await health.start(health.health_app(ready), options.bind_address, options.health_port))
    if options.metrics_port:
        runners.append(await health.start(health.metrics_app(), options.bind_address, options.metrics_port))
    log.info(
        "serving /healthz,/readyz on :%s and /metrics on :%s",
        options.health_port or "-",
        options.metrics_port or "-",
    )
    try:
        await kopf.operator(
            registry=kopf_registry,
            clusterwide=not options.namespaces,
            namespaces=list(options.namespaces),
            standalone=True,
            priority=options.priority,
            ready_flag=ready,
        )
    finally:
        for runner in runners:
            await runner.cleanup()


def run(options: Options) -> int:
    asyncio.run(_operate(options))
    return 0
