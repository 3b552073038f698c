"""Which trained modules a llama.cpp server would drop (render.llamacpp), from what the llama.cpp
recipe measured on a DeepSeek-V3-shaped model: token-exact where applied, no effect or no
conversion where dropped."""

from __future__ import annotations

import pytest

from kimi_operator.render import llamacpp

ATTENTION = "base_model.model.model.layers.{}.self_attn.{}"
MLP = "base_model.model.model.layers.{}.mlp.{}"


@pytest.mark.parametrize(
    ("modules", "dropped"),
    [
        # What llama.cpp applies: o_proj, the dense layer's and the shared experts' MLP.
        (
            [ATTENTION.format(0, "o_proj"), MLP.format(0, "gate_proj"), MLP.format(1, "shared_experts.down_proj")],
            [],
        ),
        # LLaMA-Factory's "all" on the Kimi shape: every MLA projection is lost, one of them unconvertible.
        (
            [ATTENTION.format(i, m) for i in (0, 1) for m in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa")]
            + [ATTENTION.format(0, "kv_b_proj"), ATTENTION.format(0, "o_proj")],
            ["kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj", "q_b_proj"],
        ),
        # Routed-expert LoRA (kt-kernel's, converted per expert for SGLang): reported once, as experts.
        ([MLP.format(1, f"experts.{e}.{p}") for e in (0, 7) for p in ("gate_proj", "down_proj")], ["experts"]),
        # A module never seen to take effect is not assumed to.
        ([ATTENTION.format(0, "q_proj")], ["q_proj"]),
        ([], []),
    ],
)
def test_dropped_modules(modules: list[str], dropped: list[str]) -> None:
    assert llamacpp.dropped_modules(modules) == dropped


def test_every_dropped_kind_has_a_reason() -> None:
    assert "cannot convert" in llamacpp.why("kv_b_proj")
    assert "ignores" in llamacpp.why("q_a_proj")
    assert "not a module" in llamacpp.why("q_proj")


def test_the_server_starts_with_every_adapter_at_scale_zero_and_the_guides_defaults() -> None:
    args = llamacpp.server_args(
        llamacpp.ServerOptions(model="/m/UD-TQ1_0/k-00001-of-00005.gguf", alias="kimi-k2.5", adapters=("/c/a", "/c/b"))
    )
    assert args[:4] == ["-m", "/m/UD-TQ1_0/k-00001-of-00005.gguf", "--alias", "kimi-k2.5"]
    # Never --lora-init-without-apply: a request without a lora list would run every adapter at 1.
    assert args[args.index("--lora-scaled") + 1] == "/c/a:0,/c/b:0"
    assert "--lora-init-without-apply" not in args
    assert "--cpu-moe" in args
    # The whole context is shared out among the slots: each request gets the 16k asked for.
    assert [args[args.index(flag) + 1] for flag in ("-c", "-np")] == [str(16384 * 4), "4"]
    assert [args[args.index(flag) + 1] for flag in ("--temp", "--top-p", "--min-p")] == ["1.0", "0.95", "0.01"]
    some = llamacpp.server_args(llamacpp.ServerOptions(model="/m", alias="k", cpu_moe_layers=20, threads=8))
    assert some[some.index("--n-cpu-moe") + 1] == "20"
    assert some[some.index("-t") + 1] == "8"
    assert "--lora-scaled" not in some
    with pytest.raises(ValueError, match="cannot carry"):
        llamacpp.server_args(llamacpp.ServerOptions(model="/m", alias="k", adapters=("/c/a,b",)))
    with pytest.raises(ValueError, match="splits --alias"):
        llamacpp.server_args(llamacpp.ServerOptions(model="/m", alias="a,b"))
