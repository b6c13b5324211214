"""Is a generated answer one the world could have given? Valid answers, templates, scores per task."""

from __future__ import annotations

import itertools
import logging
import random
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from PIL import Image

from massv.pipelines import world
from massv.pipelines.world_models.data import record_answer, record_question

logger = logging.getLogger(__name__)

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
