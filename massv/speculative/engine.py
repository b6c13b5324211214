"""Lossless speculative generation for a target VLM: draft cheaply, verify in one target pass, keep what agrees.

One request (batch size 1) runs:
  1. the target's vision encoder ONCE, for every kind of feature anyone needs (the target's projected
     features, and a MASSV drafter's own kind);
  2. the target's prompt pass (prefill) with the family's prompt-only inputs; it emits the first new token;
     the proposer reads its own view of the prompt;
  3. blocks of: (a) the proposer drafts up to γ tokens (a chain) or a tree of them; (b) the target scores
     `[last token] + drafts` in one forward (a tree with a tree mask and per-node positions); (c) an
     acceptance rule (acceptance.py) keeps a prefix (a root-to-node path of a tree) and adds one target
     token; (d) both sides drop what was rejected (a tree's accepted path is gathered into place first).

`strategy` picks how much is drafted (`massv.speculative.strategy`): a fixed chain of γ, an adaptive chain
(HF's +2/-1 heuristic and a drafter-confidence stop, per request) or an EAGLE-2 draft tree.

Greedy output equals `target.generate(do_sample=False)` token for token; sampled output has the target's
distribution (speculative sampling). The drafting strategy sits behind the proposer seam
(`massv.speculative.proposers`): the loop never asks which kind of drafter it holds.
"""

from __future__ import annotations

import logging
import numbers
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

from massv.families import get_adapter
from massv.speculative.acceptance import accept_greedy, accept_sampled, accept_tree_greedy, accept_tree_sampled
from massv.speculative.proposers import (
    CommittedTokens,
    StaticDecoder,
    DraftRequest,
    Proposer,
    RandomStreams,
    proposer_class_for,
)
from massv.speculative.proposers.tree import TreeProposer
from massv.speculative.sampling import (
    SamplingConfig,
    ScoreProcessor,
    TokenHistory,
    probs_from_scores,
    resolve_sampling_config,
    sample,
)
from massv.speculative.stats import GenerationStats
from massv.speculative.strategy import AdaptiveLength, LengthController, TreeShape, check_strategy
from massv.speculative.target import TargetVerifier
from massv.speculative.tree import DraftTree

logger = logging.getLogger(__name__)

# Processor outputs every family accepts; the adapter adds its image inputs and the ids it derives itself.
_COMMON_INPUT_NAMES = ("input_ids", "attention_mask")


class UnsupportedInputError(ValueError):
    """A processor output the engine would otherwise drop, so the output would silently differ."""


@dataclass
class SpeculativeOutput:
    """The result of one request: prompt + new ids (like `generate()`'s output), the new ids, text, stats."""

    sequences: torch.Tensor  # (1, prompt_length + new_tokens)
    generated_ids: torch.Tensor  # (1, new_tokens)
    text: str | None
    stats: GenerationStats
    settings: SamplingConfig | None = None  # the processing actually applied (unset arguments resolved)


