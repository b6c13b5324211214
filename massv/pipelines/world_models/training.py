"""Answer training of the target and text-only pretraining of the drafter LM."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)

from massv.pipelines import world
from massv.pipelines.world_models.data import (
    encode_target_batch,
    encode_text_batch,
    train_examples,
)
from massv.pipelines.world_models.evaluation import generate_target_answers
from massv.pipelines.world_models.grading import heldout_records, score_answers
from massv.pipelines.world_models.loop import train_loop
from massv.pipelines.world_models.recipe import WorldRecipe

logger = logging.getLogger(__name__)

def train_target(target: Qwen2_5_VLForConditionalGeneration, processor: ProcessorMixin, recipe: WorldRecipe,
                 progress: bool = True, probe_every: int = 0) -> list[float]:
    """Stage 1: train the target VLM to answer fresh `train` records each step (loss on answers only).

    Run after `pretrain_vision`. With `recipe.freeze_vision_blocks` the encoder blocks stay as pretrained
    and only the merger and the LM train (the LLaVA recipe), which also spares the CPU the vision backward
    pass. With `probe_every`, held-out accuracy on a few questions is logged along the way (the probe never
    touches the weights).
    """
    if recipe.freeze_vision_blocks:
        # The merger (the projector into the LM) keeps training; the parsed-scene encoder below it does not.
        target.model.visual.requires_grad_(False)
        target.model.visual.merger.requires_grad_(True)
    batch_size = recipe.target_batch_size

    def probe() -> str:
        probe_records, probe_images = heldout_records(48, recipe.eval_seed + 1, image_size=recipe.image_size)
        answers = generate_target_answers(target, processor, probe_records, probe_images, recipe.max_new_tokens)
        scores = score_answers(probe_records, answers)
        colour = scores.get("colour", {}).get("colour_word")
        exact = ", ".join(f"{kind} {row['exact']:.2f}" for kind, row in scores.items())
        return exact + (f"; colour word {colour:.2f}" if colour is not None else "")

    def make_batch(step: int) -> dict[str, torch.Tensor]:
        records, images = train_examples("train", recipe.seed, step * batch_size, batch_size, recipe.image_size)
        return encode_target_batch(processor, target, records, images)

    torch.manual_seed(recipe.seed)
    return train_loop(target, make_batch, recipe.target_steps, recipe.target_lr, recipe.target_warmup_steps,
                       recipe, "target", progress, probe, probe_every)


def text_records(recipe: WorldRecipe, start: int, count: int) -> list[dict[str, Any]]:
    """Text-LM records: mostly `train` (all task kinds), some `pretrain` (caption instructions)."""
    period = max(1, round(1 / recipe.text_pretrain_fraction)) if recipe.text_pretrain_fraction > 0 else 0
    records = []
    for index in range(start, start + count):
        split = "pretrain" if period and index % period == period - 1 else "train"
        # Seed offset: a different stream of scenes than the target saw (text only, no pixels involved).
        records.append(world.make_record(split, recipe.seed + 1, index)[0])
    return records


def train_text_lm(text_lm: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, recipe: WorldRecipe,
                  progress: bool = True) -> list[float]:
    """Pretrain the text-only LM on world conversations rendered without any image."""
    batch_size = recipe.text_batch_size

    def make_batch(step: int) -> dict[str, torch.Tensor]:
        return encode_text_batch(tokenizer, text_records(recipe, step * batch_size, batch_size))

    torch.manual_seed(recipe.seed + 1)
    return train_loop(text_lm, make_batch, recipe.text_steps, recipe.text_lr, recipe.text_warmup_steps, recipe,
                       "text_lm", progress)
