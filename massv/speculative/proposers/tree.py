"""Tree drafting (EAGLE-2's dynamic draft tree) over the LM drafters: MASSV and the text-only baseline.

One block:
  1. feed the drafter the committed tokens it has not seen (the last is the tree's root): its
     distribution there gives the root's `top_k` children;
  2. for each further depth, ONE batched drafter forward over the `width` (EAGLE-2: `top_k`) most probable
     nodes of the newest layer (each at position root + depth, seeing the prefix and its ancestors through a
     tree mask on the drafter's own KV cache); each gives `top_k` children, scored by cumulative
     log-probability. While the fed nodes form one path (always with `width=1`) the cache is a plain causal
     sequence, so the step is the chain's one-token step, without a mask;
  3. keep the `size` best nodes over all depths by cumulative log-probability (a child is never more
     probable than its parent, so the kept set is a tree): first the drafter's first-choice path, then the
     rest breadth-first, so that the target accepting that path (the usual case at T = 0) is a crop of
     both caches rather than a gather.
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
        # tokens: every masked depth feeds `width` nodes (the frontier padded), so one compiled graph serves
        # them all.
        static = base.static
        tree_slots = shape.depth * shape.expanded_per_depth
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

    # ---- the seam --------------------------------------------------------------------------------------
    def prefill(self, sequence: CommittedTokens) -> int:
        return self.base.prefill(sequence)

    def propose(self, sequence: CommittedTokens, max_tokens: int) -> Proposal:
        """A tree of at most `shape.size` nodes and depth `min(shape.depth, max_tokens)`."""
        base, request = self.base, self.request
        depth_limit = min(self.shape.depth, max_tokens)
        width = self.shape.expanded_per_depth
        device = base.device
        pending = base._readable(sequence.generated_ids(base.cached - base.prompt.shape[1]).to(device))
        history = base._history_for_block(sequence)
        seen = None if history is None else history.seen
        root_logits = base._forward(pending)[:, : base.draftable]  # (1, draftable)
        self.root_slots = root_position = base.cached
        root_position -= 1

        pool = NodePool()
        fed: list[int] = []  # pool indices in drafter cache order
        # Which tree slots each fed slot sees (its ancestors and itself), one row per slot; the extra last row
        # stays empty: the root's children and the static path's fillers take it as their parent's.
        tree_slots = depth_limit * width
        fed_visible = torch.zeros(tree_slots + 1, tree_slots, dtype=torch.bool, device=device)
        fed_row_of: dict[int, int] = {}  # pool index -> its slot among the fed (`fed`'s inverse, fillers aside)
        # While every fed node is the previous one's child, the fed slots are one causal path: the chain's
        # one-token step sees exactly its ancestors, and `fed_visible` (lower-triangular then) is filled only
        # if a wider depth comes later.
        fed_is_path = True
        pool.add_children([-1], 1, *self._top_children(root_logits, None if seen is None else seen.unsqueeze(0)))
        frontier_start = 0  # the newest depth's nodes are the pool's tail
        forwards = 1
        min_log_probability = math.log(self.shape.min_probability) if self.shape.min_probability > 0 else -math.inf
        for depth in range(2, depth_limit + 1):
            expand = pool.expandable(frontier_start, width, request.eos_token_ids, min_log_probability)
            if not expand:
                break
            node_ids = torch.tensor([[pool.tokens[index] for index in expand]], dtype=torch.long, device=device)
            positions = root_position + depth - 1  # the whole frontier sits at one depth
            padding = 0
            if fed_is_path and len(expand) == 1 and pool.parents[expand[0]] == (fed[-1] if fed else -1):
                # The next node of one path: a causal step (position == the cache length) is the tree mask.
                logits = base._forward(node_ids if self.nodes_readable else base._readable(node_ids))
            else:
                if fed_is_path:  # leaving the path: from here on masks, which read the path's visibility
                    fed_visible[: len(fed), : len(fed)] = torch.ones(len(fed), len(fed), dtype=torch.bool,
                                                                     device=device).tril()
                    fed_is_path = False
                padding = width - len(expand) if self.static is not None else 0
                masks = self._masks(pool, expand, fed, fed_visible, fed_row_of, positions, padding)
                if self.static is None:
                    logits = base.forward_nodes(node_ids, torch.full((len(expand),), positions, device=device),
                                                masks, readable=self.nodes_readable)
                else:
                    logits = self._static_nodes(node_ids, positions, masks, padding)
            fed_row_of.update((index, len(fed) + row) for row, index in enumerate(expand))
            fed += expand + [PADDING] * padding
            forwards += 1
            rows_seen = None if seen is None else self._seen_rows(seen, expand, pool)
            frontier_start = len(pool)
            pool.add_children(expand, depth, *self._top_children(logits[:, : base.draftable], rows_seen))
        tree, chosen = self._best_tree(pool)
        self.node_slots = {node: self.root_slots + fed_row_of[index] for node, index in enumerate(chosen, start=1)
                           if index in fed_row_of}
        self.last_tree = tree
        tokens = torch.tensor([pool.tokens[index] for index in chosen], dtype=torch.long, device=request.target.device)
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
    def _top_children(self, logits: torch.Tensor, seen: torch.Tensor | None
                      ) -> tuple[list[list[int]], list[list[float]]]:
        """Each row's `top_k` ids and their log-probabilities under the drafter's processed scores (the same
        processors the target's get), read back in one transfer: `(rows, top_k)` host lists."""
        log_probs = torch.log_softmax(self.base.processor(logits, seen), dim=-1)
        values, ids = log_probs.topk(min(self.shape.top_k, log_probs.shape[-1]), dim=-1)
        # float64 holds every id exactly (float32 would round ids past 2**24)
        ids_list, values_list = torch.stack([ids.to(torch.float64), values.to(torch.float64)]).tolist()
        return [[int(token) for token in row] for row in ids_list], values_list

    def _static_nodes(self, node_ids: torch.Tensor, position: int, masks: dict[str, torch.Tensor],
                      padding: int) -> torch.Tensor:
        """The compiled depth step over `width` slots: the frontier, then `padding` copies of its first node
        (their rows are dropped; each sees only the prefix and itself, so its attention stays finite)."""
        base = self.base
        ids = torch.cat([node_ids, node_ids[:, :1].expand(1, padding)], dim=1)
        ids = ids if self.nodes_readable else base._readable(ids)
        positions = torch.full((1, ids.shape[1]), position, dtype=torch.long, device=base.device)
        logits = self.static.nodes_step(ids, positions, masks, base.cached)
        base.cached += ids.shape[1]
        return logits[: node_ids.shape[1]]

    def _masks(self, pool: NodePool, expand: list[int], fed: list[int], fed_visible: torch.Tensor,
               fed_row_of: dict[int, int], position: int, padding: int = 0) -> dict[str, torch.Tensor]:
        """Masks for feeding `expand` (pool indices, one depth, at `position`) after the prefix and the fed slots
        `fed`, then `padding` filler rows (the static path's fixed width).

        `fed_visible[i]` holds which tree slots fed slot i sees; the new rows are written into it (a node sees
        what its parent sees, and itself). `fed_row_of` gives a fed node's slot (the caller adds `expand`'s).
        """
        base = self.base
        num_fed, num_prefix = len(fed), self.root_slots
        num_rows = len(expand) + padding
        width = num_fed + num_rows
        empty = fed_visible.shape[0] - 1
        parent_rows = [fed_row_of.get(pool.parents[index], empty) for index in expand] + [empty] * padding
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
        root_position = position - pool.depths[expand[0]]
        depth_of_slot = ([pool.depths[index] if index != PADDING else 0 for index in fed]
                         + [pool.depths[expand[0]]] * num_rows)
        key_positions = [torch.arange(num_prefix), root_position + torch.tensor(depth_of_slot, dtype=torch.long)]
        parts = [torch.ones(num_rows, num_prefix, dtype=torch.bool, device=base.device), rows[:, :width]]
        if unused:  # the static cache hands attention every slot: the unwritten ones stay hidden
            parts.append(torch.zeros(num_rows, unused, dtype=torch.bool, device=base.device))
            key_positions.append(torch.zeros(unused, dtype=torch.long))
        visible = torch.cat(parts, dim=1)
        query_positions = torch.full((num_rows,), position, dtype=torch.long, device=base.device)
        return tree_attention_masks(self.layout, base.cache, query_positions, torch.cat(key_positions).to(base.device),
                                    visible, self.dtype)

    def _seen_rows(self, seen: torch.Tensor, nodes: list[int], pool: NodePool) -> torch.Tensor:
        """Per-node repetition-penalty history: the committed tokens plus the node's path."""
        rows = seen.unsqueeze(0).repeat(len(nodes), 1)
        for row, index in enumerate(nodes):  # drafts lie in the drafter's draftable ids, the width of `seen`
            path = torch.tensor([pool.tokens[node] for node in pool.path_to(index)], dtype=torch.long,
                                device=seen.device)
            rows[row].index_fill_(0, path, True)
        return rows

    def _best_tree(self, pool: NodePool) -> tuple[DraftTree, list[int]]:
        """The `size` most probable pool nodes (ties: earlier first, so parents precede children): the
        first-choice path from the root first, then the others breadth-first.

        Siblings enter the pool in the drafter's order of preference, so a node's first kept child (lowest pool
        index) is its most probable one, and every order below keeps siblings in that order."""
        scores, parents, depths = pool.scores, pool.parents, pool.depths
        floor = math.log(self.shape.min_node_probability) if self.shape.min_node_probability > 0 else -math.inf
        finite = [index for index in range(len(pool)) if math.isfinite(scores[index]) and scores[index] >= floor]
        ranked = sorted(finite, key=lambda index: -scores[index])[: self.shape.size]  # stable: ties keep order
        # parent + log q <= parent in floating point too, and ties keep the earlier (parent) first: the
        # ranked set holds every ranked node's parent. The filter only guards that invariant.
        breadth_first, first_child, present = [], {}, {-1}
        for index in sorted(ranked, key=lambda index: (depths[index], index)):
            if parents[index] in present:
                breadth_first.append(index)
                present.add(index)
                first_child.setdefault(parents[index], index)
        path, node = [], first_child.get(-1)
        while node is not None:
            path.append(node)
            node = first_child.get(node)
        on_path = set(path)
        kept = path + [index for index in breadth_first if index not in on_path]
        node_of = {index: position for position, index in enumerate(kept, start=1)}
        tree = DraftTree(parents=[0 if parents[index] == -1 else node_of[parents[index]] for index in kept],
                         depths=[depths[index] for index in kept])
        return tree, kept


class NodePool:
    """One block's candidate nodes, on the host: a tree has tens of nodes, and every choice made from them
    (which to expand, which to keep) is control flow, so one read-back per depth beats tensor bookkeeping."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.scores: list[float] = []  # cumulative drafter log-probability of the path to the node
        self.parents: list[int] = []  # pool index, -1 for the root's children
        self.depths: list[int] = []  # 1 for the root's children

    def __len__(self) -> int:
        return len(self.tokens)

    def add_children(self, parents: list[int], depth: int, ids: list[list[int]], log_probs: list[list[float]]) -> None:
        """Row i of `ids` / `log_probs` holds the children of `parents[i]` (-1: the root), best first."""
        for parent, row_ids, row_log_probs in zip(parents, ids, log_probs):
            base = self.scores[parent] if parent >= 0 else 0.0
            self.tokens.extend(row_ids)
            self.scores.extend(base + value for value in row_log_probs)
            self.parents.extend([parent] * len(row_ids))
            self.depths.extend([depth] * len(row_ids))

    def expandable(self, start: int, width: int, eos_token_ids: frozenset[int], floor: float) -> list[int]:
        """The `width` most probable nodes from pool index `start` on (the newest depth) worth expanding: not an
        end-of-sequence draft (nothing follows it), with a finite score; none if the best is below `floor`."""
        candidates = [index for index in range(start, len(self.tokens))
                      if self.tokens[index] not in eos_token_ids and math.isfinite(self.scores[index])]
        chosen = sorted(candidates, key=lambda index: -self.scores[index])[:width]  # stable: ties keep order
        return chosen if chosen and self.scores[chosen[0]] >= floor else []

    def path_to(self, index: int) -> list[int]:
        """Pool indices from `index` up to the root's child."""
        path = []
        while index != -1:
            path.append(index)
            index = self.parents[index]
        return path
