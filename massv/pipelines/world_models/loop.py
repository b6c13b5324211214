"""The one training loop of the world models: forward, loss, backward, clip, AdamW, cosine LR.

Why its own loop and not massv.train: these are the *target* and the text LM trained from scratch with
no drafter in sight; the library's recipes train a MultimodalDrafter."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from massv.pipelines.world_models.recipe import WorldRecipe

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Training.


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norms, biases and gains are not shrunk)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loop(model: torch.nn.Module, make_batch: Callable[[int], dict[str, torch.Tensor]], steps: int, lr: float,
                warmup_steps: int, recipe: WorldRecipe, name: str, progress: bool,
                probe: Callable[[], str] | None = None, probe_every: int = 0) -> list[float]:
    """The whole training step, in one place: forward, loss, backward, clip, AdamW, cosine LR.

    `probe` (called every `probe_every` steps, in eval mode) only logs; it never changes the weights.
    """
    optimizer = adamw(model, lr, recipe.weight_decay)
    schedule = cosine_schedule(optimizer, warmup_steps, steps, recipe.min_lr_ratio)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"train {name}", unit="step", disable=not progress)
    for step in bar:
        batch = make_batch(step)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            recent = statistics.fmean(losses[-50:])
            bar.set_postfix(loss=f"{recent:.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            logger.info("%s step %d/%d loss %.4f", name, step + 1, steps, recent)
        if probe is not None and probe_every and (step + 1) % probe_every == 0 and step + 1 < steps:
            model.eval()
            logger.info("%s step %d probe: %s", name, step + 1, probe())
            model.train()
    model.eval()
    return losses
