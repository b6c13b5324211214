"""`massv compress --config configs/x.yaml`: load a drafter, calibrate, prune, optionally recover, save, report.

The config's `compress` section picks the method:
  layer_prune  drop `num_layers_to_drop` consecutive decoder layers, the block with the smallest angular
               distance between its input and output on calibration samples (massv.compress.angular);
  sparsity     one-shot Wanda/magnitude pruning of the decoder-layer linears to `sparsity`, unstructured
               (per output row) or 2:4 (massv.compress.sparsity).
With `recover: true` the compressed drafter is then fine-tuned with the phase-2 objective on the target's
self-distilled answers (`data.distilled_dir`), using the `phase2` section's optimizer settings; sparsity
masks are held fixed, so the saved weights keep exact zeros.

Output directory: the compressed drafter (loadable with `MultimodalDrafter.from_pretrained`) plus
`compression.json`: the decision (chosen block and the angular distance of every start layer, or the
sparsity of every pruned weight), MACs per drafted token before and after, and the recovery losses.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from massv.compress.angular import TokenSelection, prune_layers
from massv.compress.calibration import Batch, PreparedBatch, prepare_batches
from massv.compress.macs import DrafterMACs, drafter_macs
from massv.compress.recover import recover
from massv.compress.sparsity import (
    Granularity,
    SparsityMasks,
    prune_sparse,
    weight_sparsity,
)
from massv.config import CompressConfig, RunConfig, TrainingConfig
from massv.drafter import MultimodalDrafter

logger = logging.getLogger(__name__)

REPORT_NAME = "compression.json"


@dataclass
class CompressionResult:
    """What compression did to one drafter: the decision, the MACs it saved, and how recovery went."""

    method: str
    decision: dict[str, Any]
    macs_before: DrafterMACs
    macs_after: DrafterMACs
    masks: SparsityMasks | None = None
    recovery_losses: list[float] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        """Per-token MACs after / before (1.0: nothing saved)."""
        return self.macs_after.per_token / self.macs_before.per_token

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (masks are left out: they are the zeros of the saved weights)."""
        return {"method": self.method, "decision": self.decision, "macs_before": self.macs_before.to_dict(),
                "macs_after": self.macs_after.to_dict(), "macs_ratio": self.macs_ratio,
                "recovery_losses": self.recovery_losses}


def mean_sequence_length(batches: Sequence[PreparedBatch]) -> int:
    """Average real tokens per calibration sample: the context length MACs are reported at by default."""
    tokens = sum(int(batch.token_mask().sum()) for batch in batches)
    samples = sum(batch.num_samples for batch in batches)
    return max(1, round(tokens / samples))


