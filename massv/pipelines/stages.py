"""Stage reuse shared by the pipelines: a training phase whose output directory already holds its final
drafter is loaded, not retrained.

Why it is safe: the pipelines key every output directory by a hash of the stage's resolved config (and of the
stages it reads from), so a finished drafter found there was trained with this very config.
"""

from __future__ import annotations

import logging
from typing import Any

from massv.config import RunConfig, final_dir
from massv.drafter import MultimodalDrafter
from massv.train.phase_run import phase_config

logger = logging.getLogger(__name__)


def is_trained(output_dir: Any) -> bool:
    """Whether a phase's `output_dir` holds its finished drafter."""
    return (final_dir(output_dir) / "massv_drafter.json").is_file()


def train_or_load(config: RunConfig, phase: int, target: Any, drafter: MultimodalDrafter, processor: Any,
                  records: Any, reused: dict[str, bool] | None = None, stage: str | None = None) -> MultimodalDrafter:
    """Run `phase` on `records` unless its final drafter exists (then load that); `reused[stage]` records which.

    An interrupted run of the same stage continues from its newest checkpoint (`resume="auto"`).
    """
    output_dir = phase_config(config, phase).output_dir
    found = is_trained(output_dir)
    if reused is not None and stage is not None:
        reused[stage] = found
    if found:
        logger.info("reusing %s (trained with this stage's config)", final_dir(output_dir))
        return MultimodalDrafter.from_pretrained(final_dir(output_dir), target=target)
    from massv.train import train_phase  # looked up on call: tests replace it to prove a stage is reused

    result = train_phase(config, phase, resume="auto", target=target, drafter=drafter, processor=processor,
                         dataset=records)
    return result.drafter
