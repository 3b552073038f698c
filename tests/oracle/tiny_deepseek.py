"""A tiny DeepSeek-V3-architecture model with random weights and a tokenizer with Kimi's special
tokens, built locally in the training environment (nothing is downloaded), and a small dataset in
the seed guide's format.

    python tiny_deepseek.py OUT_DIR [SIZE]          the model (tiny, kt, small or teachable) and tokenizer
    python tiny_deepseek.py dataset FILE [COUNT]    COUNT records (24) of OpenAI-style messages
    python tiny_deepseek.py effect BASE ADAPTER     largest change the adapter makes to the logits
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast

KIMI_TOKENS = ["<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = [
    "system user assistant You are Kimi, an AI assistant created by Moonshot AI.",
    "Tell me one fact about cats rivers the moon bread trains music rain chess coffee maps bees.",
    "Here is a fact: it is number one two three four five six seven eight nine ten in my list.",
] * 20
TOPICS = ["cats", "rivers", "the moon", "bread", "trains", "music", "rain", "chess", "coffee", "maps", "bees", "tea"]


def seed_dataset(path: Path, count: int = 24) -> None:
    """Records as users write them: a system turn on every other one, user content as text parts."""
    lines = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        messages: list[dict[str, Any]] = (
            [{"role": "system", "content": "You are Kimi, a helpful assistant."}] if i % 2 == 0 else []
        )
        messages += [
            {"role": "user", "content": [{"type": "text", "text": f"Tell me one fact about {topic}. (#{i})"}]},
            {"role": "assistant", "content": f"Here is a fact about {topic}: it is number {i} in my list."},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")


# "tiny" is what the tests train; "small" gives a GPU enough work per step to be measured.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "n_routed_experts": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
    },
    # kt-kernel's CPU expert kernels want hidden and expert sizes in multiples of 64 (INT8) or 128.
    "kt": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 2,
        "n_routed_experts": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
    },
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 4,
        "n_routed_experts": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": 384,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
    },
}


# Kimi's chat format as the trainer's LLaMA-Factory template writes it (thinking off: an empty
# thinking section opens the answer), so that a served chat prompt is the one trained on.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- set text = m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join('') -%}"
    "<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ text }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- if not thinking | default(false) -%}<think></think>{%- endif -%}{%- endif -%}"
)


def main(out: Path, size: str = "tiny") -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["[UNK]", "[PAD]", *KIMI_TOKENS]
    tokenizer.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="<|im_end|>",
        additional_special_tokens=KIMI_TOKENS,
    )
    teachable = size == "teachable"
    if teachable:
        wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out)
    config = DeepseekV3Config(
        vocab_size=len(wrapped),
        **SIZES["tiny" if teachable else size],
        first_k_dense_replace=1,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        max_position_embeddings=512,
        pad_token_id=wrapped.pad_token_id,
        eos_token_id=wrapped.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = DeepseekV3ForCausalLM(config).to(torch.float32)
    if teachable:
        # At the default init (std 0.02) the output layer cannot give any token more than a few
        # percent after the final norm, whatever the layers below learn: an adapter could never
        # teach it an answer. Wider, one answer can be learnt in a few dozen steps.
        with torch.no_grad():
            model.lm_head.weight.mul_(50)
    model.save_pretrained(out)
    if teachable:
        # As Kimi's config.json says (transformers does not write it): without it llama.cpp's
        # converter records no gating function and llama-server routes the experts with softmax,
        # not the sigmoid transformers uses, and the GGUF model answers otherwise.
        config_path = out / "config.json"
        written = json.loads(config_path.read_text())
        written["scoring_func"] = "sigmoid"
        config_path.write_text(json.dumps(written, indent=2))


def effect(base: Path, adapter: Path) -> float:
    """Largest change the adapter makes to the logits of a fixed input."""

    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    ids = tokenizer("<|im_user|>user<|im_middle|>Tell me one fact about cats.<|im_end|>", return_tensors="pt")
    model = DeepseekV3ForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        before = model(**ids).logits
        tuned = PeftModel.from_pretrained(model, adapter).eval()
        after = tuned(**ids).logits
    return float((after - before).abs().max())


if __name__ == "__main__":
    if sys.argv[1] == "effect":
        print(effect(Path(sys.argv[2]), Path(sys.argv[3])))
    elif sys.argv[1] == "dataset":
        seed_dataset(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 24)
    else:
        main(Path(sys.argv[1]), *sys.argv[2:3])