def compress_drafter(config: CompressConfig | RunConfig, drafter: MultimodalDrafter,
                     calibration_batches: Iterable[Batch | PreparedBatch], *,
                     recovery_batches: Iterable[Batch | PreparedBatch] | None = None,
                     training: TrainingConfig | None = None, recovery_steps: int | None = None,
                     context_length: int | None = None, image_inputs: dict[str, torch.Tensor] | None = None,
                     tokens: TokenSelection = "last", granularity: Granularity = "row",
                     sequential: bool = True) -> CompressionResult:
    """Compress `drafter` in place as `config.compress` says, then (if `recover`) fine-tune it on `recovery_batches`.

    `config` is a `CompressConfig`, or a `RunConfig` whose `phase2` section supplies the recovery optimizer
    settings (overridden by `training`). Recovery runs `recovery_steps` optimizer steps (default: the
    training section's `max_steps`, else one pass over `recovery_batches`). MACs are per drafted token at
    `context_length` (default: the mean calibration sample length); `image_inputs` (one image) adds the
    per-image vision encoder and projector MACs.
    """
    if isinstance(config, RunConfig):
        if config.compress is None:
            raise ValueError("the run config has no 'compress' section")
        training = training or config.phase2
        compress = config.compress
    else:
        compress = config
    calibration = prepare_batches(drafter, calibration_batches, compress.calibration_samples)
    context_length = context_length or mean_sequence_length(calibration)
    macs_before = drafter_macs(drafter, context_length, image_inputs)
    masks: SparsityMasks | None = None
    if compress.method == "layer_prune":
        if compress.num_layers_to_drop is None:
            raise ValueError("layer_prune needs num_layers_to_drop")
        decision = prune_layers(drafter, calibration, compress.num_layers_to_drop, tokens).to_dict()
    elif compress.method == "sparsity":
        masks, sparsity_decision = prune_sparse(drafter, calibration, compress.sparsity, compress.pattern, compress.score,
                                                granularity, sequential)
        decision = sparsity_decision.to_dict()
    else:
        raise ValueError(f"unknown compression method {compress.method!r}")
    losses: list[float] = []
    if compress.recover:
        if recovery_batches is None:
            raise ValueError("compress.recover is true but no recovery batches (self-distilled answers) were given; "
                             "pass recovery_batches or set compress.recover: false")
        training = training or TrainingConfig()
        if training.lora is not None:
            logger.warning("recovery fine-tunes all drafter LM weights; the phase-2 LoRA settings are ignored "
                           "(merged low-rank updates would be dense and undo the sparsity)")
        if recovery_steps is None:
            recovery_steps = training.max_steps or _one_pass_steps(recovery_batches, training)
        losses = recover(drafter, recovery_batches, recovery_steps, masks=masks, learning_rate=training.learning_rate,
                         weight_decay=training.weight_decay, max_grad_norm=training.max_grad_norm,
                         warmup_steps=int(training.warmup_ratio * recovery_steps),
                         accumulation_steps=training.gradient_accumulation_steps, log_every=training.log_every_steps)
    if masks is not None:
        decision["measured_sparsity_per_weight"] = weight_sparsity(drafter.language_model)
    macs_after = drafter_macs(drafter, context_length, image_inputs)
    result = CompressionResult(compress.method, decision, macs_before, macs_after, masks, losses)
    logger.info("drafter MACs per token at context %d: %d -> %d (%.1f %%)", context_length, macs_before.per_token,
                macs_after.per_token, 100.0 * result.macs_ratio)
    return result


def _one_pass_steps(batches: Iterable[Any], training: TrainingConfig) -> int:
    try:
        num_batches = len(batches)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("recovery_batches has no length: pass recovery_steps (or set phase2.max_steps)") from None
    return max(1, math.ceil(num_batches * training.num_epochs / training.gradient_accumulation_steps))


# ---- the command ------------------------------------------------------------------------------------


def _variant_tag(compress: CompressConfig) -> str:
    if compress.method == "layer_prune":
        return f"drop{compress.num_layers_to_drop}"
    if compress.pattern == "2:4":
        return "sparse2of4"
    return f"sparse{round(100 * (compress.sparsity or 0))}"


