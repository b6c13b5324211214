"""A target VLM and a text-only drafter LM trained from scratch on the synthetic world, shipped and cached.

No pretrained VLM can be downloaded where this project is proven, so the demo of speculative decoding needs
models that it trains itself. They use the real architectures and the real processor path:

* a byte-level BPE tokenizer with Qwen2's special tokens and chat template, trained on world text;
* a TARGET `Qwen2_5_VLForConditionalGeneration` (window-attention ViT + patch merger + mrope LM), trained
  end to end on the world's `train` split (LLaVA format, loss on answer tokens only) until it answers
  held-out questions about colours, counts and positions correctly: the answers live in the pixels only;
* a TEXT-ONLY `Qwen2ForCausalLM` with the same tokenizer, pretrained on the world's conversations without
  images: it knows how answers are phrased but not what the picture shows. It is the paper's text-only
  drafter baseline and the language model inside the MASSV drafter.

The drafter LM is kept much cheaper per token than the target (one layer against ten), because the speedup
of speculative decoding is bounded by that cost ratio; `measure_cost_ratio` reports it.

`load_world_models()` returns the weights shipped in `massv/assets/world/` when their recipe hash matches the
requested `WorldRecipe`; otherwise it trains (a recipe hash names the cache `~/.cache/massv/world/<hash>/`)
and reuses that cache next time. Saves are atomic: a half-written directory never looks complete.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from torch import nn
from transformers import (
    AutoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)
from transformers.utils import ModelOutput

from massv import world
from massv.families import get_adapter
from massv.io import discard_staging, publish_directory
from massv.tiny import build_qwen_processor, build_qwen_tokenizer, qwen_drafter_config, qwen_target_config

logger = logging.getLogger(__name__)

# Bump when the training code changes what a recipe produces; it is part of every recipe hash.
FORMAT_VERSION = 2

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "world"
RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
TARGET_DIR = "target"
TEXT_LM_DIR = "text_lm"
PROCESSOR_DIR = "processor"
CACHE_ENV = "MASSV_CACHE_DIR"
MERGE_SIZE = 2  # Qwen2.5-VL's spatial merge: 2x2 patches per LM image token
NUM_CELLS = len(world.CELL_NAMES)  # the world's 3x3 grid


# ----------------------------------------------------------------------------------------------------------
# Recipe.


@dataclass(frozen=True)
class WorldRecipe:
    """Every size, seed and step count that decides the trained world models; its hash names the cache.

    The defaults are the shipped recipe, sized for a shared 2-core CPU: about 45 CPU-minutes for the target
    and ten for the text LM. Images are 96x96 with 16x16 patches: after Qwen2.5-VL's 2x2 patch merger
    each image is 9 LM tokens, and each token covers exactly one cell of the world's 3x3 grid (checked in
    `__post_init__`). That alignment is what lets the vision tower be pretrained per token on "what is in
    this cell, and which cell is it" and the LM learn to read it within a CPU budget; with 16 tokens
    straddling cell borders (64x64, 8x8 patches) the target was still blind to most details after 1200 steps.
    Without the cell in the parse (format version 1, 1200 steps) the target named the right colour 38% of the
    time and got 1.5% of answers exactly right; with it, 72% and 12% after 2000 steps (see `PARSE_FIELDS`). The target is deep and narrow
    (10 x 192) because at batch size 1 a CPU forward costs about the same per layer whatever the width, so
    depth sets the target's per-token cost while width sets the training cost; the drafter LM has one layer.
    """

    seed: int = 0
    image_size: int = world.DEFAULT_IMAGE_SIZE
    patch_size: int = 16
    # Tokenizer: byte-level BPE trained on this many records per split of world text.
    vocab_size: int = 512
    tokenizer_samples: int = 2000
    # Target VLM.
    target_hidden_size: int = 192
    target_layers: int = 10
    target_heads: int = 4
    target_intermediate_size: int = 512
    vision_hidden_size: int = 128
    vision_depth: int = 4
    # Stage 0: the vision tower (with the merger) learns to parse scenes, standing in for a pretrained encoder.
    vision_steps: int = 400
    vision_batch_size: int = 32
    vision_lr: float = 2e-3
    vision_warmup_steps: int = 50
    # Stage 1: the LM (and the merger) learn to answer; the parsed-scene vision blocks stay frozen (LLaVA).
    freeze_vision_blocks: bool = True
    target_steps: int = 2000
    target_batch_size: int = 16
    target_lr: float = 2e-3
    target_warmup_steps: int = 100
    # Text-only drafter LM.
    text_hidden_size: int = 128
    text_layers: int = 1
    text_heads: int = 4
    text_intermediate_size: int = 512
    text_steps: int = 1500
    text_batch_size: int = 64
    text_lr: float = 3e-3
    text_warmup_steps: int = 100
    text_pretrain_fraction: float = 0.2  # share of caption-instruction (LLaVA-Pretrain style) records
    # Shared optimiser settings.
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    # Evaluation on the heldout split (scenes no training split can contain) and the cost measurement.
    eval_samples: int = 400
    eval_seed: int = 1000
    max_new_tokens: int = 96
    cost_context_tokens: int = 100
    cost_decode_steps: int = 64
    save_dtype: str = "float16"

    def __post_init__(self) -> None:
        cells_per_side = math.isqrt(NUM_CELLS)
        if self.image_size != self.patch_size * MERGE_SIZE * cells_per_side:
            raise ValueError(
                f"image_size {self.image_size} must be patch_size * {MERGE_SIZE} * {cells_per_side} "
                f"(= {self.patch_size * MERGE_SIZE * cells_per_side}) so that each merged image token covers one "
                "grid cell of the world"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldRecipe:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WorldRecipe fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    def hash(self) -> str:
        """Stable short hash of the recipe, the world generator version and this file's format version.

        Why: a cached or shipped model is only valid for the exact world and recipe it was trained on.
        """
        payload = {"recipe": self.to_dict(), "world_version": world.WORLD_VERSION, "format_version": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class WorldModels:
    """The trained target VLM, the text-only drafter LM, and the processor/tokenizer both share."""

    target: Qwen2_5_VLForConditionalGeneration
    text_lm: Qwen2ForCausalLM
    processor: ProcessorMixin
    tokenizer: PreTrainedTokenizerFast
    recipe: WorldRecipe
    path: Path | None = None
    metrics: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------------------
# Builders.


def build_world_tokenizer(recipe: WorldRecipe) -> PreTrainedTokenizerFast:
    """Qwen2-style byte-level BPE trained on world text (no heldout text), checked to round-trip it.

    Why: the target and the drafter must share one tokenizer, and a small vocabulary keeps both models small.
    """
    corpus = world.world_text_corpus(recipe.tokenizer_samples, recipe.seed).splitlines()
    tokenizer = build_qwen_tokenizer(corpus, recipe.vocab_size)
    probe = world.world_text_corpus(50, recipe.eval_seed, splits=("heldout",)).splitlines()
    for line in probe:
        decoded = tokenizer.decode(tokenizer.encode(line, add_special_tokens=False))
        if decoded != line:
            raise AssertionError(f"world tokenizer does not round-trip {line!r}: got {decoded!r}")
    return tokenizer


def build_world_target(recipe: WorldRecipe, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL target of the recipe's size."""
    torch.manual_seed(recipe.seed)
    config = qwen_target_config(
        tokenizer, hidden_size=recipe.target_hidden_size, num_layers=recipe.target_layers,
        vision_hidden_size=recipe.vision_hidden_size, vision_depth=recipe.vision_depth,
        patch_size=recipe.patch_size, num_heads=recipe.target_heads,
        intermediate_size=recipe.target_intermediate_size,
    )
    return _with_generation_defaults(Qwen2_5_VLForConditionalGeneration(config), tokenizer)


