"""A procedurally generated visual world in which the image decides the answer.

The project cannot download pretrained vision-language models, so the end-to-end demo trains a tiny target
VLM from scratch. For speculative decoding to mean anything, the target must need the image: a text-only
drafter should be able to learn the phrasing of the answers but not their content. This module generates
such data deterministically:

* a `Scene` is a handful of solid shapes (5 shapes, 6 colours, 2 sizes) on a 3x3 grid;
* `render_scene` draws it with PIL, without anti-aliasing, on a plain light background (96x96 by default);
* questions and answers come from several paraphrased templates per task kind (caption, colour, count,
  position, reasoning), so the wording is predictable while colours, counts and positions are not;
* records are in LLaVA conversation format and every word belongs to a small closed vocabulary
  (`WORLD_WORDS`), so a word-level tokenizer covers it exactly.

Splits are disjoint by construction: a scene's composition is hashed into buckets and `heldout` only draws
scenes from its own bucket, which `train` and `pretrain` never use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# Bump when anything that changes generated records or pixels changes; write_world then regenerates.
WORLD_VERSION = 1

IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_SIZE = 96  # the world models see 96x96 images: each 32x32 cell is one merged image token

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
# Saturated, far-apart colours: exact RGB values (no anti-aliasing) let tests count objects by colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 155, 50),
    "blue": (30, 70, 215),
    "yellow": (235, 200, 0),
    "purple": (135, 40, 170),
    "orange": (245, 125, 0),
}
BACKGROUND_RGB: tuple[int, int, int] = (245, 245, 240)
# Object side as a fraction of the grid cell side; small objects still span >= 12 px at 64x64.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.55, "large": 0.85}
SIZES: tuple[str, ...] = tuple(SIZE_FRACTIONS)

# Grid cells in reading order: cell index = row * 3 + column.
CELL_NAMES: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
CELL_PHRASES: tuple[str, ...] = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)  # fmt: skip
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TASK_KINDS: tuple[str, ...] = ("caption", "colour", "count", "position", "reasoning")
# Captions dominate because they are the longest answers, which is where speculative decoding pays off.
TASK_WEIGHTS: tuple[float, ...] = (0.35, 0.15, 0.2, 0.15, 0.15)
SPLITS: tuple[str, ...] = ("pretrain", "train", "heldout")
PUNCTUATION: tuple[str, ...] = (".", ",", "?")

# Heldout scenes are those whose composition hash falls in bucket 0 of 10; the other splits avoid it.
_NUM_SCENE_BUCKETS = 10
_HELDOUT_BUCKET = 0

# ----------------------------------------------------------------------------------------------------------
# Templates. Fields: {shape} {shapes} {colour} {other_colour} {size} {n} {loc} {locs} {locs_each} {groups}
# {object_list} {total} {be} {shapes_a} {shapes_b} {count_a} {count_b}. "a" before a vowel becomes "an".

CAPTION_QUESTIONS: tuple[str, ...] = (
    "Describe the image.",
    "What do you see in this picture?",
    "Describe what is shown in the image.",
    "Give a short description of the image.",
    "What is in this image?",
    "Can you describe the picture?",
)
# LLaVA-Pretrain style: short instructions whose answer is the caption.
PRETRAIN_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Write a caption for the picture.",
    "Summarize the image.",
    "What does the image show?",
)
CAPTION_ANSWERS: tuple[str, ...] = (
    "There {be} {groups}.",
    "There {be} {groups}. That makes {total} objects in total.",
    "The image shows {groups} on a light background.",
    "In this picture you can see {groups}.",
    "This image contains {total} objects. They are {groups}.",
    "On a plain light background there {be} {groups}.",
)

# (singular, plural) pairs: the plural form is used when the asked shape appears more than once.
COLOUR_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What colour is the {shape}?", "What colour are the {shapes}?"),
    ("Which colour does the {shape} have?", "Which colour do the {shapes} have?"),
    ("What is the colour of the {shape}?", "What is the colour of the {shapes}?"),
    ("Tell me the colour of the {shape}.", "Tell me the colour of the {shapes}."),
)
COLOUR_ANSWERS: tuple[tuple[str, str], ...] = (
    (
        "The {shape} is {colour}. It is a {size} {colour} {shape} {loc}.",
        "The {shapes} are {colour}. There are {n} {size} {colour} {shapes}, {locs}.",
    ),
    (
        "It is {colour}. The {size} {shape} {loc} has a {colour} colour.",
        "They are {colour}. The {n} {size} {shapes} {locs} all have a {colour} colour.",
    ),
    (
        "The colour of the {size} {shape} {loc} is {colour}.",
        "The colour of the {shapes} is {colour}. You can see {n} of them, {locs_each}.",
    ),
)

COUNT_QUESTIONS: tuple[str, ...] = (
    "How many {shapes} are there?",
    "How many {shapes} can you see?",
    "Count the {shapes} in the image.",
    "What is the number of {shapes} in the picture?",
)
COUNT_OBJECT_QUESTIONS: tuple[str, ...] = (
    "How many objects are there?",
    "How many objects can you see in the image?",
    "Count the objects in the picture.",
)
# Keyed by case: how many of the asked shape the scene holds.
COUNT_ANSWERS: tuple[dict[str, str], ...] = (
    {
        "one": "There is one {shape} in the image. It is a {size} {colour} {shape} {loc}.",
        "many": "There are {n} {shapes} in the image. They are {size} {colour} {shapes}, {locs}.",
        "zero": "There are no {shapes} in the image. It only shows {object_list}.",
    },
    {
        "one": "You can see one {shape}, a {size} {colour} one {loc}.",
        "many": "You can see {n} {shapes}. They are {size} and {colour} and they are {locs}.",
        "zero": "No {shapes} can be seen. The picture only contains {object_list}.",
    },
    {
        "one": "The number of {shapes} is one. The {shape} is {size} and {colour} and sits {loc}.",
        "many": "The number of {shapes} is {n}. The {shapes} are {size} and {colour} and sit {locs}.",
        "zero": "The number of {shapes} is zero. The picture only contains {object_list}.",
    },
)
COUNT_OBJECT_ANSWERS: tuple[str, ...] = (
    "There are {total} objects in the image, {object_list}.",
    "The image contains {total} objects. They are {object_list}.",
    "You can count {total} objects in total, {object_list}.",
)

POSITION_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("Where is the {colour} {shape}?", "Where are the {colour} {shapes}?"),
    ("Where is the {colour} {shape} located?", "Where are the {colour} {shapes} located?"),
    ("In which part of the image is the {colour} {shape}?", "In which part of the image are the {colour} {shapes}?"),
    ("Tell me where the {colour} {shape} is.", "Tell me where the {colour} {shapes} are."),
)
POSITION_ANSWERS: tuple[tuple[str, str], ...] = (
    (
        "The {colour} {shape} is {loc} of the image, and it is {size}.",
        "The {colour} {shapes} are {locs} of the image, and they are {size}.",
    ),
    (
        "You can find the {size} {colour} {shape} {loc}.",
        "You can find {n} {size} {colour} {shapes}, {locs_each}.",
    ),
    (
        "It is {loc}. The {colour} {shape} there is {size}.",
        "They are {locs}. There are {n} {colour} {shapes} and they are {size}.",
    ),
)

COMPARE_QUESTIONS: tuple[str, ...] = (
    "Are there more {shapes_a} than {shapes_b}?",
    "Does the image have more {shapes_a} than {shapes_b}?",
    "Are the {shapes_a} more numerous than the {shapes_b}?",
    "Is the number of {shapes_a} larger than the number of {shapes_b}?",
)
COMPARE_ANSWERS: tuple[dict[str, str], ...] = (
    {
        "more": "Yes, there are more {shapes_a}. The image has {count_a} and {count_b}.",
        "fewer": "No, there are fewer {shapes_a}. The image has {count_a} and {count_b}.",
        "equal": "No, there are as many {shapes_a} as {shapes_b}. The image has {count_a} and {count_b}.",
    },
    {
        "more": "Yes. You can count {count_a} but only {count_b}.",
        "fewer": "No. You can count only {count_a} but {count_b}.",
        "equal": "No. You can count {count_a} and also {count_b}, so the numbers are equal.",
    },
    {
        "more": "Yes, because the image has {count_a} and just {count_b}.",
        "fewer": "No, because the image has {count_a} and {count_b}.",
        "equal": "No, because the image has {count_a} and also {count_b}, which is the same number.",
    },
)
EXISTS_QUESTIONS: tuple[str, ...] = (
    "Is there a {colour} {shape} in the image?",
    "Can you see a {colour} {shape}?",
    "Does the picture contain a {colour} {shape}?",
    "Is there a {colour} {shape} anywhere in the picture?",
)
EXISTS_ANSWERS: tuple[dict[str, str], ...] = (
    {
        "yes_one": "Yes, there is a {size} {colour} {shape} {loc} of the image.",
        "yes_many": "Yes, there are {n} {size} {colour} {shapes}, {locs}.",
        "no_one": "No, there is no {colour} {shape}. The only {shape} in the image is {other_colour}.",
        "no_many": "No, there is no {colour} {shape}. The {shapes} in the image are {other_colour}.",
        "no_absent": "No, there is no {colour} {shape}. In fact there are no {shapes} in the image at all.",
    },
    {
        "yes_one": "Yes. The image contains a {size} {colour} {shape}, and it is {loc}.",
        "yes_many": "Yes. The image contains {n} {colour} {shapes}, and they are {locs}.",
        "no_one": "No. The image has a {shape}, but it is {other_colour}, not {colour}.",
        "no_many": "No. The image has {n} {shapes}, but they are {other_colour}, not {colour}.",
        "no_absent": "No. The image does not contain any {shapes}, it shows {object_list}.",
    },
)

# Words that fields expand into besides the filler lists above (list joiners, count phrases, "be").
_GLUE_WORDS: tuple[str, ...] = ("a", "an", "and", "one", "no", "is", "are")


# ----------------------------------------------------------------------------------------------------------
# Words: the closed vocabulary and a reversible word split.

_WORD_RE = re.compile(r"[a-z]+|[.,?]")


def split_words(text: str) -> list[str]:
    """Lowercase `text` and split it into world words and punctuation marks.

    Why: the tiny word-level tokenizer and the vocabulary test must cut text the same way; `join_words`
    inverts this for every text the world generates. The image token is not a word: strip it first.
    """
    lowered = text.lower()
    tokens = _WORD_RE.findall(lowered)
    leftover = _WORD_RE.sub("", lowered).strip()
    if leftover:
        raise ValueError(f"text has characters outside the world alphabet: {leftover!r} in {text!r}")
    return tokens


def join_words(words: Sequence[str]) -> str:
    """Rebuild text from `split_words` output: capitalise sentence starts, no space before punctuation.

    Why: decoding word ids back to the exact generated string lets tests and demos compare text directly.
    """
    pieces: list[str] = []
    sentence_start = True
    for word in words:
        if word in PUNCTUATION:
            pieces.append(word)
            sentence_start = word in (".", "?")
            continue
        if pieces:
            pieces.append(" ")
        pieces.append(word.capitalize() if sentence_start else word)
        sentence_start = False
    return "".join(pieces)


def _all_templates() -> list[str]:
    templates: list[str] = [*CAPTION_QUESTIONS, *PRETRAIN_INSTRUCTIONS, *CAPTION_ANSWERS]
    templates += [*COUNT_QUESTIONS, *COUNT_OBJECT_QUESTIONS, *COUNT_OBJECT_ANSWERS]
    templates += [*COMPARE_QUESTIONS, *EXISTS_QUESTIONS]
    for pairs in (COLOUR_QUESTIONS, COLOUR_ANSWERS, POSITION_QUESTIONS, POSITION_ANSWERS):
        templates += [template for pair in pairs for template in pair]
    for cases in (*COUNT_ANSWERS, *COMPARE_ANSWERS, *EXISTS_ANSWERS):
        templates += list(cases.values())
    return templates


def _build_vocabulary() -> tuple[str, ...]:
    words: set[str] = set(_GLUE_WORDS)
    for template in _all_templates():
        words.update(word for word in split_words(re.sub(r"\{\w+\}", " ", template)) if word not in PUNCTUATION)
    fillers = [*SHAPES, *SHAPE_PLURALS.values(), *COLOURS, *SIZES, *NUMBER_WORDS, *CELL_PHRASES]
    for filler in fillers:
        words.update(split_words(filler))
    return tuple(sorted(words))


# Every word the world can produce, lowercase, sorted; punctuation is separate (PUNCTUATION).
WORLD_WORDS: tuple[str, ...] = _build_vocabulary()


def world_vocabulary() -> list[str]:
    """All tokens `split_words` can return for world text: the words, then the punctuation marks.

    Why: a word-level tokenizer built from this list covers every question and answer with no unknowns.
    """
    return [*WORLD_WORDS, *PUNCTUATION]


# ----------------------------------------------------------------------------------------------------------
# Scenes.


@dataclass(frozen=True)
class SceneObject:
    """One solid shape in one grid cell; `jitter` in [-1, 1] shifts it within the cell's free margin."""

    shape: str
    colour: str
    size: str
    cell: int
    jitter: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class ObjectGroup:
    """All objects of one shape. A scene gives each shape one colour and one size, so a group is uniform."""

    shape: str
    colour: str
    size: str
    cells: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.cells)


