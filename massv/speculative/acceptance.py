"""Acceptance rules: which drafts the target keeps, and the one token it adds after them.

Both rules work on tensors and read back to the host once per block: the accepted count, the next token
and the drafts' ids, in one transfer (so a proposer need not read its last draft back itself). The
accepted count is `((~accepted).cumsum() < 1).sum()`, the length of the all-accepted prefix, as in Hugging
Face's `_speculative_sampling`: no per-draft Python loop.
"""

from __future__ import annotations

import torch

from massv.speculative.sampling import sample


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
