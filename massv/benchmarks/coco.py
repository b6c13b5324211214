"""COCO Captions through the Karpathy split file, the split every captioning paper reports on."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from massv.benchmarks.common import SHORT_CAPTION_PROMPT, BenchmarkSample, read_json, require_file

ANNOTATION_FILE = "dataset_coco.json"


def iter_samples(root: Path, split: str, cache_dir: Path) -> Iterator[BenchmarkSample]:
    """Yield Karpathy-split images of `split` ("test", "val", "train", "restval").

    The reference is the first human caption: one is enough to eyeball output quality, and
    acceptance metrics never look at it.
    """
    annotation_path = require_file(
        root / ANNOTATION_FILE,
        "COCO Captions",
        "the Karpathy split file from caption_datasets.zip; images go to <root>/<filepath>/<filename>, "
        "e.g. <root>/val2014/COCO_val2014_000000391895.jpg",
    )
    for image in read_json(annotation_path)["images"]:
        if image["split"] != split:
            continue
        sentences = image.get("sentences") or []
        yield BenchmarkSample(
            sample_id=str(image.get("cocoid", image["filename"])),
            image_path=root / image.get("filepath", "") / image["filename"],
            prompt=SHORT_CAPTION_PROMPT,
            reference=sentences[0]["raw"].strip() if sentences else None,
        )
