"""What a KTransformers LoRA run leaves in its output directory, written as kt-kernel 0.7.2 writes it:
the PEFT adapter of the non-expert layers (prefix ``base_model.model.``), the fused expert LoRA
(``layers.{L}.experts.{gate,up,down}_lora_{a,b}``, ``[experts, ...]``) and ``kt_adapter_manifest.json``
with each file's size and sha256. Run in the KTransformers environment.

    python kt_adapter.py OUT_DIR                   the files above, random values
    python kt_adapter.py compare OUT_DIR ADAPTER   check a converted adapter against OUT_DIR's tensors
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RANK, ALPHA, HIDDEN, INTER, EXPERTS, MOE_LAYERS = 4, 8, 32, 16, 4, (1, 2)
NON_EXPERT = ("q_a_proj", "o_proj")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(out: Path) -> None:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    peft = {}
    for layer in range(3):
        for module in NON_EXPERT:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            peft[f"{key}.lora_A.weight"] = torch.randn(RANK, HIDDEN)
            peft[f"{key}.lora_B.weight"] = torch.randn(HIDDEN, RANK)
    save_file(peft, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(NON_EXPERT)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    fused = {}
    for layer in MOE_LAYERS:
        for proj, (a_in, b_out) in {"gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}.items():
            fused[f"layers.{layer}.experts.{proj}_lora_a"] = torch.randn(EXPERTS, RANK, a_in, dtype=torch.bfloat16)
            fused[f"layers.{layer}.experts.{proj}_lora_b"] = torch.randn(EXPERTS, b_out, RANK, dtype=torch.bfloat16)
    save_file(fused, str(out / "fused_expert_lora.safetensors"))
    artifacts = {
        name: {"size": (out / name).stat().st_size, "sha256": sha256(out / name)}
        for name in ("adapter_config.json", "adapter_model.safetensors", "fused_expert_lora.safetensors")
    }
    manifest = {"version": 1, "status": "ready", "artifacts": artifacts}
    (out / "kt_adapter_manifest.json").write_text(json.dumps(manifest))


def compare(out: Path, adapter: Path) -> None:
    """Every expert slice and every non-expert tensor of the source, at SGLang's key, bit for bit."""
    converted = load_file(str(adapter / "adapter_model.safetensors"))
    fused = load_file(str(out / "fused_expert_lora.safetensors"))
    peft = load_file(str(out / "adapter_model.safetensors"))
    seen = 0
    for key, tensor in fused.items():
        _, layer, _, name = key.split(".")
        proj, ab = name.split("_lora_")
        for expert in range(tensor.shape[0]):
            target = f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.lora_{ab.upper()}.weight"
            if target in converted:
                assert torch.equal(converted[target], tensor[expert]), target
                seen += 1
    for key, tensor in peft.items():
        target = key.removeprefix("base_model.model.")
        if target in converted:
            assert torch.equal(converted[target], tensor), target
            seen += 1
    assert seen == len(converted), f"{len(converted) - seen} converted tensors do not come from the source"
    print(json.dumps({"tensors": len(converted), "config": json.loads((adapter / "adapter_config.json").read_text())}))


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        make(Path(sys.argv[1]))
