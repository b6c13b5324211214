"""The engine benchmark stays runnable and reports what it promises (the numbers themselves are measured
by running it; no speed threshold lives in a unit test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from massv.families import get_adapter


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "eval" / "bench_engine.py"
    spec = importlib.util.spec_from_file_location("bench_engine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_engine", None)


def test_bench_engine_smoke_tiny(bench, tmp_path) -> None:
    """One prompt, a few tokens, both temperatures: every row runs, greedy rows are lossless."""
    out = tmp_path / "bench.json"
    bench.main(["--num-prompts", "1", "--max-new-tokens", "7", "--cost-repeats", "2", "--temperatures", "0", "1",
                "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {(row["name"], row["temperature"]): row for row in result["rows"]}
    names = {"target", "engine-text", "hf-assisted-text", "engine-massv"}
    assert {name for name, _ in rows} == names and {t for _, t in rows} == {0.0, 1.0}
    assert all(row["error"] is None for row in rows.values())
    assert all(rows[(name, 0.0)]["identical_to_target"] for name in names - {"target"})
    assert all(rows[(name, 1.0)]["identical_to_target"] is None for name in names)  # draws are not compared
    for name in ("engine-text", "engine-massv"):
        row = rows[(name, 0.0)]
        assert row["cost_ratio"] > 0 and row["theoretical_speedup"] > 0 and row["new_tokens"] == 7
        assert "engine_overhead_ms_per_step" in row
    assert "tokens_per_second_over_hf_assisted" in rows[("engine-text", 0.0)]
    assert {(entry["name"], entry["temperature"]) for entry in result["medians"]} == set(rows)


def test_bench_engine_smoke_world(bench, tmp_path) -> None:
    """The shipped world models: held-out world prompts, the text LM against HF assisted generation."""
    out = tmp_path / "world.json"
    bench.main(["--models", "world", "--num-prompts", "1", "--max-new-tokens", "6", "--cost-repeats", "2",
                "--out", str(out)])
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["engine-text"]["identical_to_target"] and rows["hf-assisted-text"]["identical_to_target"]
    assert rows["engine-text"]["mean_accepted_length"] > 1.0  # the world's text LM agrees with its target


def test_theoretical_speedup_formula(bench) -> None:
    assert bench.theoretical_speedup(1.0, 4, 0.0) == 5.0  # a free, always-right drafter: γ + 1
    assert bench.theoretical_speedup(0.0, 4, 0.5) == pytest.approx(1 / 3)
    assert bench.theoretical_speedup(0.5, 2, 0.1, verify_ratio=1.5) == pytest.approx(1.75 / 1.7)


@pytest.mark.parametrize(("pair", "target_billions", "drafter_billions"),
                         [("real-qwen", 8.29, 0.494), ("real-gemma", 12.19, 1.00)])
def test_real_size_architectures_and_prompts(bench, pair, target_billions, drafter_billions) -> None:
    """The real-size mode builds the published architectures (on the meta device here: no memory) and a
    prompt whose image block matches the vision tower's output."""
    target, drafter = bench.build_real_size_pair(pair, device="meta")
    assert sum(p.numel() for p in target.parameters()) / 1e9 == pytest.approx(target_billions, abs=0.01)
    assert sum(p.numel() for p in drafter.parameters()) / 1e9 == pytest.approx(drafter_billions, abs=0.01)
    adapter = get_adapter(target.config)
    inputs = bench.synthetic_inputs(target, adapter, seed=0)
    assert inputs["input_ids"].device.type == "meta"
    assert inputs["input_ids"].shape[1] == 48 + 2 + 256  # text around (start, 256 image tokens, end)
    assert drafter.config.model_type in adapter.drafter_model_types
    assert torch.float32 != target.dtype  # bfloat16 by default, as on the GPU
