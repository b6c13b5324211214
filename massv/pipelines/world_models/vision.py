"""Vision pretraining: the target's ViT learns to name every grid cell's content and which cell it is."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.utils import ModelOutput

from massv.pipelines import world
from massv.pipelines.world_models.grading import heldout_records
from massv.pipelines.world_models.loop import train_loop
from massv.pipelines.world_models.recipe import NUM_CELLS, WorldRecipe

logger = logging.getLogger(__name__)

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

    losses = train_loop(parser, make_batch, recipe.vision_steps, recipe.vision_lr, recipe.vision_warmup_steps,
                         recipe, "vision", progress, probe, probe_every)
    accuracy = scene_parsing_accuracy(parser, processor, heldout_scenes, recipe.image_size)
    logger.info("vision pretraining: heldout cell accuracy %.4f", accuracy)
    return losses, accuracy
