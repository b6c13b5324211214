"""Token choice and the speculative acceptance rule: the part of the engine that makes it lossless.

Everything here works on one sequence (batch size 1) and on plain tensors, so the acceptance rule can be
tested on synthetic distributions without any model.

Warping uses Hugging Face's own logits processors, in `generate()`'s order (repetition penalty, then
temperature, top-k, top-p), so the target distribution `p` we verify against is exactly the one
`target.generate(do_sample=True, temperature=T, top_k=K, top_p=P, repetition_penalty=R)` samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; `temperature == 0` means greedy (argmax), as `do_sample=False`.

    `top_k=0` disables top-k. (`target.generate(do_sample=True)` applies top_k=50 when neither the call nor
    the generation config sets it; `SpeculativeGenerator.resolve_settings` fills unset values the same way.)
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def target_processors(self) -> LogitsProcessorList:
        """The processors `generate()` builds for these settings, in its order (penalty before warpers)."""
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        processors.extend(self.warpers())
        return processors

    def warpers(self) -> LogitsProcessorList:
        """Temperature / top-k / top-p, applied only when sampling (greedy ignores them, as HF does)."""
        warpers = LogitsProcessorList()
        if self.greedy:
            return warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            warpers.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return warpers


def process_rows(logits: torch.Tensor, prefix_ids: torch.Tensor, processors: LogitsProcessorList) -> torch.Tensor:
    """Apply `processors` to each row of `logits: (n, vocab)`; row i continues `prefix_ids[: len - n + 1 + i]`.

    `prefix_ids: (1, length)` ends with the token whose successor row 0 predicts; the rows predict successive
    positions, so a context-dependent processor (repetition penalty) sees exactly the tokens generate() would.
    """
    scores = logits.float()
    if len(processors) == 0:
        return scores
    num_rows = scores.shape[0]
    base_length = prefix_ids.shape[1] - num_rows + 1
    rows = [processors(prefix_ids[:, : base_length + index], scores[index : index + 1].clone()) for index in range(num_rows)]
    return torch.cat(rows, dim=0)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from `probs: (vocab,)`, with the same call `generate()` uses (torch.multinomial)."""
    return int(torch.multinomial(probs, num_samples=1, generator=generator).item())


def verify_greedy(draft_tokens: list[int], target_scores: torch.Tensor) -> tuple[int, int]:
    """Greedy verification: accept drafts while each equals the target's argmax.

    `target_scores: (len(draft_tokens) + 1, vocab)`; row i is the target's (processed) scores for the position
    of draft i, the last row the position after all drafts. Returns `(num_accepted, next_token)`, where
    `next_token` is the target's own choice at the first mismatch (or the bonus token if all matched): the
    emitted tokens are exactly what step-by-step greedy decoding would produce.
    """
    target_choice = target_scores.argmax(dim=-1).tolist()
    for index, token in enumerate(draft_tokens):
        if token != target_choice[index]:
            return index, int(target_choice[index])
    return len(draft_tokens), int(target_choice[len(draft_tokens)])


def residual_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): what to sample after a rejection so the emitted token is distributed as p."""
    residual = torch.clamp(target_probs - draft_probs, min=0.0)
    total = residual.sum()
    if float(total) <= 0.0:
        # Only reachable through rounding (a rejection implies p(x) < q(x), hence some mass elsewhere).
        return target_probs
    return residual / total


def verify_sampled(
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the output is distributed as p.

    `draft_probs: (n, vocab)` are the distributions the drafts were sampled from (q, zero outside the
    draftable ids); `target_probs: (n + 1, vocab)` are the target's warped distributions at the same positions
    plus the one after. Draft i is accepted with probability min(1, p_i(x) / q_i(x)); at the first rejection
    the next token is drawn from norm(max(0, p_i - q_i)); if all are accepted a bonus token is drawn from
    p_n. Returns `(num_accepted, next_token)`. With no drafts (`draft_probs` may be None) it is plain sampling.
    """
    if not draft_tokens:
        return 0, sample(target_probs[0], generator)
    if draft_probs is None or draft_probs.shape[-1] != target_probs.shape[-1]:
        raise ValueError(f"draft and target distributions differ in width: {draft_probs.shape[-1]} vs {target_probs.shape[-1]}")
    for index, token in enumerate(draft_tokens):
        p_token = float(target_probs[index, token])
        q_token = float(draft_probs[index, token])
        uniform = float(torch.rand((), generator=generator, device=target_probs.device))
        # Accept iff u < p/q, written without the division (q > 0: the token was sampled from q).
        if uniform * q_token < p_token:
            continue
        return index, sample(residual_distribution(target_probs[index], draft_probs[index]), generator)
    return len(draft_tokens), sample(target_probs[len(draft_tokens)], generator)


def probs_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """softmax over warped scores (-inf entries get probability 0), in float32 as generate() does."""
    return torch.softmax(scores.float(), dim=-1)
