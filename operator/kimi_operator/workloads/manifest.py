"""Completion manifests: what a finished variant holds, and the check that it still does.

A variant directory is complete when its ``manifest.json`` exists; it is written last, under a
temporary name, after every file it lists. It records the revision, every file with its size and
sha256, and the versions of the tools that produced it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kimi_operator import __version__
from kimi_operator.api.conditions import now_rfc3339
from kimi_operator.workloads.safetensors_io import digest_path

MANIFEST = "manifest.json"
_SKIP_SUFFIXES = (".partial", ".sha256")


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    """The digest recorded while the file was written, else computed now."""
    recorded = digest_path(path)
    if recorded.exists():
        return recorded.read_text().strip()
    return sha256_file(path)


def listed_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(_SKIP_SUFFIXES) and not p.name.startswith(".")
    )


def write(
    root: Path,
    *,
    variant: str,
    revision: str | None,
    tools: Mapping[str, str] | None = None,
    entry: str | None = None,
) -> dict[str, Any]:
    """Mark ``root`` complete. ``entry``: the file a server is pointed at, relative to ``root``."""
    files = [
        {"path": str(p.relative_to(root)), "size": p.stat().st_size, "sha256": _file_digest(p)}
        for p in listed_files(root)
    ]
    manifest = {
        "variant": variant,
        "revision": revision,
        "files": files,
        "tools": {"kimi-operator": __version__, "python": platform.python_version(), **(tools or {})},
        "created": now_rfc3339(),
        **({"entry": entry} if entry is not None else {}),
    }
    partial = root / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    partial.rename(root / MANIFEST)
    return manifest


def read(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def verify(root: Path, *, deep: bool = True) -> list[str]:
    """Problems with a completed variant: missing manifest, missing, resized or (deep) altered files."""
    manifest = read(root)
    if manifest is None:
        return [f"{root}: no {MANIFEST}: the variant was never completed"]
    problems = []
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.exists():
            problems.append(f"{path}: listed in {MANIFEST} but missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['size']}")
        elif deep and sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from {MANIFEST}")
    return problems
