"""The demo-world compression study (`massv demo --compress`): MAL vs drafter MACs for dense, layer-pruned
(1 and 2 layers) and sparse (50 %, 70 %, 2:4) MASSV drafters, each with and without self-distilled recovery.

Why a study of its own: the demo's drafter LM has a single decoder layer (a low drafter/target cost ratio is
what makes the demo fast), and a one-layer LM has no layer to drop. So the study
  1. trains a DEEPER text LM (`StudySize.text_layers` layers; otherwise the recipe's text LM: same width,
     tokenizer, world text and optimiser, via `world_models.train_text_lm`),
  2. makes it a MASSV drafter with the demo's two phases (configs/demo.yaml: the projector on captions, then
     projector + LM on the target's own answers),
  3. runs `compression_table` on that drafter: calibration (angular distance, Wanda) and recovery on the
     self-distilled answers, MAL from the real engine (greedy, γ = 5) on the demo's held-out prompts.
Each stage is stored under `out_dir/drafter-<key>/` (the key hashes everything that decides the trained
drafter) and reused by the next run; the results go to `out_dir/compression.json` and `compression.md`.

Reading the table. "ΔMAL vs dense" compares with the dense drafter before any recovery (the trained MASSV
drafter as it is). "MAL recovered" is what the recovery steps won back for one compressed drafter (recovered
MAL - its one-shot MAL); divided by the GMACs per drafted token that compression saved, it is the acceptance
self-distillation buys back per unit of compute removed. The dense drafter gets the same recovery steps: its
change is the control for "more training" alone, and the finding reports gains net of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from massv.compress.calibration import Sample, prepare_batches
from massv.compress.recipe import mean_sequence_length
from massv.compress.table import (
    DEFAULT_VARIANTS,
    CompressionRow,
    Variant,
    compression_table,
)
from massv.io import atomic_directory

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
JSON_NAME = "compression.json"
MARKDOWN_NAME = "compression.md"
DENSE = "dense"
STUDY_LM_MARKER = "study_text_lm.json"
# A change in MAL smaller than this is reported as "no change": with a few dozen held-out answers, MAL moves
# by a few hundredths between runs that differ only in which drafts happened to be accepted.
MAL_TOLERANCE = 0.05
LEGEND = ("ΔMAL vs dense: against the dense drafter without recovery. MAL recovered: recovered MAL minus the same "
          "variant's one-shot MAL. Per GMAC saved: that gain divided by the GMACs per drafted token the compression "
          "removed.")


@dataclass(frozen=True)
class StudySize:
    """Everything the study's size decides (the world models and data come from the caller)."""

    text_layers: int = 4
    # A 4-layer LM costs about three times the recipe's one-layer LM per step; 600 steps of 64 conversations
    # teach it the world's language, and phase 2 then tunes it on the target's own answers. None: the recipe's.
    text_steps: int | None = 600
    phase1_steps: int = 300
    phase2_steps: int = 400
    calibration_samples: int = 64
    recovery_steps: int = 100
    # Small enough that the dense control stays put: at 5e-4 the same 100 steps cost the trained dense
    # drafter 0.15 MAL on the shipped world, so "recovery" partly measured retraining damage.
    recovery_learning_rate: float = 1e-4
    max_new_tokens: int = 96


SIZES = {
    "full": StudySize(),
    "quick": StudySize(text_steps=10, phase1_steps=4, phase2_steps=4, calibration_samples=4, recovery_steps=2,
                       max_new_tokens=16),
}


# ---- the deeper text LM and its MASSV drafter ------------------------------------------------------------


def study_recipe(recipe: Any, size: StudySize) -> Any:
    """The world recipe with a deeper text LM (same width, heads, tokenizer and data)."""
    return replace(recipe, text_layers=size.text_layers, text_steps=size.text_steps or recipe.text_steps)


