"""Lossless speculative generation for a target VLM: draft γ tokens cheaply, verify them in one target pass.

One request (batch size 1) runs:
  1. the target's vision encoder ONCE; its projected features feed the target's prompt pass and, for a
     MASSV drafter that consumes projected features, the drafter too;
  2. the target's prompt pass (prefill) with the family's prompt-only inputs (Qwen2.5-VL: 3-D rotary
     positions + `mm_token_type_ids`; Gemma3: `token_type_ids`); it emits the first new token;
  3. blocks of: the drafter proposes up to γ tokens from its own KV cache; the target scores
     `[last token] + drafts` in one forward on its KV cache; the acceptance rule (sampling.py) keeps a
     prefix and adds one target token; both caches are cropped back to what was kept.

Greedy output equals `target.generate(do_sample=False)` token for token; sampled output has the target's
distribution (speculative sampling). Both caches are `DynamicCache`s with past recording switched on, so
sliding-window layers (Gemma3) keep enough history to be cropped after a rejection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature, DynamicCache, PreTrainedModel, ProcessorMixin

from massv.drafter import MultimodalDrafter
from massv.families import FamilyAdapter, get_adapter
from massv.speculative import sampling as sampling_rules
from massv.speculative.sampling import SamplingConfig, probs_from_scores, process_rows
from massv.speculative.stats import GenerationStats

logger = logging.getLogger(__name__)


class TargetAsDrafter(nn.Module):
    """The target model used as its own drafter.

    It agrees with every greedy verification by construction (up to float rounding between one-token and
    multi-token forwards), so it shows the ceiling of the speculative machinery: MAL → γ + 1. Useful for
    tests and for benchmarks where a random drafter would accept almost nothing.
    """

    def __init__(self, target: PreTrainedModel) -> None:
        super().__init__()
        self.target = target


@dataclass
class SpeculativeOutput:
    """The result of one request: prompt + new ids (like `generate()`'s output), the new ids, text, stats."""

    sequences: torch.Tensor  # (1, prompt_length + new_tokens)
    generated_ids: torch.Tensor  # (1, new_tokens)
    text: str | None
    stats: GenerationStats
    settings: SamplingConfig | None = None  # the warping actually applied (unset arguments resolved)


def _hf_generation_defaults() -> dict[str, Any]:
    """The values `generate()` falls back to when neither the call nor the generation config sets them."""
    defaults = {"top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
    try:
        from transformers import GenerationConfig

        defaults.update({key: value for key, value in GenerationConfig._get_default_generation_params().items()
                         if key in defaults})
    except AttributeError:  # older/newer transformers without the helper: HF's documented defaults above
        pass
    return defaults


def _new_cache(model: PreTrainedModel) -> DynamicCache:
    """A cache that can be rolled back: sliding-window layers keep their past until the next `crop`."""
    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()
    return cache


def _ones_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(1, length, dtype=torch.long, device=device)


class _TargetSession:
    """The target's side of one request: its KV cache and the tokens the cache holds.

    Invariant between steps: the cache holds every committed token except the last one, which is fed
    again (with the drafts) by the next verification forward.

    Every forward is followed by exactly one `crop` (possibly of 0 tokens): a sliding-window layer that
    records its past trims back to its window only inside `crop`, and it can remove only tokens added since
    the previous crop.
    """

    def __init__(self, model: PreTrainedModel, adapter: FamilyAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.cache = _new_cache(model)
        self.length = 0
        self.position_state: Any = None

    def prefill(self, input_ids: torch.Tensor, image_inputs: dict[str, torch.Tensor],
                projected_features: torch.Tensor | None, logits_to_keep: int = 1) -> torch.Tensor:
        """Prompt pass with the family's prompt-only inputs; returns `(logits_to_keep, vocab)` float logits."""
        kwargs, self.position_state = self.adapter.target_prefill_kwargs(input_ids, image_inputs, self.model)
        if projected_features is not None:
            kwargs.update(self.adapter.target_image_kwargs(image_inputs, projected_features))
        outputs = self.model(
            input_ids=input_ids, attention_mask=_ones_mask(input_ids.shape[1], input_ids.device),
            past_key_values=self.cache, use_cache=True, logits_to_keep=logits_to_keep, **kwargs,
        )
        self.length = input_ids.shape[1]
        self.cache.crop(0)
        return outputs.logits[0].float()

    def extend(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append text tokens after the cached ones; returns their `(len(tokens), vocab)` float logits."""
        num_new = len(tokens)
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.model.device)
        kwargs = self.adapter.target_decode_kwargs(self.position_state, self.length, num_new)
        outputs = self.model(
            input_ids=input_ids, attention_mask=_ones_mask(self.length + num_new, input_ids.device),
            past_key_values=self.cache, use_cache=True, logits_to_keep=num_new, **kwargs,
        )
        self.length += num_new
        return outputs.logits[0].float()

    def rollback(self, num_tokens: int) -> None:
        """Drop the last `num_tokens` cached tokens (0 still trims sliding-window layers to their window)."""
        self.cache.crop(-num_tokens)
        self.length -= num_tokens


class _DrafterSession:
    """The drafter's side of one request: its view of the prompt, its KV cache, and the tokens cached.

    Drafters see different prompts (a text-only LM sees the prompt without its image block), so the
    session keeps its own token list and only ever compares it with the drafter-view sequence.
    """

    def __init__(self, prompt_ids: list[int], draftable_vocab_size: int, embedding_rows: int | None,
                 replacement_id: int) -> None:
        self.prompt_ids = prompt_ids
        self.draftable_vocab_size = draftable_vocab_size
        self.embedding_rows = embedding_rows
        self.replacement_id = replacement_id
        self.cached: list[int] = []

    # ---- bookkeeping shared by all drafters ------------------------------------------------------------
    def sync(self, sequence: list[int]) -> list[int]:
        """Crop the cache to its longest prefix shared with `sequence`; return the tokens still to feed.

        Called once per block, before any draft forward, so the crop only removes tokens of the last block
        (all added after the previous crop), which is what sliding-window layers can undo.
        """
        common = 0
        limit = min(len(self.cached), len(sequence))
        while common < limit and self.cached[common] == sequence[common]:
            common += 1
        if common == len(sequence) and common > 0:
            common -= 1  # everything is cached: re-feed the last token to get its successor's logits
        if self.cached:
            self._crop(len(self.cached) - common)
        self.cached = self.cached[:common]
        return sequence[common:]

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` fed (only tokens fed since the last `sync`/`rollback`)."""
        self._crop(num_tokens)
        self.cached = self.cached[: len(self.cached) - num_tokens]

    def forward(self, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` after the cached ones; returns the float logits for the next position."""
        is_prompt = not self.cached
        start = len(self.cached)
        safe = [self._safe_id(token, start + offset) for offset, token in enumerate(tokens)]
        input_ids = torch.tensor([safe], dtype=torch.long, device=self.device)
        logits = self._run(input_ids, start, is_prompt)
        self.cached.extend(tokens)
        return logits.float()

    def _safe_id(self, token: int, position: int) -> int:
        # A target may emit ids past the drafter's embedding (padding rows; random test models do). The
        # drafter only needs *some* valid id there: its guesses after it are verified anyway.
        if position < len(self.prompt_ids) or self.embedding_rows is None or token < self.embedding_rows:
            return token
        return self.replacement_id

    # ---- per drafter kind ---------------------------------------------------------------------------
    device: torch.device

    def _run(self, input_ids: torch.Tensor, past_length: int, is_prompt: bool) -> torch.Tensor:
        raise NotImplementedError

    def _crop(self, num_tokens: int) -> None:
        raise NotImplementedError


class _LanguageModelSession(_DrafterSession):
    """A plain causal LM (text-only baseline) or a MASSV drafter: 1-D positions from its own cache length."""

    def __init__(self, model: nn.Module, prompt_ids: list[int], draftable_vocab_size: int, embedding_rows: int,
                 replacement_id: int, image_features: torch.Tensor | None) -> None:
        super().__init__(prompt_ids, draftable_vocab_size, embedding_rows, replacement_id)
        self.model = model
        self.device = model.device
        self.image_features = image_features
        language_model = model.language_model if isinstance(model, MultimodalDrafter) else model
        self.cache = _new_cache(language_model)

    def _run(self, input_ids: torch.Tensor, past_length: int, is_prompt: bool) -> torch.Tensor:
        num_new = input_ids.shape[1]
        position_ids = torch.arange(past_length, past_length + num_new, device=self.device).unsqueeze(0)
        kwargs: dict[str, Any] = {}
        if isinstance(self.model, MultimodalDrafter) and is_prompt:
            kwargs["image_features"] = self.image_features  # placeholders occur only in the prompt
        outputs = self.model(
            input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache, use_cache=True,
            logits_to_keep=1, **kwargs,
        )
        return outputs.logits[0, -1]

    def _crop(self, num_tokens: int) -> None:
        self.cache.crop(-num_tokens)


class _TargetCopySession(_DrafterSession):
    """`TargetAsDrafter`: the target's own forward (family positions, shared image features) as drafter."""

    def __init__(self, target: PreTrainedModel, adapter: FamilyAdapter, prompt_ids: list[int],
                 image_inputs: dict[str, torch.Tensor], projected_features: torch.Tensor | None) -> None:
        super().__init__(prompt_ids, adapter.target_vocab_size, None, 0)
        self.device = target.device
        self.target_session = _TargetSession(target, adapter)
        self.image_inputs = image_inputs
        self.projected_features = projected_features

    def _run(self, input_ids: torch.Tensor, past_length: int, is_prompt: bool) -> torch.Tensor:
        if is_prompt:
            logits = self.target_session.prefill(input_ids, self.image_inputs, self.projected_features)
        else:
            logits = self.target_session.extend(input_ids[0].tolist())
        return logits[-1]

    def _crop(self, num_tokens: int) -> None:
        self.target_session.rollback(num_tokens)


class SpeculativeGenerator:
    """Speculative decoding of a target VLM with a drafter; one request at a time (batch size 1).

    `drafter` may be:
    - a `MultimodalDrafter` (MASSV): sees the image through the target's vision features;
    - any Hugging Face causal LM sharing the target's tokenizer (text-only baseline): sees the prompt with
      the image block removed (`adapter.strip_image_tokens`);
    - `TargetAsDrafter(target)`: the target itself, a perfectly agreeing drafter for tests and benchmarks.
    """

    def __init__(self, target: PreTrainedModel, drafter: nn.Module, processor: ProcessorMixin | None = None) -> None:
        self.target = target
        self.drafter = drafter
        self.processor = processor
        self.adapter = get_adapter(target.config)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._warn_about_generation_config()

    # ---- public API ---------------------------------------------------------------------------------
    def generate(self, images: Any = None, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                 **generation_kwargs: Any) -> SpeculativeOutput:
        """Chat-format `prompt` (or `messages`) with `images` through the processor, then generate.

        `generation_kwargs` are those of `generate_from_inputs` (max_new_tokens, num_draft_tokens,
        temperature, top_p, top_k, repetition_penalty, seed, eos_token_id).
        """
        if self.processor is None:
            raise ValueError("generate() needs the processor; pass it to SpeculativeGenerator or use generate_from_inputs")
        image_list = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if messages is None:
            if prompt is None:
                raise ValueError("pass either prompt or messages")
            messages = self.adapter.user_messages(prompt, num_images=len(image_list))
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=image_list or None, return_tensors="pt")
        return self.generate_from_inputs(inputs, **generation_kwargs)

    @torch.no_grad()
    def generate_from_inputs(
        self,
        processor_outputs: BatchFeature | dict[str, torch.Tensor],
        max_new_tokens: int = 128,
        num_draft_tokens: int = 4,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> SpeculativeOutput:
        """Generate from the exact tensors one would give `target.generate(**processor_outputs, ...)`.

        Greedy (`temperature=0`) equals `target.generate(do_sample=False, max_new_tokens=N)` token for token;
        sampling has the distribution of `target.generate(do_sample=True, temperature=T, max_new_tokens=N)`.
        `top_p`, `top_k`, `repetition_penalty` and `eos_token_id` left as None take the values `generate()`
        would use: the target's generation config, else Hugging Face's defaults (note: top_k=50 when
        sampling). Pass `top_k=0` to disable top-k. Batch size 1.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
        settings = self.resolve_settings(temperature, top_p, top_k, repetition_penalty)
        device = self.target.device
        input_ids = processor_outputs["input_ids"].to(device)
        if input_ids.shape[0] != 1:
            raise ValueError(f"SpeculativeGenerator handles batch size 1, got a batch of {input_ids.shape[0]}")
        attention_mask = processor_outputs.get("attention_mask")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded prompts are not supported (batch size 1 needs no padding)")
        image_inputs = {
            name: processor_outputs[name].to(device)
            for name in self.adapter.image_input_names
            if processor_outputs.get(name) is not None
        }
        eos_ids = self._eos_ids(eos_token_id)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)

        stats = GenerationStats(num_draft_tokens=num_draft_tokens, prompt_tokens=input_ids.shape[1])
        request_start = time.perf_counter()

        # 1. Vision encoder, once for everyone.
        clock = time.perf_counter()
        projected = None
        if image_inputs:
            projected = self.adapter.encode_images(self.adapter.vision_modules(self.target), image_inputs, "projected")
        drafter_session = self._drafter_session(input_ids, image_inputs, projected)
        stats.vision_seconds = time.perf_counter() - clock

        # 2. Target prefill: the first new token comes from the target alone.
        clock = time.perf_counter()
        target_session = _TargetSession(self.target, self.adapter)
        prompt_ids = input_ids[0].tolist()
        target_processors = settings.target_processors()
        first_scores = process_rows(target_session.prefill(input_ids, image_inputs, projected), input_ids, target_processors)
        generated = [self._choose(first_scores[0], settings, generator)]
        stats.target_forwards += 1
        stats.prefill_seconds = time.perf_counter() - clock

        # 3. Draft / verify blocks.
        while generated[-1] not in eos_ids and len(generated) < max_new_tokens:
            # Never draft past max_new_tokens: a step always adds the target's own token after the drafts.
            num_drafts = min(num_draft_tokens, max_new_tokens - len(generated) - 1)
            drafts, draft_probs = self._draft(drafter_session, generated, num_drafts, settings, generator, stats)

            clock = time.perf_counter()
            target_logits = target_session.extend([generated[-1]] + drafts)  # (num_drafts + 1, vocab)
            stats.target_forwards += 1
            prefix = torch.tensor([prompt_ids + generated + drafts], device=device) if len(target_processors) else input_ids
            scores = process_rows(target_logits, prefix, target_processors)
            if settings.greedy:
                num_accepted, next_token = sampling_rules.verify_greedy(drafts, scores)
            else:
                num_accepted, next_token = sampling_rules.verify_sampled(
                    drafts, draft_probs, probs_from_scores(scores), generator
                )
            target_session.rollback(num_drafts - num_accepted)
            emitted = drafts[:num_accepted] + [next_token]
            judged = num_accepted + (1 if num_accepted < num_drafts else 0)
            for index, token in enumerate(emitted):
                if token in eos_ids:  # stop exactly at the first end-of-sequence token
                    emitted = emitted[: index + 1]
                    break
            if len(emitted) <= num_accepted:  # an accepted draft was EOS: later drafts were never emitted
                num_accepted = judged = len(emitted)
            stats.record_step(num_drafts, judged, num_accepted, len(emitted))
            generated.extend(emitted)
            stats.verifying_seconds += time.perf_counter() - clock
            logger.debug("step %d: %d/%d drafts accepted, emitted %s", stats.verification_steps, num_accepted,
                         num_drafts, emitted)

        stats.total_seconds = time.perf_counter() - request_start
        stats.new_tokens = len(generated)
        stats.stopped_by = "eos" if generated[-1] in eos_ids else "max_new_tokens"
        new_ids = torch.tensor([generated], dtype=input_ids.dtype, device=device)
        text = self.tokenizer.decode(generated, skip_special_tokens=True) if self.tokenizer is not None else None
        logger.debug("generated %d tokens in %d verification steps (MAL %.2f, α %.2f)", stats.new_tokens,
                     stats.verification_steps, stats.mean_accepted_length, stats.acceptance_rate)
        return SpeculativeOutput(
            sequences=torch.cat([input_ids, new_ids], dim=1), generated_ids=new_ids, text=text, stats=stats,
            settings=settings,
        )

    # ---- drafting -----------------------------------------------------------------------------------
    def _draft(self, session: _DrafterSession, generated: list[int], num_drafts: int, settings: SamplingConfig,
               generator: torch.Generator | None, stats: GenerationStats) -> tuple[list[int], torch.Tensor | None]:
        """Up to `num_drafts` drafter tokens (argmax when greedy, else sampled from its warped q)."""
        if num_drafts == 0:
            return [], None
        clock = time.perf_counter()
        pending = session.sync(session.prompt_ids + generated)
        warpers = settings.warpers()
        vocab_size = self.adapter.target_vocab_size
        drafts: list[int] = []
        draft_probs: list[torch.Tensor] = []
        for _ in range(num_drafts):
            is_prompt = not session.cached
            logits = session.forward(pending)[: session.draftable_vocab_size]
            stats.drafter_forwards += 1
            if is_prompt:  # the drafter's prompt pass is prefill work, not drafting
                now = time.perf_counter()
                stats.prefill_seconds += now - clock
                clock = now
            if settings.greedy:
                token = int(logits.argmax())
            else:  # sampled from the drafter's warped q, which the acceptance rule needs in full
                q = probs_from_scores(warpers(None, logits.unsqueeze(0))[0])
                token = sampling_rules.sample(q, generator)
                q_full = torch.zeros(vocab_size, dtype=q.dtype, device=self.target.device)
                q_full[: q.shape[0]] = q.to(q_full.device)  # zero outside the draftable ids
                draft_probs.append(q_full)
            drafts.append(token)
            pending = [token]
        stats.drafting_seconds += time.perf_counter() - clock
        return drafts, (torch.stack(draft_probs) if draft_probs else None)

    def _drafter_session(self, input_ids: torch.Tensor, image_inputs: dict[str, torch.Tensor],
                         projected: torch.Tensor | None) -> _DrafterSession:
        """The right session for the drafter kind; runs the drafter's own encoder when it needs other features."""
        target_vocab = self.adapter.target_vocab_size
        replacement_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        if isinstance(self.drafter, TargetAsDrafter):
            return _TargetCopySession(self.drafter.target, self.adapter, input_ids[0].tolist(), image_inputs, projected)
        if isinstance(self.drafter, MultimodalDrafter):
            features = None
            if image_inputs:
                if self.drafter.config.vision_feature == "projected":
                    features = projected  # the target's own features: no second vision pass
                else:
                    features = self.drafter.encode_images(image_inputs)
            rows = self.drafter.language_model.get_input_embeddings().num_embeddings
            draftable = min(self.drafter.config.draftable_vocab_size, target_vocab)
            return _LanguageModelSession(self.drafter, input_ids[0].tolist(), draftable, rows, replacement_id, features)
        # Text-only causal LM: never sees the image block.
        rows = self.drafter.get_input_embeddings().num_embeddings
        tokenizer_size = len(self.tokenizer) if self.tokenizer is not None else rows
        draftable = min(tokenizer_size, int(self.drafter.config.get_text_config().vocab_size), target_vocab)
        text_prompt = self.adapter.strip_image_tokens(input_ids)[0].tolist()
        return _LanguageModelSession(self.drafter, text_prompt, draftable, rows, replacement_id, None)

    # ---- helpers ------------------------------------------------------------------------------------
    def resolve_settings(self, temperature: float, top_p: float | None = None, top_k: int | None = None,
                         repetition_penalty: float | None = None) -> SamplingConfig:
        """Fill unset values as `generate()` does: target generation config first, then HF's defaults."""
        config = self.target.generation_config
        defaults = _hf_generation_defaults()

        def pick(name: str, value: Any) -> Any:
            if value is not None:
                return value
            configured = getattr(config, name, None)
            return configured if configured is not None else defaults[name]

        return SamplingConfig(
            temperature=temperature, top_p=float(pick("top_p", top_p)), top_k=int(pick("top_k", top_k)),
            repetition_penalty=float(pick("repetition_penalty", repetition_penalty)),
        )

    @staticmethod
    def _choose(scores: torch.Tensor, settings: SamplingConfig, generator: torch.Generator | None) -> int:
        if settings.greedy:
            return int(scores.argmax())
        return sampling_rules.sample(probs_from_scores(scores), generator)

    def _eos_ids(self, eos_token_id: int | list[int] | None) -> set[int]:
        if eos_token_id is None:
            eos_token_id = self.target.generation_config.eos_token_id
        if eos_token_id is None:
            return set()
        return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(token) for token in eos_token_id}

    def _warn_about_generation_config(self) -> None:
        """Say which target generation-config settings a bare `target.generate()` applies but we do not."""
        config = self.target.generation_config
        differing = {
            name: getattr(config, name, None)
            for name in ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                         "begin_suppress_tokens", "min_new_tokens", "min_length", "sequence_bias", "forced_bos_token_id",
                         "forced_eos_token_id", "min_p", "typical_p")
            if getattr(config, name, None) not in (None, 0, 1.0, [])
        }
        if differing:
            logger.warning(
                "the target's generation config sets %s, which target.generate() applies but SpeculativeGenerator "
                "does not (it applies temperature, top_k, top_p and repetition_penalty); compare the two with these "
                "unset, e.g. target.generate(..., no_repeat_ngram_size=0).", differing,
            )
