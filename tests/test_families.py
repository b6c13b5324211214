"""Family adapters, and the transformers 5.x traps they exist to avoid — tested on the real architectures."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaConfig

from massv.families import SUPPORTED_FAMILIES, UnsupportedFamilyError, get_adapter
from tests.conftest import prompt_inputs, random_image


def _target_step_by_step(pair, inputs, num_steps):
    """Greedy decoding driven only by the adapter's prefill/decode kwargs and a KV cache."""
    adapter = get_adapter(pair.target.config)
    input_ids = inputs["input_ids"]
    image_inputs = {name: inputs[name] for name in adapter.image_input_names}
    kwargs, position_state = adapter.target_prefill_kwargs(input_ids, image_inputs, pair.target)
    with torch.no_grad():
        output = pair.target(input_ids=input_ids, use_cache=True, **image_inputs, **kwargs)
        cache, tokens, logits = output.past_key_values, [], [output.logits[:, -1]]
        for _ in range(num_steps - 1):
            token = logits[-1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            past = cache.get_seq_length()
            step_kwargs = adapter.target_decode_kwargs(position_state, torch.arange(past, past + 1))
            output = pair.target(input_ids=token, past_key_values=cache, use_cache=True, **step_kwargs)
            logits.append(output.logits[:, -1])
        tokens.append(int(logits[-1].argmax(-1)))
    return tokens, torch.cat(logits)


def test_adapter_is_chosen_by_model_type(tiny_pair):
    adapter = get_adapter(tiny_pair.target.config)
    assert adapter.model_type == tiny_pair.target.config.model_type
    assert set(SUPPORTED_FAMILIES) == {"qwen2_5_vl", "gemma3"}


def test_unsupported_family_error_lists_supported():
    config = LlavaConfig()
    with pytest.raises(UnsupportedFamilyError) as error:
        get_adapter(config)
    message = str(error.value)
    assert "'llava'" in message and all(family in message for family in SUPPORTED_FAMILIES)


def test_vision_tower_location(tiny_pair):
    adapter = get_adapter(tiny_pair.target.config)
    modules = adapter.vision_modules(tiny_pair.target)
    if adapter.model_type == "qwen2_5_vl":
        assert modules["visual"] is tiny_pair.target.model.visual
    else:
        assert modules["vision_tower"] is tiny_pair.target.model.vision_tower
        assert modules["multi_modal_projector"] is tiny_pair.target.model.multi_modal_projector


def test_projected_features_are_what_the_target_splices(tiny_pair):
    adapter = get_adapter(tiny_pair.target.config)
    inputs = prompt_inputs(tiny_pair, "Describe the image.", random_image(4))
    image_inputs = {name: inputs[name] for name in adapter.image_input_names}
    ours = adapter.encode_images(adapter.vision_modules(tiny_pair.target), image_inputs, "projected")
    with torch.no_grad():
        theirs = tiny_pair.target.model.get_image_features(**image_inputs).pooler_output
    theirs = torch.cat(theirs) if isinstance(theirs, tuple) else theirs.reshape(-1, theirs.shape[-1])
    assert torch.equal(ours, theirs)
    # Handing them back through target_image_kwargs reproduces the target's own forward exactly.
    kwargs, _ = adapter.target_prefill_kwargs(inputs["input_ids"], image_inputs, tiny_pair.target)
    with torch.no_grad():
        reference = tiny_pair.target(**inputs).logits
        shared = tiny_pair.target(input_ids=inputs["input_ids"], **adapter.target_image_kwargs(image_inputs, ours), **kwargs).logits
    torch.testing.assert_close(shared, reference, rtol=1e-5, atol=1e-5)


def test_incremental_decoding_matches_generate(tiny_pair):
    inputs = prompt_inputs(tiny_pair, "How many circles are there?", random_image(5))
    with torch.no_grad():
        expected = tiny_pair.target.generate(**inputs, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    tokens, _ = _target_step_by_step(tiny_pair, inputs, 12)
    assert tokens == expected[0, inputs["input_ids"].shape[1]:].tolist()


def test_qwen_trap_missing_mm_token_type_ids_falls_back_to_1d_positions(tiny_pair):
    if tiny_pair.target.config.model_type != "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL trap")
    inputs = prompt_inputs(tiny_pair, "Where is the green triangle?", random_image(6))
    assert "mm_token_type_ids" in inputs
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        tiny_pair.target.model.rope_deltas = None
        correct = tiny_pair.target(**inputs).logits
        tiny_pair.target.model.rope_deltas = None
        fallback = tiny_pair.target(**without).logits
    assert not torch.allclose(correct, fallback, atol=1e-4), "positions without mm_token_type_ids should differ"
    # The adapter always passes them (explicit 3-D positions), so its prefill matches the correct forward.
    _, logits = _target_step_by_step(tiny_pair, inputs, 1)
    torch.testing.assert_close(logits[0], correct[0, -1], rtol=1e-5, atol=1e-5)


def test_qwen_trap_stale_rope_deltas_do_not_leak(tiny_pair):
    if tiny_pair.target.config.model_type != "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL trap")
    inputs = prompt_inputs(tiny_pair, "What colour is the square?", random_image(8))
    clean_tokens, clean_logits = _target_step_by_step(tiny_pair, inputs, 6)
    tiny_pair.target.model.rope_deltas = torch.tensor([[-37]])  # left behind by some earlier request
    try:
        stale_tokens, stale_logits = _target_step_by_step(tiny_pair, inputs, 6)
    finally:
        tiny_pair.target.model.rope_deltas = None
    assert stale_tokens == clean_tokens
    torch.testing.assert_close(stale_logits, clean_logits, rtol=0, atol=0)


