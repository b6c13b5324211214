"""The steps both phase recipes share around their own choice of trainable weights: `prepare_training`
(the data and the resolved config, at the end of setup) and `save_final_drafter` (the save).

Why one place: phase 1 (projector only) and phase 2 (projector + LM, or LoRA) differ only in that choice and in
which modules they store in the checkpoint dtype; the data path, the feature cache, and the save / wait /
end-of-training order must not drift apart between them. The loop itself (`massv.train.loop.train_loop`) is
called by the recipes, in plain sight.
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
from massv.train.data import DrafterCollator, DrafterDataset
from massv.train.loop import TrainResult
from massv.train.preprocess import prepared_records

logger = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    """A finished (or deliberately interrupted) phase: the trained drafter and where it was saved."""

    drafter: MultimodalDrafter
    train: TrainResult
    final_path: Path | None  # None when the run stopped early (stop_after_steps)


def prepare_training(config: RunConfig, phase: int, accelerator: Accelerator, drafter: MultimodalDrafter,
                     processor: ProcessorMixin, dataset: Dataset | None,
                     cache_image_features: bool) -> tuple[DrafterDataset, DrafterCollator]:
    """Step 1's second half, once the trainable weights are chosen: master weights in float32, the vision
    encoder on the accelerator, the checked records as a dataset (cached by content, so resumes and the other
    processes reuse them) and the resolved config next to the checkpoints."""
    cfg = phase_config(config, phase)
    keep_trainable_in_fp32(drafter)
    move_vision_to(drafter, accelerator.device)
    if cfg.gradient_checkpointing:
        drafter.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checked = prepared_records(config, phase, cfg.output_dir, processor, drafter.adapter, accelerator, dataset)
    train_data, collator = build_train_dataset(config, None, processor, drafter, checked=checked)
    if cache_image_features:  # small data sets only (tests, demo): features are kept in memory
        train_data.cache_image_features(lambda inputs: drafter.encode_images(
            {name: value.to(accelerator.device) for name, value in inputs.items()}))
    if accelerator.is_main_process:
        save_resolved_config(config, cfg.output_dir)
    return train_data, collator


def save_final_drafter(config: RunConfig, phase: int, accelerator: Accelerator, drafter: MultimodalDrafter,
                       stored_modules: Sequence[nn.Module], result: TrainResult | None = None) -> Path:
    """Cast `stored_modules` (the ones the phase trained) to the checkpoint dtype, save the drafter to
    `<output_dir>/final` and finish the trackers on every process.

    `result`: this launch's loop result. When it trained no step (`--resume` on a finished run) and `final/`
    already holds a whole drafter, that directory is left as it is: it is this run's drafter already, and
    rewriting it would drop what was added to it since (the MAL rows of `massv eval --record-in-model-card`).
    """
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
        if result is not None and not result.step_losses and _whole_drafter(path):
            logger.info("phase %d: nothing trained in this launch; %s already holds the finished drafter, left as "
                        "it is", phase, path)
        else:
            drafter.save_pretrained(path)
            logger.info("phase %d done: drafter saved to %s", phase, path)
    accelerator.wait_for_everyone()
    # Trackers end with the phase; the process group does not (`accelerator.end_training()` would destroy it):
    # a script may run the next phase in the same processes. `massv train` destroys it on exit.
    for tracker in accelerator.trackers:
        tracker.finish()
    return path


def _whole_drafter(path: Path) -> bool:
    """A drafter directory whose config and every weight file read back (headers only)."""
    from massv.errors import MassvError
    from massv.preflight import check_drafter_dir

    try:
        check_drafter_dir(path, "final drafter")
    except MassvError:
        return False
    return True


def training_data_description(config: RunConfig, phase: int) -> str:
    """What a phase trained on, in the words of the drafter's model card."""
    if phase == 1:
        return f"image-caption pairs {config.data.pretrain_json}"
    return f"the target's own answers ({config.data.distilled_dir}) to the prompts of {config.data.instruct_json}"


def phase_config(config: RunConfig, phase: int) -> TrainingConfig:
    return config.phase1 if phase == 1 else config.phase2
