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

Beside the PEFT files the export writes ``adapter.gguf`` for llama.cpp, made by llama.cpp's own
``convert_lora_to_gguf.py`` (found through ``KIMI_LLAMACPP_SRC``) from a copy holding only the modules
llama.cpp applies (``render.llamacpp``; the others are reported as ``llamacppDroppedModules``), with
the base model's config.json alone as its ``--base``. No converter, no module it applies, settings it
cannot carry (rsLoRA, a per-module ``alpha_pattern`` or ``rank_pattern``), or a conversion that fails
costs the GGUF file, not the export: the adapter is still good for SGLang, and
``status.adapter.ggufError`` says why.
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

from kimi_operator.api.finetunejob import EXPORTED_ADAPTER_DIR
from kimi_operator.api.serving import GGUF_ADAPTER_FILE
from kimi_operator.render import llamacpp
from kimi_operator.workloads import manifest
from kimi_operator.workloads.safetensors_io import PlannedTensor, Reader, SafetensorsError, header_bytes

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FUSED = "fused_expert_lora.safetensors"
KT_MANIFEST = "kt_adapter_manifest.json"
CONVERTER = Path("sft") / "convert_kt_to_sglang_adapter.py"
FINAL, PARTIAL, STAGING = EXPORTED_ADAPTER_DIR, f"{EXPORTED_ADAPTER_DIR}.partial", f"{EXPORTED_ADAPTER_DIR}.kt-input"
# The directory holding llama.cpp's convert_lora_to_gguf.py with the conversion/ and gguf-py/ it imports.
LLAMACPP_SRC_ENV = "KIMI_LLAMACPP_SRC"
LORA_TO_GGUF = "convert_lora_to_gguf.py"
GGUF_STAGING = "adapter.gguf-input"
# The converter's --base: a directory holding only the base model's config.json.
GGUF_BASE = "adapter.gguf-base"
# Written at the adapter's own precision (no rounding, no doubling); anything else as f32.
GGUF_OUTTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}
# A converter that hangs must not keep the pod from reporting its adapter.
GGUF_TIMEOUT_S = 1800

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
    # Set by export: why no adapter.gguf was written beside the PEFT files (None: it was).
    gguf_error: str | None = None

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


class GgufError(Exception):
    """No adapter.gguf is written; the message says why (``status.adapter.ggufError``). Not an
    ``ExportError``: the adapter is published without it."""


def llamacpp_converter() -> Path:
    """llama.cpp's ``convert_lora_to_gguf.py``, where ``KIMI_LLAMACPP_SRC`` says it is."""
    source = os.environ.get(LLAMACPP_SRC_ENV)
    if not source:
        raise GgufError(f"{LLAMACPP_SRC_ENV} is not set: no llama.cpp converter here to write {GGUF_ADAPTER_FILE}")
    script = Path(source) / LORA_TO_GGUF
    if not script.is_file():
        raise GgufError(f"{LLAMACPP_SRC_ENV}={source} holds no {LORA_TO_GGUF}: no {GGUF_ADAPTER_FILE} written")
    return script


def _module(tensor: str) -> str:
    """The adapted module of a checked tensor name (``...o_proj.lora_A.weight`` -> ``...o_proj``)."""
    match = _KEY.match(tensor)
    return match["module"] if match else tensor


def _llamacpp_input(adapter: Path, staging: Path) -> str:
    """Copy the PEFT adapter to ``staging`` with only the modules llama.cpp applies: the converter
    fails on kv_b_proj, and what it would convert without effect would mislead whoever reads the
    file. ``target_modules`` is reduced to match. Returns the converter's ``--outtype``."""
    config = json.loads((adapter / CONFIG).read_text())
    if config.get("use_rslora"):
        # llama.cpp scales every adapter by lora_alpha / r; rsLoRA's alpha / sqrt(r) would be lost.
        raise GgufError(f"{CONFIG}: use_rslora is set, which llama.cpp does not apply: no {GGUF_ADAPTER_FILE} written")
    for pattern in ("alpha_pattern", "rank_pattern"):
        if config.get(pattern):
            # The converter writes one lora_alpha for the whole file, and llama.cpp scales every
            # module by it over that module's rank: per-module values would be lost.
            raise GgufError(
                f"{CONFIG}: {pattern} is set ({', '.join(sorted(map(str, config[pattern])))}), which llama.cpp's "
                f"converter does not carry (it writes one lora_alpha and one rank): no {GGUF_ADAPTER_FILE} written"
            )
    with Reader(adapter / WEIGHTS) as reader:
        kept = [info for name, info in reader.tensors.items() if not llamacpp.dropped_modules([_module(name)])]
        if not kept:
            raise GgufError(
                "llama.cpp applies none of the trained modules (see llamacppDroppedModules): "
                f"no {GGUF_ADAPTER_FILE} written"
            )
        staging.mkdir()
        with (staging / WEIGHTS).open("wb") as fh:
            fh.write(header_bytes(PlannedTensor(t.name, t.dtype, t.shape) for t in kept))
            for info in kept:
                fh.write(reader.raw(info.name))
    kinds = {_module(info.name).rsplit(".", 1)[-1] for info in kept}
    config["target_modules"] = [target for target in config["target_modules"] if target in kinds]
    (staging / CONFIG).write_text(json.dumps(config, indent=2))
    dtypes = {info.dtype for info in kept}
    return GGUF_OUTTYPES.get(dtypes.pop(), "f32") if len(dtypes) == 1 else "f32"


