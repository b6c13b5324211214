"""LLaVA conversation files (`image` + `conversations`), used for the project's synthetic world
and for any custom set: the same format the drafter trains on, so eval and train data interchange.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

from massv.benchmarks.common import BenchmarkFileError, BenchmarkSample, read_json, read_jsonl
from massv.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SUFFIXES = (".jsonl", ".json")


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """JSONL (one record a line) or JSON (a list of records), as both circulate for LLaVA data."""
    if path.suffix == ".jsonl":
        yield from read_jsonl(path)
        return
    records = read_json(path)
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of LLaVA records, got {type(records).__name__}")
    yield from records


def strip_image_token(text: str) -> str:
    """Drop the "<image>" placeholder and the newline around it; the image is passed separately."""
    parts = [part.strip() for part in text.split(IMAGE_TOKEN)]
    return "\n".join(part for part in parts if part)


def resolve_image(base_dir: Path, image: str) -> Path:
    """LLaVA files name images relative to the data folder or to its images/ subfolder; take the
    first that exists (and the first candidate, for a clear error, when neither does)."""
    candidates = [base_dir / image, base_dir / "images" / image]
    return next((path for path in candidates if path.is_file()), candidates[0])


def first_turn(conversations: list[dict[str, Any]], speaker: str) -> str | None:
    return next((turn["value"] for turn in conversations if turn.get("from") == speaker), None)


def iter_file(path: Path) -> Iterator[BenchmarkSample]:
    """Yield the first human turn of each record as prompt and the first gpt turn as reference."""
    base_dir = path.parent
    text_only = 0
    for index, record in enumerate(read_records(path)):
        image = record.get("image")
        if isinstance(image, list):  # multi-image records: the drafter sees one image
            image = image[0] if image else None
        if not image:
            text_only += 1
            continue
        conversations = record.get("conversations") or []
        human_text = first_turn(conversations, "human")
        if human_text is None:
            raise InputError(f"{path}: record {record.get('id', index)!r} has no human turn")
        yield BenchmarkSample(
            sample_id=str(record.get("id", index)),
            image_path=resolve_image(base_dir, image),
            prompt=strip_image_token(human_text),
            reference=first_turn(conversations, "gpt"),
        )
    if text_only:
        logger.warning("%s: left out %d records without an image", path, text_only)


def data_file(root: Path, split: str) -> Path:
    """`root` itself when it is a file, else `<root>/<split>.jsonl` (or `.json`)."""
    if root.is_file():
        return root
    for suffix in SUFFIXES:
        if (root / f"{split}{suffix}").is_file():
            return root / f"{split}{suffix}"
    present = sorted(path.name for path in root.glob("*.json*")) if root.is_dir() else []
    raise BenchmarkFileError(
        f"LLaVA-format benchmark needs {split}.jsonl at {root / f'{split}.jsonl'} "
        f"(records with 'image' and 'conversations'; images relative to {root} or {root / 'images'}); "
        f"found: {', '.join(present) or 'nothing'}"
    )


def iter_samples(root: Path, split: str, cache_dir: Path) -> Iterator[BenchmarkSample]:
    return iter_file(data_file(root, split))
