"""The drafter's one-token step on a static KV cache, optionally compiled: the optional fast path of chain drafting.

A chain drafter spends most of its time in one-token forwards, where a small LM's cost is Python and kernel
launches rather than arithmetic. A static cache gives that step fixed shapes, so `torch.compile` traces it
once (and, on CUDA, `mode="reduce-overhead"` replays it as a CUDA graph). Rolling back rejected drafts needs
no copy: each layer's write position (`cumulative_length`, a tensor updated in place, so compiled graphs
stay valid) is set back to the committed length, the next write lands there, and the causal mask, built from
`cache_position`, hides the stale entries after it. The decoder is built once per `SpeculativeGenerator`
and reused by every request.

Measured (eval/bench_compiled_drafter.py) rather than assumed: a compiled step pays a one-off compilation, so
it is opt-in (`SpeculativeGenerator(..., compile_drafter=True)`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedModel, StaticCache

logger = logging.getLogger(__name__)


class StaticDecoderError(ValueError):
    """The drafter cannot use the static-cache path (a request too long, a window it would wrap)."""


class StaticDecoder:
    """One-token drafter steps on a preallocated cache of `max_cache_len` positions, compiled with `backend`."""

    def __init__(self, language_model: PreTrainedModel, max_cache_len: int = 4096, backend: str = "inductor",
                 mode: str | None = None) -> None:
        text_config = language_model.config.get_text_config(decoder=True)
        window = getattr(text_config, "sliding_window", None)
        sliding = "sliding_attention" in (getattr(text_config, "layer_types", None) or [])
        if sliding and window is not None and max_cache_len > window:
            # A sliding static layer is a ring buffer: past its window a write overwrites a token that a
            # rollback would need back, so the cache could not be rolled back by position alone.
            raise StaticDecoderError(
                f"compile_drafter: the drafter LM has sliding-window layers (window {window}) and the static cache "
                f"would hold {max_cache_len} positions; pass compile_max_length <= {window} or leave "
                "compile_drafter off")
        self.language_model = language_model
        self.max_cache_len = max_cache_len
        self.device = language_model.device
        self.cache = StaticCache(config=language_model.config, max_cache_len=max_cache_len)
        if mode is None and self.device.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"  # CUDA graphs: one replay per drafted token
        self._step = torch.compile(self._eager_step, backend=backend, mode=mode, dynamic=False, fullgraph=False)
        # Tree depths: a fixed number of nodes per forward (the proposer pads its frontier), one graph per width.
        self._nodes_step = torch.compile(self._eager_nodes_step, backend=backend, mode=mode, dynamic=False,
                                         fullgraph=False)

    def fits(self, num_positions: int) -> bool:
        return num_positions <= self.max_cache_len

    def start_request(self) -> StaticCache:
        """The cache, zeroed for a new request: a position-tracking bug then reads zeros, not another request."""
        self.cache.reset()
        return self.cache

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached positions: later writes start there (transformers 5.x static layers
        write at their own `cumulative_length`, not at the `cache_position` they are given)."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)
            if hasattr(layer, "cumulative_length_int"):
                # Sliding static layers also count writes in a Python int and start rolling (a ring buffer) once
                # it passes the cache: left counting the rolled-back writes, a long request would roll early.
                layer.cumulative_length_int = length

    def prompt_kwargs(self, start: int, num_new: int) -> dict[str, Any]:
        """What an eager forward over the prompt passes so that it writes into this cache at `start`."""
        return {"past_key_values": self.cache,
                "cache_position": torch.arange(start, start + num_new, device=self.device)}

    def step(self, input_ids: torch.Tensor, position: int) -> torch.Tensor:
        """`input_ids: (1, 1)` at sequence `position` -> `(1, vocab)` float logits of the next token."""
        positions = torch.full((1,), position, dtype=torch.long, device=self.device)
        return self._step(input_ids, positions.view(1, 1), positions)

    def _eager_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    cache_position: torch.Tensor) -> torch.Tensor:
        outputs = self.language_model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache,
                                      cache_position=cache_position, use_cache=True, logits_to_keep=1)
        return outputs.logits[:, -1].float()

    def nodes_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, masks: dict[str, torch.Tensor],
                   first_slot: int) -> torch.Tensor:
        """`input_ids: (1, q)` tree nodes at `position_ids: (1, q)`, written at cache slots `first_slot, ...`,
        seeing what the per-layer-type `(1, 1, q, max_cache_len)` additive `masks` allow -> `(q, vocab)` logits."""
        slots = torch.arange(first_slot, first_slot + input_ids.shape[1], device=self.device)
        return self._nodes_step(input_ids, position_ids, masks, slots)

    def _eager_nodes_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          masks: dict[str, torch.Tensor], cache_position: torch.Tensor) -> torch.Tensor:
        outputs = self.language_model(input_ids=input_ids, position_ids=position_ids, attention_mask=masks,
                                      past_key_values=self.cache, cache_position=cache_position, use_cache=True,
                                      logits_to_keep=input_ids.shape[1])
        return outputs.logits[0].float()

    def keep_slots(self, start: int, slots: list[int]) -> None:
        """Move the entries at cache `slots` (in that order) to `start, start + 1, ...` and keep the cache up to
        there: a tree's accepted path gathered into place, in place (compiled graphs keep their buffers)."""
        if slots and slots != list(range(start, start + len(slots))):  # already in place: nothing to move
            source = torch.tensor(slots, dtype=torch.long, device=self.device)
            target = torch.arange(start, start + len(slots), device=self.device)
            for layer in self.cache.layers:
                if not layer.is_initialized:
                    continue
                layer.keys.index_copy_(2, target, layer.keys.index_select(2, source))
                layer.values.index_copy_(2, target, layer.values.index_select(2, source))
        self.truncate(start + len(slots))
