"""``kimi-operator train``: what the training pod runs, in the trainer image (LLaMA-Factory 0.9.5).

In order: validate the dataset (bad data fails here, before any GPU step); turn the records into
LLaMA-Factory's messages format; resume from the newest complete checkpoint in the output
directory; train (in this process, or one process per GPU: ``trainer``), while a reporter turns
``trainer_log.jsonl`` into ``status.progress``; export the adapter (with ``adapter.gguf`` for
llama.cpp when its converter is in the image) under a temporary name, renamed when complete, and
report it in ``status.adapter``. LLaMA-Factory is imported only by the steps that need it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_operator.api.exitcodes import TrainExit
from kimi_operator.api.finetunejob import DATASET_INFO_FILE, KIND, PLURAL
from kimi_operator.workloads import termination
from kimi_operator.workloads.events import emit
from kimi_operator.workloads.termination import WorkloadError
from kimi_operator.workloads.train import adapter, dataset, trainer
from kimi_operator.workloads.train.progress import Reporter, latest_checkpoint

if TYPE_CHECKING:
    from kimi_operator.workloads.report import OwnStatus

IMAGE_PLACEHOLDER = "<image>"
# LLaMA-Factory's dataset registry, and the records this command writes for it into the output.
LLAMAFACTORY_DATASET = "dataset.jsonl"


def to_llamafactory(src: Path, key: str, root: Path, dst: Path) -> int:
    """Write the records as LLaMA-Factory reads them: text content, an ``<image>`` placeholder where
    each image part was, and the image paths (absolute) in ``images``. The messages are read from
    ``key`` and always written under ``messages``, the column the registration names. Returns the
    record count. Runs on a validated file only."""
    count = 0
    partial = dst.with_name(dst.name + ".partial")
    # utf-8-sig: a leading byte order mark is skipped, as the validator does.
    with src.open(encoding="utf-8-sig") as fin, partial.open("w", encoding="utf-8") as fout:
        for line in fin:
            if not line.strip():
                continue
            record = json.loads(line)
            images: list[str] = []
            messages = []
            for message in record[key]:
                content = message["content"]
                if isinstance(content, list):
                    pieces = []
                    for part in content:
                        if part.get("type") == "text":
                            pieces.append(part["text"])
                        else:
                            raw = part["image_url"]["url"].removeprefix("file://")
                            images.append(str(Path(raw) if raw.startswith("/") else root / raw))
                            pieces.append(IMAGE_PLACEHOLDER)
                    content = "".join(pieces)
                messages.append({"role": message["role"], "content": content})
            # The registration names an images column: every record carries one, empty for text only.
            out: dict[str, Any] = {"messages": messages, "images": images}
            fout.write(json.dumps(out, ensure_ascii=False) + "\n")
            count += 1
    partial.rename(dst)
    return count


def _override(args: dict[str, Any], pairs: Sequence[str]) -> dict[str, Any]:
    for pair in pairs:
        key, _, value = pair.partition("=")
        args[key] = json.loads(value)
    return args


def _with_paths(args: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    """LLaMA-Factory's paths from this command's arguments (the pod's mounts), so that they never
    disagree with where the pod's volumes are: the model, the output, and the dataset this command
    writes into the output directory (``_register_dataset``). Nothing is written here."""
    if opts.model_dir is not None:
        args["model_name_or_path"] = str(opts.model_dir)
    args["output_dir"] = str(opts.output_dir)
    if (opts.config_dir / DATASET_INFO_FILE).is_file():
        args["dataset_dir"] = str(opts.output_dir)
    return args


def _register_dataset(opts: argparse.Namespace) -> None:
    """The configuration's dataset registry, beside the records this command wrote for it."""
    info_file = opts.config_dir / DATASET_INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        for entry in info.values():
            entry["file_name"] = LLAMAFACTORY_DATASET
        (opts.output_dir / DATASET_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def fetch_dataset(opts: argparse.Namespace) -> Path:
    """Download the one dataset file at the pinned revision into the output directory."""
    from kimi_operator.workloads import hub  # noqa: PLC0415 (only hub-sourced datasets need it)

    token = os.environ.get("HF_TOKEN") or None
    try:
        sha, files = hub.resolve(opts.dataset_repo, opts.dataset_revision, token=token, endpoint=opts.endpoint)
        wanted = [f for f in files if f.path == opts.dataset_file]
        if not wanted:
            raise WorkloadError(TrainExit.INVALID_DATASET, f"{opts.dataset_repo}@{sha} has no file {opts.dataset_file}")
        target = opts.output_dir / "source"
        target.mkdir(parents=True, exist_ok=True)
        hub.download(
            opts.dataset_repo, sha, target, wanted, token=token, endpoint=opts.endpoint, max_workers=1, on_progress=None
        )
    except (hub.HubAuthError, hub.RevisionNotFound, hub.RepoNotFound) as exc:
        # A dataset the hub refuses for good is bad input, not a crash to retry.
        raise WorkloadError(TrainExit.INVALID_DATASET, str(exc)) from exc
    problems = hub.verify(target, wanted)
    if problems:
        raise WorkloadError(TrainExit.INVALID_DATASET, "; ".join(problems))
    path: Path = target / opts.dataset_file
    return path


def _warn(message: str) -> None:
    emit({"event": "warning", "message": message})


def export(opts: argparse.Namespace, *, base_model: str) -> dict[str, Any]:
    """Export the trained adapter (``base_model``: the directory it was trained from) and copy it to
    the shared volume when one is given; returns ``status.adapter``."""
    try:
        final, checked = adapter.export(opts.output_dir, experts=opts.lora_experts, base_model=base_model)
    except adapter.ExportError as exc:
        raise WorkloadError(TrainExit.EXPORT_FAILED, str(exc)) from exc
    published = adapter.status(final, checked, name=opts.adapter_name, node=opts.node, base_model=opts.base_model)
    if "ggufError" in published:
        # Not a failure: SGLang serves the adapter; only a llama.cpp server could not load it.
        _warn(published["ggufError"])
    if opts.publish_dir is not None:
        try:
            relative = adapter.publish(
                final, opts.publish_dir, namespace=opts.publish_namespace, name=opts.adapter_name
            )
        except (adapter.ExportError, OSError) as exc:
            # The run and its export are good: a shared volume that failed costs the copy, not the
            # training. Status says the adapter is on this node only, and why.
            published["publishError"] = f"copying to volume {opts.publish_claim}: {exc}"[:4000]
            _warn(published["publishError"])
        else:
            published["published"] = {"claimName": opts.publish_claim, "path": relative}
    return published


def train(opts: argparse.Namespace, own: OwnStatus | None) -> dict[str, Any]:
    if opts.dataset_repo:
        opts.dataset = fetch_dataset(opts)
    config = opts.config_dir / "train.yaml"
    # Bad data is reported before the configuration is even read: it fails first whatever else is wrong.
    args = _override(_with_paths(json.loads(config.read_text()), opts), opts.set) if config.exists() else {}
    counter = None
    if args.get("model_name_or_path") and Path(args["model_name_or_path"]).exists():
        # The model's tokenizer, trusted as the training configuration trusts the model's code.
        trusted = bool(args.get("trust_remote_code"))
        counter = dataset.tokenizer_counter(Path(args["model_name_or_path"]), trust_remote_code=trusted)
    report = dataset.validate_file(
        opts.dataset, key=opts.messages_key, root=opts.root, count_tokens=counter, cutoff_len=args.get("cutoff_len")
    )
    if not report.ok or report.key is None:
        raise WorkloadError(TrainExit.INVALID_DATASET, report.summary(5))
    emit({"event": "dataset", "records": report.records, "key": report.key})
    for warning in report.warnings:
        emit({"event": "warning", "message": warning})
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    to_llamafactory(opts.dataset, report.key, opts.root or opts.dataset.parent, opts.output_dir / LLAMAFACTORY_DATASET)
    _register_dataset(opts)
    checkpoint = latest_checkpoint(opts.output_dir)
    if checkpoint is not None:
        args["resume_from_checkpoint"] = str(checkpoint)
    with Reporter(opts.output_dir, own, interval=opts.report_interval, resumed_from=checkpoint) as reporter:
        if opts.processes > 1:
            trainer.launch(args, config_dir=opts.config_dir, output_dir=opts.output_dir, processes=opts.processes)
        else:
            trainer.run(args)
    published = export(opts, base_model=str(args.get("model_name_or_path", opts.base_model)))
    if own is not None:
        # One field manager owns exactly what its last apply listed: the adapter goes with the last
        # progress, or server-side apply would remove the progress this pod wrote.
        own.apply({**reporter.status, "adapter": published})
    emit({"event": "adapter", **published})
    return published


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-operator train", description=__doc__)
    parser.add_argument("--config-dir", type=Path, required=True, help="train.yaml and dataset_info.json")
    parser.add_argument("--dataset", type=Path, help="JSON-lines records")
    parser.add_argument("--dataset-repo", help="hub dataset repository, instead of --dataset")
    parser.add_argument("--dataset-revision", help="commit sha or tag of --dataset-repo")
    parser.add_argument("--dataset-file", help="JSON-lines file within --dataset-repo")
    parser.add_argument("--endpoint", help="hub endpoint (a mirror)")
    parser.add_argument(
        "--messages-key",
        default=None,
        choices=dataset.KEYS,
        help="key of each record holding its messages (default: detected from the records)",
    )
    parser.add_argument("--root", type=Path, help="directory file:// image paths are relative to")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--report", help="namespace/name of the FineTuneJob whose status gets the progress")
    parser.add_argument("--node", default="", help="this node's name (for status.adapter)")
    parser.add_argument("--adapter-name", default="adapter")
    parser.add_argument("--base-model", default="")
    parser.add_argument("--model-dir", type=Path, help="the BF16 weights to train on (LLaMA-Factory's model path)")
    parser.add_argument(
        "--lora-experts",
        action="store_true",
        help="publish the merged expert LoRA (lora.experts), not the non-expert part",
    )
    parser.add_argument("--publish-dir", type=Path, help="the shared volume the adapter is copied to")
    parser.add_argument("--publish-claim", default="", help="the PersistentVolumeClaim of --publish-dir")
    parser.add_argument("--publish-namespace", default="", help="the FineTuneJob's namespace (a directory there)")
    parser.add_argument("--report-interval", type=float, default=5.0)
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="training processes, one per GPU (over 1: accelerate launch with the config dir's accelerate.yaml)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a training argument")
    opts = parser.parse_args(argv)
    if (opts.dataset is None) == (opts.dataset_repo is None):
        parser.error("give exactly one of --dataset or --dataset-repo (with --dataset-revision and --dataset-file)")
    own = None
    if opts.report:
        # Only a pod that reports needs the Kubernetes client.
        from kimi_operator.kubeconfig import load_client  # noqa: PLC0415
        from kimi_operator.workloads.report import OwnStatus  # noqa: PLC0415

        namespace, name = opts.report.split("/", 1)
        own = OwnStatus(load_client(), kind=KIND, plural=PLURAL, namespace=namespace, name=name, manager="kimi-train")
    try:
        train(opts, own)
    except WorkloadError as exc:
        return termination.fail(exc.code, str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