def test_qwen_decode_positions_follow_mrope_delta(tiny_pair):
    if tiny_pair.target.config.model_type != "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL mrope")
    adapter = get_adapter(tiny_pair.target.config)
    inputs = prompt_inputs(tiny_pair, "Describe the image.", random_image(9))
    kwargs, rope_deltas = adapter.target_prefill_kwargs(
        inputs["input_ids"], {"image_grid_thw": inputs["image_grid_thw"]}, tiny_pair.target
    )
    prompt_length = inputs["input_ids"].shape[1]
    # 16 image tokens on a 4x4 grid take 4 positions, so text after the image runs 12 positions behind.
    assert int(rope_deltas) == -12
    assert int(kwargs["position_ids"].max()) + 1 == prompt_length + int(rope_deltas)
    step = adapter.target_decode_kwargs(rope_deltas, torch.arange(prompt_length, prompt_length + 3))["position_ids"]
    assert step.shape == (3, 1, 3) and step[0, 0].tolist() == [prompt_length - 12 + i for i in range(3)]


def test_gemma_trap_missing_token_type_ids_changes_image_attention(tiny_pair):
    if tiny_pair.target.config.model_type != "gemma3":
        pytest.skip("Gemma3 trap")
    inputs = prompt_inputs(tiny_pair, "What colour is the circle?", random_image(10))
    assert "token_type_ids" in inputs
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        correct = tiny_pair.target(**inputs).logits
        causal_only = tiny_pair.target(**without).logits
    assert not torch.allclose(correct, causal_only, atol=1e-4), "image attention should differ without token_type_ids"
    _, logits = _target_step_by_step(tiny_pair, inputs, 1)
    torch.testing.assert_close(logits[0], correct[0, -1], rtol=1e-5, atol=1e-5)


def test_strip_image_tokens_leaves_the_text(tiny_pair):
    adapter = get_adapter(tiny_pair.target.config)
    with_image = prompt_inputs(tiny_pair, "Describe the image.", random_image(11))["input_ids"]
    stripped = adapter.strip_image_tokens(with_image)
    assert not any(int(t) in adapter.image_block_token_ids for t in stripped[0])
    assert stripped.shape[1] == with_image.shape[1] - sum(int((with_image == t).sum()) for t in adapter.image_block_token_ids)
