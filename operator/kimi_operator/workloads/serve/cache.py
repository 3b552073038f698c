"""The node-local adapter cache: one directory per adapter_model.safetensors sha256, shared by every
LoraServer whose model storage is on the node. A directory appears whole (built under a temporary
name, checked, then renamed) and its files are never changed afterwards, so an engine never reads a
partial adapter and a digest always names the same weights. The one change: a file an engine needs
that the first source lacked (a llama.cpp engine's adapter.gguf) is added when a later fetch of the
same weights carries it: written and synced under a temporary name, then hard-linked into the entry,
so it appears whole; a file already there is never replaced (two agents completing one entry: the
first link wins, the other's copy is dropped).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class Unavailable(Exception):
    """The files cannot be had here; the message says where they are and what to do."""


class WrongFile(Unavailable):
    """The source holds a file other than the one expected: fetching it again brings the same."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def materialise(
    cache: Path,
    expected: str | None,
    fetch: Callable[[Path], None],
    require: Sequence[str] = (),
    checked: Mapping[str, str] | None = None,
) -> Path:
    """The cache directory holding the adapter; ``fetch`` fills a temporary directory when it is
    not cached yet. With ``expected`` the files must have that digest before anything sees them.

    ``require``: files the engine needs besides the weights. An entry without one is fetched again
    and gets it from there if the source has it; the caller checks whether it is there now.
    ``checked``: file name -> the sha256 a fetched file of that name must have before it goes into
    the cache (a file the fetch did not bring is the caller's to report)."""
    if expected and _has(cache / expected, (WEIGHTS, *require)):
        return cache / expected
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
    try:
        fetch(staging)
        for required in (CONFIG, WEIGHTS):
            if not (staging / required).is_file():
                raise Unavailable(f"no {required} in the adapter's files")
        found = sha256_of(staging / WEIGHTS)
        if expected and found != expected:
            raise Unavailable(f"{WEIGHTS} has sha256 {found}, expected {expected}")
        for name, want in (checked or {}).items():
            if (staging / name).is_file() and (got := sha256_of(staging / name)) != want:
                raise WrongFile(
                    f"the adapter's source holds a {name} with sha256 {got}, expected {want} (the digest its "
                    f"export reported): its source has another {name} than the export wrote; export it again"
                )
        final = cache / found
        if final.exists():
            _add_missing(staging, final, require)
            return final
        try:
            os.replace(staging, final)
        except OSError:
            # Another agent on the node put the same files there first.
            if not (final / WEIGHTS).is_file():
                raise
            _add_missing(staging, final, require)
        return final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _has(entry: Path, names: Sequence[str]) -> bool:
    return all((entry / name).is_file() for name in names)


def _add_missing(staging: Path, entry: Path, names: Sequence[str]) -> None:
    """Add to an existing entry the files of ``names`` it lacks and a fetch of the same weights
    brought: each is synced, then hard-linked in, so it appears whole; one already there (another
    agent linked it first) is never replaced."""
    for name in names:
        staged = staging / name
        if not staged.is_file() or (entry / name).exists():
            continue
        with staged.open("rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(staged, entry / name)
        except FileExistsError:
            continue  # another agent completed the entry first: its file stays


def unavailable(message: str) -> Callable[[Path], None]:
    """A fetch that cannot succeed, with why."""

    def fetch(target: Path) -> None:
        raise Unavailable(message)

    return fetch


def within(root: Path, relative: str) -> Path:
    """``root / relative``, refusing a path that would leave ``root`` (absolute, or with '..'):
    the path comes from status that a workload pod writes."""
    target = (root / relative).resolve()
    if not relative or relative.startswith("/") or not target.is_relative_to(root.resolve()):
        raise Unavailable(f"{relative!r} is not a path inside {root}")
    return target


def copy_from(source: Path, *, node_hint: str | None) -> Callable[[Path], None]:
    """A fetch that copies an adapter directory present on this node."""

    def fetch(target: Path) -> None:
        if not source.is_dir():
            if node_hint is None:
                raise Unavailable(f"{source} does not exist")
            raise Unavailable(
                f"{source} is not on this node (it is on node {node_hint}): publish it to a shared volume (the "
                "FineTuneJob's spec.output.publish, named in this LoraServer's spec.adapterStore) or to a hub "
                "repository (huggingFace)"
            )
        for item in source.iterdir():
            if item.is_file():
                shutil.copyfile(item, target / item.name)

    return fetch
