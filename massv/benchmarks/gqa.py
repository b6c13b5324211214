"""GQA balanced question files (compositional questions on Visual Genome images)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from massv.benchmarks.common import BenchmarkSample, read_json, require_file, short_answer_prompt


def iter_samples(root: Path, split: str, cache_dir: Path) -> Iterator[BenchmarkSample]:
    """Yield questions from `<split>_questions.json` (default split "testdev_balanced", LLaVA's).

    The file is a dict question id -> record; JSON keeps file order, so runs are reproducible.
    """
    questions_path = require_file(
        root / f"{split}_questions.json",
        "GQA",
        "download the GQA balanced questions from the official GQA site; images go to <root>/images/<imageId>.jpg",
    )
    for question_id, record in read_json(questions_path).items():
        yield BenchmarkSample(
            sample_id=str(question_id),
            image_path=root / "images" / f"{record['imageId']}.jpg",
            prompt=short_answer_prompt(record["question"]),
            reference=record.get("answer"),
        )
