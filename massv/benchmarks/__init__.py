"""Benchmark loaders: each published format -> a list of uniform `BenchmarkSample`s.

The eval CLI measures speculative decoding (accepted length, acceptance rate, speedup) and only
needs (image, prompt, optional reference) triples; keeping every format behind one
`load_benchmark` call means the measurement loop never knows which benchmark it runs.

    samples = load_benchmark("gqa", root=Path("/data/gqa"), limit=100)
    samples = load_benchmark("/data/world/test.jsonl")        # any LLaVA-format file
    samples = load_benchmark("/data/chartqa")                  # format detected from file names
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from massv.benchmarks import chartqa, coco, gqa, llava, llava_bench, mmmu, scienceqa, textvqa
from massv.benchmarks.common import BenchmarkFileError, BenchmarkSample
from massv.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "SUPPORTED_BENCHMARKS",
    "BenchmarkFileError",
    "BenchmarkSample",
    "BenchmarkSpec",
    "iter_benchmark",
    "load_benchmark",
    "resolve_benchmark",
]

# (data root, split, cache dir) -> samples; the cache dir is where a loader may write derived
# files, such as MMMU's decoded images.
SampleLoader = Callable[[Path, str, Path], Iterable[BenchmarkSample]]


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to find and read one benchmark; `markers` are globs that identify its folder layout."""

    name: str
    title: str
    default_split: str
    iter_samples: SampleLoader
    markers: tuple[str, ...]


# Detection tries specs in this order, so the generic LLaVA layout ("*.jsonl") comes last.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("coco_captions", "COCO Captions", "test", coco.iter_samples, (coco.ANNOTATION_FILE,)),
        BenchmarkSpec("gqa", "GQA", "testdev_balanced", gqa.iter_samples, ("*_balanced_questions.json",)),
        BenchmarkSpec("llava_bench", "LLaVA-Bench", "test", llava_bench.iter_samples, (llava_bench.QUESTIONS_FILE,)),
        BenchmarkSpec("mmmu", "MMMU", "validation", mmmu.iter_samples, ("*-of-*.parquet", "*/*-of-*.parquet")),
        BenchmarkSpec("scienceqa", "ScienceQA", "test", scienceqa.iter_samples, (scienceqa.PROBLEMS_FILE,)),
        BenchmarkSpec("chartqa", "ChartQA", "test", chartqa.iter_samples, ("*/*_human.json",)),
        BenchmarkSpec("textvqa", "TextVQA", "val", textvqa.iter_samples, ("TextVQA_0.5.1_*.json",)),
        BenchmarkSpec("world", "World (LLaVA format)", "test", llava.iter_samples, ("*.jsonl",)),
        BenchmarkSpec("llava", "LLaVA-format file", "test", llava.iter_samples, ()),
    )
}
SUPPORTED_BENCHMARKS: tuple[str, ...] = tuple(BENCHMARKS)


def _detect_file(path: Path) -> tuple[str, Path, str | None]:
    """Map a benchmark's own annotation file to (benchmark, data root, split it implies)."""
    name = path.name
    if name == coco.ANNOTATION_FILE:
        return "coco_captions", path.parent, None
    if name == llava_bench.QUESTIONS_FILE:
        return "llava_bench", path.parent, None
    if name == scienceqa.PROBLEMS_FILE:
        return "scienceqa", path.parent, None
    if name.endswith("_balanced_questions.json"):
        return "gqa", path.parent, name.removesuffix("_questions.json")
    if match := re.fullmatch(r"TextVQA_0\.5\.1_(\w+)\.json", name):
        return "textvqa", path.parent, match.group(1)
    if name in {f"{path.parent.name}_{subset}.json" for subset in chartqa.SUBSETS}:
        return "chartqa", path.parent.parent, path.parent.name
    if path.suffix == ".parquet":  # one MMMU subject: its folder holds the split's files
        return "mmmu", path.parent, name.split("-", 1)[0]
    if path.suffix in llava.SUFFIXES:
        return "llava", path, None
    raise InputError(
        f"Cannot tell the benchmark format of {path}: expected a known annotation file "
        f"({coco.ANNOTATION_FILE}, {llava_bench.QUESTIONS_FILE}, {scienceqa.PROBLEMS_FILE}, "
        "<split>_balanced_questions.json, TextVQA_0.5.1_<split>.json, <split>/<split>_human.json, "
        "an MMMU .parquet) or a LLaVA-format .json/.jsonl file"
    )


