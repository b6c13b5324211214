"""What every VLM family adapter must know, so the drafter and the engine stay family-agnostic.

A family adapter is the only place that knows where a target VLM keeps its vision encoder, which image
placeholder token it uses, which extra inputs its forward needs (and silently misbehaves without), and how
its positions advance during decoding. Adding a family is one new file that subclasses `FamilyAdapter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

# Which vision output the drafter consumes.
#   "projected": the target's own image embeddings, already in the target LM's space (Qwen2.5-VL: patch-merger
#                output; Gemma3: multi-modal projector output). Default: one vision pass serves both the target
#                and the drafter at generation time, and these features already carry the target's alignment.
#   "pre_merger": the vision transformer's output before the target's own projection (Qwen2.5-VL: the 2x2
#                 patch groups concatenated, as the merger sees them; Gemma3: SigLIP output average-pooled to the
#                 image token grid). Costs a little extra work per request but keeps the drafter independent
#                 of the target LM's embedding space.
VISION_FEATURE_CHOICES = ("projected", "pre_merger")


class FamilyAdapter(ABC):
    """Family-specific knowledge about one target VLM architecture, bound to that target's config."""

    model_type: ClassVar[str]
    # Names of the processor outputs that carry the image (passed through to the vision encoder).
    image_input_names: ClassVar[tuple[str, ...]]
    # Processor outputs the adapter rebuilds from `input_ids` itself (token-type ids), so ignoring them is safe.
    derived_input_names: ClassVar[tuple[str, ...]] = ()
    # Token that closes a chat turn; answers in training data end with it.
    end_of_turn_token: ClassVar[str]
    # `model_type`s of causal LMs that share this family's tokenizer, hence can draft for its targets.
    drafter_model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, target_config: PretrainedConfig) -> None:
        self.target_config = target_config

    # ---- tokens -------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        """The id repeated once per image feature in the prompt; features are spliced in at these positions."""
        return int(self.target_config.image_token_id)

    @property
    @abstractmethod
    def image_block_token_ids(self) -> tuple[int, ...]:
        """Ids that make up an image block (start, placeholder, end); a text-only drafter never sees them."""

    @property
    def target_vocab_size(self) -> int:
        """Rows of the target LM head; may exceed the tokenizer's real vocabulary (padding)."""
        return int(self.target_config.get_text_config().vocab_size)

    # ---- vision -------------------------------------------------------------------------------------
    @abstractmethod
    def vision_modules(self, target: nn.Module) -> dict[str, nn.Module]:
        """The target's vision submodules (shared by reference, never copied) that produce drafter features."""

    @abstractmethod
    def build_vision_modules(self) -> dict[str, nn.Module]:
        """Fresh, randomly initialised vision submodules from the target config, for loading a saved copy."""

    @abstractmethod
    def feature_dim(self, vision_feature: str) -> int:
        """Width of one image feature vector for the chosen `vision_feature`."""

    def encode_images(
        self, vision_modules: dict[str, nn.Module], image_inputs: dict[str, torch.Tensor], vision_feature: str
    ) -> torch.Tensor:
        """Run the frozen vision encoder once: `(num_image_tokens_total, feature_dim)` in prompt order."""
        return self.encode_image_features(vision_modules, image_inputs, (vision_feature,))[vision_feature]

    @abstractmethod
    def encode_image_features(
        self, vision_modules: dict[str, nn.Module], image_inputs: dict[str, torch.Tensor], kinds: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        """Every requested kind of `VISION_FEATURE_CHOICES` from ONE vision-tower pass, keyed by kind.

        The engine needs the projected features for the target and may need pre-merger features for a
        drafter; asking for both at once is what keeps the tower to a single pass per request.
        """

    @abstractmethod
    def target_image_kwargs(
        self, image_inputs: dict[str, torch.Tensor], projected_features: torch.Tensor
    ) -> dict[str, Any]:
        """Keyword arguments that hand precomputed projected features to the target's forward.

        This is what lets the engine run the vision encoder once per request and share it with the drafter.
        """

    # ---- target forward ----------------------------------------------------------------------------
    @abstractmethod
    def target_prefill_kwargs(
        self, input_ids: torch.Tensor, image_inputs: dict[str, torch.Tensor], target: nn.Module
    ) -> tuple[dict[str, Any], Any]:
        """Extra forward kwargs for the prompt pass, plus the state needed to place later tokens.

        Returns `(kwargs, position_state)`. The kwargs include the inputs whose absence makes the family
        silently wrong (Qwen2.5-VL: `mm_token_type_ids`; Gemma3: `token_type_ids`).
        """

    @abstractmethod
    def decode_position_ids(self, position_state: Any, text_positions: torch.Tensor) -> torch.Tensor:
        """The forward's `position_ids` for text tokens at 1-D sequence positions `text_positions: (k,)`.

        Positions are explicit (not "the next k after the cache") so a tree of drafts can give siblings the
        same position. The result lies on `text_positions.device`.
        """

    def target_decode_kwargs(self, position_state: Any, text_positions: torch.Tensor) -> dict[str, Any]:
        """Extra forward kwargs for text tokens at `text_positions` (on the model's device) after the prompt."""
        return {"position_ids": self.decode_position_ids(position_state, text_positions)}

    def modality_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 for text, 1 for image placeholders: the token types both families' forwards expect."""
        return (input_ids == self.image_token_id).to(torch.int64)

    # ---- drafter input ------------------------------------------------------------------------------
    def drafter_safe_input_ids(self, input_ids: torch.Tensor, drafter_vocab_size: int) -> torch.Tensor:
        """Replace image placeholders by a valid id before the drafter's embedding lookup.

        Gemma3's soft image token (262144) lies outside the 1b/270m text models' 262144-row embedding; the
        features replace those rows anyway, so any in-range id is correct and avoids an index error.
        """
        safe_ids = input_ids.clone()
        safe_ids[input_ids == self.image_token_id] = 0
        if bool((safe_ids >= drafter_vocab_size).any()):
            bad = sorted(set(safe_ids[safe_ids >= drafter_vocab_size].tolist()))[:5]
            raise ValueError(
                f"token ids {bad} are outside the drafter's {drafter_vocab_size}-row embedding; the target and "
                "drafter tokenizers do not match (see massv.vocab.check_tokenizer_compatibility)"
            )
        return safe_ids

    def strip_image_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt as a text-only drafter sees it: the image block removed (batch size 1)."""
        keep = torch.ones_like(input_ids[0], dtype=torch.bool)
        for token_id in self.image_block_token_ids:
            keep &= input_ids[0] != token_id
        return input_ids[:, keep]

    # ---- chat format --------------------------------------------------------------------------------
    def user_messages(self, prompt: str, num_images: int = 1) -> list[dict[str, Any]]:
        """One user turn with images first, then text: the layout both families' chat templates expect."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": prompt})
        return [{"role": "user", "content": content}]
