"""INT4 -> BF16 conversion against compressed-tensors, and every way the input can be wrong."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kimi_operator.workloads import manifest
from kimi_operator.workloads.diskspace import InsufficientDisk
from kimi_operator.workloads.prepare import convert, dequant, native
from kimi_operator.workloads.prepare.checkpoint import CheckpointError, open_checkpoint
from kimi_operator.workloads.safetensors_io import PlannedTensor, Reader, Writer
from tests.checkpoints import load_index, run_oracle


def converted(src: Path, out: Path, **kwargs: object) -> Path:
    convert.convert(src, out, threads=2, **kwargs)  # type: ignore[arg-type]
    return out


def tensors_of(directory: Path) -> dict[str, bytes]:
    found = {}
    for shard in sorted(set(load_index(directory).values())):
        with Reader(directory / shard) as reader:
            for name in reader.tensors:
                found[name] = bytes(reader.raw(name))
    return found


def test_bit_identical_to_compressed_tensors(tiny_checkpoint_source: Path, tmp_path: Path) -> None:
    out = converted(tiny_checkpoint_source / "model", tmp_path / "bf16")
    result = tensors_of(out)
    with Reader(tiny_checkpoint_source / "reference.safetensors") as reference:
        assert len(reference.tensors) == 2 * 3 * 4  # 2 MoE layers x 3 projections x 4 experts
        for name, info in reference.tensors.items():
            assert info.dtype == "BF16"
            assert result[name] == bytes(reference.raw(name)), name


def test_untouched_tensors_are_byte_identical(tiny_checkpoint_source: Path, tmp_path: Path) -> None:
    src = tiny_checkpoint_source / "model"
    out = converted(src, tmp_path / "bf16")
    before, after = tensors_of(src), tensors_of(out)
    untouched = {n for n in before if not n.endswith((".weight_packed", ".weight_scale", ".weight_shape"))}
    assert untouched
    assert all(after[n] == before[n] for n in untouched)
    assert not [n for n in after if n.endswith((".weight_packed", ".weight_scale", ".weight_shape"))]
    assert set(after) == untouched | {n[: -len("_packed")] for n in before if n.endswith(".weight_packed")}


def test_output_loads_with_safetensors_and_config_parses(
    tiny_checkpoint_source: Path, tmp_path: Path, oracle_python: str
) -> None:
    out = converted(tiny_checkpoint_source / "model", tmp_path / "bf16", revision="abc123")
    loaded = json.loads(run_oracle(oracle_python, "load", str(out)))["tensors"]
    assert loaded["language_model.model.layers.1.mlp.experts.0.gate_proj.weight"] == ["torch.bfloat16", [64, 64]]
    assert loaded["language_model.model.layers.2.mlp.experts.3.down_proj.weight"] == ["torch.bfloat16", [64, 64]]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config["text_config"]
    assert config["text_config"]["n_routed_experts"] == 4
    reopened = open_checkpoint(out)
    assert reopened.scheme is None
    assert reopened.packed == {}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes = sum(t.nbytes for shard in reopened.headers.values() for t in _planned(shard))
    assert index["metadata"]["total_size"] == sizes
    assert (out / "tokenizer_config.json").exists()
    record = manifest.read(out)
    assert record is not None
    assert record["revision"] == "abc123"
    assert {f["path"] for f in record["files"]} >= {"config.json", "model.safetensors.index.json"}
    assert manifest.verify(out) == []


def _planned(header: dict[str, tuple[str, tuple[int, ...]]]) -> list[PlannedTensor]:
    return [PlannedTensor(n, d, s) for n, (d, s) in header.items()]


def test_numpy_and_compiled_paths_agree_on_every_bit_pattern() -> None:
    rng = np.random.default_rng(1)
    rows, cols = 64, 256
    packed = rng.integers(-(2**31), 2**31, size=(rows, cols // 8), dtype=np.int64).astype(np.int32)
    # Every exponent, both signs, plus inf and NaN scales.
    scale = rng.integers(0, 1 << 16, size=(rows, cols // 32)).astype(np.uint16)
    scale[0, :4] = [0x7F80, 0xFF80, 0x7FC1, 0x0001]
    slow = dequant.dequantize("w", packed, scale, (rows, cols), 32)
    fast = dequant.dequantize_fast("w", packed, scale, (rows, cols), 32, threads=3)
    assert np.array_equal(slow, fast)


def test_rerun_after_success_writes_nothing(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = converted(tiny_checkpoint, tmp_path / "bf16")
    again = convert.convert(tiny_checkpoint, out, threads=1)
    assert again.shards_written == []
    assert len(again.shards_skipped) == 3


class Interrupt(Exception):
    pass


def interrupt_in_second_shard(src: Path, out: Path) -> None:
    """Stop a conversion once the first shard is complete, as a killed pod would."""
    first_shard_bytes = convert.plan(open_checkpoint(src))[0].size

    def stop(done: int, total: int) -> None:
        if done > first_shard_bytes + 1000:
            raise Interrupt

    with pytest.raises(Interrupt):
        convert.convert(src, out, threads=1, on_progress=stop)


def test_interrupted_conversion_resumes_to_identical_output(tiny_checkpoint: Path, tmp_path: Path) -> None:
    clean = tensors_of(converted(tiny_checkpoint, tmp_path / "clean"))
    out = tmp_path / "bf16"
    interrupt_in_second_shard(tiny_checkpoint, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["model-00001-of-00003.safetensors", "model-00001-of-00003.safetensors.sha256"]
    assert manifest.read(out) is None  # never marked complete
    resumed = convert.convert(tiny_checkpoint, out, threads=2)
    assert resumed.shards_skipped == ["model-00001-of-00003.safetensors"]
    assert tensors_of(out) == clean
    assert manifest.verify(out) == []


def test_manifest_catches_a_changed_byte(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = converted(tiny_checkpoint, tmp_path / "bf16")
    shard = out / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert manifest.verify(out) == [f"{shard}: sha256 differs from manifest.json"]


def _assert_nothing_complete(out: Path) -> None:
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".safetensors" or p.name == "manifest.json"]


def test_truncated_shard(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shard = tiny_checkpoint / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors: tensor .* \(truncated file\?\)"):
        convert.convert(tiny_checkpoint, tmp_path / "bf16")
    _assert_nothing_complete(tmp_path / "bf16")


def test_garbage_header(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shard = tiny_checkpoint / "model-00001-of-00003.safetensors"
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + shard.read_bytes()[24:])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003\.safetensors: header is not JSON"):
        convert.convert(tiny_checkpoint, tmp_path / "bf16")
    _assert_nothing_complete(tmp_path / "bf16")


def test_tensor_missing_from_its_shard(tiny_checkpoint: Path, tmp_path: Path) -> None:
    index_path = tiny_checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "language_model.model.layers.1.mlp.experts.2.up_proj.weight_scale"
    wrong = next(s for s in set(index["weight_map"].values()) if s != index["weight_map"][name])
    index["weight_map"][name] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=rf"{wrong}: tensor {name} is listed in model\.safetensors\.index\.json but missing"
    ):
        convert.convert(tiny_checkpoint, tmp_path / "bf16")
    _assert_nothing_complete(tmp_path / "bf16")


def test_index_names_a_missing_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tiny_checkpoint / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard model-00003-of-00003\.safetensors .* which does not exist"):
        convert.convert(tiny_checkpoint, tmp_path / "bf16")
    _assert_nothing_complete(tmp_path / "bf16")


def _rewrite_dtype(shard: Path, name: str, dtype: str) -> None:
    """Relabel one tensor (same byte size) by rewriting the shard with our writer."""
    with Reader(shard) as reader:
        tensors = {n: (t.dtype, t.shape, bytes(reader.raw(n))) for n, t in reader.tensors.items()}
    _, shape, data = tensors[name]
    tensors[name] = (dtype, shape, data)
    writer = Writer(shard, [PlannedTensor(n, d, s) for n, (d, s, _) in tensors.items()])
    for n, (_, _, payload) in tensors.items():
        writer.write(n, payload)
    writer.commit()


def test_wrong_dtype(tiny_checkpoint: Path, tmp_path: Path) -> None:
    name = "language_model.model.layers.2.mlp.experts.1.down_proj.weight_scale"
    shard = tiny_checkpoint / load_index(tiny_checkpoint)[name]
    _rewrite_dtype(shard, name, "F16")
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {name} is F16, expected BF16"):
        convert.convert(tiny_checkpoint, tmp_path / "bf16")
    _assert_nothing_complete(tmp_path / "bf16")


@pytest.mark.parametrize(
    ("group_size", "message"),
    [
        (48, "group size 48 does not divide the row of 64 columns"),
        (12, "group_size 12 is not a positive multiple of 8"),
    ],
)
def test_group_size_that_does_not_fit(tiny_checkpoint: Path, tmp_path: Path, group_size: int, message: str) -> None:
    config_path = tiny_checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = group_size
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        convert.convert(tiny_checkpoint, tmp_path / "bf16")
    _assert_nothing_complete(tmp_path / "bf16")


def test_disk_too_small(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needed = convert.bytes_needed(open_checkpoint(tiny_checkpoint), tmp_path / "bf16")
    monkeypatch.setenv("KIMI_OPERATOR_DISK_LIMIT_BYTES", str(needed // 2))
    with pytest.raises(InsufficientDisk) as info:
        convert.convert(tiny_checkpoint, tmp_path / "bf16")
    assert info.value.free == needed // 2
    assert info.value.needed > needed  # shards plus the small files that travel with them
    assert f"needs {info.value.needed} bytes" in str(info.value)
    assert f"only {needed // 2} bytes" in str(info.value)
    _assert_nothing_complete(tmp_path / "bf16")


def test_resume_redoes_a_finished_shard_that_no_longer_matches_its_digest(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    clean = tensors_of(converted(tiny_checkpoint, tmp_path / "clean"))
    out = tmp_path / "bf16"
    interrupt_in_second_shard(tiny_checkpoint, out)
    shard = out / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # e.g. a write lost in a crash before it reached the disk
    shard.write_bytes(bytes(data))
    resumed = convert.convert(tiny_checkpoint, out, threads=1)
    assert resumed.shards_skipped == []
    assert tensors_of(out) == clean


def numpy_checkpoint(root: Path, *, experts: int = 3, rows: int = 48, cols: int = 128, group: int = 32) -> Path:
    """A small packed INT4 checkpoint written with numpy and our writer alone (no oracle needed): every
    bit pattern of the packed nibbles and the BF16 scales, over two shards."""
    rng = np.random.default_rng(7)
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "model.embed_tokens.weight": rng.integers(0, 1 << 16, size=(16, cols), dtype=np.uint16),
        "model.norm.weight": rng.integers(0, 1 << 16, size=(cols,), dtype=np.uint16),
    }
    for e in range(experts):
        base = f"model.layers.1.mlp.experts.{e}.down_proj"
        tensors[f"{base}.weight_packed"] = rng.integers(-(2**31), 2**31, size=(rows, cols // 8)).astype(np.int32)
        tensors[f"{base}.weight_scale"] = rng.integers(0, 1 << 16, size=(rows, cols // group), dtype=np.uint16)
        tensors[f"{base}.weight_shape"] = np.array([rows, cols], dtype=np.int32)
    dtypes = {np.dtype(np.uint16): "BF16", np.dtype(np.int32): "I32"}
    root.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        writer = Writer(root / shard, [PlannedTensor(n, dtypes[tensors[n].dtype], tensors[n].shape) for n in chunk])
        for name in chunk:
            writer.write(name, tensors[name])
        writer.commit()
        weight_map.update(dict.fromkeys(chunk, shard))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    quant = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
    }
    (root / "config.json").write_text(json.dumps({"model_type": "kimi_k2", "quantization_config": quant}))
    return root


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


# (case id, CC as built from the test's directory (None: unset), what the warning says).
NO_KERNEL: list[tuple[str, Callable[[Path], str | None], str]] = [
    ("no-compiler-on-path", lambda d: None, "no C compiler (cc/gcc) on PATH"),
    ("cc-names-a-missing-file", lambda d: str(d / "missing-cc"), "No such file or directory"),
    ("cc-is-not-executable", lambda d: str(d / "notes.txt"), "Permission denied"),
    ("compiler-fails", lambda d: _script(d / "cc", "echo 'cc: internal error' >&2; exit 1"), "cc: internal error"),
    (
        "compiler-writes-no-library",
        lambda d: _script(d / "cc", 'while [ $# -gt 0 ]; do [ "$1" = -o ] && echo junk > "$2"; shift; done; exit 0'),
        "cannot load",
    ),
]


@pytest.mark.parametrize(("cc", "reason"), [n[1:] for n in NO_KERNEL], ids=[n[0] for n in NO_KERNEL])
def test_without_the_native_kernel_the_conversion_uses_numpy(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    cc: Callable[[Path], str | None],
    reason: str,
) -> None:
    src = numpy_checkpoint(tmp_path / "int4")
    expected = tensors_of(converted(src, tmp_path / "numpy", use_native=False))
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "notes.txt").write_text("not a compiler")
    compiler = cc(tools)
    # No compiler anywhere, no library built by another test, and nothing loaded yet in this process.
    (tmp_path / "empty-path").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    if compiler is None:
        monkeypatch.delenv("CC", raising=False)
    else:
        monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("KIMI_OPERATOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LIB", None)
    with caplog.at_level(logging.INFO, logger=convert.__name__):
        out = converted(src, tmp_path / "bf16")
    assert tensors_of(out) == expected
    assert manifest.verify(out) == []
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == convert.__name__]
    assert (logging.INFO, "dequantization kernel: numpy (the native kernel is unavailable)") in messages
    (warning,) = [m for level, m in messages if level == logging.WARNING]
    assert warning.startswith("native dequantization kernel unavailable, falling back to numpy: ")
    assert reason in warning
    assert native._LIB is None
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_with_a_compiler_the_native_kernel_runs_and_agrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    src = numpy_checkpoint(tmp_path / "int4")
    expected = tensors_of(converted(src, tmp_path / "numpy", use_native=False))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("KIMI_OPERATOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LIB", None)
    with caplog.at_level(logging.INFO, logger=convert.__name__):
        out = converted(src, tmp_path / "bf16")
    assert tensors_of(out) == expected
    assert "dequantization kernel: native" in caplog.messages
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 1


def test_without_a_compiler_the_output_is_still_compressed_tensors_own(
    tiny_checkpoint_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fallback judged by the oracle itself, not only against our other kernel.
    (tmp_path / "empty-path").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("KIMI_OPERATOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LIB", None)
    result = tensors_of(converted(tiny_checkpoint_source / "model", tmp_path / "bf16"))
    assert native._LIB is None
    with Reader(tiny_checkpoint_source / "reference.safetensors") as reference:
        for name in reference.tensors:
            assert result[name] == bytes(reference.raw(name)), name
