"""Helpers for tests on checkpoints: the oracle script and index reading."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ORACLE_SCRIPT = Path(__file__).parent / "oracle" / "kimi_checkpoint.py"


def run_oracle(oracle_python: str, *args: str) -> str:
    proc = subprocess.run(
        [oracle_python, str(ORACLE_SCRIPT), *args], capture_output=True, text=True, check=False, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def load_index(model: Path) -> dict[str, str]:
    weight_map: dict[str, str] = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    return weight_map