def _detect_directory(directory: Path) -> str:
    for spec in BENCHMARKS.values():
        if any(next(directory.glob(marker), None) is not None for marker in spec.markers):
            return spec.name
    raise InputError(
        f"Cannot tell which benchmark {directory} holds: none of the expected files is there. "
        + "; ".join(f"{spec.name}: {' or '.join(spec.markers)}" for spec in BENCHMARKS.values() if spec.markers)
    )


def resolve_benchmark(name: str, root: Path | str | None = None) -> tuple[BenchmarkSpec, Path, str | None]:
    """Turn a benchmark name, or a path to a benchmark folder/file, into (spec, data root, implied split).

    A known name wins over a same-named folder; a relative path is also tried under `root`,
    so `--benchmark test.jsonl --data-root /data/world` works.
    """
    key = name.strip().lower()
    if key in BENCHMARKS:
        if root is None:
            raise InputError(f"Benchmark {name!r} needs a data root (the folder holding its files)")
        return BENCHMARKS[key], Path(root).expanduser().absolute(), None

    path = Path(name).expanduser()
    if not path.exists() and root is not None and not path.is_absolute():
        path = Path(root).expanduser() / path
    if path.is_file():
        detected, data_root, split = _detect_file(path.absolute())
        return BENCHMARKS[detected], data_root, split
    if path.is_dir():
        return BENCHMARKS[_detect_directory(path)], path.absolute(), None
    if "/" in name or name.endswith((".json", ".jsonl", ".parquet")):
        raise BenchmarkFileError(f"Benchmark path {name!r} does not exist (looked at {path.absolute()})")
    raise InputError(
        f"Unknown benchmark {name!r}. Supported: {', '.join(SUPPORTED_BENCHMARKS)}; "
        "or pass a path to a benchmark folder or a LLaVA-format .json/.jsonl file"
    )


def _checked_samples(
    samples: Iterable[BenchmarkSample],
    spec: BenchmarkSpec,
    limit: int | None,
    skip_missing_images: bool,
    skipped: list[BenchmarkSample] | None = None,
) -> Iterator[BenchmarkSample]:
    """Enforce the image-exists contract and the limit, counting only usable samples toward it."""
    missing = 0
    taken = 0
    try:
        if limit == 0:
            return
        for sample in samples:
            if not sample.image_path.is_file():
                if not skip_missing_images:
                    raise BenchmarkFileError(
                        f"{spec.title} sample {sample.sample_id}: image not found at {sample.image_path} "
                        "(massv eval --skip-bad-images, or skip_missing_images=True, leaves such samples out "
                        "and counts them)"
                    )
                missing += 1
                if skipped is not None:
                    skipped.append(sample)
                continue
            yield sample
            taken += 1
            if limit is not None and taken >= limit:
                return
    finally:
        if missing:
            logger.warning("%s: skipped %d samples whose image file is missing", spec.title, missing)


def iter_benchmark(
    name: str,
    root: Path | str | None = None,
    split: str | None = None,
    limit: int | None = None,
    *,
    skip_missing_images: bool = False,
    cache_dir: Path | str | None = None,
    skipped: list[BenchmarkSample] | None = None,
) -> Iterator[BenchmarkSample]:
    """Lazy form of `load_benchmark`: with a limit, only that many images are read or decoded."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    spec, data_root, implied_split = resolve_benchmark(name, root)
    split = split or implied_split or spec.default_split
    data_dir = data_root if data_root.is_dir() else data_root.parent
    cache_path = Path(cache_dir).expanduser().absolute() if cache_dir is not None else data_dir / ".massv_cache"
    logger.info("Benchmark %s (split %s) from %s", spec.name, split, data_root)
    return _checked_samples(spec.iter_samples(data_root, split, cache_path), spec, limit, skip_missing_images, skipped)


def load_benchmark(
    name: str,
    root: Path | str | None = None,
    split: str | None = None,
    limit: int | None = None,
    *,
    skip_missing_images: bool = False,
    cache_dir: Path | str | None = None,
    skipped: list[BenchmarkSample] | None = None,
) -> list[BenchmarkSample]:
    """Load up to `limit` samples of a benchmark (a name in SUPPORTED_BENCHMARKS, or a path).

    `split=None` takes the benchmark's usual eval split (or the one a given file implies).
    A sample whose image is missing raises `BenchmarkFileError` unless `skip_missing_images`,
    which drops it and logs the count: a silently shrunken benchmark would skew comparisons.
    `cache_dir` (default `<root>/.massv_cache`) receives images decoded from parquet (MMMU).
    `skipped`, when given, receives the samples left out for a missing image.
    """
    samples = list(
        iter_benchmark(
            name, root, split, limit, skip_missing_images=skip_missing_images, cache_dir=cache_dir, skipped=skipped
        )
    )
    logger.info("Loaded %d samples", len(samples))
    return samples
