"""Layer pruning by angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers").

For a block of `n` consecutive decoder layers starting at layer `l`, the angular distance
    d(l, n) = arccos(cos(h_l, h_{l+n})) / pi
between the residual stream entering layer `l` and the one leaving layer `l+n-1` measures how much the block
changes the representation; the block with the smallest distance, averaged over calibration samples, is the
one whose removal hurts least. Following the paper, the default compares the LAST token of each sample (the
position that predicts the next token); `tokens="all"` averages over every non-padding token instead.

Why hooks as well as `output_hidden_states`: HF's last hidden state has the final norm applied, which is
not what leaves the last decoder layer, so the last entry is replaced by the last layer's raw output.

Removing layers from an HF model (`drop_layers`) rebuilds `model.model.layers` and renumbers everything
that indexes by layer: `config.num_hidden_layers`, `config.layer_types` (Gemma3 alternates sliding and
full attention; the kept layers keep their types) and each layer's `layer_idx`, which a `DynamicCache`
uses to find that layer's keys and values. The result saves and loads as an ordinary checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from massv.compress.calibration import Batch, PreparedBatch, prepare_batches
from massv.drafter import MultimodalDrafter

logger = logging.getLogger(__name__)

TokenSelection = Literal["last", "all"]


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cosine similarity) / pi along the last dimension, in [0, 1]; computed in float32."""
    cosine = nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF causal LM (`Qwen2ForCausalLM`, `Gemma3ForCausalLM`: `.model.layers`)."""
    layers = getattr(getattr(language_model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(language_model).__name__} has no .model.layers ModuleList; cannot prune its layers")
    return layers


def select_tokens(hidden: torch.Tensor, mask: torch.Tensor, tokens: TokenSelection) -> torch.Tensor:
    """`hidden: (batch, seq, dim)` -> `(num_selected, dim)`: each row's last real token, or all real tokens."""
    if tokens == "all":
        return hidden[mask]
    if tokens != "last":
        raise ValueError(f"tokens must be 'last' or 'all', got {tokens!r}")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values  # works for left or right padding
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@torch.no_grad()
def layer_boundary_states(drafter: MultimodalDrafter, batch: PreparedBatch) -> list[torch.Tensor]:
    """The residual stream at every layer boundary: `num_layers + 1` tensors `(batch, seq, hidden)`.

    Entry `l` enters layer `l`; the last entry is the raw output of the last layer (before the final norm).
    """
    language_model = drafter.language_model
    last_output: list[torch.Tensor] = []

    def record(_module: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> None:
        last_output.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(language_model)[-1].register_forward_hook(record)
    try:
        inputs_embeds = drafter.embed(batch.input_ids, batch.image_features)
        outputs = language_model(inputs_embeds=inputs_embeds, attention_mask=batch.attention_mask,
                                 output_hidden_states=True, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    states = list(outputs.hidden_states)
    states[-1] = last_output[-1]
    return states


def block_distances(states: Sequence[torch.Tensor], mask: torch.Tensor, num_layers_to_drop: int,
                    tokens: TokenSelection = "last") -> torch.Tensor:
    """Per-start-layer distances for one batch: `(num_layers - n + 1, num_selected_tokens)`.

    Row `l` compares `states[l]` (entering layer l) with `states[l + n]` (leaving layer l+n-1).
    """
    num_layers = len(states) - 1
    n = num_layers_to_drop
    if not 1 <= n < num_layers:
        raise ValueError(f"can drop 1..{num_layers - 1} of {num_layers} layers, asked for {n}")
    selected = [select_tokens(state, mask, tokens) for state in states]
    return torch.stack([angular_distance(selected[start], selected[start + n]) for start in range(num_layers - n + 1)])


@dataclass
class LayerPruneDecision:
    """Which block to drop and why: the mean angular distance of every candidate block."""

    num_layers_to_drop: int
    start_layer: int  # the block is layers start_layer .. start_layer + num_layers_to_drop - 1
    distances: list[float]  # mean distance per start layer, index = start layer
    tokens: TokenSelection
    num_tokens: int  # how many token positions were averaged

    @property
    def dropped_layers(self) -> list[int]:
        return list(range(self.start_layer, self.start_layer + self.num_layers_to_drop))

    def to_dict(self) -> dict[str, object]:
        return {"num_layers_to_drop": self.num_layers_to_drop, "start_layer": self.start_layer,
                "dropped_layers": self.dropped_layers, "angular_distances": self.distances,
                "tokens": self.tokens, "num_tokens": self.num_tokens}


@torch.no_grad()
def choose_block(drafter: MultimodalDrafter, calibration_batches: Iterable[Batch | PreparedBatch], num_layers_to_drop: int,
                 tokens: TokenSelection = "last", max_samples: int | None = None) -> LayerPruneDecision:
    """Average each block's angular distance over the calibration tokens and pick the smallest (the argmin)."""
    batches = prepare_batches(drafter, calibration_batches, max_samples)
    was_training = drafter.training
    drafter.eval()
    totals: torch.Tensor | None = None
    count = 0
    try:
        for batch in batches:
            states = layer_boundary_states(drafter, batch)
            distances = block_distances(states, batch.token_mask(), num_layers_to_drop, tokens)
            totals = distances.sum(dim=1).double() if totals is None else totals + distances.sum(dim=1).double()
            count += distances.shape[1]
    finally:
        drafter.train(was_training)
    assert totals is not None
    means = (totals / count).tolist()
    start = int(torch.tensor(means).argmin())
    logger.info("angular distances for %d-layer blocks (by start layer): %s; dropping layers %d..%d",
                num_layers_to_drop, ", ".join(f"{value:.4f}" for value in means), start, start + num_layers_to_drop - 1)
    return LayerPruneDecision(num_layers_to_drop, start, means, tokens, count)


def drop_layers(language_model: nn.Module, layer_indices: Iterable[int]) -> list[int]:
    """Remove decoder layers in place and renumber the rest; returns the original indices of the kept layers.

    Each kept layer keeps its own attention type (its module already knows whether it slides); the config's
    `layer_types` is cut to match so masks and cache layers are built for the right kind, and every
    `layer_idx` is renumbered so cache lookups hit the kept layer's own keys and values.
    """
    layers = decoder_layers(language_model)
    config = language_model.config
    drop = sorted(set(layer_indices))
    if not drop:
        return list(range(len(layers)))
    if drop[0] < 0 or drop[-1] >= len(layers):
        raise ValueError(f"layer indices {drop} out of range for {len(layers)} layers")
    if len(drop) >= len(layers):
        raise ValueError("cannot drop every decoder layer")
    kept = [index for index in range(len(layers)) if index not in drop]
    language_model.model.layers = nn.ModuleList([layers[index] for index in kept])
    for new_index, layer in enumerate(language_model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[index] for index in kept]
        if hasattr(language_model.model, "has_sliding_layers"):  # Qwen2 builds sliding masks only if needed
            language_model.model.has_sliding_layers = "sliding_attention" in config.layer_types
    # Qwen2 derives sliding layers from max_window_layers when layer_types is absent; keep it consistent.
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = sum(1 for index in kept if index < config.max_window_layers)
    logger.info("dropped decoder layers %s; %d layers remain", drop, len(kept))
    return kept


def prune_layers(drafter: MultimodalDrafter, calibration_batches: Iterable[Batch | PreparedBatch], num_layers_to_drop: int,
                 tokens: TokenSelection = "last", max_samples: int | None = None) -> LayerPruneDecision:
    """Choose the block with the smallest angular distance and remove it from the drafter's LM."""
    decision = choose_block(drafter, calibration_batches, num_layers_to_drop, tokens, max_samples)
    drop_layers(drafter.language_model, decision.dropped_layers)
    return decision
