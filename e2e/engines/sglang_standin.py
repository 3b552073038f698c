"""A stand-in for SGLang's HTTP server (sglang 0.5.x, and sglang-kt's expert-LoRA rules) that
generates for real, on the CPU, with transformers and PEFT: the e2e tests run it as the engine
pod's program, since SGLang itself needs a GPU.

    python e2e/engines/sglang_standin.py --model-path DIR --host IP --port N [SGLang flags...]

Every behaviour below is SGLang's: as recorded in REFERENCE.md ("KTransformers serving flags",
"SGLang multi-LoRA"), gpu/SGLANG.md and e2e/gpu/serve/RESULTS.md (both seen on a real sglang
0.5.16), and from SGLang's source where those are silent.

- Start: flags and start adapters are checked first (a refusal exits non-zero at once); the port
  opens once the weights are loaded; then a warm-up generation runs, during which ``/health`` says
  503 while every other endpoint already answers, generation requests included: they are admitted
  (their adapter is checked and counted) and held until the warm-up ends. There is no ``/ready`` (404).
- ``/health`` and ``/health_generate`` generate one token and look once a second whether any
  request produced one, so they take a second; with ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false``
  ``/health`` only says whether the server is up.
- ``GET /v1/models``: the base card (``root`` is the served name), then one card per registered
  adapter, least recently used first.
- ``POST /load_lora_adapter`` / ``/unload_lora_adapter``: SGLang's checks in its order (adapter
  config, added tokens, DoRA, duplicate name, rank and target modules against the pool, pinned
  slots, weights), its texts, HTTP 200 or 400. Past ``--max-loaded-loras`` a load unloads the least
  recently used unpinned adapter.
- Unload is not final: every name ever loaded is remembered, and a request for it reloads it.
- ``"model": "<anything>:<adapter>"`` (or a ``lora_path`` field) selects an adapter; a bare
  adapter name silently runs the base model and is echoed back. An adapter never loaded is a 400
  before anything is generated, streamed or not.
- Streams: one event per generated token, with the text SGLang's incremental detokenizer releases
  for it (``""`` while a character is incomplete, replacement characters once a later token ends
  cleanly); a token whose text ends with the start of a stop string is sent with a later one.
  Completion chunks carry ``"usage": null``, chat chunks no ``usage`` key.
- A client that leaves: SGLang looks whether the client is still there each time it has waited
  ``SGLANG_REQUEST_STATE_WAIT_TIMEOUT`` (4) seconds without an output for it, so a non-streamed
  request is looked at every 4 s while it waits or runs. One found gone is aborted, and its adapter
  is never counted as released (sglang 0.5.16's leak): that adapter's unload then waits forever,
  holding the lock every later load, unload and implicit reload waits on, while generation with
  loaded adapters and ``/health`` go on. A running stream whose client leaves fails its next write
  and is released cleanly.
- SIGTERM: generation requests in flight are drained first (one stuck behind a hung unload keeps
  the server up until it is killed).
- ``/metrics`` (``--enable-metrics``): SGLang's names and label sets; no metric is per adapter.
- A ``--model-path`` in Kimi's shipped format (routed experts packed to INT4 by compressed-tensors)
  is loaded as SGLang loads it, whole: the stand-in unpacks it to BF16 at start with the
  operator's converter (``kimi_operator`` must be importable).
- ``GET`` or ``POST /freeze_gc``: gc.freeze() in this process (SGLang freezes its HTTP, scheduler
  and detokenizer processes), logged in SGLang's words; 200, a text body, no content type.
- An adapter given at start that carries expert LoRA (``.mlp.experts.`` keys) puts the server under
  sglang-kt's static pairing: it must be the only adapter, load and unload are refused, and every
  generation must select it. The tiny model has no experts, so only its non-expert part applies.

Where SGLang's behaviour cannot matter on a CPU (batching, CUDA graphs, kernels) the stand-in is
simple: model steps are serialised by one lock and requests interleave token by token, so its time
per token grows with the requests running. ``--standin-batched`` (the benchmarks') keeps it flat, as
a GPU that batches does: a greedy answer is generated once and replayed for the same adapter, prompt
and sampling at the per-token delay. Flags it has no use for are accepted and logged.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import http
import importlib
import json
import logging
import math
import os
import re
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("sglang_standin")


class LazyModule:
    """A module imported on first use: torch, transformers and peft take seconds to import, and a
    server refused by its flags exits at once, before any of them is needed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self.module is None:
            self.module = importlib.import_module(self.name)
        return getattr(self.module, attr)


torch: Any = LazyModule("torch")
transformers: Any = LazyModule("transformers")
peft: Any = LazyModule("peft")
safetensors_torch: Any = LazyModule("safetensors.torch")

DEFAULT_MODEL_NAME = "default"  # the "model" of a request that names none (SGLang's protocol)
CONFIG_FILE, WEIGHTS_FILE, BIN_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
HUB_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")  # huggingface_hub's validate_repo_id
EXPERT_KEY = ".mlp.experts."
KT_DYNAMIC_REFUSED = "Dynamic LoRA loading is disabled because KT expert LoRA is statically paired"
# SGLang's LoRA pool stores q/k/v and gate/up as fused modules: an adapter fits when its fused names do.
FUSED_MODULES = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}
SUPPORTED_TARGETS = [
    *("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"),
    *("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "embed_tokens", "lm_head"),
]
# Flags of SGLang's and sglang-kt's launch_server that the stand-in has no use for: accepted quietly.
# Any other unknown flag is accepted too, but logged as one that SGLang's own parser may refuse.
IGNORED_FLAG = re.compile(
    r"^--(kt-[a-z0-9-]+|tool-call-parser|reasoning-parser|disable-shared-experts-fusion|"
    r"enable-mixed-chunk|attention-backend|sampling-backend|mem-fraction-static|chunked-prefill-size|"
    r"cuda-graph-[a-z0-9-]+|dtype|log-level|disable-radix-cache|page-size|dp-size|data-parallel-size|"
    r"ep-size|expert-parallel-size|lora-eviction-policy|max-lora-chunk-size|enable-lora-overlap-loading|"
    r"chat-template|watchdog-timeout|random-seed|api-key|enable-cache-report|stream-interval)(=.*)?$"
)
# SGLang's request-metric buckets (seconds).
TTFT_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400]
E2E_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400]
ITL_BUCKETS = [
    *(0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1),
    *(0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0),
]
THROUGHPUT_WINDOW_S = 10.0


class StartupError(RuntimeError):
    """The server cannot start with these flags or adapters (SGLang exits non-zero too)."""


class RequestError(ValueError):
    """A request SGLang answers with an OpenAI-style error (400 unless told)."""

    def __init__(self, message: str, *, status: int = 400, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


# ---------------------------------------------------------------------------------------------
# Flags


@dataclasses.dataclass(frozen=True)
class LoraRef:
    """One load of an adapter: SGLang mints a new id per load, so a reload is a new ref."""

    name: str
    path: str
    pinned: bool = False
    lora_id: str = dataclasses.field(default_factory=lambda: f"lora_{uuid.uuid4().hex}")


def parse_lora_path(entry: str) -> LoraRef:
    """``PATH``, ``NAME=PATH`` or JSON ``{"lora_name", "lora_path", "pinned"}`` (SGLang's LoRAPathAction)."""
    if entry.lstrip().startswith("{"):
        spec = json.loads(entry)
        if "lora_name" not in spec or "lora_path" not in spec:
            raise argparse.ArgumentTypeError(f"--lora-paths JSON needs lora_name and lora_path: {entry}")
        return LoraRef(str(spec["lora_name"]), str(spec["lora_path"]), bool(spec.get("pinned", False)))
    name, sep, path = entry.partition("=")
    return LoraRef(name, path) if sep else LoraRef(entry, entry)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: an unknown flag must never be taken for a prefix of a known one.
    parser = argparse.ArgumentParser(prog="sglang_standin", allow_abbrev=False)
    add = parser.add_argument
    add("--model-path", "--model", dest="model_path", required=True)
    add("--tokenizer-path", default=None)
    add("--served-model-name", default=None)
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=30000)
    add("--context-length", type=int, default=None)
    add("--tensor-parallel-size", "--tp-size", "--tp", dest="tp_size", type=int, default=1)
    add("--pipeline-parallel-size", "--pp-size", dest="pp_size", type=int, default=1)
    add("--max-running-requests", type=int, default=None)
    add("--enable-metrics", action="store_true")
    add("--disable-cuda-graph", action="store_true")
    add("--enable-lora", action="store_true")
    # Kimi K2.5's modelling code ships beside its weights (the tiny models carry their own).
    add("--trust-remote-code", action="store_true")
    add("--lora-paths", nargs="*", type=parse_lora_path, default=None)
    add("--max-loras-per-batch", type=int, default=8)
    add("--max-loaded-loras", type=int, default=None)
    add("--max-lora-rank", type=int, default=None)
    add("--lora-target-modules", nargs="*", choices=[*SUPPORTED_TARGETS, "all"], default=None)
    add("--lora-backend", choices=["triton", "csgmv", "ascend", "torch_native"], default="csgmv")
    # sglang-kt's flags that its expert-LoRA rules constrain (REFERENCE.md).
    add("--kt-num-gpu-experts", type=int, default=None)
    add("--kt-gpu-prefill-token-threshold", type=int, default=None)
    # The stand-in's own knobs: a longer warm-up (a real one takes minutes), and a fixed time per
    # generated token as a GPU would take, for benchmarks.
    add("--standin-startup-delay", type=float, default=0.0, help="seconds added to the warm-up (/health 503)")
    add("--standin-token-delay", type=float, default=0.0, help="seconds added to every generated token")
    add(
        "--standin-batched",
        action="store_true",
        help="replay a greedy answer already generated for the same adapter, prompt and sampling (benchmarks)",
    )
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args, unknown = build_parser().parse_known_args(argv)
    if args.served_model_name is None:
        args.served_model_name = args.model_path
    if args.lora_paths:
        args.enable_lora = True
    return args, unknown


