"""Proposers: drafting strategies behind one seam, picked by a registry keyed on the drafter's type.

    register_proposer(MyDrafter)(MyProposer)   # a new kind of drafter: no edit to the loop
    proposer_class_for(drafter)                # the most specific registered class in the drafter's MRO
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from massv.drafter import MultimodalDrafter
from massv.speculative.proposers.base import (
    CommittedTokens,
    DraftRequest,
    DrafterPairError,
    Proposal,
    Proposer,
    RandomStreams,
)
from massv.speculative.proposers.cross_tokenizer import CrossTokenizerDrafter, CrossTokenizerProposer
from massv.speculative.proposers.language_model import CausalLMProposer, MultimodalProposer
from massv.speculative.proposers.static_decoder import StaticDecoder, StaticDecoderError
from massv.speculative.proposers.target_copy import TargetAsDrafter, TargetCopyProposer

_REGISTRY: dict[type, type[Proposer]] = {}


def register_proposer(drafter_type: type):
    """Class decorator: drafters of `drafter_type` (and its subclasses) draft through this proposer."""

    def register(proposer_class: type[Proposer]) -> type[Proposer]:
        _REGISTRY[drafter_type] = proposer_class
        return proposer_class

    return register


def proposer_class_for(drafter: nn.Module) -> type[Proposer]:
    """The proposer registered for the most specific class of `drafter`."""
    for klass in type(drafter).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    raise DrafterPairError(
        f"no proposer is registered for drafters of type {type(drafter).__name__}; use a MultimodalDrafter, a "
        "Hugging Face causal LM of the target's family, CrossTokenizerDrafter (a drafter with its own "
        "tokenizer), or TargetAsDrafter, or register one with "
        "massv.speculative.proposers.register_proposer"
    )


register_proposer(PreTrainedModel)(CausalLMProposer)
register_proposer(MultimodalDrafter)(MultimodalProposer)
register_proposer(TargetAsDrafter)(TargetCopyProposer)
register_proposer(CrossTokenizerDrafter)(CrossTokenizerProposer)

__all__ = [
    "CausalLMProposer",
    "CommittedTokens",
    "CrossTokenizerDrafter",
    "CrossTokenizerProposer",
    "DraftRequest",
    "DrafterPairError",
    "MultimodalProposer",
    "Proposal",
    "Proposer",
    "RandomStreams",
    "StaticDecoder",
    "StaticDecoderError",
    "TargetAsDrafter",
    "TargetCopyProposer",
    "proposer_class_for",
    "register_proposer",
]
