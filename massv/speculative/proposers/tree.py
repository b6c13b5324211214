"""Tree drafting (EAGLE-2's dynamic draft tree) over the LM drafters: MASSV and the text-only baseline.

One block:
  1. feed the drafter the committed tokens it has not seen (the last is the tree's root): its
     distribution there gives the root's `top_k` children;
  2. for each further depth, ONE batched drafter forward over the `top_k` most probable nodes of the
     newest layer (each at position root + depth, seeing the prefix and its ancestors through a tree mask
     on the drafter's own KV cache); each gives `top_k` children, scored by cumulative log-probability;
  3. keep the `size` best nodes over all depths by cumulative log-probability (a child is never more
     probable than its parent, so the kept set is a tree), in breadth-first order.
After the target's verdict the accepted nodes' cache entries are gathered into place and the rest dropped.

Nodes are chosen deterministically (top-k), also when sampling: `accept_tree_sampled` is exact for any
deterministic choice of children, and top-k children are the ones the target most often accepts.
The drafter's cache is a plain `DynamicCache` (no sliding-window layers): tree nodes occupy slots that are
not their positions, so a window must be applied by position in the mask, which `tree_attention_masks`
does, rather than by slot in the cache.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from massv.speculative.proposers.base import CommittedTokens, DrafterPairError, Proposal, Proposer
from massv.speculative.proposers.language_model import CausalLMProposer
from massv.speculative.strategy import TreeShape
from massv.speculative.tree import AttentionLayout, DraftTree, keep_tail_entries, tree_attention_masks


PADDING = -2  # a `fed` entry for a filler slot of the static path (never a pool index, never the root's -1)


class TreeProposer(Proposer):
    """Grows an EAGLE-2 tree with a `CausalLMProposer`'s drafter (its model, view of the prompt and cache)."""

    name = "tree"

    def __init__(self, base: Proposer, shape: TreeShape) -> None:
        if not isinstance(base, CausalLMProposer):
            raise DrafterPairError(
                f"strategy='tree' needs a language-model drafter (MASSV or a text-only causal LM); the "
                f"{base.name!r} proposer drafts chains only: use strategy='chain' or 'adaptive'")
        self.base = base
        self.shape = shape
        # The static (compiled) path when the generator has one and a whole tree fits behind the request's
        # tokens: every depth feeds `top_k` nodes (the frontier padded), so one compiled graph serves them all.
        static = base.static
        tree_slots = shape.depth * shape.top_k
        if static is not None and static.fits(base.prompt.shape[1] + base.request.new_positions + tree_slots):
            self.static = static
        else:
            self.static = None
            base.static = None
            base.cache = DynamicCache()  # slot-indexed; windows are applied by position in the masks
        self.request = base.request
        self.layout = AttentionLayout.of(base.language_model.config)
        self.dtype = base.language_model.dtype  # read once: a model's `dtype` walks its parameters
        # Drafts are drafter ids below `draftable`; when none of those needs `_readable`'s replacement (ids past
        # the embedding, the image placeholder), the per-depth forwards skip it.
        image_token_id = base.request.adapter.image_token_id
        self.nodes_readable = base.draftable <= base.embedding_rows and not (
            image_token_id is not None and 0 <= image_token_id < base.draftable)
        self.last_tree: DraftTree | None = None
        self.root_slots = 0  # drafter cache length before the tree's nodes
        self.node_slots: dict[int, int] = {}  # tree node -> drafter cache slot (the nodes that were fed)
        self._parent: list[int] = []  # this block's pool of candidate nodes: parent index (-1: the root)
        self._depth: list[int] = []  # and depth

    # ---- the seam --------------------------------------------------------------------------------------
    def prefill(self, sequence: CommittedTokens) -> int:
        return self.base.prefill(sequence)

    def propose(self, sequence: CommittedTokens, max_tokens: int) -> Proposal:
        """A tree of at most `shape.size` nodes and depth `min(shape.depth, max_tokens)`."""
        base, request = self.base, self.request
        depth_limit = min(self.shape.depth, max_tokens)
        top_k = self.shape.top_k
        device = base.device
        pending = base._readable(sequence.generated_ids(base.cached - base.prompt.shape[1]).to(device))
        history = base._history_for_block(sequence)
        seen = None if history is None else history.seen
        root_logits = base._forward(pending)[:, : base.draftable]  # (1, draftable)
        self.root_slots = root_position = base.cached
        root_position -= 1

        # Pool of candidate nodes: token and cumulative log-prob (tensors, grown one depth at a time), parent
        # (pool index, -1 = root) and depth (host lists: the masks and the kept tree are built from them).
        pool_parent: list[int] = []
        pool_depth: list[int] = []
        self._parent, self._depth = pool_parent, pool_depth  # read by `_masks`
        fed: list[int] = []  # pool indices in drafter cache order
        # Which tree slots each fed slot sees (its ancestors and itself), one row per slot; the extra last row
        # stays empty: the root's children and the static path's fillers take it as their parent's.
        tree_slots = depth_limit * top_k
        fed_visible = torch.zeros(tree_slots + 1, tree_slots, dtype=torch.bool, device=device)
        fed_row_of: dict[int, int] = {}  # pool index -> its slot among the fed (`fed`'s inverse, fillers aside)
        log_probs = self._log_probs(root_logits, None if seen is None else seen.unsqueeze(0))[0]
        values, ids = log_probs.topk(min(top_k, log_probs.shape[-1]))
        pool_tokens, pool_scores = ids, values
        self._add_children(pool_parent, pool_depth, ids.numel(), [-1], 1)
        frontier_start = 0  # the newest depth's nodes are the pool's tail
        forwards = 1
        eos = torch.tensor(sorted(request.eos_token_ids), dtype=torch.long, device=device)
        min_log_probability = math.log(self.shape.min_probability) if self.shape.min_probability > 0 else -math.inf
        for depth in range(2, depth_limit + 1):
            expand, best = self._expandable(frontier_start, pool_tokens, pool_scores, eos, top_k)
            if not expand or best < min_log_probability:
                break
            expand_index = torch.tensor(expand, dtype=torch.long, device=device)
            node_ids = pool_tokens[expand_index].view(1, -1)
            positions = root_position + depth - 1  # the whole frontier sits at one depth
            padding = top_k - len(expand) if self.static is not None else 0
            masks = self._masks(expand, fed, fed_visible, fed_row_of, positions, padding)
            if self.static is None:
                logits = base.forward_nodes(node_ids, torch.full((len(expand),), positions, device=device), masks,
                                            readable=self.nodes_readable)
            else:
                logits = self._static_nodes(node_ids, positions, masks, padding)
            fed_row_of.update((index, len(fed) + row) for row, index in enumerate(expand))
            fed += expand + [PADDING] * padding
            forwards += 1
            rows_seen = None if seen is None else self._seen_rows(seen, expand, pool_tokens, pool_parent)
            log_probs = self._log_probs(logits[:, : base.draftable], rows_seen)  # (q, draftable)
            values, ids = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
            cumulative = pool_scores[expand_index].view(-1, 1) + values
            frontier_start = len(pool_parent)
            pool_tokens = torch.cat([pool_tokens, ids.reshape(-1)])
            pool_scores = torch.cat([pool_scores, cumulative.reshape(-1)])
            self._add_children(pool_parent, pool_depth, ids.shape[1], expand, depth)
        tree, chosen = self._best_tree(pool_parent, pool_depth, pool_scores)
        self.node_slots = {node: self.root_slots + fed_row_of[index] for node, index in enumerate(chosen, start=1)
                           if index in fed_row_of}
        self.last_tree = tree
        tokens = pool_tokens[torch.tensor(chosen, dtype=torch.long, device=device)].to(request.target.device)
        return Proposal(tokens, None, forwards=forwards, tree=tree)

    def commit(self, num_accepted: int) -> None:
        """Chain semantics (the first `num_accepted` nodes along first children): prefer `commit_path`."""
        tree = self.last_tree
        path, node = [], 0
        for _ in range(num_accepted):
            node = tree.children(node)[0]
            path.append(node)
        self.commit_path(path)

    def commit_path(self, path: list[int]) -> None:
        """The target accepted `path` (node indices, root's child first): keep those nodes' cache entries."""
        base = self.base
        fed_path = []
        for node in path:  # a node was fed only if its parent was: the fed nodes are a prefix of the path
            if node not in self.node_slots:
                break
            fed_path.append(self.node_slots[node] - self.root_slots)
        if self.static is not None:
            self.static.keep_slots(self.root_slots, [self.root_slots + offset for offset in fed_path])
        else:
            keep_tail_entries(base.cache, base.cached - self.root_slots, fed_path)
        base.cached = self.root_slots + len(fed_path)

    # ---- growing -----------------------------------------------------------------------------------------
    def _log_probs(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """Log-probabilities of the drafter's processed scores (the same processors the target's get)."""
        return torch.log_softmax(self.base.processor(logits, seen), dim=-1)

    @staticmethod
    def _add_children(parents: list[int], depths: list[int], per_parent: int, parent_indices: list[int],
                      depth: int) -> None:
        """Record `per_parent` children of each of `parent_indices` (their tokens and scores are added by the
        caller, row by row in the same order)."""
        for parent in parent_indices:
            parents.extend([parent] * per_parent)
        depths.extend([depth] * (per_parent * len(parent_indices)))

    @staticmethod
    def _expandable(frontier_start: int, tokens: torch.Tensor, scores: torch.Tensor, eos: torch.Tensor, top_k: int
                    ) -> tuple[list[int], float]:
        """The `top_k` most probable nodes of the newest depth (pool indices from `frontier_start` on) worth
        expanding (none after an end-of-sequence draft), and the best one's cumulative log-probability."""
        values = scores[frontier_start:]
        if eos.numel():
            values = values.masked_fill(torch.isin(tokens[frontier_start:], eos), float("-inf"))
        order = torch.argsort(values, descending=True, stable=True)[:top_k]
        chosen = values[order]
        order_list, chosen_list = torch.stack([order.to(chosen.dtype), chosen]).tolist()  # one sync per depth
        expand = [frontier_start + int(index) for index, value in zip(order_list, chosen_list) if math.isfinite(value)]
        return expand, chosen_list[0] if chosen_list else -math.inf

    def _static_nodes(self, node_ids: torch.Tensor, position: int, masks: dict[str, torch.Tensor],
                      padding: int) -> torch.Tensor:
        """The compiled depth step over `top_k` slots: the frontier, then `padding` copies of its first node
        (their rows are dropped; each sees only the prefix and itself, so its attention stays finite)."""
        base = self.base
        ids = torch.cat([node_ids, node_ids[:, :1].expand(1, padding)], dim=1)
        ids = ids if self.nodes_readable else base._readable(ids)
        positions = torch.full((1, ids.shape[1]), position, dtype=torch.long, device=base.device)
        logits = self.static.nodes_step(ids, positions, masks, base.cached)
        base.cached += ids.shape[1]
        return logits[: node_ids.shape[1]]

    def _masks(self, expand: list[int], fed: list[int], fed_visible: torch.Tensor, fed_row_of: dict[int, int],
               position: int, padding: int = 0) -> dict[str, torch.Tensor]:
        """Masks for feeding `expand` (one depth, at `position`) after the prefix and the fed slots `fed`,
        then `padding` filler rows (the static path's fixed width).

        `fed_visible[i]` holds which tree slots fed slot i sees; the new rows are written into it (a node sees
        what its parent sees, and itself). `fed_row_of` gives a fed node's slot (the caller adds `expand`'s).
        """
        base = self.base
        num_fed, num_prefix = len(fed), self.root_slots
        num_rows = len(expand) + padding
        width = num_fed + num_rows
        empty = fed_visible.shape[0] - 1
        parent_rows = [fed_row_of.get(self._parent[index], empty) for index in expand] + [empty] * padding
        rows = fed_visible[torch.tensor(parent_rows, dtype=torch.long, device=fed_visible.device)]
        own = torch.arange(num_fed, width, device=fed_visible.device)
        rows[torch.arange(num_rows, device=fed_visible.device), own] = True  # each row sees itself
        fed_visible[num_fed:width] = rows
        unused = self.static.max_cache_len - num_prefix - width if self.static is not None else 0
        window = self.layout.sliding_window
        # No key is a window back: one mask serves every layer type, since the drafter's cache hands them all the
        # same slots (a plain DynamicCache, or a static one no longer than the window, which the tree fits in).
        if window is None or position < window:
            kv_length = num_prefix + width + unused
            mask = torch.full((num_rows, kv_length), torch.finfo(self.dtype).min, dtype=self.dtype, device=base.device)
            mask[:, :num_prefix] = 0
            mask[:, num_prefix : num_prefix + width].masked_fill_(rows[:, :width], 0)
            mask = mask[None, None]
            return {kind: mask for kind in self.layout.layer_types}
        # Logical positions of every slot: prefix slots are their positions; a node at depth d sits at
        # root + d (a filler at its row's depth). Earlier depths come first in `fed`.
        root_position = position - self._depth[expand[0]]
        depth_of_slot = ([self._depth[index] if index != PADDING else 0 for index in fed]
                         + [self._depth[expand[0]]] * num_rows)
        key_positions = [torch.arange(num_prefix), root_position + torch.tensor(depth_of_slot, dtype=torch.long)]
        parts = [torch.ones(num_rows, num_prefix, dtype=torch.bool, device=base.device), rows[:, :width]]
        if unused:  # the static cache hands attention every slot: the unwritten ones stay hidden
            parts.append(torch.zeros(num_rows, unused, dtype=torch.bool, device=base.device))
            key_positions.append(torch.zeros(unused, dtype=torch.long))
        visible = torch.cat(parts, dim=1)
        query_positions = torch.full((num_rows,), position, dtype=torch.long, device=base.device)
        return tree_attention_masks(self.layout, base.cache, query_positions, torch.cat(key_positions).to(base.device),
                                    visible, self.dtype)

    def _seen_rows(self, seen: torch.Tensor, nodes: list[int], tokens: torch.Tensor, parents: list[int]
                   ) -> torch.Tensor:
        """Per-node repetition-penalty history: the committed tokens plus the node's path."""
        rows = seen.unsqueeze(0).repeat(len(nodes), 1)
        for row, index in enumerate(nodes):
            path, node = [], index
            while node != -1:  # drafts lie in the drafter's draftable ids, the width of `seen`
                path.append(node)
                node = parents[node]
            rows[row].index_fill_(0, tokens[torch.tensor(path, dtype=torch.long, device=tokens.device)], True)
        return rows

    def _best_tree(self, parents: list[int], depths: list[int], scores: torch.Tensor) -> tuple[DraftTree, list[int]]:
        """The `size` most probable pool nodes (ties: earlier first, so parents precede children), BFS order."""
        values = scores
        order = torch.argsort(values, descending=True, stable=True)
        finite = torch.isfinite(values[order])
        ranked = [index for index, ok in zip(order.tolist(), finite.tolist()) if ok][: self.shape.size]
        # parent + log q <= parent in floating point too, and ties keep the earlier (parent) first: the
        # ranked set holds every ranked node's parent. The filter only guards that invariant.
        kept, node_of = [], {}
        for index in sorted(ranked, key=lambda index: (depths[index], index)):
            if parents[index] == -1 or parents[index] in node_of:
                kept.append(index)
                node_of[index] = len(kept)
        tree = DraftTree(parents=[0 if parents[index] == -1 else node_of[parents[index]] for index in kept],
                         depths=[depths[index] for index in kept])
        return tree, kept

