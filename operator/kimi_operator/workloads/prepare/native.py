"""The compiled INT4 -> BF16 kernel: built from ``native/dequant_int4.c`` on first use.

Built on the machine that runs it (``-march=native``: the prepare Job runs on the node that holds
the weights), cached by source and compiler flags, loaded with ctypes. ctypes releases the GIL, so
threads over row ranges use every core. Without a C compiler (or when the build fails) the kernel
raises NativeUnavailable, and the converter uses the numpy path instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "dequant_int4.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fno-strict-aliasing")


class NativeUnavailable(RuntimeError):
    """No compiler, or the build failed; the message says why."""


def _cache_dir() -> Path:
    base = os.environ.get("KIMI_OPERATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "kimi-operator"
    )
    return Path(base) / "native"


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise NativeUnavailable("no C compiler (cc/gcc) on PATH")
    try:
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
        target = _cache_dir() / f"dequant_int4-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            proc = subprocess.run(
                [compiler, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                detail = proc.stderr.strip()[-2000:] or f"exit status {proc.returncode}"
                raise NativeUnavailable(f"{compiler} failed: {detail}")
            partial.rename(target)
    except OSError as exc:
        # CC naming a missing or non-executable file, an unreadable source, an unwritable cache.
        raise NativeUnavailable(f"cannot build with {compiler}: {exc}") from exc
    return target


_LIB: Any = None
# The converter's threads all ask for the kernel at once: one of them builds it.
_LIB_LOCK = threading.Lock()


def kernel() -> Any:
    """The loaded kernel function, building it if needed; NativeUnavailable when it cannot be had."""
    global _LIB  # noqa: PLW0603 (one shared library per process)
    with _LIB_LOCK:
        if _LIB is None:
            path = _build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                # Not kept in the cache: the next run builds it again rather than fail the same way.
                with contextlib.suppress(OSError):
                    path.unlink()
                raise NativeUnavailable(f"cannot load {path}: {exc}") from exc
            fn = lib.kimi_dequant_int4_rows
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4
            _LIB = fn
    return _LIB


def dequantize_rows(
    packed: np.ndarray[Any, Any],
    scale_bits: np.ndarray[Any, Any],
    out: np.ndarray[Any, Any],
    *,
    cols: int,
    group_size: int,
    rows: tuple[int, int],
) -> None:
    """Fill ``out[rows[0]:rows[1]]`` (uint16 bf16 bits); arrays must be C-contiguous and validated."""
    kernel()(packed.ctypes.data, scale_bits.ctypes.data, out.ctypes.data, cols, group_size, rows[0], rows[1])
