"""What llama.cpp does with a LoRA adapter trained on Kimi K2.5 (a DeepSeek-V3-shaped model).

llama.cpp converts the model to its ``deepseek2`` architecture and applies LoRA where that graph
has a LoRA-aware matmul: ``o_proj`` and the gate, up and down projections of the dense layers and
the shared experts (token-exact against transformers + PEFT). The MLA projections before the
attention are converted and loaded but take no effect; ``kv_b_proj`` cannot be converted at all
(``convert_lora_to_gguf.py`` fails in its transpose); routed-expert LoRA has no tested path. A
llama.cpp server would drop all of those without a word, so they are named before it runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Module names whose LoRA llama.cpp applies (outside the routed experts).
APPLIED = frozenset({"o_proj", "gate_proj", "up_proj", "down_proj"})
# Why each other kind is dropped, by the name reported for it.
DROPPED = {
    "q_a_proj": "converted and loaded, but llama.cpp's MLA attention ignores it",
    "q_b_proj": "converted and loaded, but llama.cpp's MLA attention ignores it",
    "kv_a_proj_with_mqa": "converted and loaded, but llama.cpp's MLA attention ignores it",
    "kv_b_proj": "llama.cpp's convert_lora_to_gguf.py cannot convert it",
    "experts": "routed-expert LoRA: llama.cpp has no tested path for it",
}
ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.[a-z_]+$")


def dropped_modules(modules: Iterable[str]) -> list[str]:
    """The kinds of trained module (by their last name; ``experts`` for the routed experts) a
    llama.cpp server would not apply, sorted. A kind this module does not know is dropped too: it
    was never seen to take effect."""
    dropped = set()
    for module in modules:
        if ROUTED_EXPERT.search(module):
            dropped.add("experts")
        elif (name := module.rsplit(".", 1)[-1]) not in APPLIED:
            dropped.add(name)
    return sorted(dropped)


def why(name: str) -> str:
    """The reason a dropped kind is dropped, for messages."""
    return DROPPED.get(name, "not a module llama.cpp is known to apply LoRA to")
