"""One quantization of a GGUF repository: which of its files are that quantization, and which file
llama.cpp is pointed at.

GGUF repositories (the guide's unsloth/Kimi-K2.5-GGUF among them) keep a large quantization in a
directory of its own, split into ``<name>-<QUANT>-00001-of-0000N.gguf`` parts, and a small one as a
single ``<name>-<QUANT>.gguf`` file at the top. llama.cpp is given the first part and finds the
others beside it by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kimi_operator.api.exitcodes import PrepareExit
from kimi_operator.workloads.hub import RemoteFile
from kimi_operator.workloads.termination import WorkloadError

# "<name>-<QUANT>[-00001-of-00005].gguf": the quantization is the last dash-separated part without a
# dot (a name such as Kimi-K2.5 keeps its own), with unsloth's "UD-" prefix when present.
_SINGLE = re.compile(r"^.+?-(?P<quant>(?:UD-)?[A-Za-z0-9_]+)(?:-\d{5}-of-\d{5})?\.gguf$")
_FIRST_SPLIT = re.compile(r"-00001-of-\d{5}\.gguf$")


def _quantization(path: str) -> str | None:
    """The quantization a repository file belongs to, or None for anything that is not model weights
    (a multimodal projector, a README, a file of another format)."""
    if not path.endswith(".gguf") or "mmproj" in path.rsplit("/", 1)[-1]:
        return None
    if "/" in path:
        return path.split("/", 1)[0]
    match = _SINGLE.match(path)
    return match["quant"] if match else None


def quantizations(paths: Iterable[str]) -> list[str]:
    """Every quantization the repository holds, sorted."""
    return sorted({q for q in map(_quantization, paths) if q is not None})


def select(repo: str, files: list[RemoteFile], quantization: str) -> list[RemoteFile]:
    """The files of ``quantization``; a repository without it is refused with the ones it has."""
    chosen = [f for f in files if _quantization(f.path) == quantization]
    if not chosen:
        held = quantizations(f.path for f in files)
        raise WorkloadError(
            PrepareExit.QUANTIZATION_NOT_FOUND,
            f"{repo} has no quantization {quantization!r}; it has: {', '.join(held) or 'no GGUF files'}",
        )
    return chosen


def entry(files: list[RemoteFile]) -> str:
    """The file llama.cpp loads: the first split part, or the one file. Relative to the repository."""
    paths = sorted(f.path for f in files)
    first = [p for p in paths if _FIRST_SPLIT.search(p)]
    if len(first) == 1:
        return first[0]
    if len(paths) == 1:
        return paths[0]
    raise WorkloadError(
        PrepareExit.QUANTIZATION_NOT_FOUND,
        f"the quantization's files are neither one file nor one set of split parts: {', '.join(paths)}",
    )
