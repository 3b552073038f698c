"""A real LoRA SFT run on CPU: our rendered LLaMA-Factory config and Kimi template drive
LLaMA-Factory 0.9.5 on a tiny DeepSeek-V3-architecture model built here; the trainer log becomes
status progress; a run stopped after a checkpoint resumes at the next step; the exported adapter
loads with PEFT and changes the model's output, and its adapter.gguf (llama.cpp's converter, from
`make llamacpp`) loads in a real llama-server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from e2e.gpu.tiny_train import spec as tiny_spec

from kimi_operator.api.finetunejob import FineTuneJobSpec
from kimi_operator.api.serving import GGUF_ADAPTER_FILE
from kimi_operator.render import llamafactory
from kimi_operator.workloads.train.progress import LogTail, latest_checkpoint, progress_from_log
from tests import llamacpp_tools

ORACLE = Path(__file__).parent / "oracle" / "tiny_deepseek.py"
OPERATOR = Path(__file__).parents[1] / "operator"
# What differs on a CPU-only test machine from the GPU hosts the config is rendered for.
CPU = ["use_cpu=true", "bf16=false", "use_kt=false", "trust_remote_code=false", "preprocessing_num_workers=1"]


def pod_env() -> dict[str, str]:
    """The training pod's environment here: its image's llama.cpp converter is `make llamacpp`'s."""
    env = {**os.environ, "PYTHONPATH": str(OPERATOR), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return llamacpp_tools.with_converter(env)


def run(python: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = pod_env()
    proc = subprocess.run([python, *args], capture_output=True, text=True, check=False, env=env, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def seed_dataset(train_python: str, path: Path) -> None:
    run(train_python, str(ORACLE), "dataset", str(path))


@pytest.fixture(scope="module")
def tiny_model(train_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-deepseek")
    run(train_python, str(ORACLE), str(out))
    return out


def spec(gpus: int = 1) -> FineTuneJobSpec:
    return tiny_spec(batch=2, save_steps=3, gpus=gpus)


def test_rendered_configs_pass_llamafactory_parser(train_python: str, tiny_model: Path, tmp_path: Path) -> None:
    script = """
import json, sys
from llamafactory.hparams import get_train_args
for args in json.load(open(sys.argv[1])):
    model, data, training, finetuning, _ = get_train_args(args)
    print("PARSED", finetuning.lora_rank, training.learning_rate, data.template)
"""
    specs = [
        spec(),
        FineTuneJobSpec.model_validate(
            {**spec().to_wire(), "training": {**spec().to_wire()["training"], "thinking": True}}
        ),
    ]
    configs = []
    for s in specs:
        args = llamafactory.train_args(
            s, model_path=str(tiny_model), dataset_dir=str(tmp_path), output_dir=str(tmp_path / "o")
        )
        args.update({k: json.loads(v) for k, v in (pair.split("=", 1) for pair in CPU)})
        configs.append(args)
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    stdout = run(train_python, "-c", script, str(tmp_path / "configs.json")).stdout
    parsed = [line.split()[1:] for line in stdout.splitlines() if line.startswith("PARSED")]
    assert parsed == [["8", "0.001", "kimi_k25"]] * 2
    # The parser is strict: a key it does not know is refused, so the test above can fail.
    configs[0]["cpu_infer"] = 32
    (tmp_path / "configs.json").write_text(json.dumps(configs[:1]))
    refused = run(train_python, "-c", script, str(tmp_path / "configs.json"), check=False)
    assert refused.returncode != 0
    assert "cpu_infer" in refused.stderr


def training_command(
    train_python: str, tiny_model: Path, tmp_path: Path, *, processes: int = 1
) -> tuple[list[str], Path]:
    """The training pod's command on the tiny model (CPU settings), and its output directory."""
    data, config, output = tmp_path / "train.jsonl", tmp_path / "config", tmp_path / "out"
    seed_dataset(train_python, data)
    config.mkdir()
    files = llamafactory.config_files(
        spec(gpus=processes),
        model_path=str(tiny_model),
        dataset_file=str(output / "dataset.jsonl"),
        output_dir=str(output),
        config_dir=str(config),
    )
    for name, text in files.items():
        (config / name).write_text(text)
    common = [
        "-m",
        "kimi_operator.workloads.train.command",
        f"--config-dir={config}",
        f"--dataset={data}",
        f"--output-dir={output}",
    ]
    common += ["--adapter-name=tiny", "--base-model=tiny", "--node=local", "--report-interval=0.2"]
    if processes > 1:
        common.append(f"--processes={processes}")
    return common + [f"--set={pair}" for pair in CPU], output


@pytest.fixture(scope="module")
def llamacpp() -> Path:
    return llamacpp_tools.build()


def test_train_report_resume_export(train_python: str, tiny_model: Path, llamacpp: Path, tmp_path: Path) -> None:
    command, output = training_command(train_python, tiny_model, tmp_path)

    # First run: stopped after the checkpoint at step 3 (as a killed pod would leave it).
    first = run(train_python, *command, "--set=max_steps=3")
    log = output / "trainer_log.jsonl"
    records = list(LogTail(log).records())
    assert [r["current_steps"] for r in records if "loss" in r] == [1, 2, 3]
    status = progress_from_log(records[-2], now="2026-01-01T00:00:00Z")
    assert status["step"] == 3
    assert status["totalSteps"] == 3
    assert status["percent"] == 100.0
    assert status["loss"] > 0
    assert status["eta"] == "0:00:00"
    events = [json.loads(line) for line in first.stdout.splitlines() if line.startswith('{"event": "progress"')]
    assert events[-1]["progress"]["step"] == 3
    # Real tokens counted by the trainer become the rate in status.
    assert records[-2]["total_tokens"] > 0
    assert events[-1]["progress"]["tokensPerSecond"] > 0
    assert events[-1]["latestCheckpoint"] == str(output / "checkpoint-3")

    # Second run of the same job: resumes from checkpoint-3 and goes on at step 4.
    second = run(train_python, *command, "--set=max_steps=6")
    steps = [r["current_steps"] for r in LogTail(log).records() if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (output / "checkpoint-6" / "trainer_state.json").exists()

    adapter = output / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    assert adapter_config["lora_alpha"] == 16
    assert "q_a_proj" in adapter_config["target_modules"]
    change = float(run(train_python, str(ORACLE), "effect", str(tiny_model), str(adapter)).stdout.strip())
    assert change > 0

    # The same adapter for llama.cpp, beside the PEFT files and in status.adapter.
    reported = [json.loads(line) for line in second.stdout.splitlines() if line.startswith('{"event": "adapter"')]
    gguf = adapter / GGUF_ADAPTER_FILE
    assert reported[-1]["ggufSha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest(), reported[-1]
    assert "ggufError" not in reported[-1]
    check_loaded_by_llama_server(train_python, llamacpp, tiny_model, gguf, tmp_path)


def check_loaded_by_llama_server(train_python: str, llamacpp: Path, model: Path, gguf: Path, work: Path) -> None:
    """llama-server takes the adapter at start (scale 0) and lists it; asked for per request, it
    moves the model's log probabilities (a few steps of training need not change a greedy token)."""
    base = llamacpp_tools.convert_model(train_python, llamacpp, model, work / "base.gguf")
    with llamacpp_tools.server(llamacpp, base, [gguf], work / "llama-server.log") as url:
        listed = llamacpp_tools.http_json(f"{url}/lora-adapters")
        assert [(entry["id"], entry["path"], entry["scale"]) for entry in listed] == [(0, str(gguf), 0.0)]

        def logprobs(scale: float) -> list[float]:
            # Probabilities come with text only: bytes of an unfinished character are held back,
            # so several tokens are asked for.
            body = {"prompt": "hello", "n_predict": 8, "temperature": 0, "n_probs": 1, "ignore_eos": True}
            body.update(cache_prompt=False, lora=[{"id": 0, "scale": scale}])
            reply = llamacpp_tools.http_json(f"{url}/completion", body)
            return [float(p["logprob"]) for p in reply.get("completion_probabilities", [])]

        without = logprobs(0.0)
        assert without, "llama-server gave no probabilities"
        # One thread: the same request gives the same numbers, so a difference is the adapter's.
        assert logprobs(0.0) == without
        assert logprobs(1.0) != without


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(
    train_python: str, tiny_model: Path, tmp_path: Path
) -> None:
    """SIGKILL once a checkpoint is complete (as the OOM killer or a lost node would), then the retry:
    it goes on from the newest checkpoint whose trainer state was written, one step after it."""
    command, output = training_command(train_python, tiny_model, tmp_path)
    env = pod_env()
    with (tmp_path / "first.log").open("w") as sink:
        first = subprocess.Popen([train_python, *command, "--set=max_steps=100000"], stdout=sink, stderr=sink, env=env)
        try:
            deadline = time.monotonic() + 600
            while not (output / "checkpoint-3" / "trainer_state.json").exists():
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint-3 after 600 s"
                time.sleep(0.05)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert first.returncode == -signal.SIGKILL
    resumed = latest_checkpoint(output)
    assert resumed is not None
    step = int(resumed.name.removeprefix("checkpoint-"))
    log = output / "trainer_log.jsonl"
    earlier = LogTail(log)
    list(earlier.records())  # what the killed run logged
    assert not (output / "adapter").exists()

    second = run(train_python, *command, f"--set=max_steps={step + 2}")
    assert [r["current_steps"] for r in earlier.records() if "loss" in r] == [step + 1, step + 2]
    events = [json.loads(line) for line in second.stdout.splitlines() if line.startswith('{"event": "progress"')]
    assert events[-1]["progress"]["step"] == step + 2
    assert events[-1]["latestCheckpoint"] == str(output / f"checkpoint-{step + 2}")
    assert (output / "adapter" / "adapter_model.safetensors").exists()


def test_two_processes_train_one_run_and_export_one_adapter(
    train_python: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The default FineTuneJob's two GPUs: the pod's command launches one LLaMA-Factory process per
    GPU with the rendered FSDP2 configuration (here on the CPU, over gloo). Both join one run; the
    reporter and the export stay in the launching process."""
    command, output = training_command(train_python, tiny_model, tmp_path, processes=2)
    done = run(train_python, *command, "--set=max_steps=3")
    said = done.stdout + done.stderr
    # LLaMA-Factory's own line in each process.
    for rank in (0, 1):
        assert f"Process rank: {rank}, world size: 2, device: cpu" in said, said[-3000:]
    assert [r["current_steps"] for r in LogTail(output / "trainer_log.jsonl").records() if "loss" in r] == [1, 2, 3]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"event"')]
    assert [e["event"] for e in events].count("adapter") == 1
    assert events[-1]["event"] == "adapter"
    # LLaMA-Factory's "all" reaches every MLA projection, which a llama.cpp server would not apply.
    assert events[-1]["llamacppDroppedModules"] == ["kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj", "q_b_proj"]
    assert (output / "adapter" / "adapter_model.safetensors").exists()

    # A configuration LLaMA-Factory refuses, in the workers: the pod exits with the permanent code and its words.
    refused = run(train_python, *command, "--set=max_steps=3", "--set=cpu_infer=32", check=False)
    assert refused.returncode == 21, refused.stderr[-3000:]
    error = json.loads(refused.stderr.strip().splitlines()[-1])
    assert error["reason"] == "InvalidTrainingConfig"
    assert "cpu_infer" in error["message"]


def test_bad_dataset_fails_before_training(train_python: str, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "config").mkdir()
    proc = run(
        train_python,
        "-m",
        "kimi_operator.workloads.train.command",
        f"--config-dir={tmp_path / 'config'}",
        f"--dataset={data}",
        f"--output-dir={tmp_path / 'out'}",
        check=False,
    )
    assert proc.returncode == 20
    error = json.loads(proc.stderr.strip().splitlines()[-1])
    assert error["reason"] == "InvalidDataset"
    assert "line 1: messages: must end with an assistant turn" in error["message"]
    assert not (tmp_path / "out").exists()


def test_token_lengths_are_checked_with_the_models_tokenizer(
    train_python: str, tiny_model: Path, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    seed_dataset(train_python, data)
    proc = run(
        train_python,
        "-m",
        "kimi_operator",
        "validate-dataset",
        str(data),
        f"--tokenizer={tiny_model}",
        "--cutoff-len=12",
    )
    assert "24 records are longer than cutoffLen 12 and will be truncated: line 1 (" in proc.stdout
    roomy = run(
        train_python,
        "-m",
        "kimi_operator",
        "validate-dataset",
        str(data),
        f"--tokenizer={tiny_model}",
        "--cutoff-len=4096",
    )
    assert "longer than cutoffLen" not in roomy.stdout
