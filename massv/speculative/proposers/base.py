"""The drafting seam: what a proposer is given, what it hands back, and the two calls the loop makes.

A proposer holds one request's drafter state (its KV cache, its view of the prompt). The loop calls
`propose(sequence, max_tokens)` for up to `max_tokens` candidates after the committed tokens, then, once the
target has judged them, `commit(num_accepted)` so the proposer can drop what was rejected. The loop never
asks which kind of drafter it holds; a registry (`massv.speculative.proposers`) picks the proposer class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from massv.families import FamilyAdapter
from massv.speculative.sampling import SamplingConfig
from massv.speculative.tree import DraftTree


class DrafterPairError(ValueError):
    """Target and drafter cannot work together (family, tokenizer, vocabulary or feature sizes differ)."""


class RandomStreams:
    """One seeded `torch.Generator` per device, so target and drafter may live on different devices."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed + len(self._generators))  # distinct streams per device
            self._generators[key] = generator
        return self._generators[key]


@dataclass
class DraftRequest:
    """Everything about one request a proposer may use, computed once by the engine."""

    target: PreTrainedModel
    adapter: FamilyAdapter
    prompt_ids: torch.Tensor  # (1, prompt_length), on the target's device
    image_inputs: dict[str, torch.Tensor]
    vision_features: dict[str, torch.Tensor]  # kind -> (num_image_tokens, dim), from one vision pass
    settings: SamplingConfig
    eos_token_ids: frozenset[int]
    replacement_id: int  # a valid id to feed the drafter in place of one past its embedding
    random: RandomStreams = field(default_factory=lambda: RandomStreams(None))
    new_positions: int = 0  # positions the request may add after the prompt (generated tokens and drafts)
    static_decoder: Any = None  # a StaticDecoder when the generator was built with compile_drafter=True
    # Adaptive chains (greedy): stop a block once the drafter's probability that all its drafts so far are right
    # (the product of its probabilities of its own guesses) falls below this.
    confidence_threshold: float | None = None
    target_tokenizer: Any = None  # the target's tokenizer (the processor's): a foreign-tokenizer drafter reads text

    @property
    def target_vocab_size(self) -> int:
        return self.adapter.target_vocab_size


class CommittedTokens:
    """The request's committed tokens (prompt + generated) in one preallocated device buffer.

    Appending writes in place, so no block rebuilds or copies the prefix; `generated` mirrors the new ids on
    the host (each was read back once anyway, to test for end-of-sequence).
    """

    def __init__(self, prompt_ids: torch.Tensor, capacity: int) -> None:
        self.prompt_length = prompt_ids.shape[1]
        self.ids = torch.empty(1, self.prompt_length + capacity, dtype=torch.long, device=prompt_ids.device)
        self.ids[:, : self.prompt_length] = prompt_ids
        self.length = self.prompt_length
        self.generated: list[int] = []

    def append(self, tokens: list[int], device_tokens: torch.Tensor | None = None) -> None:
        """Commit `tokens`; `device_tokens` (the same ids, already on the device) saves a host-to-device copy."""
        count = len(tokens)
        if device_tokens is not None:
            self.ids[0, self.length : self.length + count] = device_tokens[:count]
        else:
            for offset, token in enumerate(tokens):
                self.ids[0, self.length + offset] = token
        self.length += count
        self.generated.extend(tokens)

    def generated_ids(self, start: int = 0) -> torch.Tensor:
        """`(1, n)` view of generated tokens from `start` on (no copy)."""
        return self.ids[:, self.prompt_length + start : self.length]


@dataclass
class Proposal:
    """Candidate tokens after the committed ones, and (when sampling) the distributions they came from.

    The ids stay on the device: the acceptance rule reads them back with its verdict, in the block's one
    transfer, so a proposer reads back only the drafts it must test for end-of-sequence.
    """

    tokens: torch.Tensor  # (n,) long, on the target's device
    probs: torch.Tensor | None = None  # (n, target_vocab) q rows, zero outside the draftable ids; sampling only
    forwards: int = 0  # drafter forwards this proposal cost
    tree: DraftTree | None = None  # set for a tree of drafts (`tokens` in its node order), None for a chain

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def token_list(self) -> list[int]:
        """The ids on the host (a sync: for tests and tools, not the loop)."""
        return self.tokens.tolist()


class Proposer(ABC):
    """One request's drafting strategy. Subclasses register with `massv.speculative.proposers.register_proposer`."""

    name: ClassVar[str]

    @classmethod
    def check_pair(cls, drafter: nn.Module, target: PreTrainedModel, adapter: FamilyAdapter, tokenizer: Any) -> None:
        """Raise `DrafterPairError` if `drafter` cannot draft for `target` (called once, at construction)."""

    @classmethod
    def decoding_language_model(cls, drafter: nn.Module) -> PreTrainedModel | None:
        """The causal LM whose one-token steps this proposer runs, if it can run them on a `StaticDecoder`."""
        return None

    @classmethod
    def vision_features_needed(cls, drafter: nn.Module) -> tuple[str, ...]:
        """Kinds of vision features (besides the target's "projected") this drafter reads."""
        return ()

    @abstractmethod
    def prefill(self, sequence: CommittedTokens) -> int:
        """Feed the drafter its view of the prompt; returns the forwards spent."""

    @abstractmethod
    def propose(self, sequence: CommittedTokens, max_tokens: int) -> Proposal:
        """Up to `max_tokens` candidates after `sequence` (fewer when an end-of-sequence token is drafted)."""

    @abstractmethod
    def commit(self, num_accepted: int) -> None:
        """The target kept the first `num_accepted` candidates of the last proposal: drop the rest."""
