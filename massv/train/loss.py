"""Next-token loss on the answer tokens only, the LM head applied in chunks that are recomputed in backward.

Why: a training step's largest tensor used to be the logits, `(batch, seq_len, vocab)` for every position,
image tokens and padding included, kept in the compute dtype, again in float32 for the loss, and once more
as their gradient. Gemma-3-1B at batch 8 x 2048 has a 262k vocabulary: 8.6 GB per copy in bf16, 17 GB in
float32. Only the positions whose next token is an answer token carry loss, and only their logits are
needed. Here the LM body's hidden states at those positions go through the head `chunk_tokens` rows at a
time; each chunk's logits are dropped after its loss and recomputed in backward (activation
checkpointing), so at most one chunk's logits, `(chunk_tokens, vocab)`, is alive at any time.

The loss is the same number as cross-entropy over full logits with -100 ignored (mean over the answer
tokens), up to float summation order; ids at or past `vocab_limit` (embedding padding, ids the drafter
must never propose) get no probability, exactly as if their logits were -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Rows of the LM head output alive at once: 1024 x 262k (Gemma3) float32 logits are 1 GiB.
LOSS_CHUNK_TOKENS = 1024


@dataclass
class SoftLabelBatch:
    """A micro-batch's soft labels (`massv.train.soft_labels`), one row per answer token in the loss's order,
    and how the loss mixes them in. `to` lets Accelerate move it with the rest of the batch."""

    ids: torch.Tensor  # (num_answer_tokens, k) the target's most probable ids
    logprobs: torch.Tensor  # (num_answer_tokens, k) their log-probabilities, renormalised over the k
    weight: float  # share of KL(target || drafter) in the loss; the rest is cross-entropy on the answers
    temperature: float = 1.0

    def to(self, device: torch.device | str) -> SoftLabelBatch:
        return SoftLabelBatch(self.ids.to(device), self.logprobs.to(device), self.weight, self.temperature)


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, vocab_limit: int,
                    softcap: float | None, soft_ids: torch.Tensor | None = None,
                    soft_logprobs: torch.Tensor | None = None, soft_weight: float = 0.0,
                    soft_temperature: float = 1.0) -> torch.Tensor:
    """Summed loss of `hidden: (n, hidden_size)` predicting `targets: (n,)`: cross-entropy, mixed with
    `soft_weight` x KL(target || drafter) over the target's top-k ids `soft_ids: (n, k)` when given."""
    logits = lm_head(hidden)[:, :vocab_limit]
    if softcap is not None:  # Gemma-style final logit soft-capping, as the model's own forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    hard = nn.functional.cross_entropy(logits, targets, reduction="sum")
    if soft_ids is None or soft_weight == 0.0:
        return hard
    drafter_logprobs = torch.log_softmax(logits / soft_temperature, dim=-1).gather(1, soft_ids)
    target_probs = soft_logprobs.exp()
    kl = (target_probs * (soft_logprobs - drafter_logprobs)).sum()
    # x T^2 keeps the soft term's gradient scale independent of the temperature (Hinton et al.)
    return (1.0 - soft_weight) * hard + soft_weight * soft_temperature ** 2 * kl


def answer_token_loss(hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, vocab_limit: int,
                      softcap: float | None = None, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                      soft_labels: SoftLabelBatch | None = None) -> torch.Tensor:
    """Mean next-token loss where `labels` is set.

    `hidden_states: (batch, seq_len, hidden_size)` is the LM body's output (after its final norm) and
    `labels: (batch, seq_len)` holds the token at each position or -100; position t predicts `labels[:, t + 1]`.
    With soft labels (`massv.train.soft_labels`: the target's top-k ids and renormalised log-probabilities,
    one row per supervised position, sample by sample in position order) the loss per token is
    (1 - weight) x cross-entropy + weight x T^2 x KL(target || drafter at temperature T), T and the weight
    as `soft_labels` says.
    """
    shift_labels = labels[:, 1:].to(hidden_states.device)
    supervised = shift_labels != IGNORE_INDEX
    hidden = hidden_states[:, :-1][supervised]  # (num_answer_tokens, hidden_size)
    targets = shift_labels[supervised]
    num_targets = targets.shape[0]
    if num_targets == 0:  # keeps the graph (and DDP's gradient hooks) intact; the data never yields this
        return hidden_states.sum() * 0.0
    largest = int(targets.max())
    if largest >= vocab_limit:
        raise ValueError(f"label id {largest} is outside the {vocab_limit} ids the drafter can propose: labels "
                         "must be token ids of the target's tokenizer")
    soft = None
    if soft_labels is not None:
        if soft_labels.ids.shape[0] != num_targets:
            raise ValueError(f"{soft_labels.ids.shape[0]} soft-label rows for {num_targets} answer tokens: the soft "
                             "labels were computed for other examples (delete their cache directory to recompute them)")
        soft = (soft_labels.ids.to(hidden.device, torch.int64), soft_labels.logprobs.to(hidden.device, torch.float32))
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, num_targets, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        mixed = () if soft is None else (soft[0][rows], soft[1][rows], soft_labels.weight, soft_labels.temperature)
        chunk = (hidden[rows], targets[rows], lm_head, vocab_limit, softcap, *mixed)
        total = total + (checkpoint(_chunk_loss_sum, *chunk, use_reentrant=False) if recompute
                         else _chunk_loss_sum(*chunk))
    return total / num_targets
