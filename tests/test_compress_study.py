"""The demo-world compression study: derived numbers and finding from the rows (fast), and the whole study in
quick mode on a minuscule world recipe (a deeper text LM, phases 1 + 2, every variant with and without recovery).
"""

from __future__ import annotations

import json

import pytest

from massv.pipelines.compression_study import (
    DENSE,
    JSON_NAME,
    MARKDOWN_NAME,
    STUDY_LM_MARKER,
    format_study_table,
    run_compression_study,
    study_finding,
    study_rows,
)
from massv.compress.table import CompressionRow
from massv.pipelines.world_models import WorldRecipe

DENSE_MACS = 1_000_000
# World models trained in seconds: what the study does with them is tested, not how well they answer.
TINY_RECIPE = WorldRecipe(
    vocab_size=320, tokenizer_samples=200, target_hidden_size=32, target_layers=1, target_heads=2,
    target_intermediate_size=64, vision_hidden_size=16, vision_depth=1, vision_steps=3, vision_batch_size=4,
    vision_warmup_steps=1, target_steps=3, target_batch_size=4, target_warmup_steps=1, text_hidden_size=32,
    text_layers=1, text_heads=2, text_intermediate_size=64, text_steps=3, text_batch_size=4, text_warmup_steps=1, eval_samples=2, max_new_tokens=8, cost_decode_steps=2,
)


def row(variant: str, recovered: bool, macs: int, mal: float, layers: int = 4) -> CompressionRow:
    return CompressionRow(variant, recovered, macs, macs / DENSE_MACS, mal, layers)


def rows_with(one_shot: dict[str, float], recovered: dict[str, float]) -> list[CompressionRow]:
    """Dense (1.0 M MACs), drop 1 layer (0.75 M), 50 % sparse (0.6 M): one-shot and recovered MALs given."""
    macs = {DENSE: (DENSE_MACS, 4), "drop 1 layer": (750_000, 3), "50 % sparse": (600_000, 4)}
    rows = []
    for name, (count, layers) in macs.items():
        rows.append(row(name, False, count, one_shot[name], layers))
        rows.append(row(name, True, count, recovered[name], layers))
    return rows


# ---- derived numbers and the finding (no models) -----------------------------------------------------------


def test_derived_numbers_per_gmac_saved_and_net_of_the_dense_control():
    rows = rows_with({DENSE: 3.0, "drop 1 layer": 2.0, "50 % sparse": 2.5},
                     {DENSE: 3.1, "drop 1 layer": 2.8, "50 % sparse": 2.7})
    items = {(item["variant"], item["recovered"]): item for item in study_rows(rows)}
    drop = items["drop 1 layer", True]
    assert drop["gmacs_saved"] == pytest.approx(250_000 / 1e9)
    assert drop["delta_mal_vs_dense"] == pytest.approx(-0.2)
    assert drop["mal_recovered"] == pytest.approx(0.8)
    assert drop["mal_recovered_net"] == pytest.approx(0.7)  # the dense control gained 0.1
    assert drop["mal_recovered_per_gmac_saved"] == pytest.approx(0.8 / 0.00025)  # 3,200 MAL per GMAC
    assert drop["mal_recovered_net_per_gmac_saved"] == pytest.approx(0.7 / 0.00025)
    assert drop["fraction_of_loss_recovered"] == pytest.approx(0.8)
    sparse = items["50 % sparse", True]
    assert sparse["mal_recovered_per_gmac_saved"] == pytest.approx(0.2 / 0.0004)  # 500 MAL per GMAC
    assert sparse["fraction_of_loss_recovered"] == pytest.approx(0.4)
    # One-shot rows and the dense rows have no "recovered" numbers; the dense recovered row saves nothing.
    assert items["drop 1 layer", False]["mal_recovered"] is None
    assert items[DENSE, True]["mal_recovered"] == pytest.approx(0.1)
    assert items[DENSE, True]["mal_recovered_per_gmac_saved"] is None

    table = format_study_table(rows)
    assert table.count("\n") == 1 + len(rows)
    assert "| drop 1 layer | self-distilled | 3 | 750,000 | 75 % | 2.80 | -0.20 | +0.80 | +3,200 |" in table
    assert "| 50 % sparse | self-distilled | 4 | 600,000 | 60 % | 2.70 | -0.30 | +0.20 | +500 |" in table
    assert "| dense | none | 4 | 1,000,000 | 100 % | 3.00 | +0.00 |  |  |" in table