def build_world_text_lm(recipe: WorldRecipe, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 text LM of the recipe's (small) size."""
    torch.manual_seed(recipe.seed + 1)
    config = qwen_drafter_config(
        tokenizer, hidden_size=recipe.text_hidden_size, num_layers=recipe.text_layers,
        num_heads=recipe.text_heads, intermediate_size=recipe.text_intermediate_size,
    )
    return _with_generation_defaults(Qwen2ForCausalLM(config), tokenizer)


def _with_generation_defaults(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> Any:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(world_end_of_turn())
    model.generation_config.bos_token_id = None
    return model


def world_end_of_turn() -> str:
    return "<|im_end|>"


# ----------------------------------------------------------------------------------------------------------
# Data: world records rendered in the chat format of the processor.


def record_question(record: dict[str, Any]) -> str:
    """The human turn without the LLaVA `<image>` marker (the chat template places the image)."""
    return record["conversations"][0]["value"].replace(world.IMAGE_TOKEN, "").strip()


def record_answer(record: dict[str, Any]) -> str:
    return record["conversations"][1]["value"]


def chat_prompt(tokenizer: PreTrainedTokenizerFast, question: str, with_image: bool) -> str:
    """The generation prompt for one user turn; with an image first (Qwen2.5-VL layout) or text only.

    Why: the target and the text-only LM must see the same words in the same template; only the image block
    differs, exactly as the drafter sees a target prompt with the image removed.
    """
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def train_examples(split: str, seed: int, start: int, count: int, image_size: int | None
                   ) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Records `start .. start+count-1` of (split, seed), rendered when `image_size` is given.

    Why: streaming fresh records by index gives every training step new scenes at no storage cost, and any
    step's batch can be rebuilt exactly.
    """
    records: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for index in range(start, start + count):
        record, scene = world.make_record(split, seed, index)
        records.append(record)
        if image_size is not None:
            images.append(world.render_scene(scene, image_size))
    return records, images


def encode_target_batch(processor: ProcessorMixin, target: Qwen2_5_VLForConditionalGeneration,
                        records: Sequence[dict[str, Any]], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """Model inputs for a training batch: right-padded, image tokens expanded, labels on answers only.

    The 3-D rotary positions are computed here from `mm_token_type_ids` and passed explicitly, so training
    never depends on the `rope_deltas` the model caches on itself.
    """
    tokenizer = processor.tokenizer
    prompts = [chat_prompt(tokenizer, record_question(record), with_image=True) for record in records]
    texts = [prompt + record_answer(record) + world_end_of_turn() for prompt, record in zip(prompts, records)]
    batch = processor(text=texts, images=list(images), return_tensors="pt", padding=True, padding_side="right",
                      return_mm_token_type_ids=True)
    prompt_lengths = [len(ids) for ids in processor(text=prompts, images=list(images))["input_ids"]]
    labels = batch["input_ids"].clone()
    for row, prompt_length in enumerate(prompt_lengths):
        labels[row, :prompt_length] = -100  # loss only on the answer and its end-of-turn token
    labels[batch["attention_mask"] == 0] = -100
    position_ids, _ = target.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    return {**batch, "labels": labels, "position_ids": position_ids}


def encode_text_batch(tokenizer: PreTrainedTokenizerFast, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Text-only conversations (no image block): loss on every real token, question and answer alike.

    Why: the text LM should model the whole world language, prompts included, as a pretrained LM would.
    """
    texts = [chat_prompt(tokenizer, record_question(r), with_image=False) + record_answer(r) + world_end_of_turn()
             for r in records]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


# ----------------------------------------------------------------------------------------------------------
# Training.


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norms, biases and gains are not shrunk)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_loop(model: torch.nn.Module, make_batch: Callable[[int], dict[str, torch.Tensor]], steps: int, lr: float,
                warmup_steps: int, recipe: WorldRecipe, name: str, progress: bool,
                probe: Callable[[], str] | None = None, probe_every: int = 0) -> list[float]:
    """The whole training step, in one place: forward, loss, backward, clip, AdamW, cosine LR.

    `probe` (called every `probe_every` steps, in eval mode) only logs; it never changes the weights.
    """
    optimizer = _optimizer(model, lr, recipe.weight_decay)
    schedule = _cosine_schedule(optimizer, warmup_steps, steps, recipe.min_lr_ratio)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"train {name}", unit="step", disable=not progress)
    for step in bar:
        batch = make_batch(step)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            recent = statistics.fmean(losses[-50:])
            bar.set_postfix(loss=f"{recent:.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            logger.info("%s step %d/%d loss %.4f", name, step + 1, steps, recent)
        if probe is not None and probe_every and (step + 1) % probe_every == 0 and step + 1 < steps:
            model.eval()
            logger.info("%s step %d probe: %s", name, step + 1, probe())
            model.train()
    model.eval()
    return losses


# What fills each grid cell: shape (or none), colour (or none), size (or none), and which cell it is; the
# scene parser's classes. The cell field matters: the LM reads a token's content through attention values,
# which rotary positions never enter, so "where" must be part of what the token says, not only where it sits.
PARSE_FIELDS: dict[str, tuple[str, ...]] = {
    "shape": ("none", *world.SHAPES),
    "colour": ("none", *world.COLOURS),
    "size": ("none", *world.SIZES),
    "cell": world.CELL_NAMES,
}


def scene_cell_labels(scene: world.Scene) -> torch.Tensor:
    """`(NUM_CELLS, 4)` class ids (shape, colour, size, cell) per grid cell, "none" for empty cells."""
    labels = torch.zeros(NUM_CELLS, len(PARSE_FIELDS), dtype=torch.long)
    labels[:, list(PARSE_FIELDS).index("cell")] = torch.arange(NUM_CELLS)
    object_fields = [(column, name, classes) for column, (name, classes) in enumerate(PARSE_FIELDS.items())
                     if name != "cell"]
    for obj in scene.objects:
        for column, name, classes in object_fields:
            labels[obj.cell, column] = classes.index(getattr(obj, name))
    return labels


@dataclass
class SceneParserOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: tuple[torch.Tensor, ...] | None = None  # per field: (batch, NUM_CELLS, classes)


class SceneParser(nn.Module):
    """The target's vision tower + a linear head that names what fills the grid cell under each image token.

    Why: a real VLM starts from a pretrained vision encoder; ours starts from nothing, and learning to see
    through a 10-layer LM's answer loss alone is slow on a CPU. Supervising each merged image token with the
    content of its cell gives the encoder that pretraining, and leaves each token describing one cell. The
    head (shared by all tokens) is discarded afterwards; the vision tower is the target's own, by reference.
    """

    def __init__(self, visual: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.visual = visual
        self.class_counts = [len(classes) for classes in PARSE_FIELDS.values()]
        self.head = nn.Linear(feature_dim, sum(self.class_counts))

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                cell_labels: torch.Tensor | None = None) -> SceneParserOutput:
        """`cell_labels: (batch, NUM_CELLS, 3)`; returns per-field logits `(batch, NUM_CELLS, classes)` and loss."""
        # pooler_output: (batch * NUM_CELLS, dim) in raster order, which is the world's cell order.
        features = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output
        logits = self.head(features).view(image_grid_thw.shape[0], NUM_CELLS, -1)
        field_logits = torch.split(logits, self.class_counts, dim=-1)
        loss = None
        if cell_labels is not None:
            loss = sum(nn.functional.cross_entropy(field.reshape(-1, field.shape[-1]), cell_labels[..., column].reshape(-1))
                       for column, field in enumerate(field_logits))
        return SceneParserOutput(loss=loss, logits=field_logits)


def encode_vision_batch(processor: ProcessorMixin, scenes: Sequence[world.Scene], image_size: int
                        ) -> dict[str, torch.Tensor]:
    images = [world.render_scene(scene, image_size) for scene in scenes]
    inputs = processor.image_processor(images=images, return_tensors="pt")
    labels = torch.stack([scene_cell_labels(scene) for scene in scenes])
    return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"], "cell_labels": labels}


@torch.inference_mode()
def scene_parsing_accuracy(parser: SceneParser, processor: ProcessorMixin, scenes: Sequence[world.Scene],
                           image_size: int) -> float:
    """Fraction of grid cells whose parse fields (shape, colour, size, cell) are all right."""
    batch = encode_vision_batch(processor, scenes, image_size)
    logits = parser(batch["pixel_values"], batch["image_grid_thw"]).logits
    predicted = torch.stack([field.argmax(-1) for field in logits], dim=-1)
    return float((predicted == batch["cell_labels"]).all(-1).float().mean())


def pretrain_vision(target: Qwen2_5_VLForConditionalGeneration, processor: ProcessorMixin, recipe: WorldRecipe,
                    progress: bool = True, probe_every: int = 0) -> tuple[list[float], float]:
    """Stage 0: train the target's vision tower and merger to parse `train` scenes; returns (losses,
    held-out cell accuracy)."""
    torch.manual_seed(recipe.seed + 2)
    parser = SceneParser(target.model.visual, target.config.vision_config.out_hidden_size)
    batch_size = recipe.vision_batch_size
    heldout_scenes = [world.Scene.from_dict(r["scene"]) for r in heldout_records(256, recipe.eval_seed + 2,
                                                                                image_size=recipe.image_size)[0]]

    def make_batch(step: int) -> dict[str, torch.Tensor]:
        # A seed offset gives the encoder other scenes than the answer-training stage sees.
        scenes = [world.make_record("train", recipe.seed + 2, index)[1]
                  for index in range(step * batch_size, (step + 1) * batch_size)]
        return encode_vision_batch(processor, scenes, recipe.image_size)

    def probe() -> str:
        return f"heldout cell accuracy {scene_parsing_accuracy(parser, processor, heldout_scenes, recipe.image_size):.3f}"

    losses = _train_loop(parser, make_batch, recipe.vision_steps, recipe.vision_lr, recipe.vision_warmup_steps,
                         recipe, "vision", progress, probe, probe_every)
    accuracy = scene_parsing_accuracy(parser, processor, heldout_scenes, recipe.image_size)
    logger.info("vision pretraining: heldout cell accuracy %.4f", accuracy)
    return losses, accuracy


def train_target(target: Qwen2_5_VLForConditionalGeneration, processor: ProcessorMixin, recipe: WorldRecipe,
                 progress: bool = True, probe_every: int = 0) -> list[float]:
    """Stage 1: train the target VLM to answer fresh `train` records each step (loss on answers only).

    Run after `pretrain_vision`. With `recipe.freeze_vision_blocks` the encoder blocks stay as pretrained
    and only the merger and the LM train (the LLaVA recipe), which also spares the CPU the vision backward
    pass. With `probe_every`, held-out accuracy on a few questions is logged along the way (the probe never
    touches the weights).
    """
    if recipe.freeze_vision_blocks:
        # The merger (the projector into the LM) keeps training; the parsed-scene encoder below it does not.
        target.model.visual.requires_grad_(False)
        target.model.visual.merger.requires_grad_(True)
    batch_size = recipe.target_batch_size

    def probe() -> str:
        probe_records, probe_images = heldout_records(48, recipe.eval_seed + 1, image_size=recipe.image_size)
        answers = generate_target_answers(target, processor, probe_records, probe_images, recipe.max_new_tokens)
        scores = score_answers(probe_records, answers)
        colour = scores.get("colour", {}).get("colour_word")
        exact = ", ".join(f"{kind} {row['exact']:.2f}" for kind, row in scores.items())
        return exact + (f"; colour word {colour:.2f}" if colour is not None else "")

    def make_batch(step: int) -> dict[str, torch.Tensor]:
        records, images = train_examples("train", recipe.seed, step * batch_size, batch_size, recipe.image_size)
        return encode_target_batch(processor, target, records, images)

    torch.manual_seed(recipe.seed)
    return _train_loop(target, make_batch, recipe.target_steps, recipe.target_lr, recipe.target_warmup_steps,
                       recipe, "target", progress, probe, probe_every)


def text_records(recipe: WorldRecipe, start: int, count: int) -> list[dict[str, Any]]:
    """Text-LM records: mostly `train` (all task kinds), some `pretrain` (caption instructions)."""
    period = max(1, round(1 / recipe.text_pretrain_fraction)) if recipe.text_pretrain_fraction > 0 else 0
    records = []
    for index in range(start, start + count):
        split = "pretrain" if period and index % period == period - 1 else "train"
        # Seed offset: a different stream of scenes than the target saw (text only, no pixels involved).
        records.append(world.make_record(split, recipe.seed + 1, index)[0])
    return records


def train_text_lm(text_lm: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, recipe: WorldRecipe,
                  progress: bool = True) -> list[float]:
    """Pretrain the text-only LM on world conversations rendered without any image."""
    batch_size = recipe.text_batch_size

    def make_batch(step: int) -> dict[str, torch.Tensor]:
        return encode_text_batch(tokenizer, text_records(recipe, step * batch_size, batch_size))

    torch.manual_seed(recipe.seed + 1)
    return _train_loop(text_lm, make_batch, recipe.text_steps, recipe.text_lr, recipe.text_warmup_steps, recipe,
                       "text_lm", progress)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: is a generated answer one the world could have given?


class _ChoiceWalker(random.Random):
    """A stand-in RNG that follows a prescribed path of choice indices (index 0 past its end).

    Why: the world picks question and answer templates independently, so the reference answer is one of
    several correct phrasings. Walking every branch of `world.make_conversation` with this RNG enumerates
    all of them from the world's own code, so the check never copies a template. `random()` is probed at
    values on both sides of the world's branch thresholds (0.2, 0.5, 0.8); `valid_answers` is checked in
    the tests to always contain the reference answer.
    """

    UNIFORM_PROBES: tuple[float, ...] = (0.1, 0.35, 0.65, 0.9)

    def __init__(self, path: Sequence[int]) -> None:
        super().__init__(0)
        self.path = list(path)
        self.taken: list[int] = []
        self.widths: list[int] = []

    def _pick(self, width: int) -> int:
        if width <= 0:
            raise IndexError("cannot choose from an empty sequence")
        position = len(self.taken)
        index = self.path[position] if position < len(self.path) else 0
        self.taken.append(index)
        self.widths.append(width)
        return index

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self._pick(len(seq))]

    def choices(self, population: Sequence[Any], weights: Any = None, *, cum_weights: Any = None, k: int = 1
                ) -> list[Any]:
        return [population[self._pick(len(population))] for _ in range(k)]

    def random(self) -> float:
        return self.UNIFORM_PROBES[self._pick(len(self.UNIFORM_PROBES))]

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        values = range(start) if stop is None else range(start, stop, step)
        return values[self._pick(len(values))]

    def randint(self, a: int, b: int) -> int:
        return self.randrange(a, b + 1)

    def sample(self, population: Sequence[Any], k: int, *, counts: Any = None) -> list[Any]:
        orders = list(itertools.permutations(population, k))
        return list(orders[self._pick(len(orders))])

    def shuffle(self, x: list[Any]) -> None:  # pragma: no cover - not used by the world today
        orders = list(itertools.permutations(x))
        x[:] = orders[self._pick(len(orders))]


