"""llama.cpp's own converters (HF model -> GGUF, PEFT adapter -> GGUF), run from its source.

    python gguf_convert.py LLAMA_SRC model MODEL_DIR OUT.gguf
    python gguf_convert.py LLAMA_SRC lora ADAPTER_DIR MODEL_DIR OUT.gguf

The tests' tiny tokenizer is trained here, so convert_hf_to_gguf.py does not know the hash of its
pre-tokenizer and refuses it; only in that case the byte-level one ("gpt-2", what
``pre_tokenizers.ByteLevel`` is) is named for it. Everything else is the converters' own work, at
f32, so llama.cpp's greedy tokens can be compared with transformers' exactly.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    src, kind, *rest = argv
    sys.path[:0] = [src, str(Path(src) / "gguf-py")]
    from conversion import base  # type: ignore[import-not-found]  # noqa: PLC0415 (llama.cpp's package)

    known = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(known(self, tokenizer))
        except NotImplementedError:
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    if kind == "model":
        model, out = rest
        args = [model, "--outfile", out, "--outtype", "f32"]
        script = "convert_hf_to_gguf.py"
    else:
        adapter, model, out = rest
        args = [adapter, "--base", model, "--outfile", out, "--outtype", "f32"]
        script = "convert_lora_to_gguf.py"
    sys.argv = [script, *args]
    runpy.run_path(str(Path(src) / script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
