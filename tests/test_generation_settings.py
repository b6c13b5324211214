"""One generation-settings source: unset values filled as `target.generate()` fills them, the same in the
engine and in distillation, and written to the distillation manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from massv import MultimodalDrafter, SpeculativeGenerator
from massv.chat import prompt_inputs
from massv.families import get_adapter
from massv.generation_settings import GenerationSettings, resolve_generation_settings
from massv.tiny import build_tiny_pair
from massv.train.distill import MANIFEST_NAME, generate_responses
from tests.conftest import random_image
from tests.helpers_train import one_thread, tiny_config, write_llava  # noqa: F401

# What Qwen2.5-VL-7B-Instruct ships in generation_config.json.
QWEN_LIKE = GenerationConfig(do_sample=True, temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05)


def test_unset_values_come_from_the_generation_config_then_hf_defaults() -> None:
    greedy = resolve_generation_settings(QWEN_LIKE, temperature=0.0, max_new_tokens=8)
    # Greedy applies the checkpoint's repetition penalty (as generate(do_sample=False) does) and no warper.
    assert greedy == GenerationSettings(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.05, max_new_tokens=8)
    sampled = resolve_generation_settings(QWEN_LIKE, temperature=1.0, max_new_tokens=8)
    assert (sampled.top_k, sampled.top_p, sampled.repetition_penalty) == (1, 0.001, 1.05)
    assert resolve_generation_settings(QWEN_LIKE, max_new_tokens=8).temperature == pytest.approx(0.1)  # its own T
    explicit = resolve_generation_settings(QWEN_LIKE, temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.0,
                                           max_new_tokens=8)
    assert (explicit.top_k, explicit.top_p, explicit.repetition_penalty) == (0, 0.9, 1.0)
    bare = resolve_generation_settings(GenerationConfig(), temperature=1.0, max_new_tokens=8)
    assert (bare.top_k, bare.top_p, bare.repetition_penalty) == (50, 1.0, 1.0)  # Hugging Face's defaults
    assert resolve_generation_settings(GenerationConfig(), max_new_tokens=8).greedy  # do_sample unset: greedy
    with pytest.raises(ValueError, match="max_new_tokens"):
        resolve_generation_settings(GenerationConfig(), temperature=0.0)
    assert GenerationSettings.from_dict(sampled.to_dict()) == sampled
    assert greedy.generate_kwargs() == {"do_sample": False, "max_new_tokens": 8, "repetition_penalty": 1.05}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_resolution_agrees_with_the_engine(temperature: float) -> None:
    pair = build_tiny_pair("qwen2_5_vl")
    pair.target.generation_config.update(**QWEN_LIKE.to_diff_dict())
    drafter = MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer))
    engine = SpeculativeGenerator(pair.target, drafter, pair.processor).resolve_settings(temperature)
    ours = resolve_generation_settings(pair.target.generation_config, temperature=temperature, max_new_tokens=4)
    assert ours.repetition_penalty == engine.repetition_penalty == 1.05
    if temperature > 0:  # greedy: the engine applies no warper either (its top_k / top_p are ignored)
        assert (ours.top_k, ours.top_p) == (engine.top_k, engine.top_p)


def test_distillation_decodes_with_the_checkpoints_settings_and_records_them(tmp_path: Path) -> None:
    pair = build_tiny_pair("qwen2_5_vl")
    # As a checkpoint's generation_config.json may set it; below 1 it favours repeats, which visibly changes this
    # random model's answer (penalties above 1 never bite here: its greedy answer repeats no token).
    pair.target.generation_config.repetition_penalty = 0.5
    data_json, image_root = write_llava(tmp_path, 1)
    answers = {}
    for name, overrides in (("inherited", []), ("explicit", ["distill.repetition_penalty=1.0"])):
        config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root,
                             ["distill.max_new_tokens=12", f"data.distilled_dir={tmp_path / name}", *overrides])
        generate_responses(config, target=pair.target, processor=pair.processor)
        manifest = json.loads((tmp_path / name / MANIFEST_NAME).read_text())
        record = json.loads((tmp_path / name / "shard-00000.jsonl").read_text().splitlines()[0])
        answers[name] = (manifest["generation"], record["conversations"][1]["value"])
    assert answers["inherited"][0]["repetition_penalty"] == 0.5 and answers["explicit"][0]["repetition_penalty"] == 1.0
    # The inherited answer is what target.generate() gives with the checkpoint's own settings.
    adapter = get_adapter(pair.target.config)
    inputs = prompt_inputs(pair.processor, adapter.user_messages("Describe the image."), [random_image(0)])
    with torch.no_grad():
        ids = pair.target.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:]
    assert answers["inherited"][1] == pair.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert answers["inherited"][1] != answers["explicit"][1]