def _enumerate_outcomes(function: Callable[[random.Random], Any]) -> set[Any]:
    """Every value `function(rng)` can return, by depth-first walk over all of its random choices."""
    outcomes: set[Any] = set()
    pending: list[list[int]] = [[]]
    while pending:
        path = pending.pop()
        walker = _ChoiceWalker(path)
        outcomes.add(function(walker))
        for position in range(len(path), len(walker.taken)):
            for alternative in range(1, walker.widths[position]):
                pending.append(walker.taken[:position] + [alternative])
    return outcomes


def valid_answers(record: dict[str, Any]) -> set[str]:
    """All answers the world could give to this record's question about its scene (any answer template)."""
    scene = world.Scene.from_dict(record["scene"])
    kinds = ("caption", "pretrain") if record["task"] == "caption" else (record["task"],)
    question = record_question(record)
    answers: set[str] = set()
    for kind in kinds:
        for pair in _enumerate_outcomes(lambda rng, kind=kind: world.make_conversation(scene, kind, rng)):
            if pair[0] == question:
                answers.add(pair[1])
    return answers


def _answer_templates() -> list[str]:
    templates: list[str] = [*world.CAPTION_ANSWERS, *world.COUNT_OBJECT_ANSWERS]
    for pairs in (world.COLOUR_ANSWERS, world.POSITION_ANSWERS):
        templates += [template for pair in pairs for template in pair]
    for cases in (*world.COUNT_ANSWERS, *world.COMPARE_ANSWERS, *world.EXISTS_ANSWERS):
        templates += list(cases.values())
    return templates


