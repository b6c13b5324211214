"""Training: the two phases (projector pretraining, fine-tuning on target answers) and their data.

    from massv.train import train_phase
    result = train_phase(config, 1)                 # phase 1 as the config says
    result = train_phase(config, 2, resume=True)    # phase 2, continuing from its latest checkpoint

The recipes are imported on call, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from massv.config import RunConfig
    from massv.train.phase_run import PhaseResult


def train_phase(config: RunConfig, phase: int | str, **kwargs: Any) -> PhaseResult:
    """Run phase 1 or 2 (`massv.train.phase1.run` / `phase2.run`; keyword arguments are passed on:
    resume, target, drafter, processor, dataset, stop_after_steps, cache_image_features)."""
    phase_number = {"1": 1, "2": 2, "phase1": 1, "phase2": 2}.get(str(phase))
    if phase_number is None:
        raise ValueError(f"phase must be 1 or 2, got {phase!r}")
    if phase_number == 1:
        from massv.train.phase1 import run
    else:
        from massv.train.phase2 import run
    return run(config, **kwargs)


__all__ = ["train_phase"]
