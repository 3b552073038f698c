"""The export's adapter.gguf for llama.cpp: made by llama.cpp's own convert_lora_to_gguf.py from a copy
holding only the modules llama.cpp applies; without a converter, or with one that fails, the export
still succeeds, says why in ``ggufError`` and leaves no GGUF file behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kimi_operator.api.serving import GGUF_ADAPTER_FILE
from kimi_operator.workloads.safetensors_io import Reader
from kimi_operator.workloads.train import adapter
from tests import llamacpp_tools

OPERATOR = Path(__file__).parents[1] / "operator"
MLA_LORA = Path(__file__).parents[1] / "e2e" / "engines" / "mla_lora.py"
ATTENTION = "base_model.model.model.layers.{}.self_attn.{}"
MLP = "base_model.model.model.layers.{}.mlp.{}"
# A Kimi-shaped adapter trained on every linear layer, routed experts too (as kt-kernel's converter
# writes them for SGLang). llama.cpp applies o_proj and the dense and shared-expert MLP only.
APPLIED = [ATTENTION.format(0, "o_proj"), MLP.format(0, "gate_proj"), MLP.format(1, "shared_experts.up_proj")]
DROPPED = [
    ATTENTION.format(0, "q_a_proj"),
    ATTENTION.format(0, "kv_b_proj"),
    ATTENTION.format(1, "kv_a_proj_with_mqa"),
    MLP.format(1, "experts.3.down_proj"),
]
TARGETS = ["q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Stands in for convert_lora_to_gguf.py: records what it was given, writes part of its output file,
# then does what FAKE_MODE says.
FAKE = """
import json, os, struct, sys
from pathlib import Path
args = sys.argv[1:]
lora, out = Path(args[0]), Path(args[args.index("--outfile") + 1])
raw = (lora / "adapter_model.safetensors").read_bytes()
(size,) = struct.unpack("<Q", raw[:8])
header = json.loads(raw[8 : 8 + size])
base = Path(args[args.index("--base") + 1])
Path(os.environ["FAKE_RECORD"]).write_text(json.dumps({
    "argv": args,
    "config": json.loads((lora / "adapter_config.json").read_text()),
    "tensors": {name: entry["dtype"] for name, entry in header.items()},
    "base": {p.name: json.loads(p.read_text()) for p in base.iterdir()},
}))
out.write_bytes(b"GGUF, half written")
if os.environ.get("FAKE_MODE") == "fail":
    print("INFO:lora-to-gguf:Loading base model", file=sys.stderr)
    print("Traceback (most recent call last):", file=sys.stderr)
    print("ValueError: Can not map tensor 'model.layers.0.self_attn.o_proj.weight'", file=sys.stderr)
    print("", file=sys.stderr)
    sys.exit(1)
out.write_bytes(b"GGUF, whole")
"""


def peft_output(directory: Path, modules: list[str], *, dtype: str = "F32", **config: Any) -> Path:
    """A PEFT adapter of rank 2 on ``modules`` (16 wide), with distinct values per tensor."""
    directory.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    numpy_dtype = {"F32": np.float32, "F16": np.float16}.get(dtype)
    for index, module in enumerate(modules):
        for ab, shape in (("lora_A", (2, 16)), ("lora_B", (16, 2))):
            if numpy_dtype is None:  # BF16: the upper half of float32
                values = np.full(shape, index + 1, dtype=np.float32).view(np.uint32) >> 16
                data = values.astype(np.uint16).tobytes()
            else:
                data = np.full(shape, index + 1, dtype=numpy_dtype).tobytes()
            header[f"{module}.{ab}.weight"] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + len(data)],
            }
            blobs.append(data)
            offset += len(data)
    raw = json.dumps(header).encode()
    (directory / adapter.WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    kinds = {module.rsplit(".", 1)[-1] for module in modules}
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [t for t in TARGETS if t in kinds]}
    (directory / adapter.CONFIG).write_text(json.dumps({**settings, **config}))
    return directory


@pytest.fixture
def base_model(tmp_path: Path) -> Path:
    """The base model's directory: its config, and weights the converter must never be shown."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"]}))
    (model / "model-00001-of-00001.safetensors").write_bytes(b"not read by the converter")
    (model / "model.safetensors.index.json").write_text("{}")
    return model