def _template_regex(template: str) -> re.Pattern[str]:
    # Fields become runs of lowercase words and commas; "a" may have been turned into "an".
    pattern = ""
    for literal, field in re.findall(r"([^{]*)(\{\w+\})?", template):
        pattern += re.sub(r"\b([Aa])\\ ", r"\1n?\\ ", re.escape(literal))
        if field:
            pattern += r"[a-z]+(?:,? [a-z]+)*?"
    return re.compile(pattern)


_ANSWER_PATTERNS: list[re.Pattern[str]] = [_template_regex(t) for t in _answer_templates()]


def is_well_formed_answer(text: str) -> bool:
    """True if `text` uses only world words and has the shape of one of the world's answer templates.

    Why: a text-only LM should produce fluent world answers even though it cannot know their content.
    """
    try:
        words = world.split_words(text)
    except ValueError:
        return False
    vocabulary = set(world.world_vocabulary())
    if not words or any(word not in vocabulary for word in words):
        return False
    return any(pattern.fullmatch(text) for pattern in _ANSWER_PATTERNS)


def asked_colour(record: dict[str, Any]) -> str | None:
    """For a colour question, the true colour of the shape it asks about."""
    if record["task"] != "colour":
        return None
    scene = world.Scene.from_dict(record["scene"])
    plurals = {plural: shape for shape, plural in world.SHAPE_PLURALS.items()}
    for word in world.split_words(record_question(record)):
        shape = word if word in world.SHAPES else plurals.get(word)
        if shape is not None and scene.group(shape) is not None:
            return scene.group(shape).colour
    return None


