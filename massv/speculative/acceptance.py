"""Acceptance rules: which drafts the target keeps, and the one token it adds after them.

Both rules work on tensors and read back to the host once per block: the accepted count, the next token
and the drafts' ids, in one transfer (so a proposer need not read its last draft back itself). The
accepted count is `((~accepted).cumsum() < 1).sum()`, the length of the all-accepted prefix, as in Hugging
Face's `_speculative_sampling`: no per-draft Python loop.
"""

from __future__ import annotations

import torch

from massv.speculative.sampling import sample
from massv.speculative.tree import DraftTree

Verdict = tuple[int, int, list[int]]  # (num_accepted, next_token, every draft's id)


def _read_back(num_accepted: torch.Tensor, next_token: torch.Tensor, drafts: torch.Tensor) -> Verdict:
    """The block's one host sync."""
    values = torch.cat([num_accepted.view(1), next_token.view(1).to(num_accepted.dtype),
                        drafts.to(num_accepted.dtype)]).tolist()
    return int(values[0]), int(values[1]), [int(value) for value in values[2:]]


def accept_greedy(drafts: torch.Tensor, target_scores: torch.Tensor) -> Verdict:
    """Accept drafts while each equals the target's argmax; then the target's own argmax.

    `drafts: (n,)` ids; `target_scores: (n + 1, vocab)`, row i the target's processed scores for the
    position of draft i, the last row the position after all drafts. Returns `(num_accepted, next_token,
    draft_ids)`: exactly the tokens step-by-step greedy decoding would produce.
    """
    choice = target_scores.argmax(dim=-1)  # (n + 1,)
    drafts = drafts.to(choice.device)
    matches = drafts == choice[:-1]
    num_accepted = ((~matches).cumsum(dim=0) < 1).sum()
    return _read_back(num_accepted, choice.gather(0, num_accepted.view(1)), drafts)


def residual_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row: what to sample after a rejection so the emitted token is distributed as p."""
    residual = torch.clamp(target_probs - draft_probs, min=0.0)
    total = residual.sum(dim=-1, keepdim=True)
    # total == 0 only through rounding (a rejection implies p(x) < q(x), hence mass elsewhere): fall back to p.
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(residual.dtype).tiny), target_probs)


def accept_sampled(drafts: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                   generator: torch.Generator | None = None) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the emitted tokens are distributed as p.

    `draft_probs: (n, vocab)` are the distributions the drafts were sampled from (q, zero outside the
    draftable ids); `target_probs: (n + 1, vocab)` the target's warped distributions at the same positions
    plus the one after. Draft i is kept with probability min(1, p_i(x) / q_i(x)); at the first rejection the
    next token is drawn from norm(max(0, p_i - q_i)); after full acceptance from p_n, which is the same
    formula with q_n = 0. Returns `(num_accepted, next_token, draft_ids)`.
    """
    num_drafts = drafts.shape[0]
    device = target_probs.device
    if num_drafts == 0:
        return 0, int(sample(target_probs[0], generator)), []
    if draft_probs is None or draft_probs.shape != (num_drafts, target_probs.shape[-1]):
        shape = None if draft_probs is None else tuple(draft_probs.shape)
        raise ValueError(f"draft distributions of shape {shape} do not match {num_drafts} drafts over "
                         f"{target_probs.shape[-1]} ids")
    drafts = drafts.to(device)
    draft_probs = draft_probs.to(device)
    rows = torch.arange(num_drafts, device=device)
    p_draft = target_probs[rows, drafts]
    q_draft = draft_probs[rows, drafts]
    uniform = torch.rand(num_drafts, generator=generator, device=device)
    accepted = uniform * q_draft < p_draft  # u < p/q without the division (q > 0: drafts were sampled from q)
    num_accepted = ((~accepted).cumsum(dim=0) < 1).sum()
    q_with_bonus_row = torch.cat([draft_probs, torch.zeros_like(draft_probs[:1])])  # q_n = 0: residual is p_n
    index = num_accepted.view(1, 1).expand(1, target_probs.shape[-1])
    residual = residual_distribution(target_probs.gather(0, index), q_with_bonus_row.gather(0, index))
    return _read_back(num_accepted, sample(residual[0], generator), drafts)


