"""What llama.cpp does with a LoRA adapter trained on Kimi K2.5 (a DeepSeek-V3-shaped model).

llama.cpp converts the model to its ``deepseek2`` architecture and applies LoRA where that graph
has a LoRA-aware matmul: ``o_proj`` and the gate, up and down projections of the dense layers and
the shared experts (token-exact against transformers + PEFT). The MLA projections before the
attention are converted and loaded but take no effect; ``kv_b_proj`` cannot be converted at all
(``convert_lora_to_gguf.py`` fails in its transpose); routed-expert LoRA has no tested path. A
llama.cpp server would drop all of those without a word, so they are named before it runs.

Also llama-server's command line for an engine (``server_args``).
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """What a llama-server engine is started with.

    Defaults are the guide's for Kimi K2.5 on a host with less RAM than the INT4 checkpoint needs:
    every layer offloaded to the GPUs but the routed experts kept in RAM, a 16k context, Jinja chat
    templates, and Kimi's recommended sampling (temperature 1.0, top-p 0.95, min-p 0.01), which a
    request overrides field by field.
    """

    model: str  # the quantization's first split file; llama.cpp finds the other parts beside it
    alias: str  # the served model name clients send
    adapters: tuple[str, ...] = ()  # GGUF LoRA files, in the order of their ids
    context_size: int = 16384  # per request: each of the parallel slots gets this much
    threads: int | None = None  # None: llama.cpp's own choice, from the host's cores (not a pod's limit)
    parallel: int = 4
    gpu_layers: int = 999
    cpu_moe_layers: int | None = None  # None: every layer's experts in RAM; N: the first N layers'
    temperature: float = 1.0
    top_p: float = 0.95
    min_p: float = 0.01
    host: str = "0.0.0.0"  # noqa: S104 (a pod's server: its IP is the pod's own)
    port: int = 8080


def server_args(options: ServerOptions) -> list[str]:
    """llama-server's command line (after the program).

    Adapters start at scale 0 (``--lora-scaled``): with ``--lora-init-without-apply`` instead, a
    request without a ``lora`` list would run with every adapter at scale 1. The router sends each
    request the full list of ids, the chosen one at 1.
    """
    for path in options.adapters:
        if "," in path or ":" in path:
            # --lora-scaled separates files by commas and a file from its scale by a colon.
            raise ValueError(f"adapter path {path!r}: llama-server's --lora-scaled cannot carry ',' or ':'")
    if "," in options.alias:
        raise ValueError(f"served name {options.alias!r}: llama-server splits --alias on ','")
    args = [
        *("-m", options.model, "--alias", options.alias),
        *("--host", options.host, "--port", str(options.port)),
        # -c is the whole context, shared out among the slots.
        *("-c", str(options.context_size * options.parallel), "-np", str(options.parallel)),
        *("-ngl", str(options.gpu_layers)),
        *(["--cpu-moe"] if options.cpu_moe_layers is None else ["--n-cpu-moe", str(options.cpu_moe_layers)]),
        "--jinja",
        *("--temp", str(options.temperature), "--top-p", str(options.top_p), "--min-p", str(options.min_p)),
        "--metrics",
    ]
    if options.threads is not None:
        args += ["-t", str(options.threads)]
    if options.adapters:
        args += ["--lora-scaled", ",".join(f"{path}:0" for path in options.adapters)]
    return args
