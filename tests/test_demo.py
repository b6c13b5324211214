"""`massv demo --quick`: the main job end to end, at a tiny size, on the shipped world models."""

from __future__ import annotations

import json

from PIL import Image

from massv.demo import DRAFTERS, main
from massv.world_models import ASSETS_DIR, WorldRecipe, stored_recipe_hash


def test_shipped_world_models_match_the_default_recipe():
    # Otherwise the demo (and this test) would silently retrain the target for ~25 minutes.
    assert stored_recipe_hash(ASSETS_DIR) == WorldRecipe().hash()


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == set(DRAFTERS)
    for by_temperature in report["results"].values():
        assert set(by_temperature) == {"T=0", "T=1"}
        for summary in by_temperature.values():
            assert summary["num_samples"] == report["sizes"]["heldout"]
            assert 1.0 <= summary["mean_accepted_length"] <= 6.0  # γ = 5: at most 5 drafts + 1 bonus
    assert report["lossless"]["checked"] == 4 * report["sizes"]["heldout"]
    assert report["lossless"]["mismatches"] == 0
    assert (out / "report.md").read_text().startswith("# MASSV demo report")
    assert (out / "report.png").stat().st_size > 10_000
    # The world images are written at the size the target was trained on: any other size is resampled by the
    # processor, and a blurred scene is not what the target's vision tower learned to parse.
    with Image.open(next((out / "world" / "images").glob("heldout_*.png"))) as image:
        assert image.size == (WorldRecipe().image_size,) * 2
    # A second run reuses every trained stage instead of training again.
    assert main(["--quick", "--out", str(out)]) == 0
    second = json.loads((out / "report.json").read_text())
    assert second["stage_seconds"]["phase1"] < 10 and second["stage_seconds"]["phase2"] < 10
