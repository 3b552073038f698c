"""Adapter export: what SGLang reads is checked before it is published, a KTransformers run's fused
expert LoRA goes through kt-kernel's own converter (in the KTransformers environment), and a
failure never leaves ``adapter/`` behind."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kimi_operator.workloads.train import adapter

KT_ORACLE = Path(__file__).parent / "oracle" / "kt_adapter.py"
OPERATOR = Path(__file__).parents[1] / "operator"


def write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]]) -> None:
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name, shape in tensors.items():
        data = np.ones(shape, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def peft_output(directory: Path, rank: int = 4, **config: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "base_model.model.model.layers"
    tensors = {}
    for layer in range(2):
        for module in ("q_a_proj", "o_proj"):
            tensors[f"{prefix}.{layer}.self_attn.{module}.lora_A.weight"] = (rank, 16)
            tensors[f"{prefix}.{layer}.self_attn.{module}.lora_B.weight"] = (16, rank)
    write_safetensors(directory / "adapter_model.safetensors", tensors)
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_a_proj", "o_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    return directory


def test_a_plain_peft_adapter_is_published(tmp_path: Path) -> None:
    out = peft_output(tmp_path / "out")
    final, checked = adapter.export(out, experts=False, base_model="/models/bf16")
    assert final == out / "adapter"
    assert (checked.rank, checked.alpha, checked.tensors, checked.expert_modules) == (4, 8.0, 8, 0)
    status = adapter.status(final, checked, name="support", node="n1", base_model="kimi")
    weights = (final / "adapter_model.safetensors").read_bytes()
    assert status["sha256"] == hashlib.sha256(weights).hexdigest()
    assert status["sizeBytes"] == len(weights) + (final / "adapter_config.json").stat().st_size
    assert (status["rank"], status["expertLora"], status["baseModel"]) == (4, False, "kimi")
    assert not (out / "adapter.partial").exists()


def test_publishing_again_replaces_the_adapter_whole(tmp_path: Path) -> None:
    out = peft_output(tmp_path / "out")
    adapter.export(out, experts=False, base_model="m")
    (out / "adapter" / "stale.bin").write_text("from an earlier export")
    final, _ = adapter.export(out, experts=False, base_model="m")
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def corrupt_rank(out: Path) -> str:
    write_safetensors(
        out / "adapter_model.safetensors",
        {
            "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": (8, 16),
            "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight": (16, 8),
        },
    )
    return "o_proj.lora_A.weight has shape [8, 16], not rank 4"


def corrupt_pair(out: Path) -> str:
    write_safetensors(
        out / "adapter_model.safetensors", {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": (4, 16)}
    )
    return "o_proj has lora_A or lora_B alone"


def corrupt_target(out: Path) -> str:
    write_safetensors(
        out / "adapter_model.safetensors",
        {
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": (4, 16),
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": (16, 4),
        },
    )
    return "down_proj.lora_A.weight adapts a module not in target_modules"


def corrupt_key(out: Path) -> str:
    write_safetensors(out / "adapter_model.safetensors", {"base_model.model.lm_head.weight": (4, 4)})
    return "tensor base_model.model.lm_head.weight is not a lora_A/lora_B weight"


def corrupt_dora(out: Path) -> str:
    peft_output(out, use_dora=True)
    return "use_dora is set; SGLang does not load DoRA adapters"


def corrupt_truncated(out: Path) -> str:
    path = out / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    return "(truncated file?)"


def corrupt_missing(out: Path) -> str:
    (out / "adapter_model.safetensors").unlink()
    return "adapter_model.safetensors is missing"


def corrupt_config(out: Path) -> str:
    (out / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    return "target_modules must list the adapted modules"


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_rank,
        corrupt_pair,
        corrupt_target,
        corrupt_key,
        corrupt_dora,
        corrupt_truncated,
        corrupt_missing,
        corrupt_config,
    ],
)
def test_what_sglang_cannot_load_is_never_published(tmp_path: Path, corrupt: Any) -> None:
    out = peft_output(tmp_path / "out")
    expected = corrupt(out)
    with pytest.raises(adapter.ExportError) as error:
        adapter.export(out, experts=False, base_model="m")
    assert expected in str(error.value)
    assert not (out / "adapter").exists()


def test_expert_lora_asked_for_but_not_trained(tmp_path: Path) -> None:
    out = peft_output(tmp_path / "out")
    with pytest.raises(adapter.ExportError) as error:
        adapter.export(out, experts=True, base_model="m")
    assert "lora.experts is true but the training saved no fused_expert_lora.safetensors" in str(error.value)
    assert not (out / "adapter").exists()


def kt_output(out: Path) -> Path:
    peft_output(out)
    write_safetensors(out / "fused_expert_lora.safetensors", {"layers.1.experts.gate_lora_a": (2, 4, 16)})
    artifacts = {
        name: {"size": (out / name).stat().st_size, "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()}
        for name in ("adapter_config.json", "adapter_model.safetensors", "fused_expert_lora.safetensors")
    }
    (out / "kt_adapter_manifest.json").write_text(json.dumps({"version": 1, "status": "ready", "artifacts": artifacts}))
    return out


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda out: (out / "kt_adapter_manifest.json").unlink(), "without kt_adapter_manifest.json"),
        (lambda out: (out / "kt_adapter_manifest.json").write_text('{"status": "staging"}'), "not 'ready'"),
        (
            lambda out: (out / "fused_expert_lora.safetensors").write_bytes(
                (out / "fused_expert_lora.safetensors").read_bytes()[:-4] + b"\0\0\0\0"
            ),
            "fused_expert_lora.safetensors does not match its sha256",
        ),
        (lambda out: (out / "adapter_model.safetensors").write_bytes(b"x"), "adapter_model.safetensors is 1 bytes"),
    ],
)
def test_a_kt_save_that_did_not_finish_is_refused_before_conversion(tmp_path: Path, damage: Any, message: str) -> None:
    out = kt_output(tmp_path / "out")
    damage(out)
    with pytest.raises(adapter.ExportError) as error:
        adapter.export(out, experts=True, base_model="m")
    assert message in str(error.value)
    assert not (out / "adapter").exists()


def run_kt(kt_python: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(OPERATOR)}
    proc = subprocess.run([kt_python, *args], capture_output=True, text=True, check=False, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


EXPORT = """
import json, sys
from pathlib import Path
from kimi_operator.workloads.train import adapter
final, checked = adapter.export(Path(sys.argv[1]), experts=sys.argv[2] == "experts", base_model="/models/k/bf16")
print(json.dumps(adapter.status(final, checked, name="a", node="n", base_model="k")))
"""


def test_fused_expert_lora_is_converted_by_kt_kernel_and_merged(kt_python: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_kt(kt_python, str(KT_ORACLE), str(out))
    status = json.loads(run_kt(kt_python, "-c", EXPORT, str(out), "experts").stdout)
    assert status["expertLora"] is True
    assert status["rank"] == 4
    # Every tensor of the result is a source tensor at SGLang's key: 2 MoE layers x 4 experts x
    # 3 projections x (A, B), plus the 12 non-expert ones with the PEFT prefix taken off.
    compared = json.loads(run_kt(kt_python, str(KT_ORACLE), "compare", str(out), status["path"]).stdout)
    assert compared["tensors"] == 2 * 4 * 3 * 2 + 12
    config = compared["config"]
    assert config["target_modules"] == ["o_proj", "gate_proj", "up_proj", "down_proj", "q_a_proj"]
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, "/models/k/bf16")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("adapter")) == [
        "adapter",
        *sorted(["adapter_config.json", "adapter_model.safetensors"]),
    ]


def test_without_lora_experts_only_the_non_expert_part_is_published(kt_python: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_kt(kt_python, str(KT_ORACLE), str(out))
    status = json.loads(run_kt(kt_python, "-c", EXPORT, str(out), "plain").stdout)
    assert status["expertLora"] is False
    compared = json.loads(run_kt(kt_python, str(KT_ORACLE), "compare", str(out), status["path"]).stdout)
    assert compared["tensors"] == 12
    assert compared["config"]["target_modules"] == ["o_proj", "q_a_proj"]


def test_a_converter_failure_is_reported_and_publishes_nothing(kt_python: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_kt(kt_python, str(KT_ORACLE), str(out))
    # A rank the non-expert part does not share: kt-kernel's converter refuses to merge them.
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    manifest = json.loads((out / "kt_adapter_manifest.json").read_text())
    manifest["artifacts"]["adapter_config.json"] = {
        "size": (out / "adapter_config.json").stat().st_size,
        "sha256": hashlib.sha256((out / "adapter_config.json").read_bytes()).hexdigest(),
    }
    (out / "kt_adapter_manifest.json").write_text(json.dumps(manifest))
    proc = run_kt(kt_python, "-c", EXPORT, str(out), "experts", check=False)
    assert proc.returncode != 0
    assert "convert_kt_to_sglang_adapter.py failed" in proc.stderr
    assert "Non-expert adapter rank mismatch: adapter_config.json r=8, but fused expert LoRA rank=4" in proc.stderr
    assert not (out / "adapter").exists()
    assert not (out / "adapter.kt-input").exists()
