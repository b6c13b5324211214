"""The target's side of one request: prefill, verify a block of candidate tokens, roll back what was rejected.

Invariant between blocks: the KV cache holds every committed token except the last one, which the next
`verify` feeds again in front of the drafts (its logits predict the first draft).

Every forward is followed by exactly one `rollback` (possibly of 0 tokens): a sliding-window layer that
records its past (Gemma3) trims back to its window only inside `crop`, and it can remove only tokens added
since the previous crop.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from massv.families import FamilyAdapter


def new_rollback_cache(model: PreTrainedModel) -> DynamicCache:
    """A cache that can be cropped back: sliding-window layers keep their past until the next `crop`."""
    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()
    return cache


class TargetVerifier:
    """Scores candidate tokens with the target on its KV cache, with explicit positions and an optional mask."""

    def __init__(self, model: PreTrainedModel, adapter: FamilyAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.device = model.device
        self.cache = new_rollback_cache(model)
        self.length = 0  # tokens in the cache
        self.position_state: Any = None

    def prefill(self, input_ids: torch.Tensor, image_inputs: dict[str, torch.Tensor],
                projected_features: torch.Tensor | None, logits_to_keep: int = 1) -> torch.Tensor:
        """Prompt pass with the family's prompt-only inputs; returns `(logits_to_keep, vocab)` logits."""
        kwargs, self.position_state = self.adapter.target_prefill_kwargs(input_ids, image_inputs, self.model)
        if projected_features is not None:
            kwargs.update(self.adapter.target_image_kwargs(image_inputs, projected_features))
        outputs = self.model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=self.cache,
            use_cache=True, logits_to_keep=logits_to_keep, **kwargs,
        )
        self.length = input_ids.shape[1]
        self.cache.crop(0)
        return outputs.logits[0]

    def verify(self, tokens: torch.Tensor, text_positions: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Score `tokens: (1, k)` placed after the cache; returns their `(k, vocab)` logits.

        `text_positions: (k,)` default to the next k sequence positions (a chain); a tree passes each node's
        depth-based position and a 4-D `attention_mask` that lets a node see only its ancestors.
        """
        num_new = tokens.shape[1]
        if text_positions is None:
            text_positions = torch.arange(self.length, self.length + num_new, device=self.device)
        if attention_mask is None:
            attention_mask = torch.ones(1, self.length + num_new, dtype=torch.long, device=self.device)
        outputs = self.model(
            input_ids=tokens, attention_mask=attention_mask, past_key_values=self.cache, use_cache=True,
            logits_to_keep=num_new, **self.adapter.target_decode_kwargs(self.position_state, text_positions),
        )
        self.length += num_new
        return outputs.logits[0]

    def rollback(self, num_tokens: int) -> None:
        """Drop the last `num_tokens` cached tokens (0 still trims sliding-window layers to their window)."""
        self.cache.crop(-num_tokens)  # transformers 5.x: a negative count of tokens to remove
        self.length -= num_tokens
