"""LLaVA data loading: bad images and bad conversations are skipped and reported exactly, or raise in strict mode."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from massv.train.llava_data import (
    IMAGE_TOKEN,
    ImageError,
    RecordError,
    load_image,
    load_llava_records,
    write_llava_jsonl,
)


def turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


@pytest.fixture
def llava_dir(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(images / "good.png")
    Image.new("L", (4, 4), 128).save(images / "gray.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    records = [
        {"id": "good", "image": "good.png", "conversations": [turn("human", "<image>\nDescribe"), turn("gpt", "Red")]},
        {"id": "missing", "image": "nope.png", "conversations": [turn("human", "<image>\nHi"), turn("gpt", "Hello")]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [turn("human", "<image>\nHi"), turn("gpt", "Hi")]},
        {
            "id": "text",
            "conversations": [turn("human", "2+2"), turn("gpt", "4"), turn("human", "3+3"), turn("gpt", "6")],
        },
        {"id": "gpt_first", "image": "good.png", "conversations": [turn("gpt", "Hi"), turn("human", "<image>")]},
        # No placeholder: LLaVA's convention puts it in front of the first human turn.
        {"id": 7, "image": "gray.png", "conversations": [turn("human", "What color?"), turn("gpt", "Gray.")]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def test_report_counts_are_exact(llava_dir: Path) -> None:
    dataset, report = load_llava_records(llava_dir / "data.json", llava_dir / "images", require_image=False)
    assert report.total == 6
    assert report.kept == 3 == len(dataset)
    assert report.missing_images == ["missing"]
    assert report.corrupt_images == ["corrupt"]
    assert report.invalid_records == ["gpt_first"]
    assert "expected 'human'" in report.invalid_reasons["gpt_first"]
    assert report.skipped_text_only == []

    rows = {row["id"]: row for row in dataset}
    assert set(rows) == {"good", "text", "7"}
    assert rows["good"]["image_path"] == os.path.abspath(llava_dir / "images" / "good.png")
    assert rows["text"]["image_path"] is None and len(rows["text"]["conversations"]) == 4
    assert rows["7"]["conversations"][0] == {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat color?"}
    assert load_image(rows["7"]["image_path"]).mode == "RGB"


def test_require_image_skips_text_only_and_logs(llava_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="massv.train.llava_data"):
        dataset, report = load_llava_records(llava_dir / "data.json", llava_dir / "images", num_workers=1)
    assert report.kept == 2 and report.skipped_text_only == ["text"]
    assert dataset["id"] == ["good", "7"]
    assert "missing images: missing" in caplog.text and "corrupt images: corrupt" in caplog.text


def test_strict_raises_image_error_naming_the_sample(llava_dir: Path) -> None:
    records = json.loads((llava_dir / "data.json").read_text())
    (llava_dir / "no_invalid.json").write_text(json.dumps([r for r in records if r["id"] != "gpt_first"]))
    with pytest.raises(ImageError, match=r"sample missing: image .*nope\.png is missing .*check --image-root") as error:
        load_llava_records(llava_dir / "no_invalid.json", llava_dir / "images", strict=True)
    assert error.value.sample_id == "missing" and error.value.path.endswith("nope.png")
    with pytest.raises(RecordError, match=r"sample gpt_first"):
        load_llava_records(llava_dir / "data.json", llava_dir / "images", strict=True)


def test_verify_images_false_defers_decoding_to_load_time(llava_dir: Path) -> None:
    dataset, report = load_llava_records(llava_dir / "data.json", llava_dir / "images", verify_images=False)
    assert report.missing_images == ["missing"]  # existence is always checked
    assert report.corrupt_images == [] and "corrupt" in dataset["id"]
    corrupt_path = dataset[dataset["id"].index("corrupt")]["image_path"]
    with pytest.raises(ImageError, match=r"cannot decode image .*corrupt\.png for sample corrupt: "):
        load_image(corrupt_path, sample_id="corrupt")


def test_wrong_image_root_fails_loudly(llava_dir: Path) -> None:
    good_only = [{"id": "a", "image": "good.png", "conversations": [turn("human", "<image>"), turn("gpt", "x")]}]
    (llava_dir / "good.json").write_text(json.dumps(good_only))
    with pytest.raises(ImageError, match=r"none of the 1 images .* check --image-root"):
        load_llava_records(llava_dir / "good.json", llava_dir / "wrong_root")


def test_load_image_messages(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"image file .*x\.jpg for sample s1 is missing: check --image-root"):
        load_image(tmp_path / "x.jpg", sample_id="s1")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ImageError, match=r"cannot decode image .*bad\.png"):
        load_image(tmp_path / "bad.png")


@pytest.mark.parametrize(
    ("conversations", "image", "reason"),
    [
        ([turn("human", "<image> hi")], "good.png", "no gpt turn"),
        ([turn("human", "hi"), turn("gpt", "<image>")], "good.png", "exactly once, in the first human turn"),
        ([turn("human", "<image><image>"), turn("gpt", "x")], "good.png", "appears 2 times"),
        ([turn("human", "<image>"), turn("gpt", "x")], None, "text-only sample contains"),
        ([turn("human", "a"), turn("human", "b")], None, "expected 'gpt'"),
        ([], None, "'conversations' is missing or empty"),
        ([turn("human", "<image>"), turn("gpt", "x")], ["a.png", "b.png"], "multi-image"),
    ],
)
def test_invalid_conversations_are_reported(llava_dir: Path, conversations: list, image: object, reason: str) -> None:
    record: dict = {"id": "bad", "conversations": conversations}
    if image is not None:
        record["image"] = image
    (llava_dir / "bad.json").write_text(json.dumps([record]))
    dataset, report = load_llava_records(llava_dir / "bad.json", llava_dir / "images", require_image=False)
    assert len(dataset) == 0 and report.invalid_records == ["bad"]
    assert reason in report.invalid_reasons["bad"]


def test_jsonl_round_trip_matches_json(llava_dir: Path) -> None:
    records = json.loads((llava_dir / "data.json").read_text())
    assert write_llava_jsonl(records, llava_dir / "out" / "data.jsonl") == len(records)
    assert [p.name for p in (llava_dir / "out").iterdir()] == ["data.jsonl"]  # no temp file left behind
    from_json, json_report = load_llava_records(llava_dir / "data.json", llava_dir / "images", require_image=False)
    from_jsonl, jsonl_report = load_llava_records(
        llava_dir / "out" / "data.jsonl", llava_dir / "images", require_image=False
    )
    assert from_json.to_list() == from_jsonl.to_list()
    assert json_report == jsonl_report


def test_writer_leaves_previous_file_intact_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    write_llava_jsonl([{"id": "old"}], path)
    with pytest.raises(TypeError):
        write_llava_jsonl([{"id": "new"}, {"id": object()}], path)
    assert path.read_text() == '{"id": "old"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
