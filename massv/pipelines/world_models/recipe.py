"""The world models' recipe (every setting that decides what training produces, hashed) and the bundle
of trained models it names."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from transformers import (
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)

from massv.pipelines import world

logger = logging.getLogger(__name__)

# Bump when the training code changes what a recipe produces; it is part of every recipe hash.
FORMAT_VERSION = 2

MERGE_SIZE = 2  # Qwen2.5-VL's spatial merge: 2x2 patches per LM image token
NUM_CELLS = len(world.CELL_NAMES)  # the world's 3x3 grid


# ----------------------------------------------------------------------------------------------------------
# Recipe.


@dataclass(frozen=True)
class WorldRecipe:
    """Every size, seed and step count that decides the trained world models; its hash names the cache.

    The defaults are the shipped recipe, sized for a shared 2-core CPU: about 45 CPU-minutes for the target
    and ten for the text LM. Images are 96x96 with 16x16 patches: after Qwen2.5-VL's 2x2 patch merger
    each image is 9 LM tokens, and each token covers exactly one cell of the world's 3x3 grid (checked in
    `__post_init__`). That alignment is what lets the vision tower be pretrained per token on "what is in
    this cell, and which cell is it" and the LM learn to read it within a CPU budget; with 16 tokens
    straddling cell borders (64x64, 8x8 patches) the target was still blind to most details after 1200 steps.
    Without the cell in the parse (format version 1, 1200 steps) the target named the right colour 38% of the
    time and got 1.5% of answers exactly right; with it, 72% and 12% after 2000 steps (see `PARSE_FIELDS`). The target is deep and narrow
    (10 x 192) because at batch size 1 a CPU forward costs about the same per layer whatever the width, so
    depth sets the target's per-token cost while width sets the training cost; the drafter LM has one layer.
    """

    seed: int = 0
    image_size: int = world.DEFAULT_IMAGE_SIZE
    patch_size: int = 16
    # Tokenizer: byte-level BPE trained on this many records per split of world text.
    vocab_size: int = 512
    tokenizer_samples: int = 2000
    # Target VLM.
    target_hidden_size: int = 192
    target_layers: int = 10
    target_heads: int = 4
    target_intermediate_size: int = 512
    vision_hidden_size: int = 128
    vision_depth: int = 4
    # Stage 0: the vision tower (with the merger) learns to parse scenes, standing in for a pretrained encoder.
    vision_steps: int = 400
    vision_batch_size: int = 32
    vision_lr: float = 2e-3
    vision_warmup_steps: int = 50
    # Stage 1: the LM (and the merger) learn to answer; the parsed-scene vision blocks stay frozen (LLaVA).
    freeze_vision_blocks: bool = True
    target_steps: int = 2000
    target_batch_size: int = 16
    target_lr: float = 2e-3
    target_warmup_steps: int = 100
    # Text-only drafter LM.
    text_hidden_size: int = 128
    text_layers: int = 1
    text_heads: int = 4
    text_intermediate_size: int = 512
    text_steps: int = 1500
    text_batch_size: int = 64
    text_lr: float = 3e-3
    text_warmup_steps: int = 100
    text_pretrain_fraction: float = 0.2  # share of caption-instruction (LLaVA-Pretrain style) records
    # Shared optimiser settings.
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    # Evaluation on the heldout split (scenes no training split can contain) and the cost measurement.
    eval_samples: int = 400
    eval_seed: int = 1000
    max_new_tokens: int = 96
    cost_context_tokens: int = 100
    cost_decode_steps: int = 64
    save_dtype: str = "float16"

    def __post_init__(self) -> None:
        cells_per_side = math.isqrt(NUM_CELLS)
        if self.image_size != self.patch_size * MERGE_SIZE * cells_per_side:
            raise ValueError(
                f"image_size {self.image_size} must be patch_size * {MERGE_SIZE} * {cells_per_side} "
                f"(= {self.patch_size * MERGE_SIZE * cells_per_side}) so that each merged image token covers one "
                "grid cell of the world"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldRecipe:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WorldRecipe fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    def hash(self) -> str:
        """Stable short hash of the recipe, the world generator version and this file's format version.

        Why: a cached or shipped model is only valid for the exact world and recipe it was trained on.
        """
        payload = {"recipe": self.to_dict(), "world_version": world.WORLD_VERSION, "format_version": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class WorldModels:
    """The trained target VLM, the text-only drafter LM, and the processor/tokenizer both share."""

    target: Qwen2_5_VLForConditionalGeneration
    text_lm: Qwen2ForCausalLM
    processor: ProcessorMixin
    tokenizer: PreTrainedTokenizerFast
    recipe: WorldRecipe
    path: Path | None = None
    metrics: dict[str, Any] | None = None
