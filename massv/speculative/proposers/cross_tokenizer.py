"""A drafter with its own tokenizer (another family): it drafts in its tokens, the target verifies in its own.

Opt-in: wrap the drafter with its tokenizer, `CrossTokenizerDrafter(drafter, drafter_tokenizer)`; a bare
drafter of another family is refused (`DrafterPairError`), because its ids are not the target's.

Each block:
  1. the committed target tokens become the drafter's view through text (`TokenBridge`): the prompt once,
     the answer so far re-encoded each block; the drafter's KV cache is cropped to the longest prefix it
     shares with that view (the accepted text, re-tokenized), and only the rest is fed;
  2. the drafter drafts its own tokens greedily, from one token back: the accepted text's last drafter token
     is re-spelled by the first draft (token healing: the target's token boundary is often inside one of
     the drafter's tokens, a fragment its training text never ended on);
  3. the drafted text becomes target candidates, aligned with the committed tail so merges across the
     boundary come out as the target's tokens; drafting stops once there are more than γ of them.
The target verifies the candidates as any proposal, so greedy output equals `target.generate` whatever the
drafter says.

Sampling (T > 0) needs q, the drafter's distribution over the *target's* tokens, which text drafted in other
tokens does not have (one target token may be drafted as three). So when sampling, the drafter drafts only
tokens of the shared vocabulary (`token_bridge.shared_vocabulary`: drafter tokens whose text is exactly one
target token), one target token per draft: q is its renormalised distribution there, mapped onto the target
ids, and standard speculative sampling keeps the target's distribution exactly (the vocabulary-intersection
variant of universal speculative decoding). The context still reaches the drafter through text.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from massv.drafter import MultimodalDrafter
from massv.families import FamilyAdapter
from massv.speculative.proposers.base import CommittedTokens, DraftRequest, DrafterPairError, Proposal, Proposer
from massv.speculative.proposers.token_bridge import (
    DEFAULT_WINDOW,
    TokenBridge,
    common_prefix_length,
    shared_vocabulary,
    token_strings,
)
from massv.speculative.sampling import ScoreProcessor, UnsupportedSettingError, probs_from_scores, sample
from massv.speculative.target import new_rollback_cache

logger = logging.getLogger(__name__)


class CrossTokenizerDrafter(nn.Module):
    """A drafter (a Hugging Face causal LM, or a `MultimodalDrafter` trained on its own tokenizer's ids) and
    the tokenizer it reads and writes. A `MultimodalDrafter`'s `config.image_token_id` must be an id of
    `tokenizer` (its own image placeholder), as `massv.train.retokenize.cross_tokenizer_drafter` builds it."""

    def __init__(self, drafter: nn.Module, tokenizer: Any, eos_token_ids: list[int] | None = None,
                 window: int = DEFAULT_WINDOW, drafts_per_candidate: float = 2.0, heal: bool = True) -> None:
        """`drafts_per_candidate`: at most this many of its own tokens drafted per target candidate asked for
        (a finer tokenizer needs several for one target token, a coarser one fewer: drafting stops early).
        `heal`: greedy drafts start one drafter token back, re-spelling it (see `CrossTokenizerProposer._heal`)."""
        super().__init__()
        if drafts_per_candidate <= 0:
            raise ValueError(f"drafts_per_candidate must be > 0, got {drafts_per_candidate}")
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.window = window
        self.drafts_per_candidate = drafts_per_candidate
        self.heal = heal
        self._token_texts: list[str] | None = None
        self.last_stats: RetokenizationStats | None = None
        self._shared_vocabularies: dict[tuple[int, int, int], tuple[list[int], list[int]]] = {}
        if eos_token_ids is None:
            eos_token_ids = _declared_eos(self.language_model, tokenizer)
        self.eos_token_ids = frozenset(int(token) for token in eos_token_ids)

    @property
    def multimodal(self) -> bool:
        return isinstance(self.drafter, MultimodalDrafter)

    @property
    def language_model(self) -> PreTrainedModel:
        return self.drafter.language_model if self.multimodal else self.drafter

    @property
    def image_placeholder_id(self) -> int | None:
        return int(self.drafter.config.image_token_id) if self.multimodal else None

    def shared_vocabulary(self, bridge: TokenBridge, drafter_vocab_size: int, target_vocab_size: int
                          ) -> tuple[list[int], list[int]]:
        """`token_bridge.shared_vocabulary`, computed once per target tokenizer (a pass over the vocabulary)."""
        key = (id(bridge.target_tokenizer), drafter_vocab_size, target_vocab_size)
        if key not in self._shared_vocabularies:
            self._shared_vocabularies[key] = shared_vocabulary(bridge, drafter_vocab_size, target_vocab_size)
            logger.info("the drafter's and the target's tokenizers share %d tokens (sampling drafts only these)",
                        len(self._shared_vocabularies[key][0]))
        return self._shared_vocabularies[key]

    def token_texts(self, vocab_size: int) -> list[str]:
        """Each drafter id's text (inside a text), computed once."""
        if self._token_texts is None or len(self._token_texts) != vocab_size:
            self._token_texts = token_strings(self.tokenizer, range(vocab_size))
        return self._token_texts

    def draft_budget(self, max_candidates: int) -> int:
        """The most drafter tokens one block may draft for `max_candidates` target candidates."""
        return max(1, math.ceil(max_candidates * self.drafts_per_candidate))

    @property
    def draftable_vocab_size(self) -> int:
        """Ids it may draft: its tokenizer's, never the embedding's padding rows."""
        rows = int(self.language_model.get_output_embeddings().weight.shape[0])
        return min(rows, len(self.tokenizer))


def _declared_eos(language_model: nn.Module, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(language_model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids |= {int(value)} if isinstance(value, int) else {int(token) for token in value}
    return sorted(ids)


@dataclass
class RetokenizationStats:
    """What the conversion did over one request (tests read it; a report may too)."""

    proposals: int = 0
    drafter_tokens: int = 0  # drafted in the drafter's tokens
    target_tokens: int = 0  # candidates handed to the target
    boundary_merges: int = 0  # drafted text merged with the committed tail: the committed tokens stood
    view_rewrites: int = 0  # re-tokenizing the accepted text changed drafter tokens already in its cache
    cache_rebuilds: int = 0  # ... further back than a sliding-window cache can crop: re-fed from the view
    healed: int = 0  # blocks drafted from one drafter token back (token healing)


class CrossTokenizerProposer(Proposer):
    """Drafts with a foreign-tokenizer drafter, text-only or MASSV (projected target features at its own
    image placeholders): through text when greedy, from the shared vocabulary when sampling."""

    name = "cross-tokenizer"

    @classmethod
    def check_pair(cls, drafter: nn.Module, target: PreTrainedModel, adapter: FamilyAdapter, tokenizer: Any) -> None:
        if tokenizer is None:
            raise DrafterPairError("a CrossTokenizerDrafter drafts through text: the generator needs the target's "
                                   "processor (or tokenizer) to decode and encode the target's tokens")
        if drafter.tokenizer is None:
            raise DrafterPairError("CrossTokenizerDrafter needs the drafter's own tokenizer")
        if not drafter.multimodal:
            return
        config = drafter.drafter.config
        if config.family != adapter.model_type:
            raise DrafterPairError(
                f"the MASSV drafter's projector was trained on a {config.family!r} target's vision features, "
                f"not {adapter.model_type!r}")
        expected = adapter.feature_dim(config.vision_feature)
        if config.vision_feature_dim != expected:
            raise DrafterPairError(
                f"the MASSV drafter's projector reads {config.vision_feature} features of width "
                f"{config.vision_feature_dim}, but this target's vision encoder gives {expected}")
        placeholder = config.image_token_id
        if not 0 <= placeholder < len(drafter.tokenizer) or not config.cross_tokenizer:
            raise DrafterPairError(
                f"the MASSV drafter's image placeholder {placeholder} is not its own tokenizer's image token "
                "(config.cross_tokenizer is false): build it with massv.train.retokenize.cross_tokenizer_drafter")

    @classmethod
    def vision_features_needed(cls, drafter: nn.Module) -> tuple[str, ...]:
        return (drafter.drafter.config.vision_feature,) if drafter.multimodal else ()

    def __init__(self, drafter: CrossTokenizerDrafter, request: DraftRequest) -> None:
        self.wrapper = drafter
        self.model = drafter.drafter
        self.request = request
        self.language_model = drafter.language_model
        self.device = self.language_model.device
        self.bridge = TokenBridge(request.target_tokenizer, drafter.tokenizer, request.adapter,
                                  drafter.image_placeholder_id, drafter.window)
        self.prompt_view = self.bridge.prompt_view(request.prompt_ids[0].tolist())
        self.image_features = None
        if drafter.multimodal:
            self.image_features = request.vision_features.get(self.model.config.vision_feature)
            self._check_placeholders()
        self.draftable = drafter.draftable_vocab_size
        self.cache = new_rollback_cache(self.language_model)
        self.cached: list[int] = []  # drafter ids whose keys and values the cache holds
        self.answer_view: list[int] = []  # drafter ids of the committed answer, as of the last block
        self.view_length = len(self.prompt_view)  # prompt + answer view as of the last block
        self.stats = RetokenizationStats()
        drafter.last_stats = self.stats  # the latest request's conversion counts, for tests and reports
        self.shared: tuple[torch.Tensor, torch.Tensor] | None = None
        self._healing_masks: dict[str, torch.Tensor] = {}
        if not request.settings.greedy:
            self._prepare_sampling()

    def _prepare_sampling(self) -> None:
        """The shared vocabulary as index tensors, and the drafter's warpers (no repetition penalty: its
        history lives in target ids; q need only be what the drafts are sampled from, not p)."""
        drafter_ids, target_ids = self.wrapper.shared_vocabulary(self.bridge, self.draftable,
                                                                 self.request.target_vocab_size)
        if not drafter_ids:
            raise UnsupportedSettingError(
                f"temperature={self.request.settings.temperature:g}: the drafter's and the target's tokenizers "
                "share no token (same text, one token each), so no draft could be sampled losslessly; use "
                "temperature=0 (greedy drafts through text)")
        self.shared = (torch.tensor(drafter_ids, device=self.device),
                       torch.tensor(target_ids, device=self.request.target.device))
        self.shared_mask = torch.zeros(self.draftable, dtype=torch.bool, device=self.device)
        self.shared_mask[self.shared[0]] = True
        self.to_target = torch.full((self.draftable,), -1, dtype=torch.long, device=self.device)
        self.to_target[self.shared[0]] = self.shared[1].to(self.device)
        self.processor = ScoreProcessor(replace(self.request.settings, repetition_penalty=1.0), self.device)
        self.generator = self.request.random.on(self.device)

    def _check_placeholders(self) -> None:
        placeholders = self.prompt_view.count(self.wrapper.image_placeholder_id)
        rows = 0 if self.image_features is None else int(self.image_features.shape[0])
        if placeholders != rows:
            raise ValueError(f"the drafter's view has {placeholders} image placeholders for {rows} image feature "
                             "rows (does the prompt text contain the drafter's image token?)")

    # ---- the seam ----------------------------------------------------------------------------------------
    def prefill(self, sequence: CommittedTokens) -> int:
        self._feed(self.prompt_view)
        return 1

    def propose(self, sequence: CommittedTokens, max_tokens: int) -> Proposal:
        # 1. The accepted text, re-tokenized in the drafter's tokens; the cache keeps what it shares with it.
        committed = sequence.generated
        text = self.bridge.target_text(committed)
        self.answer_view = self.bridge.drafter_ids(text)
        if self.shared is not None:
            return self._propose_sampled(self._catch_up(self.prompt_view + self.answer_view), max_tokens)
        healed = self._heal(text)
        logits = self._catch_up(self.prompt_view + self.answer_view)
        # 2. Draft in the drafter's tokens (greedy: the argmax of its own ids) until the drafted text makes more
        #    than `max_tokens` target tokens (so the last one kept is complete), or the budget runs out.
        #    3. Each time, the drafted text -> target candidates, aligned with the committed tail.
        drafts: list[int] = []
        candidates: list[int] = []
        boundary_merge = False
        budget = self.wrapper.draft_budget(max_tokens)
        for index in range(budget):
            scores = logits[: self.draftable]
            if index == 0 and healed:  # the first draft must re-spell the backed-off text
                scores = scores.masked_fill(~self._healing_mask(healed), float("-inf"))
            token = int(scores.argmax())  # one host sync per draft
            drafts.append(token)
            drafted = self.bridge.drafted_text(self.answer_view, drafts)
            if not drafted.startswith(healed):  # decoding in context spelled it otherwise: draft nothing
                break
            converted = self.bridge.candidates(committed, drafted[len(healed):])
            candidates, boundary_merge = self._verifiable(converted.target_ids), converted.boundary_merge
            if token in self.wrapper.eos_token_ids or len(candidates) > max_tokens or index == budget - 1 \
                    or len(candidates) < len(converted.target_ids):
                break
            logits = self._feed([token])
        candidates = candidates[:max_tokens]
        self.stats.proposals += 1
        self.stats.drafter_tokens += len(drafts)
        self.stats.target_tokens += len(candidates)
        self.stats.boundary_merges += int(boundary_merge)
        tokens = torch.tensor(candidates, dtype=torch.long, device=self.request.target.device)
        return Proposal(tokens, None, forwards=len(drafts))

    def _heal(self, text: str) -> str:
        """Back off the answer's last drafter token (token healing); returns the text it spelled.

        Why: the accepted text ends where the *target's* token ended, often inside one of the drafter's tokens
        ("There are" -> "There ar" + "e", where its training text had "There ar" + "e four large"). Drafting
        from one token earlier, with the first draft constrained to spell the backed-off text, lets the drafter
        continue with the tokens it learned instead of from a fragment it never saw.
        """
        if not self.wrapper.heal or not self.answer_view:
            return ""
        suffix = self.bridge.drafted_text(self.answer_view[:-1], self.answer_view[-1:])
        if not suffix or not text.endswith(suffix):
            return ""
        self.answer_view = self.answer_view[:-1]
        self.stats.healed += 1
        return suffix

    def _healing_mask(self, prefix: str) -> torch.Tensor:
        """Drafter tokens whose text starts with `prefix` (cached per prefix: answers repeat their words)."""
        if prefix not in self._healing_masks:
            texts = self.wrapper.token_texts(self.draftable)
            mask = torch.zeros(self.draftable, dtype=torch.bool)
            mask[[index for index, piece in enumerate(texts) if piece.startswith(prefix)]] = True
            self._healing_masks[prefix] = mask.to(self.device)
        return self._healing_masks[prefix]

    def _propose_sampled(self, logits: torch.Tensor, max_tokens: int) -> Proposal:
        """Drafts from the shared vocabulary, one target token each, with their q rows over target ids."""
        target_device = self.request.target.device
        probs = torch.zeros(max_tokens, self.request.target_vocab_size, device=target_device)
        drafts: list[int] = []
        for index in range(max_tokens):
            scores = logits[: self.draftable].masked_fill(~self.shared_mask, float("-inf")).unsqueeze(0)
            q = probs_from_scores(self.processor(scores))  # (1, draftable), zero outside the shared vocabulary
            token = sample(q, self.generator)
            probs[index].index_add_(0, self.shared[1], q[0, self.shared[0]].to(target_device))
            drafts.append(int(token))  # one host sync per draft (the drafter reads it next)
            if index == max_tokens - 1 or drafts[-1] in self.wrapper.eos_token_ids:
                break
            logits = self._feed(drafts[-1:])
        self.stats.proposals += 1
        self.stats.drafter_tokens += len(drafts)
        self.stats.target_tokens += len(drafts)
        tokens = self.to_target[torch.tensor(drafts, device=self.device)].to(target_device)
        return Proposal(tokens, probs[: len(drafts)], forwards=len(drafts))

    def commit(self, num_accepted: int) -> None:
        # Nothing to drop yet: the next `propose` re-tokenizes the accepted text (it includes the target's own
        # token, unknown here) and crops the cache to what it shares with it.
        pass

    # ---- internals ---------------------------------------------------------------------------------------
    def _verifiable(self, target_ids: list[int]) -> list[int]:
        """Candidates up to the first the target could never emit here (an image token, a padding row)."""
        limit = self.request.target_vocab_size
        for index, token in enumerate(target_ids):
            if token >= limit or token in self.bridge.image_block_ids:
                return target_ids[:index]
        return target_ids

    def _catch_up(self, view: list[int]) -> torch.Tensor:
        """Crop the cache to its common prefix with `view`, feed the rest; the logits after `view`."""
        common = common_prefix_length(self.cached, view)
        if common < self.view_length:  # not only rejected drafts: the accepted text re-tokenized differently
            self.stats.view_rewrites += 1
        self.view_length = len(view)
        shared = min(common, len(view) - 1)  # re-feed >= 1 token for its logits
        self._crop(len(self.cached) - shared)
        return self._feed(view[shared:])

    def _feed(self, ids: list[int]) -> torch.Tensor:
        start = len(self.cached)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        kwargs: dict[str, Any] = {}
        if self.image_features is not None and start < len(self.prompt_view) \
                and self.wrapper.image_placeholder_id in ids:
            kwargs["image_features"] = self.image_features
        outputs = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache,
                             use_cache=True, logits_to_keep=1, **kwargs)
        self.cached.extend(ids)
        self._fed_in_last_block += len(ids)
        return outputs.logits[0, -1].float()

    _fed_in_last_block = 0  # tokens fed since the last crop (drafts, or the view's new tail)

    def _crop(self, num_tokens: int) -> None:
        if num_tokens > self._fed_in_last_block and _has_sliding_layers(self.cache):
            # A sliding-window layer that records its past can only remove what was added since its last crop:
            # rebuild the cache from the view instead (rare: only when the accepted text re-tokenizes earlier).
            self.stats.cache_rebuilds += 1
            kept = self.cached[: len(self.cached) - num_tokens]
            self.cache = new_rollback_cache(self.language_model)
            self.cached, self._fed_in_last_block = [], 0
            if kept:
                self._feed(kept)
            self.cache.crop(0)
            self._fed_in_last_block = 0
            return
        self.cache.crop(-num_tokens)
        del self.cached[len(self.cached) - num_tokens :]
        self._fed_in_last_block = 0


def _has_sliding_layers(cache: Any) -> bool:
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ()))
