"""Tests for the world models: shipped weights load offline, the target really reads the image, the text-only
LM speaks the world's language without seeing it, recipes hash and cache, and a minuscule run trains end to end.

Held-out questions come from the `heldout` split with seeds neither training nor the shipped evaluation used;
heldout scenes lie in a hash bucket that no training split draws from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoProcessor, AutoTokenizer

from massv.pipelines import world
from massv.pipelines.world_models import (
    ASSETS_DIR,
    PARSE_FIELDS,
    WorldModels,
    WorldRecipe,
    asked_colour,
    generate_target_answers,
    generate_text_answers,
    heldout_records,
    is_well_formed_answer,
    load_world_models,
    record_answer,
    record_question,
    scene_cell_labels,
    score_answers,
    stored_recipe_hash,
    valid_answers,
)

# The shipped models are 5.5M parameters: two threads pay off (every test of this module runs on two).
pytestmark = pytest.mark.torch_threads(2)

UNSEEN_SEED = 777_777  # never used for training or for the shipped evaluation (eval_seed 1000)

TINY_RECIPE = WorldRecipe(
    vocab_size=320, tokenizer_samples=200, target_hidden_size=32, target_layers=1, target_heads=2,
    target_intermediate_size=64, vision_hidden_size=16, vision_depth=1, vision_steps=3, vision_batch_size=4,
    vision_warmup_steps=1, target_steps=3, target_batch_size=4,
    target_warmup_steps=1, text_hidden_size=32, text_layers=1, text_heads=2, text_intermediate_size=64,
    text_steps=3, text_batch_size=4, text_warmup_steps=1, eval_samples=6, max_new_tokens=8, cost_decode_steps=8,
)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> WorldModels:
    if stored_recipe_hash(ASSETS_DIR) != WorldRecipe().hash():
        pytest.fail(f"shipped world models in {ASSETS_DIR} are missing or do not match WorldRecipe(); "
                    "run data_prep/train_world_models.py --out massv/assets/world")
    # An empty cache: if the shipped copy were not used, loading would start training and the test would hang.
    return load_world_models(cache_dir=tmp_path_factory.mktemp("empty_cache"), progress=False)


@pytest.fixture(scope="module")
def colour_count_questions() -> tuple[list[dict], list]:
    return heldout_records(20, UNSEEN_SEED, kinds=("colour", "count"))


# ---- recipe --------------------------------------------------------------------------------------------


def test_recipe_hash_is_stable_and_changes_with_every_field() -> None:
    recipe = WorldRecipe()
    assert recipe.hash() == WorldRecipe().hash() == WorldRecipe.from_dict(recipe.to_dict()).hash()
    hashes = {recipe.hash()}
    for field in dataclasses.fields(WorldRecipe):
        value = getattr(recipe, field.name)
        if field.name in ("image_size", "patch_size"):  # tied: one merged image token per grid cell
            hashes.add(dataclasses.replace(recipe, patch_size=8 if field.name == "patch_size" else 12,
                                           image_size=48 if field.name == "patch_size" else 72).hash())
            continue
        if isinstance(value, bool):
            changed = not value
        elif isinstance(value, str):
            changed = value + "x"
        else:
            changed = value * 1.5 if isinstance(value, float) else value + 1
        hashes.add(dataclasses.replace(recipe, **{field.name: changed}).hash())
    assert len(hashes) == len(dataclasses.fields(WorldRecipe)) + 1


def test_recipe_rejects_unknown_fields_and_image_tokens_that_straddle_cells() -> None:
    with pytest.raises(ValueError, match="unknown WorldRecipe fields"):
        WorldRecipe.from_dict({"target_layerz": 3})
    with pytest.raises(ValueError, match="grid cell"):
        WorldRecipe(image_size=64, patch_size=8)  # 4x4 merged tokens on a 3x3 grid


# ---- vision pretraining labels --------------------------------------------------------------------------


def test_scene_cell_labels_name_each_cells_content_and_its_place() -> None:
    scene = world.Scene((world.SceneObject("square", "red", "small", 4), world.SceneObject("circle", "blue", "large", 0)))
    labels = scene_cell_labels(scene)
    fields = list(PARSE_FIELDS)
    assert labels.shape == (len(world.CELL_NAMES), len(fields))
    # Every token says which cell it covers, filled or not: values carry no rotary position, so "where" must
    # be part of the token's content for the LM to say it.
    assert labels[:, fields.index("cell")].tolist() == list(range(9))
    center, top_left, empty = labels[4], labels[0], labels[8]
    assert PARSE_FIELDS["shape"][center[fields.index("shape")]] == "square"
    assert PARSE_FIELDS["colour"][center[fields.index("colour")]] == "red"
    assert PARSE_FIELDS["size"][top_left[fields.index("size")]] == "large"
    assert [PARSE_FIELDS[name][empty[column]] for column, name in enumerate(fields) if name != "cell"] == ["none"] * 3


# ---- scoring -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_valid_answers_contain_the_reference_and_it_is_well_formed(split: str) -> None:
    for index in range(60):
        record, _ = world.make_record(split, 3, index)
        answers = valid_answers(record)
        assert record_answer(record) in answers, (record["task"], record_question(record))
        assert all(is_well_formed_answer(answer) for answer in answers)


def test_valid_answers_reject_wrong_content() -> None:
    record = next(r for r, _ in (world.make_record("heldout", 5, i) for i in range(100)) if r["task"] == "colour")
    scene = world.Scene.from_dict(record["scene"])
    wrong = next(colour for colour in world.COLOURS if colour not in {group.colour for group in scene.groups()})
    altered = record_answer(record).replace(asked_colour(record), wrong)
    assert altered != record_answer(record)
    assert is_well_formed_answer(altered)  # the right form ...
    assert altered not in valid_answers(record)  # ... with the wrong content
    assert not is_well_formed_answer("The square red is.")
    assert not is_well_formed_answer("The unicorn is blue.")


def test_content_score_forgives_glue_words_but_not_wrong_facts() -> None:
    record = next(r for r, _ in (world.make_record("heldout", 6, i) for i in range(100)) if r["task"] == "colour")
    reference = record_answer(record)
    scene = world.Scene.from_dict(record["scene"])
    wrong = next(colour for colour in world.COLOURS if colour not in {group.colour for group in scene.groups()})
    reworded = reference.replace(" is ", " looks ", 1).replace(" are ", " look ", 1)
    assert reworded != reference
    swapped = reference.replace(asked_colour(record), wrong)
    scores = [score_answers([record], [answer])["all"] for answer in (reference, reworded, swapped)]
    assert [(row["exact"], row["content"]) for row in scores] == [(1.0, 1.0), (0.0, 1.0), (0.0, 0.0)]


# ---- shipped models ------------------------------------------------------------------------------------


OFFLINE_LOAD = textwrap.dedent("""
    import json, sys
    from huggingface_hub import constants
    assert constants.HF_HUB_OFFLINE, "HF_HUB_OFFLINE must be read when huggingface_hub is imported"
    from transformers import AutoProcessor
    from massv.pipelines.world_models import ASSETS_DIR, load_world_models
    models = load_world_models(cache_dir=sys.argv[1], progress=False)
    processor = AutoProcessor.from_pretrained(ASSETS_DIR / "processor")
    print(json.dumps({"path": str(models.path), "target": models.target.config.model_type,
                      "text_lm": models.text_lm.config.model_type, "heldout_metrics": "heldout" in models.metrics,
                      "same_vocab": processor.tokenizer.get_vocab() == models.tokenizer.get_vocab()}))
