"""Which planned adapter each adapter file of a llama-server is (pure).

llama-server knows its adapters only by the files of its command line, which the operator renders
as ``<cache>/<sha256>/adapter.gguf``: the node cache names each entry by the digest of the
adapter's weights, so the directory holding a file says which adapter it is (the router reads the
files the same way).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from kimi_operator.api.serving import GGUF_ADAPTER_FILE

# Said of an adapter whose files cannot be served by a llama.cpp engine.
NO_GGUF = (
    f"the adapter's files have no {GGUF_ADAPTER_FILE}, the only form a llama.cpp engine loads: a FineTuneJob's "
    f"export writes it; a path or huggingFace adapter must carry it beside adapter_model.safetensors (llama.cpp's "
    "convert_lora_to_gguf.py makes it)"
)


def adapters_of_files(files: Iterable[str], digests: Mapping[str, str], cache_dir: Path) -> dict[str, str]:
    """Adapter name -> the cache entry its file was loaded from, for each planned adapter
    (``digests``: name -> sha256 of its weights) whose entry in ``cache_dir`` holds a listed file.

    A file outside the cache, or in the entry of no planned adapter (the server started from an
    older plan), names nothing: only files the agent checked against their digest count."""
    entries = {Path(f).parent for f in files if f}
    return {name: str(cache_dir / sha) for name, sha in digests.items() if cache_dir / sha in entries}