@pytest.fixture
def fake_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KIMI_LLAMACPP_SRC pointing at the stand-in; returns the file it records its input in."""
    source = tmp_path / "llama.cpp"
    source.mkdir()
    (source / adapter.LORA_TO_GGUF).write_text(FAKE)
    monkeypatch.setenv(adapter.LLAMACPP_SRC_ENV, str(source))
    monkeypatch.setenv("FAKE_RECORD", str(tmp_path / "record.json"))
    monkeypatch.delenv("FAKE_MODE", raising=False)
    return tmp_path / "record.json"


def left_in(out: Path) -> list[str]:
    """What the export left in the output directory and in the adapter directory."""
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("adapter"))
    return names + sorted(f"adapter/{p.name}" for p in (out / "adapter").iterdir())


def test_without_a_converter_the_export_succeeds_and_says_why(
    tmp_path: Path, base_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = peft_output(tmp_path / "out", APPLIED)
    monkeypatch.delenv(adapter.LLAMACPP_SRC_ENV, raising=False)
    final, checked = adapter.export(out, experts=False, base_model=str(base_model))
    status = adapter.status(final, checked, name="a", node="n", base_model="kimi")
    assert status["ggufError"] == "KIMI_LLAMACPP_SRC is not set: no llama.cpp converter here to write adapter.gguf"
    assert "ggufSha256" not in status
    assert status["sha256"] == hashlib.sha256((final / adapter.WEIGHTS).read_bytes()).hexdigest()
    assert sorted(p.name for p in final.iterdir()) == [adapter.CONFIG, adapter.WEIGHTS]

    # Set, but to a directory without the converter.
    monkeypatch.setenv(adapter.LLAMACPP_SRC_ENV, str(tmp_path))
    final, checked = adapter.export(out, experts=False, base_model=str(base_model))
    error = adapter.status(final, checked, name="a", node="n", base_model="kimi")["ggufError"]
    assert error == f"KIMI_LLAMACPP_SRC={tmp_path} holds no convert_lora_to_gguf.py: no adapter.gguf written"


@pytest.mark.parametrize(("dtype", "outtype"), [("F32", "f32"), ("BF16", "bf16"), ("F16", "f16")])
def test_the_converter_gets_only_the_modules_llamacpp_applies(
    tmp_path: Path, base_model: Path, fake_converter: Path, dtype: str, outtype: str
) -> None:
    out = peft_output(tmp_path / "out", DROPPED + APPLIED, dtype=dtype, lora_dropout=0.05)
    final, checked = adapter.export(out, experts=False, base_model=str(base_model))
    status = adapter.status(final, checked, name="a", node="n", base_model="kimi")
    gguf = (final / GGUF_ADAPTER_FILE).read_bytes()
    assert gguf == b"GGUF, whole"
    assert status["ggufSha256"] == hashlib.sha256(gguf).hexdigest()
    assert "ggufError" not in status
    assert status["llamacppDroppedModules"] == ["experts", "kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj"]
    # The published adapter is whole; only the converter's copy was filtered.
    assert json.loads((final / adapter.CONFIG).read_text())["target_modules"] == TARGETS
    assert checked.tensors == 2 * len(DROPPED + APPLIED)

    given = json.loads(fake_converter.read_text())
    assert given["tensors"] == {f"{m}.{ab}.weight": dtype for m in APPLIED for ab in ("lora_A", "lora_B")}
    assert given["config"] == {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["o_proj", "gate_proj", "up_proj"],
        "lora_dropout": 0.05,
    }
    staging, outfile = Path(given["argv"][0]), Path(given["argv"][given["argv"].index("--outfile") + 1])
    base = Path(given["argv"][2])
    assert given["argv"][1:] == ["--base", str(base), "--outfile", str(outfile), "--outtype", outtype]
    # --base is a directory of the base model's config.json alone, not the model's own directory
    # (the converter would read the header of every safetensors file there), removed afterwards.
    assert given["base"] == {"config.json": {"architectures": ["DeepseekV3ForCausalLM"]}}
    assert base != base_model
    assert base.parent == out
    assert not base.exists()
    # Written under a temporary name inside the partial export, renamed before the export was.
    assert outfile == out / "adapter.partial" / "adapter.gguf.partial"
    assert staging.parent == out
    assert left_in(out) == [
        "adapter",
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter/adapter.gguf",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ]


def test_a_failing_converter_leaves_no_gguf_and_its_last_line_is_the_reason(
    tmp_path: Path, base_model: Path, fake_converter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = peft_output(tmp_path / "out", APPLIED)
    monkeypatch.setenv("FAKE_MODE", "fail")
    final, checked = adapter.export(out, experts=False, base_model=str(base_model))
    status = adapter.status(final, checked, name="a", node="n", base_model="kimi")
    assert status["ggufError"] == (
        "convert_lora_to_gguf.py failed (exit 1): "
        "ValueError: Can not map tensor 'model.layers.0.self_attn.o_proj.weight'"
    )
    assert "ggufSha256" not in status
    assert fake_converter.exists()  # it did run, and wrote part of its file
    assert left_in(out) == [
        "adapter",
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ]


def test_an_export_over_one_with_a_gguf_does_not_keep_the_old_file(
    tmp_path: Path, base_model: Path, fake_converter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = peft_output(tmp_path / "out", APPLIED)
    final, _ = adapter.export(out, experts=False, base_model=str(base_model))
    assert (final / GGUF_ADAPTER_FILE).exists()
    monkeypatch.setenv("FAKE_MODE", "fail")
    final, _ = adapter.export(out, experts=False, base_model=str(base_model))
    assert not (final / GGUF_ADAPTER_FILE).exists()


@pytest.mark.parametrize(
    ("modules", "config", "model_config", "reason"),
    [
        (
            DROPPED,
            {},
            True,
            "llama.cpp applies none of the trained modules (see llamacppDroppedModules): no adapter.gguf written",
        ),
        (
            APPLIED,
            {"use_rslora": True},
            True,
            "adapter_config.json: use_rslora is set, which llama.cpp does not apply: no adapter.gguf written",
        ),
        (APPLIED, {}, False, "llama.cpp's converter needs the base model's config.json, which {model} does not hold"),
        (
            APPLIED,
            {"alpha_pattern": {"o_proj": 8, "gate_proj": 2}},
            True,
            "adapter_config.json: alpha_pattern is set (gate_proj, o_proj), which llama.cpp's converter does not "
            "carry (it writes one lora_alpha and one rank): no adapter.gguf written",
        ),
        (
            APPLIED,
            {"rank_pattern": {"o_proj": 2}},
            True,
            "adapter_config.json: rank_pattern is set (o_proj), which llama.cpp's converter does not carry (it "
            "writes one lora_alpha and one rank): no adapter.gguf written",
        ),
    ],
    ids=["nothing-applied", "rslora", "no-config", "alpha-pattern", "rank-pattern"],
)
def test_what_llamacpp_cannot_take_is_not_converted(
    tmp_path: Path,
    base_model: Path,
    fake_converter: Path,
    modules: list[str],
    config: dict[str, Any],
    model_config: bool,
    reason: str,
) -> None:
    out = peft_output(tmp_path / "out", modules, **config)
    if not model_config:
        (base_model / "config.json").unlink()
    final, checked = adapter.export(out, experts=False, base_model=str(base_model))
    status = adapter.status(final, checked, name="a", node="n", base_model="kimi")
    assert status["ggufError"] == reason.format(model=base_model)
    assert not fake_converter.exists()
    assert sorted(p.name for p in final.iterdir()) == [adapter.CONFIG, adapter.WEIGHTS]
    assert not (out / adapter.GGUF_STAGING).exists()


def test_empty_patterns_do_not_stop_the_conversion(tmp_path: Path, base_model: Path, fake_converter: Path) -> None:
    """PEFT writes ``alpha_pattern: {}`` and ``rank_pattern: {}`` into every adapter_config.json."""
    out = peft_output(tmp_path / "out", APPLIED, alpha_pattern={}, rank_pattern={})
    final, checked = adapter.export(out, experts=False, base_model=str(base_model))
    assert checked.gguf_error is None
    assert (final / GGUF_ADAPTER_FILE).is_file()


def test_a_copy_published_without_a_gguf_file_gets_the_exports(
    tmp_path: Path, base_model: Path, fake_converter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same weights published before the export wrote adapter.gguf: publishing again adds it to
    the copy, whole, and leaves nothing else there; one already there is never replaced."""
    out = peft_output(tmp_path / "out", APPLIED)
    store = tmp_path / "store"
    monkeypatch.setenv("FAKE_MODE", "fail")
    final, _ = adapter.export(out, experts=False, base_model=str(base_model))
    relative = adapter.publish(final, store, namespace="ml", name="a")
    copy = store / relative
    assert sorted(p.name for p in copy.iterdir()) == [adapter.CONFIG, adapter.WEIGHTS]
    weights_inode = (copy / adapter.WEIGHTS).stat().st_ino

    monkeypatch.delenv("FAKE_MODE")
    final, _ = adapter.export(out, experts=False, base_model=str(base_model))
    assert adapter.publish(final, store, namespace="ml", name="a") == relative
    assert sorted(p.name for p in copy.iterdir()) == [GGUF_ADAPTER_FILE, adapter.CONFIG, adapter.WEIGHTS]
    assert (copy / GGUF_ADAPTER_FILE).read_bytes() == (final / GGUF_ADAPTER_FILE).read_bytes()
    assert (copy / adapter.WEIGHTS).stat().st_ino == weights_inode
    assert sorted(p.name for p in copy.parent.iterdir()) == [copy.name]

    (final / GGUF_ADAPTER_FILE).write_bytes(b"GGUF, another")
    adapter.publish(final, store, namespace="ml", name="a")
    assert (copy / GGUF_ADAPTER_FILE).read_bytes() == b"GGUF, whole"