def heldout_records(num_samples: int, seed: int, kinds: Iterable[str] | None = None, image_size: int = world.DEFAULT_IMAGE_SIZE
                    ) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The first `num_samples` heldout records of `seed` whose task is in `kinds` (all kinds if None).

    Why: heldout scenes come from a hash bucket the training splits never draw from.
    """
    wanted = set(kinds) if kinds is not None else set(world.TASK_KINDS)
    records: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for index in itertools.count():
        if len(records) == num_samples:
            break
        record, scene = world.make_record("heldout", seed, index)
        if record["task"] in wanted:
            records.append(record)
            images.append(world.render_scene(scene, image_size))
    return records, images


@torch.inference_mode()
def generate_target_answers(target: Qwen2_5_VLForConditionalGeneration, processor: ProcessorMixin,
                            records: Sequence[dict[str, Any]], images: Sequence[Image.Image],
                            max_new_tokens: int = 96, batch_size: int = 32) -> list[str]:
    """Greedy answers of the target VLM (batched, left-padded) to the records' questions about their images."""
    tokenizer = processor.tokenizer
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [chat_prompt(tokenizer, record_question(record), with_image=True) for record in chunk]
        inputs = processor(text=prompts, images=list(images[start:start + batch_size]), return_tensors="pt",
                           padding=True, padding_side="left", return_mm_token_type_ids=True)
        output = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    target.model.rope_deltas = None  # do not leave generate's cached deltas behind for other callers
    return [answer.strip() for answer in answers]


