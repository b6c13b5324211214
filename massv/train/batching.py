"""How examples become micro-batches, and how many micro-batches make one optimizer step.

Two layouts:
- plain: `per_device_batch_size` samples drawn in a seeded random order (a fresh order each epoch);
- by token budget (`max_tokens_per_batch`): samples of similar length share a micro-batch, which holds at
  most `max_tokens_per_batch` padded tokens (samples x longest sample) and `per_device_batch_size` samples.
  One long prompt no longer pads seven short ones to 2048 tokens. The batches are formed once (by length,
  ties broken by the seed) and their order is reshuffled every epoch, so the number of batches is fixed
  and a resumed run replays exactly the same ones.

`global_batch_size` fixes the samples per optimizer step over all processes; the accumulation steps follow
from the number of processes of the launch (with a token budget the per-device count is an upper bound,
so the global batch is one too).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from massv.config import TrainingConfig

logger = logging.getLogger(__name__)


def resolve_accumulation(cfg: TrainingConfig, num_processes: int) -> TrainingConfig:
    """`cfg` with `gradient_accumulation_steps` derived from `global_batch_size` for `num_processes`."""
    if cfg.global_batch_size is None:
        return cfg
    per_step = cfg.per_device_batch_size * num_processes
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of per_device_batch_size "
            f"{cfg.per_device_batch_size} x {num_processes} processes = {per_step}: choose a per-device batch or a "
            "process count that divides it"
        )
    steps = cfg.global_batch_size // per_step
    logger.info("global batch %d = %d per device x %d processes x %d accumulation steps", cfg.global_batch_size,
                cfg.per_device_batch_size, num_processes, steps)
    return dataclasses.replace(cfg, gradient_accumulation_steps=steps)


class _EpochPermutation(Sampler[int]):
    """A seeded random order of `size` items, a new one per epoch (accelerate calls `set_epoch`)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Fixed micro-batches of similar-length samples under a padded-token budget, in a per-epoch shuffled order.

    Has no `batch_size`, which tells accelerate to shard it batch by batch over the processes.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, max_samples: int, seed: int) -> None:
        if not lengths:
            raise ValueError("no examples to batch")
        generator = torch.Generator().manual_seed(seed)
        tie_break = torch.randperm(len(lengths), generator=generator).tolist()
        order = sorted(range(len(lengths)), key=lambda index: (lengths[index], tie_break[index]))
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:  # ascending length: the newest sample is always the longest of its batch
            if current and (len(current) >= max_samples or lengths[index] * (len(current) + 1) > max_tokens):
                batches.append(current)
                current = []
            current.append(index)
        batches.append(current)
        self.batches = batches
        self.sampler = _EpochPermutation(len(batches), seed)
        padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
        logger.info("%d micro-batches of up to %d tokens / %d samples; %.1f%% of their tokens are padding",
                    len(batches), max_tokens, max_samples, 100 * (1 - sum(lengths) / padded))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch_index in self.sampler:
            yield list(self.batches[batch_index])

    def __len__(self) -> int:
        return len(self.batches)


def build_dataloader(dataset: Dataset, collate_fn: Callable, cfg: TrainingConfig, num_workers: int = 0) -> DataLoader:
    """The phase's DataLoader (not yet prepared by accelerate); its order depends on `cfg.seed` alone.

    The loader draws from its own seeded generator, never from the global RNG, so restoring the global RNG
    state on resume reproduces dropout masks too.
    """
    pin_memory = torch.cuda.is_available()
    if cfg.max_tokens_per_batch is None:
        generator = torch.Generator().manual_seed(cfg.seed)
        return DataLoader(dataset, batch_size=cfg.per_device_batch_size, collate_fn=collate_fn,
                          sampler=RandomSampler(dataset, generator=generator), generator=generator,
                          num_workers=num_workers, pin_memory=pin_memory)
    lengths = getattr(dataset, "lengths", None)
    if lengths is None:
        raise ValueError("max_tokens_per_batch needs the examples' lengths (DrafterDataset.lengths)")
    sampler = TokenBudgetBatchSampler(lengths, cfg.max_tokens_per_batch, cfg.per_device_batch_size, cfg.seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=pin_memory)