# The real converter on the tiny DeepSeek-V3 (MLA) model.

EXPORT = """
import json, sys
from pathlib import Path
from kimi_operator.workloads.train import adapter
final, checked = adapter.export(Path(sys.argv[1]), experts=False, base_model=sys.argv[2])
print(json.dumps(adapter.status(final, checked, name="a", node="n", base_model="kimi")))
"""
# llama.cpp's deepseek2 names of the modules mla_lora.py adapts and llama.cpp applies: layer 0 is dense,
# layer 1 has the shared experts.
GGUF_NAMES = {
    "0.self_attn.o_proj": "blk.0.attn_output",
    "1.self_attn.o_proj": "blk.1.attn_output",
    **{f"0.mlp.{p}_proj": f"blk.0.ffn_{p}" for p in ("gate", "up", "down")},
    **{f"1.mlp.shared_experts.{p}_proj": f"blk.1.ffn_{p}_shexp" for p in ("gate", "up", "down")},
}


@pytest.fixture(scope="module")
def llamacpp() -> Path:
    return llamacpp_tools.build()


@pytest.fixture(scope="module")
def mla(train_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Kimi-shaped model and one adapter per kind of module (e2e/engines/mla_lora.py)."""
    out = tmp_path_factory.mktemp("mla")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [train_python, str(MLA_LORA), str(out)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def merge_adapters(sources: list[Path], out: Path) -> dict[str, np.ndarray[Any, Any]]:
    """One adapter of every source's modules (same rank and alpha): one trained on all of them."""
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    targets: list[str] = []
    config: dict[str, Any] = {}
    for source in sources:
        with Reader(source / adapter.WEIGHTS) as reader:
            tensors.update({name: reader.view(name).copy() for name in reader.tensors})
        config = json.loads((source / adapter.CONFIG).read_text())
        targets += config["target_modules"]
    config["target_modules"] = targets
    out.mkdir()
    header: dict[str, Any] = {}
    offset = 0
    for name, array in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header).encode()
    blob = b"".join(np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in tensors.values())
    (out / adapter.WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + blob)
    (out / adapter.CONFIG).write_text(json.dumps(config))
    return tensors