def unrecognised(unknown: list[str]) -> list[str]:
    return [flag for flag in unknown if flag.startswith("--") and not IGNORED_FLAG.match(flag)]


# ---------------------------------------------------------------------------------------------
# Adapter files, read the way SGLang's LoRA loader reads them


def safetensors_keys(path: Path) -> tuple[str, ...]:
    """The tensor names in a safetensors file's JSON header (no tensor is read)."""
    with path.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    return tuple(key for key in header if key != "__metadata__")


def module_suffix(key: str) -> str:
    """``...self_attn.q_proj.lora_A.weight`` -> ``q_proj``."""
    module = key.rsplit(".lora_", 1)[0]
    return module.rsplit(".", 1)[-1]


def fused(names: set[str] | list[str]) -> set[str]:
    return {FUSED_MODULES.get(name, name) for name in names}


def expand_targets(targets: list[str], backend: str) -> set[str]:
    if "all" not in targets:
        return fused(targets)
    dropped = {"embed_tokens", "lm_head"} if backend == "csgmv" else set()
    return fused([name for name in SUPPORTED_TARGETS if name not in dropped])


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    path: str
    config: dict[str, Any]
    weights: Path | None
    keys: tuple[str, ...]

    @classmethod
    def read_config(cls, path: str) -> AdapterFiles:
        """The adapter's config and weight file names; errors carry the messages SGLang's loader gives."""
        if not os.path.isdir(path):
            # SGLang takes what is not a directory for a Hugging Face Hub repository id.
            if not HUB_REPO_ID.match(path) or "--" in path or ".." in path or len(path) > 96:
                raise ValueError(
                    f"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{path}'. "
                    "Use `repo_type` argument if needed."
                )
            raise ValueError(f"Cannot download '{path}' from the Hugging Face Hub: the SGLang stand-in is offline.")
        with open(os.path.join(path, CONFIG_FILE)) as file:  # a missing file raises SGLang's own error text
            config = json.load(file)
        weights = next(
            (Path(path) / name for name in (WEIGHTS_FILE, BIN_WEIGHTS_FILE) if (Path(path) / name).is_file()), None
        )
        keys: tuple[str, ...] = ()
        if weights is not None and weights.suffix == ".safetensors":
            # A corrupt file is reported when its weights are read, as SGLang's loader does.
            with contextlib.suppress(OSError, ValueError):
                keys = safetensors_keys(weights)
        return cls(path, config, weights, keys)

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    @property
    def expert_keys(self) -> int:
        return sum(EXPERT_KEY in key for key in self.keys)

    def target_modules(self, *, serve_experts: bool) -> list[str]:
        """The config's target modules; with KT expert LoRA, minus those adapted only inside experts
        (kt-kernel runs those on the CPU: they take no slot in the GPU LoRA pool)."""
        targets = [str(name) for name in self.config.get("target_modules") or []]
        if not serve_experts:
            return targets
        outside = {module_suffix(key) for key in self.keys if EXPERT_KEY not in key}
        inside = {module_suffix(key) for key in self.keys if EXPERT_KEY in key}
        return [name for name in targets if name in outside or name not in inside]

    def load_weights(self) -> dict[str, Any]:
        """Tensors keyed as PEFT saves them, expert tensors left out (the tiny model has no experts)."""
        if self.weights is None:
            raise ValueError(f"Cannot find any model weights with `{self.path}`")
        if self.weights.suffix == ".safetensors":
            tensors = safetensors_torch.load_file(str(self.weights))
        else:
            tensors = torch.load(self.weights, map_location="cpu", weights_only=True)
        return {
            PEFT_PREFIX + key.removeprefix(PEFT_PREFIX): value
            for key, value in tensors.items()
            if EXPERT_KEY not in key
        }


# ---------------------------------------------------------------------------------------------
# The model


@dataclasses.dataclass
class Sampling:
    max_new_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False


@dataclasses.dataclass
class Step:
    """One generated token and the text SGLang's detokenizer releases with it. ``sent`` is False for a
    token SGLang's scheduler does not stream (its text ends with the start of a stop string): its
    text comes with the next token that is sent."""

    token: int
    delta: str
    logprob: float
    finish: dict[str, Any] | None = None
    sent: bool = True


# SGLang's incremental detokenizer starts with this many prompt tokens of context before the output.
DETOKENIZE_CONTEXT = 5


def is_cjk(char: str) -> bool:
    """SGLang's ``_is_chinese_char``: the CJK Unified Ideographs blocks."""
    cp = ord(char)
    blocks = [
        *((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F)),
        *((0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)),
    ]
    return any(low <= cp <= high for low, high in blocks)


def printable_text(text: str) -> str:
    """SGLang's ``find_printable_text``: the part of ``text`` that can go out before it is complete."""
    if text.endswith("\n"):
        return text
    if text and is_cjk(text[-1]):
        return text
    if len(text) > 1 and is_cjk(text[-2]):
        return text[:-1]
    return text[: text.rfind(" ") + 1]


class Detokenizer:
    """SGLang's incremental detokenizer for one request (``DetokenizerManager`` and its
    ``DecodeStatus``): each output decodes the tokens since the last clean text, with the tokens
    before them as context. Text ending in an incomplete character is not committed: only its part up
    to the last space goes out, and the rest follows, replacement characters and all, once a later
    token makes the text end cleanly, or when the request finishes."""

    def __init__(self, decode: Callable[[list[int]], str], prompt: list[int]) -> None:
        self.decode = decode
        self.ids = list(prompt[max(len(prompt) - DETOKENIZE_CONTEXT, 0) :])
        self.surr, self.read = 0, len(self.ids)
        self.decoded, self.sent = "", 0

    def feed(self, tokens: list[int], finish: dict[str, Any] | None) -> str:
        """The text to send for ``tokens``, the output ids since the previous call."""
        self.ids.extend(tokens)
        matched = finish.get("matched") if finish else None
        read_ids = self.ids[self.surr :]
        if matched and isinstance(matched, int):
            read_ids = read_ids[:-1]  # a matched stop token is no part of the text
        new = self.decode(read_ids)[len(self.decode(self.ids[self.surr : self.read])) :]
        if finish is None:
            pending = self.sent - len(self.decoded)  # printable text sent before it was committed
            if new and not new.endswith("\ufffd"):
                self.decoded += new
                self.surr, self.read = self.read, len(self.ids)
                self.sent = len(self.decoded)
                return new[pending:]
            printable = printable_text(new)
            self.sent = len(self.decoded) + len(printable)
            return printable[pending:]
        output = self.decoded + new
        if matched and isinstance(matched, str) and matched in output:
            output = output[: output.index(matched)]  # the stop string is cut (what was sent stays sent)
        delta = output[self.sent :]
        self.sent = len(output)
        return delta


def _packed_int4(model: Path) -> bool:
    """Whether ``model`` is a compressed-tensors INT4 checkpoint (Kimi's own format)."""
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return False
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    quant = nested.get("quantization_config") or config.get("quantization_config") or {}
    return bool(quant.get("quant_method") == "compressed-tensors")


