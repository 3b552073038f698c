"""A tiny random Llama and the PEFT adapters the agent-vs-SGLang run serves (GPU image's own
torch, transformers and peft; nothing is downloaded).

    python3 make_tiny.py TOKENIZER_DIR OUT_DIR

OUT_DIR/model: the base (bf16 safetensors, the tokenizer beside it).
OUT_DIR/models/adapters/{a0,a1,a2,a3}: r=8, alpha=16, q/k/v/o_proj, distinct random weights
    (lora_B non-zero, so each adapter changes the output);
OUT_DIR/models/adapters/wrong-rank: r=32, above the engine's --max-lora-rank 16;
OUT_DIR/models/adapters/corrupt: a0's config with adapter_model.safetensors cut in half.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
WEIGHTS = "adapter_model.safetensors"


def main(tok_dir: str, out: str) -> None:
    model_dir = os.path.join(out, "model")
    adapters = os.path.join(out, "models", "adapters")
    os.makedirs(adapters, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.do_sample = False
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), model_dir)

    specs = {"a0": (8, 1), "a1": (8, 2), "a2": (8, 3), "a3": (8, 4), "wrong-rank": (32, 5)}
    for name, (rank, seed) in specs.items():
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        lcfg = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules=TARGETS
        )
        peft_model = get_peft_model(base, lcfg)
        gen = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        peft_model.save_pretrained(os.path.join(adapters, name), safe_serialization=True)

    corrupt = os.path.join(adapters, "corrupt")
    os.makedirs(corrupt, exist_ok=True)
    shutil.copy(os.path.join(adapters, "a0", "adapter_config.json"), corrupt)
    with open(os.path.join(adapters, "a0", WEIGHTS), "rb") as src:
        data = src.read()
    with open(os.path.join(corrupt, WEIGHTS), "wb") as dst:
        dst.write(data[: len(data) // 2])

    print(json.dumps({n: sorted(os.listdir(os.path.join(adapters, n))) for n in sorted(os.listdir(adapters))}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
