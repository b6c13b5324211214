"""ScienceQA, image subset: multiple-choice science questions, prompted as in LLaVA-1.5."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from massv.benchmarks.common import BenchmarkSample, multiple_choice_prompt, option_letter, read_json, require_file
from massv.errors import InputError

logger = logging.getLogger(__name__)

PROBLEMS_FILE = "problems.json"
SPLITS_FILE = "pid_splits.json"


def iter_samples(root: Path, split: str, cache_dir: Path) -> Iterator[BenchmarkSample]:
    """Yield the problems of `split` that have an image (text-only ones cannot test a VLM drafter).

    `pid_splits.json` fixes the official order and named subsets (e.g. "minival"); without it the
    `split` field of each problem decides. Reference is the answer's option letter, which is what
    the prompt asks for.
    """
    problems = read_json(
        require_file(
            root / PROBLEMS_FILE,
            "ScienceQA",
            "download problems.json, pid_splits.json and images/ from the ScienceQA repository",
        )
    )
    splits_path = root / SPLITS_FILE
    if splits_path.is_file():
        split_ids = read_json(splits_path)
        if split not in split_ids:
            raise InputError(f"ScienceQA split {split!r} not in {splits_path}; it has {sorted(split_ids)}")
        problem_ids = [str(pid) for pid in split_ids[split]]
    else:
        problem_ids = [pid for pid, problem in problems.items() if problem.get("split") == split]

    text_only = 0
    for pid in problem_ids:
        problem = problems[pid]
        if not problem.get("image"):
            text_only += 1
            continue
        # Images sit under the problem's own split, also when a subset like "minival" was asked for.
        image_split = problem.get("split", split)
        yield BenchmarkSample(
            sample_id=pid,
            image_path=root / "images" / image_split / pid / problem["image"],
            prompt=multiple_choice_prompt(problem["question"], problem["choices"], context=problem.get("hint", "")),
            reference=option_letter(int(problem["answer"])),
        )
    logger.info("ScienceQA %s: left out %d text-only problems (image subset only)", split, text_only)