class Engine:
    """The tiny model with its PEFT adapters. Every model call holds one lock: adapters are switched
    on the shared model, and concurrent requests interleave step by step."""

    def __init__(
        self, model_path: str, tokenizer_path: str, *, batched: bool = False, trust_remote_code: bool = False
    ) -> None:
        transformers.utils.logging.disable_progress_bar()
        # --standin-batched: a greedy answer computed once is replayed for the same adapter, prompt
        # and sampling, so that only the per-token delay sets the pace, whatever the concurrency, as
        # on a GPU that batches the running requests (the benchmarks' engines). The first answer
        # of each is generated for real.
        self.replays: dict[tuple[Any, ...], list[Step]] | None = {} if batched else None
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
        self.unpacked: tempfile.TemporaryDirectory[str] | None = None
        weights = Path(model_path)
        if _packed_int4(weights):
            # A checkpoint as Kimi ships it (routed experts packed to INT4 by compressed-tensors),
            # which SGLang loads as it is (its experts through kt-kernel): unpacked to BF16 once, at
            # start, with the operator's own converter, into a directory that lives as long as this.
            from kimi_operator.workloads.prepare import convert  # noqa: PLC0415 (only packed checkpoints)

            self.unpacked = tempfile.TemporaryDirectory(prefix="standin-bf16-")
            weights = Path(self.unpacked.name) / "bf16"
            convert.convert(Path(model_path), weights, threads=1, use_native=False)
            log.info("Unpacked the INT4 experts of %s to BF16", model_path)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            weights, dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()
        self.tuned: Any = None  # the model under PEFT, once an adapter is loaded
        self.lock = threading.Lock()
        self.text_lock = threading.Lock()  # a fast tokenizer refuses to be used by two threads at once
        generation = Path(model_path) / "generation_config.json"
        self.generation_defaults: dict[str, Any] = json.loads(generation.read_text()) if generation.is_file() else {}
        eos = self.generation_defaults.get("eos_token_id")
        self.eos = ({self.tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])) - {None}

    def encode(self, text: str, *, special: bool) -> list[int]:
        with self.text_lock:
            return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def chat_prompt(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
        with self.text_lock:
            if self.tokenizer.chat_template:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **template_kwargs
                )
            else:  # a tokenizer without a template: a plain one, so chat still works
                text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(str(text), special=False)

    def decode(self, ids: list[int]) -> str:
        with self.text_lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add_adapter(self, internal: str, files: AdapterFiles, targets: list[str]) -> None:
        tensors = files.load_weights()
        config = peft.LoraConfig.from_pretrained(files.path)
        config.target_modules = set(targets)
        config.inference_mode = True
        with self.lock:
            if self.tuned is None:
                self.tuned = peft.PeftModel(self.model, config, adapter_name=internal)
            else:
                self.tuned.add_adapter(internal, config)
            peft.set_peft_model_state_dict(self.tuned, tensors, adapter_name=internal)
            self.tuned.eval()

    def remove_adapter(self, internal: str) -> None:
        if self.replays is not None:
            with self.lock:
                self.replays = {key: steps for key, steps in self.replays.items() if key[0] != internal}
        with self.lock, warnings.catch_warnings():
            # PEFT warns when the active adapter goes; every model step selects its own anyway.
            warnings.simplefilter("ignore", UserWarning)
            if self.tuned is not None and internal in self.tuned.peft_config and len(self.tuned.peft_config) > 1:
                self.tuned.delete_adapter(internal)
            # The last adapter stays in the model: PEFT keeps one, and an unselected adapter has no effect.

    def _forward(self, internal: str | None, ids: Any, cache: Any) -> tuple[Any, Any]:
        with self.lock:
            selected: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            model = self.model
            if self.tuned is not None:
                model = self.tuned
                if internal is None:
                    selected = self.tuned.disable_adapter()
                else:
                    self.tuned.set_adapter(internal)
            with torch.inference_mode(), selected:
                out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            return out.logits[0, -1].float(), out.past_key_values

    def _pick(self, logits: Any, sampling: Sampling, generator: Any) -> int:
        if sampling.temperature < 1e-6:  # SGLang's greedy threshold
            return int(torch.argmax(logits))
        logits = logits / sampling.temperature
        if sampling.top_k > 0:
            kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        if sampling.top_p < 1.0:
            ordered, index = torch.sort(probs, descending=True)
            drop = torch.cumsum(ordered, dim=-1) - ordered > sampling.top_p
            probs = probs.scatter(0, index, ordered.masked_fill(drop, 0.0))
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=generator))

    def generate(
        self, prompt: list[int], internal: str | None, sampling: Sampling, token_delay: float
    ) -> Generator[Step, None, None]:
        """Tokens until a stop, checked in SGLang's order: the token budget, a stop string, then EOS
        or a stop token (neither with ``ignore_eos``)."""
        key = None
        if self.replays is not None and sampling.temperature < 1e-6:
            key = (internal, tuple(prompt), repr(sampling))
            replay = self.replays.get(key)
            if replay is not None:
                log.info("Replaying a greedy answer of %d tokens (--standin-batched)", len(replay))
                for step in replay:
                    if token_delay > 0:
                        time.sleep(token_delay)
                    yield step
                return
        steps: list[Step] = []
        for step in self._generate(prompt, internal, sampling, token_delay):
            steps.append(step)
            # Kept before the last step is given: its reader closes the generator after it.
            if step.finish is not None and key is not None and self.replays is not None:
                with self.lock:
                    self.replays[key] = steps
            yield step

    def _generate(
        self, prompt: list[int], internal: str | None, sampling: Sampling, token_delay: float
    ) -> Generator[Step, None, None]:
        generator = torch.Generator()
        generator.manual_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little"))
        detokenizer = Detokenizer(self.decode, prompt)
        stops = [stop for stop in sampling.stop if stop]
        # SGLang looks for stop strings in the text of the last tokens: one more than the longest stop.
        tail = 1 + max((len(self.encode(stop, special=False)) for stop in stops), default=0)
        logits, cache = self._forward(internal, torch.tensor([prompt]), None)
        out: list[int] = []
        unsent = 0  # tokens not yet given to the detokenizer
        while True:
            token = self._pick(logits, sampling, generator)
            logprob = float(torch.log_softmax(logits, dim=-1)[token])
            out.append(token)
            unsent += 1
            if token_delay > 0:
                time.sleep(token_delay)
            finish: dict[str, Any] | None = None
            hit = next((stop for stop in stops if stop in self.decode(out)), None) if stops else None
            if sampling.max_new_tokens is not None and len(out) >= sampling.max_new_tokens:
                finish = {"type": "length", "length": sampling.max_new_tokens}
            elif hit is not None:
                finish = {"type": "stop", "matched": hit}
            elif not sampling.ignore_eos and (token in sampling.stop_token_ids or token in self.eos):
                finish = {"type": "stop", "matched": token}
            held = finish is None and bool(stops) and self._ends_with_stop_start(out[-tail:], stops)
            if held:
                yield Step(token, "", logprob, None, sent=False)
            else:
                yield Step(token, detokenizer.feed(out[len(out) - unsent :], finish), logprob, finish)
                unsent = 0
            if finish is not None:
                return
            logits, cache = self._forward(internal, torch.tensor([[token]]), cache)

    def _ends_with_stop_start(self, tail: list[int], stops: list[str]) -> bool:
        """SGLang's ``check_match_stop_str_prefix``: the text of the last tokens holds a stop string
        or ends with the start of one."""
        text = self.decode(tail)
        return any(stop in text or any(text.endswith(stop[:n]) for n in range(1, len(stop) + 1)) for stop in stops)


# ---------------------------------------------------------------------------------------------
# Metrics


class Histogram:
    def __init__(self, buckets: list[float]) -> None:
        self.buckets, self.counts, self.total, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1


def _number(value: float) -> str:
    return "+Inf" if value == math.inf else repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped, strict=True)) + "}"


