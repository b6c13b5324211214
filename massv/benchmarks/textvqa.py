"""TextVQA: questions that need reading text in the image."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

from massv.benchmarks.common import BenchmarkSample, read_json, require_file, short_answer_prompt


def most_common_answer(answers: list[str]) -> str | None:
    """The majority of the ten annotator answers; ties go to the first given, for determinism."""
    if not answers:
        return None
    return Counter(answer.strip() for answer in answers).most_common(1)[0][0]


def iter_samples(root: Path, split: str, cache_dir: Path) -> Iterator[BenchmarkSample]:
    """Yield questions from `TextVQA_0.5.1_<split>.json`; val images live in train_images/."""
    annotation_path = require_file(
        root / f"TextVQA_0.5.1_{split}.json",
        "TextVQA",
        "download the TextVQA 0.5.1 annotations and train_val_images.zip from textvqa.org; "
        "images go to <root>/train_images/<image_id>.jpg",
    )
    image_dir = "test_images" if split == "test" else "train_images"
    for record in read_json(annotation_path)["data"]:
        yield BenchmarkSample(
            sample_id=str(record["question_id"]),
            image_path=root / image_dir / f"{record['image_id']}.jpg",
            prompt=short_answer_prompt(record["question"]),
            reference=most_common_answer(record.get("answers") or []),
        )
