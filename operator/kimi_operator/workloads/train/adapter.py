"""The adapter a training run hands to serving: checked, converted for SGLang, published whole.

Two shapes come out of LLaMA-Factory 0.9.5:

- plain PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``), which SGLang loads as is;
- with the KTransformers backend, the same PEFT files for the non-expert layers plus kt-kernel's
  fused expert LoRA (``fused_expert_lora.safetensors``, ``layers.{L}.experts.{gate,up,down}_lora_{a,b}``
  as ``[experts, ...]`` tensors) and ``kt_adapter_manifest.json`` recording every file's size and
  sha256. SGLang cannot read the fused file: kt-kernel's own ``convert_kt_to_sglang_adapter.py``
  turns it into per-expert PEFT keys, merged with the non-expert part or split from it.

``lora.experts`` chooses what is published from a KTransformers run: the merged adapter (one per
engine, served on a LoraServer's dedicated replicas) or the non-expert part only (many per replica). Whatever the
shape, the result is checked the way SGLang reads it (one rank, every lora_A with its lora_B, keys of
the declared target modules) in ``<output>/adapter.partial`` and renamed to ``<output>/adapter``
only when complete.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kimi_operator.render import llamacpp
from kimi_operator.workloads import manifest
from kimi_operator.workloads.safetensors_io import Reader, SafetensorsError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FUSED = "fused_expert_lora.safetensors"
KT_MANIFEST = "kt_adapter_manifest.json"
CONVERTER = Path("sft") / "convert_kt_to_sglang_adapter.py"
FINAL, PARTIAL, STAGING = "adapter", "adapter.partial", "adapter.kt-input"

_KEY = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.weight$")
_EXPERT_KEY = re.compile(r"\.experts\.\d+\.(gate|up|down)_proj$")


class ExportError(RuntimeError):
    """The trained adapter cannot be published; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Checked:
    """An adapter directory as SGLang will read it."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    tensors: int
    modules: tuple[str, ...]  # every adapted module, by its full name

    @property
    def expert_modules(self) -> int:
        return sum(1 for module in self.modules if _EXPERT_KEY.search(module))


def kt_converter() -> Path:
    """kt-kernel's converter, found without importing kt_kernel (whose native part needs AVX-512)."""
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"the training saved {FUSED} but kt-kernel is not installed to convert it for SGLang")
    script = Path(next(iter(spec.submodule_search_locations))) / CONVERTER
    if not script.is_file():
        raise ExportError(f"kt-kernel has no {CONVERTER} at {script}")
    return script


def check_kt_manifest(directory: Path) -> None:
    """Every file kt-kernel published is there whole: the manifest says ready and sizes and sha256 match."""
    path = directory / KT_MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} holds {FUSED} without {KT_MANIFEST}: the save did not finish")
    try:
        payload = json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"{path}: not JSON ({exc})") from exc
    if payload.get("status") != "ready":
        raise ExportError(f"{path}: status is {payload.get('status')!r}, not 'ready'")
    artifacts = payload.get("artifacts")
    if not isinstance(artifacts, dict) or FUSED not in artifacts:
        raise ExportError(f"{path}: artifacts do not list {FUSED}")
    for name, record in artifacts.items():
        file = directory / name
        if not file.is_file():
            raise ExportError(f"{path}: {name} is listed but missing")
        size = file.stat().st_size
        if not isinstance(record, dict) or record.get("size") != size:
            raise ExportError(f"{path}: {name} is {size} bytes, the manifest says {record.get('size')}")
        if manifest.sha256_file(file) != record.get("sha256"):
            raise ExportError(f"{path}: {name} does not match its sha256")


def _read_config(config_path: Path) -> tuple[int, float, list[str]]:
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ExportError(f"{config_path}: not JSON ({exc})") from exc
    rank, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{config_path}: peft_type {config.get('peft_type')!r}, SGLang loads LORA")
    if config.get("use_dora"):
        raise ExportError(f"{config_path}: use_dora is set; SGLang does not load DoRA adapters")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ExportError(f"{config_path}: r must be a positive integer and lora_alpha a number")
    if not isinstance(targets, list) or not targets:
        raise ExportError(f"{config_path}: target_modules must list the adapted modules")
    return rank, float(alpha), [str(t) for t in targets]


def _lora_modules(weights_path: Path, rank: int, targets: list[str]) -> dict[str, set[str]]:
    """Adapted module -> the halves (lora_A, lora_B) present, every shape checked against the rank."""
    try:
        with Reader(weights_path) as reader:
            shapes = {name: info.shape for name, info in reader.tensors.items()}
    except SafetensorsError as exc:
        raise ExportError(str(exc)) from exc
    halves: dict[str, set[str]] = {}
    for name, shape in shapes.items():
        match = _KEY.match(name)
        if match is None:
            raise ExportError(f"{weights_path}: tensor {name} is not a lora_A/lora_B weight")
        module, ab = match["module"], match["ab"]
        if len(shape) != 2 or shape[0 if ab == "lora_A" else 1] != rank:
            raise ExportError(f"{weights_path}: tensor {name} has shape {list(shape)}, not rank {rank}")
        if module.rsplit(".", 1)[-1] not in targets:
            raise ExportError(f"{weights_path}: tensor {name} adapts a module not in target_modules {targets}")
        halves.setdefault(module, set()).add(ab)
    if not halves:
        raise ExportError(f"{weights_path}: no LoRA tensors")
    return halves


