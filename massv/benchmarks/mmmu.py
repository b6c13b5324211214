"""MMMU: college-level multi-discipline questions, read from the published per-subject parquet files.

Images are embedded in the parquet as {bytes, path} structs; the eval loop wants a file path,
so the first image of each question is written once to a PNG cache and reused across runs.
"""

from __future__ import annotations

import ast
import hashlib
import io
import logging
import re
from pathlib import Path
from typing import Any, Iterator

from massv.benchmarks.common import (
    BenchmarkFileError,
    BenchmarkSample,
    multiple_choice_prompt,
    short_answer_prompt,
)

logger = logging.getLogger(__name__)

IMAGE_TAG = re.compile(r"<image (\d+)>")
LEADING_TAGS = re.compile(r"^\s*(?:<image \d+>\s*)+")
TRAILING_TAGS = re.compile(r"(?:\s*<image \d+>)+\s*$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLUMNS = ("id", "question", "options", "answer", "question_type", "image_1")


def parquet_files(root: Path, split: str) -> list[Path]:
    """`<root>/<Subject>/<split>-*.parquet`, or the files of one subject when root is that folder."""
    files = sorted(root.glob(f"{split}-*.parquet")) + sorted(root.glob(f"*/{split}-*.parquet"))
    if not files:
        example = root / "Accounting" / f"{split}-00000-of-00001.parquet"
        raise BenchmarkFileError(
            f"MMMU needs <Subject>/{split}-*.parquet files under {root}, e.g. {example} "
            "(download the MMMU/MMMU dataset repository, one folder per subject)"
        )
    return files


def parse_options(options: Any) -> list[str]:
    """The published column is the string repr of a Python list; accept a real list too."""
    if options is None:
        return []
    if isinstance(options, str):
        options = ast.literal_eval(options) if options.strip() else []
    return [str(option) for option in options]


def replace_image_tags(question: str, options: list[str]) -> tuple[str, list[str]]:
    """Turn "<image k>" placeholders into words, since the image goes in as pixels, not a tag.

    A tag standing before or after the whole question only marks where the image was, so it is
    dropped. Inline, when only image_1 (the one shown) is referred to it becomes "the image";
    otherwise every tag keeps its number ("image 2") so the references stay distinguishable.
    """
    numbers = {int(number) for text in (question, *options) for number in IMAGE_TAG.findall(text)}
    replacement = "the image" if numbers <= {1} else r"image \1"
    question = LEADING_TAGS.sub("", TRAILING_TAGS.sub("", question))
    return IMAGE_TAG.sub(replacement, question), [IMAGE_TAG.sub(replacement, option) for option in options]


def cache_image(image_bytes: bytes, sample_id: str, cache_dir: Path) -> Path:
    """Write the image as PNG under the cache, named by id + content hash so stale files never match.

    PNG bytes are copied as they are (bit-exact); other formats are decoded and re-encoded losslessly.
    """
    digest = hashlib.sha1(image_bytes).hexdigest()[:12]
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", sample_id)
    image_path = cache_dir / f"{safe_id}-{digest}.png"
    if image_path.is_file():
        return image_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    if image_bytes.startswith(PNG_SIGNATURE):
        png_bytes = image_bytes
    else:
        from PIL import Image

        with Image.open(io.BytesIO(image_bytes)) as image:
            if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
                image = image.convert("RGB")  # e.g. CMYK JPEGs, which PNG cannot store
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            png_bytes = buffer.getvalue()
    # Write then rename, so an interrupted run never leaves a truncated PNG that later "hits" the cache.
    partial_path = image_path.with_suffix(".png.partial")
    partial_path.write_bytes(png_bytes)
    partial_path.replace(image_path)
    return image_path


def first_image_bytes(image: dict[str, Any] | None, parquet_dir: Path) -> bytes | None:
    """Bytes of an HF Image struct; fall back to its path when the bytes were not embedded."""
    if not image:
        return None
    if image.get("bytes"):
        return image["bytes"]
    if image.get("path") and (parquet_dir / image["path"]).is_file():
        return (parquet_dir / image["path"]).read_bytes()
    return None


def iter_samples(root: Path, split: str, cache_dir: Path) -> Iterator[BenchmarkSample]:
    """Yield questions that have an image_1, subjects in alphabetical order, rows in file order.

    Images are decoded lazily, so `--limit 10` touches ten images, not the whole split.
    """
    import pyarrow.parquet as pq

    image_cache = cache_dir / "mmmu" / split
    without_image = 0
    for parquet_path in parquet_files(root, split):
        parquet_file = pq.ParquetFile(parquet_path)
        columns = [name for name in COLUMNS if name in parquet_file.schema_arrow.names]
        for batch in parquet_file.iter_batches(batch_size=16, columns=columns):
            for row in batch.to_pylist():
                image_bytes = first_image_bytes(row.get("image_1"), parquet_path.parent)
                if image_bytes is None:
                    without_image += 1
                    continue
                question, options = replace_image_tags(row["question"], parse_options(row.get("options")))
                if options:
                    prompt = multiple_choice_prompt(question, options)
                else:
                    prompt = short_answer_prompt(question)
                sample_id = str(row["id"])
                yield BenchmarkSample(
                    sample_id=sample_id,
                    image_path=cache_image(image_bytes, sample_id, image_cache),
                    prompt=prompt,
                    reference=row.get("answer"),
                )
    logger.info("MMMU %s: left out %d questions without image_1", split, without_image)
