"""Tests for the synthetic world: determinism, disjoint splits, answers grounded in pixels, format, vocabulary.

The grounding tests never read the generator's scene: they recover objects from the rendered pixels
(connected components of each palette colour, a shape classifier on the blob) and check the text against that.
"""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from itertools import islice

import numpy as np
import pytest

from massv.pipelines import world
from massv.pipelines.world import (
    CELL_PHRASES,
    COLOURS,
    IMAGE_TOKEN,
    PUNCTUATION,
    SHAPE_PLURALS,
    SHAPES,
    WORLD_WORDS,
    generate_records,
    join_words,
    make_record,
    render_scene,
    scene_bucket,
    split_words,
    world_text_corpus,
    world_vocabulary,
    write_world,
)

NUMBER_VALUES = {"no": 0, "zero": 0, "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4,
                 "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}  # fmt: skip
SHAPE_OF_WORD = {**{shape: shape for shape in SHAPES}, **{plural: shape for shape, plural in SHAPE_PLURALS.items()}}
COLOUR_WORDS = "|".join(COLOURS)
SHAPE_WORDS = "|".join(sorted(SHAPE_OF_WORD, key=len, reverse=True))
# Longest first so "at the top left" is not read as "at the top".
CELL_RE = re.compile("|".join(sorted(map(re.escape, CELL_PHRASES), key=len, reverse=True)))


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (n, 2) array of (row, column)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            row, column = stack.pop()
            pixels.append((row, column))
            for r, c in ((row + 1, column), (row - 1, column), (row, column + 1), (row, column - 1)):
                if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                    seen[r, c] = True
                    stack.append((r, c))
        components.append(np.array(pixels))
    return components


def classify_shape(pixels: np.ndarray) -> str:
    """Tell the five shapes apart from a blob's fill ratio and row profile."""
    rows, columns = pixels[:, 0] - pixels[:, 0].min(), pixels[:, 1] - pixels[:, 1].min()
    blob = np.zeros((rows.max() + 1, columns.max() + 1), dtype=bool)
    blob[rows, columns] = True
    width = blob.shape[1]
    row_widths = blob.sum(axis=1)
    fill = blob.mean()
    if fill > 0.95:
        return "square"
    if 0.7 < fill < 0.9:
        return "circle"
    if row_widths[-1] >= 0.9 * width and row_widths[0] < 0.4 * width:
        return "triangle"
    if (row_widths >= width).mean() > 0.2:
        return "cross"
    return "diamond"


def perceive(image) -> dict[tuple[str, str], list[int]]:
    """What a perfect viewer sees: {(colour, shape): sorted grid cells} recovered from pixels only."""
    pixels = np.asarray(image)
    size = pixels.shape[0]
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    for colour, rgb in COLOURS.items():
        for blob in connected_components((pixels == rgb).all(axis=-1)):
            centre_row, centre_column = blob.mean(axis=0)
            cell = int(centre_row * 3 // size) * 3 + int(centre_column * 3 // size)
            seen[(colour, classify_shape(blob))].append(cell)
    return {key: sorted(cells) for key, cells in seen.items()}


def count_of(seen: dict[tuple[str, str], list[int]], shape: str) -> int:
    return sum(len(cells) for (_, seen_shape), cells in seen.items() if seen_shape == shape)


def question_answer(record: dict) -> tuple[str, str]:
    return record["conversations"][0]["value"].removeprefix(IMAGE_TOKEN + "\n"), record["conversations"][1]["value"]


@pytest.fixture(scope="module")
def train_samples() -> list[tuple[dict, object]]:
    return list(generate_records("train", 250, seed=0))


# ---------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_records_and_pixels():
    first = list(generate_records("train", 12, seed=7))
    second = list(generate_records("train", 12, seed=7))
    assert [record for record, _ in first] == [record for record, _ in second]
    assert [png_bytes(image) for _, image in first] == [png_bytes(image) for _, image in second]


def test_different_seed_or_split_gives_different_data():
    base = [record["conversations"] for record, _ in generate_records("train", 12, seed=7)]
    other_seed = [record["conversations"] for record, _ in generate_records("train", 12, seed=8)]
    other_split = [record["conversations"] for record, _ in generate_records("pretrain", 12, seed=7)]
    assert sum(a != b for a, b in zip(base, other_seed)) >= 10
    assert sum(a[1] != b[1] for a, b in zip(base, other_split)) >= 10


def test_splits_have_disjoint_scenes():
    def signatures(split: str) -> set[str]:
        return {make_record(split, 0, index)[1].signature() for index in range(400)}

    heldout = signatures("heldout")
    assert len(heldout) > 300  # the scene space is large enough that heldout is not a handful of scenes
    assert not heldout & signatures("train")
    assert not heldout & signatures("pretrain")
    assert all(scene_bucket(make_record("heldout", 3, index)[1]) == 0 for index in range(20))


def test_scene_round_trips_through_record(train_samples):
    for record, image in train_samples[:20]:
        scene = world.Scene.from_dict(json.loads(json.dumps(record["scene"])))
        assert png_bytes(render_scene(scene)) == png_bytes(image)


def test_llava_format(train_samples):
    ids = set()
    for record, image in train_samples:
        assert set(record) >= {"id", "image", "conversations"}
        assert record["image"].startswith("images/") and record["image"].endswith(".png")
        assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt"]
        human, gpt = (turn["value"] for turn in record["conversations"])
        assert human.startswith(IMAGE_TOKEN + "\n") and human.count(IMAGE_TOKEN) == 1
        assert IMAGE_TOKEN not in gpt
        assert image.size == (world.DEFAULT_IMAGE_SIZE,) * 2 and image.mode == "RGB"
        ids.add(record["id"])
    assert len(ids) == len(train_samples)
    pretrain = [record for record, _ in generate_records("pretrain", 30, seed=0)]
    assert {record["task"] for record in pretrain} == {"caption"}
    assert all(question_answer(record)[0] in world.PRETRAIN_INSTRUCTIONS for record in pretrain)


def test_image_size_is_configurable():
    record, image = next(generate_records("heldout", 1, seed=0, image_size=96))
    assert image.size == (96, 96)
    scene = world.Scene.from_dict(record["scene"])
    assert perceive(image) == {(g.colour, g.shape): list(g.cells) for g in scene.groups()}


def test_pixels_show_the_scene(train_samples):
    for record, image in train_samples:
        scene = world.Scene.from_dict(record["scene"])
        assert perceive(image) == {(g.colour, g.shape): list(g.cells) for g in scene.groups()}


def test_captions_mention_exactly_what_is_drawn(train_samples):
    pattern = re.compile(rf"\b(a|an|one|two|three|four) (small|large) ({COLOUR_WORDS}) ({SHAPE_WORDS})\b")
    captions = [(question_answer(r)[1], image) for r, image in train_samples if r["task"] == "caption"]
    assert len(captions) > 50
    for caption, image in captions:
        mentioned = {(colour, SHAPE_OF_WORD[shape]): NUMBER_VALUES[amount]
                     for amount, _, colour, shape in pattern.findall(caption)}  # fmt: skip
        seen = perceive(image)
        assert mentioned == {key: len(cells) for key, cells in seen.items()}, caption
        mentioned_cells = sorted(CELL_PHRASES.index(phrase) for phrase in CELL_RE.findall(caption))
        assert mentioned_cells == sorted(cell for cells in seen.values() for cell in cells), caption


def test_answers_depend_on_the_image(train_samples):
    checked = defaultdict(int)
    for record, image in train_samples:
        question, answer = question_answer(record)
        seen = perceive(image)
        task = record["task"]
        question_shapes = [SHAPE_OF_WORD[word] for word in re.findall(SHAPE_WORDS, question)]
        question_colours = re.findall(COLOUR_WORDS, question)
        if task == "colour":
            (shape,) = question_shapes
            assert set(re.findall(COLOUR_WORDS, answer)) == {c for c, s in seen if s == shape}, (question, answer)
        elif task == "count" and "objects" in question:
            total = next(NUMBER_VALUES[w] for w in split_words(answer) if w in NUMBER_VALUES and w != "a")
            assert total == sum(len(cells) for cells in seen.values()), (question, answer)
        elif task == "count":
            (shape,) = question_shapes
            stated = next(NUMBER_VALUES[w] for w in split_words(answer) if w in NUMBER_VALUES and w != "a")
            assert stated == count_of(seen, shape), (question, answer)
        elif task == "position":
            (shape,), (colour,) = question_shapes, question_colours
            stated_cells = sorted(CELL_PHRASES.index(phrase) for phrase in CELL_RE.findall(answer))
            assert stated_cells == seen[(colour, shape)], (question, answer)
        elif task == "reasoning" and " than " in question:
            shape_a, shape_b = question_shapes
            expected = "Yes" if count_of(seen, shape_a) > count_of(seen, shape_b) else "No"
            assert answer.startswith(expected), (question, answer)
            stated = re.findall(rf"\b(no|one|two|three|four) ({SHAPE_WORDS})\b", answer)
            assert {SHAPE_OF_WORD[shape]: NUMBER_VALUES[amount] for amount, shape in stated} == {
                shape_a: count_of(seen, shape_a), shape_b: count_of(seen, shape_b)
            }, (question, answer)
        elif task == "reasoning":
            (shape,), (colour,) = question_shapes, question_colours
            expected = "Yes" if (colour, shape) in seen else "No"
            assert answer.startswith(expected), (question, answer)
            actual_colours = {c for c, s in seen if s == shape}
            answer_colours = set(re.findall(COLOUR_WORDS, answer))
            if expected == "Yes" or actual_colours:  # "No" names the colour the shape really has
                assert answer_colours == {colour} | actual_colours, (question, answer)
            else:  # the shape is absent; any other colours named are those of objects that are there
                assert answer_colours <= {colour} | {c for c, _ in seen}, (question, answer)
        checked[task] += 1
    assert set(checked) == set(world.TASK_KINDS) and min(checked.values()) >= 15, checked


def test_question_alone_does_not_determine_the_answer():
    answers_by_question = defaultdict(set)
    for index in range(600):
        record, _ = make_record("train", 1, index)
        if record["task"] == "colour":
            question, answer = question_answer(record)
            answers_by_question[question].update(re.findall(COLOUR_WORDS, answer))
    assert max(len(colours) for colours in answers_by_question.values()) >= 4


def test_all_text_is_in_the_vocabulary(train_samples):
    vocabulary = set(world_vocabulary())
    assert 80 <= len(WORLD_WORDS) <= 300
    assert all(word == word.lower() and word.isalpha() for word in WORLD_WORDS)
    assert vocabulary == set(WORLD_WORDS) | set(PUNCTUATION)
    records = [record for record, _ in train_samples]
    records += [make_record(split, 5, index)[0] for split in ("pretrain", "heldout") for index in range(200)]
    for record in records:
        for text in question_answer(record):
            words = split_words(text)
            assert set(words) <= vocabulary, set(words) - vocabulary
            assert join_words(words) == text
    with pytest.raises(ValueError):
        split_words("What colour is the hexagon's edge?")


def test_paraphrase_variety():
    masked_questions, masked_answers = defaultdict(set), defaultdict(set)
    content = re.compile(rf"\b({COLOUR_WORDS}|{SHAPE_WORDS}|small|large|an?|one|two|three|four|five|six|seven|eight)\b")
    for index in range(800):
        record, _ = make_record("train", 2, index)
        question, answer = question_answer(record)
        masked_questions[record["task"]].add(content.sub("_", question))
        masked_answers[record["task"]].add(CELL_RE.sub("_", content.sub("_", answer)).split(".")[0])
    for kind in world.TASK_KINDS:
        assert len(masked_questions[kind]) >= 4, (kind, masked_questions[kind])
        assert len(masked_answers[kind]) >= 3, (kind, masked_answers[kind])


def test_answers_are_long_enough_to_draft():
    lengths = defaultdict(list)
    for index in range(300):
        record, _ = make_record("train", 0, index)
        lengths[record["task"]].append(len(split_words(question_answer(record)[1])))
    assert all(min(values) >= 8 for values in lengths.values()), lengths
    assert np.mean(lengths["caption"]) >= 20


def test_text_corpus_is_deterministic_text_only():
    corpus = world_text_corpus(num_samples=50, seed=0)
    assert corpus == world_text_corpus(num_samples=50, seed=0)
    assert IMAGE_TOKEN not in corpus
    lines = corpus.splitlines()
    assert len(lines) == 2 * 2 * 50  # question and answer lines for pretrain and train
    assert set(split_words(" ".join(lines))) <= set(world_vocabulary())


def test_write_world_writes_files_and_is_idempotent(tmp_path, monkeypatch):
    jsonl_path = write_world(tmp_path, "heldout", num_samples=6, seed=4)
    assert jsonl_path == tmp_path / "heldout.jsonl"
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    expected = list(generate_records("heldout", 6, seed=4))
    assert records == [record for record, _ in expected]
    for record, image in expected:
        assert (tmp_path / record["image"]).read_bytes() == png_bytes(image)

    def must_not_regenerate(*args, **kwargs):
        raise AssertionError("write_world regenerated a complete split")

    monkeypatch.setattr(world, "generate_records", must_not_regenerate)
    assert write_world(tmp_path, "heldout", num_samples=6, seed=4) == jsonl_path
    monkeypatch.undo()

    (tmp_path / records[0]["image"]).unlink()  # an incomplete split is rebuilt
    write_world(tmp_path, "heldout", num_samples=6, seed=4)
    assert (tmp_path / records[0]["image"]).exists()
    write_world(tmp_path, "heldout", num_samples=6, seed=4, image_size=48)  # new arguments rebuild too
    from PIL import Image

    assert Image.open(tmp_path / records[0]["image"]).size == (48, 48)


def test_rejects_unknown_split_and_tiny_images():
    with pytest.raises(ValueError):
        list(islice(generate_records("validation", 1, seed=0), 1))
    with pytest.raises(ValueError):
        list(generate_records("train", 1, seed=0, image_size=16))
