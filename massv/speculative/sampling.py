"""How the next token is chosen: the settings `generate()` resolves, and its logits processors as block ops.

The engine scores a whole block (the drafts plus the position after them) in one target forward, so every
processor runs on all rows at once. Warpers (temperature, top-k, top-p, min-p, typical, ε, η) are
row-independent: Hugging Face's own classes run on the block as a batch. The repetition penalty depends on
each row's prefix; `TokenHistory` keeps the set of tokens seen as a presence mask, and row i of a block
sees the history plus drafts[:i], exactly the tokens `generate()` would have seen at that position.

Settings that `generate()` applies but the engine cannot reproduce are refused (`UnsupportedSettingError`):
an output that silently differs from `target.generate` is the one failure a lossless engine must not have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from massv.generation_settings import fill_unset

# Generation-config fields `target.generate()` would act on that the engine does not reproduce. Each is
# refused when set (in the call or the target's generation config), with the value that disables it.
UNSUPPORTED_SETTINGS: dict[str, Any] = {
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "min_new_tokens": None, "min_length": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "stop_strings": None, "max_time": None, "guidance_scale": None,
    "watermarking_config": None, "top_h": None, "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None,
    "remove_invalid_values": False, "prompt_lookup_num_tokens": None, "assistant_model": None,
}


class UnsupportedSettingError(ValueError):
    """A generation setting `target.generate()` applies that the engine cannot apply losslessly."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; `temperature == 0` means greedy (argmax), as `do_sample=False`.

    `top_k=0`, `top_p=1`, `min_p=None`, `typical_p=1`, `epsilon_cutoff=0`, `eta_cutoff=0` disable the
    corresponding warper. Warpers act only when sampling (as in `generate()`); the repetition penalty acts
    in both modes. `SpeculativeGenerator.resolve_settings` fills unset values as `generate()` does.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_history(self) -> bool:
        """Whether a row's scores depend on the tokens before it (so the engine must track them)."""
        return self.repetition_penalty != 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        """The `target.generate()` arguments that decode under exactly these settings (the baseline side of
        any comparison), every value explicit so the generation config cannot change it."""
        if self.greedy:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty, "min_p": self.min_p, "typical_p": self.typical_p,
                "epsilon_cutoff": self.epsilon_cutoff, "eta_cutoff": self.eta_cutoff}

    def warpers(self, device: torch.device | str = "cpu") -> LogitsProcessorList:
        """The sampling warpers `generate()` builds for these settings, in its order; empty when greedy."""
        warpers = LogitsProcessorList()
        if self.greedy:
            return warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            warpers.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        if self.min_p is not None:
            warpers.append(MinPLogitsWarper(min_p=self.min_p, min_tokens_to_keep=1))
        if self.typical_p < 1.0:
            warpers.append(TypicalLogitsWarper(mass=self.typical_p, min_tokens_to_keep=1))
        if 0.0 < self.epsilon_cutoff < 1.0:
            warpers.append(EpsilonLogitsWarper(epsilon=self.epsilon_cutoff, min_tokens_to_keep=1))
        if 0.0 < self.eta_cutoff < 1.0:
            warpers.append(EtaLogitsWarper(epsilon=self.eta_cutoff, min_tokens_to_keep=1, device=device))
        return warpers


def resolve_sampling_config(generation_config: GenerationConfig | None, temperature: float,
                            **explicit: Any) -> SamplingConfig:
    """Fill unset (None) settings as `generate()` does: the call, then the generation config, then HF's defaults.

    Also refuses any setting of `UNSUPPORTED_SETTINGS` that is active in `explicit` or the generation config.
    """
    if temperature is None:
        raise ValueError("temperature must be a number: 0 for greedy decoding, > 0 to sample (got None)")
    names = [item.name for item in fields(SamplingConfig) if item.name != "temperature"]
    unknown = sorted(set(explicit) - set(names))
    if unknown:
        raise TypeError(f"unknown sampling setting(s) {unknown}; supported: {names}")
    check_supported_settings(generation_config)
    values = fill_unset(generation_config, **{name: explicit.get(name) for name in names})
    casts = {"top_k": int, "top_p": float, "repetition_penalty": float, "typical_p": float,
             "epsilon_cutoff": float, "eta_cutoff": float}
    values = {name: casts[name](value) if name in casts and value is not None else value for name, value in values.items()}
    return SamplingConfig(temperature=float(temperature), **values)


