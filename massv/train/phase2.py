"""Phase 2 recipe: self-distilled visual instruction tuning of the drafter (projector + LM, or LoRA).

The drafter, starting from phase 1's projector, is fine-tuned on the TARGET's own answers to the instruction
prompts (`massv distill` writes them): speculative decoding rewards matching the target's distribution, not
the original dataset's answers. The vision encoder stays frozen. With `phase2.lora` set, the LM is tuned
through low-rank adapters (peft) that are merged into it before saving, so the result is a plain drafter.
With `phase2.logit_distillation` set, it also learns the target's distribution at every answer position (soft
labels from one teacher-forced target pass, `massv.train.soft_labels`).

    python -m massv.train --config configs/qwen2_5_vl_7b.yaml --phase 2 [--resume]
"""

from __future__ import annotations

import logging

from accelerate.utils import set_seed
from datasets import Dataset
from transformers import PreTrainedModel, ProcessorMixin

from massv.config import LoraConfig, RunConfig
from massv.drafter import MultimodalDrafter
from massv.train.builders import release_unused_target_weights, resolve_objects
from massv.train.loop import make_accelerator, train_loop
from massv.train.phase_run import PhaseResult, prepare_training, save_final_drafter
from massv.train.soft_labels import attach_soft_labels

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
    # ---- 1. setup: every object built once (what is not given comes from the config) ----
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    built_target = target is None
    distilling = cfg.logit_distillation is not None  # soft labels need the target's language model, not only its eyes
    target, drafter, processor = resolve_objects(config, 2, target, drafter, processor,
                                                 release_language_model=not distilling)
    drafter.set_trainable("phase2")  # projector + LM; vision encoder frozen
    if cfg.lora is not None:
        add_lora(drafter, cfg.lora)  # freezes the LM's own weights again, adapters train
    train_data, collator = prepare_training(config, 2, accelerator, drafter, processor, dataset, cache_image_features)
    if distilling:
        attach_soft_labels(config, accelerator, target, drafter, processor, train_data, collator, dataset)
        if built_target:
            release_unused_target_weights(target, drafter.vision_modules)

    # ---- 2. train ----
    result = train_loop(accelerator, drafter, train_data, collator, cfg, resume=resume,
                        num_workers=config.data.num_workers, stop_after_steps=stop_after_steps,
                        run_name="phase2", tracker_config=config.to_dict())
    drafter = accelerator.unwrap_model(drafter)
    if not result.finished:
        return PhaseResult(drafter=drafter, train=result, final_path=None)

    # ---- 3. save ----
    if cfg.lora is not None:
        drafter.language_model = drafter.language_model.merge_and_unload()
    path = save_final_drafter(config, 2, accelerator, drafter, [drafter.language_model, drafter.projector], result)
    return PhaseResult(drafter=drafter, train=result, final_path=path)
