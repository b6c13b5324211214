"""Builders: config entries -> the drafter and the data a training recipe needs.

The models themselves (target, drafter LM, processor) come from the one loader, `massv.loading.build_models`.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, ProcessorMixin

from massv.config import FINAL_DIR, ModelConfig, RunConfig, final_dir  # noqa: F401 (final_dir: its old home)
from massv.drafter import MultimodalDrafter
from massv.loading import build_models, config_dtype
from massv.train.llava_data import LoadReport, load_llava_records

logger = logging.getLogger(__name__)

def release_unused_target_weights(target: PreTrainedModel, keep: dict[str, torch.nn.Module]) -> int:
    """Replace every weight of `target` outside the `keep` modules by a storage-free meta tensor; returns the
    bytes freed.

    Training uses only the target's vision modules (shared with the drafter). The rest, the 7B-12B language
    model, would otherwise stay in CPU memory on every process (8 x 16.6 GB for Qwen2.5-VL-7B on 8 GPUs).
    The target can only encode images afterwards.
    """
    kept = {id(tensor) for module in keep.values()
            for tensor in itertools.chain(module.parameters(), module.buffers())}
    freed: set[int] = set()
    num_bytes = 0
    for module in target.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in kept:
                continue
            if id(param) not in freed:
                freed.add(id(param))
                num_bytes += param.numel() * param.element_size()
            module.register_parameter(name, torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                               requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is None or id(buffer) in kept:
                continue
            if id(buffer) not in freed:
                freed.add(id(buffer))
                num_bytes += buffer.numel() * buffer.element_size()
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, torch.empty(buffer.shape, dtype=buffer.dtype, device="meta"),
                                   persistent=persistent)
    logger.info("released %.2f GB of target weights the drafter does not use (language model)", num_bytes / 1e9)
    return num_bytes


def build_drafter(model_config: ModelConfig, target: PreTrainedModel, drafter_lm: PreTrainedModel,
                  processor: ProcessorMixin, seed: int | None = None) -> MultimodalDrafter:
    """A fresh drafter (phase 1): the target's vision encoder (shared), a new projector and the drafter LM.

    `seed`: the projector's initial weights come from a generator seeded with it (the global one is left as it
    was), so they do not depend on what drew from the global generator before; None draws from the global one.
    """
    def build() -> MultimodalDrafter:
        return MultimodalDrafter.from_target(
            target, drafter_lm, tokenizer_size=len(processor.tokenizer), vision_feature=model_config.vision_feature,
            projector_hidden_dim=model_config.projector_hidden_dim, projector_layers=model_config.projector_layers,
            projector_activation=model_config.projector_activation,
        )

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_phase1_drafter(config: RunConfig, target: PreTrainedModel) -> MultimodalDrafter:
    """Phase 2 starts from phase 1's drafter: its projector already maps images into the LM's space."""
    path = final_dir(config.phase1.output_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"phase 2 starts from the phase-1 drafter, but {path} does not exist: run phase 1 first "
            "(massv train --config ... --phase 1) or set phase1.output_dir to where it was written"
        )
    dtype = config_dtype(config.model.torch_dtype)
    return MultimodalDrafter.from_pretrained(path, target=target, torch_dtype=None if dtype == "auto" else dtype)


def load_phase_records(config: RunConfig, phase: int) -> tuple[Dataset, LoadReport]:
    """Phase 1: image-caption pairs (`data.pretrain_json`, images required). Phase 2: the target's answers."""
    data = config.data
    if phase == 1:
        if not data.pretrain_json:
            raise ValueError("data.pretrain_json is not set: phase 1 needs image-caption pairs (LLaVA-Pretrain)")
        return load_llava_records(data.pretrain_json, data.pretrain_image_root, strict=data.strict_images,
                                  require_image=True, num_workers=data.num_workers)
    from massv.train.distill import load_distilled_records

    return load_distilled_records(data.distilled_dir, data.instruct_image_root, strict=data.strict_images,
                                  num_workers=data.num_workers)


def resolve_objects(config: RunConfig, phase: int, target: PreTrainedModel | None = None,
                    drafter: MultimodalDrafter | None = None, processor: ProcessorMixin | None = None,
                    release_language_model: bool = True,
                    ) -> tuple[PreTrainedModel | None, MultimodalDrafter, ProcessorMixin]:
    """Use the objects given (tests, demo) and build the missing ones from `config.model`.

    Phase 1 builds a fresh drafter around the drafter LM; phase 2 loads phase 1's finished drafter. A target
    built here keeps only its vision modules (see `release_unused_target_weights`) unless
    `release_language_model` is False (soft labels need the whole target); a given one is left whole.
    """
    drafter_lm = None
    built_here = False
    if processor is None or (target is None and drafter is None):
        built_target, drafter_lm, processor = build_models(config.model, with_drafter_lm=phase == 1 and drafter is None)
        built_here = target is None
        target = target if target is not None else built_target
    if drafter is None:
        if phase == 1:
            if drafter_lm is None:
                _, drafter_lm, _ = build_models(config.model, with_drafter_lm=True)
            drafter = build_drafter(config.model, target, drafter_lm, processor)
        else:
            drafter = load_phase1_drafter(config, target)
    if built_here and release_language_model:
        release_unused_target_weights(target, drafter.vision_modules)
    return target, drafter, processor


def build_train_dataset(config: RunConfig, records: Dataset | None, processor: ProcessorMixin,
                        drafter: MultimodalDrafter, checked: Dataset | None = None) -> tuple[Any, Any]:
    """(DrafterDataset, DrafterCollator) for LLaVA records, tokenized with the target's processor.

    `checked`: the records' already checked version (`massv.train.preprocess`), which skips the up-front pass.
    """
    from massv.train.data import DrafterCollator, DrafterDataset, pad_token_id

    dataset = DrafterDataset(records, processor, drafter.adapter, config.data.max_length,
                             strict_images=config.data.strict_images, num_proc=config.data.num_workers,
                             truncated_answers=config.data.truncated_answers, checked=checked)
    return dataset, DrafterCollator(pad_token_id(processor), drafter.adapter.image_input_names)


def keep_trainable_in_fp32(model: torch.nn.Module) -> None:
    """Trainable weights in float32 (master weights); mixed precision computes in bf16/fp16 via autocast.

    Pure bf16 weights would silently drop updates far smaller than the weights (lr 2e-5 in phase 2).
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def move_vision_to(drafter: MultimodalDrafter, device: torch.device) -> None:
    """The shared vision encoder is not a drafter submodule (never saved with it), so `prepare` does not move it."""
    for module in drafter.vision_modules.values():
        module.to(device)
