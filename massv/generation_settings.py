"""One source for how the target decodes: the same settings in distillation, evaluation and the engine.

The drafter is trained on the target's answers and then measured against the target's own decoding, so
both must decode the same way. A checkpoint's `generation_config.json` decides part of that (Qwen2.5-VL
ships `repetition_penalty=1.05`, `top_k=1`, `top_p=0.001`): whatever a caller leaves unset must be filled
exactly as `target.generate()` fills it, in every place, or distillation and evaluation drift apart.

    settings = resolve_generation_settings(target.generation_config, temperature=0.0, max_new_tokens=512)
    target.generate(**inputs, **settings.generate_kwargs())
    manifest["generation"] = settings.to_dict()

Order, as `generate()` applies it: the call's value, then the target's generation config, then Hugging
Face's global defaults (`GenerationConfig._get_default_generation_params()`: top_k 50, top_p 1.0,
repetition_penalty 1.0). Greedy decoding (`temperature == 0`) applies no warper, as `generate()` with
`do_sample=False` does not, so top_k and top_p are recorded as off (0 and 1.0) there: two greedy settings
that decode identically compare equal. The repetition penalty applies to greedy decoding too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

# Hugging Face's documented fallbacks, used when `GenerationConfig._get_default_generation_params` is absent.
# The engine resolves the extra warpers (min_p, typical_p, ε, η) from the same table.
_HF_FALLBACK_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "min_p": None,
                         "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


@dataclass(frozen=True)
class GenerationSettings:
    """Fully resolved decoding of the target: nothing left for a checkpoint's config to change."""

    temperature: float  # 0.0: greedy
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    repetition_penalty: float  # 1.0: off
    max_new_tokens: int

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict, for manifests and reports."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationSettings:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `target.generate()` that leave it nothing to take from the checkpoint.

        Greedy passes no warper (a warper with do_sample=False only makes `generate()` warn).
        """
        kwargs: dict[str, Any] = {"do_sample": not self.greedy, "max_new_tokens": self.max_new_tokens,
                                  "repetition_penalty": self.repetition_penalty}
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs


def hf_generation_defaults() -> dict[str, Any]:
    """The values `generate()` falls back to when neither the call nor the generation config sets them."""
    defaults = dict(_HF_FALLBACK_DEFAULTS)
    try:
        from transformers import GenerationConfig

        defaults.update({key: value for key, value in GenerationConfig._get_default_generation_params().items()
                         if key in defaults})
    except AttributeError:  # a transformers release without the helper: the documented defaults above
        pass
    return defaults


def fill_unset(generation_config: Any, **values: Any) -> dict[str, Any]:
    """Each value as `generate()` resolves it: the call's (not None), then `generation_config`'s (may be None),
    then Hugging Face's default. The one fill-in rule behind distillation, `massv eval` and the engine."""
    defaults = hf_generation_defaults()
    resolved = {}
    for name, value in values.items():
        if value is None and generation_config is not None:
            value = getattr(generation_config, name, None)
        resolved[name] = defaults[name] if value is None else value
    return resolved


def resolve_generation_settings(generation_config: Any, *, temperature: float | None = None,
                                top_k: int | None = None, top_p: float | None = None,
                                repetition_penalty: float | None = None,
                                max_new_tokens: int | None = None) -> GenerationSettings:
    """Fill every unset value as `target.generate()` would: call argument, then `generation_config`
    (the target's, may be None), then Hugging Face's defaults.

    `temperature=None` takes the generation config's decoding: its temperature when it samples
    (`do_sample=True`), greedy otherwise. `max_new_tokens` must come from the call or the config:
    `generate()` would otherwise stop at a total `max_length` of 20 tokens, prompt included.
    """
    if temperature is None:
        samples = bool(getattr(generation_config, "do_sample", False)) if generation_config is not None else False
        temperature = float(fill_unset(generation_config, temperature=None)["temperature"]) if samples else 0.0
    if max_new_tokens is None:
        max_new_tokens = getattr(generation_config, "max_new_tokens", None) if generation_config is not None else None
        if max_new_tokens is None:
            raise ValueError("max_new_tokens is set neither by the caller nor by the target's generation config; "
                             "generate() would stop at max_length=20 tokens including the prompt: set it")
    temperature = float(temperature)
    greedy = temperature == 0.0
    values = fill_unset(generation_config, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    return GenerationSettings(
        temperature=temperature,
        top_k=0 if greedy else int(values["top_k"]),
        top_p=1.0 if greedy else float(values["top_p"]),
        repetition_penalty=float(values["repetition_penalty"]),
        max_new_tokens=int(max_new_tokens),
    )


__all__ = ["GenerationSettings", "fill_unset", "hf_generation_defaults", "resolve_generation_settings"]
