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

from accelerate.utils import set_seed
from datasets import Dataset
from transformers import PreTrainedModel, ProcessorMixin

from massv.config import RunConfig
from massv.drafter import MultimodalDrafter
from massv.train.builders import resolve_objects
from massv.train.loop import make_accelerator, train_loop
from massv.train.phase_run import PhaseResult, prepare_training, save_final_drafter

logger = logging.getLogger(__name__)


def run(config: RunConfig, *, resume: bool = False, target: PreTrainedModel | None = None,
        drafter: MultimodalDrafter | None = None, processor: ProcessorMixin | None = None,
        dataset: Dataset | None = None, stop_after_steps: int | None = None,
        cache_image_features: bool = False) -> PhaseResult:
    """Train the projector as `config.phase1` says and save the drafter to `<phase1.output_dir>/final`.

    Already-built `target` / `drafter` / `processor` and LLaVA `dataset` records (columns id, image_path,
    conversations) may be passed in; whatever is missing is built from the config.
    """
    cfg = config.phase1
    # ---- 1. setup: every object built once (what is not given comes from the config) ----
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)  # the fresh projector's initialisation
    target, drafter, processor = resolve_objects(config, 1, target, drafter, processor)
    if cfg.lora is not None:
        logger.warning("phase1.lora is ignored: phase 1 trains the projector only")
    drafter.set_trainable("phase1")  # projector only: LM and vision encoder frozen
    train_data, collator = prepare_training(config, 1, accelerator, drafter, processor, dataset, cache_image_features)

    # ---- 2. train ----
    result = train_loop(accelerator, drafter, train_data, collator, cfg, resume=resume,
                        num_workers=config.data.num_workers, stop_after_steps=stop_after_steps,
                        run_name="phase1", tracker_config=config.to_dict())
    drafter = accelerator.unwrap_model(drafter)
    if not result.finished:
        return PhaseResult(drafter=drafter, train=result, final_path=None)

    # ---- 3. save ----
    path = save_final_drafter(config, 1, accelerator, drafter, [drafter.projector], result)
    return PhaseResult(drafter=drafter, train=result, final_path=path)
