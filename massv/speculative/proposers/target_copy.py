"""The target drafting for itself: a perfectly agreeing drafter that shows the machinery's ceiling."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from massv.families import FamilyAdapter
from massv.speculative.proposers.base import CommittedTokens, DraftRequest, Proposal, Proposer
from massv.speculative.sampling import ScoreProcessor, TokenHistory, probs_from_scores, sample
from massv.speculative.target import TargetVerifier


class TargetAsDrafter(nn.Module):
    """The target model used as its own drafter.

    It agrees with every greedy verification by construction (up to float rounding between one-token and
    multi-token forwards), so MAL → γ + 1: the ceiling of the speculative machinery, for tests and benchmarks.
    """

    def __init__(self, target: PreTrainedModel) -> None:
        super().__init__()
        self.target = target


class TargetCopyProposer(Proposer):
    """Drafts with a second KV cache over the target itself (family positions, the shared image features)."""

    name = "target-copy"

    @classmethod
    def check_pair(cls, drafter: nn.Module, target: PreTrainedModel, adapter: FamilyAdapter, tokenizer: Any) -> None:
        if drafter.target is not target:
            raise ValueError("TargetAsDrafter must wrap the same target model the generator verifies with")

    def __init__(self, drafter: TargetAsDrafter, request: DraftRequest) -> None:
        self.request = request
        self.session = TargetVerifier(drafter.target, request.adapter)
        self.device = drafter.target.device
        self.processor = ScoreProcessor(request.settings, self.device)
        self.generator = request.random.on(self.device)
        self.vocab_size = request.target_vocab_size
        self.history_length = 0
        self.history = TokenHistory(self.vocab_size, self.device) if request.settings.uses_history else None
        self.last_proposed = 0

    def prefill(self, sequence: CommittedTokens) -> int:
        self.session.prefill(self.request.prompt_ids, self.request.image_inputs,
                             self.request.vision_features.get("projected"))
        return 1

    def propose(self, sequence: CommittedTokens, max_tokens: int) -> Proposal:
        pending = sequence.ids[:, self.session.length : sequence.length]
        if self.history is not None:
            self.history.add(sequence.ids[0, self.history_length : sequence.length])
            self.history_length = sequence.length
            block_history = self.history.copy()
        tokens = []
        probs = None if self.request.settings.greedy else torch.zeros(max_tokens, self.vocab_size, device=self.device)
        for index in range(max_tokens):
            logits = self.session.verify(pending)[-1:].float()
            scores = self.processor(logits, None if self.history is None else block_history.seen.unsqueeze(0))
            if probs is None:
                token = scores.argmax(dim=-1)
            else:
                q = probs_from_scores(scores)
                token = sample(q, self.generator)
                probs[index] = q[0]
            tokens.append(token)
            if index == max_tokens - 1 or int(token) in self.request.eos_token_ids:  # one sync per draft
                break
            if self.history is not None:
                block_history.add(token)
            pending = token.view(1, 1)
        self.last_proposed = len(tokens)
        return Proposal(torch.cat(tokens), None if probs is None else probs[: len(tokens)], forwards=len(tokens))

    def commit(self, num_accepted: int) -> None:
        fed_drafts = max(self.last_proposed - 1, 0)
        self.session.rollback(fed_drafts - min(num_accepted, fed_drafts))
