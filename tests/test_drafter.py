"""The multimodal drafter: splicing, freezing, persistence — for both families."""

from __future__ import annotations

import json

import pytest
import torch

from massv import MultimodalDrafter
from massv.drafter import CONFIG_NAME, VISION_WEIGHTS
from tests.conftest import prompt_inputs, random_image


@pytest.fixture()
def drafter(tiny_pair):
    torch.manual_seed(1)
    lm = type(tiny_pair.drafter_lm)(tiny_pair.drafter_lm.config)  # fresh copy: tests below train it
    lm.load_state_dict(tiny_pair.drafter_lm.state_dict())
    return MultimodalDrafter.from_target(tiny_pair.target, lm, len(tiny_pair.tokenizer))


def _inputs(tiny_pair, seed=0):
    inputs = prompt_inputs(tiny_pair, "What colour is the square?", random_image(seed))
    return inputs


def _image_inputs(drafter, inputs):
    return {name: inputs[name] for name in drafter.adapter.image_input_names}


def test_features_land_exactly_at_placeholders(tiny_pair, drafter):
    inputs = _inputs(tiny_pair)
    input_ids = inputs["input_ids"]
    features = drafter.encode_images(_image_inputs(drafter, inputs))
    embeds = drafter.embed(input_ids, features)

    # Hand computation: walk the sequence, take the next projected feature at each placeholder and the
    # LM's own embedding row elsewhere.
    projected = drafter.projector(features)
    lm_embedding = drafter.language_model.get_input_embeddings()
    placeholder = drafter.config.image_token_id
    next_feature = 0
    for position, token_id in enumerate(input_ids[0].tolist()):
        if token_id == placeholder:
            expected = projected[next_feature]
            next_feature += 1
        else:
            expected = lm_embedding(torch.tensor([token_id]))[0]
        torch.testing.assert_close(embeds[0, position], expected, rtol=0, atol=0)
    assert next_feature == features.shape[0] > 0


def test_placeholder_count_mismatch_is_an_error(tiny_pair, drafter):
    inputs = _inputs(tiny_pair)
    features = drafter.encode_images(_image_inputs(drafter, inputs))
    with pytest.raises(ValueError, match="image features for"):
        drafter.embed(inputs["input_ids"], features[:-1])
    with pytest.raises(ValueError, match="no image was given"):
        drafter.embed(inputs["input_ids"], None)


def test_gemma_image_token_is_outside_drafter_vocab_and_never_looked_up(tiny_pair, drafter):
    if tiny_pair.target.config.model_type != "gemma3":
        pytest.skip("Gemma3-specific vocabulary relation")
    assert drafter.config.image_token_id >= drafter.language_model.config.vocab_size
    inputs = _inputs(tiny_pair)
    output = drafter(inputs["input_ids"], image_inputs=_image_inputs(drafter, inputs))
    assert torch.isfinite(output.logits[..., : drafter.config.draftable_vocab_size]).all()


def test_qwen_embeddings_padded_differently_but_same_tokenizer(tiny_pair, drafter):
    if tiny_pair.target.config.model_type != "qwen2_5_vl":
        pytest.skip("Qwen-specific vocabulary relation")
    target_rows = tiny_pair.target.config.text_config.vocab_size
    drafter_rows = tiny_pair.drafter_lm.config.vocab_size
    assert target_rows != drafter_rows and min(target_rows, drafter_rows) >= len(tiny_pair.tokenizer)
    assert drafter.config.draftable_vocab_size == len(tiny_pair.tokenizer)


def test_padding_rows_can_never_be_drafted(tiny_pair, drafter):
    inputs = _inputs(tiny_pair)
    logits = drafter(inputs["input_ids"], image_inputs=_image_inputs(drafter, inputs)).logits
    limit = drafter.config.draftable_vocab_size
    if logits.shape[-1] > limit:
        assert torch.isneginf(logits[..., limit:]).all()
    assert int(logits.argmax(-1).max()) < limit