def train_study_text_lm(recipe: Any, tokenizer: Any, directory: Path, progress: bool = True) -> Any:
    """The text LM of `recipe`, trained on world text, or loaded from `directory` if it was trained for it.

    Saved in float32 (a cache, not a shipped asset) into a staging directory renamed into place, with a
    marker naming the recipe hash, so a half-written or other-recipe copy is never reused.
    """
    from transformers import Qwen2ForCausalLM

    from massv.pipelines.world_models import build_world_text_lm, train_text_lm

    marker = directory / STUDY_LM_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("recipe_hash") == recipe.hash():
        logger.info("reusing the %d-layer study text LM in %s", recipe.text_layers, directory)
        return Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    started = time.perf_counter()
    text_lm = build_world_text_lm(recipe, tokenizer)
    losses = train_text_lm(text_lm, tokenizer, recipe, progress)
    with atomic_directory(directory) as staging:  # replaces an unfinished or stale copy under the study's key
        text_lm.save_pretrained(staging)
        info = {"recipe_hash": recipe.hash(), "recipe": recipe.to_dict(), "seconds": time.perf_counter() - started,
                "final_loss": statistics.fmean(losses[-50:])}
        (staging / STUDY_LM_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return text_lm.eval()


def _study_key(recipe: Any, size: StudySize, overrides: Sequence[str], num_pretrain: int, num_distilled: int,
               seed: int) -> str:
    payload = {"recipe": recipe.hash(), "phase1_steps": size.phase1_steps, "phase2_steps": size.phase2_steps,
               "overrides": list(overrides), "pretrain": num_pretrain, "distilled": num_distilled, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _study_config(config_path: Path, stage_dir: Path, size: StudySize, overrides: Sequence[str]) -> Any:
    """configs/demo.yaml with the study's phase output directories and step counts."""
    from massv.config import load_config

    paths = [f"phase1.output_dir={stage_dir / 'phase1'}", f"phase2.output_dir={stage_dir / 'phase2'}",
             f"phase1.max_steps={size.phase1_steps}", f"phase2.max_steps={size.phase2_steps}",
             f"model.drafter_lm={stage_dir / 'text_lm'}"]
    return load_config(config_path, overrides=list(overrides) + paths)


def _massv_drafter(config: Any, world_models: Any, text_lm: Any, pretrain_records: Any, distilled_records: Any) -> Any:
    """Phase 1 (projector on captions) then phase 2 (projector + LM on the target's answers); finished
    phases are loaded, not retrained."""
    from massv.config import final_dir
    from massv.drafter import MultimodalDrafter
    from massv.pipelines.stages import is_trained, train_or_load
    from massv.train.builders import build_drafter

    target, processor = world_models.target, world_models.processor
    if not is_trained(config.phase1.output_dir):
        fresh = build_drafter(config.model, target, copy.deepcopy(text_lm), processor, seed=config.phase1.seed)
        train_or_load(config, 1, target, fresh, processor, pretrain_records)
    phase2_start = MultimodalDrafter.from_pretrained(final_dir(config.phase1.output_dir), target=target)
    drafter = train_or_load(config, 2, target, phase2_start, processor, distilled_records)
    return drafter.eval()


def _as_sample(sample: Any) -> Sample:
    """A `compress.Sample` (prompt + PIL image) from a benchmark sample (prompt + image path)."""
    if isinstance(sample, Sample):
        return sample
    from massv.train.llava_data import load_image

    return Sample(prompt=sample.prompt, image=load_image(sample.image_path, sample.sample_id))


# ---- the study ---------------------------------------------------------------------------------------------


def run_compression_study(world_models: Any, out_dir: str | os.PathLike, distilled_records: Any,
                          pretrain_records: Any, heldout_samples: Sequence[Any], quick: bool = False, *,
                          size: StudySize | None = None, config_path: str | os.PathLike = DEFAULT_CONFIG,
                          overrides: Sequence[str] = (), variants: Sequence[Variant] = DEFAULT_VARIANTS,
                          num_draft_tokens: int = 5, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) the deeper MASSV drafter, measure every variant, write compression.json / .md.

    `world_models`: a `WorldModels` (target, processor, tokenizer, recipe). `distilled_records`: the target's
    answers (LLaVA records, as `load_distilled_records` returns them): phase 2, calibration and recovery.
    `pretrain_records`: caption records for phase 1. `heldout_samples`: benchmark samples (image path +
    prompt) or `compress.Sample`s, the prompts MAL is measured on. Returns the JSON report (with the
    Markdown under "markdown").
    """
    from massv.train.builders import build_train_dataset

    started = time.perf_counter()
    size = size or SIZES["quick" if quick else "full"]
    out_dir = Path(out_dir)
    recipe = study_recipe(world_models.recipe, size)
    key = _study_key(recipe, size, overrides, len(pretrain_records), len(distilled_records), seed)
    stage_dir = out_dir / f"drafter-{key}"
    config = _study_config(Path(config_path), stage_dir, size, overrides)

    logger.info("compression study: %d-layer text LM", recipe.text_layers)
    text_lm = train_study_text_lm(recipe, world_models.tokenizer, stage_dir / "text_lm", progress)
    drafter = _massv_drafter(config, world_models, text_lm, pretrain_records, distilled_records)
    train_seconds = time.perf_counter() - started

    torch.manual_seed(seed)
    dataset, collator = build_train_dataset(config, distilled_records, world_models.processor, drafter)
    calibration = prepare_batches(drafter, [collator([dataset[index]])
                                            for index in range(min(size.calibration_samples, len(dataset)))])
    context_length = mean_sequence_length(calibration)
    recovery = torch.utils.data.DataLoader(dataset, batch_size=config.phase2.per_device_batch_size, shuffle=True,
                                           collate_fn=collator, generator=torch.Generator().manual_seed(seed))
    samples = [_as_sample(sample) for sample in heldout_samples]
    rows = compression_table(world_models.target, drafter, world_models.processor, calibration, samples, recovery,
                             variants=variants, num_draft_tokens=num_draft_tokens, max_new_tokens=size.max_new_tokens,
                             recovery_steps=size.recovery_steps, learning_rate=size.recovery_learning_rate,
                             context_length=context_length, seed=seed)

    settings = {**asdict(size), "num_draft_tokens": num_draft_tokens, "temperature": 0.0,
                "heldout_samples": len(samples), "context_length": context_length,
                "recovery_batch_size": config.phase2.per_device_batch_size, "recovery_examples": len(dataset),
                "text_hidden_size": recipe.text_hidden_size,
                "text_lm_final_loss": json.loads((stage_dir / "text_lm" / STUDY_LM_MARKER).read_text())["final_loss"],
                "drafter": str(stage_dir / "phase2" / "final"),
                "train_seconds": round(train_seconds, 1)}
    report = study_report(rows, settings)
    report["seconds"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / MARKDOWN_NAME).write_text(report["markdown"])
    logger.info("compression study written to %s", out_dir / MARKDOWN_NAME)
    return report


# ---- reading the rows: derived numbers, the table, the finding -------------------------------------------


def study_rows(rows: Sequence[CompressionRow]) -> list[dict[str, Any]]:
    """Each row as a dict with the derived numbers.

    delta_mal_vs_dense              MAL - MAL of the dense drafter without recovery
    gmacs_saved                     (dense MACs - these MACs) per drafted token, in GMACs
    mal_recovered                   recovered rows: MAL - the same variant's one-shot MAL
    mal_recovered_net               mal_recovered - what the same recovery steps gave the dense drafter
    mal_recovered_per_gmac_saved    mal_recovered / gmacs_saved (compressed variants only)
    mal_recovered_net_per_gmac_saved
    fraction_of_loss_recovered      mal_recovered / (dense MAL - one-shot MAL), where compression lost MAL
    """
    one_shot = {row.variant: row for row in rows if not row.recovered}
    if DENSE not in one_shot:
        raise ValueError(f"the rows need a one-shot {DENSE!r} row to compare with; got {sorted(one_shot)}")
    dense = one_shot[DENSE]
    dense_recovered = next((row for row in rows if row.variant == DENSE and row.recovered), None)
    control = dense_recovered.mean_accepted_length - dense.mean_accepted_length if dense_recovered else None
    derived = []
    for row in rows:
        gmacs_saved = (dense.macs_per_token - row.macs_per_token) / 1e9
        item: dict[str, Any] = {**row.to_dict(), "delta_mal_vs_dense": row.mean_accepted_length - dense.mean_accepted_length,
                                "gmacs_saved": gmacs_saved, "mal_recovered": None, "mal_recovered_net": None,
                                "mal_recovered_per_gmac_saved": None, "mal_recovered_net_per_gmac_saved": None,
                                "fraction_of_loss_recovered": None}
        base = one_shot.get(row.variant)
        if row.recovered and base is not None:
            gain = row.mean_accepted_length - base.mean_accepted_length
            item["mal_recovered"] = gain
            item["mal_recovered_net"] = gain - control if control is not None else None
            if gmacs_saved > 0:
                item["mal_recovered_per_gmac_saved"] = gain / gmacs_saved
                if item["mal_recovered_net"] is not None:
                    item["mal_recovered_net_per_gmac_saved"] = item["mal_recovered_net"] / gmacs_saved
            loss = dense.mean_accepted_length - base.mean_accepted_length
            if loss > 0:
                item["fraction_of_loss_recovered"] = gain / loss
        derived.append(item)
    return derived


def _signed(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value + 0.0:+.{digits}f}".replace("-0.00", "+0.00")


def format_study_table(rows: Sequence[CompressionRow]) -> str:
    """Markdown: variant, recovery, layers, MACs per drafted token (% of dense), MAL, ΔMAL vs dense, MAL
    recovered, MAL recovered per GMAC saved."""
    lines = ["| drafter | recovery | layers | MACs / drafted token | % of dense | MAL | ΔMAL vs dense | MAL recovered "
             "| MAL recovered per GMAC saved |",
             "|---|---|---|---|---|---|---|---|---|"]
    for item in study_rows(rows):
        per_gmac = item["mal_recovered_per_gmac_saved"]
        lines.append(f"| {item['variant']} | {'self-distilled' if item['recovered'] else 'none'} | {item['num_layers']} "
                     f"| {item['macs_per_token']:,} | {100 * item['macs_ratio']:.0f} % | {item['mean_accepted_length']:.2f} "
                     f"| {_signed(item['delta_mal_vs_dense'])} | {_signed(item['mal_recovered'])} "
                     f"| {'' if per_gmac is None else f'{per_gmac:+,.0f}'} |")
    return "\n".join(lines)


def study_finding(rows: Sequence[CompressionRow], recovery_steps: int | None = None,
                  tolerance: float = MAL_TOLERANCE) -> str:
    """One paragraph, computed from the rows: what one-shot compression costs in MAL, whether self-distilled
    recovery wins it back (net of the dense control), how much per GMAC saved, and the best trade-off."""
    items = study_rows(rows)
    dense = next(item for item in items if item["variant"] == DENSE and not item["recovered"])
    control = next((item["mal_recovered"] for item in items if item["variant"] == DENSE and item["recovered"]), None)
    compressed_one_shot = [item for item in items if item["variant"] != DENSE and not item["recovered"]]
    recovered = [item for item in items if item["variant"] != DENSE and item["recovered"]]
    steps = f" ({recovery_steps} steps)" if recovery_steps else ""
    sentences = [f"The dense {dense['num_layers']}-layer MASSV drafter reaches MAL {dense['mean_accepted_length']:.2f} "
                 f"at {dense['macs_per_token']:,} MACs per drafted token."]
    if not compressed_one_shot:
        return sentences[0] + " No compressed variant was measured."

    losses = {item["variant"]: -item["delta_mal_vs_dense"] for item in compressed_one_shot}
    worst = max(compressed_one_shot, key=lambda item: losses[item["variant"]])
    hurt = [name for name, loss in losses.items() if loss > tolerance]
    if hurt:
        sentences.append(
            f"Compressed one-shot, {len(hurt)} of {len(losses)} variants lose more than {tolerance:.2f} MAL "
            f"(from {min(losses[name] for name in hurt):.2f} to {max(losses.values()):.2f}; worst: {worst['variant']}, MAL "
            f"{worst['mean_accepted_length']:.2f} at {100 * worst['macs_ratio']:.0f} % of the dense MACs).")
    else:
        sentences.append(f"Compressed one-shot, no variant loses more than {tolerance:.2f} MAL (largest loss "
                         f"{max(0.0, max(losses.values())):.2f}, {worst['variant']}), so there is little for recovery to win back.")

    if recovered:
        by_name = {item["variant"]: item for item in recovered}
        control_text = (f"; the dense drafter given the same steps changes by {control:+.2f}, the control for "
                        f"training alone" if control is not None else "")
        judged = [by_name[name] for name in hurt if name in by_name] or recovered
        gains = [item["mal_recovered"] for item in judged]
        nets = [item["mal_recovered_net"] for item in judged if item["mal_recovered_net"] is not None]
        net = statistics.fmean(nets) if nets else statistics.fmean(gains)
        fractions = [item["fraction_of_loss_recovered"] for item in judged if item["fraction_of_loss_recovered"] is not None]
        scope = "the variants that lost MAL" if hurt else "the compressed variants"
        if net > tolerance:
            verdict = f"Self-distilled recovery{steps} does recover MAL after compression"
        elif net < -tolerance:
            verdict = f"Self-distilled recovery{steps} does not recover MAL after compression; it lowers it"
        else:
            verdict = (f"Self-distilled recovery{steps} does not measurably recover MAL after compression "
                       f"beyond what the same training gives the dense drafter")
        detail = f": over {scope} it adds {min(gains):+.2f} to {max(gains):+.2f} MAL (mean {statistics.fmean(gains):+.2f}"
        if fractions:
            detail += f", {100 * statistics.fmean(fractions):.0f} % of the one-shot loss on average"
        detail += f"; mean net of the control {net:+.2f}){control_text}."
        sentences.append(verdict + detail)

        per_gmac = [item for item in recovered if item["mal_recovered_per_gmac_saved"] is not None]
        if per_gmac:
            best = max(per_gmac, key=lambda item: item["mal_recovered_per_gmac_saved"])
            low = min(per_gmac, key=lambda item: item["mal_recovered_per_gmac_saved"])
            sentences.append(
                f"Per GMAC saved per drafted token, recovery buys back "
                f"{statistics.fmean(item['mal_recovered_per_gmac_saved'] for item in per_gmac):+,.0f} MAL on average "
                f"(most: {best['variant']}, {best['mal_recovered_per_gmac_saved']:+,.0f}; least: {low['variant']}, "
                f"{low['mal_recovered_per_gmac_saved']:+,.0f}).")
        levels = [item["mean_accepted_length"] for item in recovered]
        level = f"After recovery the compressed drafters reach MAL {min(levels):.2f} to {max(levels):.2f}"
        if control is not None:
            level += f" (the dense drafter after the same steps: {dense['mean_accepted_length'] + control:.2f})"
        close = [item for item in recovered if item["delta_mal_vs_dense"] >= -tolerance]
        if close:
            cheapest = min(close, key=lambda item: item["macs_per_token"])
            sentences.append(f"{level}; the cheapest within {tolerance:.2f} MAL of the dense drafter is "
                             f"{cheapest['variant']}: MAL {cheapest['mean_accepted_length']:.2f} at "
                             f"{100 * cheapest['macs_ratio']:.0f} % of the dense MACs.")
        else:
            closest = max(recovered, key=lambda item: item["delta_mal_vs_dense"])
            sentences.append(f"{level}; none comes within {tolerance:.2f} MAL of the dense drafter, the closest is "
                             f"{closest['variant']} ({closest['delta_mal_vs_dense']:+.2f} MAL at "
                             f"{100 * closest['macs_ratio']:.0f} % of the dense MACs).")
    return " ".join(sentences)


def study_report(rows: Sequence[CompressionRow], settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: settings, rows with derived numbers, the finding, and the Markdown section."""
    finding = study_finding(rows, settings.get("recovery_steps"))
    return {"settings": settings, "rows": study_rows(rows), "finding": finding,
            "markdown": study_markdown(rows, settings, finding)}


def study_markdown(rows: Sequence[CompressionRow], settings: dict[str, Any], finding: str) -> str:
    layers = settings.get("text_layers", "?")
    lines = [
        "## Compression study: MAL vs drafter MACs",
        "",
        f"A {layers}-layer MASSV drafter (world text LM, same width as the demo's, phases 1 + 2) compressed by "
        f"angular layer pruning or Wanda sparsity; \"self-distilled\" rows then get {settings.get('recovery_steps')} "
        f"recovery steps on the target's answers (lr {settings.get('recovery_learning_rate')}, masks fixed). "
        f"MAL: greedy, γ = {settings.get('num_draft_tokens')}, {settings.get('heldout_samples')} held-out prompts, "
        f"bonus token counted. MACs per drafted token at a {settings.get('context_length')}-token context "
        "(nonzero decoder weights + attention + LM head).",
        "",
        LEGEND,
        "",
        format_study_table(rows),
        "",
        f"**Finding.** {finding}",
        "",
    ]
    return "\n".join(lines)
