"""`massv eval` end to end on saved tiny models: the world at an unseen seed and every benchmark format."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from massv import MultimodalDrafter
from massv.benchmarks import SUPPORTED_BENCHMARKS
from massv.evaluate import main as eval_main

BENCHMARK_DATA = Path(__file__).parent / "data" / "benchmarks"
FORMATS = [name for name in SUPPORTED_BENCHMARKS if name not in ("world", "llava")]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_pair):
    root = tmp_path_factory.mktemp(f"eval-{tiny_pair.target.config.model_type}")
    tiny_pair.target.save_pretrained(root / "target")
    tiny_pair.processor.save_pretrained(root / "target")
    drafter = MultimodalDrafter.from_target(tiny_pair.target, tiny_pair.drafter_lm, len(tiny_pair.tokenizer))
    drafter.save_pretrained(root / "drafter")
    tiny_pair.drafter_lm.save_pretrained(root / "text_lm")
    return root


def _run(saved_models, out, *extra):
    code = eval_main([
        "--target", str(saved_models / "target"), "--drafter", str(saved_models / "drafter"),
        "--out", str(out), "--max-new-tokens", "6", "--num-draft-tokens", "3", *extra,
    ])
    return code, json.loads((out / "summary.json").read_text()), (out / "samples.jsonl").read_text().splitlines()


def test_eval_on_world_with_unseen_seed(saved_models, tmp_path):
    code, summary, rows = _run(saved_models, tmp_path, "--benchmark", "world", "--world-seed", "90817", "--world-num", "3")
    assert code == 0
    assert summary["num_samples"] == 3 and len(rows) == 3
    assert summary["lossless_checked"] == 3 and summary["lossless_mismatches"] == 0
    assert 1.0 <= summary["mean_accepted_length"] <= 4.0
    assert all(json.loads(row)["identical_to_target"] for row in rows)


@pytest.mark.parametrize("benchmark_name", FORMATS)
def test_eval_on_each_benchmark_format(saved_models, tmp_path, benchmark_name, tiny_pair):
    if tiny_pair.target.config.model_type != "qwen2_5_vl":
        pytest.skip("loaders are family-independent; one family keeps the suite fast")
    code, summary, rows = _run(
        saved_models, tmp_path, "--benchmark", benchmark_name, "--data-root", str(BENCHMARK_DATA / benchmark_name),
        "--limit", "1", "--num-draft-tokens", "2",
    )
    assert code == 0 and summary["num_samples"] == 1 and summary["lossless_mismatches"] == 0
    assert json.loads(rows[0])["prompt"]


def test_eval_with_text_only_drafter_and_missing_benchmark_file(saved_models, tmp_path):
    code = eval_main([
        "--target", str(saved_models / "target"), "--drafter", str(saved_models / "text_lm"),
        "--benchmark", "world", "--world-seed", "4242", "--world-num", "2", "--out", str(tmp_path),
        "--max-new-tokens", "5",
    ])
    assert code == 0
    with pytest.raises(FileNotFoundError, match="testdev_balanced_questions.json"):
        eval_main([
            "--target", str(saved_models / "target"), "--drafter", str(saved_models / "drafter"),
            "--benchmark", "gqa", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
        ])


def test_auto_dtype_runs_half_precision_checkpoints_in_float32_on_the_cpu(saved_models, tmp_path, tiny_pair):
    from massv.loading import load_drafter, load_target

    half = tmp_path / "half_target"
    copy.deepcopy(tiny_pair.target).to(torch.float16).save_pretrained(half)  # the shared fixture stays float32
    tiny_pair.processor.save_pretrained(half)
    target, processor = load_target(str(half))  # dtype "auto", no device: stays on the CPU
    assert target.dtype == torch.float32
    text_lm = load_drafter(str(saved_models / "text_lm"), target, processor.tokenizer)
    assert text_lm.dtype == torch.float32
    explicit, _ = load_target(str(half), dtype="float16")  # an explicit dtype is respected
    assert explicit.dtype == torch.float16
