"""MASSV: multimodal drafters for lossless speculative decoding of vision-language models."""

from massv.drafter import MultimodalDrafter, MultimodalDrafterConfig
from massv.families import SUPPORTED_FAMILIES, UnsupportedFamilyError, get_adapter
from massv.vocab import TokenizerMismatchError, check_tokenizer_compatibility

__version__ = "0.1.0"

__all__ = [
    "MultimodalDrafter",
    "MultimodalDrafterConfig",
    "SUPPORTED_FAMILIES",
    "TokenizerMismatchError",
    "UnsupportedFamilyError",
    "check_tokenizer_compatibility",
    "get_adapter",
]
