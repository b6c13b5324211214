"""The compression table: mean accepted length (MAL) vs drafter MACs for dense, layer-pruned and sparse drafters.

Every variant starts from the same trained MASSV drafter, is compressed on the same calibration data, and is
measured twice: right after one-shot compression, and after the same number of self-distilled recovery steps
(the dense "recovered" row gets those steps too, so it is the control for "more training" alone). MAL comes
from the real engine (`SpeculativeGenerator`, greedy, γ = `num_draft_tokens`) on held-out prompts; MACs
are per drafted token at one context length (massv.compress.macs).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from massv.compress.angular import TokenSelection, prune_layers
from massv.compress.calibration import Batch, PreparedBatch, Sample, prepare_batches
from massv.compress.macs import language_model_macs
from massv.compress.recipe import mean_sequence_length
from massv.compress.recover import recover
from massv.compress.sparsity import Pattern, Score, SparsityMasks, prune_sparse
from massv.drafter import MultimodalDrafter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One way to compress the drafter."""

    name: str
    method: Literal["dense", "layer_prune", "sparsity"]
    num_layers_to_drop: int | None = None
    sparsity: float | None = None
    pattern: Pattern = "unstructured"


DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant("dense", "dense"),
    Variant("drop 1 layer", "layer_prune", num_layers_to_drop=1),
    Variant("drop 2 layers", "layer_prune", num_layers_to_drop=2),
    Variant("50 % sparse", "sparsity", sparsity=0.5),
    Variant("70 % sparse", "sparsity", sparsity=0.7),
    Variant("2:4 sparse", "sparsity", sparsity=0.5, pattern="2:4"),
)


@dataclass
class CompressionRow:
    """One line of the table."""

    variant: str
    recovered: bool
    macs_per_token: int
    macs_ratio: float  # vs the dense drafter
    mean_accepted_length: float
    num_layers: int
    decision: dict[str, Any] = field(default_factory=dict)
    final_recovery_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


EvaluateFn = Callable[[MultimodalDrafter], float]


def clone_drafter(drafter: MultimodalDrafter) -> MultimodalDrafter:
    """An independent copy of the LM and projector that still shares the (frozen) vision modules by reference."""
    memo = {id(module): module for module in drafter.vision_modules.values()} if _has_vision(drafter) else {}
    return copy.deepcopy(drafter, memo)


def _has_vision(drafter: MultimodalDrafter) -> bool:
    return drafter.vision_encoder is not None or drafter._shared_vision is not None


def engine_mal(target: Any, processor: Any, eval_samples: Sequence[Sample], num_draft_tokens: int = 5,
               max_new_tokens: int = 32) -> EvaluateFn:
    """MAL of a drafter with the real engine: greedy speculative decoding of every eval prompt, pooled stats."""
    from massv.speculative import GenerationStats, SpeculativeGenerator

    def evaluate(drafter: MultimodalDrafter) -> float:
        generator = SpeculativeGenerator(target, drafter, processor)
        runs = [generator.generate(images=sample.image, prompt=sample.prompt, max_new_tokens=max_new_tokens,
                                   num_draft_tokens=num_draft_tokens, temperature=0.0).stats
                for sample in eval_samples]
        return GenerationStats.merge(runs).mean_accepted_length

    return evaluate


def compression_table(target: Any, drafter: MultimodalDrafter, processor: Any,
                      calibration_batches: Iterable[Batch | PreparedBatch], eval_samples: Sequence[Sample],
                      recovery_batches: Iterable[Batch | PreparedBatch] | None = None, *,
                      variants: Sequence[Variant] = DEFAULT_VARIANTS, num_draft_tokens: int = 5,
                      max_new_tokens: int = 32, recovery_steps: int = 50, learning_rate: float = 1e-4,
                      context_length: int | None = None, score: Score = "wanda", tokens: TokenSelection = "last",
                      seed: int = 0, evaluate: EvaluateFn | None = None) -> list[CompressionRow]:
    """Build every variant from `drafter` (left untouched) and measure MAL and MACs per drafted token.

    Inputs: the target and its processor (for the engine), a trained MASSV drafter, calibration batches
    (prompts + the target's answers, see massv.compress.calibration), held-out `eval_samples` (prompt +
    image; answers unused), and `recovery_batches` with labels (self-distilled answers; None: no recovered
    rows). Variants that cannot apply (dropping as many layers as the drafter has) are skipped with a
    warning. `evaluate` replaces the engine-based MAL (for tests).
    """
    evaluate = evaluate or engine_mal(target, processor, eval_samples, num_draft_tokens, max_new_tokens)
    calibration = prepare_batches(drafter, calibration_batches)
    recovery = prepare_batches(drafter, recovery_batches) if recovery_batches is not None else None
    context_length = context_length or mean_sequence_length(calibration)
    dense_macs = language_model_macs(drafter.language_model, context_length).per_token
    rows: list[CompressionRow] = []

    def add_row(variant: Variant, candidate: MultimodalDrafter, recovered: bool, decision: dict[str, Any],
                losses: list[float]) -> None:
        macs = language_model_macs(candidate.language_model, context_length)
        mal = evaluate(candidate)
        rows.append(CompressionRow(variant.name, recovered, macs.per_token, macs.per_token / dense_macs, mal,
                                   macs.num_layers, decision, losses[-1] if losses else None))
        logger.info("%-14s %-9s MACs/token %d (%.0f %%)  MAL %.3f", variant.name,
                    "recovered" if recovered else "one-shot", macs.per_token, 100 * macs.per_token / dense_macs, mal)

    num_layers = drafter.language_model.config.num_hidden_layers
    for variant in variants:
        if variant.method == "layer_prune" and (variant.num_layers_to_drop or 0) >= num_layers:
            logger.warning("skipping %r: the drafter has only %d layers", variant.name, num_layers)
            continue
        torch.manual_seed(seed)
        candidate = clone_drafter(drafter)
        masks: SparsityMasks | None = None
        decision: dict[str, Any] = {}
        if variant.method == "layer_prune":
            decision = prune_layers(candidate, calibration, int(variant.num_layers_to_drop or 0), tokens).to_dict()
        elif variant.method == "sparsity":
            masks, sparsity_decision = prune_sparse(candidate, calibration, variant.sparsity, variant.pattern, score)
            decision = sparsity_decision.to_dict()
        add_row(variant, candidate, False, decision, [])
        if recovery is not None:
            losses = recover(candidate, recovery, recovery_steps, masks=masks, learning_rate=learning_rate,
                             log_every=0)
            add_row(variant, candidate, True, decision, losses)
    return rows


def format_table(rows: Sequence[CompressionRow]) -> str:
    """A Markdown table: variant, recovery, layers, MACs per drafted token (and % of dense), MAL."""
    lines = ["| drafter | recovery | layers | MACs / token | % of dense | MAL |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.variant} | {'self-distilled' if row.recovered else 'none'} | {row.num_layers} | "
                     f"{row.macs_per_token:,} | {100 * row.macs_ratio:.0f} % | {row.mean_accepted_length:.2f} |")
    return "\n".join(lines)
