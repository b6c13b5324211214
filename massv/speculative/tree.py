"""A draft tree and what a forward over it needs: per-node positions, ancestor masks, and the KV gather.

Node 0 is the root, the last committed token (fed again in front of the drafts, as in a chain); nodes 1..n
are drafts in an order where a parent always precedes its children and siblings follow the drafter's
preference (the first child is the drafter's top guess). The tree proposer lists the first-choice path
first, so that accepting it keeps a prefix of the nodes: a crop of the KV caches, not a gather. A node at
depth d sits at sequence position `root_position + d`, and attends to the committed prefix and to its own
ancestors only: that is what makes one forward over all n + 1 nodes score every root-to-node path at once
(SpecInfer, EAGLE).

Masks are additive float masks (0 keeps, the dtype's minimum drops), which eager and SDPA attention both
take as given; they are passed per layer type (`{"full_attention": ..., "sliding_attention": ...}`), the
form transformers 5.x models accept instead of building their own, so a sliding-window layer gets its
window applied on the nodes' *logical* positions, not on their cache slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PretrainedConfig


@dataclass
class DraftTree:
    """The shape of a proposal's tree; the draft ids themselves are the proposal's `tokens` (n,)."""

    parents: list[int]  # (n,) node i + 1's parent, in 0..i (0 = the root)
    depths: list[int] = field(default_factory=list)  # (n,) 1 for the root's children
    _ancestors: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for index, parent in enumerate(self.parents):
            if not 0 <= parent <= index:
                raise ValueError(f"node {index + 1} has parent {parent}: parents must precede their children")
        if not self.depths:
            for parent in self.parents:
                self.depths.append(1 + (self.depths[parent - 1] if parent else 0))

    @property
    def num_nodes(self) -> int:
        """Draft nodes, the root excluded."""
        return len(self.parents)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    def children(self, node: int) -> list[int]:
        """Node indices (1-based) whose parent is `node`, in the drafter's order of preference."""
        return [index + 1 for index, parent in enumerate(self.parents) if parent == node]

    def is_first_child(self, node: int) -> bool:
        """Whether `node` is its parent's first (most probable) child: accepting others needs the tree."""
        parent = self.parents[node - 1]
        return self.parents.index(parent) == node - 1

    def ancestors(self, device: torch.device | None = None) -> torch.Tensor:
        """`(n + 1, n + 1)` bool: `[i, j]` is True when node j is node i or one of its ancestors."""
        if self._ancestors is None:  # built once per tree: the verifier, the rule and the history all need it
            rows = [[0]]
            for index, parent in enumerate(self.parents, start=1):
                rows.append(rows[parent] + [index])
            size = self.num_nodes + 1
            flat = [row_index * size + column for row_index, row in enumerate(rows) for column in row]
            matrix = torch.zeros(size * size, dtype=torch.bool)
            matrix[torch.tensor(flat, dtype=torch.long)] = True
            self._ancestors = matrix.view(size, size)
        return self._ancestors.to(device) if device is not None else self._ancestors

    def node_depths(self, device: torch.device | None = None) -> torch.Tensor:
        """`(n + 1,)` long: 0 for the root, then each draft's depth."""
        return torch.tensor([0] + self.depths, dtype=torch.long, device=device)

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node` (empty for the root)."""
        path = []
        while node:
            path.append(node)
            node = self.parents[node - 1]
        return path[::-1]


@dataclass(frozen=True)
class AttentionLayout:
    """Which attention kind each layer has, and the sliding window: read once per model (configs are slow)."""

    layer_types: tuple[str, ...]
    sliding_window: int | None

    @classmethod
    def of(cls, config: PretrainedConfig) -> AttentionLayout:
        text_config = config.get_text_config()
        types = getattr(text_config, "layer_types", None)
        types = tuple(types) if types else ("full_attention",) * int(text_config.num_hidden_layers)
        return cls(types, getattr(text_config, "sliding_window", None))


def tree_attention_masks(layout: AttentionLayout, cache: DynamicCache, query_positions: torch.Tensor,
                         key_positions: torch.Tensor, visible: torch.Tensor, dtype: torch.dtype
                         ) -> dict[str, torch.Tensor]:
    """One additive `(1, 1, q, kv)` mask per layer type for a forward of q tree nodes on `cache`.

    `key_positions: (slots,)` are the logical positions of every cache slot after this forward (committed
    tokens, earlier tree nodes, then the q queried ones) and `visible: (q, slots)` which slots each query
    may see (the committed prefix and its ancestors). Each layer type takes the slots its cache layer
    hands attention (`get_mask_sizes`); sliding layers also drop keys `sliding_window` or more positions back.
    """
    num_queries = query_positions.shape[0]
    types, window = layout.layer_types, layout.sliding_window
    minimum = torch.finfo(dtype).min
    masks = {}
    for kind in dict.fromkeys(types):
        layer_index = types.index(kind)
        kv_length, kv_offset = cache.get_mask_sizes(num_queries, layer_index) if layer_index < len(cache.layers) \
            else (key_positions.shape[0], 0)
        slots = slice(kv_offset, kv_offset + kv_length)
        allowed = visible[:, slots]
        if kind == "sliding_attention" and window:
            allowed = allowed & (query_positions[:, None] - key_positions[None, slots] < window)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, minimum)
        masks[kind] = mask[None, None]
    return masks


def keep_tail_entries(cache: DynamicCache, num_tail: int, keep: Sequence[int]) -> None:
    """Of the last `num_tail` cached tokens keep only those at tail offsets `keep` (in that order), moved up.

    This is EAGLE's "gather the accepted path into place": the accepted nodes' keys and values slide down to
    the slots right after the committed prefix and the rest of the tree is dropped, so the next block sees
    exactly the cache a chain over the same tokens would have left. Ends with `crop(0)`, which trims
    sliding-window layers that record their past back to their window.
    """
    num_dropped = num_tail - len(keep)
    if list(keep) == list(range(len(keep))):  # a prefix of the tail (a tree's first-choice path): no copy
        cache.crop(-num_dropped)
        return
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys is None or layer.keys.shape[-2] < num_tail:
            continue
        start = layer.keys.shape[-2] - num_tail
        index = torch.as_tensor(list(keep), dtype=torch.long, device=layer.keys.device) + start
        layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys.index_select(-2, index)], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], layer.values.index_select(-2, index)], dim=-2)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length -= num_dropped
    cache.crop(0)