def test_the_finding_follows_the_numbers():
    recovers = study_finding(rows_with({DENSE: 3.0, "drop 1 layer": 2.0, "50 % sparse": 2.5},
                                       {DENSE: 3.1, "drop 1 layer": 2.8, "50 % sparse": 2.7}), recovery_steps=100)
    assert "does recover MAL" in recovers and "(100 steps)" in recovers
    assert "2 of 2 variants lose more than 0.05 MAL" in recovers
    assert "60 % of the one-shot loss" in recovers  # mean of 80 % and 40 %
    assert "+1,850 MAL on average" in recovers  # mean of 3,200 and 500
    assert "most: drop 1 layer" in recovers
    assert "reach MAL 2.70 to 2.80 (the dense drafter after the same steps: 3.10)" in recovers
    assert "none comes within 0.05 MAL of the dense drafter, the closest is drop 1 layer" in recovers

    # The same gains, but the dense drafter gains as much from the same steps: not recovery, just training.
    training_alone = study_finding(rows_with({DENSE: 3.0, "drop 1 layer": 2.0, "50 % sparse": 2.5},
                                             {DENSE: 3.5, "drop 1 layer": 2.5, "50 % sparse": 3.0}))
    assert "does not measurably recover MAL" in training_alone
    assert "does recover" not in training_alone

    lowers = study_finding(rows_with({DENSE: 3.0, "drop 1 layer": 2.0, "50 % sparse": 2.5},
                                     {DENSE: 3.0, "drop 1 layer": 1.8, "50 % sparse": 2.2}))
    assert "it lowers it" in lowers

    harmless = study_finding(rows_with({DENSE: 3.0, "drop 1 layer": 2.98, "50 % sparse": 3.0},
                                       {DENSE: 3.0, "drop 1 layer": 3.0, "50 % sparse": 3.0}))
    assert "no variant loses more than 0.05 MAL" in harmless
    assert "the cheapest within 0.05 MAL of the dense drafter is 50 % sparse" in harmless


def test_rows_without_a_dense_baseline_are_rejected():
    with pytest.raises(ValueError, match="one-shot 'dense' row"):
        study_rows([row("drop 1 layer", False, 750_000, 2.0)])


# ---- the study end to end (quick mode, minuscule world models) ---------------------------------------------


def _tiny_world(tmp_path):
    """Minuscule world models (trained in seconds into a private cache), the demo's data and distilled answers."""
    from massv.benchmarks import load_benchmark
    from massv.pipelines.demo import DEFAULT_CONFIG, SIZES, demo_config
    from massv.train.distill import generate_responses, load_distilled_records
    from massv.train.llava_data import load_llava_records
    from massv.pipelines.world import write_world
    from massv.pipelines.world_models import load_world_models

    world_models = load_world_models(cache_dir=tmp_path / "cache", recipe=TINY_RECIPE, progress=False)
    out = tmp_path / "demo"
    world_dir = out / "world"
    write_world(world_dir, "pretrain", 8, 0)
    write_world(world_dir, "train", 8, 0)
    write_world(world_dir, "heldout", 2, 1)
    config = demo_config(DEFAULT_CONFIG, out, SIZES["quick"],
                          ["distill.max_new_tokens=8", f"data.distilled_dir={out / 'distilled'}"])
    pretrain, _ = load_llava_records(world_dir / "pretrain.jsonl", world_dir)
    train, _ = load_llava_records(world_dir / "train.jsonl", world_dir)
    generate_responses(config, target=world_models.target, processor=world_models.processor, records=train)
    distilled, _ = load_distilled_records(config.data.distilled_dir, world_dir, num_workers=0)
    return world_models, out, pretrain, distilled, load_benchmark("world", world_dir, split="heldout")


