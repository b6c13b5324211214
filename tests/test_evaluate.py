"""`massv eval` end to end on saved tiny models: the world at an unseen seed, every benchmark format, bad images,
resuming, shards, the reports, and the mismatch rate."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from massv import MultimodalDrafter
from massv import evaluate as evaluate_module
from massv.benchmarks import SUPPORTED_BENCHMARKS
from massv.errors import InputError
from massv.evaluate import BadImageError, main as eval_main

BENCHMARK_DATA = Path(__file__).parent / "data" / "benchmarks"
FORMATS = [name for name in SUPPORTED_BENCHMARKS if name not in ("world", "llava")]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_pair):
    root = tmp_path_factory.mktemp(f"eval-{tiny_pair.target.config.model_type}")
    tiny_pair.target.save_pretrained(root / "target")
    tiny_pair.processor.save_pretrained(root / "target")
    torch.manual_seed(0)
    drafter = MultimodalDrafter.from_target(tiny_pair.target, copy.deepcopy(tiny_pair.drafter_lm), len(tiny_pair.tokenizer))
    drafter.save_pretrained(root / "drafter")
    tiny_pair.drafter_lm.save_pretrained(root / "text_lm")
    return root


@pytest.fixture()
def qwen_only(tiny_pair):
    if tiny_pair.target.config.model_type != "qwen2_5_vl":
        pytest.skip("the eval loop is family-independent; one family keeps the suite fast")


def _args(saved_models, out, *extra, drafter="drafter"):
    return ["--target", str(saved_models / "target"), "--drafter", str(saved_models / drafter), "--out", str(out),
            "--max-new-tokens", "6", "--num-draft-tokens", "3", "--device", "cpu", *extra]


def _run(saved_models, out, *extra):
    code = eval_main(_args(saved_models, out, *extra))
    return code, json.loads((out / "summary.json").read_text()), [json.loads(line) for line in
                                                                   (out / "samples.jsonl").read_text().splitlines()]


def _world(tmp_path: Path, num: int, seed: int) -> Path:
    from massv.pipelines.world import write_world

    return write_world(tmp_path / "world", "heldout", num, seed)


def _world_args(tmp_path: Path, num: int, seed: int) -> list[str]:
    """`massv eval` arguments for `num` held-out world scenes of `seed`, written under `tmp_path` first."""
    root = _world(tmp_path / f"world_{seed}_{num}", num, seed).parent
    return ["--benchmark", "world", "--data-root", str(root), "--split", "heldout"]


def test_eval_on_world_with_unseen_seed(saved_models, tmp_path):
    code, summary, rows = _run(saved_models, tmp_path, *_world_args(tmp_path, 3, 90817))
    assert code == 0
    assert summary["num_samples"] == 3 and len(rows) == 3
    assert summary["lossless_checked"] == 3 and summary["lossless_mismatches"] == 0
    assert all(row["identical_to_target"] for row in rows)
    # MAL recounted from the per-sample records (tokens emitted per verification step, pooled over samples).
    lengths = [length for row in rows for length in row["accepted_lengths"]]
    assert all(1 <= length <= 4 for length in lengths)  # γ = 3
    assert summary["mean_accepted_length"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-12)
    accepted = sum(row["accepted_drafts"][i] for row in rows for i in range(len(row["accepted_drafts"])))
    judged = sum(sum(row["judged_drafts"]) for row in rows)
    assert summary["acceptance_rate"] == pytest.approx(accepted / judged if judged else 0.0)
    report = (tmp_path / "summary.md").read_text()
    assert report.startswith("# massv eval: world") and f"| 3 | {summary['mean_accepted_length']:.3f} |" in report
    assert "3/3 identical (0.0% differ)" in report
    assert (tmp_path / "summary.png").stat().st_size > 5_000


@pytest.mark.parametrize("benchmark_name", FORMATS)
def test_eval_on_each_benchmark_format(saved_models, tmp_path, benchmark_name, qwen_only):
    code, summary, rows = _run(
        saved_models, tmp_path, "--benchmark", benchmark_name, "--data-root", str(BENCHMARK_DATA / benchmark_name),
        "--limit", "1", "--num-draft-tokens", "2",
    )
    assert code == 0 and summary["num_samples"] == 1 and summary["lossless_mismatches"] == 0
    assert rows[0]["prompt"]


def test_eval_with_text_only_drafter_and_missing_benchmark_file(saved_models, tmp_path):
    code = eval_main(_args(saved_models, tmp_path, *_world_args(tmp_path, 2, 4242),
                           drafter="text_lm"))
    assert code == 0
    with pytest.raises(FileNotFoundError, match="testdev_balanced_questions.json"):
        eval_main(_args(saved_models, tmp_path / "o", "--benchmark", "gqa", "--data-root", str(tmp_path / "nowhere")))


def test_auto_dtype_runs_half_precision_checkpoints_in_float32_on_the_cpu(saved_models, tmp_path, tiny_pair):
    from massv.loading import load_drafter, load_target

    half = tmp_path / "half_target"
    copy.deepcopy(tiny_pair.target).to(torch.float16).save_pretrained(half)  # the shared fixture stays float32
    tiny_pair.processor.save_pretrained(half)
    target, processor = load_target(str(half), device="cpu")  # dtype "auto" on the CPU
    assert target.dtype == torch.float32
    text_lm = load_drafter(str(saved_models / "text_lm"), target, processor.tokenizer)
    assert text_lm.dtype == torch.float32
    explicit, _ = load_target(str(half), dtype="float16", device="cpu")  # an explicit dtype is respected
    assert explicit.dtype == torch.float16


def test_a_corrupt_image_stops_with_one_line_then_skip_bad_images_resumes_and_counts_it(saved_models, tmp_path,
                                                                                       qwen_only, monkeypatch):
    data = _world(tmp_path, 4, seed=77)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    bad = data.parent / records[2]["image"]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated PNG
    out = tmp_path / "out"
    args = _args(saved_models, out, "--benchmark", str(data))
    with pytest.raises(BadImageError, match=rf"sample {records[2]['id']}: .*{bad.name}.*--skip-bad-images"):
        eval_main(args)
    done = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [row["sample_id"] for row in done] == [records[0]["id"], records[1]["id"]]  # kept, one line per sample

    measured = []
    original = evaluate_module._measure
    monkeypatch.setattr(evaluate_module, "_measure", lambda *a, **k: measured.append(a[3].sample_id) or original(*a, **k))
    code, summary, rows = _run(saved_models, out, "--benchmark", str(data), "--skip-bad-images")
    assert code == 0
    assert measured == [records[3]["id"]]  # the first two were not run again; the bad one was skipped
    assert summary["num_samples"] == 3 and summary["skipped_bad_images"] == 1
    assert [row["sample_id"] for row in rows] == [record["id"] for record in records]
    assert rows[2]["skipped"] == "bad_image" and "Truncated" in rows[2]["reason"]
    report = (out / "summary.md").read_text()
    assert f"## 1 sample(s) skipped for a bad image" in report and str(bad) in report


def test_a_missing_image_is_refused_before_any_model_loads_or_counted_with_the_flag(saved_models, tmp_path, qwen_only,
                                                                                    monkeypatch):
    data = _world(tmp_path, 3, seed=78)
    record = json.loads(data.read_text().splitlines()[1])
    (data.parent / record["image"]).unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("massv.loading.load_target", no_model)
    with pytest.raises(FileNotFoundError, match=rf"{record['id']}: image not found .*--skip-bad-images"):
        eval_main(_args(saved_models, tmp_path / "a", "--benchmark", str(data)))
    monkeypatch.undo()
    code, summary, rows = _run(saved_models, tmp_path / "b", "--benchmark", str(data), "--skip-bad-images")
    assert code == 0 and summary["num_samples"] == 2 and summary["skipped_bad_images"] == 1


def test_an_interrupted_run_resumes_and_other_settings_are_refused(saved_models, tmp_path, qwen_only, monkeypatch):
    out = tmp_path / "out"
    args = [*_world_args(tmp_path, 3, 515)]
    original, calls = evaluate_module._measure, []

    def interrupt_second(*a, **k):
        calls.append(a[3].sample_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(evaluate_module, "_measure", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        eval_main(_args(saved_models, out, *args))
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(evaluate_module, "_measure", lambda *a, **k: calls.append(a[3].sample_id) or original(*a, **k))
    code, summary, rows = _run(saved_models, out, *args)
    assert code == 0 and summary["num_samples"] == 3 and len(calls) == 4  # 1 done, 1 interrupted, 2 run on resume
    assert len({row["sample_id"] for row in rows}) == 3
    with pytest.raises(InputError, match=r"holds a massv eval run with other settings \(settings: .*--overwrite"):
        eval_main(_args(saved_models, out, *args, "--temperature", "1.0"))


def test_shards_merge_into_the_unsharded_run(saved_models, tmp_path, qwen_only):
    args = [*_world_args(tmp_path, 5, 616)]
    _, whole, whole_rows = _run(saved_models, tmp_path / "whole", *args)
    for index in range(2):
        assert eval_main(_args(saved_models, tmp_path / "sharded", *args, "--shard", f"{index}/2")) == 0
    first = [json.loads(line) for line in (tmp_path / "sharded" / "shard-0-of-2" / "samples.jsonl").read_text().splitlines()]
    assert [row["index"] for row in first] == [0, 2, 4]
    assert eval_main(["--merge", "--out", str(tmp_path / "sharded")]) == 0
    merged = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    merged_rows = [json.loads(line) for line in (tmp_path / "sharded" / "samples.jsonl").read_text().splitlines()]
    assert [row["sample_id"] for row in merged_rows] == [row["sample_id"] for row in whole_rows]
    assert merged["num_samples"] == 5 and merged["merged_shards"] == 2
    for key in ("mean_accepted_length", "acceptance_rate", "lossless_checked", "lossless_mismatches"):
        assert merged[key] == whole[key]  # greedy decoding: the same tokens whichever process ran them
    (tmp_path / "incomplete" / "shard-0-of-3").mkdir(parents=True)
    with pytest.raises(InputError, match=r"shard\(s\) shard-0-of-3, shard-1-of-3, shard-2-of-3 .* unfinished"):
        eval_main(["--merge", "--out", str(tmp_path / "incomplete")])


def test_greedy_mismatches_are_a_rate_not_a_crash(saved_models, tmp_path, qwen_only, monkeypatch):
    original = evaluate_module._target_generate
    calls = []

    def flip_first(target, inputs, *args):  # as if a bf16 near-tie had flipped the target's first token
        ids, seconds = original(target, inputs, *args)
        calls.append(1)
        return ([ids[0] + 1] + ids[1:] if len(calls) == 1 else ids), seconds

    monkeypatch.setattr(evaluate_module, "_target_generate", flip_first)
    args = [*_world_args(tmp_path, 4, 717)]
    code, summary, _ = _run(saved_models, tmp_path / "a", *args)
    assert code == 0  # reported, not a failure: half precision on a GPU flips near-ties
    assert summary["lossless_mismatches"] == 1 and summary["lossless_mismatch_rate"] == 0.25
    assert "3/4 identical (25.0% differ)" in (tmp_path / "a" / "summary.md").read_text()
    calls.clear()
    assert eval_main(_args(saved_models, tmp_path / "b", *args, "--max-mismatch-rate", "0.1")) == 1


def test_eval_reads_its_defaults_from_a_tiny_config(tmp_path, qwen_only):
    """`massv eval --config configs/tiny.yaml`: the target (tiny:qwen2_5_vl) and the eval: section come from it."""
    from massv.tiny import build_tiny_pair

    pair = build_tiny_pair("qwen2_5_vl", seed=0)
    torch.manual_seed(0)
    drafter = MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer))
    drafter.save_pretrained(tmp_path / "phase2" / "final")
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    code = eval_main(["--config", str(config), "--override", f"phase2.output_dir={tmp_path / 'phase2'}",
                      "eval.max_new_tokens=5", "--out", str(tmp_path / "out"), "--device", "cpu",
                      "--record-in-model-card"])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["target"] == "tiny:qwen2_5_vl" and summary["benchmark"] == "world"
    assert summary["settings"]["max_new_tokens"] == 5 and summary["num_samples"] == 2
    card = (tmp_path / "phase2" / "final" / "README.md").read_text()
    assert f"| world | 5 | 0 | 5 | 2 | {summary['mean_accepted_length']:.2f} |" in card


def test_both_sides_decode_with_the_same_resolved_settings(tiny_pair, tmp_path, qwen_only, monkeypatch):
    """At T > 0 the baseline `target.generate` and the engine sample one distribution: the settings the engine
    resolves (call, then the target's generation config, then HF's defaults) are the ones the baseline gets,
    in full, so a checkpoint's `top_k` or `repetition_penalty` reaches both sides or neither."""
    from massv.benchmarks import load_benchmark
    from massv.evaluate import EvalSettings, evaluate_samples

    target = copy.deepcopy(tiny_pair.target)
    target.generation_config.top_k = 3  # a checkpoint's own choice, not HF's default of 50
    target.generation_config.repetition_penalty = 1.3
    recorded: list[dict] = []
    original_generate = target.generate

    def recording_generate(*args, **kwargs):
        recorded.append({key: value for key, value in kwargs.items() if key not in ("input_ids", "attention_mask",
                                                                                     "pixel_values", "image_grid_thw")})
        return original_generate(*args, **kwargs)

    monkeypatch.setattr(target, "generate", recording_generate)
    samples = load_benchmark("world", _world(tmp_path, 2, seed=4242))
    drafter = copy.deepcopy(tiny_pair.drafter_lm)
    _, sampled_rows = evaluate_samples(target, drafter, tiny_pair.processor, samples,
                                       EvalSettings(num_draft_tokens=3, temperature=0.7, max_new_tokens=5, seed=1))
    assert len(recorded) == 2
    for call, row in zip(recorded, sampled_rows):
        assert call["do_sample"] is True and call["temperature"] == 0.7
        assert call["top_k"] == 3 == row["decoding"]["top_k"]  # the generation config's value on both sides
        assert call["top_p"] == 1.0 and call["repetition_penalty"] == 1.3 == row["decoding"]["repetition_penalty"]
    recorded.clear()
    _, greedy_rows = evaluate_samples(target, drafter, tiny_pair.processor, samples,
                                      EvalSettings(num_draft_tokens=3, temperature=0.0, max_new_tokens=5))
    assert [call["do_sample"] for call in recorded] == [False, False]
    assert all(call["repetition_penalty"] == 1.3 for call in recorded)  # the penalty applies greedily too
    assert all(row["identical_to_target"] for row in greedy_rows)  # and the engine applied it the same way


@pytest.mark.parametrize("strategy", ["tree", "adaptive"])
def test_eval_strategy_flag_reaches_the_engine(saved_models, tmp_path, qwen_only, strategy):
    """`massv eval --strategy` drafts trees / adaptive chains, still lossless, and records the choice."""
    code, summary, rows = _run(saved_models, tmp_path, *_world_args(tmp_path, 2, 90817), "--strategy", strategy,
                               "--tree-size", "5", "--tree-depth", "3")
    assert code == 0
    assert summary["lossless_checked"] == 2 and summary["lossless_mismatches"] == 0
    assert summary["settings"]["strategy"] == strategy
    assert f"strategy = {strategy}" in (tmp_path / "summary.md").read_text()
    if strategy == "tree":  # 5 nodes per block, at most depth 3: up to 4 tokens per target forward
        assert all(1 <= length <= 4 for row in rows for length in row["accepted_lengths"])
