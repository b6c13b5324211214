"""Phase 2 recipe: self-distilled visual instruction tuning of the drafter (projector + LM, or LoRA).

The drafter, starting from phase 1's projector, is fine-tuned on the TARGET's own answers to the instruction
prompts (`massv distill` writes them): speculative decoding rewards matching the target's distribution, not
the original dataset's answers. The vision encoder stays frozen. With `phase2.lora` set, the LM is tuned
through low-rank adapters (peft) that are merged into it before saving, so the result is a plain drafter.

    python -m massv.train --config configs/qwen2_5_vl_7b.yaml --phase 2 [--resume]
"""

from __future__ import annotations

import logging

from accelerate.utils import set_seed
from datasets import Dataset
from transformers import PreTrainedModel, ProcessorMixin

from massv.config import LoraConfig, RunConfig, save_resolved_config
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
from massv.train.loop import make_accelerator, train_loop
from massv.train.phase1 import PhaseResult

logger = logging.getLogger(__name__)


def add_lora(drafter: MultimodalDrafter, lora: LoraConfig) -> None:
    """Wrap the drafter LM in peft LoRA adapters: only they (and the projector) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    drafter.language_model = get_peft_model(drafter.language_model, peft_config)


def run(config: RunConfig, *, resume: bool = False, target: PreTrainedModel | None = None,
        drafter: MultimodalDrafter | None = None, processor: ProcessorMixin | None = None,
        dataset: Dataset | None = None, stop_after_steps: int | None = None,
        cache_image_features: bool = False) -> PhaseResult:
    """Fine-tune the drafter as `config.phase2` says and save it to `<phase2.output_dir>/final`.

    Without `drafter`, phase 1's result (`<phase1.output_dir>/final`) is loaded; without `dataset`, the
    self-distilled shards in `data.distilled_dir`.
    """
    cfg = config.phase2
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    target, drafter, processor = resolve_objects(config, 2, target, drafter, processor)

    drafter.set_trainable("phase2")  # projector + LM; vision encoder frozen
    if cfg.lora is not None:
        add_lora(drafter, cfg.lora)  # freezes the LM's own weights again, adapters train
    keep_trainable_in_fp32(drafter)
    move_vision_to(drafter, accelerator.device)
    if cfg.gradient_checkpointing:
        drafter.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    records = dataset if dataset is not None else load_phase_records(config, 2)[0]
    train_data, collator = build_train_dataset(config, records, processor, drafter)
    if cache_image_features:  # small data sets only (tests, demo): features are kept in memory
        train_data.cache_image_features(lambda inputs: drafter.encode_images(
            {name: value.to(accelerator.device) for name, value in inputs.items()}))
    if accelerator.is_main_process:
        save_resolved_config(config, cfg.output_dir)
    result = train_loop(accelerator, drafter, train_data, collator, cfg, resume=resume,
                        num_workers=config.data.num_workers, stop_after_steps=stop_after_steps,
                        run_name="phase2", tracker_config=config.to_dict())
    drafter = accelerator.unwrap_model(drafter)
    if not result.finished:
        return PhaseResult(drafter=drafter, train=result, final_path=None)

    if cfg.lora is not None:
        drafter.language_model = drafter.language_model.merge_and_unload()
    if cfg.gradient_checkpointing:
        drafter.language_model.gradient_checkpointing_disable()
    dtype = storage_dtype(config.model)
    if dtype is not None:
        drafter.language_model.to(dtype=dtype)
        drafter.projector.to(dtype=dtype)
    drafter.eval()
    path = final_dir(cfg.output_dir)
    if accelerator.is_main_process:
        drafter.save_pretrained(path)
        logger.info("phase 2 done: drafter saved to %s", path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return PhaseResult(drafter=drafter, train=result, final_path=path)