class SpeculativeGenerator:
    """Speculative decoding of a target VLM with a drafter; one request at a time (batch size 1).

    `drafter` may be anything a proposer is registered for (`massv.speculative.proposers`):
    - a `MultimodalDrafter` (MASSV): sees the image through the target's vision features;
    - any Hugging Face causal LM of the target's family (text-only baseline): sees the prompt with the
      image block removed;
    - `TargetAsDrafter(target)`: the target itself, a perfectly agreeing drafter for tests and benchmarks.
    The pair is checked here, once: family, tokenizer agreement, embedding and feature sizes.

    `compile_drafter=True` runs the drafter's one-token steps on a static KV cache of `compile_max_length`
    positions through `torch.compile` (CUDA graphs on a GPU; `proposers/static_decoder.py`): the first request
    pays the compilation, later ones reuse it. Requests longer than the cache take the eager path.
    """

    def __init__(self, target: PreTrainedModel, drafter: nn.Module, processor: ProcessorMixin | None = None, *,
                 compile_drafter: bool = False, compile_max_length: int = 4096,
                 compile_backend: str = "inductor") -> None:
        self.target = target
        self.drafter = drafter
        self.processor = processor
        self.adapter = get_adapter(target.config)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.proposer_class: type[Proposer] = proposer_class_for(drafter)
        self.proposer_class.check_pair(drafter, target, self.adapter, self.tokenizer)
        self.static_decoder: StaticDecoder | None = None
        if compile_drafter:
            language_model = self.proposer_class.decoding_language_model(drafter)
            if language_model is None:
                raise ValueError(f"compile_drafter: the {self.proposer_class.name!r} proposer has no one-token "
                                 "language-model step to compile")
            self.static_decoder = StaticDecoder(language_model, compile_max_length, backend=compile_backend)

    # ---- public API ---------------------------------------------------------------------------------
    def generate(self, images: Any = None, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                 **generation_kwargs: Any) -> SpeculativeOutput:
        """Chat-format `prompt` (or `messages`) with `images` through the processor, then generate.

        `generation_kwargs` are those of `generate_from_inputs`.
        """
        if self.processor is None:
            raise ValueError("generate() needs the processor; pass it to SpeculativeGenerator or use generate_from_inputs")
        image_list = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if messages is None:
            if prompt is None:
                raise ValueError("pass either prompt or messages")
            messages = self.adapter.user_messages(prompt, num_images=len(image_list))
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The rendered template already holds the special tokens (Gemma's <bos>): adding them again would
        # give the target a prompt that `apply_chat_template(tokenize=True)` never produces.
        inputs = self.processor(text=[text], images=image_list or None, return_tensors="pt", add_special_tokens=False)
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
        streamer: Any = None,
        strategy: str = "chain",
        tree: TreeShape | None = None,
        adaptive: AdaptiveLength | None = None,
        **sampling_settings: Any,
    ) -> SpeculativeOutput:
        """Generate from the exact tensors one would give `target.generate(**processor_outputs, ...)`.

        Greedy (`temperature=0`) equals `target.generate(do_sample=False, max_new_tokens=N)` token for token;
        sampling has the distribution of `target.generate(do_sample=True, temperature=T, max_new_tokens=N)`.
        Settings left as None (`top_p`, `top_k`, `repetition_penalty`, and `min_p`, `typical_p`,
        `epsilon_cutoff`, `eta_cutoff` by keyword) take the values `generate()` would use: the target's
        generation config, else Hugging Face's defaults (note: top_k=50 when sampling); `top_k=0` disables
        top-k. `streamer` receives the prompt, then each block's tokens, as `generate()`'s does.

        `strategy`: "chain" (γ = `num_draft_tokens` drafts per block), "adaptive" (a chain starting at γ whose
        length and early stop follow `adaptive`, default `AdaptiveLength()`), or "tree" (an EAGLE-2 draft tree
        of shape `tree`, default `TreeShape()`; `num_draft_tokens` is then unused). Every strategy is lossless.
        """
        # 0. Check everything before any model work.
        self._check_lengths(max_new_tokens, num_draft_tokens)
        check_strategy(strategy)
        tree_shape = (tree or TreeShape()) if strategy == "tree" else None
        settings = self.resolve_settings(temperature, top_p, top_k, repetition_penalty, **sampling_settings)
        adaptive = adaptive or AdaptiveLength()
        length_controller = LengthController(
            num_draft_tokens, adaptive, confidence_decides=settings.greedy and adaptive.confidence_threshold is not None
        ) if strategy == "adaptive" else None
        input_ids, image_inputs = self._request_inputs(processor_outputs)
        eos_ids = self._eos_ids(eos_token_id)
        random = RandomStreams(seed)
        target_generator = random.on(self.target.device)
        target_scores = ScoreProcessor(settings, self.target.device)
        most_drafts = tree_shape.size if tree_shape else (
            length_controller.settings.max_tokens if length_controller else num_draft_tokens)
        stats = GenerationStats(num_draft_tokens=most_drafts, prompt_tokens=input_ids.shape[1], strategy=strategy)
        request_start = time.perf_counter()

        # 1. Vision encoder, once for everyone.
        clock = time.perf_counter()
        use_drafter = num_draft_tokens > 0 or tree_shape is not None
        kinds = {"projected"} | (set(self.proposer_class.vision_features_needed(self.drafter)) if use_drafter else set())
        vision_features = {}
        if image_inputs:
            vision_features = self.adapter.encode_image_features(
                self.adapter.vision_modules(self.target), image_inputs, tuple(sorted(kinds)))
        stats.vision_seconds = time.perf_counter() - clock

        # 2. Prefill: the first new token comes from the target alone; the proposer reads its prompt.
        clock = time.perf_counter()
        sequence = CommittedTokens(input_ids, capacity=max_new_tokens + most_drafts + 1)
        history = TokenHistory(self.adapter.target_vocab_size, self.target.device) if settings.uses_history else None
        if history is not None:
            history.add(input_ids)
        verifier = TargetVerifier(self.target, self.adapter)
        first_logits = verifier.prefill(input_ids, image_inputs, vision_features.get("projected"))
        first_scores = target_scores(first_logits, None if history is None else history.seen.unsqueeze(0))
        first_token = int(first_scores.argmax(-1) if settings.greedy
                          else sample(probs_from_scores(first_scores), target_generator))
        self._commit_tokens(sequence, history, [first_token], streamer, input_ids)
        stats.target_forwards += 1
        proposer = None
        if use_drafter:
            request = DraftRequest(
                target=self.target, adapter=self.adapter, prompt_ids=input_ids, image_inputs=image_inputs,
                vision_features=vision_features, settings=settings, eos_token_ids=frozenset(eos_ids),
                replacement_id=self._replacement_id(), random=random, target_tokenizer=self.tokenizer,
                new_positions=max_new_tokens + num_draft_tokens + 1, static_decoder=self.static_decoder,
                # Greedy only: there a draft survives iff it is the target's argmax, which a calibrated drafter's
                # own probability estimates. When sampling, a draft survives with min(1, p/q) whatever q(x) is
                # (a drafter equal to the target is always accepted), so q(x) says nothing about acceptance.
                confidence_threshold=length_controller.settings.confidence_threshold
                if length_controller and settings.greedy else None,
            )
            proposer = self.proposer_class(self.drafter, request)
            if tree_shape is not None:
                proposer = TreeProposer(proposer, tree_shape)
            stats.drafter_forwards += proposer.prefill(sequence)
        stats.prefill_seconds = time.perf_counter() - clock

        # 3. Draft / verify blocks.
        while sequence.generated[-1] not in eos_ids and len(sequence.generated) < max_new_tokens:
            # (a) Propose. Never draft past max_new_tokens: a block always adds the target's own token.
            clock = time.perf_counter()
            length = tree_shape.depth if tree_shape else (
                length_controller.length if length_controller else num_draft_tokens)
            allowed = min(length, max_new_tokens - len(sequence.generated) - 1)
            proposal = proposer.propose(sequence, allowed) if proposer is not None and allowed > 0 else None
            num_drafts = 0 if proposal is None else len(proposal)
            stats.drafter_forwards += 0 if proposal is None else proposal.forwards
            stats.drafting_seconds += time.perf_counter() - clock

            # (b) Verify: one target forward over the last committed token and the drafts (chain or tree).
            # (c) Accept a prefix (a tree: a root-to-node path) and add the target's own token.
            # (d) Commit: drop rejected drafts from both caches (a tree's path gathered into place first).
            clock = time.perf_counter()
            last_token = sequence.ids[:, sequence.length - 1 : sequence.length]
            drafts = last_token.new_empty(0) if proposal is None else proposal.tokens.to(last_token.device)
            if proposal is not None and proposal.tree is not None:
                num_accepted, next_token, accepted_ids, accepted_device, judged = self._tree_block(
                    verifier, proposer, proposal.tree, last_token, drafts, target_scores, history, settings,
                    target_generator, stats)
            else:
                logits = verifier.verify(torch.cat([last_token, drafts.view(1, -1)], dim=1))  # (num_drafts + 1, vocab)
                scores = target_scores(logits, None if history is None else history.rows_with(drafts))
                if settings.greedy:
                    num_accepted, next_token, draft_ids = accept_greedy(drafts, scores)
                else:
                    num_accepted, next_token, draft_ids = accept_sampled(
                        drafts, None if proposal is None else proposal.probs, probs_from_scores(scores),
                        target_generator)
                verifier.rollback(num_drafts - num_accepted)
                if proposer is not None and proposal is not None:
                    proposer.commit(num_accepted)
                accepted_ids, accepted_device = draft_ids[:num_accepted], drafts
                judged = num_accepted + (1 if num_accepted < num_drafts else 0)
            stats.target_forwards += 1
            if length_controller is not None and proposal is not None:
                length_controller.update(allowed, num_drafts, num_accepted)
            emitted = self._cut_at_eos(accepted_ids + [next_token], eos_ids)
            if len(emitted) <= num_accepted:  # an accepted draft was EOS: later drafts were never emitted
                num_accepted = judged = len(emitted)
            stats.record_step(num_drafts, judged, num_accepted, len(emitted), budget_limited=allowed < length)
            self._commit_tokens(sequence, history, emitted, streamer, None, device_tokens=accepted_device,
                                num_device=num_accepted)
            stats.verifying_seconds += time.perf_counter() - clock

        if streamer is not None:
            streamer.end()
        stats.total_seconds = time.perf_counter() - request_start
        generated = sequence.generated
        stats.new_tokens = len(generated)
        stats.stopped_by = "eos" if generated[-1] in eos_ids else "max_new_tokens"
        text = self.tokenizer.decode(generated, skip_special_tokens=True) if self.tokenizer is not None else None
        logger.debug("generated %d tokens in %d verification steps (MAL %.2f, α %.2f)", stats.new_tokens,
                     stats.verification_steps, stats.mean_accepted_length, stats.acceptance_rate)
        return SpeculativeOutput(
            sequences=sequence.ids[:, : sequence.length].clone(), generated_ids=sequence.generated_ids().clone(),
            text=text, stats=stats, settings=settings,
        )

    @staticmethod
    def _tree_block(verifier: TargetVerifier, proposer: TreeProposer, tree: DraftTree, last_token: torch.Tensor,
                    drafts: torch.Tensor, target_scores: ScoreProcessor, history: TokenHistory | None,
                    settings: SamplingConfig, generator: torch.Generator | None, stats: GenerationStats
                    ) -> tuple[int, int, list[int], torch.Tensor, int]:
        """Steps (b)-(d) for a draft tree; returns (accepted, next token, accepted ids on host and device, judged)."""
        logits = verifier.verify_tree(last_token, drafts, tree)  # (num_nodes + 1, vocab)
        seen = None if history is None else history.rows_for_tree(drafts, tree.ancestors(drafts.device))
        scores = target_scores(logits, seen)
        if settings.greedy:
            path, next_token, draft_ids = accept_tree_greedy(drafts, tree, scores)
        else:
            path, next_token, draft_ids = accept_tree_sampled(drafts, tree, probs_from_scores(scores), generator)
        verifier.keep_path(tree.num_nodes, path)
        proposer.commit_path(path)
        stats.record_tree_path(tree, path)
        accepted_device = drafts[torch.tensor([node - 1 for node in path], dtype=torch.long, device=drafts.device)]
        judged = len(path) + (1 if tree.children(path[-1] if path else 0) else 0)
        return len(path), next_token, [draft_ids[node - 1] for node in path], accepted_device, judged

    # ---- settings and inputs ---------------------------------------------------------------------------
    def resolve_settings(self, temperature: float, top_p: float | None = None, top_k: int | None = None,
                         repetition_penalty: float | None = None, **sampling_settings: Any) -> SamplingConfig:
        """Fill unset values as `generate()` does: target generation config first, then HF's defaults.

        Refuses (`UnsupportedSettingError`) any active setting `generate()` would apply and the engine cannot.
        """
        return resolve_sampling_config(
            self.target.generation_config, temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, **sampling_settings,
        )

    @staticmethod
    def _check_lengths(max_new_tokens: Any, num_draft_tokens: Any) -> None:
        for name, value, minimum in (("max_new_tokens", max_new_tokens, 1), ("num_draft_tokens", num_draft_tokens, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    def _request_inputs(self, processor_outputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`input_ids` and the image inputs on the target's device; anything unknown is refused by name."""
        known = set(_COMMON_INPUT_NAMES) | set(self.adapter.image_input_names) | set(self.adapter.derived_input_names)
        unknown = sorted(name for name, value in processor_outputs.items() if name not in known and value is not None)
        if unknown:
            raise UnsupportedInputError(
                f"processor outputs {unknown} are not supported by the speculative engine (it takes "
                f"{sorted(known)}); without them the output would differ from target.generate. Video inputs "
                "are not supported yet: pass frames as images."
            )
        input_ids = processor_outputs.get("input_ids")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be a non-empty (1, length) tensor, got shape {shape}")
        if input_ids.shape[0] != 1:
            raise ValueError(f"SpeculativeGenerator handles batch size 1, got a batch of {input_ids.shape[0]}")
        attention_mask = processor_outputs.get("attention_mask")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded prompts are not supported (batch size 1 needs no padding)")
        device = self.target.device
        image_inputs = {name: processor_outputs[name].to(device) for name in self.adapter.image_input_names
                        if processor_outputs.get(name) is not None}
        return input_ids.to(device), image_inputs

    def _eos_ids(self, eos_token_id: int | list[int] | None) -> set[int]:
        if eos_token_id is None:
            eos_token_id = self.target.generation_config.eos_token_id
        if eos_token_id is None:
            return set()
        return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(token) for token in eos_token_id}

    def _replacement_id(self) -> int:
        return getattr(self.tokenizer, "pad_token_id", None) or 0

    # ---- loop helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _cut_at_eos(emitted: list[int], eos_ids: set[int]) -> list[int]:
        """Stop exactly at the first end-of-sequence token, as `generate()` does."""
        for index, token in enumerate(emitted):
            if token in eos_ids:
                return emitted[: index + 1]
        return emitted

    @staticmethod
    def _commit_tokens(sequence: CommittedTokens, history: TokenHistory | None, tokens: list[int], streamer: Any,
                       prompt_ids: torch.Tensor | None, device_tokens: torch.Tensor | None = None,
                       num_device: int = 0) -> None:
        """Append `tokens`; the first `num_device` of them are already on the device in `device_tokens`."""
        start = sequence.length
        if num_device:
            sequence.append(tokens[:num_device], device_tokens)
        sequence.append(tokens[num_device:])
        if history is not None:
            history.add(sequence.ids[0, start : sequence.length])
        if streamer is not None:
            if prompt_ids is not None:
                streamer.put(prompt_ids.cpu())
            streamer.put(torch.tensor(tokens))