def run_export(train_python: str, llamacpp: Path, out: Path, model: Path) -> dict[str, Any]:
    """The export as the training pod runs it: in the training environment, the converter found
    through KIMI_LLAMACPP_SRC."""
    env = {**os.environ, "PYTHONPATH": str(OPERATOR), llamacpp_tools.SRC_ENV: str(llamacpp / "src")}
    command = [train_python, "-c", EXPORT, str(out), str(model)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status: dict[str, Any] = json.loads(proc.stdout)
    return status


def test_an_mla_adapter_converts_without_what_llamacpp_drops(
    train_python: str, llamacpp: Path, mla: Path, tmp_path: Path
) -> None:
    """kv_b_proj alone makes llama.cpp's converter fail (e2e/test_llamacpp.py); trained with o_proj,
    the MLP and q_a_proj it converts, kv_b_proj and q_a_proj left out, every kept tensor as trained."""
    kinds = ["kv_b_proj", "q_a_proj", "o_proj", "mlp"]
    tensors = merge_adapters([mla / "adapters" / kind for kind in kinds], tmp_path / "out")
    # The base model's directory as a big checkpoint leaves it: besides its weights, a safetensors
    # file the converter cannot read (it is given the config alone).
    model = tmp_path / "model"
    shutil.copytree(mla / "model", model)
    (model / "model-extra.safetensors").write_bytes(b"\xff" * 64)
    status = run_export(train_python, llamacpp, tmp_path / "out", model)
    gguf = tmp_path / "out" / "adapter" / GGUF_ADAPTER_FILE
    assert status["ggufSha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert status["llamacppDroppedModules"] == ["kv_b_proj", "q_a_proj"]

    read = llamacpp_tools.read_gguf(train_python, llamacpp, gguf)
    assert read["fields"]["general.type"] == "adapter"
    assert read["fields"]["adapter.type"] == "lora"
    assert read["fields"]["adapter.lora.alpha"] == 16.0
    expected = {f"{name}.weight.lora_{ab}" for name in GGUF_NAMES.values() for ab in "ab"}
    assert set(read["tensors"]) == expected
    # Nothing of the MLA projections before the attention (attn_q_a, attn_kv_b, attn_k_b, attn_v_b).
    assert not [name for name in read["tensors"] if "attn_q" in name or "attn_k" in name or "attn_v" in name]
    # Each kept tensor is the trained one, converted at its own precision (f32).
    for module, name in GGUF_NAMES.items():
        prefix = f"base_model.model.model.layers.{module}"
        for ab in ("a", "b"):
            converted = read["tensors"][f"{name}.weight.lora_{ab}"]
            assert converted["type"] == "F32"
            assert np.array_equal(np.array(converted["data"]), tensors[f"{prefix}.lora_{ab.upper()}.weight"]), name


def test_the_real_converter_failing_leaves_its_last_line(
    train_python: str, llamacpp: Path, mla: Path, tmp_path: Path
) -> None:
    """A base model llama.cpp does not know: its converter's own last words become ggufError."""
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((mla / "model" / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    merge_adapters([mla / "adapters" / "o_proj"], tmp_path / "out")
    status = run_export(train_python, llamacpp, tmp_path / "out", model)
    assert (
        status["ggufError"]
        == "convert_lora_to_gguf.py failed (exit 1): ERROR:lora-to-gguf:Model NoSuchModelForCausalLM is not supported"
    )
    assert "ggufSha256" not in status
    assert sorted(p.name for p in (tmp_path / "out" / "adapter").iterdir()) == [adapter.CONFIG, adapter.WEIGHTS]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter", adapter.CONFIG, adapter.WEIGHTS]