class Metrics:
    """SGLang's names and label sets (as sglang 0.5.16 exposes them, labels in name order): request
    metrics carry ``engine_type`` and ``model_name``, scheduler gauges the ranks too."""

    def __init__(self, model_name: str) -> None:
        self.lock = threading.Lock()
        self.request_labels = {"engine_type": "unified", "model_name": model_name}
        self.engine_labels = {**self.request_labels, "moe_ep_rank": "0", "pp_rank": "0", "tp_rank": "0"}
        self.prompt_tokens = self.generation_tokens = self.requests = self.aborted = 0
        self.running = self.queued = self.used_tokens = 0
        # Running requests per adapter (None: the base model): the LoRA pool slots in use.
        self.adapters: collections.Counter[str | None] = collections.Counter()
        self.ttft, self.e2e, self.itl = Histogram(TTFT_BUCKETS), Histogram(E2E_BUCKETS), Histogram(ITL_BUCKETS)
        self.recent: collections.deque[float] = collections.deque()
        self.http_requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.http_responses: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def token(self, now: float, *, first: bool, since: float) -> None:
        """A generated token, ``since`` the request arrived (the first) or the previous token."""
        with self.lock:
            (self.ttft if first else self.itl).observe(since)
            self.generation_tokens += 1
            self.used_tokens += 1
            self.recent.append(now)

    def finished(self, prompt_tokens: int, seconds: float) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.e2e.observe(seconds)

    def http(self, endpoint: str, method: str, status: int) -> None:
        with self.lock:
            self.http_requests[endpoint, method] += 1
            self.http_responses[endpoint, method, str(status)] += 1

    def throughput(self, now: float) -> float:
        while self.recent and self.recent[0] < now - THROUGHPUT_WINDOW_S:
            self.recent.popleft()
        return len(self.recent) / THROUGHPUT_WINDOW_S

    def render(self, capacity_tokens: int, lora_slots: int | None) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, doc: str, samples: Sequence[tuple[str, dict[str, str], float]]) -> None:
            lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}"])
            lines.extend(f"{sample}{_labels(labels)} {_number(value)}" for sample, labels, value in samples)

        def gauge(name: str, doc: str, value: float) -> None:
            family(f"sglang:{name}", "gauge", doc, [(f"sglang:{name}", self.engine_labels, value)])

        def counter(name: str, doc: str, value: float) -> None:
            family(f"sglang:{name}", "counter", doc, [(f"sglang:{name}", self.request_labels, value)])

        def histogram(name: str, doc: str, hist: Histogram) -> None:
            name, labels = f"sglang:{name}", self.request_labels
            buckets = [
                (f"{name}_bucket", {**labels, "le": _number(bound)}, float(count))
                for bound, count in zip([*hist.buckets, math.inf], [*hist.counts, hist.count], strict=True)
            ]
            samples = [(f"{name}_sum", labels, hist.total), *buckets, (f"{name}_count", labels, hist.count)]
            family(name, "histogram", doc, samples)

        with self.lock:
            gauge("num_running_reqs", "The number of running requests.", self.running)
            gauge("num_queue_reqs", "The number of requests in the waiting queue.", self.queued)
            gauge("num_used_tokens", "The number of used tokens.", self.used_tokens)
            gauge("token_usage", "The token usage.", self.used_tokens / max(1, capacity_tokens))
            gauge("gen_throughput", "The generation throughput (token/s).", self.throughput(time.monotonic()))
            if lora_slots is not None:
                used = sum(1 for count in self.adapters.values() if count > 0)
                gauge("lora_pool_slots_used", "Number of LoRA adapter slots currently occupied in GPU memory.", used)
                gauge(
                    "lora_pool_slots_total",
                    "Total number of LoRA adapter slots available (max_loras_per_batch).",
                    lora_slots,
                )
                gauge(
                    "lora_pool_utilization",
                    "LoRA pool utilization ratio (used/total). 1.0 means pool is full.",
                    used / max(1, lora_slots),
                )
            counter("prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens)
            counter("generation_tokens_total", "Number of generation tokens processed.", self.generation_tokens)
            counter("num_requests_total", "Number of requests processed.", self.requests)
            counter("num_aborted_requests_total", "Number of requests aborted.", self.aborted)
            histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft)
            histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl)
            histogram("e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds", self.e2e)
            name = "sglang:http_requests_total"
            requests = [(name, {"endpoint": e, "method": m}, n) for (e, m), n in self.http_requests.items()]
            family(name, "counter", "Total number of HTTP requests by endpoint and method", requests)
            name = "sglang:http_responses_total"
            responses = [
                (name, {"endpoint": e, "method": m, "status_code": c}, n)
                for (e, m, c), n in self.http_responses.items()
            ]
            family(name, "counter", "Total number of HTTP responses by endpoint, method and status code", responses)
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# LoRA adapters: SGLang's tokenizer-manager registry over its LoRA manager


@dataclasses.dataclass
class Update:
    """The answer of /load_lora_adapter and /unload_lora_adapter (SGLang's LoRAUpdateOutput)."""

    success: bool
    error_message: str = ""
    # None when the tokenizer manager refuses before the LoRA manager is asked (as SGLang answers).
    loaded_adapters: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        # rid and http_worker_ipc are the request base class's fields, serialised along by SGLang.
        return {**dataclasses.asdict(self), "rid": None, "http_worker_ipc": None}