@dataclass(frozen=True)
class Scene:
    """A set of objects on the 3x3 grid: a main shape repeated 1-4 times plus 1-2 distractor shapes.

    Shapes and colours are unique per group, which is what makes "What colour is the square?" and
    "Where is the green triangle?" well defined.
    """

    objects: tuple[SceneObject, ...]

    def groups(self) -> list[ObjectGroup]:
        """Groups in reading order of their first cell, so captions list objects top-left to bottom-right."""
        by_shape: dict[str, list[SceneObject]] = {}
        for obj in self.objects:
            by_shape.setdefault(obj.shape, []).append(obj)
        groups = [
            ObjectGroup(objs[0].shape, objs[0].colour, objs[0].size, tuple(sorted(obj.cell for obj in objs)))
            for objs in by_shape.values()
        ]
        return sorted(groups, key=lambda group: group.cells[0])

    def group(self, shape: str) -> ObjectGroup | None:
        return next((group for group in self.groups() if group.shape == shape), None)

    def count(self, shape: str) -> int:
        return sum(obj.shape == shape for obj in self.objects)

    def signature(self) -> str:
        """The composition (what is where), ignoring jitter: two scenes with equal signatures are the same."""
        return ";".join(f"{g.shape}:{g.colour}:{g.size}:{','.join(map(str, g.cells))}" for g in self.groups())

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [{**obj.__dict__, "jitter": list(obj.jitter)} for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(tuple(SceneObject(**{**obj, "jitter": tuple(obj["jitter"])}) for obj in data["objects"]))


def scene_bucket(scene: Scene) -> int:
    """Stable hash bucket of a scene's composition; bucket 0 is reserved for the heldout split.

    Why: hashing the composition (not the seed) makes train and heldout disjoint whatever seeds are used.
    """
    digest = hashlib.sha1(scene.signature().encode()).digest()
    return int.from_bytes(digest[:4], "big") % _NUM_SCENE_BUCKETS


def _draw_scene(rng: random.Random) -> Scene:
    num_groups = rng.choice((2, 3))
    shapes = rng.sample(SHAPES, num_groups)
    colours = rng.sample(list(COLOURS), num_groups)
    counts = [rng.randint(1, 4)] + [rng.randint(1, 2) for _ in range(num_groups - 1)]
    cells = rng.sample(range(9), sum(counts))
    objects: list[SceneObject] = []
    for shape, colour, count in zip(shapes, colours, counts):
        size = rng.choice(SIZES)
        for _ in range(count):
            jitter = (round(rng.uniform(-1, 1), 3), round(rng.uniform(-1, 1), 3))
            objects.append(SceneObject(shape, colour, size, cells.pop(), jitter))
    return Scene(tuple(objects))


def sample_scene(rng: random.Random, split: str) -> Scene:
    """Draw a random scene that belongs to `split` (heldout scenes and the others never coincide).

    Why: every consumer (records, tests, the demo) needs scenes from the right side of the split boundary.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    while True:
        scene = _draw_scene(rng)
        if (scene_bucket(scene) == _HELDOUT_BUCKET) == (split == "heldout"):
            return scene


# ----------------------------------------------------------------------------------------------------------
# Rendering.


def _cell_box(cell: int, image_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a grid cell, right/bottom exclusive."""
    row, column = divmod(cell, 3)
    edges = [round(i * image_size / 3) for i in range(4)]
    return edges[column], edges[row], edges[column + 1], edges[row + 1]


def object_box(obj: SceneObject, image_size: int) -> tuple[int, int, int]:
    """(left, top, side) of the square an object is drawn in; always >= 1 px inside its cell.

    Why: keeping every object strictly inside its cell means objects never touch, so each object is one
    connected blob of its colour, which the tests (and a tiny ViT) rely on.
    """
    left, top, right, bottom = _cell_box(obj.cell, image_size)
    cell_side = min(right - left, bottom - top)
    side = max(3, min(cell_side - 2, round(cell_side * SIZE_FRACTIONS[obj.size])))
    free = cell_side - side
    slack = max(0, free // 2 - 1)
    x = left + free // 2 + round(obj.jitter[0] * slack)
    y = top + free // 2 + round(obj.jitter[1] * slack)
    return x, y, side


def render_scene(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """Draw a scene as an RGB image: solid, aliased shapes in exact palette colours on a light background.

    Why: the image is the only place where colours, counts and positions live, so the target must look.
    """
    if image_size < 24:
        raise ValueError(f"image_size {image_size} is too small to draw recognisable shapes (need >= 24)")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, side = object_box(obj, image_size)
        x1, y1 = x0 + side - 1, y0 + side - 1  # inclusive corners
        middle_x, middle_y = x0 + (side - 1) / 2, y0 + (side - 1) / 2
        fill = COLOURS[obj.colour]
        if obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(middle_x, y0), (x1, y1), (x0, y1)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(middle_x, y0), (x1, middle_y), (middle_x, y1), (x0, middle_y)], fill=fill)
        elif obj.shape == "cross":
            arm = max(1, round(side / 3))
            start = (side - arm) // 2
            draw.rectangle((x0, y0 + start, x1, y0 + start + arm - 1), fill=fill)
            draw.rectangle((x0 + start, y0, x0 + start + arm - 1, y1), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


# ----------------------------------------------------------------------------------------------------------
# Questions and answers.


def _fill(template: str, **fields: str) -> str:
    text = template.format(**fields)
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"


def _join_list(items: Sequence[str]) -> str:
    """"x", "x and y", "x, y and z"."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _locs(group: ObjectGroup) -> str:
    return _join_list([CELL_PHRASES[cell] for cell in group.cells])


def _locs_each(group: ObjectGroup) -> str:
    return _join_list(["one " + CELL_PHRASES[cell] for cell in group.cells])


def _count_phrase(count: int, shape: str) -> str:
    """'no circles', 'one circle', 'three circles'."""
    if count == 0:
        return "no " + SHAPE_PLURALS[shape]
    return f"{NUMBER_WORDS[count]} {shape if count == 1 else SHAPE_PLURALS[shape]}"


def _group_noun(group: ObjectGroup, with_size: bool) -> str:
    """'a small red circle' or 'three small red circles' (size optional)."""
    amount = "a" if group.count == 1 else NUMBER_WORDS[group.count]
    noun = group.shape if group.count == 1 else SHAPE_PLURALS[group.shape]
    size = f" {group.size}" if with_size else ""
    return f"{amount}{size} {group.colour} {noun}"


def _object_list(scene: Scene) -> str:
    return _join_list([_group_noun(group, with_size=False) for group in scene.groups()])


def _group_fields(group: ObjectGroup) -> dict[str, str]:
    return {
        "shape": group.shape,
        "shapes": SHAPE_PLURALS[group.shape],
        "colour": group.colour,
        "size": group.size,
        "n": NUMBER_WORDS[group.count],
        "loc": CELL_PHRASES[group.cells[0]],
        "locs": _locs(group),
        "locs_each": _locs_each(group),
    }


def caption(scene: Scene, template_index: int = 0) -> str:
    """The templated caption of a scene, listing every object with size, colour and position.

    Why: captions are the pretraining target and the longest answers in the world.
    """
    groups = scene.groups()
    described = [f"{_group_noun(group, with_size=True)} {_locs(group)}" for group in groups]
    return _fill(
        CAPTION_ANSWERS[template_index % len(CAPTION_ANSWERS)],
        be="is" if groups[0].count == 1 else "are",
        groups=_join_list(described),
        total=NUMBER_WORDS[len(scene.objects)],
    )


def _caption_task(scene: Scene, rng: random.Random, questions: Sequence[str]) -> tuple[str, str]:
    return rng.choice(questions), caption(scene, rng.randrange(len(CAPTION_ANSWERS)))


def _colour_task(scene: Scene, rng: random.Random) -> tuple[str, str]:
    group = rng.choice(scene.groups())
    number = 0 if group.count == 1 else 1
    fields = _group_fields(group)
    question = _fill(rng.choice(COLOUR_QUESTIONS)[number], **fields)
    return question, _fill(rng.choice(COLOUR_ANSWERS)[number], **fields)


def _count_task(scene: Scene, rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.2:
        total = NUMBER_WORDS[len(scene.objects)]
        answer = _fill(rng.choice(COUNT_OBJECT_ANSWERS), total=total, object_list=_object_list(scene))
        return rng.choice(COUNT_OBJECT_QUESTIONS), answer
    present = [group.shape for group in scene.groups()]
    absent = [shape for shape in SHAPES if shape not in present]
    shape = rng.choice(absent) if rng.random() < 0.2 else rng.choice(present)
    group = scene.group(shape)
    question = _fill(rng.choice(COUNT_QUESTIONS), shapes=SHAPE_PLURALS[shape])
    answers = rng.choice(COUNT_ANSWERS)
    if group is None:
        return question, _fill(answers["zero"], shapes=SHAPE_PLURALS[shape], object_list=_object_list(scene))
    return question, _fill(answers["one" if group.count == 1 else "many"], **_group_fields(group))


def _position_task(scene: Scene, rng: random.Random) -> tuple[str, str]:
    group = rng.choice(scene.groups())
    number = 0 if group.count == 1 else 1
    fields = _group_fields(group)
    question = _fill(rng.choice(POSITION_QUESTIONS)[number], **fields)
    return question, _fill(rng.choice(POSITION_ANSWERS)[number], **fields)


def _compare_task(scene: Scene, rng: random.Random) -> tuple[str, str]:
    present = [group.shape for group in scene.groups()]
    if rng.random() < 0.8:
        shape_a, shape_b = rng.sample(present, 2)
    else:
        shape_a = rng.choice(present)
        shape_b = rng.choice([shape for shape in SHAPES if shape not in present])
        if rng.random() < 0.5:
            shape_a, shape_b = shape_b, shape_a
    count_a, count_b = scene.count(shape_a), scene.count(shape_b)
    case = "more" if count_a > count_b else "fewer" if count_a < count_b else "equal"
    fields = {
        "shapes_a": SHAPE_PLURALS[shape_a],
        "shapes_b": SHAPE_PLURALS[shape_b],
        "count_a": _count_phrase(count_a, shape_a),
        "count_b": _count_phrase(count_b, shape_b),
    }
    return _fill(rng.choice(COMPARE_QUESTIONS), **fields), _fill(rng.choice(COMPARE_ANSWERS)[case], **fields)


def _exists_task(scene: Scene, rng: random.Random) -> tuple[str, str]:
    groups = scene.groups()
    answers = rng.choice(EXISTS_ANSWERS)
    if rng.random() < 0.5:
        group = rng.choice(groups)
        fields = _group_fields(group)
        case = "yes_one" if group.count == 1 else "yes_many"
    else:
        used_colours = {group.colour for group in groups}
        if rng.random() < 0.5:  # the shape is there, but in another colour
            group = rng.choice(groups)
            colour = rng.choice([c for c in COLOURS if c != group.colour])
            fields = {**_group_fields(group), "colour": colour, "other_colour": group.colour}
            case = "no_one" if group.count == 1 else "no_many"
        else:
            shape = rng.choice([s for s in SHAPES if scene.group(s) is None])
            colour = rng.choice([c for c in COLOURS if c not in used_colours] or list(COLOURS))
            fields = {"shape": shape, "shapes": SHAPE_PLURALS[shape], "colour": colour}
            fields["object_list"] = _object_list(scene)
            case = "no_absent"
    return _fill(rng.choice(EXISTS_QUESTIONS), **fields), _fill(answers[case], **fields)


def make_conversation(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of the given task kind about `scene`; template choices come from `rng`.

    Why: the single place that decides the world's language, shared by records and the text corpus.
    """
    if kind == "caption":
        return _caption_task(scene, rng, CAPTION_QUESTIONS)
    if kind == "pretrain":
        return _caption_task(scene, rng, PRETRAIN_INSTRUCTIONS)
    if kind == "colour":
        return _colour_task(scene, rng)
    if kind == "count":
        return _count_task(scene, rng)
    if kind == "position":
        return _position_task(scene, rng)
    if kind == "reasoning":
        return _compare_task(scene, rng) if rng.random() < 0.5 else _exists_task(scene, rng)
    raise ValueError(f"unknown task kind {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# Records, splits and files.


def image_file_name(split: str, seed: int, index: int) -> str:
    """Image path of a record, relative to the directory holding `<split>.jsonl`."""
    return f"images/{split}_{seed}_{index:06d}.png"


def _record_rng(split: str, seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs and platforms,
    # and each split (and each record) gets its own stream.
    return random.Random(f"massv-world-v{WORLD_VERSION}:{split}:{seed}:{index}")


def make_record(split: str, seed: int, index: int) -> tuple[dict[str, Any], Scene]:
    """The LLaVA record number `index` of (split, seed), and its scene; no rendering.

    Why: records are independent of each other, so any one can be rebuilt (or generated text-only) alone.
    The record carries two extra keys that LLaVA loaders ignore: "task" (the task kind, for per-task
    evaluation) and "scene" (`Scene.to_dict()`, for checks that need the ground truth).
    """
    rng = _record_rng(split, seed, index)
    scene = sample_scene(rng, split)
    kind = "pretrain" if split == "pretrain" else rng.choices(TASK_KINDS, weights=TASK_WEIGHTS)[0]
    question, answer = make_conversation(scene, kind, rng)
    # LLaVA-Pretrain puts the image first and a short instruction after it; instruction data does the same.
    record = {
        "id": f"{split}-{seed}-{index:06d}",
        "image": image_file_name(split, seed, index),
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "task": "caption" if kind == "pretrain" else kind,
        "scene": scene.to_dict(),
    }
    return record, scene


def generate_records(
    split: str, num_samples: int, seed: int, image_size: int = DEFAULT_IMAGE_SIZE
) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """Yield (record, rendered image) pairs in memory, without touching the disk.

    Why: tests and the demo want world data without writing thousands of PNGs first.
    """
    for index in range(num_samples):
        record, scene = make_record(split, seed, index)
        yield record, render_scene(scene, image_size)


def world_text_corpus(num_samples: int = 2000, seed: int = 0, splits: Sequence[str] = ("pretrain", "train")) -> str:
    """Plain text of the world's language: each record's question and answer on two lines, no images.

    Why: trains the word-level tokenizer and text-only language models (the drafter's LM before it is
    given eyes). Heldout is left out by default so its scenes are never seen in any form during training.
    """
    lines: list[str] = []
    for split in splits:
        for index in range(num_samples):
            record, _ = make_record(split, seed, index)
            question = record["conversations"][0]["value"].removeprefix(IMAGE_TOKEN).strip()
            lines += [question, record["conversations"][1]["value"]]
    return "\n".join(lines) + "\n"


def _manifest(split: str, num_samples: int, seed: int, image_size: int) -> dict[str, Any]:
    return {"world_version": WORLD_VERSION, "split": split, "num_samples": num_samples, "seed": seed,
            "image_size": image_size}  # fmt: skip


def _is_complete(out_dir: Path, jsonl_path: Path, manifest_path: Path, manifest: dict[str, Any]) -> bool:
    if not (jsonl_path.exists() and manifest_path.exists()):
        return False
    try:
        if json.loads(manifest_path.read_text()) != manifest:
            return False
        records = [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, OSError):
        return False
    return len(records) == manifest["num_samples"] and all((out_dir / r["image"]).exists() for r in records)


def write_world(
    out_dir: str | Path,
    split: str,
    num_samples: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    progress: bool = False,
) -> Path:
    """Write `num_samples` records of `split` as PNGs under `out_dir/images/` plus `out_dir/<split>.jsonl`.

    Why: training recipes read LLaVA-format files from disk like any real dataset. Idempotent: if the
    manifest `out_dir/<split>.manifest.json` matches the arguments and every file is there, nothing is
    rewritten. Image paths in the records are relative to `out_dir`. Returns the jsonl path.
    """
    out_dir = Path(out_dir)
    jsonl_path = out_dir / f"{split}.jsonl"
    manifest_path = out_dir / f"{split}.manifest.json"
    manifest = _manifest(split, num_samples, seed, image_size)
    if _is_complete(out_dir, jsonl_path, manifest_path, manifest):
        logger.info("world %s split already written at %s; skipping", split, jsonl_path)
        return jsonl_path

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # an interrupted write must not look complete
    records = generate_records(split, num_samples, seed, image_size)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, total=num_samples, desc=f"world {split}", unit="image")
    temporary_path = jsonl_path.with_suffix(".jsonl.tmp")
    with temporary_path.open("w") as jsonl_file:
        for record, image in records:
            image.save(out_dir / record["image"], format="PNG")
            jsonl_file.write(json.dumps(record) + "\n")
    temporary_path.replace(jsonl_path)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote %d %s records (%dx%d images) to %s", num_samples, split, image_size, image_size, jsonl_path)
    return jsonl_path
