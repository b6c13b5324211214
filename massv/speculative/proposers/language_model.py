"""Chain drafting with a small causal LM: the text-only baseline and the MASSV multimodal drafter.

The drafter keeps its own KV cache over its own view of the request (a text-only LM sees the prompt with
the image block removed; MASSV sees the whole prompt, its image placeholders replaced by projected target
features). Each draft is one one-token forward; each costs exactly one host sync (reading the id back, to
stop after an end-of-sequence draft). The drafter's scores pass through the same processors as the
target's (repetition penalty on the drafter's view, the warpers when sampling), so q tracks p.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from massv.families import FamilyAdapter
from massv.speculative.proposers.base import CommittedTokens, DraftRequest, DrafterPairError, Proposal, Proposer
from massv.speculative.sampling import ScoreProcessor, TokenHistory, probs_from_scores, sample
from massv.speculative.target import new_rollback_cache


def _highest_text_id(tokenizer: Any, adapter: FamilyAdapter) -> int | None:
    """The largest id the tokenizer can produce outside the image block (what a text drafter must embed)."""
    if tokenizer is None:
        return None
    image_ids = set(adapter.image_block_token_ids)
    ids = [index for index in tokenizer.get_vocab().values() if index not in image_ids]
    return max(ids) if ids else None


def check_language_model(language_model: nn.Module, adapter: FamilyAdapter, tokenizer: Any, what: str) -> None:
    """The drafter LM is of the target's family and embeds every text id the target's tokenizer emits."""
    model_type = getattr(getattr(language_model, "config", None), "model_type", None)
    if model_type not in adapter.drafter_model_types:
        raise DrafterPairError(
            f"{what} is a {model_type!r} model, which does not share the tokenizer of {adapter.model_type!r} "
            f"targets (drafters must be one of {list(adapter.drafter_model_types)}): its drafts would be "
            "other tokens than the target verifies. Use a small LM of the target's family "
            "(Qwen2.5-VL: Qwen2.5-0.5B-Instruct; Gemma3: gemma-3-1b-it or gemma-3-270m), or opt in to drafting "
            "through text with massv.speculative.CrossTokenizerDrafter(drafter, drafter_tokenizer)."
        )
    rows = language_model.get_input_embeddings().num_embeddings
    highest = _highest_text_id(tokenizer, adapter)
    if highest is not None and highest >= rows:
        raise DrafterPairError(
            f"{what} embeds {rows} token ids but the target's tokenizer emits ids up to {highest}: the drafter "
            "cannot read the target's tokens. Pair the target with a drafter of the same tokenizer, or draft "
            "through text: massv.speculative.CrossTokenizerDrafter(drafter, drafter_tokenizer)."
        )
    drafter_eos = _id_set(getattr(getattr(language_model, "generation_config", None), "eos_token_id", None))
    target_eos = _id_set(getattr(tokenizer, "eos_token_id", None))
    if drafter_eos and target_eos and not drafter_eos & target_eos:
        raise DrafterPairError(
            f"{what} ends sequences with token ids {sorted(drafter_eos)}, the target's tokenizer with "
            f"{sorted(target_eos)}: they do not share a tokenizer. Wrap the drafter with its own tokenizer, "
            "massv.speculative.CrossTokenizerDrafter(drafter, drafter_tokenizer), to draft through text."
        )


def _id_set(ids: Any) -> set[int]:
    if ids is None:
        return set()
    return {int(ids)} if isinstance(ids, int) else {int(token) for token in ids}


class CausalLMProposer(Proposer):
    """A Hugging Face causal LM sharing the target's tokenizer, reading the prompt without its image block."""

    name = "text-lm"

    @classmethod
    def check_pair(cls, drafter: nn.Module, target: PreTrainedModel, adapter: FamilyAdapter, tokenizer: Any) -> None:
        check_language_model(drafter, adapter, tokenizer, "the text-only drafter")

    @classmethod
    def decoding_language_model(cls, drafter: nn.Module) -> PreTrainedModel:
        return drafter

    def __init__(self, drafter: nn.Module, request: DraftRequest) -> None:
        self.model = drafter
        self.request = request
        self.language_model = self._language_model()
        self.device = self.language_model.device
        self.prompt = self._view_prompt().to(self.device)  # (1, P)
        decoder = request.static_decoder
        # The static path when the generator has one and the request fits it; else the eager path.
        fits = decoder is not None and decoder.fits(self.prompt.shape[1] + request.new_positions)
        self.static = decoder if fits else None
        self.cache = self.static.start_request() if self.static is not None else new_rollback_cache(self.language_model)
        self.cached = 0  # drafter-view tokens in the cache
        self.embedding_rows = self.language_model.get_input_embeddings().num_embeddings
        self.draftable = min(self._draftable_vocab_size(), request.target_vocab_size)
        self.processor = ScoreProcessor(request.settings, self.device)
        self.generator = request.random.on(self.device)
        self.history = TokenHistory(self.draftable, self.device) if request.settings.uses_history else None
        self.history_generated = 0  # generated tokens already in `history`
        self.last_proposed = 0

    # ---- per kind --------------------------------------------------------------------------------------
    def _language_model(self) -> PreTrainedModel:
        return self.model

    def _view_prompt(self) -> torch.Tensor:
        return self.request.adapter.strip_image_tokens(self.request.prompt_ids)

    def _draftable_vocab_size(self) -> int:
        return int(self.model.config.get_text_config().vocab_size)

    def _prompt_kwargs(self) -> dict[str, Any]:
        return {}

    # ---- the seam --------------------------------------------------------------------------------------
    def prefill(self, sequence: CommittedTokens) -> int:
        self._forward(self.prompt, is_prompt=True)
        if self.history is not None:
            self.history.add(self.prompt)
        return 1

    def propose(self, sequence: CommittedTokens, max_tokens: int) -> Proposal:
        prompt_length = self.prompt.shape[1]
        pending = sequence.generated_ids(self.cached - prompt_length).to(self.device)
        pending = self._readable(pending)
        block_history = self._history_for_block(sequence)
        settings = self.request.settings
        tokens = []
        probs = None if settings.greedy else torch.zeros(
            max_tokens, self.request.target_vocab_size, device=self.request.target.device)
        threshold = self.request.confidence_threshold
        path_confidence = 1.0  # the drafter's probability that every draft of this block so far is right
        for index in range(max_tokens):
            logits = self._forward(pending)[:, : self.draftable]  # (1, draftable)
            seen = None if block_history is None else block_history.seen.unsqueeze(0)
            scores = self.processor(logits, seen)
            if settings.greedy:
                token = scores.argmax(dim=-1)
                q = torch.softmax(scores, dim=-1) if threshold is not None else None
            else:
                q = probs_from_scores(scores)
                token = sample(q, self.generator)
                probs[index, : self.draftable] = q[0].to(probs.device)
            tokens.append(token)
            if index == max_tokens - 1:
                break  # the last draft is read back with the verdict
            if threshold is None:
                if int(token) in self.request.eos_token_ids:  # the draft's one host sync
                    break  # nothing after an end-of-sequence draft could ever be emitted
            else:
                token_id, confidence = torch.stack([token[0].to(torch.float64), q[0, token[0]].double()]).tolist()
                path_confidence *= confidence  # (one sync, as above)
                if int(token_id) in self.request.eos_token_ids or path_confidence < threshold:
                    break  # the block is likely wrong by now: spend no more forwards on it
            if block_history is not None:
                block_history.add(token)
            pending = self._readable(token.view(1, 1))
        self.last_proposed = len(tokens)
        device_tokens = torch.cat(tokens).to(self.request.target.device)
        return Proposal(device_tokens, None if probs is None else probs[: len(tokens)], forwards=len(tokens))

    def commit(self, num_accepted: int) -> None:
        # The cache holds the drafts fed after the first: all but the last proposed. Keep the accepted ones.
        fed_drafts = max(self.last_proposed - 1, 0)
        self._crop(fed_drafts - min(num_accepted, fed_drafts))

    # ---- internals -------------------------------------------------------------------------------------
    def _readable(self, generated: torch.Tensor) -> torch.Tensor:
        """Generated ids the drafter can embed as text: ids past its embedding (padding rows a target may
        emit) and the image placeholder id (which would ask for image features) become `replacement_id`.
        Only the drafter's later guesses depend on them, and those are verified anyway."""
        unreadable = (generated >= self.embedding_rows) | (generated == self.request.adapter.image_token_id)
        return torch.where(unreadable, self.request.replacement_id, generated)

    def _history_for_block(self, sequence: CommittedTokens) -> TokenHistory | None:
        """The committed history plus this block's drafts, as a copy the drafts can be added to."""
        if self.history is None:
            return None
        self.history.add(sequence.generated_ids(self.history_generated))
        self.history_generated = len(sequence.generated)
        return self.history.copy()

    def _forward(self, input_ids: torch.Tensor, is_prompt: bool = False) -> torch.Tensor:
        num_new = input_ids.shape[1]
        if self.static is not None and num_new == 1 and not is_prompt:
            logits = self.static.step(input_ids, self.cached)  # the compiled one-token step
            self.cached += 1
            return logits
        position_ids = torch.arange(self.cached, self.cached + num_new, device=self.device).unsqueeze(0)
        cache_kwargs = ({"past_key_values": self.cache} if self.static is None
                        else self.static.prompt_kwargs(self.cached, num_new))
        # After the prompt the ids are text the LM can embed (`_readable`): the LM itself, without the MASSV
        # wrapper's image splice and its host syncs; logits past `draftable` are never read.
        model = self.model if is_prompt else self.language_model
        outputs = model(
            input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=1, **cache_kwargs,
            **(self._prompt_kwargs() if is_prompt else {}),
        )
        self.cached += num_new
        return outputs.logits[:, -1].float()

    def forward_nodes(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: dict[str, torch.Tensor], readable: bool = False) -> torch.Tensor:
        """Feed `input_ids: (1, q)` (tree nodes) at explicit positions with per-layer-type 4-D masks.

        Returns `(q, vocab)` float logits, one row per node. For tree drafting (`proposers/tree.py`);
        `readable=True`: the ids are known to need no `_readable` replacement.
        """
        num_new = input_ids.shape[1]
        outputs = self.language_model(
            input_ids=input_ids if readable else self._readable(input_ids), position_ids=position_ids.view(1, -1),
            attention_mask=attention_mask,
            past_key_values=self.cache, use_cache=True, logits_to_keep=num_new,
        )
        self.cached += num_new
        return outputs.logits[0].float()

    def _crop(self, num_tokens: int) -> None:
        self.cached -= num_tokens
        if self.static is None:
            self.cache.crop(-num_tokens)
        else:  # no copy: later writes overwrite the stale entries, which the causal mask hides until then
            self.static.truncate(self.cached)


