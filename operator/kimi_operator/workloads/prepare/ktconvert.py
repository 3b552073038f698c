"""Run kt-kernel's CPU weight converter on a node the prepare pod sees no GPU on.

The converter allocates its staging tensors with ``pin_memory=True``, which needs a CUDA driver;
the prepare pod asks for no GPU, so none is visible. Page-locking only speeds later GPU copies,
which a conversion never makes: without CUDA the flag is dropped, then the script runs unchanged.

    python -m kimi_operator.workloads.prepare.ktconvert CONVERTER.py [converter arguments...]
"""

from __future__ import annotations

import functools
import runpy
import sys
from collections.abc import Callable
from typing import Any


def _without_pinning(factory: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(factory)
    def call(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return call


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    import torch  # noqa: PLC0415 (only the prepare image has it)

    if not torch.cuda.is_available():
        for name in ("empty", "zeros", "ones", "full", "empty_like", "zeros_like"):
            setattr(torch, name, _without_pinning(getattr(torch, name)))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
