"""The sglang-kt launch command of one engine replica, from a LoraServer's spec (pure).

Two kinds of replica run the same engine (REFERENCE.md, "KTransformers serving flags"):
- shared replicas serve the base model and load attention-only adapters at run time, so the LoRA
  pool is declared at start (rank, target modules, slots) with no adapter in it;
- a dedicated replica serves one expert adapter, given at start in ``--lora-paths``, under
  sglang-kt's rules for expert LoRA: no GPU experts, no GPU prefill threshold, CUDA graphs off,
  one pipeline stage, at least two running requests.
SGLang's own argument parser is the judge of these argv in the tests.
"""

from __future__ import annotations

import dataclasses

from kimi_operator.api.kimimodel import Variant
from kimi_operator.api.loraserver import KtMethod, LoraServerSpec

ENGINE_PORT = 30000
# Where the engine finds its CPU expert weights: the KimiModel variant that holds each method's.
METHOD_VARIANTS: dict[str, Variant] = {
    "AMXINT8": "cpu-int8",
    "AMXINT4": "cpu-int4",
    "RAWINT4": "native-int4",
    "BF16": "bf16",
}
# The prepare workload's directory of each variant under the model's directory.
_VARIANT_DIRS: dict[str, str] = {"cpu-int8": "cpu-int8", "cpu-int4": "cpu-int4", "bf16": "bf16"}
# sglang-kt's expert LoRA shares a batch between the base slot and its one adapter.
_EXPERT_LORA_SLOTS = 2


def variant(method: KtMethod) -> Variant:
    return METHOD_VARIANTS[method]


@dataclasses.dataclass(frozen=True)
class ModelPaths:
    """A KimiModel's files as the engine pod sees them."""

    # The checkpoint as shipped (native INT4 experts, BF16 attention): SGLang's --model-path.
    checkpoint: str
    # The model's directory on the node's storage; converted variants live under it.
    root: str

    def weights(self, method: KtMethod) -> str:
        """--kt-weight-path: RAWINT4 reads the experts from the checkpoint itself (the official K2.5
        launch passes the same directory twice); the other methods read their converted variant."""
        found = variant(method)
        if found == "native-int4":
            return self.checkpoint
        return f"{self.root}/{_VARIANT_DIRS[found]}"


@dataclasses.dataclass(frozen=True)
class StartAdapter:
    """The expert adapter a dedicated replica loads at start."""

    name: str
    path: str
    # Its LoRA rank when its source says (a FineTuneJob's export): the pool must take it.
    rank: int | None = None


def launch_args(
    spec: LoraServerSpec,
    paths: ModelPaths,
    *,
    host: str,
    port: int = ENGINE_PORT,
    expert: StartAdapter | None = None,
) -> list[str]:
    """Arguments of ``python -m sglang.launch_server`` for a shared replica (``expert`` None) or the
    dedicated replica of one expert adapter."""
    engine = spec.engine
    # The user's extra arguments come first: argparse keeps the last value of an option, so no
    # alias or abbreviation among them (--model, --tp, --max-lora-r) can override what follows.
    args = [
        *engine.extra_args,
        "--model-path",
        paths.checkpoint,
        "--served-model-name",
        spec.served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--trust-remote-code",
        "--tp-size",
        str(engine.tensor_parallel_size),
        "--kt-method",
        engine.kt_method,
        "--kt-weight-path",
        paths.weights(engine.kt_method),
        "--kt-threadpool-count",
        str(engine.kt_threadpool_count),
        "--kt-num-gpu-experts",
        str(0 if expert else engine.kt_num_gpu_experts),
        "--max-running-requests",
        str(engine.max_running_requests),
    ]
    if engine.kt_cpuinfer is not None:
        args += ["--kt-cpuinfer", str(engine.kt_cpuinfer)]
    if engine.kt_gpu_prefill_token_threshold is not None and expert is None:
        args += ["--kt-gpu-prefill-token-threshold", str(engine.kt_gpu_prefill_token_threshold)]
    if engine.context_length is not None:
        args += ["--context-length", str(engine.context_length)]
    # The LoRA pool is fixed at start: rank and target modules are explicit so adapters can be
    # loaded later (SGLang requires both when it starts with no adapter).
    args += [
        "--enable-lora",
        "--max-lora-rank",
        str(max(engine.max_lora_rank, (expert.rank or 0) if expert else 0)),
        "--lora-target-modules",
        *engine.lora_target_modules,
        "--lora-backend",
        engine.lora_backend,
    ]
    if expert is None:
        loaded = engine.max_loaded_loras if engine.max_loaded_loras is not None else engine.max_loras_per_batch
        args += [
            "--max-loras-per-batch",
            str(engine.max_loras_per_batch),
            "--max-loaded-loras",
            str(loaded),
            "--lora-eviction-policy",
            engine.lora_eviction_policy,
        ]
    else:
        args += [
            "--lora-paths",
            f"{expert.name}={expert.path}",
            "--max-loras-per-batch",
            str(_EXPERT_LORA_SLOTS),
            "--disable-cuda-graph",
            "--pp-size",
            "1",
        ]
    args += [
        "--enable-metrics",
        "--tool-call-parser",
        "kimi_k2",
        "--reasoning-parser",
        "kimi_k2",
    ]
    return args
