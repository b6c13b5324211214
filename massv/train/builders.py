"""Builders: config entries -> the objects a recipe needs (target, drafter LM, processor, drafter, data).

`model.target` / `model.drafter_lm` are hub ids or local paths, loaded with `AutoModelForImageTextToText`,
`AutoModelForCausalLM` and `AutoProcessor`. The special name ``tiny:<family>`` (``tiny:qwen2_5_vl``,
``tiny:gemma3``) builds the tiny random real-architecture pair of `massv.tiny.build_tiny_pair(family, seed=0)`
instead, so `configs/tiny.yaml` runs on a CPU with nothing downloaded; both names must then be tiny and of
the same family. The pair is deterministic, so every process and every restart builds identical weights.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, ProcessorMixin

from massv.config import ModelConfig, RunConfig
from massv.drafter import MultimodalDrafter
from massv.loading import TINY_PREFIX, load_causal_lm, load_target, resolve_dtype
from massv.train.llava_data import LoadReport, load_llava_records

logger = logging.getLogger(__name__)

FINAL_DIR = "final"


def _dtype(name: str) -> torch.dtype | str:
    """"auto" stays "auto" (as saved / as trained); any other name through the one resolver, massv.loading."""
    return "auto" if name == "auto" else resolve_dtype(name)


def _tiny_family(model_config: ModelConfig) -> str | None:
    target_tiny = model_config.target.startswith(TINY_PREFIX)
    drafter_tiny = model_config.drafter_lm.startswith(TINY_PREFIX)
    if target_tiny != drafter_tiny or (target_tiny and model_config.target != model_config.drafter_lm):
        raise ValueError(
            f"model.target {model_config.target!r} and model.drafter_lm {model_config.drafter_lm!r}: a tiny "
            "pair must name the same tiny family on both (e.g. tiny:qwen2_5_vl twice)"
        )
    return model_config.target[len(TINY_PREFIX):] if target_tiny else None


def build_models(model_config: ModelConfig, device: str | torch.device | None = None,
                 with_drafter_lm: bool = True) -> tuple[PreTrainedModel, PreTrainedModel | None, ProcessorMixin]:
    """(target VLM, drafter LM or None, target processor), the tokenizers checked to agree.

    The target stays on `device` (default CPU): in training only its vision encoder is used, and the recipe
    moves just that to the accelerator, so a 7B-12B target LM never occupies GPU memory there.
    """
    family = _tiny_family(model_config)
    if family is not None:
        from massv.tiny import build_tiny_pair

        pair = build_tiny_pair(family, seed=0)
        target, processor = pair.target, pair.processor
        drafter_lm = pair.drafter_lm if with_drafter_lm else None
        if model_config.torch_dtype != "auto":
            for model in (target, drafter_lm):
                if model is not None:
                    model.to(dtype=_dtype(model_config.torch_dtype))
    else:
        from massv.loading import check_drafter_tokenizer

        # Loaded on the CPU (see above), in the dtype the computation will use: "auto" resolves for the device
        # training runs on (bfloat16 on CUDA, float32 on the CPU).
        compute_device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(model_config.torch_dtype, compute_device)
        target, processor = load_target(model_config.target, dtype=dtype, device="cpu",
                                        attn_implementation=model_config.attn_implementation)
        drafter_lm = None
        if with_drafter_lm:
            logger.info("loading drafter LM %s", model_config.drafter_lm)
            drafter_lm = load_causal_lm(model_config.drafter_lm, dtype=dtype, device="cpu",
                                        attn_implementation=model_config.attn_implementation)
            check_drafter_tokenizer(model_config.drafter_lm, processor.tokenizer)
    if model_config.family is not None and target.config.model_type != model_config.family:
        raise ValueError(f"model.family is {model_config.family!r} but {model_config.target} is a "
                         f"{target.config.model_type!r} model")
    apply_pixel_limits(processor, model_config.min_pixels, model_config.max_pixels)
    if device is not None:
        target.to(device)
    target.eval()
    return target, drafter_lm, processor


def apply_pixel_limits(processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set Qwen2.5-VL's resize range (`model.min_pixels` / `model.max_pixels`) on the processor, in place.

    The range decides each image's token count, so training, distillation and evaluation must all use the
    processor it was set on (the resolved config records it).
    """
    if min_pixels is None and max_pixels is None:
        return
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    current = {key: (size.get(key) if isinstance(size, dict) else getattr(size, key, None))
               for key in ("shortest_edge", "longest_edge")}
    if current["longest_edge"] is None:
        raise ValueError(f"model.min_pixels / model.max_pixels are set, but the target's image processor "
                         f"({type(image_processor).__name__}) has no pixel range to set: they apply to Qwen2.5-VL's "
                         "dynamic resolution (Gemma3 resizes every image to one fixed size); remove them")
    limits = {"shortest_edge": min_pixels if min_pixels is not None else current["shortest_edge"],
              "longest_edge": max_pixels if max_pixels is not None else current["longest_edge"]}
    if limits["shortest_edge"] is not None and limits["shortest_edge"] > limits["longest_edge"]:
        raise ValueError(f"model.min_pixels {limits['shortest_edge']} exceeds max_pixels {limits['longest_edge']}")
    if isinstance(size, dict):
        image_processor.size = {**size, **limits}
    else:
        from transformers.image_utils import SizeDict

        image_processor.size = SizeDict(**limits)
    logger.info("image resize range: %s to %s pixels", limits["shortest_edge"], limits["longest_edge"])


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


