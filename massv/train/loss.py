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

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Rows of the LM head output alive at once: 1024 x 262k (Gemma3) float32 logits are 1 GiB.
LOSS_CHUNK_TOKENS = 1024


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, vocab_limit: int,
                    softcap: float | None) -> torch.Tensor:
    """Summed cross-entropy of `hidden: (n, hidden_size)` predicting `targets: (n,)`."""
    logits = lm_head(hidden)[:, :vocab_limit]
    if softcap is not None:  # Gemma-style final logit soft-capping, as the model's own forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    return nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def answer_token_loss(hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, vocab_limit: int,
                      softcap: float | None = None, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross-entropy where `labels` is set.

    `hidden_states: (batch, seq_len, hidden_size)` is the LM body's output (after its final norm) and
    `labels: (batch, seq_len)` holds the token at each position or -100; position t predicts `labels[:, t + 1]`.
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
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, num_targets, chunk_tokens):
        chunk = (hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens], lm_head, vocab_limit, softcap)
        total = total + (checkpoint(_chunk_loss_sum, *chunk, use_reentrant=False) if recompute
                         else _chunk_loss_sum(*chunk))
    return total / num_targets