def _run_lora_to_gguf(script: Path, staging: Path, base: Path, outfile: Path, outtype: str) -> None:
    """Run the converter with this interpreter (the image's torch and transformers); when it fails,
    its last line on stderr (a traceback's exception, or its own ERROR line) is the reason."""
    command = [sys.executable, str(script), str(staging), "--base", str(base), "--outfile", str(outfile)]
    command += ["--outtype", outtype]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=GGUF_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise GgufError(f"{script.name} did not finish in {GGUF_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no output"]
        raise GgufError(f"{script.name} failed (exit {proc.returncode}): {lines[-1].strip()}")
    if not outfile.is_file():
        raise GgufError(f"{script.name} exited 0 but wrote no {outfile.name}")


def write_gguf(output_dir: Path, partial: Path, *, base_model: str) -> None:
    """Write ``adapter.gguf`` into the partial export, under a temporary name renamed when complete.
    The base model gives the converter the architecture: its config.json alone, in a directory of
    its own (given the model's directory, the converter reads the header of every safetensors file
    there, which on a 2 TB checkpoint costs time and fails on any file it does not expect)."""
    script = llamacpp_converter()
    config = Path(base_model) / "config.json"
    if not config.is_file():
        raise GgufError(f"llama.cpp's converter needs the base model's config.json, which {base_model} does not hold")
    staging, temporary = output_dir / GGUF_STAGING, partial / (GGUF_ADAPTER_FILE + ".partial")
    base = output_dir / GGUF_BASE
    for stale in (staging, base):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        outtype = _llamacpp_input(partial, staging)
        base.mkdir()
        shutil.copyfile(config, base / "config.json")
        _run_lora_to_gguf(script, staging, base, temporary, outtype)
        with temporary.open("rb") as fh:
            os.fsync(fh.fileno())
        temporary.rename(partial / GGUF_ADAPTER_FILE)
    except (OSError, ValueError) as exc:  # a full disk, an unreadable copy: the GGUF file is lost, not the export
        raise GgufError(f"writing {GGUF_ADAPTER_FILE}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        temporary.unlink(missing_ok=True)


def export(output_dir: Path, *, experts: bool, base_model: str) -> tuple[Path, Checked]:
    """Publish ``<output_dir>/adapter`` for SGLang, with ``adapter.gguf`` for llama.cpp when it can be
    written (``Checked.gguf_error`` says why not); nothing is left there unless it is complete."""
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
    try:
        write_gguf(output_dir, partial, base_model=base_model)
    except GgufError as exc:
        checked = dataclasses.replace(checked, gguf_error=str(exc))
    for name in (CONFIG, WEIGHTS):
        with (partial / name).open("rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final, checked


def _add_gguf(final: Path, target: Path) -> None:
    """Give a copy on the shared volume that lacks it the export's adapter.gguf (a copy published
    before the export wrote one): copied and synced under a temporary name, then hard-linked in, so
    a reader sees it whole or not at all; one already there is never replaced."""
    source, wanted = final / GGUF_ADAPTER_FILE, target / GGUF_ADAPTER_FILE
    if not source.is_file() or wanted.exists():
        return
    # Beside the copy, not in it: a reader copies every file of the directory.
    staged = target.parent / f".{target.name}.{GGUF_ADAPTER_FILE}.{os.getpid()}.partial"
    try:
        shutil.copyfile(source, staged)
        with staged.open("rb") as fh:
            os.fsync(fh.fileno())
        if manifest.sha256_file(staged) != manifest.sha256_file(source):
            raise ExportError(f"{staged}: the copy on the shared volume does not match {source}")
        try:
            os.link(staged, wanted)
        except FileExistsError:
            pass  # another writer added it first: its file stays
        except OSError:
            # A volume without hard links: renamed in, unless one appeared meanwhile.
            if not wanted.exists():
                os.replace(staged, wanted)
    finally:
        staged.unlink(missing_ok=True)


def publish(final: Path, root: Path, *, namespace: str, name: str) -> str:
    """Copy the exported adapter to the shared store: ``<root>/<namespace>/<name>/<sha256>/``, built
    under a temporary name and renamed, so a reader sees it whole or not at all. Returns the path
    relative to ``root``. A copy already there (the same digest) is kept as it is, but for the
    export's adapter.gguf, added when it lacks one."""
    digest = manifest.sha256_file(final / WEIGHTS)
    relative = f"{namespace}/{name}/{digest}"
    target = root / relative
    if (target / WEIGHTS).is_file():
        _add_gguf(final, target)
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
    gguf = final / GGUF_ADAPTER_FILE
    llama: dict[str, str] = (
        {"ggufSha256": manifest.sha256_file(gguf)}
        if gguf.is_file()
        else {"ggufError": (checked.gguf_error or f"no {GGUF_ADAPTER_FILE} was written")[:4000]}
    )
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
        **llama,
    }
