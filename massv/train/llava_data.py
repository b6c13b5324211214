"""Reading LLaVA-format data (LLaVA-Pretrain 558k, llava_v1_5_mix665k, our distilled files) into `datasets`.

A LLaVA file is a JSON list (or JSONL) of records::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A bus."}, ...]}

`image` is relative to an image root folder (absolute paths are kept as they are) and is absent for
text-only samples. Our self-distilled files add ``"truncated": [true, ...]``, one flag per gpt turn: the
target's answer was cut at `max_new_tokens` rather than finished (training must not learn to stop there). Public dumps contain records that would crash or silently corrupt training hours
in: missing or truncated image files, conversations that do not alternate, no answer at all. This
module checks every record once, up front, skips the bad ones (or raises, with ``strict=True``) and
reports exactly which ids were dropped and why.

The `<image>` placeholder: a sample with an image must carry exactly one `<image>`, in its first
human turn, and it is left where the author put it. If no turn contains it, "<image>\\n" is prepended
to the first human turn, which is where LLaVA's own preprocessing moves the placeholder. Any other
placement (a later turn, twice, or in a text-only sample) makes the record invalid rather than
guessing which image position was meant.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value
from PIL import Image

from massv.errors import MassvError
from massv.io import atomic_write, read_text

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
HUMAN = "human"
GPT = "gpt"

LLAVA_FEATURES = Features(
    {
        "id": Value("string"),
        "image_path": Value("string"),  # absolute; None for text-only samples
        "conversations": List({"from": Value("string"), "value": Value("string")}),
        "truncated": List(Value("bool")),  # per gpt turn; empty when the file does not say (any LLaVA dump)
    }
)

# How many ids each warning lists before it only gives the count.
MAX_LOGGED_IDS = 10


class LlavaDataError(MassvError):
    """Base class for problems with LLaVA-format data."""


class ImageError(LlavaDataError):
    """An image file is missing or cannot be decoded; names the sample, the path and the reason."""

    def __init__(self, message: str, sample_id: str | None = None, path: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.sample_id = sample_id
        self.path = path
        self.reason = reason


class RecordError(LlavaDataError):
    """A record's structure is unusable (no conversations, roles out of order, no answer, ...)."""

    def __init__(self, message: str, sample_id: str | None = None) -> None:
        super().__init__(message)
        self.sample_id = sample_id


@dataclass
class LoadReport:
    """What `load_llava_records` kept and dropped, by sample id.

    ``total == kept + len(missing_images) + len(corrupt_images) + len(invalid_records)
    + len(skipped_text_only)``.
    """

    total: int
    kept: int
    missing_images: list[str]
    corrupt_images: list[str]
    invalid_records: list[str]
    skipped_text_only: list[str] = field(default_factory=list)  # only when require_image=True
    invalid_reasons: dict[str, str] = field(default_factory=dict)  # id -> why it is invalid


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _decode_rgb(path: str) -> Image.Image:
    # verify() checks the container (e.g. PNG chunk checksums) but invalidates the object, and misses
    # truncated pixel data, so the file is opened again and fully decoded.
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # palette transparency cannot go to RGB directly
        return image.convert("RGB")


def _image_problem(path: str, decode: bool) -> tuple[str, str] | None:
    """("missing" | "corrupt", reason) for a bad image file, None for a good one."""
    if not os.path.isfile(path):
        return "missing", "file does not exist"
    if decode:
        try:
            _decode_rgb(path)
        except Exception as error:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError)
            return "corrupt", f"{type(error).__name__}: {error}"
    return None


def load_image(path: str | os.PathLike[str], sample_id: str | None = None) -> Image.Image:
    """Open an image as RGB, or raise `ImageError` saying what to fix, for loading at training time."""
    path = os.fspath(path)
    sample = f" for sample {sample_id}" if sample_id is not None else ""
    if not os.path.isfile(path):
        raise ImageError(
            f"image file {path}{sample} is missing: check --image-root", sample_id, path, "file does not exist"
        )
    try:
        return _decode_rgb(path)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        raise ImageError(f"cannot decode image {path}{sample}: {reason}", sample_id, path, reason) from error


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def read_llava_file(json_path: str | os.PathLike[str]) -> list[Any]:
    """Raw records of a LLaVA JSON list or JSONL file (told apart by the first character, not the name)."""
    path = Path(json_path)
    text = read_text(path, "LLaVA data file")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise LlavaDataError(f"{path} is not valid JSON: {error}") from None
        return list(records)
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise LlavaDataError(f"{path}:{line_number} is not a valid JSON line: {error}") from None
    return records


