"""Qwen2.5-VL: window-attention ViT + 2x2 patch merger, 3-D multimodal rotary positions (mrope).

Traps this adapter guards against (transformers 5.x):
- Without `mm_token_type_ids` the model silently falls back to 1-D rotary positions for the whole prompt.
- The model caches `rope_deltas` on itself between calls; we compute positions explicitly instead, so a
  stale delta from an earlier request can never leak into a verification step.
- The vision tower lives at `model.model.visual`; its merger output (`pooler_output`) is what the LM consumes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_window_index

from massv.families.base import FamilyAdapter


class Qwen2_5_VLAdapter(FamilyAdapter):
    """Adapter for `Qwen2_5_VLForConditionalGeneration` targets (drafter: e.g. Qwen2.5-0.5B-Instruct)."""

    model_type = "qwen2_5_vl"
    image_input_names = ("pixel_values", "image_grid_thw")
    derived_input_names = ("mm_token_type_ids",)
    end_of_turn_token = "<|im_end|>"
    drafter_model_types = ("qwen2",)

    @property
    def image_block_token_ids(self) -> tuple[int, ...]:
        config = self.target_config
        return (int(config.vision_start_token_id), int(config.image_token_id), int(config.vision_end_token_id))

    def vision_modules(self, target: nn.Module) -> dict[str, nn.Module]:
        return {"visual": target.model.visual}

    def build_vision_modules(self) -> dict[str, nn.Module]:
        return {"visual": Qwen2_5_VisionTransformerPretrainedModel._from_config(self.target_config.vision_config)}

    def feature_dim(self, vision_feature: str) -> int:
        vision_config = self.target_config.vision_config
        if vision_feature == "projected":
            return int(vision_config.out_hidden_size)
        return int(vision_config.hidden_size) * int(vision_config.spatial_merge_size) ** 2

    def encode_image_features(
        self, vision_modules: dict[str, nn.Module], image_inputs: dict[str, torch.Tensor], kinds: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        visual = vision_modules["visual"]
        grid_thw = image_inputs["image_grid_thw"]
        pixel_values = image_inputs["pixel_values"].to(visual.dtype)
        outputs = visual(pixel_values, grid_thw=grid_thw)
        features = {}
        if "projected" in kinds:
            features["projected"] = outputs.pooler_output  # (num_merged_tokens, out_hidden_size), prompt order
        if "pre_merger" in kinds:
            features["pre_merger"] = self._pre_merger_features(visual, grid_thw, outputs.last_hidden_state)
        return features

    @staticmethod
    def _pre_merger_features(visual: nn.Module, grid_thw: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The merger's input in prompt order: `(num_merged_tokens, 4 * vision_hidden)`."""
        # last_hidden_state is in window order, 2x2 groups adjacent; concatenate each group as the merger does
        # and undo the window permutation so rows line up with the placeholder tokens.
        merge_unit = visual.spatial_merge_size**2
        grouped = hidden.reshape(-1, merge_unit * hidden.shape[-1])
        window_index, _ = get_vision_window_index(
            grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        return grouped[torch.argsort(window_index.to(grouped.device))]

    def target_image_kwargs(
        self, image_inputs: dict[str, torch.Tensor], projected_features: torch.Tensor
    ) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        grid_thw = image_inputs["image_grid_thw"]
        merge = self.target_config.vision_config.spatial_merge_size
        split_sizes = (grid_thw.prod(-1) // merge**2).tolist()
        per_image = torch.split(projected_features, split_sizes)
        return {
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=per_image)},
            "image_grid_thw": grid_thw,
        }

    def target_prefill_kwargs(
        self, input_ids: torch.Tensor, image_inputs: dict[str, torch.Tensor], target: nn.Module
    ) -> tuple[dict[str, Any], Any]:
        mm_token_type_ids = self.modality_type_ids(input_ids)
        if "image_grid_thw" in image_inputs:
            position_ids, rope_deltas = target.model.get_rope_index(
                input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_inputs["image_grid_thw"]
            )
        else:
            length = input_ids.shape[1]
            position_ids = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, 1, -1)
            rope_deltas = torch.zeros(1, 1, dtype=torch.long, device=input_ids.device)
        kwargs = {"position_ids": position_ids, "mm_token_type_ids": mm_token_type_ids}
        return kwargs, rope_deltas

    def decode_position_ids(self, position_state: Any, text_positions: torch.Tensor) -> torch.Tensor:
        # Text after the prompt advances all three rotary axes together, offset by the image's rope delta.
        rope_deltas = position_state.to(text_positions.device)
        return (text_positions.view(1, 1, -1) + rope_deltas.view(1, -1, 1)).expand(3, -1, -1)