def _load_records(config: RunConfig, data: str | None, image_root: str | None) -> Any:
    """Phase 2's own data (the finished self-distillation run) unless `--data` names a LLaVA file or distill folder."""
    from massv.train.builders import load_phase_records
    from massv.train.distill import load_distilled_records
    from massv.train.llava_data import load_llava_records

    if data is None:
        return load_phase_records(config, 2)[0]
    root = image_root or config.data.instruct_image_root
    if Path(data).is_dir():
        return load_distilled_records(data, root, strict=config.data.strict_images, num_workers=config.data.num_workers)[0]
    return load_llava_records(data, root, strict=config.data.strict_images, require_image=False,
                              num_workers=config.data.num_workers)[0]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `massv compress`."""
    from massv.cli import HelpFormatter, add_device_arguments, add_override_argument

    parser = argparse.ArgumentParser(prog="massv compress", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML with a 'compress' section")
    parser.add_argument("--drafter", help="trained MASSV drafter directory (default: <phase2.output_dir>/final)")
    parser.add_argument("--out", help="output directory (default: <drafter or phase2.output_dir>-<method tag>, e.g. outputs/phase2-drop2)")
    parser.add_argument("--data", help="LLaVA JSON/JSONL file, or a `massv distill` output folder (default: data.distilled_dir)")
    parser.add_argument("--image-root", help="image folder for --data (default: data.instruct_image_root)")
    parser.add_argument("--context-length", type=int, help="context length for MACs (default: mean calibration length)")
    parser.add_argument("--tokens", choices=("last", "all"), default="last",
                        help="angular distance on each sample's last token (the paper's choice) or all tokens")
    add_device_arguments(parser, from_config=True)
    add_override_argument(parser, "compress.sparsity=0.7")
    args = parser.parse_args(argv)

    from massv.config import final_dir, load_config, save_resolved_config
    from massv.errors import InputError
    from massv.loading import input_device, load_target, resolve_placement
    from massv.preflight import (
        check_data_file,
        check_directory,
        check_distilled_dir,
        check_drafter_dir,
        check_models,
    )
    from massv.train.builders import build_train_dataset

    config = load_config(args.config, args.override)
    if config.compress is None:
        raise InputError(f"{args.config} has no 'compress' section: add one, or pass e.g. --override "
                         "compress.method=layer_prune compress.num_layers_to_drop=1")
    # Phase 2 writes its finished drafter to <phase2.output_dir>/final; the output defaults to a sibling.
    named = Path(args.drafter) if args.drafter else Path(config.phase2.output_dir)
    drafter_path = named if args.drafter else final_dir(named)
    # ---- every input checked before the target is built ----
    dtype = args.dtype or config.model.torch_dtype
    device = resolve_placement(args.device, dtype).device  # one device: calibration and recovery run there
    check_models(config, with_drafter_lm=False)
    check_drafter_dir(drafter_path, "--drafter")
    if args.data is None:
        check_distilled_dir(config.data.distilled_dir)
    elif Path(args.data).is_dir():
        check_distilled_dir(args.data, "--data")
    else:
        check_data_file(args.data, "--data")
    if args.image_root:
        check_directory(args.image_root, "--image-root")
    target, processor = load_target(config.model.target, dtype, device)
    drafter = MultimodalDrafter.from_pretrained(drafter_path, target=target).to(input_device(target))
    # Calibrate and fine-tune in float32 (Wanda's norms, AdamW updates); save in the dtype it came in.
    saved_dtype = drafter.dtype
    drafter.language_model.float()
    drafter.projector.float()
    out_dir = Path(args.out) if args.out else named.with_name(f"{named.name}-{_variant_tag(config.compress)}")

    records = _load_records(config, args.data, args.image_root)
    dataset, collator = build_train_dataset(config, records, processor, drafter)
    calibration = [collator([dataset[index]]) for index in range(min(config.compress.calibration_samples, len(dataset)))]
    first_image = next((batch["image_inputs"] for batch in calibration if batch.get("image_inputs")), None)
    recovery_batches = torch.utils.data.DataLoader(
        dataset, batch_size=config.phase2.per_device_batch_size, shuffle=True, collate_fn=collator,
        generator=torch.Generator().manual_seed(config.phase2.seed),
    ) if config.compress.recover else None
    torch.manual_seed(config.phase2.seed)

    result = compress_drafter(config, drafter, calibration, recovery_batches=recovery_batches,
                              context_length=args.context_length, image_inputs=first_image, tokens=args.tokens)
    drafter.language_model.to(saved_dtype)
    drafter.projector.to(saved_dtype)
    drafter.save_pretrained(out_dir)
    save_resolved_config(config, out_dir)
    report = {"drafter": str(drafter_path), "output": str(out_dir), **result.to_dict()}
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    logger.info("wrote the compressed drafter and %s to %s", REPORT_NAME, out_dir)
    return 0
