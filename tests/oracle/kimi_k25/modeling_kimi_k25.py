"""Kimi K2.5's model, as small as the tests' tiny models need (our own code, shipped beside the tiny
checkpoint and loaded with ``trust_remote_code``, as Kimi's own files are).

The weights are named as Kimi K2.5's: ``language_model.model.*`` and ``language_model.lm_head`` (a
DeepSeek-V3, transformers' own, which does all the text work), ``vision_tower.*`` (a MoonViT's
patch embedding and encoder blocks) and ``mm_projector.*``. The tiny models are text only: the
vision weights are there to be carried through download, conversion and export, not run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DeepseekV3ForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_kimi_k25 import KimiK25Config, KimiK25VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, config: KimiK25VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, config.vt_hidden_size, kernel_size=config.patch_size, stride=config.patch_size)


class EncoderBlock(nn.Module):
    def __init__(self, config: KimiK25VisionConfig) -> None:
        super().__init__()
        dim = config.vt_hidden_size
        self.norm0 = nn.LayerNorm(dim)
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.wo = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc0 = nn.Linear(dim, config.vt_intermediate_size)
        self.fc1 = nn.Linear(config.vt_intermediate_size, dim)


class VisionTower(nn.Module):
    def __init__(self, config: KimiK25VisionConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.vt_num_hidden_layers))


class Projector(nn.Module):
    def __init__(self, config: KimiK25VisionConfig, text_hidden: int) -> None:
        super().__init__()
        merged = config.vt_hidden_size * config.merge_kernel_size[0] * config.merge_kernel_size[1]
        self.pre_norm = nn.LayerNorm(config.vt_hidden_size)
        self.linear_1 = nn.Linear(merged, config.mm_hidden_size)
        self.linear_2 = nn.Linear(config.mm_hidden_size, text_hidden)


class KimiK25ForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = KimiK25Config
    config: KimiK25Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV3DecoderLayer"]  # noqa: RUF012 (transformers' class attributes)
    _supports_sdpa = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]  # noqa: RUF012 (transformers' class attributes)

    def __init__(self, config: KimiK25Config) -> None:
        super().__init__(config)
        self.vision_tower = VisionTower(config.vision_config)
        self.mm_projector = Projector(config.vision_config, config.text_config.hidden_size)
        self.language_model = DeepseekV3ForCausalLM(config.text_config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, PreTrainedModel) and module is not self:
            module.init_weights()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if pixel_values is not None:
            raise NotImplementedError("the tiny Kimi K2.5 model is text only")
        output: CausalLMOutputWithPast = self.language_model(input_ids=input_ids, **kwargs)
        return output