def _engine_mal(world_models, drafter_dir: str, heldout, num_draft_tokens: int, max_new_tokens: int) -> float:
    """MAL of a saved drafter measured as a user would: the engine's greedy decoding of every held-out prompt."""
    from massv import MultimodalDrafter, SpeculativeGenerator
    from massv.speculative import GenerationStats
    from massv.train.llava_data import load_image

    drafter = MultimodalDrafter.from_pretrained(drafter_dir, target=world_models.target).eval()
    generator = SpeculativeGenerator(world_models.target, drafter, world_models.processor)
    runs = [generator.generate(images=load_image(sample.image_path, sample.sample_id), prompt=sample.prompt,
                               max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens, temperature=0.0).stats
            for sample in heldout]
    return GenerationStats.merge(runs).mean_accepted_length


def test_quick_study_end_to_end_and_reused(tmp_path, monkeypatch):  # seconds: minuscule models, quick sizes
    world_models, out, pretrain, distilled, heldout = _tiny_world(tmp_path)
    study_dir = out / "compression"
    report = run_compression_study(world_models, study_dir, distilled, pretrain, heldout, quick=True, progress=False)

    rows = report["rows"]
    assert [(r["variant"], r["recovered"]) for r in rows] == [
        (name, recovered) for name in (DENSE, "drop 1 layer", "drop 2 layers", "50 % sparse", "70 % sparse", "2:4 sparse")
        for recovered in (False, True)]
    by_name = {(r["variant"], r["recovered"]): r for r in rows}
    assert by_name[DENSE, False]["num_layers"] == 4  # the deeper study LM, not the recipe's one layer
    assert by_name["drop 1 layer", False]["num_layers"] == 3 and by_name["drop 2 layers", True]["num_layers"] == 2
    dense_macs = by_name[DENSE, False]["macs_per_token"]
    assert dense_macs > by_name["drop 1 layer", False]["macs_per_token"] > by_name["drop 2 layers", False]["macs_per_token"]
    assert dense_macs > by_name["50 % sparse", False]["macs_per_token"] > by_name["70 % sparse", False]["macs_per_token"]
    # The dense row is the trained phase-2 drafter as saved, measured on the held-out prompts at the stated γ.
    settings = report["settings"]
    assert settings["num_draft_tokens"] == 5 and settings["heldout_samples"] == len(heldout)
    assert by_name[DENSE, False]["mean_accepted_length"] == pytest.approx(
        _engine_mal(world_models, settings["drafter"], heldout, 5, settings["max_new_tokens"]), abs=1e-9)
    for r in rows:
        one_shot = by_name[r["variant"], False]
        # Recovery keeps the sparsity masks: MACs do not change with recovery.
        assert r["macs_per_token"] == one_shot["macs_per_token"]
        # Derived numbers from the measured ones (MAL and MACs of the rows themselves).
        assert r["gmacs_saved"] == pytest.approx((dense_macs - r["macs_per_token"]) / 1e9)
        assert r["delta_mal_vs_dense"] == pytest.approx(r["mean_accepted_length"] - by_name[DENSE, False]["mean_accepted_length"])
        if r["recovered"]:
            gain = r["mean_accepted_length"] - one_shot["mean_accepted_length"]
            assert r["mal_recovered"] == pytest.approx(gain)
            if r["variant"] != DENSE:
                assert r["mal_recovered_per_gmac_saved"] == pytest.approx(gain / ((dense_macs - r["macs_per_token"]) / 1e9))
    assert report["finding"].startswith("The dense 4-layer MASSV drafter")
    assert json.loads((study_dir / JSON_NAME).read_text())["finding"] == report["finding"]
    markdown = (study_dir / MARKDOWN_NAME).read_text()
    assert "| 2:4 sparse | self-distilled |" in markdown and report["finding"] in markdown

    # A second run reuses the trained text LM and both phases (training anything fails), and measures the same rows.
    (marker,) = study_dir.glob(f"drafter-*/text_lm/{STUDY_LM_MARKER}")
    trained_at = marker.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a finished study stage must be reused, not retrained")

    monkeypatch.setattr("massv.pipelines.world_models.train_text_lm", no_training)
    monkeypatch.setattr("massv.train.train_phase", no_training)
    again = run_compression_study(world_models, study_dir, distilled, pretrain, heldout, quick=True, progress=False)
    assert marker.stat().st_mtime_ns == trained_at
    assert [r["mean_accepted_length"] for r in again["rows"]] == [r["mean_accepted_length"] for r in rows]