def check_supported_settings(generation_config: GenerationConfig | None, **call_settings: Any) -> None:
    """Raise `UnsupportedSettingError` naming every active setting the engine would silently ignore."""
    active = {}
    for name, disabled in UNSUPPORTED_SETTINGS.items():
        value = call_settings.get(name, getattr(generation_config, name, None) if generation_config else None)
        if value is not None and value != disabled and value != []:
            active[name] = value
    if active:
        listing = ", ".join(f"{name}={value!r}" for name, value in active.items())
        raise UnsupportedSettingError(
            f"the target's generation settings include {listing}, which target.generate() applies but the "
            "speculative engine does not, so the outputs would differ. Unset them on the target first "
            "(e.g. target.generation_config.no_repeat_ngram_size = 0) and compare with target.generate "
            "under the same settings."
        )


class TokenHistory:
    """The tokens a sequence holds so far, as a presence mask over the vocabulary (for the repetition penalty).

    Set semantics are all `RepetitionPenaltyLogitsProcessor` needs: it gathers scores at the prefix's ids
    and scatters them back, so a token seen twice is penalised once. Ids past the vocabulary land in one
    spare slot, so updates never need a host-side bounds check.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self._seen = torch.zeros(vocab_size + 1, dtype=torch.bool, device=device)

    @property
    def seen(self) -> torch.Tensor:
        """`(vocab,)` bool: which ids occurred."""
        return self._seen[: self.vocab_size]

    def add(self, token_ids: torch.Tensor) -> None:
        """Mark `token_ids` (any shape) as seen."""
        ids = token_ids.reshape(-1).to(self._seen.device).clamp(max=self.vocab_size)
        self._seen.index_fill_(0, ids, True)

    def copy(self) -> TokenHistory:
        clone = TokenHistory(self.vocab_size, self._seen.device)
        clone._seen.copy_(self._seen)
        return clone

    def rows_with(self, drafts: torch.Tensor) -> torch.Tensor:
        """`(len(drafts) + 1, vocab)` masks: row i is the history plus drafts[:i] (no host sync)."""
        rows = self._seen.unsqueeze(0).repeat(drafts.shape[0] + 1, 1)
        ids = drafts.reshape(-1).to(rows.device).clamp(max=self.vocab_size)
        for index in range(ids.shape[0]):
            rows[index + 1 :].index_fill_(1, ids[index : index + 1], True)
        return rows[:, : self.vocab_size]

    def rows_for_tree(self, drafts: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
        """`(n + 1, vocab)` masks for a draft tree: row i is the history plus the drafts on the path to node i.

        `drafts: (n,)` the nodes' ids, `ancestors: (n + 1, n + 1)` (`DraftTree.ancestors`, node 0 the root).
        """
        rows = self._seen.unsqueeze(0).repeat(drafts.shape[0] + 1, 1)
        row_index, node_index = ancestors[:, 1:].to(rows.device).nonzero(as_tuple=True)
        ids = drafts.reshape(-1).to(rows.device).clamp(max=self.vocab_size)
        rows[row_index, ids[node_index]] = True
        return rows[:, : self.vocab_size]


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's repetition penalty on `scores: (rows, vocab)` with per-row `seen` masks of the same shape.

    Scores of seen tokens are divided by `penalty` when positive and multiplied when negative, as
    `RepetitionPenaltyLogitsProcessor` does (the test suite compares the two on random prefixes).
    """
    width = min(scores.shape[-1], seen.shape[-1])
    head = scores[..., :width]
    penalised = torch.where(head < 0, head * penalty, head / penalty)
    scores = scores.clone()
    scores[..., :width] = torch.where(seen[..., :width], penalised, head)
    return scores


class ScoreProcessor:
    """The processors `generate()` applies for one `SamplingConfig`, run on whole blocks of rows."""

    def __init__(self, settings: SamplingConfig, device: torch.device) -> None:
        self.settings = settings
        self.warpers = settings.warpers(device)
        self._dummy_ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # warpers ignore input_ids

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Scores for `logits: (rows, vocab)`; `seen: (rows, vocab)` masks when the penalty is on."""
        scores = logits.float()
        if self.settings.repetition_penalty != 1.0:
            if seen is None:
                raise ValueError("the repetition penalty needs each row's token history")
            scores = apply_repetition_penalty(scores, seen, self.settings.repetition_penalty)
        if len(self.warpers):
            scores = self.warpers(self._dummy_ids.expand(scores.shape[0], 1), scores)
        return scores


def probs_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """softmax over warped scores (-inf entries get probability 0), in float32 as generate() does."""
    return torch.softmax(scores.float(), dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs: (..., vocab)` with generate()'s call (torch.multinomial); stays on device."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, num_samples=1, generator=generator).reshape(probs.shape[:-1])
