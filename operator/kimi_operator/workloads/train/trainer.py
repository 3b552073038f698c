"""LLaMA-Factory's training run, in this process or in one process per GPU.

One process drives one GPU. A pod with several GPUs runs ``accelerate launch`` with the rendered
FSDP2 configuration (``accelerate.yaml``): LLaMA-Factory refuses several GPUs in one plain process
("Please launch distributed training"), and with the KTransformers backend one such process goes
to transformers' DataParallel, which needs every parameter on the first GPU while kt-kernel keeps
the expert LoRA on the CPU. accelerate-kt accepts several processes only under FSDP2; kt-kernel
then runs the CPU experts in rank 0 for all.

Each worker registers the Kimi template and turns the KTransformers backend on for itself: nothing
set in the launching process reaches LLaMA-Factory's registry in another one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from kimi_operator.api.exitcodes import TrainExit
from kimi_operator.render.llamafactory import ACCELERATE_CONFIG, TEMPLATE
from kimi_operator.workloads.termination import WorkloadError

# Where the launching process leaves the arguments and each worker its refusal, in the output directory.
LAUNCH_DIR = ".launch"


def register_template() -> None:
    """Kimi K2.5's chat format, which LLaMA-Factory 0.9.5 lacks (``kimi`` does not exist there).

    A reasoning template: the data argument ``enable_thinking`` keeps or drops the thinking section.
    """
    from llamafactory.data.formatter import StringFormatter  # noqa: PLC0415 (trainer image only)
    from llamafactory.data.template import TEMPLATES, ReasoningTemplate, register_template  # noqa: PLC0415

    if TEMPLATE in TEMPLATES:
        return
    register_template(
        name=TEMPLATE,
        format_user=StringFormatter(
            slots=["<|im_user|>user<|im_middle|>{{content}}<|im_end|><|im_assistant|>assistant<|im_middle|>"]
        ),
        format_assistant=StringFormatter(slots=["{{content}}<|im_end|>"]),
        format_system=StringFormatter(slots=["<|im_system|>system<|im_middle|>{{content}}<|im_end|>"]),
        default_system="You are Kimi, an AI assistant created by Moonshot AI.",
        stop_words=["<|im_end|>"],
        thought_words=("<think>", "</think>"),
        template_class=ReasoningTemplate,
    )


def prepare_kt_environment(args: dict[str, Any]) -> None:
    """Turn the KTransformers backend on for this process when the configuration asks for it.

    transformers-kt builds its KT configuration (the one LLaMA-Factory then fills from the ``kt_*``
    keys) only when ``ACCELERATE_USE_KT`` is set or a kt_config is given, which ``accelerate
    launch`` with a KT config file would do. LLaMA-Factory runs in this process, so without it the
    run would silently be plain LoRA with every expert on the GPU.
    """
    if args.get("use_kt"):
        os.environ.setdefault("ACCELERATE_USE_KT", "true")


def run(args: dict[str, Any]) -> None:
    """LLaMA-Factory's run in this process; a configuration it refuses is INVALID_CONFIG."""
    prepare_kt_environment(args)
    register_template()
    from llamafactory.train.tuner import run_exp  # noqa: PLC0415 (trainer image only)

    try:
        run_exp(args)
    except (ValueError, AssertionError) as exc:
        # LLaMA-Factory's argument checks: a config a retry cannot fix.
        raise WorkloadError(TrainExit.INVALID_CONFIG, f"LLaMA-Factory refused the configuration: {exc}") from exc


def _free_port() -> int:
    # A port free on this pod's loopback, where torchrun's one-machine rendezvous listens.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def launch_command(config_dir: Path, processes: int, args_file: Path, port: int, *, cpu: bool) -> list[str]:
    """``accelerate launch`` of one worker per GPU with the rendered configuration (on the CPU,
    for the tests, with its mixed precision off as the training arguments have it there)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        f"--config_file={config_dir / ACCELERATE_CONFIG}",
        f"--num_processes={processes}",
        f"--main_process_port={port}",
        *(["--mixed_precision=no"] if cpu else []),
        "--module",
        "kimi_operator.workloads.train.worker",
        str(args_file),
    ]


def launch(args: dict[str, Any], *, config_dir: Path, output_dir: Path, processes: int) -> None:
    """Run ``processes`` workers and wait for them; a refusal any of them reports is raised here."""
    config = config_dir / ACCELERATE_CONFIG
    if not config.is_file():
        raise WorkloadError(TrainExit.INVALID_CONFIG, f"{processes} processes asked for, but {config} is missing")
    work = output_dir / LAUNCH_DIR
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("refused-*.json"):
        stale.unlink()  # from an earlier attempt of this pod
    args_file = work / "train-args.json"
    args_file.write_text(json.dumps(args))
    command = launch_command(config_dir, processes, args_file, _free_port(), cpu=bool(args.get("use_cpu")))
    proc = subprocess.run(command, check=False)
    refusals = []
    for path in work.glob("refused-*.json"):
        with contextlib.suppress(OSError, ValueError):
            refusals.append(json.loads(path.read_text())["message"])
    if refusals:
        # Every rank parses the same arguments: their refusals are one and the same.
        raise WorkloadError(TrainExit.INVALID_CONFIG, min(refusals))
    if proc.returncode != 0:
        # A crash, not a refusal: the pod exits non-permanently and the Job retries from the last checkpoint.
        raise RuntimeError(f"accelerate launch of {processes} training processes exited {proc.returncode}")


def refuse(args_file: Path, message: str) -> None:
    """A worker's record of LLaMA-Factory's refusal, for the launching process to report."""
    rank = os.environ.get("RANK", "0")
    # Renamed into place: the launcher may stop this rank at any moment once another one failed.
    partial = args_file.parent / f".refused-{rank}.json.partial"
    partial.write_text(json.dumps({"message": message}))
    partial.rename(args_file.parent / f"refused-{rank}.json")
