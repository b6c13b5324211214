"""Recovery fine-tuning of a compressed drafter: the phase-2 objective (self-distilled answers), masks held fixed.

Why a helper here rather than the phase-2 recipe: recovery must re-apply the sparsity masks after every
optimizer step, and it runs many times on small data inside `compression_table`; a recipe that reads a YAML
config and writes checkpoints is the wrong shape for that. This is the phase-2 step in one screen: projector
+ LM train, vision encoder frozen, next-token loss on the target's answer tokens, AdamW, gradient clipping.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator

import torch

from massv.compress.calibration import Batch, PreparedBatch, prepare_batches
from massv.compress.sparsity import SparsityMasks
from massv.drafter import MultimodalDrafter

logger = logging.getLogger(__name__)


def _cycle(batches: Iterable[Batch | PreparedBatch]) -> Iterator[Batch | PreparedBatch]:
    """Repeat a list or DataLoader forever (a one-shot generator runs out, which is an error, not a silent stop)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("recovery batches ran out (empty, or a generator that cannot be iterated twice)")


def recover(drafter: MultimodalDrafter, batches: Iterable[Batch | PreparedBatch], steps: int,
            masks: SparsityMasks | None = None, learning_rate: float = 2e-5, weight_decay: float = 0.0,
            max_grad_norm: float | None = 1.0, warmup_steps: int = 0, accumulation_steps: int = 1,
            log_every: int = 10) -> list[float]:
    """Fine-tune `drafter` for `steps` optimizer steps over `batches` (cycled); returns the per-step losses.

    Batches need `labels` (-100 where no loss); they are prepared (images encoded) as they are used, so a
    DataLoader over a large distilled set is fine. With `masks`, pruned weights stay exactly zero throughout.
    The learning rate warms up linearly for `warmup_steps`, then follows a cosine to zero, as in phase 2.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    previously_trainable = {name: parameter.requires_grad for name, parameter in drafter.named_parameters()}
    drafter.set_trainable("phase2")
    parameters = [parameter for parameter in drafter.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    handles = masks.attach(drafter.language_model, optimizer) if masks is not None else []
    losses: list[float] = []
    stream = _cycle(batches)
    drafter.train()
    try:
        for step in range(steps):
            step_loss = 0.0
            for _ in range(accumulation_steps):
                (batch,) = prepare_batches(drafter, [next(stream)])
                if batch.labels is None:
                    raise ValueError("recovery batches need labels: the target's answers, -100 on the prompt")
                loss = drafter(**batch.drafter_kwargs()).loss / accumulation_steps
                loss.backward()
                step_loss += loss.item()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if log_every and (step + 1) % log_every == 0:
                logger.info("recovery step %d/%d: loss %.4f", step + 1, steps, losses[-1])
    finally:
        for handle in handles:
            handle.remove()
        drafter.eval()
        for name, parameter in drafter.named_parameters():
            parameter.requires_grad_(previously_trainable.get(name, False))
    return losses