def check_for_sglang(directory: Path) -> Checked:
    """What SGLang's LoRA loader needs of a PEFT directory, checked before it is published."""
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    if not (config_path.is_file() and weights_path.is_file()):
        raise ExportError(f"{directory}: needs {CONFIG} and {WEIGHTS}")
    rank, alpha, targets = _read_config(config_path)
    halves = _lora_modules(weights_path, rank, targets)
    unpaired = sorted(module for module, ab in halves.items() if ab != {"lora_A", "lora_B"})
    if unpaired:
        raise ExportError(f"{weights_path}: {unpaired[0]} has lora_A or lora_B alone ({len(unpaired)} modules)")
    return Checked(rank, alpha, tuple(targets), sum(len(ab) for ab in halves.values()), tuple(sorted(halves)))


def _convert_kt(output_dir: Path, partial: Path, *, experts: bool, base_model: str) -> None:
    """Run kt-kernel's converter on a staging copy (it refuses an output inside its input)."""
    if not experts and not (output_dir / WEIGHTS).is_file():
        raise ExportError(f"lora.experts is false but {output_dir} has no non-expert {WEIGHTS} to publish")
    check_kt_manifest(output_dir)
    script = kt_converter()
    staging = output_dir / STAGING
    merged = output_dir / (PARTIAL + ".merged")
    for stale in (staging, merged):
        shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir()
    for name in (CONFIG, WEIGHTS, FUSED):
        if (output_dir / name).is_file():
            try:
                os.link(output_dir / name, staging / name)
            except OSError:  # a filesystem without hard links: the expert LoRA is copied instead
                shutil.copy2(output_dir / name, staging / name)
    command = [sys.executable, str(script), str(staging), str(partial if experts else merged)]
    command += ["--base-model-name-or-path", base_model]
    if not experts:
        command += ["--nonexpert-output-dir", str(partial)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(merged, ignore_errors=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"{script.name} failed on {output_dir}: {last}")


def export(output_dir: Path, *, experts: bool, base_model: str) -> tuple[Path, Checked]:
    """Publish ``<output_dir>/adapter`` for SGLang; nothing is left there unless it is complete."""
    partial, final = output_dir / PARTIAL, output_dir / FINAL
    shutil.rmtree(partial, ignore_errors=True)
    if (output_dir / FUSED).exists():
        _convert_kt(output_dir, partial, experts=experts, base_model=base_model)
    elif experts:
        raise ExportError(
            f"lora.experts is true but the training saved no {FUSED} in {output_dir} "
            "(expert LoRA comes from the KTransformers backend, use_kt)"
        )
    else:
        for name in (CONFIG, WEIGHTS):
            if not (output_dir / name).is_file():
                raise ExportError(f"no PEFT adapter in {output_dir} after training ({name} is missing)")
        partial.mkdir()
        for name in (CONFIG, WEIGHTS):
            shutil.copy2(output_dir / name, partial / name)
    checked = check_for_sglang(partial)
    if experts and not checked.expert_modules:
        raise ExportError(f"{partial / WEIGHTS}: lora.experts is true but no expert module is adapted")
    for name in (CONFIG, WEIGHTS):
        with (partial / name).open("rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final, checked


def publish(final: Path, root: Path, *, namespace: str, name: str) -> str:
    """Copy the exported adapter to the shared store: ``<root>/<namespace>/<name>/<sha256>/``, built
    under a temporary name and renamed, so a reader sees it whole or not at all. Returns the path
    relative to ``root``. A copy already there (the same digest) is kept as it is."""
    digest = manifest.sha256_file(final / WEIGHTS)
    relative = f"{namespace}/{name}/{digest}"
    target = root / relative
    if (target / WEIGHTS).is_file():
        return relative
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{digest}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for item in final.iterdir():
        if item.is_file():
            shutil.copyfile(item, staging / item.name)
            with (staging / item.name).open("rb") as fh:
                os.fsync(fh.fileno())
    if manifest.sha256_file(staging / WEIGHTS) != digest:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"{staging / WEIGHTS}: the copy on the shared volume does not match the adapter")
    staging.rename(target)
    return relative


def status(final: Path, checked: Checked, *, name: str, node: str, base_model: str) -> dict[str, Any]:
    """``status.adapter`` of the FineTuneJob."""
    return {
        "name": name,
        "node": node,
        "path": str(final),
        "sizeBytes": sum(p.stat().st_size for p in final.iterdir()),
        "sha256": manifest.sha256_file(final / WEIGHTS),
        "baseModel": base_model,
        "rank": checked.rank,
        "expertLora": checked.expert_modules > 0,
        # Said at export, before any server is asked to load it: a llama.cpp LoraServer would lose these.
        "llamacppDroppedModules": llamacpp.dropped_modules(checked.modules),
    }