def build_target_and_processor(model_config: ModelConfig,
                               device: str | torch.device | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The target and its processor alone (self-distillation needs no drafter); CUDA when available."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target, _, processor = build_models(model_config, device=device, with_drafter_lm=False)
    return target, processor


def build_drafter(model_config: ModelConfig, target: PreTrainedModel, drafter_lm: PreTrainedModel,
                  processor: ProcessorMixin) -> MultimodalDrafter:
    """A fresh drafter (phase 1): the target's vision encoder (shared), a new projector and the drafter LM."""
    return MultimodalDrafter.from_target(
        target, drafter_lm, tokenizer_size=len(processor.tokenizer), vision_feature=model_config.vision_feature,
        projector_hidden_dim=model_config.projector_hidden_dim, projector_layers=model_config.projector_layers,
        projector_activation=model_config.projector_activation,
    )


def final_dir(output_dir: str | os.PathLike[str]) -> Path:
    """Where a phase writes its finished drafter (`MultimodalDrafter.save_pretrained` format)."""
    return Path(output_dir) / FINAL_DIR


def load_phase1_drafter(config: RunConfig, target: PreTrainedModel) -> MultimodalDrafter:
    """Phase 2 starts from phase 1's drafter: its projector already maps images into the LM's space."""
    path = final_dir(config.phase1.output_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"phase 2 starts from the phase-1 drafter, but {path} does not exist: run phase 1 first "
            "(massv train --config ... --phase 1) or set phase1.output_dir to where it was written"
        )
    dtype = _dtype(config.model.torch_dtype)
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
                    ) -> tuple[PreTrainedModel | None, MultimodalDrafter, ProcessorMixin]:
    """Use the objects given (tests, demo) and build the missing ones from `config.model`.

    Phase 1 builds a fresh drafter around the drafter LM; phase 2 loads phase 1's finished drafter. A target
    built here keeps only its vision modules (see `release_unused_target_weights`); a given one is left whole.
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
    if built_here:
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


def storage_dtype(model_config: ModelConfig) -> torch.dtype | None:
    """The dtype the finished drafter is saved in (None for "auto": as trained)."""
    dtype = _dtype(model_config.torch_dtype)
    return None if dtype == "auto" else dtype