""")


def test_shipped_models_load_offline_from_the_assets(tmp_path) -> None:
    """In a fresh interpreter whose environment says offline (read when the hub library is imported), with an
    empty HF cache and an empty world-model cache: the shipped copy loads, nothing is fetched or trained."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                   "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", OFFLINE_LOAD, str(tmp_path / "empty_cache")], env=environment,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"path": str(ASSETS_DIR), "target": "qwen2_5_vl", "text_lm": "qwen2", "heldout_metrics": True,
                      "same_vocab": True}
    assert not (tmp_path / "empty_cache").exists()  # nothing was trained into the cache


def test_shipped_processor_reads_images_and_round_trips_world_text(shipped: WorldModels) -> None:
    processor = AutoProcessor.from_pretrained(ASSETS_DIR / "processor")
    records, images = heldout_records(2, UNSEEN_SEED, image_size=shipped.recipe.image_size)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record_question(records[0])}]}],
        add_generation_prompt=True, tokenize=False,
    )
    inputs = processor(text=[prompt], images=images[:1], return_tensors="pt")
    assert int((inputs["input_ids"] == shipped.target.config.image_token_id).sum()) == 9  # one per grid cell
    # The tokenizer round-trips world text exactly.
    for line in world.world_text_corpus(20, UNSEEN_SEED, splits=("heldout",)).splitlines():
        assert processor.tokenizer.decode(processor.tokenizer.encode(line, add_special_tokens=False)) == line