class Loras:
    """What SGLang keeps about adapters, in three places:

    - ``registry``: the adapters requests may use, least recently used first (SGLang's LoRARegistry);
    - ``cache``: every name ever loaded, so a request for an unloaded or evicted name reloads it;
    - ``loaded``: the LoRA manager's adapters in load order (what ``loaded_adapters`` lists).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled: bool = args.enable_lora
        self.max_per_batch: int = args.max_loras_per_batch
        self.max_loaded: int | None = args.max_loaded_loras
        self.backend: str = args.lora_backend
        self.max_rank: int = args.max_lora_rank or 0
        self.targets: set[str] = set()
        self.registry: collections.OrderedDict[str, LoraRef] = collections.OrderedDict()
        self.cache: dict[str, LoraRef] = {}
        self.loaded: dict[str, LoraRef] = {}
        self.files: dict[str, AdapterFiles] = {}
        self.update_lock = threading.Lock()  # loads and unloads one at a time (SGLang's lora_update_lock)
        self.in_use: collections.Counter[str] = collections.Counter()
        self.idle = threading.Condition()
        self.expert: LoraRef | None = None  # sglang-kt's statically paired expert adapter
        self.engine: Engine | None = None

    # -- start ------------------------------------------------------------------------------

    def check_start(self, args: argparse.Namespace) -> None:
        """SGLang's checks of the LoRA flags and of the adapters given at start, before any weight is read."""
        refs: list[LoraRef] = args.lora_paths or []
        if not self.enabled:
            return
        if not refs and (args.max_lora_rank is None or args.lora_target_modules is None):
            raise StartupError(
                "When no initial --lora-paths is provided, you need to specify both --max-lora-rank "
                "and --lora-target-modules for LoRA initialization."
            )
        if self.max_loaded is not None:
            if self.max_loaded < self.max_per_batch:
                raise StartupError(
                    f"max_loaded_loras ({self.max_loaded}) should be greater than or equal to "
                    f"max_loras_per_batch ({self.max_per_batch})."
                )
            if len(refs) > self.max_loaded:
                raise StartupError("The number of LoRA paths should not exceed max_loaded_loras.")
        for ref in refs:
            try:
                self.files[ref.lora_id] = AdapterFiles.read_config(ref.path)
            except (OSError, ValueError) as exc:
                raise StartupError(f"Failed to load LoRA adapter {ref.name}: {exc}") from exc
        experts = [ref for ref in refs if self.files[ref.lora_id].expert_keys]
        if experts and len(refs) > 1:
            raise StartupError(
                f"KT expert LoRA is statically paired: adapter {experts[0].name} carries expert LoRA and must be "
                f"the only adapter in --lora-paths, got {len(refs)} ({', '.join(ref.name for ref in refs)})."
            )
        if experts:
            self.expert = experts[0]
            check_kt_rules(args)
        self._pool_shape(refs, args.lora_target_modules)

    def _pool_shape(self, refs: list[LoraRef], given: list[str] | None) -> None:
        """The pool's rank and target modules: the flags, else inferred from the start adapters."""
        serve_experts = self.expert is not None
        if given is not None:
            self.targets = expand_targets(given, self.backend)
        for ref in refs:
            files = self.files[ref.lora_id]
            wanted = fused(files.target_modules(serve_experts=serve_experts))
            if given is None:
                self.targets |= wanted
            elif not wanted <= self.targets:
                raise StartupError(
                    f"LoRA adapter '{ref.name}' contains target modules {sorted(wanted - self.targets)} that are not "
                    f"included in the specified --lora-target-modules {sorted(self.targets)}. Please update "
                    f"--lora-target-modules to include all required modules: {sorted(self.targets | wanted)}, or use "
                    "'all' to enable all supported modules."
                )
        if not self.max_rank:
            self.max_rank = max((self.files[ref.lora_id].rank for ref in refs), default=0)

    def load_start(self, engine: Engine, refs: list[LoraRef]) -> None:
        self.engine = engine
        for ref in refs:
            result = self._load_backend(ref)
            if not result.success:
                raise StartupError(f"Failed to load LoRA adapter {ref.name}: {result.error_message}")
            self._register(ref)

    # -- load and unload ----------------------------------------------------------------------

    def load(self, name: str, path: str, pinned: bool) -> Update:
        if not self.enabled:
            return Update(False, "LoRA is not enabled. Please set `--enable-lora` to enable LoRA.")
        if self.expert is not None:
            return Update(False, KT_DYNAMIC_REFUSED)
        log.info("Start load Lora adapter. Lora name=%s, path=%s", name, path)
        with self.update_lock:
            try:
                return self._load_locked(LoraRef(name, path, pinned))
            except ValueError as exc:
                return Update(False, str(exc))

    def _load_locked(self, ref: LoraRef) -> Update:
        result = self._load_backend(ref)
        if result.success:
            self._register(ref)
        # Past --max-loaded-loras the least recently used unpinned adapter is unloaded (SGLang's
        # tokenizer manager); its name stays known, so a later request reloads it.
        while self.max_loaded is not None and len(self.registry) > self.max_loaded:
            victim = next((known.name for known in self.registered() if not known.pinned), None)
            if victim is None:
                raise ValueError(
                    "Didn't find any LoRA adapters when trying to evict LRU LoRA adapter. "
                    f"LoRA registry is: {dict(self.registry)}"
                )
            log.info(
                "Unloading least recently used LoRA adapter '%s' (current number of adapters: %d, max allowed: %d)",
                victim,
                len(self.registry),
                self.max_loaded,
            )
            self._unload_locked(victim)
            if result.loaded_adapters is not None:
                result.loaded_adapters.pop(victim, None)
        return result

    def _load_backend(self, ref: LoraRef) -> Update:
        """SGLang's LoRA manager: read the config, validate against the pool, then read the weights."""
        try:
            files = self.files.get(ref.lora_id) or AdapterFiles.read_config(ref.path)
            targets = files.target_modules(serve_experts=self.expert is not None)
            self._validate(ref, files, targets)
            assert self.engine is not None
            self.engine.add_adapter(ref.lora_id, files, targets)
        except Exception as exc:  # SGLang answers every loader failure with its text
            return Update(False, str(exc), self.loaded_names())
        self.loaded[ref.lora_id] = ref
        return Update(True, "", self.loaded_names())

    def _validate(self, ref: LoraRef, files: AdapterFiles, targets: list[str]) -> None:
        added = Path(files.path) / "added_tokens.json"
        if added.is_file() and json.loads(added.read_text() or "{}"):
            raise ValueError(
                f"Failed to load {ref.name} because LoRA serving currently doesn't support adapters that add "
                "tokens to the vocabulary"
            )
        if files.config.get("use_dora"):
            raise ValueError(f"Failed to load {ref.name} because LoRA serving currently doesn't support DoRA adapters")
        if any(known.name == ref.name for known in self.loaded.values()):
            raise ValueError(f"Failed to load LoRA adapter {ref.name} because it is already loaded")
        if files.rank > self.max_rank or not fused(targets) <= self.targets:
            raise ValueError(
                f"LoRA adapter {ref.name} with rank {files.rank} is incompatible with the current LoRA memory pool "
                "configuration. Please ensure that the LoRA adapter's rank is within the configured "
                "`--max-lora-rank` and that the target modules are included in `--lora-target-modules`."
            )
        pinned = sum(known.pinned for known in self.loaded.values())
        if ref.pinned and pinned >= self.max_per_batch - 1:
            raise ValueError(
                f"Failed to load LoRA adapter {ref.name} as a pinned adapter. It is not allowed to pin all slots in "
                "the LoRA memory pool to avoid starvation for unpinned adapters and base models. Please increase "
                "your `--max-loras-per-batch` or load it as unpinned LoRA adapters."
            )
        if files.expert_keys and self.expert is None:
            # A choice of the stand-in: sglang-kt takes expert LoRA only from --lora-paths at start.
            raise ValueError(
                f"LoRA adapter {ref.name} carries KT expert LoRA ({files.expert_keys} expert tensors): it can only "
                "be served by a replica started with it alone in --lora-paths."
            )

    def unload(self, name: str) -> Update:
        if not self.enabled:
            return Update(False, "LoRA is not enabled. Please set `--enable-lora` to enable LoRA.")
        if self.expert is not None:
            return Update(False, KT_DYNAMIC_REFUSED)
        log.info("Start unload Lora adapter. Lora name=%s", name)
        with self.update_lock:
            try:
                return self._unload_locked(name)
            except ValueError as exc:
                return Update(False, str(exc))

    def _unload_locked(self, name: str) -> Update:
        with self.idle:
            ref = self.registry.pop(name, None)
            if ref is None:
                raise ValueError(f"LoRA with name {name} does not exist. Loaded LoRAs: {self.registry.keys()}")
            # New requests can no longer pick it; the ones running finish first.
            self.idle.wait_for(lambda: self.in_use[ref.lora_id] == 0)
        assert self.engine is not None
        self.engine.remove_adapter(ref.lora_id)
        self.loaded.pop(ref.lora_id, None)
        return Update(True, "", self.loaded_names())

    def _register(self, ref: LoraRef) -> None:
        with self.idle:
            self.registry[ref.name] = self.cache[ref.name] = ref

    def registered(self) -> list[LoraRef]:
        """The adapters requests may use, least recently used first."""
        with self.idle:
            return list(self.registry.values())

    def loaded_names(self) -> dict[str, str]:
        return {ref.name: ref.path for ref in self.loaded.values()}

    # -- requests -----------------------------------------------------------------------------

    def acquire(self, name: str | None, served: str) -> LoraRef | None:
        """The adapter a request runs, reloaded if it was unloaded; it cannot be unloaded until released."""
        if self.expert is not None:
            expert = self.expert
            if name != expert.name:
                chosen = "the base model" if name is None else f"adapter '{name}'"
                raise RequestError(
                    f"This replica serves KT expert LoRA adapter '{expert.name}', which is statically paired with it: "
                    f"every request must select it (model '{served}:{expert.name}'); {chosen} cannot be served here."
                )
        if name is None:
            return None
        if name not in self.registry:
            if name not in self.cache:
                raise RequestError(
                    f"Got LoRA adapter that has never been loaded: {name}\nAll loaded adapters: {self.cache.keys()}."
                )
            log.info("Reloading evicted adapter: %s", name)
            with self.update_lock:
                if name not in self.registry:
                    known = self.cache[name]
                    result = self._load_locked(LoraRef(known.name, known.path, known.pinned))
                    if not result.success:
                        raise RequestError(f"Failed to implicitly load LoRA adapter {name}: {result.error_message}")
        with self.idle:
            ref = self.registry.get(name)
            if ref is None:  # evicted again by a concurrent load: SGLang's lookup fails the same way
                raise RequestError(
                    f"The following requested LoRA adapters are not loaded: {name}\n"
                    f"Loaded adapters: {self.registry.keys()}."
                )
            self.registry.move_to_end(name)
            self.in_use[ref.lora_id] += 1
            return ref

    def release(self, ref: LoraRef | None) -> None:
        if ref is not None:
            with self.idle:
                self.in_use[ref.lora_id] -= 1
                self.idle.notify_all()


def check_kt_rules(args: argparse.Namespace) -> None:
    """sglang-kt's conditions for serving expert LoRA (REFERENCE.md, "KTransformers serving flags")."""
    broken = []
    if not args.disable_cuda_graph:
        broken.append("CUDA graphs must be off (--disable-cuda-graph)")
    if args.max_running_requests is not None and args.max_running_requests < 2:
        broken.append("--max-running-requests must be at least 2")
    if args.pp_size != 1:
        broken.append("--pp-size must be 1")
    if args.kt_num_gpu_experts not in (None, 0):
        broken.append("--kt-num-gpu-experts must be 0")
    if args.kt_gpu_prefill_token_threshold is not None:
        broken.append("--kt-gpu-prefill-token-threshold is not supported")
    if broken:
        raise StartupError("KT expert LoRA cannot be served with these flags: " + "; ".join(broken) + ".")


# ---------------------------------------------------------------------------------------------
# Serving: SGLang's OpenAI-compatible and native endpoints


@dataclasses.dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    stream: Iterator[bytes] | None = None
    # Frees what the request holds (its adapter, its slot), whether or not the stream was read.
    done: Callable[[], None] | None = None


def dumps(payload: Any) -> bytes:
    """JSON as SGLang's orjson writes it: compact, UTF-8."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def json_reply(payload: Any, status: int = 200) -> Reply:
    return Reply(status, dumps(payload))


def error_body(exc: RequestError) -> dict[str, Any]:
    return {"object": "error", "message": str(exc), "type": exc.kind, "param": None, "code": exc.status}


def sse(payload: Any) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
GENERATION_PATHS = {"/v1/chat/completions", "/v1/completions", "/generate"}


def missing_fields(body: dict[str, Any], names: list[str]) -> RequestError | None:
    """FastAPI's validation error for absent fields, which SGLang answers with a 400 "Bad Request"."""
    errors = [
        {"type": "missing", "loc": ("body", name), "msg": "Field required", "input": body}
        for name in names
        if body.get(name) is None
    ]
    if not errors:
        return None
    return RequestError(f"{len(errors)} validation error{'s' * (len(errors) > 1)}:\n  {errors}", kind="Bad Request")


def field(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    """A body field of the given types (JSON true is no number here), or the default when absent or null."""
    value = body.get(name, default)
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if value is not None and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
        raise RequestError(f"{name}: invalid type {type(value).__name__}", kind="Bad Request")
    return value


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
    }


@dataclasses.dataclass
class Outcome:
    text: str = ""
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish: dict[str, Any] | None = None

    def add(self, step: Step) -> None:
        self.text += step.delta
        self.ids.append(step.token)
        self.logprobs.append(step.logprob)
        self.finish = step.finish


