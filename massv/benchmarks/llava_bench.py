"""LLaVA-Bench (In-the-Wild): long free-form answers, the regime where drafting pays off most."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from massv.benchmarks.common import BenchmarkSample, read_jsonl, require_file

logger = logging.getLogger(__name__)

QUESTIONS_FILE = "questions.jsonl"
ANSWERS_FILE = "answers_gpt4.jsonl"


def iter_samples(root: Path, split: str, cache_dir: Path) -> Iterator[BenchmarkSample]:
    """Yield every question; the prompt is the question text verbatim, as in LLaVA's eval.

    GPT-4 answers are optional references: speculative decoding metrics do not need them.
    """
    questions_path = require_file(
        root / QUESTIONS_FILE,
        "LLaVA-Bench",
        "download llava-bench-in-the-wild (questions.jsonl, answers_gpt4.jsonl, images/)",
    )
    answers_path = root / ANSWERS_FILE
    references: dict[str, str] = {}
    if answers_path.is_file():
        references = {str(answer["question_id"]): answer["text"] for answer in read_jsonl(answers_path)}
    else:
        logger.info("LLaVA-Bench: %s not found, samples have no reference answers", answers_path)
    for question in read_jsonl(questions_path):
        question_id = str(question["question_id"])
        yield BenchmarkSample(
            sample_id=question_id,
            image_path=root / "images" / question["image"],
            prompt=question["text"].strip(),
            reference=references.get(question_id),
        )
