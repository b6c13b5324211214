"""What both training phases do once they have chosen which drafter weights train: build the data, run the
loop, and save the finished drafter.

Why one place: phase 1 (projector only) and phase 2 (projector + LM, or LoRA) differ only in that choice and in
which modules they store in the checkpoint dtype; the data path, the feature cache, checkpointing, and the
save / wait / end-of-training order must not drift apart between them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from transformers import ProcessorMixin

from massv.config import RunConfig, TrainingConfig, final_dir, save_resolved_config
from massv.drafter import MultimodalDrafter
from massv.loading import storage_dtype
from massv.train.builders import (
    build_train_dataset,
    keep_trainable_in_fp32,
    move_vision_to,
)
from massv.train.loop import TrainResult, train_loop
from massv.train.preprocess import prepared_records

logger = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    """A finished (or deliberately interrupted) phase: the trained drafter and where it was saved."""

    drafter: MultimodalDrafter
    train: TrainResult
    final_path: Path | None  # None when the run stopped early (stop_after_steps)


def train_drafter(config: RunConfig, phase: int, accelerator: Accelerator, drafter: MultimodalDrafter,
                  processor: ProcessorMixin, dataset: Dataset | None, *, resume: bool,
                  stop_after_steps: int | None, cache_image_features: bool) -> tuple[MultimodalDrafter, TrainResult]:
    """Train the drafter's already-chosen trainable weights on the phase's records; returns the unwrapped
    drafter and the loop's result."""
    cfg = phase_config(config, phase)
    keep_trainable_in_fp32(drafter)
    move_vision_to(drafter, accelerator.device)
    if cfg.gradient_checkpointing:
        drafter.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Checked once, by the main process, and cached by content: resumes and the other processes reuse it.
    checked = prepared_records(config, phase, cfg.output_dir, processor, drafter.adapter, accelerator, dataset)
    train_data, collator = build_train_dataset(config, None, processor, drafter, checked=checked)
    if cache_image_features:  # small data sets only (tests, demo): features are kept in memory
        train_data.cache_image_features(lambda inputs: drafter.encode_images(
            {name: value.to(accelerator.device) for name, value in inputs.items()}))
    if accelerator.is_main_process:
        save_resolved_config(config, cfg.output_dir)
    result = train_loop(accelerator, drafter, train_data, collator, cfg, resume=resume,
                        num_workers=config.data.num_workers, stop_after_steps=stop_after_steps,
                        run_name=f"phase{phase}", tracker_config=config.to_dict())
    return accelerator.unwrap_model(drafter), result


def save_final_drafter(config: RunConfig, phase: int, accelerator: Accelerator, drafter: MultimodalDrafter,
                       stored_modules: Sequence[nn.Module]) -> Path:
    """Cast `stored_modules` (the ones the phase trained) to the checkpoint dtype, save the drafter to
    `<output_dir>/final` and finish the trackers on every process."""
    cfg = phase_config(config, phase)
    if cfg.gradient_checkpointing:
        drafter.language_model.gradient_checkpointing_disable()
    dtype = storage_dtype(config.model)
    if dtype is not None:
        for module in stored_modules:
            module.to(dtype=dtype)
    drafter.eval()
    drafter.config.training_data[f"phase{phase}"] = training_data_description(config, phase)  # the model card says
    path = final_dir(cfg.output_dir)
    if accelerator.is_main_process:
        drafter.save_pretrained(path)
        logger.info("phase %d done: drafter saved to %s", phase, path)
    accelerator.wait_for_everyone()
    # Trackers end with the phase; the process group does not (`accelerator.end_training()` would destroy it):
    # a script may run the next phase in the same processes. `massv train` destroys it on exit.
    for tracker in accelerator.trackers:
        tracker.finish()
    return path


def training_data_description(config: RunConfig, phase: int) -> str:
    """What a phase trained on, in the words of the drafter's model card."""
    if phase == 1:
        return f"image-caption pairs {config.data.pretrain_json}"
    return f"the target's own answers ({config.data.distilled_dir}) to the prompts of {config.data.instruct_json}"


def phase_config(config: RunConfig, phase: int) -> TrainingConfig:
    return config.phase1 if phase == 1 else config.phase2