class Client:
    """The connection a request came on, looked at as SGLang's ``request.is_disconnected()`` does."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def gone(self) -> bool:
        """The client closed or reset the connection (the bytes of a next request do not count)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class ClientGone(RequestError):
    """SGLang's abort of a request whose client has left (its 400 answer goes nowhere)."""


class Job:
    """An admitted request. Its adapter cannot be unloaded until the job is closed, which also ends a
    generation left unfinished (a client gone mid-stream).

    Like SGLang's tokenizer manager, a job looks whether its client is still there each time it has
    waited ``SGLANG_REQUEST_STATE_WAIT_TIMEOUT`` seconds without an output for it: in the queue (the
    warm-up included) and, since a non-streamed request gets no output before its end, every so
    often while it runs. A job whose client is gone is abandoned: its generation stops, and its
    adapter is never released (sglang 0.5.16 drops the request's state without releasing it)."""

    def __init__(
        self,
        server: Server,
        prompt: list[int],
        ref: LoraRef | None,
        sampling: Sampling,
        *,
        record: bool,
        held: bool,
        client: Client | None,
    ) -> None:
        self.server, self.prompt, self.ref, self.sampling, self.record = server, prompt, ref, sampling, record
        self.held, self.client = held, client  # held: it waits for the warm-up's end
        self.rid = uuid.uuid4().hex
        self.running: Generator[Step, None, None] | None = None
        self.stream = True
        self.closed = self.finished = False
        self.look_at = 0.0  # when the client is looked at next

    def steps(self, *, stream: bool = True) -> Iterator[Step]:
        self.stream = stream
        self.look_at = time.monotonic() + self.server.wait_timeout
        self.running = self._steps()
        return self.running

    def close(self) -> None:
        if self.running is not None:
            self.running.close()
        if not self.closed:
            self.closed = True
            if not self.finished:  # a stream whose client left: SGLang aborts it, and releases it
                with self.server.metrics.lock:
                    self.server.metrics.aborted += 1
            self.server.loras.release(self.ref)

    def complete(self) -> Outcome:
        """The whole answer; ClientGone when the client is found gone before it."""
        outcome = Outcome()
        with contextlib.closing(self):
            for step in self.steps(stream=False):
                outcome.add(step)
        return outcome

    def _look_at_client(self) -> None:
        if self.client is None or time.monotonic() < self.look_at:
            return
        self.look_at = time.monotonic() + self.server.wait_timeout
        if not self.client.gone():
            return
        self.closed = True  # and not released: the adapter's count of requests stays up for good
        with self.server.metrics.lock:
            self.server.metrics.aborted += 1
        log.info("Received output for rid=%r but the state was deleted in TokenizerManager.", self.rid)
        raise ClientGone(f"Request is disconnected from the client side (type 1). Abort request obj.rid={self.rid!r}")

    def _wait(self, ready: Callable[[float | None], bool]) -> None:
        """Until ``ready(timeout)`` says so, looking at the client on SGLang's schedule meanwhile."""
        while not ready(None if self.client is None else max(0.0, self.look_at - time.monotonic())):
            self._look_at_client()

    def _steps(self) -> Generator[Step, None, None]:
        server, metrics, prompt = self.server, self.server.metrics, self.prompt
        adapter = self.ref.lora_id if self.ref else None
        began = time.monotonic()
        with metrics.lock:
            metrics.queued += 1
        try:
            if self.held:  # SGLang's scheduler serves requests once its warm-up is done
                self._wait(server.warm.wait)
            self._wait(lambda timeout: server.slots.acquire(timeout=timeout))
        finally:
            with metrics.lock:
                metrics.queued -= 1
        with metrics.lock:
            metrics.running += 1
            metrics.adapters[adapter] += 1
            metrics.used_tokens += len(prompt)
        generated, last = 0, began
        try:
            engine = server.engine
            assert engine is not None
            with contextlib.closing(
                engine.generate(prompt, adapter, self.sampling, server.args.standin_token_delay)
            ) as tokens:
                for step in tokens:
                    now = server.last_token = time.monotonic()
                    generated += 1
                    if self.record:
                        metrics.token(now, first=generated == 1, since=now - (began if generated == 1 else last))
                    last = now
                    self.finished = step.finish is not None
                    yield step
                    if self.finished:
                        break
                    if self.stream and step.sent:  # an output went to the client's handler
                        self.look_at = time.monotonic() + server.wait_timeout
                    self._look_at_client()
        finally:
            with metrics.lock:
                metrics.running -= 1
                metrics.adapters[adapter] -= 1
                metrics.used_tokens -= len(prompt) + (generated if self.record else 0)
                if self.record:
                    metrics.finished(len(prompt), time.monotonic() - began)
            server.slots.release()


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.served: str = args.served_model_name
        self.loras = Loras(args)
        self.loras.check_start(args)
        self.metrics = Metrics(self.served)
        self.engine: Engine | None = None
        self.up = False  # after the warm-up: what /health waits for
        self.warm = threading.Event()  # set with up: generation requests wait for it
        # How long SGLang waits for a request's next output before it looks whether the client left.
        self.wait_timeout = float(os.environ.get("SGLANG_REQUEST_STATE_WAIT_TIMEOUT", "4"))
        self.local = threading.local()  # the Client of the request a handler thread serves
        self.inflight = 0  # generation requests being served: what a SIGTERM waits for
        self.inflight_changed = threading.Condition()
        self.context_len = 0
        self.slots = threading.Semaphore(args.max_running_requests or 1024)
        self.last_token = 0.0
        self.health_timeout = float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", "20"))
        generating = os.environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "true").lower()
        self.health_generates = generating not in ("0", "false", "no", "off")
        self.routes: dict[str, dict[str, Callable[[bytes], Reply]]] = {
            "/health": {"GET": self.health},
            "/health_generate": {"GET": self.health_generate},
            "/v1/models": {"GET": self.models},
            "/model_info": {"GET": self.model_info},
            "/get_model_info": {"GET": self.model_info},
            "/v1/chat/completions": {"POST": self.chat},
            "/v1/completions": {"POST": self.completions},
            "/generate": {"POST": self.generate_native, "PUT": self.generate_native},
            "/load_lora_adapter": {"POST": self.load_adapter},
            "/unload_lora_adapter": {"POST": self.unload_adapter},
            "/freeze_gc": {"GET": self.freeze_gc, "POST": self.freeze_gc},
        }
        if args.enable_metrics:
            self.routes["/metrics"] = {"GET": self.metrics_text}

    def load(self) -> None:
        """Tokenizer, weights and start adapters, before the port opens (as SGLang's scheduler does)."""
        engine = Engine(
            self.args.model_path,
            self.args.tokenizer_path or self.args.model_path,
            batched=self.args.standin_batched,
            trust_remote_code=self.args.trust_remote_code,
        )
        config = json.loads((Path(self.args.model_path) / "config.json").read_text())
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        self.context_len = self.args.context_length or int(text.get("max_position_embeddings", 2048))
        if self.loras.enabled:
            self.loras.load_start(engine, self.args.lora_paths or [])
        self.engine = engine

    def warm_up(self) -> None:
        """SGLang's warm-up request, once the port is open: /health says 503 until it is done, while
        every other endpoint already answers."""
        if self.args.standin_startup_delay > 0:
            time.sleep(self.args.standin_startup_delay)
        adapter = self.loras.expert.name if self.loras.expert is not None else None
        self.admit([0], adapter, Sampling(max_new_tokens=1, temperature=0.0), record=False, held=False).complete()
        self.up = True
        self.warm.set()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Counts a generation request in flight while it is served."""
        with self.inflight_changed:
            self.inflight += 1
        try:
            yield
        finally:
            with self.inflight_changed:
                self.inflight -= 1
                self.inflight_changed.notify_all()

    def drain(self) -> None:
        """SGLang's SIGTERM: the generation requests in flight finish first (it looks every 5 s)."""
        with self.inflight_changed:
            while self.inflight:
                log.info("Gracefully exiting... Remaining number of requests %d.", self.inflight)
                self.inflight_changed.wait(5.0)

    # -- plumbing -------------------------------------------------------------------------------

    def route(self, method: str, path: str, raw: bytes) -> Reply:
        if path.startswith("/v1/models/"):
            return self.model_card(path.removeprefix("/v1/models/"))
        handlers = self.routes.get(path)
        if handlers is None:
            return json_reply({"detail": "Not Found"}, 404)
        handler = handlers.get(method)
        if handler is None:
            return json_reply({"detail": "Method Not Allowed"}, 405)
        try:
            return handler(raw)
        except RequestError as exc:
            return json_reply(error_body(exc), exc.status)

    @staticmethod
    def body(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            raise RequestError(f"JSON decode error: {exc}", kind="Bad Request") from exc
        if not isinstance(body, dict):
            raise RequestError("Input should be a valid dictionary", kind="Bad Request")
        return body

    def _engine(self) -> Engine:
        assert self.engine is not None  # the port opens once the engine is loaded
        return self.engine

    # -- health, models, metrics ------------------------------------------------------------------

    def health(self, raw: bytes) -> Reply:
        if not self.health_generates:
            # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false: is the server up, nothing generated.
            return Reply(200 if self.up else 503, content_type=None)
        return self.health_generate(raw)

    def health_generate(self, _: bytes) -> Reply:
        """SGLang's check: one token is generated, and the handler looks once a second whether any
        request produced a token since it began (so it takes a second at least)."""
        if not self.up:
            return Reply(503, content_type=None)
        began = time.monotonic()
        adapter = self.loras.expert.name if self.loras.expert is not None else None

        def probe() -> None:
            with contextlib.suppress(Exception):
                self.admit([0], adapter, Sampling(max_new_tokens=1, temperature=0.0), record=False).complete()

        threading.Thread(target=probe, daemon=True).start()
        while time.monotonic() < began + self.health_timeout:
            time.sleep(1.0)
            if self.last_token > began:
                return Reply(200, content_type=None)
        return Reply(503, content_type=None)

    def models(self, _: bytes) -> Reply:
        created = int(time.time())
        cards = [self._card(self.served, self.served, None, self.context_len, created)]
        cards += [self._card(ref.name, ref.path, self.served, None, created) for ref in self.loras.registered()]
        return json_reply({"object": "list", "data": cards})

    def model_card(self, model: str) -> Reply:
        if model != self.served:
            error = {
                "message": f"The model '{model}' does not exist",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
            return json_reply({"error": error}, 404)
        return json_reply(self._card(model, model, None, self.context_len, int(time.time())))

    @staticmethod
    def _card(name: str, root: str, parent: str | None, max_len: int | None, created: int) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "sglang",
            "root": root,
            "parent": parent,
            "max_model_len": max_len,
        }

    def model_info(self, _: bytes) -> Reply:
        path = self.args.model_path
        return json_reply(
            {"model_path": path, "tokenizer_path": self.args.tokenizer_path or path, "is_generation": True}
        )

    def metrics_text(self, _: bytes) -> Reply:
        capacity = self.context_len * (self.args.max_running_requests or 1)
        pool = self.args.max_loras_per_batch if self.loras.enabled else None
        return Reply(200, self.metrics.render(capacity, pool).encode(), "text/plain; version=0.0.4; charset=utf-8")

    # -- adapters -------------------------------------------------------------------------------

    def load_adapter(self, raw: bytes) -> Reply:
        body = self.body(raw)
        refused = missing_fields(body, ["lora_name", "lora_path"])
        if refused is not None:
            raise refused
        name, path = field(body, "lora_name", str), field(body, "lora_path", str)
        result = self.loras.load(name, path, bool(field(body, "pinned", bool, False)))
        return json_reply(result.body(), 200 if result.success else 400)

    def freeze_gc(self, _: bytes) -> Reply:
        before = [len(gc.get_objects(generation)) for generation in range(3)]
        gc.freeze()
        after = [len(gc.get_objects(generation)) for generation in range(3)]
        log.info(
            "Freezing GC in Tokenizer Manager process. gen0: %d->%d, gen1: %d->%d, gen2: %d->%d",
            *(n for pair in zip(before, after, strict=True) for n in pair),
        )
        return Reply(200, b"Garbage collection frozen.\n", content_type=None)

    def unload_adapter(self, raw: bytes) -> Reply:
        body = self.body(raw)
        refused = missing_fields(body, ["lora_name"])
        if refused is not None:
            raise refused
        result = self.loras.unload(field(body, "lora_name", str))
        return json_reply(result.body(), 200 if result.success else 400)

    # -- generation -----------------------------------------------------------------------------

    def adapter_of(self, model: str, lora_path: Any) -> str | None:
        """``base:adapter`` selects the adapter (the base part is not checked); so does ``lora_path``.
        A bare adapter name is just an unknown model name: the base model runs (SGLang's quirk)."""
        adapter: str | None = None
        if ":" in model:
            adapter = model.split(":", 1)[1].strip() or None
        if adapter is None and isinstance(lora_path, list):
            lora_path = lora_path[0] if lora_path else None
        if adapter is None and isinstance(lora_path, str):
            adapter = lora_path
        if adapter is not None and not self.loras.enabled:
            raise RequestError(
                f"LoRA adapter '{adapter}' was requested, but LoRA is not enabled. Please launch the server with "
                "--enable-lora flag and preload adapters using --lora-paths or /load_lora_adapter endpoint."
            )
        return adapter

    def admit(
        self, prompt: list[int], adapter: str | None, sampling: Sampling, *, record: bool = True, held: bool = True
    ) -> Job:
        """SGLang's tokenizer manager: lengths and adapter are checked before anything is answered (so
        a stream for an unknown adapter is a 400, not an event), during the warm-up too."""
        if len(prompt) >= self.context_len:
            raise RequestError(
                f"The input ({len(prompt)} tokens) is longer than the model's context length "
                f"({self.context_len} tokens)."
            )
        budget = sampling.max_new_tokens
        if budget is None:
            sampling.max_new_tokens = self.context_len - len(prompt)
        elif len(prompt) + budget > self.context_len:
            raise RequestError(
                f"Requested token count exceeds the model's maximum context length of {self.context_len} tokens. "
                f"You requested a total of {len(prompt) + budget} tokens: {len(prompt)} tokens from the input "
                f"messages and {budget} tokens for the completion. Please reduce the number of tokens in the input "
                "messages or the completion to fit within the limit."
            )
        ref = self.loras.acquire(adapter, self.served)
        client = getattr(self.local, "client", None)
        return Job(self, prompt, ref, sampling, record=record, held=held, client=client)

    def _sampling(self, body: dict[str, Any], *, chat: bool) -> Sampling:
        defaults = self._engine().generation_defaults if chat else {}
        if field(body, "n", int, 1) != 1:
            raise RequestError("The SGLang stand-in generates one choice per request (n=1).")
        max_tokens = field(body, "max_completion_tokens", int) or field(body, "max_tokens", int)
        if not chat and max_tokens is None:
            max_tokens = 16  # CompletionRequest's default; a chat request runs to the context length
        if max_tokens is not None and max_tokens <= 0:
            raise RequestError("max_tokens must be positive", kind="Bad Request")
        stop = field(body, "stop", (str, list))
        temperature = field(body, "temperature", (int, float))
        top_p, top_k = field(body, "top_p", (int, float)), field(body, "top_k", int)
        return Sampling(
            max_new_tokens=max_tokens,
            temperature=float(temperature if temperature is not None else defaults.get("temperature", 1.0)),
            top_p=float(top_p if top_p is not None else defaults.get("top_p", 1.0)),
            top_k=int(top_k if top_k is not None else defaults.get("top_k", -1)),
            seed=field(body, "seed", int),
            stop=[stop] if isinstance(stop, str) else [str(s) for s in stop or []],
            stop_token_ids=[int(t) for t in field(body, "stop_token_ids", list) or []],
            ignore_eos=bool(field(body, "ignore_eos", bool, False)),
        )

    def chat(self, raw: bytes) -> Reply:
        body = self.body(raw)
        refused = missing_fields(body, ["messages"])
        if refused is not None:
            raise refused
        messages = field(body, "messages", list)
        if not messages:
            raise RequestError("Messages cannot be empty.")
        model = field(body, "model", str, DEFAULT_MODEL_NAME)
        adapter = self.adapter_of(model, body.get("lora_path"))
        sampling = self._sampling(body, chat=True)
        prompt = self._engine().chat_prompt(
            [self._message(m) for m in messages], field(body, "chat_template_kwargs", dict) or {}
        )
        job = self.admit(prompt, adapter, sampling)
        rid, created = job.rid, int(time.time())
        if field(body, "stream", bool, False):
            options = field(body, "stream_options", dict) or {}
            return self._stream(job, self._chat_chunks(job, rid, created, model, options))
        outcome = job.complete()
        finish = outcome.finish or {}
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": outcome.text, "reasoning_content": None, "tool_calls": None},
            "logprobs": None,
            "finish_reason": finish.get("type"),
            "matched_stop": finish.get("matched"),
        }
        return json_reply(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage(len(prompt), len(outcome.ids)),
                "metadata": {"weight_version": "default"},
            }
        )

    @staticmethod
    def _message(message: Any) -> dict[str, Any]:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError("messages: each message needs a role", kind="Bad Request")
        content = message.get("content")
        if isinstance(content, list):  # text parts of a multi-part message, in order
            content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        return {**message, "content": content if content is not None else ""}

    @staticmethod
    def _chat_chunks(job: Job, rid: str, created: int, model: str, options: dict[str, Any]) -> Iterator[bytes]:
        """SGLang's chat stream: the role, the content, a chunk with finish_reason, usage if asked, [DONE].
        As sglang 0.5.16 writes them: a delta holds reasoning_content and the keys that are set."""

        def chunk(delta: dict[str, Any], finish: dict[str, Any] | None = None) -> bytes:
            choice = {
                "index": 0,
                "delta": {"reasoning_content": None, **delta},
                "logprobs": None,
                "finish_reason": finish.get("type") if finish else None,
                "matched_stop": finish.get("matched") if finish else None,
            }
            return sse(head | {"choices": [choice]})

        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        completion, first, finish = 0, True, None
        for step in job.steps():
            completion += 1
            if not step.sent:
                continue
            if first:
                yield chunk({"role": "assistant", "content": ""})
                first = False
            finish = step.finish
            if step.delta:
                yield chunk({"content": step.delta})
        yield chunk({}, finish)
        if options.get("include_usage"):
            yield sse(head | {"choices": [], "usage": usage(len(job.prompt), completion)})
        yield SSE_DONE

    def completions(self, raw: bytes) -> Reply:
        body = self.body(raw)
        prompt_field = body.get("prompt")
        if isinstance(prompt_field, list) and len(prompt_field) == 1 and isinstance(prompt_field[0], (str, list)):
            prompt_field = prompt_field[0]  # a batch of one
        if isinstance(prompt_field, str):
            prompt = self._engine().encode(prompt_field, special=True)
        elif isinstance(prompt_field, list) and all(isinstance(t, int) for t in prompt_field):
            prompt = [int(t) for t in prompt_field]
        else:
            message = "prompt: a string or a list of token ids (the stand-in serves one prompt per request)"
            raise RequestError(message, kind="Bad Request")
        model = field(body, "model", str, DEFAULT_MODEL_NAME)
        job = self.admit(prompt, self.adapter_of(model, body.get("lora_path")), self._sampling(body, chat=False))
        rid, created = job.rid, int(time.time())
        echo = prompt_field if field(body, "echo", bool, False) and isinstance(prompt_field, str) else ""
        if field(body, "stream", bool, False):
            options = field(body, "stream_options", dict) or {}
            return self._stream(job, self._completion_chunks(job, rid, created, model, options, echo))
        outcome = job.complete()
        text = echo + outcome.text
        finish = outcome.finish or {}
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish.get("type"),
            "matched_stop": finish.get("matched"),
        }
        return json_reply(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage(len(prompt), len(outcome.ids)),
                "metadata": {"weight_version": "default"},
            }
        )

    @staticmethod
    def _completion_chunks(
        job: Job, rid: str, created: int, model: str, options: dict[str, Any], echo: str
    ) -> Iterator[bytes]:
        """SGLang's completion stream, as sglang 0.5.16 writes it: a chunk for every output (every
        token, text or not, the last one with its finish_reason), each with ``"usage": null`` whether
        usage was asked or not; then, if asked, the usage alone (no null fields); then [DONE]."""
        head = {"id": rid, "object": "text_completion", "created": created, "model": model}
        completion = 0
        for step in job.steps():
            completion += 1
            if not step.sent:
                continue
            finish = step.finish or {}
            choice = {
                "index": 0,
                "text": echo + step.delta,
                "logprobs": None,
                "finish_reason": finish.get("type"),
                "matched_stop": finish.get("matched"),
            }
            echo = ""  # the prompt goes with the first chunk only
            yield sse(head | {"choices": [choice], "usage": None})
        if options.get("include_usage"):
            counted = {k: v for k, v in usage(len(job.prompt), completion).items() if v is not None}
            yield sse(head | {"choices": [], "usage": counted})
        yield SSE_DONE

    def generate_native(self, raw: bytes) -> Reply:
        """SGLang's /generate: text or input_ids, sampling_params, lora_path (an adapter name)."""
        body = self.body(raw)
        params = field(body, "sampling_params", dict) or {}
        text, input_ids = field(body, "text", str), field(body, "input_ids", list)
        if (text is None) == (input_ids is None):
            raise RequestError("Either text or input_ids should be provided.", kind="Bad Request")
        prompt = self._engine().encode(text, special=True) if text is not None else [int(t) for t in input_ids]
        sampling = self._sampling({**params, "max_tokens": params.get("max_new_tokens", 128)}, chat=False)
        try:
            job = self.admit(prompt, self.adapter_of("", body.get("lora_path")), sampling)
        except RequestError as exc:
            return json_reply({"error": {"message": str(exc)}}, 400)
        rid, began = job.rid, time.monotonic()

        def answer(outcome: Outcome) -> dict[str, Any]:
            meta: dict[str, Any] = {
                "id": rid,
                "finish_reason": outcome.finish,
                "prompt_tokens": len(prompt),
                "weight_version": "default",
                "completion_tokens": len(outcome.ids),
                "cached_tokens": 0,
                "e2e_latency": time.monotonic() - began,
            }
            if body.get("return_logprob"):
                meta["output_token_logprobs"] = [
                    [p, t, None] for p, t in zip(outcome.logprobs, outcome.ids, strict=True)
                ]
            return {"text": outcome.text, "output_ids": outcome.ids, "meta_info": meta}

        if field(body, "stream", bool, False):

            def events() -> Iterator[bytes]:
                outcome = Outcome()
                for step in job.steps():
                    outcome.add(step)
                    if step.sent:
                        yield sse(answer(outcome))
                yield SSE_DONE

            return self._stream(job, events())
        try:
            return json_reply(answer(job.complete()))
        except ClientGone as exc:
            return json_reply({"error": {"message": str(exc)}}, 400)

    @staticmethod
    def _stream(job: Job, chunks: Iterator[bytes]) -> Reply:
        return Reply(200, content_type="text/event-stream; charset=utf-8", stream=chunks, done=job.close)


