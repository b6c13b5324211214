"""Held-out answers of both models, their accuracy per task, and the drafter/target cost ratio."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import (
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
)

from massv.families import get_adapter
from massv.pipelines import world
from massv.pipelines.world_models.data import chat_prompt, record_answer, record_question
from massv.pipelines.world_models.grading import heldout_records, score_answers
from massv.pipelines.world_models.recipe import WorldModels

logger = logging.getLogger(__name__)

@torch.inference_mode()
def generate_target_answers(target: Qwen2_5_VLForConditionalGeneration, processor: ProcessorMixin,
                            records: Sequence[dict[str, Any]], images: Sequence[Image.Image],
                            max_new_tokens: int = 96, batch_size: int = 32) -> list[str]:
    """Greedy answers of the target VLM (batched, left-padded) to the records' questions about their images."""
    tokenizer = processor.tokenizer
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [chat_prompt(tokenizer, record_question(record), with_image=True) for record in chunk]
        inputs = processor(text=prompts, images=list(images[start:start + batch_size]), return_tensors="pt",
                           padding=True, padding_side="left", return_mm_token_type_ids=True)
        output = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    target.model.rope_deltas = None  # do not leave generate's cached deltas behind for other callers
    return [answer.strip() for answer in answers]


@torch.inference_mode()
def generate_text_answers(text_lm: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast,
                          records: Sequence[dict[str, Any]], max_new_tokens: int = 96, batch_size: int = 64) -> list[str]:
    """Greedy answers of the text-only LM, which sees the question but no image."""
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = [chat_prompt(tokenizer, record_question(r), with_image=False) for r in records[start:start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        output = text_lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]



# ----------------------------------------------------------------------------------------------------------
# Cost ratio: drafter vs target, one token with a KV cache.


@torch.inference_mode()
def measure_cost_ratio(target: Qwen2_5_VLForConditionalGeneration, text_lm: Qwen2ForCausalLM,
                       processor: ProcessorMixin, context_tokens: int = 100, decode_steps: int = 64,
                       image_size: int = world.DEFAULT_IMAGE_SIZE, seed: int = 0) -> dict[str, float]:
    """Median time of one cached single-token forward of each model at a ~`context_tokens` context.

    Why: speculative decoding's speedup is bounded by c = drafter step / target step. The target is driven
    through its family adapter (explicit 3-D positions), as the engine drives it; the two models' steps are
    interleaved so load from other processes hits both alike.
    """
    tokenizer = processor.tokenizer
    records, images = heldout_records(1, seed, kinds=("caption",), image_size=image_size)
    question, answer = record_question(records[0]), record_answer(records[0])
    long_answer = " ".join([answer] * 6)  # long enough to fill the context
    inputs = processor(text=[chat_prompt(tokenizer, question, with_image=True) + long_answer], images=images,
                       return_tensors="pt")
    input_ids = inputs["input_ids"][:, :context_tokens]
    text_ids = tokenizer([chat_prompt(tokenizer, question, with_image=False) + long_answer],
                         return_tensors="pt")["input_ids"][:, :context_tokens]
    adapter = get_adapter(target.config)
    image_inputs = {name: inputs[name] for name in adapter.image_input_names}
    prefill_kwargs, position_state = adapter.target_prefill_kwargs(input_ids, image_inputs, target)
    target_out = target(input_ids=input_ids, use_cache=True, **image_inputs, **prefill_kwargs)
    draft_out = text_lm(input_ids=text_ids, use_cache=True)
    target_cache, draft_cache = target_out.past_key_values, draft_out.past_key_values
    next_token = input_ids[:, -1:]
    target_times: list[float] = []
    draft_times: list[float] = []
    for step in range(decode_steps):
        started = time.perf_counter()
        decode_kwargs = adapter.target_decode_kwargs(
            position_state, torch.arange(input_ids.shape[1] + step, input_ids.shape[1] + step + 1, device=target.device))
        target_cache = target(input_ids=next_token, past_key_values=target_cache, use_cache=True,
                              **decode_kwargs).past_key_values
        target_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        draft_cache = text_lm(input_ids=next_token, past_key_values=draft_cache, use_cache=True).past_key_values
        draft_times.append(time.perf_counter() - started)
    target_ms = statistics.median(target_times[4:] or target_times) * 1000
    draft_ms = statistics.median(draft_times[4:] or draft_times) * 1000
    return {"target_ms": target_ms, "drafter_ms": draft_ms, "cost_ratio": draft_ms / target_ms,
            "target_context_tokens": int(input_ids.shape[1]), "drafter_context_tokens": int(text_ids.shape[1])}



# ----------------------------------------------------------------------------------------------------------
# Train, save, load.


def evaluate_world_models(models: WorldModels, num_samples: int | None = None, seed: int | None = None,
                          progress: bool = False) -> dict[str, Any]:
    """Held-out accuracy per task kind of the target and of the text-only LM, on the same questions."""
    recipe = models.recipe
    records, images = heldout_records(num_samples or recipe.eval_samples, recipe.eval_seed if seed is None else seed,
                                      image_size=recipe.image_size)
    logger.info("evaluating on %d heldout questions", len(records))
    target_answers = generate_target_answers(models.target, models.processor, records, images, recipe.max_new_tokens)
    text_answers = generate_text_answers(models.text_lm, models.tokenizer, records, recipe.max_new_tokens)
    examples = [{"task": r["task"], "question": record_question(r), "reference": record_answer(r),
                 "target": t, "text_lm": d} for r, t, d in list(zip(records, target_answers, text_answers))[:10]]
    return {"target": score_answers(records, target_answers), "text_lm": score_answers(records, text_answers),
            "examples": examples}
