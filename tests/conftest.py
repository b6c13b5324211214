"""Shared fixtures: tiny, randomly initialised real architectures of both supported families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from massv.tiny import TinyPair, build_tiny_pair

FAMILIES = ("qwen2_5_vl", "gemma3")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_pair(request: pytest.FixtureRequest) -> TinyPair:
    """A target VLM + drafter LM + processor; session-scoped, so tests must not modify the weights."""
    torch.set_num_threads(1)  # tiny models: one thread is several times faster than two on a busy 2-core box
    return build_tiny_pair(request.param, seed=0)


def random_image(seed: int, size: int = 64) -> Image.Image:
    """A noise image, so every image gives the vision encoder different features."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def prompt_inputs(pair: TinyPair, prompt: str, image: Image.Image | None) -> dict[str, torch.Tensor]:
    """Processor outputs for one user turn with (or without) an image, as a user of the target builds them."""
    from massv.families import get_adapter

    adapter = get_adapter(pair.target.config)
    messages = adapter.user_messages(prompt, num_images=0 if image is None else 1)
    text = pair.processor.apply_chat_template(messages, add_generation_prompt=True)
    images = None if image is None else [image]
    return dict(pair.processor(images=images, text=[text], return_tensors="pt"))
