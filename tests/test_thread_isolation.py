"""The suite's thread-count fixture (tests/conftest.py): no test inherits another's torch thread count.

The tests run in file order: the second sees what the first left behind.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SUITE_THREADS

OTHER = SUITE_THREADS + 1


def test_a_test_may_change_the_thread_count() -> None:
    torch.set_num_threads(OTHER)
    assert torch.get_num_threads() == OTHER


def test_the_next_test_starts_on_the_suite_count_again() -> None:
    assert torch.get_num_threads() == SUITE_THREADS


@pytest.mark.torch_threads(OTHER)
def test_a_marker_asks_for_another_count() -> None:
    assert torch.get_num_threads() == OTHER