# ---- trees --------------------------------------------------------------------------------------------
TreeVerdict = tuple[list[int], int, list[int]]  # (accepted path of node indices, next_token, every draft's id)


def accept_tree_greedy(drafts: torch.Tensor, tree: DraftTree, target_scores: torch.Tensor) -> TreeVerdict:
    """Walk down the tree while a child equals the target's argmax at its parent; then the target's argmax.

    `drafts: (n,)` the nodes' ids, `target_scores: (n + 1, vocab)` row i the target's scores after the path
    to node i (row 0: the root). Siblings differ, so at most one child of a node matches and the accepted
    nodes form one path: the deepest node whose ancestors all matched. One host sync, as for a chain.
    """
    choice = target_scores.argmax(dim=-1)  # (n + 1,)
    device = choice.device
    drafts = drafts.to(device)
    parents = torch.tensor(tree.parents, dtype=torch.long, device=device)
    matches = torch.cat([torch.ones(1, dtype=torch.bool, device=device), drafts == choice[parents]])
    ancestors = tree.ancestors(device)
    on_accepted_path = ~(ancestors & ~matches[None, :]).any(dim=1)  # (n + 1,) every ancestor-or-self matched
    deepest = torch.where(on_accepted_path, tree.node_depths(device), -1).argmax()
    path_mask = ancestors[deepest]
    values = torch.cat([choice[deepest].view(1), drafts, path_mask[1:].to(drafts.dtype)]).tolist()
    num_drafts = drafts.shape[0]
    path = [index + 1 for index, flag in enumerate(values[1 + num_drafts :]) if flag]
    return path, int(values[0]), [int(value) for value in values[1 : 1 + num_drafts]]


def accept_tree_sampled(drafts: torch.Tensor, tree: DraftTree, target_probs: torch.Tensor,
                        generator: torch.Generator | None = None) -> TreeVerdict:
    """Multi-draft speculative sampling over a tree of deterministic drafts (EAGLE's recursive rejection).

    At a node with target distribution p, its children x_1, x_2, ... are tried in order: x_i is accepted
    with probability p_i(x_i), where p_1 = p and p_{i+1} = p_i with x_i removed and renormalised. Whatever
    is not accepted by the children is drawn from the last residual. Each token x is thereby emitted with
    probability exactly p(x) (x_1 with p(x_1); x_2 with (1 - p(x_1)) p(x_2) / (1 - p(x_1)); ...), so the
    output has the target's distribution for any choice of children: the drafter only decides which
    tokens are tried first. An accepted child continues the walk with its own row of `target_probs`.
    One host sync per visited node (the children's probabilities).
    """
    device = target_probs.device
    draft_ids = drafts.tolist()
    node, path = 0, []
    while True:
        children = tree.children(node)
        row = target_probs[node]
        if not children:
            return path, int(sample(row, generator)), draft_ids
        child_ids = torch.tensor([draft_ids[child - 1] for child in children], dtype=torch.long, device=device)
        uniforms = torch.rand(len(children), generator=generator, device=device)
        child_mass, uniform_values = torch.stack([row[child_ids], uniforms]).tolist()
        remaining = float(row.sum())
        accepted = None
        for child, mass, uniform in zip(children, child_mass, uniform_values):
            if remaining > 0 and uniform * remaining < mass:  # u < p_i(x_i) = mass / remaining
                accepted = child
                break
            remaining -= mass
        if accepted is None:
            residual = row.clone()
            residual[child_ids] = 0.0
            total = residual.sum()
            # Rounding can leave no residual mass (children covered p): then p itself is the right law.
            residual = residual / total if float(total) > 0 else row
            return path, int(sample(residual, generator)), draft_ids
        path.append(accepted)
        node = accepted
