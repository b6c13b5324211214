"""Training batches: world records rendered in the processor's chat format, loss on answer tokens only."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import (
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
)

from massv.pipelines import world
from massv.pipelines.world_models.models import world_end_of_turn

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Data: world records rendered in the chat format of the processor.


def record_question(record: dict[str, Any]) -> str:
    """The human turn without the LLaVA `<image>` marker (the chat template places the image)."""
    return record["conversations"][0]["value"].replace(world.IMAGE_TOKEN, "").strip()


def record_answer(record: dict[str, Any]) -> str:
    return record["conversations"][1]["value"]


def chat_prompt(tokenizer: PreTrainedTokenizerFast, question: str, with_image: bool) -> str:
    """The generation prompt for one user turn; with an image first (Qwen2.5-VL layout) or text only.

    Why: the target and the text-only LM must see the same words in the same template; only the image block
    differs, exactly as the drafter sees a target prompt with the image removed.
    """
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def train_examples(split: str, seed: int, start: int, count: int, image_size: int | None
                   ) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Records `start .. start+count-1` of (split, seed), rendered when `image_size` is given.

    Why: streaming fresh records by index gives every training step new scenes at no storage cost, and any
    step's batch can be rebuilt exactly.
    """
    records: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for index in range(start, start + count):
        record, scene = world.make_record(split, seed, index)
        records.append(record)
        if image_size is not None:
            images.append(world.render_scene(scene, image_size))
    return records, images


def encode_target_batch(processor: ProcessorMixin, target: Qwen2_5_VLForConditionalGeneration,
                        records: Sequence[dict[str, Any]], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """Model inputs for a training batch: right-padded, image tokens expanded, labels on answers only.

    The 3-D rotary positions are computed here from `mm_token_type_ids` and passed explicitly, so training
    never depends on the `rope_deltas` the model caches on itself.
    """
    tokenizer = processor.tokenizer
    prompts = [chat_prompt(tokenizer, record_question(record), with_image=True) for record in records]
    texts = [prompt + record_answer(record) + world_end_of_turn() for prompt, record in zip(prompts, records)]
    batch = processor(text=texts, images=list(images), return_tensors="pt", padding=True, padding_side="right",
                      return_mm_token_type_ids=True)
    prompt_lengths = [len(ids) for ids in processor(text=prompts, images=list(images))["input_ids"]]
    labels = batch["input_ids"].clone()
    for row, prompt_length in enumerate(prompt_lengths):
        labels[row, :prompt_length] = -100  # loss only on the answer and its end-of-turn token
    labels[batch["attention_mask"] == 0] = -100
    position_ids, _ = target.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    return {**batch, "labels": labels, "position_ids": position_ids}


def encode_text_batch(tokenizer: PreTrainedTokenizerFast, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Text-only conversations (no image block): loss on every real token, question and answer alike.

    Why: the text LM should model the whole world language, prompts included, as a pretrained LM would.
    """
    texts = [chat_prompt(tokenizer, record_question(r), with_image=False) + record_answer(r) + world_end_of_turn()
             for r in records]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}
