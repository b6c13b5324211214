"""Small LLaVA-format data sets and tiny-model run configs shared by the training and distillation tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from massv.config import RunConfig, load_config
from tests.conftest import random_image

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"

CAPTIONS = [
    "There are two red circles at the top left and a small blue square in the center.",
    "A large yellow star is at the bottom right next to a purple cross.",
    "The orange circle is on the left side of the image.",
    "There are three green triangles.",
    "Yes, there are three circles and one square.",
    "The square is blue.",
    "A small blue square is in the center.",
    "There are two red circles.",
    "A purple cross is next to a yellow star.",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread is several times faster than two (no thread hand-offs).

    Autouse in every test module that imports it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def write_llava(root: Path, num_records: int, multi_turn: bool = False, text_only: int = 0,
                extra: list[dict[str, Any]] | None = None) -> tuple[Path, Path]:
    """`num_records` image records (+ `text_only` records without image) as LLaVA JSON; returns (json, image root)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for index in range(num_records):
        random_image(index).save(images / f"{index}.png")
        conversations = [turn("human", "<image>\nDescribe the image."), turn("gpt", CAPTIONS[index % len(CAPTIONS)])]
        if multi_turn:
            conversations += [turn("human", "What colour is the square?"), turn("gpt", "The square is blue.")]
        records.append({"id": f"sample-{index}", "image": f"{index}.png", "conversations": conversations})
    for index in range(text_only):
        records.append({"id": f"text-{index}", "conversations": [turn("human", "How many triangles are there?"),
                                                                 turn("gpt", "There are three.")]})
    records += extra or []
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path, images


def tiny_config(tmp_path: Path, family: str, data_json: Path | None = None, image_root: Path | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """configs/tiny.yaml for `family`, every path inside `tmp_path`."""
    base = [
        f"model.target=tiny:{family}",
        f"model.drafter_lm=tiny:{family}",
        f"data.distilled_dir={tmp_path / 'distilled'}",
        f"phase1.output_dir={tmp_path / 'phase1'}",
        f"phase2.output_dir={tmp_path / 'phase2'}",
    ]
    if data_json is not None:
        base += [f"data.pretrain_json={data_json}", f"data.pretrain_image_root={image_root}",
                 f"data.instruct_json={data_json}", f"data.instruct_image_root={image_root}"]
    return load_config(TINY_CONFIG, base + list(overrides or []))


def build_pair(family: str):
    """`build_tiny_pair(family)`: the tiny real-architecture pair the training tests use."""
    from massv.tiny import build_tiny_pair

    return build_tiny_pair(family)
