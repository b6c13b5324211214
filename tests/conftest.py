"""Shared fixtures: tiny, randomly initialised real architectures of both supported families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from massv.tiny import TinyPair, build_tiny_pair

FAMILIES = ("qwen2_5_vl", "gemma3")
# Tiny models: one thread is several times faster than two on a busy 2-core box. Set at import too, so the
# module- and session-scoped fixtures that build and run models do so on the same count in any test order.
SUITE_THREADS = 1
SLOW_TEST_TIMEOUT_S = 3600  # tests marked slow (the full demo, training to convergence) outlast the 600 s default
_threads_outside_the_suite = torch.get_num_threads()
torch.set_num_threads(SUITE_THREADS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"torch_threads(n): run the test on n torch threads (default {SUITE_THREADS})")


def pytest_unconfigure(config: pytest.Config) -> None:
    torch.set_num_threads(_threads_outside_the_suite)  # pytest.main inside a larger process (mutmut) gets it back


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


@pytest.fixture(autouse=True)
def torch_threads(request: pytest.FixtureRequest):
    """Each test runs on the suite's thread count (or its `torch_threads(n)` marker's), and whatever count was
    set before it is back after it: a test or fixture that changes the count cannot change its neighbours'."""
    marker = request.node.get_closest_marker("torch_threads")
    before = torch.get_num_threads()
    torch.set_num_threads(marker.args[0] if marker else SUITE_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_pair(request: pytest.FixtureRequest) -> TinyPair:
    """A target VLM + drafter LM + processor; session-scoped, so tests must not modify the weights."""
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