class MultimodalProposer(CausalLMProposer):
    """MASSV: the drafter reads the whole prompt, its image placeholders replaced by projected target features."""

    name = "massv"

    @classmethod
    def check_pair(cls, drafter: nn.Module, target: PreTrainedModel, adapter: FamilyAdapter, tokenizer: Any) -> None:
        config = drafter.config
        if config.family != adapter.model_type:
            raise DrafterPairError(
                f"the MASSV drafter was trained for a {config.family!r} target, not {adapter.model_type!r}")
        if config.image_token_id != adapter.image_token_id:
            raise DrafterPairError(
                f"the MASSV drafter marks image features with token id {config.image_token_id}, the target with "
                f"{adapter.image_token_id}: it reads another tokenizer's ids. Wrap it with its own tokenizer, "
                "massv.speculative.CrossTokenizerDrafter(drafter, drafter_tokenizer), to draft through text."
            )
        expected = adapter.feature_dim(config.vision_feature)
        if config.vision_feature_dim != expected:
            raise DrafterPairError(
                f"the MASSV drafter's projector reads {config.vision_feature} features of width "
                f"{config.vision_feature_dim}, but this target's vision encoder gives {expected}: it was trained "
                f"for a different target size ({config.target_name_or_path or 'unknown target'})")
        check_language_model(drafter.language_model, adapter, tokenizer, "the MASSV drafter's language model")

    @classmethod
    def vision_features_needed(cls, drafter: nn.Module) -> tuple[str, ...]:
        return (drafter.config.vision_feature,)

    @classmethod
    def decoding_language_model(cls, drafter: nn.Module) -> PreTrainedModel:
        return drafter.language_model

    def _language_model(self) -> PreTrainedModel:
        return self.model.language_model

    def _view_prompt(self) -> torch.Tensor:
        return self.request.prompt_ids

    def _draftable_vocab_size(self) -> int:
        return int(self.model.config.draftable_vocab_size)

    def _prompt_kwargs(self) -> dict[str, Any]:
        features = self.request.vision_features.get(self.model.config.vision_feature)
        return {} if features is None else {"image_features": features}