def normalize_record(record: Any, fallback_id: str, image_root: str) -> dict[str, Any]:
    """Check one raw record and return it as {id, image_path, conversations, truncated}; raise `RecordError`
    if unusable.

    Exists so that every consumer (training, self-distillation) sees the same cleaned structure.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"record is a {type(record).__name__}, not a JSON object", fallback_id)
    sample_id = str(record["id"]) if record.get("id") is not None else fallback_id

    def invalid(reason: str) -> RecordError:
        return RecordError(reason, sample_id)

    image = record.get("image")
    if image in (None, ""):
        image_path = None
    elif isinstance(image, str):
        image_path = os.path.abspath(os.path.join(image_root, image))
    else:
        raise invalid(f"'image' must be one relative path, got {type(image).__name__} (multi-image is not supported)")

    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise invalid("'conversations' is missing or empty")
    conversations = []
    for index, turn in enumerate(turns):
        if not (isinstance(turn, Mapping) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise invalid(f"turn {index} is not an object with string 'from' and 'value'")
        expected = HUMAN if index % 2 == 0 else GPT
        if turn["from"] != expected:
            raise invalid(
                f"turn {index} is from '{turn['from']}', expected '{expected}' (roles alternate, human first)"
            )
        conversations.append({"from": turn["from"], "value": turn["value"]})
    if len(conversations) < 2:
        raise invalid("no gpt turn: nothing to learn from or to regenerate")

    placeholder_counts = [turn["value"].count(IMAGE_TOKEN) for turn in conversations]
    if image_path is None:
        if sum(placeholder_counts):
            raise invalid(f"text-only sample contains the '{IMAGE_TOKEN}' placeholder")
    elif sum(placeholder_counts) == 0:
        conversations[0]["value"] = f"{IMAGE_TOKEN}\n{conversations[0]['value']}"
    elif placeholder_counts[0] != 1 or sum(placeholder_counts) != 1:
        raise invalid(
            f"'{IMAGE_TOKEN}' appears {sum(placeholder_counts)} times (turn counts {placeholder_counts}); "
            "it must appear exactly once, in the first human turn"
        )
    truncated = record.get("truncated")
    num_answers = sum(turn["from"] == GPT for turn in conversations)
    if truncated is None:
        truncated = []
    elif not (isinstance(truncated, list) and all(isinstance(flag, bool) for flag in truncated)
              and len(truncated) == num_answers):
        raise invalid(f"'truncated' must be a list of {num_answers} booleans (one per gpt turn), got {truncated!r}")
    return {"id": sample_id, "image_path": image_path, "conversations": conversations, "truncated": list(truncated)}


def _log_ids(what: str, ids: Sequence[str], total: int, hint: str = "") -> None:
    if not ids:
        return
    shown = ", ".join(ids[:MAX_LOGGED_IDS])
    more = f" and {len(ids) - MAX_LOGGED_IDS} more" if len(ids) > MAX_LOGGED_IDS else ""
    logger.warning("skipped %d of %d records with %s: %s%s%s", len(ids), total, what, shown, more, hint)


def load_llava_records(
    json_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    strict: bool = False,
    require_image: bool = True,
    verify_images: bool = True,
    num_workers: int = 16,
) -> tuple[Dataset, LoadReport]:
    """Load a LLaVA JSON/JSONL file as a clean `datasets.Dataset` plus a report of what was dropped.

    Columns: ``id`` (str), ``image_path`` (absolute str, None for text-only), ``conversations``
    (list of {from, value}), ``truncated`` (list of bool per gpt turn, empty if unknown). `image_root` defaults to the JSON file's folder. With
    ``require_image=True`` (phase 1 captions) text-only samples are skipped. Every image file is
    checked to exist (a cheap stat, which catches a wrong image root before training starts); with
    ``verify_images=True`` it is also fully decoded, on `num_workers` threads because decoding all of
    mix665k takes minutes. ``verify_images=False`` defers decoding to `load_image` at training time.
    ``strict=True`` raises on the first bad record (`RecordError`) or image (`ImageError`) instead of
    skipping it.
    """
    json_path = Path(json_path)
    root = os.fspath(image_root) if image_root is not None else str(json_path.parent)
    raw_records = read_llava_file(json_path)
    total = len(raw_records)

    report = LoadReport(total=total, kept=0, missing_images=[], corrupt_images=[], invalid_records=[])
    candidates: list[dict[str, Any]] = []
    for index, raw_record in enumerate(raw_records):
        try:
            record = normalize_record(raw_record, f"{json_path.name}#{index}", root)
        except RecordError as error:
            if strict:
                raise RecordError(f"sample {error.sample_id} in {json_path}: {error}", error.sample_id) from None
            report.invalid_records.append(str(error.sample_id))
            report.invalid_reasons[str(error.sample_id)] = str(error)
            continue
        if record["image_path"] is None and require_image:
            report.skipped_text_only.append(record["id"])
            continue
        candidates.append(record)

    unique_paths = sorted({record["image_path"] for record in candidates if record["image_path"] is not None})
    if unique_paths:
        logger.info(
            "checking %d images under %s (%s) with %d threads",
            len(unique_paths), root, "decoding" if verify_images else "existence only", max(num_workers, 1),
        )
    if num_workers > 1 and len(unique_paths) > 1:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            problems = dict(zip(unique_paths, pool.map(lambda path: _image_problem(path, verify_images), unique_paths)))
    else:
        problems = {path: _image_problem(path, verify_images) for path in unique_paths}

    kept: list[dict[str, Any]] = []
    for record in candidates:
        problem = problems.get(record["image_path"]) if record["image_path"] is not None else None
        if problem is None:
            kept.append(record)
            continue
        kind, reason = problem
        if strict:
            action = "check --image-root" if kind == "missing" else "re-download or remove this sample"
            raise ImageError(
                f"sample {record['id']}: image {record['image_path']} is {kind} ({reason}): {action}",
                record["id"], record["image_path"], reason,
            )
        (report.missing_images if kind == "missing" else report.corrupt_images).append(record["id"])
    report.kept = len(kept)

    with_images = sum(record["image_path"] is not None for record in candidates)
    if with_images and len(report.missing_images) == with_images:
        # Not one image found: the image root is wrong, and skipping everything would hide that.
        example = next(record for record in candidates if record["image_path"] is not None)
        raise ImageError(
            f"none of the {with_images} images referenced by {json_path} exist under {root} "
            f"(e.g. {example['image_path']} for sample {example['id']}): check --image-root",
            example["id"], example["image_path"], "file does not exist",
        )

    _log_ids("invalid conversations", report.invalid_records, total)
    for sample_id in report.invalid_records[:MAX_LOGGED_IDS]:
        logger.warning("invalid record %s: %s", sample_id, report.invalid_reasons[sample_id])
    _log_ids("missing images", report.missing_images, total, f" (image root: {root})")
    _log_ids("corrupt images", report.corrupt_images, total)
    if report.skipped_text_only:
        logger.info("skipped %d text-only records (require_image=True)", len(report.skipped_text_only))
    logger.info("loaded %d of %d records from %s", report.kept, total, json_path)

    dataset = Dataset.from_dict(
        {
            "id": [record["id"] for record in kept],
            "image_path": [record["image_path"] for record in kept],
            "conversations": [record["conversations"] for record in kept],
            "truncated": [record["truncated"] for record in kept],
        },
        features=LLAVA_FEATURES,
    )
    return dataset, report


def write_llava_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write records as JSONL atomically (temp file + rename), so a killed job never leaves half a file.

    Returns the number of records written. Records are written as given; `load_llava_records` reads
    them back whether they carry a relative or an absolute ``image``.
    """
    count = 0
    with atomic_write(path) as handle:  # ordinary file modes, removed on failure
        for record in records:
            handle.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
            count += 1
    return count
