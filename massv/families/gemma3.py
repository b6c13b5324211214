"""Gemma3: SigLIP vision tower + average-pool/RMSNorm/linear projector, bidirectional attention over images.

Traps this adapter guards against (transformers 5.x):
- Without `token_type_ids` the prompt pass silently uses a causal mask over image tokens instead of the
  bidirectional one Gemma3 was trained with, so logits drift from `generate()`'s.
- The VLM's soft image token (262144 in the real checkpoints) is outside the 1b/270m text models'
  embedding; the drafter replaces it before the lookup (see `FamilyAdapter.drafter_safe_input_ids`).
- The vision tower lives at `model.model.vision_tower`, the projector at `model.model.multi_modal_projector`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

from massv.families.base import FamilyAdapter


class Gemma3Adapter(FamilyAdapter):
    """Adapter for `Gemma3ForConditionalGeneration` targets (drafter: e.g. Gemma-3-1b-it or Gemma-3-270m)."""

    model_type = "gemma3"
    image_input_names = ("pixel_values",)
    derived_input_names = ("token_type_ids",)
    end_of_turn_token = "<end_of_turn>"
    drafter_model_types = ("gemma3_text", "gemma3")

    @property
    def image_block_token_ids(self) -> tuple[int, ...]:
        config = self.target_config
        return (int(config.boi_token_id), int(config.image_token_id), int(config.eoi_token_id))

    @property
    def tokens_per_image(self) -> int:
        """Soft tokens per image (256 in the real checkpoints): fixed, unlike Qwen2.5-VL's."""
        return int(self.target_config.mm_tokens_per_image)

    def vision_modules(self, target: nn.Module) -> dict[str, nn.Module]:
        return {"vision_tower": target.model.vision_tower, "multi_modal_projector": target.model.multi_modal_projector}

    def build_vision_modules(self) -> dict[str, nn.Module]:
        return {
            "vision_tower": AutoModel.from_config(self.target_config.vision_config),
            "multi_modal_projector": Gemma3MultiModalProjector(self.target_config),
        }

    def feature_dim(self, vision_feature: str) -> int:
        if vision_feature == "projected":
            return int(self.target_config.text_config.hidden_size)
        return int(self.target_config.vision_config.hidden_size)

    def encode_image_features(
        self, vision_modules: dict[str, nn.Module], image_inputs: dict[str, torch.Tensor], kinds: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        tower, projector = vision_modules["vision_tower"], vision_modules["multi_modal_projector"]
        pixel_values = image_inputs["pixel_values"].to(tower.dtype)
        patch_states = tower(pixel_values=pixel_values).last_hidden_state  # (images, patches, vision_hidden)
        features = {}
        for kind in kinds:
            if kind == "projected":
                per_image = projector(patch_states)  # (images, tokens_per_image, text_hidden)
            else:
                per_image = self._pool_to_image_tokens(projector, patch_states)
            features[kind] = per_image.reshape(-1, per_image.shape[-1])
        return features

    @staticmethod
    def _pool_to_image_tokens(projector: Gemma3MultiModalProjector, patch_states: torch.Tensor) -> torch.Tensor:
        """SigLIP patches pooled onto the image-token grid, without the target's norm and projection."""
        batch, _, hidden = patch_states.shape
        side = projector.patches_per_image
        grid = patch_states.transpose(1, 2).reshape(batch, hidden, side, side)
        return projector.avg_pool(grid).flatten(2).transpose(1, 2)

    def target_image_kwargs(
        self, image_inputs: dict[str, torch.Tensor], projected_features: torch.Tensor
    ) -> dict[str, Any]:
        per_image = projected_features.reshape(-1, self.tokens_per_image, projected_features.shape[-1])
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=per_image)}}

    def target_prefill_kwargs(
        self, input_ids: torch.Tensor, image_inputs: dict[str, torch.Tensor], target: nn.Module
    ) -> tuple[dict[str, Any], Any]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return {"token_type_ids": self.modality_type_ids(input_ids), "position_ids": positions}, None

    def decode_position_ids(self, position_state: Any, text_positions: torch.Tensor) -> torch.Tensor:
        # Text tokens after the prompt: plain causal attention, so no token_type_ids (as generate() does).
        return text_positions.view(1, -1)