class _TargetTextLM(nn.Module):
    """The target's language model seen as a causal LM (`.model.layers`, `.config`, an output embedding)."""

    def __init__(self, target) -> None:
        super().__init__()
        self.model, self.config, self.lm_head = target.model.language_model, target.config.text_config, target.lm_head

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_shipped_drafter_lm_is_much_cheaper_than_the_target(shipped: WorldModels) -> None:
    """Counted, not timed: multiply-accumulates of one decode step at a 100-token context."""
    from massv.compress import language_model_macs

    recipe = shipped.recipe
    assert recipe.text_layers < recipe.target_layers
    target_macs = language_model_macs(_TargetTextLM(shipped.target), 100).per_token
    drafter_macs = language_model_macs(shipped.text_lm, 100).per_token
    assert drafter_macs <= 0.2 * target_macs, (drafter_macs, target_macs)
    readme = (ASSETS_DIR / "README.md").read_text()
    assert recipe.hash() in readme and "cost" in readme.lower()
    assert json.loads((ASSETS_DIR / "recipe.json").read_text())["recipe"] == recipe.to_dict()


TARGET_NOT_YET_ACCURATE = pytest.mark.xfail(strict=True, reason="the shipped target reaches 12% exact-match held-out accuracy (colour word right 72%); a recipe whose answers are mostly right is still open work (issue 5)")


@TARGET_NOT_YET_ACCURATE
def test_shipped_target_answers_heldout_questions_of_every_kind(shipped: WorldModels) -> None:
    records, images = heldout_records(12, UNSEEN_SEED + 2, image_size=shipped.recipe.image_size)
    assert {record["task"] for record in records} == set(world.TASK_KINDS)
    answers = generate_target_answers(shipped.target, shipped.processor, records, images)
    assert score_answers(records, answers)["all"]["exact"] > 0.7, list(zip(map(record_answer, records), answers))


@TARGET_NOT_YET_ACCURATE
def test_shipped_target_answers_heldout_colour_and_count_questions(shipped: WorldModels,
                                                                   colour_count_questions: tuple) -> None:
    records, images = colour_count_questions
    answers = generate_target_answers(shipped.target, shipped.processor, records, images)
    scores = score_answers(records, answers)
    assert scores["all"]["exact"] >= 0.7, list(zip(map(record_answer, records), answers))


def test_text_lm_speaks_the_world_language_but_cannot_see(shipped: WorldModels) -> None:
    records, images = heldout_records(24, UNSEEN_SEED + 1, kinds=("colour",))
    text_scores = score_answers(records, generate_text_answers(shipped.text_lm, shipped.tokenizer, records))
    target_scores = score_answers(records, generate_target_answers(shipped.target, shipped.processor, records, images))
    assert text_scores["colour"]["well_formed"] >= 0.8
    # Six colours: a blind model guesses; the target reads the pixels.
    assert text_scores["colour"]["colour_word"] <= 0.5
    assert text_scores["colour"]["colour_word"] <= target_scores["colour"]["colour_word"]


def test_target_reads_colours_far_better_than_the_blind_text_lm(shipped: WorldModels) -> None:
    records, images = heldout_records(24, UNSEEN_SEED + 1, kinds=("colour",))
    text_scores = score_answers(records, generate_text_answers(shipped.text_lm, shipped.tokenizer, records))
    target_scores = score_answers(records, generate_target_answers(shipped.target, shipped.processor, records, images))
    assert text_scores["colour"]["colour_word"] <= target_scores["colour"]["colour_word"] - 0.4


# ---- training ------------------------------------------------------------------------------------------


def test_minuscule_recipe_trains_saves_and_reloads_from_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = load_world_models(cache_dir=tmp_path, recipe=TINY_RECIPE, progress=False)
    expected_dir = tmp_path / TINY_RECIPE.hash()
    assert models.path == expected_dir and stored_recipe_hash(expected_dir) == TINY_RECIPE.hash()
    assert {p.name for p in expected_dir.iterdir()} >= {"target", "text_lm", "processor", "recipe.json", "metrics.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directories left behind
    assert models.target.config.text_config.num_hidden_layers == 1
    # Model directories are self-contained: the target's holds its processor, the text LM's its tokenizer.
    assert AutoProcessor.from_pretrained(expected_dir / "target").tokenizer.vocab == models.tokenizer.vocab
    assert AutoTokenizer.from_pretrained(expected_dir / "text_lm").vocab == models.tokenizer.vocab
    assert models.metrics["heldout"]["target"]["all"]["n"] == TINY_RECIPE.eval_samples

    import massv.pipelines.world_models.store as world_models  # where load_world_models looks it up

    def no_training(*args, **kwargs):
        raise AssertionError("a cached recipe must not be retrained")

    monkeypatch.setattr(world_models, "train_world_models", no_training)
    again = load_world_models(cache_dir=tmp_path, recipe=TINY_RECIPE, progress=False)
    assert again.path == expected_dir
    state, reloaded = models.target.state_dict(), again.target.state_dict()
    assert all(torch.equal(state[key], reloaded[key]) for key in state)
