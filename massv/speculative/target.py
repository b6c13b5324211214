"""The target's side of one request: prefill, verify a block of candidate tokens, roll back what was rejected.

Invariant between blocks: the KV cache holds every committed token except the last one, which the next
`verify` feeds again in front of the drafts (its logits predict the first draft).

Every forward is followed by exactly one `rollback` (possibly of 0 tokens) or, after a tree, `keep_path`
(which gathers the accepted path into place, then crops): a sliding-window layer that records its past
(Gemma3) trims back to its window only inside `crop`, and it can remove only tokens added since the
previous crop.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from massv.families import FamilyAdapter
from massv.speculative.tree import AttentionLayout, DraftTree, keep_tail_entries, tree_attention_masks


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
        self.layout = AttentionLayout.of(model.config)

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
               attention_mask: torch.Tensor | dict[str, torch.Tensor] | None = None) -> torch.Tensor:
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

    def verify_tree(self, root_token: torch.Tensor, drafts: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """Score every node of `tree` in one forward: `[root] + drafts` -> `(n + 1, vocab)` logits.

        Node i sits at position `length + depth(i)` (siblings share one; Qwen2.5-VL's 3-D rotary positions
        follow through the adapter) and sees the cache and its ancestors only. Follow with `keep_path`.
        """
        device = self.device
        depths = tree.node_depths(device)
        query_positions = self.length + depths
        key_positions = torch.cat([torch.arange(self.length, device=device), query_positions])
        ancestors = tree.ancestors(device)
        visible = torch.cat([ancestors.new_ones(ancestors.shape[0], self.length), ancestors], dim=1)
        masks = tree_attention_masks(self.layout, self.cache, query_positions, key_positions, visible,
                                     self.model.dtype)
        tokens = torch.cat([root_token.view(1, 1), drafts.view(1, -1).to(device)], dim=1)
        return self.verify(tokens, text_positions=query_positions, attention_mask=masks)

    def keep_path(self, num_nodes: int, path: list[int]) -> None:
        """After `verify_tree` over `num_nodes` drafts: keep the root and the accepted `path`, drop the rest."""
        keep_tail_entries(self.cache, num_nodes + 1, [0] + list(path))
        self.length -= num_nodes - len(path)

    def rollback(self, num_tokens: int) -> None:
        """Drop the last `num_tokens` cached tokens (0 still trims sliding-window layers to their window)."""
        self.cache.crop(-num_tokens)  # transformers 5.x: a negative count of tokens to remove
        self.length -= num_tokens