@torch.inference_mode()
def generate_text_answers(text_lm: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast,
                          records: Sequence[dict[str, Any]], max_new_tokens: int = 96, batch_size: int = 64) -> list[str]:
    """Greedy answers of the text-only LM, which sees the question but no image."""
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = [chat_prompt(tokenizer, record_question(r), with_image=False) for r in records[start:start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        output = text_lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


# The words that carry an answer's facts; everything else in a world answer is template glue.
CONTENT_WORDS: frozenset[str] = frozenset({
    *world.COLOURS, *world.SHAPES, *world.SHAPE_PLURALS.values(), *world.SIZES, *world.NUMBER_WORDS,
    *(word for phrase in world.CELL_PHRASES for word in phrase.split() if word not in {"at", "the", "on", "in"}),
    "yes", "no",
})


def content_words(text: str) -> tuple[str, ...]:
    """The fact-bearing words of `text` (`CONTENT_WORDS`), in order."""
    return tuple(word for word in re.findall(r"[a-z]+", text.lower()) if word in CONTENT_WORDS)


def score_answers(records: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per task kind (and "all"): exact match against any valid phrasing, against the one reference, and
    well-formedness; for colour questions also whether the right colour word was named.

    `exact` is the headline number: the answer is word for word one the world generates for this question
    and scene. `content`: the answer states the right facts in the right order (its sequence of colour,
    shape, size, number, place and yes/no words is that of a valid answer), whatever its glue words; it
    separates "cannot read the image" from "slipped on a template word" in answers of 20-40 tokens.
    `exact_reference` is capped below 1 because answer templates are drawn at random.
    """
    rows: dict[str, list[dict[str, float]]] = {}
    for record, answer in zip(records, answers):
        valid = valid_answers(record)
        row = {
            "exact": float(answer in valid),
            "content": float(content_words(answer) in {content_words(text) for text in valid}),
            "exact_reference": float(answer == record_answer(record)),
            "well_formed": float(is_well_formed_answer(answer)),
        }
        colour = asked_colour(record)
        if colour is not None:
            named = {word for word in re.findall(r"[a-z]+", answer.lower()) if word in world.COLOURS}
            row["colour_word"] = float(named == {colour})
        rows.setdefault(record["task"], []).append(row)
        rows.setdefault("all", []).append(row)
    summary: dict[str, dict[str, float]] = {}
    for kind, kind_rows in sorted(rows.items()):
        keys = dict.fromkeys(key for row in kind_rows for key in row)  # colour_word only where it applies
        summary[kind] = {"n": len(kind_rows)}
        for key in keys:
            summary[kind][key] = statistics.fmean(row[key] for row in kind_rows if key in row)
    return summary


# ----------------------------------------------------------------------------------------------------------
# Cost ratio: drafter vs target, one token with a KV cache.


@torch.inference_mode()
def measure_cost_ratio(target: Qwen2_5_VLForConditionalGeneration, text_lm: Qwen2ForCausalLM,
                       processor: ProcessorMixin, context_tokens: int = 100, decode_steps: int = 64,
                       image_size: int = world.DEFAULT_IMAGE_SIZE, seed: int = 0) -> dict[str, float]:
    """Median time of one cached single-token forward of each model at a ~`context_tokens` context.

    Why: speculative decoding's speedup is bounded by c = drafter step / target step. The target is driven
    through its family adapter (explicit 3-D positions), as the engine drives it; the two models' steps are
    interleaved so load from other processes hits both alike.
    """
    tokenizer = processor.tokenizer
    records, images = heldout_records(1, seed, kinds=("caption",), image_size=image_size)
    question, answer = record_question(records[0]), record_answer(records[0])
    long_answer = " ".join([answer] * 6)  # long enough to fill the context
    inputs = processor(text=[chat_prompt(tokenizer, question, with_image=True) + long_answer], images=images,
                       return_tensors="pt")
    input_ids = inputs["input_ids"][:, :context_tokens]
    text_ids = tokenizer([chat_prompt(tokenizer, question, with_image=False) + long_answer],
                         return_tensors="pt")["input_ids"][:, :context_tokens]
    adapter = get_adapter(target.config)
    image_inputs = {name: inputs[name] for name in adapter.image_input_names}
    prefill_kwargs, position_state = adapter.target_prefill_kwargs(input_ids, image_inputs, target)
    target_out = target(input_ids=input_ids, use_cache=True, **image_inputs, **prefill_kwargs)
    draft_out = text_lm(input_ids=text_ids, use_cache=True)
    target_cache, draft_cache = target_out.past_key_values, draft_out.past_key_values
    next_token = input_ids[:, -1:]
    target_times: list[float] = []
    draft_times: list[float] = []
    for step in range(decode_steps):
        started = time.perf_counter()
        decode_kwargs = adapter.target_decode_kwargs(
            position_state, torch.arange(input_ids.shape[1] + step, input_ids.shape[1] + step + 1, device=target.device))
        target_cache = target(input_ids=next_token, past_key_values=target_cache, use_cache=True,
                              **decode_kwargs).past_key_values
        target_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        draft_cache = text_lm(input_ids=next_token, past_key_values=draft_cache, use_cache=True).past_key_values
        draft_times.append(time.perf_counter() - started)
    target_ms = statistics.median(target_times[4:] or target_times) * 1000
    draft_ms = statistics.median(draft_times[4:] or draft_times) * 1000
    return {"target_ms": target_ms, "drafter_ms": draft_ms, "cost_ratio": draft_ms / target_ms,
            "target_context_tokens": int(input_ids.shape[1]), "drafter_context_tokens": int(text_ids.shape[1])}


# ----------------------------------------------------------------------------------------------------------
# Train, save, load.


def evaluate_world_models(models: WorldModels, num_samples: int | None = None, seed: int | None = None,
                          progress: bool = False) -> dict[str, Any]:
    """Held-out accuracy per task kind of the target and of the text-only LM, on the same questions."""
    recipe = models.recipe
    records, images = heldout_records(num_samples or recipe.eval_samples, recipe.eval_seed if seed is None else seed,
                                      image_size=recipe.image_size)
    logger.info("evaluating on %d heldout questions", len(records))
    target_answers = generate_target_answers(models.target, models.processor, records, images, recipe.max_new_tokens)
    text_answers = generate_text_answers(models.text_lm, models.tokenizer, records, recipe.max_new_tokens)
    examples = [{"task": r["task"], "question": record_question(r), "reference": record_answer(r),
                 "target": t, "text_lm": d} for r, t, d in list(zip(records, target_answers, text_answers))[:10]]
    return {"target": score_answers(records, target_answers), "text_lm": score_answers(records, text_answers),
            "examples": examples}


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

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
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
        publish_directory(staging, out_dir)
    except BaseException:
        discard_staging(staging)
        raise
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
        "Written by `massv.world_models.train_world_models` (reproduce with "
        "`python data_prep/train_world_models.py --out massv/assets/world`). Trained on the synthetic world of "
        "`massv/world.py`; evaluated on its `heldout` split, whose scenes no training split contains.",
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
