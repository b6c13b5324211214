"""Family adapters, chosen by the target's `config.model_type`.

Adding a family: write one module with a `FamilyAdapter` subclass and register it in `_ADAPTERS` below.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from massv.errors import MassvError
from massv.families.base import VISION_FEATURE_CHOICES, FamilyAdapter
from massv.families.gemma3 import Gemma3Adapter
from massv.families.qwen2_5_vl import Qwen2_5_VLAdapter

_ADAPTERS: dict[str, type[FamilyAdapter]] = {
    Qwen2_5_VLAdapter.model_type: Qwen2_5_VLAdapter,
    Gemma3Adapter.model_type: Gemma3Adapter,
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(sorted(_ADAPTERS))


class UnsupportedFamilyError(MassvError, ValueError):
    """The target VLM's architecture has no adapter; the message lists the ones that exist."""


def get_adapter(target_config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for a target config, so callers never branch on the family themselves."""
    model_type = getattr(target_config, "model_type", None)
    adapter_class = _ADAPTERS.get(model_type)
    if adapter_class is None:
        raise UnsupportedFamilyError(
            f"unsupported target VLM family {model_type!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}. "
            "To add one, subclass massv.families.base.FamilyAdapter in a new module and register it in "
            "massv/families/__init__.py."
        )
    return adapter_class(target_config)


__all__ = [
    "FamilyAdapter",
    "Gemma3Adapter",
    "Qwen2_5_VLAdapter",
    "SUPPORTED_FAMILIES",
    "UnsupportedFamilyError",
    "VISION_FEATURE_CHOICES",
    "get_adapter",
]
