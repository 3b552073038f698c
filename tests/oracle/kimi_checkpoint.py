"""Tiny Kimi-K2.5-shaped checkpoints, quantized and packed by compressed-tensors itself.

Runs in the oracle environment (torch + compressed-tensors), never imports the project: the format
our converter reads is produced here by code we did not write, and the reference BF16 weights are
compressed-tensors' own decompression.

    python kimi_checkpoint.py make OUT [--layers N --experts N --hidden N --inter N --shards N --seed N]
        OUT/model/                  the checkpoint (config.json, index, shards)
        OUT/reference.safetensors   compressed-tensors' decompression of every packed weight
    python kimi_checkpoint.py load DIR    load every shard of DIR with safetensors; print a JSON summary
    python kimi_checkpoint.py quantize SRC OUT [--shards N]
        SRC: a DeepSeek-V3 model as transformers saves it (tiny_deepseek.py), or the same wrapped as
        Kimi K2.5 (kimi_k25_wrap.py); OUT: the same model as Kimi ships its weights: every routed
        expert packed to INT4, the rest BF16, the tokenizer and any modelling code beside it (the
        wrapper's quantization_config under its text_config). Its BF16 conversion is a model
        transformers and LLaMA-Factory load and train.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from safetensors.torch import load_file, save_file

GROUP = 32
PREFIX = "language_model.model"


def scheme() -> QuantizationScheme:
    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP),
    )


def quantization_config() -> dict[str, object]:
    weights = scheme().weights
    assert weights is not None
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights.model_dump(mode="json")}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
    }


def config(layers: int, experts: int, hidden: int, inter: int) -> dict[str, object]:
    text = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "hidden_size": hidden,
        "intermediate_size": inter * 2,
        "moe_intermediate_size": inter,
        "num_hidden_layers": layers,
        "first_k_dense_replace": 1,
        "n_routed_experts": experts,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "num_attention_heads": 2,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "vocab_size": 256,
        "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
        "quantization_config": quantization_config(),
    }
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": {"hidden_size": 32, "num_hidden_layers": 1},
    }


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors computes the scales and packs the weight."""
    args = scheme().weights
    assert args is not None
    rows, cols = weight.shape
    grouped = weight.float().reshape(rows, cols // GROUP, GROUP)
    scale, zero_point = calculate_qparams(grouped.amin(dim=-1), grouped.amax(dim=-1), args)
    state = {"weight": weight, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero_point}
    return dict(PackedQuantizationCompressor.compress(state, scheme()))


def write_shards(tensors: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    """``tensors`` spread over ``shards`` safetensors files, and their index."""
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        chunk = names[i::shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def make(out: Path, layers: int, experts: int, hidden: int, inter: int, shards: int, seed: int) -> None:
    torch.manual_seed(seed)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}

    def dense(name: str, *shape: int) -> None:
        tensors[name] = (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    dense(f"{PREFIX}.embed_tokens.weight", 256, hidden)
    dense(f"{PREFIX}.norm.weight", hidden)
    dense("language_model.lm_head.weight", 256, hidden)
    dense("vision_tower.patch_embed.proj.weight", 32, 3 * 14 * 14)
    dense("mm_projector.proj.0.weight", hidden, 32)
    reference: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        p = f"{PREFIX}.layers.{layer}"
        dense(f"{p}.input_layernorm.weight", hidden)
        dense(f"{p}.self_attn.q_a_proj.weight", 32, hidden)
        dense(f"{p}.self_attn.kv_a_proj_with_mqa.weight", 16 + 8, hidden)
        dense(f"{p}.self_attn.o_proj.weight", hidden, 2 * 16)
        if layer == 0:
            for proj, shape in (
                ("gate_proj", (inter * 2, hidden)),
                ("up_proj", (inter * 2, hidden)),
                ("down_proj", (hidden, inter * 2)),
            ):
                dense(f"{p}.mlp.{proj}.weight", *shape)
            continue
        dense(f"{p}.mlp.gate.weight", experts, hidden)
        tensors[f"{p}.mlp.gate.e_score_correction_bias"] = torch.randn(experts)  # F32, as shipped
        for proj, shape in (
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        ):
            dense(f"{p}.mlp.shared_experts.{proj}.weight", *shape)
            for e in range(experts):
                base = f"{p}.mlp.experts.{e}.{proj}"
                # Wide range of magnitudes so rounding to bf16 matters.
                weight = (torch.randn(*shape) * (10 ** torch.empty(shape[0], 1).uniform_(-3, 1))).to(torch.bfloat16)
                packed = quantize(weight)
                for key in ("weight_packed", "weight_scale", "weight_shape"):
                    tensors[f"{base}.{key}"] = packed[key].contiguous()
                decompressed = PackedQuantizationCompressor.decompress(dict(packed), scheme())
                reference[f"{base}.weight"] = decompressed["weight"].contiguous()
    write_shards(tensors, model_dir, shards)
    (model_dir / "config.json").write_text(json.dumps(config(layers, experts, hidden, inter), indent=2))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    save_file(reference, str(out / "reference.safetensors"))


ROUTED = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def quantize_model(src: Path, out: Path, shards: int) -> None:
    """``src``'s model with its routed experts packed as compressed-tensors packs Kimi's."""
    out.mkdir(parents=True, exist_ok=True)
    source: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        source.update(load_file(str(path)))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        if ROUTED.search(name):
            packed = quantize(tensor.to(torch.bfloat16))
            base = name.removesuffix(".weight")
            for key in ("weight_packed", "weight_scale", "weight_shape"):
                tensors[f"{base}.{key}"] = packed[key].contiguous()
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = tensor.float()  # F32, as shipped
        else:
            tensors[name] = tensor.to(torch.bfloat16).contiguous()
    write_shards(tensors, out, shards)
    config = json.loads((src / "config.json").read_text())
    if "text_config" in config:
        # Kimi K2.5's wrapper (kimi_k25_wrap.py): the quantization is the language model's, and
        # nothing of the vision encoder is packed.
        quant = quantization_config()
        quant["ignore"] = [*quant["ignore"], "re:.*lm_head", "re:vision_tower.*", "re:mm_projector.*"]  # type: ignore[misc]
        config["text_config"].update(dtype="bfloat16", quantization_config=quant)
        config.update(dtype="bfloat16")
    else:
        config.update(torch_dtype="bfloat16", dtype="bfloat16", quantization_config=quantization_config())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for side in sorted(src.iterdir()):
        if (
            side.is_file()
            and side.suffix != ".safetensors"
            and side.name not in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copyfile(side, out / side.name)


def load(directory: Path) -> None:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    seen = {}
    for shard in sorted(set(index["weight_map"].values())):
        for name, tensor in load_file(str(directory / shard)).items():
            seen[name] = [str(tensor.dtype), list(tensor.shape)]
    json.dump({"tensors": seen}, sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("out", type=Path)
    for flag, default in (("layers", 3), ("experts", 4), ("hidden", 64), ("inter", 64), ("shards", 3), ("seed", 0)):
        mk.add_argument(f"--{flag}", type=int, default=default)
    ld = sub.add_parser("load")
    ld.add_argument("dir", type=Path)
    qz = sub.add_parser("quantize")
    qz.add_argument("src", type=Path)
    qz.add_argument("out", type=Path)
    qz.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    if args.cmd == "make":
        make(args.out, args.layers, args.experts, args.hidden, args.inter, args.shards, args.seed)
    elif args.cmd == "quantize":
        quantize_model(args.src, args.out, args.shards)
    else:
        load(args.dir)


if __name__ == "__main__":
    main()
