"""Calibration and recovery batches for drafter compression: prompts (+ answers) with images, as the drafter sees them.

Both layer pruning (which block changes the hidden state least) and Wanda (how large each input channel's
activations are) are statistics of the drafter *running on the inputs it will draft for*: an image spliced
into a chat prompt, followed by the target's answer. A batch here is a plain dict of tensors, exactly what
the target's processor returns (`input_ids`, `attention_mask`, the family's image inputs such as
`pixel_values`), optionally with `labels` (-100 on the prompt) and precomputed `image_features`; the
batches of `massv.train.data.DrafterCollator` (image inputs nested under `image_inputs`) work as they are.

The frozen vision encoder is run once per batch by `prepare_batches`, not once per calibration pass: Wanda
with sequential layer-by-layer pruning makes one pass per decoder layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from massv.drafter import MultimodalDrafter

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]


@dataclass
class Sample:
    """One prompt with an optional image and optional answer (the target's own answer for self-distillation)."""

    prompt: str
    image: Any = None  # a PIL image, or None for text-only
    answer: str | None = None


def build_batch(processor: Any, adapter: Any, sample: Sample) -> dict[str, torch.Tensor]:
    """Processor outputs for `sample`, with `labels` on the answer tokens only (loss where the drafter drafts).

    The prompt is the chat template with the generation prompt; the answer is appended as an assistant turn,
    so the tokens are exactly what the target saw when it answered.
    """
    num_images = 0 if sample.image is None else 1
    images = None if sample.image is None else [sample.image]
    user = adapter.user_messages(sample.prompt, num_images=num_images)
    prompt_text = processor.apply_chat_template(user, add_generation_prompt=True)
    if sample.answer is None:
        batch = dict(processor(images=images, text=[prompt_text], return_tensors="pt"))
        return batch
    full_messages = user + [{"role": "assistant", "content": [{"type": "text", "text": sample.answer}]}]
    full_text = processor.apply_chat_template(full_messages, add_generation_prompt=False)
    batch = dict(processor(images=images, text=[full_text], return_tensors="pt"))
    prompt_length = processor(images=images, text=[prompt_text], return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].clone()
    labels[:, :prompt_length] = -100
    batch["labels"] = labels
    return batch


def build_batches(processor: Any, adapter: Any, samples: Iterable[Sample]) -> list[dict[str, torch.Tensor]]:
    """One batch per sample: batch size 1 needs no padding, so 'last token' is simply position -1."""
    return [build_batch(processor, adapter, sample) for sample in samples]


@dataclass
class PreparedBatch:
    """A batch on the drafter's device with the image already encoded (`image_features: (num_image_tokens, dim)`)."""

    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor | None = None  # (batch, seq), 1 on real tokens
    image_features: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # (batch, seq), -100 where no loss

    def drafter_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `MultimodalDrafter.forward`."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "image_features": self.image_features, "labels": self.labels}

    def token_mask(self) -> torch.Tensor:
        """`(batch, seq)` bool: the real (non-padding) tokens."""
        if self.attention_mask is None:
            return torch.ones_like(self.input_ids, dtype=torch.bool)
        return self.attention_mask.bool()

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])


@torch.no_grad()
def prepare_batches(drafter: MultimodalDrafter, batches: Iterable[Batch | PreparedBatch],
                    max_samples: int | None = None) -> list[PreparedBatch]:
    """Move batches to the drafter's device and replace image inputs by the frozen encoder's features.

    Stops after `max_samples` sequences (rows), so `calibration_samples` counts samples, not batches.
    Already prepared batches pass through unchanged.
    """
    prepared: list[PreparedBatch] = []
    seen = 0
    for batch in batches:
        if max_samples is not None and seen >= max_samples:
            break
        prepared.append(batch if isinstance(batch, PreparedBatch) else _prepare_one(drafter, batch))
        seen += prepared[-1].num_samples
    if not prepared:
        raise ValueError("no calibration batches: compression needs at least one sample")
    return prepared


def _prepare_one(drafter: MultimodalDrafter, batch: Batch) -> PreparedBatch:
    device = drafter.device
    input_ids = batch["input_ids"].to(device)
    image_features = batch.get("image_features")
    has_placeholders = bool((input_ids == drafter.config.image_token_id).any())
    if image_features is None and has_placeholders:
        # Processor outputs hold the image inputs at top level; massv.train's collator nests them.
        source = batch.get("image_inputs") or batch
        image_inputs = {name: source[name].to(device) for name in drafter.adapter.image_input_names if name in source}
        image_features = drafter.encode_images(image_inputs)
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    return PreparedBatch(
        input_ids=input_ids,
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        image_features=None if image_features is None else image_features.to(device),
        labels=None if labels is None else labels.to(device),
    )
