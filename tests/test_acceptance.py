"""The acceptance rules on hand-made tensors: argument checks, and seeded sampling that ignores the global RNG."""

from __future__ import annotations

import pytest
import torch

from massv.speculative import accept_sampled


def _block(num_drafts: int = 6, vocab: int = 9, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    target_probs = torch.softmax(torch.randn(num_drafts + 1, vocab, generator=generator), dim=-1)
    draft_probs = torch.softmax(torch.randn(num_drafts, vocab, generator=generator), dim=-1)
    drafts = torch.multinomial(draft_probs, 1, generator=generator).view(-1)
    return drafts, draft_probs, target_probs


@pytest.mark.parametrize(("draft_probs", "message"), [
    (None, r"draft distributions of shape None do not match 3 drafts over 9 ids"),
    (torch.full((2, 9), 1 / 9), r"of shape \(2, 9\) do not match 3 drafts over 9 ids"),
    (torch.full((3, 8), 1 / 8), r"of shape \(3, 8\) do not match 3 drafts over 9 ids"),
])
def test_sampled_rule_refuses_draft_distributions_of_the_wrong_shape(draft_probs, message) -> None:
    drafts, _, target_probs = _block(num_drafts=3)
    with pytest.raises(ValueError, match=message):
        accept_sampled(drafts, draft_probs, target_probs)


def test_sampled_rule_draws_only_from_its_generator() -> None:
    """A seeded request must not depend on whatever else used torch's global RNG in between."""
    verdicts = []
    for global_seed in (1, 2, 3):
        torch.manual_seed(global_seed)
        runs = [accept_sampled(*_block(seed=block), generator=torch.Generator().manual_seed(100 + block))
                for block in range(20)]
        verdicts.append(runs)
    assert verdicts[0] == verdicts[1] == verdicts[2]
    # and the verdicts do depend on the generator's seed (the rule really samples)
    other = [accept_sampled(*_block(seed=block), generator=torch.Generator().manual_seed(900 + block))
             for block in range(20)]
    assert other != verdicts[0]


def test_residual_distribution_normalises_each_row_on_its_own() -> None:
    from massv.speculative import residual_distribution

    generator = torch.Generator().manual_seed(3)
    target_probs = torch.softmax(torch.randn(3, 5, generator=generator), dim=-1)
    draft_probs = torch.softmax(torch.randn(3, 5, generator=generator), dim=-1)
    residual = residual_distribution(target_probs, draft_probs)
    expected = torch.clamp(target_probs - draft_probs, min=0)
    torch.testing.assert_close(residual, expected / expected.sum(dim=-1, keepdim=True))
