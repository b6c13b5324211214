"""Self-distillation: the target's answers, batched like unbatched, resumable with every record exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import massv.train.distill as distill
from massv.families import get_adapter
from massv.train.data import build_messages, render_prompt
from massv.train.distill import (
    MANIFEST_NAME,
    DistillIncompleteError,
    DistillSettingsError,
    generate_answers,
    generate_responses,
    generation_config_for,
    load_distilled_records,
)
from massv.train.llava_data import ImageError, load_llava_records
from tests.conftest import random_image
from tests.helpers_train import build_pair, one_thread, tiny_config, turn, write_llava  # noqa: F401

FAMILIES = ("qwen2_5_vl", "gemma3")


def shard_records(directory: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.glob("shard-*.jsonl")) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_generation_equals_unbatched(tmp_path: Path, family: str) -> None:
    pair = build_pair(family)
    adapter = get_adapter(pair.target.config)
    config = tiny_config(tmp_path, family, overrides=["distill.max_new_tokens=8"])
    generation_config = generation_config_for(config, pair.target, pair.processor, adapter)
    questions = ["Describe the image.", "What colour is the square? Answer in one word.", "How many triangles?"]
    images = [random_image(0), random_image(1), None]  # prompts of different lengths; one text-only
    prompts = [render_prompt(build_messages([turn("human", q)], image is not None, adapter), pair.processor)
               for q, image in zip(questions, images)]
    batched = generate_answers(pair.target, pair.processor, prompts, images, generation_config)
    one_by_one = [generate_answers(pair.target, pair.processor, [p], [i], generation_config)[0]
                  for p, i in zip(prompts, images)]
    assert batched == one_by_one
    assert all(truncated for _, truncated in batched)  # random models do not stop within 8 tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_interrupted_generation_resumes_with_every_record_exactly_once(tmp_path: Path, family: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data_json, image_root = write_llava(tmp_path, 5)
    settings = ["distill.max_new_tokens=4", "distill.shard_size=2", "distill.batch_size=2"]
    config = tiny_config(tmp_path, family, data_json, image_root, settings)
    pair = build_pair(family)
    out = Path(config.data.distilled_dir)

    answered: list[int] = []  # source indices of every batch that was answered and written
    real_answer_records = distill.answer_records
    calls = {"n": 0, "fail_at": None}

    def counting_answer_records(records, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt("simulated kill")
        result = real_answer_records(records, *args, **kwargs)
        answered.extend(record["source_index"] for record in records)
        return result

    monkeypatch.setattr(distill, "answer_records", counting_answer_records)

    first = generate_responses(config, target=pair.target, processor=pair.processor, max_items=3)
    assert (first.generated, first.complete) == (3, False)
    assert (out / "shard-00000.jsonl").exists() and (out / "shard-00001.jsonl.partial").exists()

    calls.update(n=0, fail_at=2)  # killed while answering the second batch of this run
    with pytest.raises(KeyboardInterrupt):
        generate_responses(config, target=pair.target, processor=pair.processor)
    with (out / "shard-00002.jsonl.partial").open("a") as handle:  # a line torn by the kill
        handle.write('{"id": "sample-4", "conversations": [{"from"')

    calls.update(n=0, fail_at=None)
    last = generate_responses(config, target=pair.target, processor=pair.processor)
    assert last.complete and last.already_done + last.generated == 5

    records = shard_records(out)
    assert sorted(answered) == [0, 1, 2, 3, 4]  # no record was answered (and written) twice
    assert [record["source_index"] for record in records] == [0, 1, 2, 3, 4]
    assert sorted(path.name for path in out.iterdir()) == [MANIFEST_NAME, "shard-00000.jsonl", "shard-00001.jsonl",
                                                          "shard-00002.jsonl"]
    # The same answers as one uninterrupted run (batched greedy = unbatched, so batch boundaries do not matter).
    reference = tiny_config(tmp_path, family, data_json, image_root,
                            settings + ["distill.batch_size=1", f"data.distilled_dir={tmp_path / 'reference'}"])
    generate_responses(reference, target=pair.target, processor=pair.processor)
    assert records == shard_records(tmp_path / "reference")
    # LLaVA format: the target's answer replaces the gpt turn, and phase 2 can read it back with its images.
    original = json.loads(data_json.read_text())
    assert records[0]["conversations"][0] == original[0]["conversations"][0]
    assert records[0]["image"] == "0.png" and records[0]["conversations"][1]["from"] == "gpt"
    dataset, report = load_distilled_records(out)
    assert report.kept == len(dataset) == 5 and all(Path(path).is_file() for path in dataset["image_path"])


def test_restart_with_other_settings_is_refused(tmp_path: Path) -> None:
    data_json, image_root = write_llava(tmp_path, 2)
    config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root, ["distill.max_new_tokens=2"])
    pair = build_pair("qwen2_5_vl")
    generate_responses(config, target=pair.target, processor=pair.processor, max_items=1)
    manifest = json.loads((Path(config.data.distilled_dir) / MANIFEST_NAME).read_text())
    assert manifest["target"] == "tiny:qwen2_5_vl" and manifest["generation"]["temperature"] == 0.0
    assert manifest["generation"]["max_new_tokens"] == 2 and manifest["num_records"] == 2
    sampled = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root,
                          ["distill.max_new_tokens=2", "distill.temperature=0.7"])
    with pytest.raises(DistillSettingsError, match="generation.temperature: existing 0.0, now 0.7"):
        generate_responses(sampled, target=pair.target, processor=pair.processor)
    # The batch size does not change the answers, so it may change between restarts.
    bigger_batches = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root,
                                 ["distill.max_new_tokens=2", "distill.batch_size=7"])
    assert generate_responses(bigger_batches, target=pair.target, processor=pair.processor).complete


def test_sampled_answers_are_reproducible(tmp_path: Path) -> None:
    data_json, image_root = write_llava(tmp_path, 3)
    pair = build_pair("qwen2_5_vl")
    outputs = []
    for name in ("a", "b"):
        config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root, [
            "distill.max_new_tokens=6", "distill.temperature=1.0", "distill.top_p=0.9", "distill.seed=3",
            f"data.distilled_dir={tmp_path / name}",
        ])
        generate_responses(config, target=pair.target, processor=pair.processor)
        outputs.append(shard_records(tmp_path / name))
    assert outputs[0] == outputs[1]


def test_all_turns_answers_every_question_first_turn_only_by_default(tmp_path: Path) -> None:
    data_json, image_root = write_llava(tmp_path, 2, multi_turn=True, text_only=1)
    pair = build_pair("gemma3")
    for all_turns, expected_turns in ((False, 2), (True, 4)):
        out = tmp_path / f"all_turns_{all_turns}"
        config = tiny_config(tmp_path, "gemma3", data_json, image_root, [
            "distill.max_new_tokens=3", f"distill.all_turns={str(all_turns).lower()}", f"data.distilled_dir={out}",
        ])
        generate_responses(config, target=pair.target, processor=pair.processor)
        records = shard_records(out)
        assert len(records) == 3  # the text-only prompt is answered too
        image_records = [record for record in records if "image" in record]
        assert [len(record["conversations"]) for record in image_records] == [expected_turns] * 2
        assert all(len(record["truncated"]) == expected_turns // 2 for record in image_records)
        questions = [t["value"] for t in image_records[0]["conversations"] if t["from"] == "human"]
        assert questions == ["<image>\nDescribe the image.", "What colour is the square?"][: expected_turns // 2]
        answers = [t["value"] for t in image_records[0]["conversations"] if t["from"] == "gpt"]
        assert "The square is blue." not in answers  # the dataset's answers are replaced


def test_missing_and_corrupt_images_are_skipped_and_reported_or_raise_when_strict(tmp_path: Path) -> None:
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": [turn("human", "<image>\nHi"), turn("gpt", "Hi.")]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [turn("human", "<image>\nHi"), turn("gpt", "Hi.")]},
    ]
    data_json, image_root = write_llava(tmp_path, 2, extra=bad)
    (image_root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    pair = build_pair("qwen2_5_vl")
    config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root, ["distill.max_new_tokens=2"])
    result = generate_responses(config, target=pair.target, processor=pair.processor)
    assert result.num_records == 2 and result.load_report.missing_images == ["missing"]
    assert result.load_report.corrupt_images == ["corrupt"]
    manifest = json.loads((Path(config.data.distilled_dir) / MANIFEST_NAME).read_text())
    assert manifest["source_report"] == {"total": 4, "kept": 2, "missing_images": 1, "corrupt_images": 1,
                                         "invalid_records": 0}
    assert [record["id"] for record in shard_records(Path(config.data.distilled_dir))] == ["sample-0", "sample-1"]
    strict = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root,
                         ["data.strict_images=true", f"data.distilled_dir={tmp_path / 'strict'}"])
    with pytest.raises(ImageError, match="missing"):
        generate_responses(strict, target=pair.target, processor=pair.processor)


def test_phase2_refuses_unfinished_distillation(tmp_path: Path) -> None:
    data_json, image_root = write_llava(tmp_path, 3)
    pair = build_pair("qwen2_5_vl")
    config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root,
                         ["distill.max_new_tokens=2", "distill.shard_size=2"])
    with pytest.raises(DistillIncompleteError, match="massv distill"):
        load_distilled_records(config.data.distilled_dir)
    generate_responses(config, target=pair.target, processor=pair.processor, max_items=2)
    with pytest.raises(DistillIncompleteError, match="1 of 2 shards missing"):
        load_distilled_records(config.data.distilled_dir)
    generate_responses(config, target=pair.target, processor=pair.processor)
    dataset, _ = load_distilled_records(config.data.distilled_dir)
    reference, _ = load_llava_records(data_json, image_root)
    assert dataset["id"] == reference["id"] and dataset["image_path"] == reference["image_path"]
