"""Train a recipe's models and save them atomically; load the shipped or cached copy whose hash matches."""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)

from massv.io import atomic_directory
from massv.pipelines import world
from massv.pipelines.world_models.evaluation import (
    evaluate_world_models,
    measure_cost_ratio,
)
from massv.pipelines.world_models.models import (
    build_world_target,
    build_world_text_lm,
    build_world_tokenizer,
)
from massv.pipelines.world_models.recipe import FORMAT_VERSION, WorldModels, WorldRecipe
from massv.pipelines.world_models.training import train_target, train_text_lm
from massv.pipelines.world_models.vision import pretrain_vision
from massv.tiny import build_qwen_processor

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets" / "world"  # massv/assets/world, shipped with the package
RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
TARGET_DIR = "target"
TEXT_LM_DIR = "text_lm"
PROCESSOR_DIR = "processor"
CACHE_ENV = "MASSV_CACHE_DIR"

def train_world_models(recipe: WorldRecipe, out_dir: str | os.PathLike, progress: bool = True,
                       probe_every: int = 0) -> Path:
    """Train tokenizer, target and text LM from `recipe`, evaluate them, and write `out_dir` atomically.

    Layout: `recipe.json`, `metrics.json`, `README.md`, `processor/` (processor + tokenizer), `target/` and
    `text_lm/` (Hugging Face checkpoints, safetensors in `recipe.save_dtype`). Metrics are measured on the
    saved (reloaded) weights, so they describe exactly what is shipped.
    """
    out_dir = Path(out_dir)
    started = time.time()
    tokenizer = build_world_tokenizer(recipe)
    processor = build_qwen_processor(tokenizer, image_size=recipe.image_size, patch_size=recipe.patch_size)
    target = build_world_target(recipe, tokenizer)
    text_lm = build_world_text_lm(recipe, tokenizer)
    logger.info("target: %.2fM parameters; text LM: %.2fM parameters", _millions(target), _millions(text_lm))

    phase_started = time.time()
    vision_losses, parsing_accuracy = pretrain_vision(target, processor, recipe, progress, probe_every)
    vision_seconds = time.time() - phase_started
    phase_started = time.time()
    target_losses = train_target(target, processor, recipe, progress, probe_every)
    target_seconds = time.time() - phase_started
    phase_started = time.time()
    text_losses = train_text_lm(text_lm, tokenizer, recipe, progress)
    text_seconds = time.time() - phase_started

    with atomic_directory(out_dir) as staging:  # metrics of the reloaded staging copy: exactly what is shipped
        save_dtype = getattr(torch, recipe.save_dtype)
        processor.save_pretrained(staging / PROCESSOR_DIR)
        copy.deepcopy(target).to(save_dtype).save_pretrained(staging / TARGET_DIR)
        copy.deepcopy(text_lm).to(save_dtype).save_pretrained(staging / TEXT_LM_DIR)
        # Each model directory is self-contained, as on the Hub: `massv eval --target <dir>` finds its processor.
        processor.save_pretrained(staging / TARGET_DIR)
        tokenizer.save_pretrained(staging / TEXT_LM_DIR)
        (staging / RECIPE_FILE).write_text(json.dumps({"hash": recipe.hash(), "world_version": world.WORLD_VERSION,
                                                        "format_version": FORMAT_VERSION, "recipe": recipe.to_dict()},
                                                       indent=2) + "\n")
        reloaded = _load_directory(staging, recipe)
        metrics = {
            "parameters": {"target": _count(reloaded.target), "text_lm": _count(reloaded.text_lm)},
            "training_seconds": {"vision": vision_seconds, "target": target_seconds, "text_lm": text_seconds},
            "final_loss": {"vision": _tail_mean(vision_losses), "target": _tail_mean(target_losses),
                           "text_lm": _tail_mean(text_losses)},
            "vision_heldout_cell_accuracy": parsing_accuracy,
            "heldout": evaluate_world_models(reloaded, progress=progress),
            "cost": measure_cost_ratio(reloaded.target, reloaded.text_lm, reloaded.processor,
                                       recipe.cost_context_tokens, recipe.cost_decode_steps, recipe.image_size),
            "torch_threads": torch.get_num_threads(),
        }
        metrics["total_seconds"] = time.time() - started
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "README.md").write_text(_model_card(recipe, metrics))
    logger.info("world models for recipe %s written to %s in %.0f s", recipe.hash(), out_dir, time.time() - started)
    return out_dir


def default_cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "massv") / "world"


