"""Kimi K2.5's configuration, as small as the tests' tiny models need (our own code, shipped beside
the tiny checkpoint and loaded with ``trust_remote_code``, as Kimi's own files are).

K2.5 wraps a DeepSeek-V3 language model (``text_config``, whose file says ``model_type: kimi_k2``)
and a MoonViT vision encoder (``vision_config``).
"""

from __future__ import annotations

from typing import Any

from transformers import DeepseekV3Config, PretrainedConfig


class KimiK25VisionConfig(PretrainedConfig):
    model_type = "kimi_k25_vision"

    def __init__(
        self,
        patch_size: int = 14,
        vt_hidden_size: int = 32,
        vt_num_attention_heads: int = 2,
        vt_num_hidden_layers: int = 1,
        vt_intermediate_size: int = 64,
        merge_kernel_size: list[int] | None = None,
        mm_hidden_size: int = 32,
        **kwargs: Any,
    ) -> None:
        self.patch_size = patch_size
        self.vt_hidden_size = vt_hidden_size
        self.vt_num_attention_heads = vt_num_attention_heads
        self.vt_num_hidden_layers = vt_num_hidden_layers
        self.vt_intermediate_size = vt_intermediate_size
        self.merge_kernel_size = list(merge_kernel_size or [2, 2])
        self.mm_hidden_size = mm_hidden_size
        super().__init__(**kwargs)


class KimiK25Config(PretrainedConfig):
    model_type = "kimi_k25"
    sub_configs = {"text_config": DeepseekV3Config, "vision_config": KimiK25VisionConfig}  # noqa: RUF012 (transformers' class attributes)

    def __init__(
        self,
        text_config: dict[str, Any] | DeepseekV3Config | None = None,
        vision_config: dict[str, Any] | KimiK25VisionConfig | None = None,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(text_config, dict):
            fields = dict(text_config)
            # The file says kimi_k2, as Kimi's does; the object keeps transformers' deepseek_v3:
            # transformers finds the conversion of per-expert weights to its fused experts by it.
            self.text_model_type = fields.pop("model_type", DeepseekV3Config.model_type)
            text_config = DeepseekV3Config(**fields)
        self.text_config = text_config if text_config is not None else DeepseekV3Config()
        if isinstance(vision_config, dict):
            vision_config = KimiK25VisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        self.vision_config = vision_config if vision_config is not None else KimiK25VisionConfig()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        text_model_type = out.pop("text_model_type", None)
        if text_model_type and isinstance(out.get("text_config"), dict):
            out["text_config"]["model_type"] = text_model_type
        return out
