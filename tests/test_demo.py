"""What `make run`'s demo does to the journey overlay before it applies it: the API models accept
every object, the hub's address reaches both of the KimiModel's sources, each repository is
published from its built directory, and without llama.cpp its parts are left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from kimi_operator.api.finetunejob import FineTuneJobSpec
from kimi_operator.api.kimimodel import KimiModelSpec
from kimi_operator.api.loraserver import LoraServerSpec
from kimi_operator.devcluster import demo
from kimi_operator.devcluster.paths import repo_root
from kimi_operator.render import llamacpp
from kimi_operator.workloads.prepare import gguf

SPECS = {"KimiModel": KimiModelSpec, "FineTuneJob": FineTuneJobSpec, "LoraServer": LoraServerSpec}
OVERLAY = repo_root() / demo.MANIFESTS
HUB = "http://127.0.0.1:43210"


def test_the_overlay_is_valid_and_pointed_at_the_hub() -> None:
    docs = demo.manifests(OVERLAY, HUB)
    for doc in docs:
        if doc["kind"] in SPECS:
            SPECS[doc["kind"]].model_validate(doc["spec"])
    (model,) = [d for d in docs if d["kind"] == "KimiModel"]
    assert model["spec"]["source"]["huggingFace"]["endpoint"] == HUB
    assert model["spec"]["gguf"]["huggingFace"]["endpoint"] == HUB
    # The file the demo builds is the quantization the KimiModel asks for, as its prepare Job reads it.
    assert gguf.quantizations([demo.GGUF_FILE]) == [model["spec"]["gguf"]["quantization"]]
    # The fine-tune trains only what llama.cpp applies: its llama.cpp LoraServer serves all of it.
    (job,) = [d for d in docs if d["kind"] == "FineTuneJob"]
    assert llamacpp.dropped_modules(job["spec"]["lora"]["targetModules"]) == []
    engines = sorted((d["spec"].get("engine") or {}).get("type", "sglang") for d in docs if d["kind"] == "LoraServer")
    assert engines == ["llamacpp", "sglang"]


def test_each_repository_is_published_from_its_directory(tmp_path: Path) -> None:
    docs = demo.manifests(OVERLAY)
    built = demo.Built(checkpoint=tmp_path / "int4", gguf=tmp_path / "gguf")
    assert demo.repositories(docs, built) == {"local/tiny-kimi": built.checkpoint, "local/tiny-kimi-GGUF": built.gguf}
    with pytest.raises(RuntimeError, match="no GGUF was built"):
        demo.repositories(docs, demo.Built(checkpoint=built.checkpoint, gguf=None))


def test_without_llamacpp_the_gguf_and_its_server_are_left_out(tmp_path: Path) -> None:
    docs = demo.manifests(OVERLAY)
    kept = demo.without_llamacpp(docs)
    (model,) = [d for d in kept if d["kind"] == "KimiModel"]
    assert "gguf" not in model["spec"]
    assert model["spec"]["variants"] == ["bf16", "native-int4"]
    assert [d["metadata"]["name"] for d in kept if d["kind"] == "LoraServer"] == ["tiny-kimi-sglang"]
    for doc in kept:
        if doc["kind"] in SPECS:
            SPECS[doc["kind"]].model_validate(doc["spec"])
    built = demo.Built(checkpoint=tmp_path / "int4", gguf=None)
    assert demo.repositories(kept, built) == {"local/tiny-kimi": built.checkpoint}
    # The overlay as read is left as it was.
    assert any(d["kind"] == "LoraServer" and d["metadata"]["name"] == "tiny-kimi-llamacpp" for d in docs)
