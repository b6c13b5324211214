"""The world's tokenizer, target VLM and text-only LM built untrained from a recipe, and the chat format
they share."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)

from massv.pipelines import world
from massv.pipelines.world_models.recipe import WorldRecipe
from massv.tiny import build_qwen_tokenizer, qwen_drafter_config, qwen_target_config

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Builders.


def build_world_tokenizer(recipe: WorldRecipe) -> PreTrainedTokenizerFast:
    """Qwen2-style byte-level BPE trained on world text (no heldout text), checked to round-trip it.

    Why: the target and the drafter must share one tokenizer, and a small vocabulary keeps both models small.
    """
    corpus = world.world_text_corpus(recipe.tokenizer_samples, recipe.seed).splitlines()
    tokenizer = build_qwen_tokenizer(corpus, recipe.vocab_size)
    probe = world.world_text_corpus(50, recipe.eval_seed, splits=("heldout",)).splitlines()
    for line in probe:
        decoded = tokenizer.decode(tokenizer.encode(line, add_special_tokens=False))
        if decoded != line:
            raise AssertionError(f"world tokenizer does not round-trip {line!r}: got {decoded!r}")
    return tokenizer


def build_world_target(recipe: WorldRecipe, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL target of the recipe's size."""
    torch.manual_seed(recipe.seed)
    config = qwen_target_config(
        tokenizer, hidden_size=recipe.target_hidden_size, num_layers=recipe.target_layers,
        vision_hidden_size=recipe.vision_hidden_size, vision_depth=recipe.vision_depth,
        patch_size=recipe.patch_size, num_heads=recipe.target_heads,
        intermediate_size=recipe.target_intermediate_size,
    )
    return _with_generation_defaults(Qwen2_5_VLForConditionalGeneration(config), tokenizer)


def build_world_text_lm(recipe: WorldRecipe, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 text LM of the recipe's (small) size."""
    torch.manual_seed(recipe.seed + 1)
    config = qwen_drafter_config(
        tokenizer, hidden_size=recipe.text_hidden_size, num_layers=recipe.text_layers,
        num_heads=recipe.text_heads, intermediate_size=recipe.text_intermediate_size,
    )
    return _with_generation_defaults(Qwen2ForCausalLM(config), tokenizer)


def _with_generation_defaults(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> Any:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(world_end_of_turn())
    model.generation_config.bos_token_id = None
    return model


def world_end_of_turn() -> str:
    return "<|im_end|>"
