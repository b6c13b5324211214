"""The demo's claim, checked in CI at a fraction of the demo's cost: a MASSV drafter (the shipped text LM given the
target's vision encoder and a fresh projector) self-distilled for a few hundred steps drafts better than the
text-only LM it started from, measured by greedy MAL on held-out world prompts.

Fixed seed, one thread: the run is deterministic. How stable the claim is was measured with the same settings
on other seeds (training data, initialisation and held-out prompts all change): MAL ratio MASSV / text-only
1.17 (seed 0), 1.08 (seed 1), 1.09 (seed 2); the assertion asks for 1.05.
"""

from __future__ import annotations

import copy

import torch

from massv import MultimodalDrafter, SpeculativeGenerator
from massv.pipelines import world
from massv.compress import Sample, build_batches, prepare_batches, recover
from massv.compress.calibration import PreparedBatch
from massv.speculative import GenerationStats
from massv.pipelines.world_models import generate_target_answers, heldout_records, load_world_models, record_question

SEED = 0
TRAIN_PROMPTS = 384  # the target answers these (self-distillation), about 15 s
STEPS, BATCH_SIZE, LEARNING_RATE = 400, 16, 3e-3  # phase 2 (projector + LM), about 30 s
HELDOUT_PROMPTS, MAX_NEW_TOKENS, NUM_DRAFT_TOKENS = 24, 32, 5
MIN_MAL_RATIO = 1.05


def _right_padded(rows: list[PreparedBatch]) -> PreparedBatch:
    """Batch-1 prepared batches (prompt + answer, labels on the answer) as one right-padded batch."""
    length = max(row.input_ids.shape[1] for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for index, row in enumerate(rows):
        n = row.input_ids.shape[1]
        input_ids[index, :n], attention_mask[index, :n], labels[index, :n] = row.input_ids[0], 1, row.labels[0]
    return PreparedBatch(input_ids, attention_mask, torch.cat([row.image_features for row in rows]), labels)


def _greedy_mal(models, drafter, records, images) -> float:
    generator = SpeculativeGenerator(models.target, drafter, models.processor)
    runs = [generator.generate(images=[image], prompt=record_question(record), max_new_tokens=MAX_NEW_TOKENS,
                               num_draft_tokens=NUM_DRAFT_TOKENS, temperature=0.0).stats
            for record, image in zip(records, images)]
    return GenerationStats.merge(runs).mean_accepted_length


def test_self_distilled_massv_drafter_beats_the_text_only_drafter() -> None:
    models = load_world_models(progress=False)
    image_size = models.recipe.image_size
    records, images = [], []
    for index in range(TRAIN_PROMPTS):
        record, scene = world.make_record("train", SEED, index)
        records.append(record)
        images.append(world.render_scene(scene, image_size))
    answers = generate_target_answers(models.target, models.processor, records, images, max_new_tokens=48)

    torch.manual_seed(SEED)
    drafter = MultimodalDrafter.from_target(models.target, copy.deepcopy(models.text_lm), len(models.tokenizer))
    samples = [Sample(record_question(record), image, answer) for record, image, answer in zip(records, images, answers)]
    rows = prepare_batches(drafter, build_batches(models.processor, drafter.adapter, samples))
    batches = [_right_padded(rows[start:start + BATCH_SIZE]) for start in range(0, len(rows), BATCH_SIZE)]
    losses = recover(drafter, batches, STEPS, learning_rate=LEARNING_RATE, warmup_steps=STEPS // 20, log_every=0)
    assert losses[-1] < losses[0]

    heldout, heldout_images = heldout_records(HELDOUT_PROMPTS, 1000 + SEED, image_size=image_size)
    massv = _greedy_mal(models, drafter, heldout, heldout_images)
    text_only = _greedy_mal(models, models.text_lm, heldout, heldout_images)
    assert massv >= MIN_MAL_RATIO * text_only, (massv, text_only)
