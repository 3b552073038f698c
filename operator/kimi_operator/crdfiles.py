"""Write the generated CRDs to ``crds/`` and the Helm chart, or check that they are current."""

from __future__ import annotations

from pathlib import Path

import yaml

from kimi_operator.api.crd import crd
from kimi_operator.api.kinds import KINDS

HEADER = "# Generated from operator/kimi_operator/api by `make crds`. Do not edit.\n"


def rendered() -> dict[str, str]:
    """File name -> YAML text for every CRD."""
    return {f"{k.crd_name}.yaml": HEADER + yaml.safe_dump(crd(k), sort_keys=False, width=100) for k in KINDS}


def write(directories: list[Path]) -> list[Path]:
    written = []
    files = rendered()
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.yaml"):
            if stale.name not in files:
                stale.unlink()
        for name, text in files.items():
            path = directory / name
            tmp = path.with_suffix(".yaml.tmp")
            tmp.write_text(text)
            tmp.rename(path)
            written.append(path)
    return written


def stale(directories: list[Path]) -> list[str]:
    """Why each directory differs from the generated CRDs; empty when all are current."""
    problems = []
    files = rendered()
    for directory in directories:
        present = {p.name for p in directory.glob("*.yaml")} if directory.exists() else set()
        for name in sorted(present - files.keys()):
            problems.append(f"{directory / name}: not generated from the models (remove it)")
        for name, text in files.items():
            path = directory / name
            if not path.exists():
                problems.append(f"{path}: missing")
            elif path.read_text() != text:
                problems.append(f"{path}: differs from the models")
    return problems