def _snapshot(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_phase1_trains_projector_only_and_vision_never_changes(tiny_pair, drafter):
    drafter.set_trainable("phase1")
    vision_before = {name: _snapshot(module) for name, module in drafter.vision_modules.items()}
    lm_before = _snapshot(drafter.language_model)
    projector_before = _snapshot(drafter.projector)
    inputs = _inputs(tiny_pair)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= drafter.config.draftable_vocab_size, -100)

    trainable = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    drafter.train()
    loss = drafter(inputs["input_ids"], image_inputs=_image_inputs(drafter, inputs), labels=labels).loss
    loss.backward()

    with_grad = {name for name, p in drafter.named_parameters() if p.grad is not None}
    assert with_grad and all(name.startswith("projector.") for name in with_grad)
    for module in drafter.vision_modules.values():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    optimizer.step()

    for name, module in drafter.vision_modules.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, vision_before[name][key]), f"vision weight {name}.{key} changed"
    for key, value in drafter.language_model.state_dict().items():
        assert torch.equal(value, lm_before[key]), f"LM weight {key} changed in phase 1"
    assert any(not torch.equal(v, projector_before[k]) for k, v in drafter.projector.state_dict().items())


def test_phase2_trains_projector_and_lm_not_vision(tiny_pair, drafter):
    drafter.set_trainable("phase2")
    names = {name for name, p in drafter.named_parameters() if p.requires_grad}
    assert any(n.startswith("language_model.") for n in names) and any(n.startswith("projector.") for n in names)
    assert all(not p.requires_grad for m in drafter.vision_modules.values() for p in m.parameters())


def test_shared_vision_is_not_copied_or_saved(tiny_pair, drafter, tmp_path):
    target_vision = drafter.adapter.vision_modules(tiny_pair.target)
    for name, module in drafter.vision_modules.items():
        assert module is target_vision[name]
    assert not any(key.startswith("vision") for key in drafter.state_dict())
    drafter.save_pretrained(tmp_path / "drafter")
    assert not (tmp_path / "drafter" / VISION_WEIGHTS).exists()
    with pytest.raises(RuntimeError, match="no vision encoder"):
        MultimodalDrafter.from_pretrained(tmp_path / "drafter").encode_images({})


@pytest.mark.parametrize("with_vision", [False, True])
def test_save_load_gives_bit_identical_logits(tiny_pair, drafter, tmp_path, with_vision):
    torch.manual_seed(3)
    with torch.no_grad():  # make the projector non-trivial so a lost weight would show
        for parameter in drafter.projector.parameters():
            parameter.add_(torch.randn_like(parameter))
    inputs = _inputs(tiny_pair, seed=7)
    image_inputs = _image_inputs(drafter, inputs)
    expected = drafter(inputs["input_ids"], image_inputs=image_inputs).logits
    drafter.save_pretrained(tmp_path / "drafter", include_vision_encoder=with_vision)
    config = json.loads((tmp_path / "drafter" / CONFIG_NAME).read_text())
    assert config["includes_vision_encoder"] is with_vision and config["family"] == tiny_pair.target.config.model_type
    loaded = MultimodalDrafter.from_pretrained(tmp_path / "drafter", target=None if with_vision else tiny_pair.target)
    actual = loaded(inputs["input_ids"], image_inputs=image_inputs).logits
    assert torch.equal(expected, actual)
    if with_vision:  # a real copy, independent of the target
        for module in loaded.vision_modules.values():
            assert all(p.data_ptr() not in {q.data_ptr() for q in tiny_pair.target.parameters()} for p in module.parameters())


def test_missing_drafter_directory_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a MASSV drafter directory"):
        MultimodalDrafter.from_pretrained(tmp_path)


def test_pre_merger_features_feed_a_drafter(tiny_pair):
    drafter = MultimodalDrafter.from_target(
        tiny_pair.target, tiny_pair.drafter_lm, len(tiny_pair.tokenizer), vision_feature="pre_merger"
    )
    inputs = _inputs(tiny_pair)
    features = drafter.encode_images(_image_inputs(drafter, inputs))
    assert features.shape == (int((inputs["input_ids"] == drafter.config.image_token_id).sum()), drafter.config.vision_feature_dim)
    assert drafter.config.vision_feature_dim == drafter.adapter.feature_dim("pre_merger")
