"""MASSV: multimodal drafters for lossless speculative decoding of vision-language models.

Public names are imported lazily, so `import massv.pipelines.world` or `massv --help` does not pay for torch and
transformers until a model is actually needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MassvError": "massv.errors",
    "MultimodalDrafter": "massv.drafter",
    "MultimodalDrafterConfig": "massv.drafter",
    "SpeculativeGenerator": "massv.speculative",
    "SUPPORTED_FAMILIES": "massv.families",
    "UnsupportedFamilyError": "massv.families",
    "get_adapter": "massv.families",
    "TokenizerMismatchError": "massv.vocab",
    "check_tokenizer_compatibility": "massv.vocab",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'massv' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
