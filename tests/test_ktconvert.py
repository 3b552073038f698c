"""The kt-kernel converter launcher, run with the oracle environment's (CUDA-built) torch on a
machine without a GPU driver, where pinned allocations fail."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = """
import sys, torch
staging = torch.empty(4, 8, dtype=torch.bfloat16, pin_memory=True)
zeros = torch.zeros(16, pin_memory=True)
print("converted", sys.argv[1:], staging.shape[0] + zeros.shape[0])
"""


def run(oracle_python: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "operator"), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([oracle_python, *args], capture_output=True, text=True, check=False, env=env, timeout=300)


def test_pinned_allocations_fail_without_the_launcher(oracle_python: str, tmp_path: Path) -> None:
    script = tmp_path / "convert_cpu_weights.py"
    script.write_text(SCRIPT)
    direct = run(oracle_python, str(script), "--quant-method", "int8")
    assert direct.returncode != 0
    assert "pin" in direct.stderr.lower() or "nvidia" in direct.stderr.lower() or "cuda" in direct.stderr.lower()


def test_launcher_runs_the_script_with_its_arguments(oracle_python: str, tmp_path: Path) -> None:
    script = tmp_path / "convert_cpu_weights.py"
    script.write_text(SCRIPT)
    launched = run(
        oracle_python, "-m", "kimi_operator.workloads.prepare.ktconvert", str(script), "--quant-method", "int8"
    )
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.strip() == "converted ['--quant-method', 'int8'] 20"
