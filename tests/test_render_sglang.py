"""The sglang-kt launch command of a LoraServer's replicas (render/sglang.py): what it renders from the
spec, and sglang-kt 0.7.2's own argument parser over it (tests/oracle/sglang_parse.py, run in the
KTransformers environment, `make kt-env`). The parser is the one `python -m sglang.launch_server`
builds; ServerArgs' further checks need an accelerator and are not run here."""

from __future__ import annotations

import json
import os
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest

from kimi_operator.api.loraserver import KtMethod, LoraServerSpec
from kimi_operator.render.sglang import ENGINE_PORT, ModelPaths, StartAdapter, launch_args

PARSE = Path(__file__).parent / "oracle" / "sglang_parse.py"
ROOT = "/models/ml/kimi"
CHECKPOINT = f"{ROOT}/int4"
PATHS = ModelPaths(checkpoint=CHECKPOINT, root=ROOT)
EXPERT = StartAdapter("support-v2", f"/adapter-cache/{'a' * 64}")
HOST = "10.0.0.7"
METHODS: tuple[KtMethod, ...] = typing.get_args(KtMethod)
WEIGHTS = {"AMXINT8": f"{ROOT}/cpu-int8", "AMXINT4": f"{ROOT}/cpu-int4", "RAWINT4": CHECKPOINT, "BF16": f"{ROOT}/bf16"}
KINDS = {"shared": None, "dedicated": EXPERT}
MLA = ["q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "o_proj"]


def spec(method: KtMethod = "AMXINT8", **engine: Any) -> LoraServerSpec:
    return LoraServerSpec.model_validate(
        {"model": {"name": "kimi"}, "servedModelName": "kimi-k2.5", "engine": {"ktMethod": method, **engine}}
    )


def flags(args: list[str]) -> dict[str, list[str]]:
    """Each flag with the values that follow it; a flag given twice fails the test."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for token in args:
        if token.startswith("--"):
            assert token not in found, f"{token} given twice in {args}"
            current = found[token] = []
        else:
            current.append(token)
    return found


# The pure render.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("method", "weights"), WEIGHTS.items())
def test_each_kt_method_reads_the_experts_of_its_variant(method: KtMethod, weights: str, kind: str) -> None:
    found = flags(launch_args(spec(method), PATHS, host=HOST, expert=KINDS[kind]))
    assert found["--kt-method"] == [method]
    assert found["--kt-weight-path"] == [weights]
    # The attention and the rest of the model always come from the checkpoint as shipped.
    assert found["--model-path"] == [CHECKPOINT]


def test_the_methods_of_the_api_are_the_methods_rendered() -> None:
    assert set(METHODS) == set(WEIGHTS)


def test_a_shared_replica_declares_its_lora_pool_and_loads_no_adapter_at_start() -> None:
    s = spec(
        "RAWINT4",
        ktNumGpuExperts=30,
        ktGpuPrefillTokenThreshold=400,
        maxLorasPerBatch=4,
        maxLoadedLoras=16,
        loraEvictionPolicy="fifo",
    )
    found = flags(launch_args(s, PATHS, host=HOST))
    assert "--lora-paths" not in found
    assert found["--enable-lora"] == []
    assert found["--max-loras-per-batch"] == ["4"]
    assert found["--max-loaded-loras"] == ["16"]
    assert found["--lora-eviction-policy"] == ["fifo"]
    assert found["--kt-num-gpu-experts"] == ["30"]
    assert found["--kt-gpu-prefill-token-threshold"] == ["400"]
    assert "--disable-cuda-graph" not in found
    assert found["--host"] == [HOST]
    assert found["--port"] == [str(ENGINE_PORT)]


def test_a_shared_replica_keeps_as_many_adapters_loaded_as_fit_a_batch_by_default() -> None:
    found = flags(launch_args(spec(maxLorasPerBatch=6), PATHS, host=HOST))
    assert found["--max-loaded-loras"] == ["6"]


def test_a_dedicated_replica_follows_sglang_kt_rules_for_expert_lora() -> None:
    s = spec(
        "RAWINT4",
        ktNumGpuExperts=30,
        ktGpuPrefillTokenThreshold=400,
        maxLorasPerBatch=4,
        maxLoadedLoras=16,
        maxRunningRequests=8,
    )
    found = flags(launch_args(s, PATHS, host=HOST, expert=EXPERT))
    assert found["--lora-paths"] == [f"support-v2={EXPERT.path}"]
    assert found["--kt-num-gpu-experts"] == ["0"]
    assert "--kt-gpu-prefill-token-threshold" not in found
    assert found["--disable-cuda-graph"] == []
    assert found["--pp-size"] == ["1"]
    assert found["--max-running-requests"] == ["8"]
    # The base slot and the one adapter; nothing is loaded or evicted at run time.
    assert found["--max-loras-per-batch"] == ["2"]
    assert "--max-loaded-loras" not in found
    assert "--lora-eviction-policy" not in found


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("modules", "want"), [(None, ["all"]), (["all"], ["all"]), (MLA, MLA)])
def test_lora_target_modules_and_rank_are_explicit(modules: list[str] | None, want: list[str], kind: str) -> None:
    engine: dict[str, Any] = {"maxLoraRank": 16}
    if modules is not None:
        engine["loraTargetModules"] = modules
    found = flags(launch_args(spec(**engine), PATHS, host=HOST, expert=KINDS[kind]))
    assert found["--lora-target-modules"] == want
    assert found["--max-lora-rank"] == ["16"]


@pytest.mark.parametrize("kind", KINDS)
def test_extra_args_come_first_so_rendered_flags_win(kind: str) -> None:
    extra = ["--mem-fraction-static", "0.9", "--enable-mixed-chunk"]
    args = launch_args(spec(extraArgs=extra), PATHS, host=HOST, expert=KINDS[kind])
    assert args[:3] == extra


def test_the_kimi_parsers_and_metrics_are_always_on() -> None:
    for expert in KINDS.values():
        found = flags(launch_args(spec(), PATHS, host=HOST, expert=expert))
        assert found["--tool-call-parser"] == ["kimi_k2"]
        assert found["--reasoning-parser"] == ["kimi_k2"]
        assert found["--enable-metrics"] == []
        assert found["--trust-remote-code"] == []


# sglang-kt's own parser.

# Most fields set, differently per method: RAWINT4 alone may set the GPU prefill threshold (CEL).
ENGINES: dict[KtMethod, dict[str, Any]] = {
    "AMXINT8": {"loraTargetModules": ["all"], "loraBackend": "csgmv", "maxLoadedLoras": 16},
    "AMXINT4": {"loraTargetModules": MLA, "loraBackend": "triton", "loraEvictionPolicy": "fifo"},
    "RAWINT4": {"loraTargetModules": ["all"], "ktGpuPrefillTokenThreshold": 400, "ktNumGpuExperts": 30},
    "BF16": {"loraTargetModules": MLA, "loraBackend": "torch_native", "contextLength": 65536},
}
COMMON: dict[str, Any] = {
    "ktCpuinfer": 96,
    "ktThreadpoolCount": 2,
    "ktNumGpuExperts": 8,
    "tensorParallelSize": 4,
    "contextLength": 131072,
    "maxRunningRequests": 32,
    "maxLorasPerBatch": 4,
    "maxLoraRank": 32,
    "extraArgs": ["--mem-fraction-static", "0.9"],
}
CASES = [(method, kind) for method in METHODS for kind in KINDS]


def engine_spec(method: KtMethod) -> LoraServerSpec:
    return spec(method, **{**COMMON, **ENGINES[method]})


def expected(method: KtMethod, kind: str) -> dict[str, Any]:
    """What the engine must read from its command line: the spec, under sglang-kt's expert-LoRA rules on
    a dedicated replica, and SGLang's defaults where nothing is rendered."""
    engine = engine_spec(method).engine
    dedicated = kind == "dedicated"
    return {
        "model_path": CHECKPOINT,
        "served_model_name": "kimi-k2.5",
        "host": HOST,
        "port": ENGINE_PORT,
        "trust_remote_code": True,
        "tp_size": 4,
        "pp_size": 1,
        "kt_method": method,
        "kt_weight_path": WEIGHTS[method],
        "kt_cpuinfer": 96,
        "kt_threadpool_count": 2,
        "kt_num_gpu_experts": 0 if dedicated else engine.kt_num_gpu_experts,
        "kt_gpu_prefill_token_threshold": None if dedicated else engine.kt_gpu_prefill_token_threshold,
        "max_running_requests": 32,
        "context_length": engine.context_length,
        "enable_lora": True,
        "max_lora_rank": 32,
        "lora_target_modules": engine.lora_target_modules,
        "lora_backend": engine.lora_backend,
        "lora_paths": [f"{EXPERT.name}={EXPERT.path}"] if dedicated else None,
        "max_loras_per_batch": 2 if dedicated else 4,
        "max_loaded_loras": None if dedicated else (engine.max_loaded_loras or engine.max_loras_per_batch),
        "lora_eviction_policy": "lru" if dedicated else engine.lora_eviction_policy,
        "disable_cuda_graph": dedicated,
        "enable_metrics": True,
        "tool_call_parser": "kimi_k2",
        "reasoning_parser": "kimi_k2",
        "mem_fraction_static": 0.9,
    }


def rendered(method: KtMethod, kind: str) -> list[str]:
    return launch_args(engine_spec(method), PATHS, host=HOST, expert=KINDS[kind])


def replaced(args: list[str], flag: str, value: str) -> list[str]:
    at = args.index(flag)
    return [*args[: at + 1], value, *args[at + 2 :]]


def wrong() -> dict[str, list[str]]:
    args = rendered("AMXINT8", "shared")
    misspelt = spec(extraArgs=["--mem-fraction-statc", "0.9"])
    return {
        "unknown flag": [t if t != "--kt-weight-path" else "--kt-weights-path" for t in args],
        "bad type": replaced(args, "--tp-size", "two"),
        "bad choice": replaced(args, "--lora-backend", "nope"),
        "misspelt extra arg": launch_args(misspelt, PATHS, host=HOST),
        # The parser takes any string as a kt method; kt-kernel refuses it only when the engine starts.
        "unknown kt method": replaced(args, "--kt-method", "NOPE"),
    }


@pytest.fixture(scope="module")
def parsed(kt_python: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every argv of this module through sglang-kt's parser, in one run of the KTransformers environment."""
    argvs = {f"{method}/{kind}": rendered(method, kind) for method, kind in CASES} | wrong()
    path = tmp_path_factory.mktemp("sglang-parse") / "argv.json"
    path.write_text(json.dumps(list(argvs.values())))
    proc = subprocess.run(
        [kt_python, str(PARSE), str(path)],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sglang_kt"] == "0.7.2"
    return {**out, "results": dict(zip(argvs, out["results"], strict=True))}


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_sglang_kt_parses_the_rendered_command_to_the_spec(parsed: dict[str, Any], method: KtMethod, kind: str) -> None:
    result = parsed["results"][f"{method}/{kind}"]
    assert result["ok"], result["error"]
    assert result["values"] == expected(method, kind)
    # Every flag rendered is one of sglang-kt's own option strings: none relies on argparse taking
    # a prefix (`--tp` is only a prefix of --tp-size, and would turn ambiguous with a new --tp* option).
    assert set(result["options"]) == {t for t in rendered(method, kind) if t.startswith("--")}
    assert result["abbreviated"] == []


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_the_kt_method_is_one_that_sglang_kt_serves(parsed: dict[str, Any], method: KtMethod, kind: str) -> None:
    """The parser takes any --kt-method: check it against kt-kernel's methods (what sglang-kt hands the
    method to), and on a dedicated replica against the methods sglang-kt maps to an expert-LoRA kernel."""
    method_parsed = parsed["results"][f"{method}/{kind}"]["values"]["kt_method"]
    assert method_parsed in parsed["kt_methods"]["serve"]
    if kind == "dedicated":
        assert method_parsed in parsed["kt_methods"]["expert_lora"]


def test_every_kt_method_of_the_api_serves_base_and_expert_lora(parsed: dict[str, Any]) -> None:
    assert set(METHODS) <= set(parsed["kt_methods"]["serve"])
    assert set(METHODS) <= set(parsed["kt_methods"]["expert_lora"])


def test_kimi_k2_is_among_sglang_kt_parsers(parsed: dict[str, Any]) -> None:
    assert "kimi_k2" in parsed["choices"]["tool_call_parser"]
    assert "kimi_k2" in parsed["choices"]["reasoning_parser"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown flag", "error: unrecognized arguments: --kt-weights-path"),
        ("bad type", "error: argument --tensor-parallel-size/--tp-size: invalid int value: 'two'"),
        ("bad choice", "error: argument --lora-backend: invalid choice: 'nope'"),
        ("misspelt extra arg", "error: unrecognized arguments: --mem-fraction-statc 0.9"),
    ],
)
def test_sglang_kt_refuses_a_wrong_command(parsed: dict[str, Any], case: str, message: str) -> None:
    result = parsed["results"][case]
    assert not result["ok"]
    assert result["status"] == 2
    assert message in result["error"]


def test_an_unknown_kt_method_passes_the_parser_but_not_the_method_check(parsed: dict[str, Any]) -> None:
    result = parsed["results"]["unknown kt method"]
    assert result["ok"]
    assert result["values"]["kt_method"] == "NOPE"
    assert "NOPE" not in parsed["kt_methods"]["serve"]
