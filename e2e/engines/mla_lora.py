"""A tiny Kimi-K2.5-shaped (DeepSeek-V3) model and one PEFT LoRA adapter per kind of module a
training run can target, to see which of them a real llama.cpp server applies.

    python mla_lora.py OUT_DIR
        OUT_DIR/model (tests/oracle/tiny_deepseek.py's model, with the gating function real
        DeepSeek-V3 and Kimi configs name) and OUT_DIR/adapters/<kind>, each adapting only that
        kind: q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj and mlp (the dense layer's
        and the shared experts' gate, up and down projections)

Every adapter has random, non-zero lora_A and lora_B. OUT_DIR/references.json holds the prompt's
token ids and transformers + PEFT's greedy continuation of them (with the first token's log
probability) for the base model and each adapter, the oracle a llama.cpp server is compared with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model  # type: ignore[import-not-found,unused-ignore]
from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "oracle"))
import tiny_deepseek

KINDS = {
    "q_a_proj": ["q_a_proj"],
    "q_b_proj": ["q_b_proj"],
    "kv_a_proj_with_mqa": ["kv_a_proj_with_mqa"],
    "kv_b_proj": ["kv_b_proj"],
    "o_proj": ["o_proj"],
    # Module names PEFT matches in the dense layer and the shared experts; the routed experts are
    # fused 3-D parameters in transformers 5, which target_modules does not reach.
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
PROMPT = "Tell me one fact about cats."
TOKENS = 8


def greedy(model: torch.nn.Module, prompt: list[int]) -> dict[str, Any]:
    """TOKENS greedy tokens, end of sequence or not (as llama.cpp's ignore_eos), and the log
    probability of the first: an adapter whose effect is too small to change a token (q_a_proj's
    update goes through a norm) still changes it."""
    ids = list(prompt)
    first = 0.0
    with torch.no_grad():
        for step in range(TOKENS):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            if step == 0:
                first = float(torch.log_softmax(logits, dim=-1)[ids[-1]])
    return {"tokens": ids[len(prompt) :], "logprob": first}


def main(out: Path) -> None:
    model_dir = out / "model"
    tiny_deepseek.main(model_dir, "tiny")
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    # As in DeepSeek-V3's and Kimi's config.json; transformers does not write it, and without it the
    # GGUF has no gating function and llama.cpp routes the experts with softmax.
    config["scoring_func"] = "sigmoid"
    config_path.write_text(json.dumps(config, indent=2))
    prompt = list(PreTrainedTokenizerFast.from_pretrained(model_dir)(PROMPT).input_ids)
    references = {"prompt": prompt, "base": greedy(DeepseekV3ForCausalLM.from_pretrained(model_dir).eval(), prompt)}
    for seed, (kind, targets) in enumerate(KINDS.items(), start=1):
        lora = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules=targets
        )
        tuned = get_peft_model(DeepseekV3ForCausalLM.from_pretrained(model_dir), lora)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in tuned.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    # PEFT starts lora_B at zero (no effect): an update far larger than the tiny weights.
                    param.copy_(torch.randn(param.shape, generator=generator))
        tuned.save_pretrained(out / "adapters" / kind)
        references[kind] = greedy(tuned.eval(), prompt)
    (out / "references.json").write_text(json.dumps(references))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