def load_world_models(cache_dir: str | os.PathLike | None = None, from_scratch: bool = False,
                      recipe: WorldRecipe | None = None, progress: bool = True) -> WorldModels:
    """The world models for `recipe` (default: the shipped one), trained only if no matching copy exists.

    Looks in the shipped `massv/assets/world/`, then in `<cache_dir or ~/.cache/massv/world>/<recipe-hash>/`;
    a directory counts only if its `recipe.json` hash matches. `from_scratch=True` retrains into the cache.
    """
    recipe = recipe or WorldRecipe()
    key = recipe.hash()
    cache_path = (Path(cache_dir) if cache_dir is not None else default_cache_root()) / key
    if not from_scratch:
        for candidate in (ASSETS_DIR, cache_path):
            if stored_recipe_hash(candidate) == key:
                logger.info("loading world models %s from %s", key, candidate)
                return _load_directory(candidate, recipe)
    logger.info("no world models for recipe %s; training them into %s", key, cache_path)
    train_world_models(recipe, cache_path, progress=progress)
    return _load_directory(cache_path, recipe)


def stored_recipe_hash(directory: str | os.PathLike) -> str | None:
    """The recipe hash a world-models directory was written for, or None if it is missing or incomplete."""
    directory = Path(directory)
    try:
        stored = json.loads((directory / RECIPE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    parts = (directory / TARGET_DIR / "config.json", directory / TEXT_LM_DIR / "config.json", directory / PROCESSOR_DIR)
    return stored.get("hash") if all(part.exists() for part in parts) else None


def _load_directory(directory: Path, recipe: WorldRecipe) -> WorldModels:
    processor = AutoProcessor.from_pretrained(directory / PROCESSOR_DIR)
    target = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory / TARGET_DIR, dtype=torch.float32)
    text_lm = Qwen2ForCausalLM.from_pretrained(directory / TEXT_LM_DIR, dtype=torch.float32)
    target.eval()
    text_lm.eval()
    metrics_path = directory / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    return WorldModels(target=target, text_lm=text_lm, processor=processor, tokenizer=processor.tokenizer,
                       recipe=recipe, path=directory, metrics=metrics)


def _tail_mean(losses: list[float]) -> float:
    return statistics.fmean(losses[-50:]) if losses else float("nan")


def _count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _millions(model: torch.nn.Module) -> float:
    return _count(model) / 1e6


def _model_card(recipe: WorldRecipe, metrics: dict[str, Any]) -> str:
    """README for a world-models directory: what was trained, how, and how well it does on heldout scenes."""
    lines = [
        "# World models: a Qwen2.5-VL target and a text-only Qwen2 drafter LM, trained from scratch",
        "",
        "Written by `massv.pipelines.world_models.train_world_models` (reproduce with "
        "`python data_prep/train_world_models.py --out massv/assets/world`). Trained on the synthetic world of "
        "`massv/pipelines/world.py`; evaluated on its `heldout` split, whose scenes no training split contains.",
        "",
        f"Recipe hash `{recipe.hash()}` (world version {world.WORLD_VERSION}, format version {FORMAT_VERSION}).",
        "",
        "| stage | model | parameters | training time (s) | final loss |",
        "|---|---|---|---|---|",
    ]
    stages = (("vision pretraining (scene parsing)", "target", "vision"), ("answer training", "target", "target"),
              ("text-only pretraining", "text_lm", "text_lm"))
    for stage, model_name, key in stages:
        lines.append(f"| {stage} | {model_name} | {metrics['parameters'][model_name] / 1e6:.2f}M "
                     f"| {metrics['training_seconds'][key]:.0f} | {metrics['final_loss'][key]:.4f} |")
    lines += [
        "",
        f"Vision pretraining: {metrics['vision_heldout_cell_accuracy']:.3f} of heldout grid cells parsed right "
        "(shape, colour, size and which cell it is).",
    ]
    lines += [
        "",
        "## Held-out accuracy (greedy decoding)",
        "",
        "`exact`: the answer is word for word one the world generates for that question and scene (any of its "
        "answer templates). `exact_reference`: equal to the single reference answer (capped below 1, since "
        "answer templates are drawn at random). `well_formed`: only world words, in the shape of an answer "
        "template. `content`: the facts (colour, shape, size, number, place, yes/no words) in the order of a "
        "valid answer, whatever the glue words. `colour_word`: colour questions only, the right colour named.",
        "",
        "| model | task | n | exact | content | exact_reference | well_formed | colour_word |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("target", "text_lm"):
        for kind, row in metrics["heldout"][name].items():
            colour = f"{row['colour_word']:.3f}" if "colour_word" in row else ""
            lines.append(f"| {name} | {kind} | {row['n']} | {row['exact']:.3f} | {row['content']:.3f} "
                         f"| {row['exact_reference']:.3f} "
                         f"| {row['well_formed']:.3f} | {colour} |")
    cost = metrics["cost"]
    lines += [
        "",
        "## Cost ratio",
        "",
        f"One cached single-token forward at a ~{cost['target_context_tokens']}-token context, "
        f"{metrics['torch_threads']} CPU threads: target {cost['target_ms']:.2f} ms, drafter LM "
        f"{cost['drafter_ms']:.2f} ms, c = {cost['cost_ratio']:.3f}.",
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe.to_dict(), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
