"""sglang-kt's own argument parser over launch commands. Run in the KTransformers environment (make kt-env).

    python sglang_parse.py ARGV_JSON

ARGV_JSON holds a list of argv lists (the arguments of ``python -m sglang.launch_server``). Each is parsed
as sglang-kt's ``prepare_server_args`` parses a command line: an ``argparse.ArgumentParser()`` filled by
``ServerArgs.add_cli_args``. ServerArgs' own checks (``__post_init__``) are not run: they need an
accelerator. Prints one JSON object:

- ``results``: per argv, ``{"ok": true, "values": {...}, "options": {flag: dest}, "abbreviated": [...]}``
  (``abbreviated``: flags the parser took as a prefix of a longer option) or ``{"ok": false, "error": ...}``
  with the parser's error line when it refused;
- what sglang-kt accepts but does not check in the parser: ``--kt-method`` is a free string there, so
  ``kt_methods`` lists the methods kt-kernel's ``KTMoEWrapper`` serves (``INFERENCE_METHODS``) and
  those sglang-kt maps to an expert-LoRA kernel (``_KT_SFT_METHOD_BY_INFERENCE_METHOD``), both read from
  the installed sources;
- ``choices``: the parser's choices of the flags the operator renders with a fixed value.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any

import sglang
from sglang.srt.server_args import ServerArgs

# The parsed values the operator's launch commands set.
VALUES = (
    "model_path",
    "served_model_name",
    "host",
    "port",
    "trust_remote_code",
    "tp_size",
    "pp_size",
    "kt_method",
    "kt_weight_path",
    "kt_cpuinfer",
    "kt_threadpool_count",
    "kt_num_gpu_experts",
    "kt_gpu_prefill_token_threshold",
    "max_running_requests",
    "context_length",
    "enable_lora",
    "max_lora_rank",
    "lora_target_modules",
    "lora_backend",
    "lora_paths",
    "max_loras_per_batch",
    "max_loaded_loras",
    "lora_eviction_policy",
    "disable_cuda_graph",
    "enable_metrics",
    "tool_call_parser",
    "reasoning_parser",
    "mem_fraction_static",
)
# ServerArgs.from_cli_args renames these parser destinations to its fields.
RENAMED = {"tp_size": "tensor_parallel_size", "pp_size": "pipeline_parallel_size"}
CHOICES = ("tool_call_parser", "reasoning_parser", "lora_backend", "lora_eviction_policy", "lora_target_modules")


def new_parser() -> argparse.ArgumentParser:
    """The parser of sglang.srt.server_args.prepare_server_args (named here only for its messages)."""
    parser = argparse.ArgumentParser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    return parser


def options(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The destination of every flag in argv, and the flags that are only a prefix of an option."""
    known = parser._option_string_actions  # argparse keeps its options only there
    found: dict[str, str] = {}
    abbreviated = []
    for token in argv:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        if flag in known:
            found[flag] = known[flag].dest
            continue
        matches = {known[o].dest for o in known if o.startswith(flag)}
        if len(matches) == 1:
            found[flag] = matches.pop()
            abbreviated.append(flag)
    return found, abbreviated


def parse(argv: list[str]) -> dict[str, Any]:
    parser = new_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            namespace = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse prints the usage, then "PROG: error: MESSAGE" on the last line.
        return {"ok": False, "status": exit_.code, "error": err.getvalue().strip().splitlines()[-1]}
    found, abbreviated = options(parser, argv)
    values = {name: getattr(namespace, RENAMED.get(name, name)) for name in VALUES}
    return {"ok": True, "values": values, "options": found, "abbreviated": abbreviated}


def assigned(path: Path, name: str) -> Any:
    """The literal value of a module-level assignment in a source file (the module is not imported: kt-kernel
    and sglang's MoE layers load CPU and GPU kernels at import)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
            # INFERENCE_METHODS = frozenset([...])
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "frozenset":
                value = value.args[0]
            return ast.literal_eval(value)
    raise LookupError(f"{name} is not assigned in {path}")


def kt_methods() -> dict[str, list[str]]:
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or not spec.submodule_search_locations:
        raise LookupError("kt_kernel is not installed")
    kt_kernel = Path(next(iter(spec.submodule_search_locations)))
    sglang_dir = Path(sglang.__file__).parent
    wrapper = sglang_dir / "srt" / "layers" / "moe" / "kt_ep_wrapper.py"
    return {
        "serve": sorted(assigned(kt_kernel / "experts.py", "INFERENCE_METHODS")),
        "expert_lora": sorted(assigned(wrapper, "_KT_SFT_METHOD_BY_INFERENCE_METHOD")),
    }


def choices() -> dict[str, list[str]]:
    actions = {action.dest: action for action in new_parser()._actions}
    return {name: list(actions[name].choices or []) for name in CHOICES}


def main() -> None:
    argvs = json.loads(Path(sys.argv[1]).read_text())
    version = importlib.metadata.version("sglang-kt")
    out = {
        "sglang_kt": version,
        "results": [parse(argv) for argv in argvs],
        "kt_methods": kt_methods(),
        "choices": choices(),
    }
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
