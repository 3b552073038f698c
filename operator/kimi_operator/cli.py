"""The one command-line entry: ``kimi-operator <command>``."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _crds(args: argparse.Namespace) -> int:
    from kimi_operator import crdfiles

    dirs = [Path(d) for d in args.out]
    if args.check:
        problems = crdfiles.stale(dirs)
        for p in problems:
            print(f"stale: {p}", file=sys.stderr)
        if problems:
            print("run `make crds` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    for path in crdfiles.write(dirs):
        print(path)
    return 0


def _run(args: argparse.Namespace) -> int:
    import kopf

    from kimi_operator.controller.main import Options, run

    # kopf's formatters prefix each line with the object it is about ([namespace/name]).
    kopf.configure(
        debug=args.log_level == "debug",
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
        log_prefix=True,
    )
    logging.getLogger().setLevel(getattr(logging, args.log_level.upper()))
    return run(
        Options(
            namespaces=tuple(args.namespace),
            health_port=args.health_port,
            metrics_port=args.metrics_port,
            bind_address=args.bind_address,
            priority=args.priority,
            prepare_image=args.prepare_image,
            trainer_image=args.trainer_image,
            engine_image=args.engine_image,
            router_image=args.router_image,
            llamacpp_image=args.llamacpp_image,
        )
    )


def _dev_cluster(args: argparse.Namespace) -> int:
    from kimi_operator.devcluster.build import BuildError
    from kimi_operator.devcluster.cluster import Cluster, ClusterError

    cluster = Cluster(Path(args.dir) if args.dir else None, Path(args.nodes) if args.nodes else None)
    try:
        if args.action == "up":
            cluster.up(Path(args.crds) if args.crds else None)
            sys.stdout.write(cluster.env())
        elif args.action == "down":
            stopped = cluster.down()
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
        elif args.action == "stray":
            stray = cluster.stray_processes()
            for pid, cmd in stray:
                print(f"still running: {pid} {cmd}", file=sys.stderr)
            return 1 if stray else 0
        elif args.action == "env":
            sys.stdout.write(cluster.env())
        elif args.action == "status":
            running = cluster.running()
            if not running:
                print("no cluster", file=sys.stderr)
                return 1
            for name, ok in running.items():
                print(f"{name}\t{'running' if ok else 'stopped'}")
            return 0 if all(running.values()) else 1
    except (ClusterError, BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# name, "module:function" taking argv, help
WORKLOAD_COMMANDS = (
    (
        "prepare",
        "kimi_operator.workloads.prepare.command:main",
        "download, verify and convert a model's weights on this node",
    ),
    ("remove-model", "kimi_operator.workloads.prepare.command:remove_main", "delete a model's files on this node"),
    ("train", "kimi_operator.workloads.train.command:main", "the training pod: validate, train, report, export"),
    ("validate-dataset", "kimi_operator.workloads.train.dataset:main", "check a chat dataset (JSON lines)"),
    (
        "serve-agent",
        "kimi_operator.workloads.serve.agent:main",
        "the engine pod's adapter agent (load, verify, report)",
    ),
    ("router", "kimi_operator.router.main:main", "the OpenAI-compatible router in front of a LoraServer's engines"),
)


def _workload(target: str, args: argparse.Namespace) -> int:
    # Imported on use: each pod image loads only what its own command needs.
    module, function = target.split(":")
    result: int = getattr(importlib.import_module(module), function)(args.rest)
    return result


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kimi-operator", description="Fine-tune and serve Kimi K2.5 on Kubernetes.")
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator against the current kubeconfig")
    run.add_argument("--namespace", action="append", default=[], help="watch only these namespaces (repeatable)")
    run.add_argument("--health-port", type=int, default=8081, help="port of /healthz and /readyz (0: off)")
    run.add_argument("--metrics-port", type=int, default=8080, help="port of the Prometheus /metrics (0: off)")
    run.add_argument("--bind-address", default="0.0.0.0", help="address the health and metrics servers bind")  # noqa: S104
    run.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    run.add_argument(
        "--prepare-image",
        default=os.environ.get("KIMI_PREPARE_IMAGE", "ghcr.io/kimi-operator/prepare:0.1.0"),
        help="image of the prepare and cleanup Jobs (env KIMI_PREPARE_IMAGE)",
    )
    run.add_argument(
        "--trainer-image",
        default=os.environ.get("KIMI_TRAINER_IMAGE", "ghcr.io/kimi-operator/trainer:0.1.0"),
        help="image of the training Jobs (env KIMI_TRAINER_IMAGE)",
    )
    run.add_argument(
        "--engine-image",
        default=os.environ.get("KIMI_ENGINE_IMAGE", "ghcr.io/kimi-operator/engine:0.1.0"),
        help="image of the serving engines and their adapter agents (env KIMI_ENGINE_IMAGE)",
    )
    run.add_argument(
        "--router-image",
        default=os.environ.get("KIMI_ROUTER_IMAGE", "ghcr.io/kimi-operator/router:0.1.0"),
        help="image of the LoraServers' OpenAI-compatible routers (env KIMI_ROUTER_IMAGE)",
    )
    run.add_argument(
        "--llamacpp-image",
        default=os.environ.get("KIMI_LLAMACPP_IMAGE", "ghcr.io/kimi-operator/llamacpp:0.1.0"),
        help="image of llama.cpp engines and their adapter agents (engine.type llamacpp; env KIMI_LLAMACPP_IMAGE)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="text", choices=["text", "json"], help="json for log collectors")
    run.set_defaults(func=_run)

    crds = sub.add_parser("crds", help="write the CRDs generated from the API models")
    crds.add_argument("--out", action="append", required=True, help="directory to write (repeatable)")
    crds.add_argument("--check", action="store_true", help="fail if the directories are not current")
    crds.set_defaults(func=_crds)

    # Commands that run inside the workload pods parse their own arguments.
    for name, target, help_text in WORKLOAD_COMMANDS:
        command = sub.add_parser(name, help=help_text, add_help=False)
        command.add_argument("rest", nargs=argparse.REMAINDER)
        command.set_defaults(func=functools.partial(_workload, target))

    dev = sub.add_parser("dev-cluster", help="the local control plane for development and tests")
    dev.add_argument(
        "action",
        choices=["up", "down", "status", "env", "stray"],
        help="stray: fail if any process started from the cluster directory is still running",
    )
    dev.add_argument("--dir", help="state directory (default: .cluster in the checkout)")
    dev.add_argument("--nodes", help="node profile file (default: e2e/cluster/nodes.yaml)")
    dev.add_argument("--crds", help="install the CRDs in this directory before the controllers start")
    dev.set_defaults(func=_dev_cluster)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Workload commands get every argument, --help included (argparse's REMAINDER would not take a
    # leading option).
    workloads = {name: target for name, target, _ in WORKLOAD_COMMANDS}
    if argv and argv[0] in workloads:
        return _workload(workloads[argv[0]], argparse.Namespace(rest=argv[1:]))
    args = parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
