"""ChartQA: questions on rendered charts, both the human-written and the augmented subsets."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from massv.benchmarks.common import BenchmarkSample, read_json, require_file, short_answer_prompt

SUBSETS = ("human", "augmented")


def iter_samples(root: Path, split: str, cache_dir: Path) -> Iterator[BenchmarkSample]:
    """Yield `<split>/<split>_human.json` then `<split>/<split>_augmented.json`, as LLaVA evaluates both.

    The files carry no ids, so a sample id is the subset plus the row index.
    """
    split_dir = root / split
    subset_paths = [
        require_file(
            split_dir / f"{split}_{subset}.json",
            "ChartQA",
            f"the ChartQA release has {split}/{split}_human.json, {split}/{split}_augmented.json and "
            f"{split}/png/ with the chart images",
        )
        for subset in SUBSETS
    ]
    for subset, subset_path in zip(SUBSETS, subset_paths):
        for index, record in enumerate(read_json(subset_path)):
            yield BenchmarkSample(
                sample_id=f"{subset}_{index}",
                image_path=split_dir / "png" / record["imgname"],
                prompt=short_answer_prompt(record["query"]),
                reference=str(record["label"]) if record.get("label") is not None else None,
            )
