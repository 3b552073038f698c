"""A tiny Llama-architecture model with random weights, a byte-level BPE tokenizer with a chat
template, and PEFT LoRA adapters for it, all built locally in the training environment (nothing is
downloaded); and the greedy continuation that plain transformers+peft computes, the oracle the
SGLang stand-in's answers are compared with.

    python tiny_lora.py OUT_DIR [--adapters N] [--reference-prompt PROMPT [--max-tokens N]]
        OUT_DIR/model and OUT_DIR/adapters/{a0..a<N-1>,wrong-rank,corrupt,dora,expert}; with a
        prompt, also OUT_DIR/references.json: the base model's and each good adapter's continuation
        of PROMPT as a completion and as a chat turn (one process: imports take seconds)
    python tiny_lora.py reference MODEL [ADAPTER] PROMPT [--max-tokens N] [--chat] [--json]
        the greedy continuation of PROMPT (as a user turn with --chat), with ADAPTER applied

The good adapters (r=8, alpha=16, q/k/v/o_proj) have distinct seeds and non-zero lora_B, so each
one changes the output. The others are wrong on purpose:
- wrong-rank: r=32, above the --max-lora-rank 16 the tests start the engine with;
- corrupt: adapter_model.safetensors cut in half;
- dora: a0's weights with use_dora set (SGLang refuses DoRA);
- expert: a0's weights plus expert LoRA tensors
  (``model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.lora_{A,B}.weight``), with the keys in
  the form kt-kernel's converter writes (no ``base_model.model.`` prefix). The tiny Llama has no
  experts, so those tensors have nothing to apply to: the stand-in applies the non-expert part only,
  which is why this adapter's output equals a0's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model  # type: ignore[import-not-found,unused-ignore]
from safetensors.torch import load_file, save_file  # type: ignore[import-not-found,unused-ignore]
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # type: ignore[import-not-found,unused-ignore]
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|pad|>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<s>{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<s><|system|>{{ m['content'] }}</s>"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}</s>"
    "{% else %}<|assistant|>{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = (
    "the quick brown fox jumps over the lazy dog while a model serves many adapters at once and "
    "every request names the adapter it wants or none hello world what is the capital of france "
    "paris is the capital city large language models generate text one token at a time low rank "
    "adaptation adds small matrices to the attention projections of a model"
)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]
# The expert LoRA's shape: as many layers as the model, a few experts of a small MoE width.
EXPERTS, MOE_INTERMEDIATE = 4, 32
PEFT_PREFIX = "base_model.model."
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    words = CORPUS.split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    corpus.append("0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<|pad|>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(model_dir: Path) -> None:
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Well conditioned (as the GPU recipe found): greedy paths do not hinge on near-ties.
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def build_adapter(model_dir: Path, out: Path, *, seed: int, rank: int = 8, alpha: int = 16) -> None:
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules=ATTENTION
    )
    tuned = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                # PEFT starts lora_B at zero (no effect); this makes the update about as large as W.
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    tuned.save_pretrained(out)


def build_expert_adapter(source: Path, out: Path, *, layers: int, hidden: int, seed: int) -> None:
    tensors = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(source / WEIGHTS).items()}
    rank = int(json.loads((source / CONFIG).read_text())["r"])
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "gate_proj": ((rank, hidden), (MOE_INTERMEDIATE, rank)),
        "up_proj": ((rank, hidden), (MOE_INTERMEDIATE, rank)),
        "down_proj": ((rank, MOE_INTERMEDIATE), (hidden, rank)),
    }
    for layer in range(layers):
        for expert in range(EXPERTS):
            for projection, (a_shape, b_shape) in shapes.items():
                module = f"model.layers.{layer}.mlp.experts.{expert}.{projection}"
                tensors[f"{module}.lora_A.weight"] = torch.randn(a_shape, generator=generator) * 0.1
                tensors[f"{module}.lora_B.weight"] = torch.randn(b_shape, generator=generator) * 0.1
    out.mkdir(parents=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    config = json.loads((source / CONFIG).read_text())
    config["target_modules"] = sorted({*config["target_modules"], *EXPERT_PROJECTIONS})
    (out / CONFIG).write_text(json.dumps(config, indent=2))


def build(out: Path, adapters: int) -> None:
    transformers.utils.logging.disable_progress_bar()
    model_dir, adapter_dir = out / "model", out / "adapters"
    build_model(model_dir)
    for index in range(adapters):
        build_adapter(model_dir, adapter_dir / f"a{index}", seed=100 + index)
    build_adapter(model_dir, adapter_dir / "wrong-rank", seed=200, rank=32, alpha=64)
    build_adapter(model_dir, adapter_dir / "corrupt", seed=201)
    weights = adapter_dir / "corrupt" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    first = adapter_dir / "a0"
    shutil.copytree(first, adapter_dir / "dora")
    dora = json.loads((first / CONFIG).read_text())
    (adapter_dir / "dora" / CONFIG).write_text(json.dumps({**dora, "use_dora": True}, indent=2))
    model_config = json.loads((model_dir / "config.json").read_text())
    build_expert_adapter(
        first,
        adapter_dir / "expert",
        layers=int(model_config["num_hidden_layers"]),
        hidden=int(model_config["hidden_size"]),
        seed=300,
    )


def reference(model_dir: Path, adapter: Path | None, prompt: str, *, max_tokens: int, chat: bool) -> dict[str, Any]:
    """Greedy continuation by transformers' own generate, on the model with PEFT's adapter."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    text = (
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        if chat
        else prompt
    )
    ids = tokenizer(text, add_special_tokens=not chat, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    return {"prompt_ids": ids[0].tolist(), "ids": new, "text": tokenizer.decode(new, skip_special_tokens=True)}


def references(out: Path, adapters: int, prompt: str, max_tokens: int) -> dict[str, dict[str, Any]]:
    """Keyed by ``completion`` or ``chat``, then ``base`` or the adapter's directory name."""
    model_dir = out / "model"
    tuned: dict[str, Path | None] = {"base": None} | {f"a{i}": out / "adapters" / f"a{i}" for i in range(adapters)}
    return {
        form: {
            name: reference(model_dir, path, prompt, max_tokens=max_tokens, chat=form == "chat")
            for name, path in tuned.items()
        }
        for form in ("completion", "chat")
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["reference"]:
        parser = argparse.ArgumentParser(prog="tiny_lora.py reference")
        parser.add_argument("model", type=Path)
        parser.add_argument("adapter_and_prompt", nargs="+", metavar="[ADAPTER] PROMPT")
        parser.add_argument("--max-tokens", type=int, default=16)
        parser.add_argument("--chat", action="store_true", help="PROMPT is a user turn, under the chat template")
        parser.add_argument("--json", action="store_true", help="print the prompt's and the continuation's ids too")
        args = parser.parse_args(argv[1:])
        if len(args.adapter_and_prompt) > 2:
            parser.error("give at most ADAPTER and PROMPT")
        *adapter, prompt = args.adapter_and_prompt
        found = reference(
            args.model, Path(adapter[0]) if adapter else None, prompt, max_tokens=args.max_tokens, chat=args.chat
        )
        print(json.dumps(found) if args.json else found["text"])
        return
    parser = argparse.ArgumentParser(prog="tiny_lora.py")
    parser.add_argument("out", type=Path)
    parser.add_argument("--adapters", type=int, default=5)
    parser.add_argument("--reference-prompt", help="also write references.json for this prompt")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    build(args.out, args.adapters)
    if args.reference_prompt is not None:
        found = references(args.out, args.adapters, args.reference_prompt, args.max_tokens)
        (args.out / "references.json").write_text(json.dumps({"prompt": args.reference_prompt, **found}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
