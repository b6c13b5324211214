"""`massv demo --quick`: the main job end to end, at a tiny size, on the shipped world models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from massv.pipelines.demo import DRAFTERS, main
from massv.pipelines.world_models import ASSETS_DIR, WorldRecipe, stored_recipe_hash


def test_shipped_world_models_match_the_default_recipe():
    # Otherwise the demo (and this test) would silently retrain the target for ~25 minutes.
    assert stored_recipe_hash(ASSETS_DIR) == WorldRecipe().hash()


def _rows(out, name, temperature):
    path = out / "samples" / f"{name}_T{temperature}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_demo_end_to_end_and_reuses_only_unchanged_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == set(DRAFTERS)
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out  # the demo says where its report went
    for name, by_temperature in report["results"].items():
        assert set(by_temperature) == {"T=0", "T=1"}
        for temperature in ("0", "1"):
            summary = by_temperature[f"T={temperature}"]
            rows = _rows(out, name, temperature)
            assert summary["num_samples"] == len(rows) == report["sizes"]["heldout"]
            # MAL recounted from the per-sample records: tokens emitted per verification step, over all steps.
            lengths = [length for row in rows for length in row["accepted_lengths"]]
            assert all(1 <= length <= 6 for length in lengths)  # γ = 5: at most 5 drafts + the target's token
            assert summary["mean_accepted_length"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-12)
            if temperature == "0":
                assert summary["lossless_mismatches"] == sum(not row["identical_to_target"] for row in rows) == 0
    # (d) under each strategy: four greedy rows checked against the target's own output on every prompt.
    strategies = report["strategies"]
    assert set(strategies) == {"T=0", "T=1"}
    assert [row["strategy"] for row in strategies["T=0"]] == ["chain", "adaptive", "tree", "tree"]
    assert [row["tree_width"] for row in strategies["T=0"][2:]] == [1, 3]  # the default and an EAGLE-2-wide tree
    heldout = report["sizes"]["heldout"]
    for row in strategies["T=0"]:
        assert row["requests"] == row["identical"] == heldout
        assert row["tokens_per_target_forward"] >= 1.0 and row["tokens_per_second"] > 0
    assert all(row["identical"] is None and row["requests"] == heldout for row in strategies["T=1"])
    assert "| tree (default) | 0 |" in (out / "report.md").read_text()
    assert report["lossless"]["checked"] == 4 * heldout + 4 * heldout
    assert report["lossless"]["mismatches"] == 0
    assert (out / "report.md").read_text().startswith("# MASSV demo report")
    assert (out / "report.png").stat().st_size > 10_000
    assert not any(stage["reused"] for stage in report["stages"].values())
    # One drafter per temperature: phase 2 on the target's greedy answers (T = 0), and a drafter on as many
    # answers it sampled at T = 1 with their own seed (T = 1).
    sizes = report["sizes"]
    assert sizes["sampled_answers"] == 1 and report["seeds"] == {"train": 0, "heldout": 1}
    manifests = {stage: json.loads((out / "distilled" / report["stages"][stage]["key"] / "manifest.json").read_text())
                 for stage in ("distill", "distill_sampled_1")}
    assert manifests["distill"]["generation"]["temperature"] == 0.0
    assert manifests["distill_sampled_1"]["generation"]["temperature"] == 1.0
    assert manifests["distill"]["seed"] != manifests["distill_sampled_1"]["seed"]
    greedy_answers, sampled_answers = ([json.loads(line)["conversations"][1]["value"]
                                        for shard in sorted((out / "distilled" / report["stages"][stage]["key"]).glob("shard-*.jsonl"))
                                        for line in shard.read_text().splitlines()] for stage in manifests)
    assert len(greedy_answers) == len(sampled_answers) == sizes["train"] and greedy_answers != sampled_answers
    for stage, directory in (("phase2", "phase2"), ("phase2_sampled", "phase2_sampled")):
        prepared = next((out / directory / report["stages"][stage]["key"] / "preprocessed").glob("*/preprocess.json"))
        assert json.loads(prepared.read_text())["num_records"] == sizes["train"]
    assert set(report["massv_drafters"]) == {"T=0", "T=1"} and "sampled at T = 1" in report["massv_drafters"]["T=1"]
    sampled_card = (out / "phase2_sampled" / report["stages"]["phase2_sampled"]["key"] / "final" / "README.md").read_text()
    sampled_mal = report["results"]["massv"]["T=1"]["mean_accepted_length"]
    assert f"| world (held-out) | 5 | 1 | 24 | 3 | {sampled_mal:.2f} |" in sampled_card
    ratios = report["mal_ratio_massv_vs_text_only"]
    for temperature in ("T=0", "T=1"):
        assert ratios[temperature] == pytest.approx(report["results"]["massv"][temperature]["mean_accepted_length"]
                                                    / report["results"]["text_only"][temperature]["mean_accepted_length"])
    card = (out / "phase2" / report["stages"]["phase2"]["key"] / "final" / "README.md").read_text()
    greedy_mal = report["results"]["massv"]["T=0"]["mean_accepted_length"]
    assert f"| world (held-out) | 5 | 0 | 24 | 3 | {greedy_mal:.2f} |" in card  # the drafter's model card has its MAL
    # The world images are written at the size the target was trained on: any other size is resampled by the
    # processor, and a blurred scene is not what the target's vision tower learned to parse.
    with Image.open(next((out / "world" / "images").glob("heldout_*.png"))) as image:
        assert image.size == (WorldRecipe().image_size,) * 2

    # A changed phase-2 setting retrains phase 2 and baseline (b), which read it, and reuses phase 1 and the
    # target's answers, which do not: never the old drafter's numbers under the new setting's name.
    assert main(["--quick", "--out", str(out), "--override", "phase2.learning_rate=5e-4"]) == 0
    second = json.loads((out / "report.json").read_text())
    assert {stage: value["reused"] for stage, value in second["stages"].items()} == {
        "phase1": True, "distill": True, "distill_sampled_1": True, "phase2": False, "text_only_tuned": False,
        "phase2_sampled": False}  # it reads the phase2 section too
    assert second["stages"]["phase1"]["key"] == report["stages"]["phase1"]["key"]
    assert second["stages"]["phase2"]["key"] != report["stages"]["phase2"]["key"]
    resolved = yaml.safe_load((out / "phase2" / second["stages"]["phase2"]["key"] / "resolved_config.yaml").read_text())
    assert resolved["phase2"]["learning_rate"] == 5e-4



def test_stage_keys_change_for_a_stage_and_the_stages_that_read_it():
    from massv.pipelines.demo import DEFAULT_CONFIG, SIZES, demo_config, stage_keys

    def keys(*overrides):
        config = demo_config(DEFAULT_CONFIG, Path("/tmp/out"), SIZES["quick"], list(overrides))
        return stage_keys(config, "world-hash", SIZES["quick"], seed=0)

    base = keys()
    changed = {
        "phase1.learning_rate=1e-3": {"phase1", "phase2", "phase2_sampled"},
        # the sampled pass is at 1.0 anyway; the T = 1 drafter starts from phase 2 (SIZES: sampled_start)
        "distill.temperature=1.0": {"distill", "phase2", "text_only_tuned", "phase2_sampled"},
        "distill.max_new_tokens=10": {"distill", "distill_sampled_1", "phase2", "text_only_tuned", "phase2_sampled"},
        "distill.seed=5": {"distill", "distill_sampled_1", "phase2", "text_only_tuned", "phase2_sampled"},
        "phase2.learning_rate=5e-4": {"phase2", "text_only_tuned", "phase2_sampled"},
        "model.projector_layers=3": {"phase1", "phase2", "text_only_tuned", "phase2_sampled"},  # answers stay valid
        "model.torch_dtype=bfloat16": {"phase1", "distill", "distill_sampled_1", "phase2", "text_only_tuned",
                                       "phase2_sampled"},
    }
    for override, stages in changed.items():
        new = keys(override)
        assert {stage for stage in base if new[stage] != base[stage]} == stages, override
    # Where the outputs go is not what they are: other output paths keep every key.
    assert keys("phase1.output_dir=/elsewhere", "data.distilled_dir=/x") == base
    other_world = stage_keys(demo_config(DEFAULT_CONFIG, Path("/tmp/out"), SIZES["quick"], []), "other", SIZES["quick"], 0)
    assert all(other_world[stage] != base[stage] for stage in base)


def test_sampled_answer_passes_are_stages_of_their_own():
    from massv.pipelines.demo import DEFAULT_CONFIG, SAMPLED_TEMPERATURE, SIZES, answer_passes, demo_config, stage_keys

    config = demo_config(DEFAULT_CONFIG, Path("/tmp/out"), SIZES["quick"], [])
    greedy_only = {**SIZES["quick"], "sampled_answers": 0}
    two = {**SIZES["quick"], "sampled_answers": 2}
    passes = answer_passes(config, two)
    assert [settings["temperature"] for settings in passes] == [0.0, SAMPLED_TEMPERATURE, SAMPLED_TEMPERATURE]
    assert len({settings["seed"] for settings in passes}) == 3  # two sampled passes are two different samples
    keys = {count: stage_keys(config, "world-hash", size, seed=0)
            for count, size in ((0, greedy_only), (1, SIZES["quick"]), (2, two))}
    assert set(keys[0]) == {"phase1", "distill", "phase2", "text_only_tuned"}  # one drafter for both temperatures
    assert set(keys[2]) - set(keys[0]) == {"distill_sampled_1", "distill_sampled_2", "phase2_sampled"}
    for stage in ("distill", "phase2", "text_only_tuned"):  # the greedy side is the same whatever is sampled
        assert keys[0][stage] == keys[1][stage] == keys[2][stage]
    assert keys[1]["distill_sampled_1"] == keys[2]["distill_sampled_1"]
    assert keys[1]["phase2_sampled"] != keys[2]["phase2_sampled"]  # it reads one more set of answers
    longer = stage_keys(config, "world-hash", {**SIZES["quick"], "sampled_steps": 20}, seed=0)
    other_start = "phase1" if SIZES["quick"]["sampled_start"] == "phase2" else "phase2"
    other = stage_keys(config, "world-hash", {**SIZES["quick"], "sampled_start": other_start}, seed=0)
    assert len({keys[1]["phase2_sampled"], longer["phase2_sampled"], other["phase2_sampled"]}) == 3


def test_demo_builds_the_drafter_its_config_describes(tmp_path, monkeypatch):
    """`model.vision_feature` and the projector settings reach the drafter the demo trains (they are part of
    the stage keys; a drafter built with defaults instead would be reported under the wrong settings)."""
    import massv.pipelines.demo as demo

    class Stop(Exception):
        pass

    built = {}

    def capture(config, phase, target, drafter, *args, **kwargs):
        built["drafter"] = drafter
        raise Stop

    monkeypatch.setattr(demo, "train_or_load", capture)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path, quick=True, overrides=["model.vision_feature=pre_merger", "model.projector_layers=3"])
    config = built["drafter"].config
    assert config.vision_feature == "pre_merger" and config.projector_layers == 3
    assert config.vision_feature_dim == built["drafter"].adapter.feature_dim("pre_merger")


def test_demo_phase1_is_the_same_whatever_ran_before(tmp_path, monkeypatch):
    """Two demos with one config train the same phase-1 drafter, also when the global random generator went
    through other work in between (it did: the projector was drawn from it unseeded, and fresh-clone demos with
    one config ended 0.1-0.2 MAL apart)."""
    import torch
    from safetensors.torch import load_file

    import massv.pipelines.demo as demo

    class Stop(Exception):
        pass

    real = demo.train_or_load

    def phase1_only(config, phase, *args, **kwargs):
        real(config, phase, *args, **kwargs)
        raise Stop

    monkeypatch.setattr(demo, "train_or_load", phase1_only)
    weights = []
    for run in range(2):
        torch.rand(17 + run)  # other work on the global generator
        with pytest.raises(Stop):
            demo.run_demo(tmp_path / f"run{run}", quick=True)
        (path,) = (tmp_path / f"run{run}" / "phase1").glob("*/final/projector.safetensors")
        weights.append(load_file(str(path)))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