# ---------------------------------------------------------------------------------------------
# HTTP


class HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a benchmark opens many connections at once


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams, as uvicorn serves SGLang
    timeout = 60  # an idle keep-alive connection is closed (it holds a thread)
    standin: Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def version_string(self) -> str:
        return "uvicorn"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        raw = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            raw += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return raw

    def _serve(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        serving = self.standin.serving() if path in GENERATION_PATHS else contextlib.nullcontext()
        self.standin.local.client = Client(self.connection)
        try:
            with serving:
                self._answer(method, path)
        finally:
            self.standin.local.client = None

    def _answer(self, method: str, path: str) -> None:
        try:
            reply = self.standin.route(method, path, self._body())
        except Exception as exc:  # the server stays up, as SGLang's does, and says what broke
            log.exception("%s %s failed", method, path)
            failure = RequestError(str(exc), status=500, kind="InternalServerError")
            reply = json_reply(error_body(failure), 500)
        self.standin.metrics.http(path, method, reply.status)
        try:
            self._send(reply, method, path)
        except (BrokenPipeError, ConnectionResetError):
            log.info("%s %s: the client went away before its answer", method, path)
            self.close_connection = True
        finally:
            if reply.done is not None:
                reply.done()

    def _send(self, reply: Reply, method: str, path: str) -> None:
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        if reply.stream is None:
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            for chunk in reply.stream:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            log.info("%s %s: the client went away; generation stopped", method, path)
            self.close_connection = True
        except ClientGone as exc:
            log.info("%s %s: %s", method, path, exc)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        phrase = http.HTTPStatus(int(code)).phrase if str(code).isdigit() else ""
        log.info('%s:%s - "%s" %s %s', *self.client_address[:2], self.requestline, code, phrase)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", stream=sys.stderr)
    args, unknown = parse_args(argv)
    if unknown:
        log.info("Flags the stand-in accepts without using them: %s", " ".join(unknown))
    strange = unrecognised(unknown)
    if strange:
        log.warning("Flags not known to the stand-in (SGLang may refuse them): %s", " ".join(strange))
    try:
        server = Server(args)
        log.info("Loading %s", args.model_path)
        server.load()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    handler = type("BoundHandler", (Handler,), {"standin": server})
    httpd = HttpServer((args.host, args.port), handler)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    log.info("Uvicorn running on http://%s:%d; warming up", args.host, args.port)
    server.warm_up()
    log.info("The server is fired up and ready to roll!")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    try:
        stopping.wait()
        log.warning("SIGTERM received. Draining requests and shutting down...")
        server.drain()
    except KeyboardInterrupt:
        httpd.shutdown()
        return 0
    # SGLang then kills its own process tree: nothing is torn down in order (a hung unload's thread
    # included). Only the unpacked copy of an INT4 checkpoint is removed first: it is ours, not SGLang's.
    if server.engine is not None and server.engine.unpacked is not None:
        server.engine.unpacked.cleanup()
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
