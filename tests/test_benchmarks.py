"""Benchmark loaders against tiny hand-made copies of each published format (tests/data/benchmarks)."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from massv.benchmarks import (
    SUPPORTED_BENCHMARKS,
    BenchmarkFileError,
    BenchmarkSample,
    iter_benchmark,
    load_benchmark,
)
from massv.benchmarks.common import MULTIPLE_CHOICE_INSTRUCTION, SHORT_ANSWER_INSTRUCTION, SHORT_CAPTION_PROMPT

DATA = Path(__file__).resolve().parent / "data" / "benchmarks"


def by_id(samples: list[BenchmarkSample]) -> dict[str, BenchmarkSample]:
    return {sample.sample_id: sample for sample in samples}


def assert_images_exist(samples: list[BenchmarkSample]) -> None:
    for sample in samples:
        assert sample.image_path.is_absolute()
        assert sample.image_path.is_file(), sample


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    """Keep decoded MMMU images out of the committed test data."""
    return tmp_path / "cache"


# name, expected count, a known sample id, its prompt, its reference
CASES = [
    ("coco_captions", 2, "391895", SHORT_CAPTION_PROMPT, "A man with a red helmet on a small moped on a dirt road."),
    ("gqa", 3, "201640614", f"Who is wearing the dress?\n{SHORT_ANSWER_INSTRUCTION}", "woman"),
    ("llava_bench", 3, "2", "What might be the purpose of this painting?",
     "It is a humorous take on a classic portrait."),
    ("mmmu", 2, "validation_Accounting_1",
     "Refer to the image. Which account has the largest balance?\nA. Cash\nB. Inventory\nC. Equipment\nD. Land\n"
     + MULTIPLE_CHOICE_INSTRUCTION, "B"),
    ("scienceqa", 2, "5",
     "Context: Select the best answer.\nWhich property do these three objects have in common?\n"
     "A. shiny\nB. slippery\nC. opaque\n" + MULTIPLE_CHOICE_INSTRUCTION, "C"),
    ("chartqa", 3, "augmented_0", f"What was the revenue in 2019?\n{SHORT_ANSWER_INSTRUCTION}", "2.5"),
    ("textvqa", 2, "34602", f"what is the brand of this camera?\n{SHORT_ANSWER_INSTRUCTION}", "dakota"),
    ("world", 2, "world-0001", "How many triangles are there?", "Three."),
]


@pytest.mark.parametrize(("name", "count", "sample_id", "prompt", "reference"), CASES, ids=[case[0] for case in CASES])
def test_loader_reads_published_format(
    name: str, count: int, sample_id: str, prompt: str, reference: str, cache_dir: Path
) -> None:
    samples = load_benchmark(name, DATA / name, cache_dir=cache_dir)
    assert len(samples) == count
    assert len({sample.sample_id for sample in samples}) == count
    sample = by_id(samples)[sample_id]
    assert sample.prompt == prompt
    assert sample.reference == reference
    assert "<image" not in sample.prompt
    assert_images_exist(samples)


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_limit(name: str, cache_dir: Path) -> None:
    full = load_benchmark(name, DATA / name, cache_dir=cache_dir)
    limited = load_benchmark(name, DATA / name, limit=1, cache_dir=cache_dir)
    assert limited == full[:1]
    assert load_benchmark(name, DATA / name, limit=0, cache_dir=cache_dir) == []


def test_supported_benchmarks_named() -> None:
    assert set(SUPPORTED_BENCHMARKS) >= {
        "coco_captions", "gqa", "llava_bench", "mmmu", "scienceqa", "chartqa", "textvqa", "world",
    }


def test_coco_split_selects_karpathy_split() -> None:
    samples = load_benchmark("coco_captions", DATA / "coco_captions", split="val")
    assert [sample.sample_id for sample in samples] == ["522418"]
    assert samples[0].image_path == DATA / "coco_captions" / "val2014" / "COCO_val2014_000000522418.jpg"


def test_scienceqa_keeps_image_problems_of_split_only() -> None:
    assert [sample.sample_id for sample in load_benchmark("scienceqa", DATA / "scienceqa")] == ["5", "6"]
    train = load_benchmark("scienceqa", DATA / "scienceqa", split="train")
    assert [sample.sample_id for sample in train] == ["8"]
    assert train[0].image_path == DATA / "scienceqa" / "images" / "train" / "8" / "image.png"
    # No hint: no "Context:" line, as in LLaVA-1.5's prompt.
    assert by_id(load_benchmark("scienceqa", DATA / "scienceqa"))["6"].prompt.startswith("Which animal")


def test_scienceqa_without_pid_splits_uses_problem_split(tmp_path: Path) -> None:
    root = tmp_path / "scienceqa"
    shutil.copytree(DATA / "scienceqa", root)
    (root / "pid_splits.json").unlink()
    assert [sample.sample_id for sample in load_benchmark("scienceqa", root)] == ["5", "6"]


def test_mmmu_open_question_and_skipped_imageless(cache_dir: Path) -> None:
    samples = by_id(load_benchmark("mmmu", DATA / "mmmu", cache_dir=cache_dir))
    assert "validation_Accounting_2" not in samples  # no image_1
    art = samples["validation_Art_1"]
    assert art.prompt == f"In which year was this painting made?\n{SHORT_ANSWER_INSTRUCTION}"
    assert art.reference == "1889"
    assert art.image_path.parent.parent.parent == cache_dir


def test_mmmu_decoded_image_equals_original_pixels(cache_dir: Path) -> None:
    import pyarrow.parquet as pq

    samples = by_id(load_benchmark("mmmu", DATA / "mmmu", cache_dir=cache_dir))
    for subject, sample_id in [("Accounting", "validation_Accounting_1"), ("Art", "validation_Art_1")]:
        table = pq.read_table(DATA / "mmmu" / subject / "validation-00000-of-00001.parquet")
        original_bytes = table.column("image_1")[0].as_py()["bytes"]
        with Image.open(io.BytesIO(original_bytes)) as original, Image.open(samples[sample_id].image_path) as decoded:
            assert decoded.format == "PNG"
            assert decoded.size == original.size
            assert decoded.convert("RGB").tobytes() == original.convert("RGB").tobytes()
    # A second load reuses the cache instead of writing new files.
    files_before = sorted(cache_dir.rglob("*"))
    load_benchmark("mmmu", DATA / "mmmu", cache_dir=cache_dir)
    assert sorted(cache_dir.rglob("*")) == files_before


def test_mmmu_default_cache_under_root(tmp_path: Path) -> None:
    root = tmp_path / "mmmu"
    shutil.copytree(DATA / "mmmu", root)
    samples = load_benchmark("mmmu", root, limit=1)
    assert samples[0].image_path.is_relative_to(root / ".massv_cache")


def test_llava_bench_without_answers_has_no_reference(tmp_path: Path) -> None:
    root = tmp_path / "llava_bench"
    shutil.copytree(DATA / "llava_bench", root)
    (root / "answers_gpt4.jsonl").unlink()
    samples = load_benchmark("llava_bench", root)
    assert len(samples) == 3 and all(sample.reference is None for sample in samples)


def test_world_image_resolution_and_prompt() -> None:
    samples = by_id(load_benchmark("world", DATA / "world"))
    assert samples["world-0000"].image_path == DATA / "world" / "images" / "0000.png"
    assert samples["world-0000"].prompt == "What shape is left of the red circle?"
    assert samples["world-0000"].reference == "A blue square."
    assert samples["world-0001"].image_path == DATA / "world" / "extra" / "0001.png"


def test_generic_llava_file_path(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        samples = load_benchmark(str(DATA / "llava_generic" / "conversations.json"))
    assert [sample.sample_id for sample in samples] == ["custom-a", "custom-b"]
    assert samples[0].prompt == "Describe the picture."
    assert samples[0].reference == "A small gradient."
    assert samples[1].prompt == "Is it bright?"
    assert "1 records without an image" in caplog.text
    assert_images_exist(samples)


def test_relative_path_resolved_under_root() -> None:
    samples = load_benchmark("test.jsonl", DATA / "world")
    assert len(samples) == 2


@pytest.mark.parametrize(
    ("path", "expected_ids"),
    [
        ("gqa", {"201307251", "201640614", "202225914"}),
        ("gqa/testdev_balanced_questions.json", {"201307251", "201640614", "202225914"}),
        ("chartqa", {"human_0", "human_1", "augmented_0"}),
        ("chartqa/test/test_human.json", {"human_0", "human_1", "augmented_0"}),
        ("coco_captions", {"391895", "184613"}),
        ("llava_bench/questions.jsonl", {"0", "1", "2"}),
        ("scienceqa", {"5", "6"}),
        ("textvqa/TextVQA_0.5.1_val.json", {"34602", "34603"}),
        ("mmmu", {"validation_Accounting_1", "validation_Art_1"}),
        ("mmmu/Art/validation-00000-of-00001.parquet", {"validation_Art_1"}),
        ("world", {"world-0000", "world-0001"}),
    ],
)
def test_format_detected_from_path(path: str, expected_ids: set[str], cache_dir: Path) -> None:
    samples = load_benchmark(str(DATA / path), cache_dir=cache_dir)
    assert {sample.sample_id for sample in samples} == expected_ids


def test_undetectable_directory_says_what_is_expected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="dataset_coco.json"):
        load_benchmark(str(tmp_path))


def test_unknown_name_lists_supported() -> None:
    with pytest.raises(ValueError) as error:
        load_benchmark("vqav9", DATA)
    for name in SUPPORTED_BENCHMARKS:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("name", "missing_file"),
    [
        ("gqa", "testdev_balanced_questions.json"),
        ("coco_captions", "dataset_coco.json"),
        ("llava_bench", "questions.jsonl"),
        ("scienceqa", "problems.json"),
        ("chartqa", "test/test_human.json"),
        ("textvqa", "TextVQA_0.5.1_val.json"),
        ("world", "test.jsonl"),
        ("mmmu", "Accounting/validation-00000-of-00001.parquet"),
    ],
)
def test_missing_file_names_file_and_path(name: str, missing_file: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_benchmark(name, tmp_path)
    assert isinstance(error.value, BenchmarkFileError)
    assert str(tmp_path / missing_file) in str(error.value)


def test_missing_image_raises_with_sample_id_and_path(tmp_path: Path) -> None:
    root = tmp_path / "gqa"
    shutil.copytree(DATA / "gqa", root)
    missing = root / "images" / "n235859.jpg"
    missing.unlink()
    with pytest.raises(BenchmarkFileError) as error:
        load_benchmark("gqa", root)
    assert "201640614" in str(error.value) and str(missing) in str(error.value)


def test_skip_missing_images_warns_with_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "gqa"
    shutil.copytree(DATA / "gqa", root)
    (root / "images" / "n161313.jpg").unlink()  # two of the three questions use it
    with caplog.at_level(logging.WARNING):
        samples = load_benchmark("gqa", root, skip_missing_images=True)
    assert [sample.sample_id for sample in samples] == ["201640614"]
    assert "skipped 2 samples" in caplog.text


def test_iter_benchmark_is_lazy(cache_dir: Path) -> None:
    samples = iter_benchmark("mmmu", DATA / "mmmu", cache_dir=cache_dir)
    assert not cache_dir.exists()  # nothing decoded before iteration
    first = next(samples)
    assert first.sample_id == "validation_Accounting_1"
    assert len(list(cache_dir.rglob("*.png"))) == 1


def test_mmmu_image_tags_become_words() -> None:
    from massv.benchmarks.mmmu import replace_image_tags

    assert replace_image_tags("<image 1> Which year?", []) == ("Which year?", [])
    assert replace_image_tags("Refer to <image 1>.\n<image 1>", ["a"]) == ("Refer to the image.", ["a"])
    assert replace_image_tags("Compare <image 1> with the options.", ["<image 2>", "<image 3>"]) == (
        "Compare image 1 with the options.",
        ["image 2", "image 3"],
    )
