"""Phase 1 recipe: pretrain the projector on image-caption pairs (LLaVA-Pretrain style).

Only the projector trains; the drafter LM and the target's vision encoder stay frozen, so the projector
learns to map the target's image features into the LM's embedding space without disturbing either model.
Captions are laid out in the target's chat template (image + instruction as the user turn, caption as the
answer, loss on the caption only) rather than LLaVA's template-free "plain" format: the drafter will always
see the target's chat layout at inference, so it pretrains in that layout too.

    python -m massv.train --config configs/qwen2_5_vl_7b.yaml --phase 1 [--resume]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed
from datasets import Dataset
from transformers import PreTrainedModel, ProcessorMixin

from massv.config import RunConfig, save_resolved_config
from massv.drafter import MultimodalDrafter
from massv.train.builders import (
    build_train_dataset,
    final_dir,
    keep_trainable_in_fp32,
    load_phase_records,
    move_vision_to,
    resolve_objects,
    storage_dtype,
)
from massv.train.loop import TrainResult, make_accelerator, train_loop

logger = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    """A finished (or deliberately interrupted) phase: the trained drafter and where it was saved."""

    drafter: MultimodalDrafter
    train: TrainResult
    final_path: Path | None  # None when the run stopped early (stop_after_steps)


def run(config: RunConfig, *, resume: bool = False, target: PreTrainedModel | None = None,
        drafter: MultimodalDrafter | None = None, processor: ProcessorMixin | None = None,
        dataset: Dataset | None = None, stop_after_steps: int | None = None,
        cache_image_features: bool = False) -> PhaseResult:
    """Train the projector as `config.phase1` says and save the drafter to `<phase1.output_dir>/final`.

    Already-built `target` / `drafter` / `processor` and LLaVA `dataset` records (columns id, image_path,
    conversations) may be passed in; whatever is missing is built from the config.
    """
    cfg = config.phase1
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)  # the fresh projector's initialisation
    target, drafter, processor = resolve_objects(config, 1, target, drafter, processor)
    if cfg.lora is not None:
        logger.warning("phase1.lora is ignored: phase 1 trains the projector only")

    drafter.set_trainable("phase1")  # projector only: LM and vision encoder frozen
    keep_trainable_in_fp32(drafter)
    move_vision_to(drafter, accelerator.device)
    if cfg.gradient_checkpointing:
        drafter.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    records = dataset if dataset is not None else load_phase_records(config, 1)[0]
    train_data, collator = build_train_dataset(config, records, processor, drafter)
    if cache_image_features:  # small data sets only (tests, demo): features are kept in memory
        train_data.cache_image_features(lambda inputs: drafter.encode_images(
            {name: value.to(accelerator.device) for name, value in inputs.items()}))
    if accelerator.is_main_process:
        save_resolved_config(config, cfg.output_dir)
    result = train_loop(accelerator, drafter, train_data, collator, cfg, resume=resume,
                        num_workers=config.data.num_workers, stop_after_steps=stop_after_steps,
                        run_name="phase1", tracker_config=config.to_dict())
    drafter = accelerator.unwrap_model(drafter)
    if not result.finished:
        return PhaseResult(drafter=drafter, train=result, final_path=None)

    path = final_dir(cfg.output_dir)
    dtype = storage_dtype(config.model)
    if dtype is not None:
        drafter.projector.to(dtype=dtype)
    if cfg.gradient_checkpointing:
        drafter.language_model.gradient_checkpointing_disable()
    drafter.eval()
    if accelerator.is_main_process:
        drafter.save_pretrained(path)
        logger.info("phase 1 done: drafter saved to %s", path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return PhaseResult(drafter=drafter, train=result, final_path=path)
