"""The multimodal drafter: splicing, freezing, persistence — for both families."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from massv import MultimodalDrafter
from massv.drafter import CONFIG_NAME, VISION_WEIGHTS
from massv.errors import CorruptFileError, DrafterMismatchError, InputError
from massv.tiny import build_tiny_pair
from tests.conftest import prompt_inputs, random_image

REPO = Path(__file__).resolve().parents[1]


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


# ---- Hugging Face conventions: files, modes, model card, Hub ids, push_to_hub, size checks ------------------


def _umask(value: int) -> int:
    previous = os.umask(value)
    return previous


def test_saved_drafter_is_a_readable_hub_style_directory(tiny_pair, drafter, tmp_path):
    previous = _umask(0o022)
    try:
        path = drafter.save_pretrained(tmp_path / "final")
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(path)): stat.S_IMODE(p.stat().st_mode) for p in [path, *path.rglob("*")]}
    assert modes["."] == 0o755 and modes["language_model"] == 0o755  # another user or a container can read it
    assert {mode for name, mode in modes.items() if (path / name).is_file()} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no staging folder left
    hub_config = json.loads((path / "config.json").read_text())
    assert hub_config["model_type"] == "massv_drafter" and hub_config["architectures"] == ["MultimodalDrafter"]
    assert hub_config["family"] == tiny_pair.target.config.model_type
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: massv\n") and f"- {drafter.config.family}" in card
    assert f"hidden size {drafter.config.lm_hidden_size}" in card and "Not measured yet" in card


def test_model_card_lists_training_data_and_mal(tiny_pair, drafter, tmp_path):
    from massv.drafter import record_evaluation
    from massv.model_card import evaluation_entry

    drafter.config.training_data["phase1"] = "image-caption pairs data/captions.json"
    path = drafter.save_pretrained(tmp_path / "final")
    summary = {"settings": {"num_draft_tokens": 5, "temperature": 0.0, "max_new_tokens": 64}, "num_samples": 40,
               "mean_accepted_length": 4.3912, "acceptance_rate": 0.71, "speedup": 1.93}
    record_evaluation(path, evaluation_entry("world", summary))
    record_evaluation(path, evaluation_entry("world", {**summary, "mean_accepted_length": 4.5}))  # same setting: replaced
    card = (path / "README.md").read_text()
    assert "- phase1: `image-caption pairs data/captions.json`" in card
    assert "| world | 5 | 0 | 64 | 40 | 4.50 | 71.0% | 1.93x |" in card and "4.39" not in card
    reloaded = MultimodalDrafter.from_pretrained(path, target=tiny_pair.target)
    assert reloaded.config.evaluations == [evaluation_entry("world", {**summary, "mean_accepted_length": 4.5})]


HUB_ID = "massv-test/tiny-drafter"
LOAD_FROM_HUB = """
import json, sys, torch
from massv import MultimodalDrafter
from massv.tiny import build_tiny_pair
from tests.conftest import prompt_inputs, random_image
torch.set_num_threads(1)
pair = build_tiny_pair(sys.argv[1], seed=0)
drafter = MultimodalDrafter.from_pretrained(sys.argv[2], target=pair.target)
inputs = prompt_inputs(pair, "What colour is the square?", random_image(7))
logits = drafter(inputs["input_ids"], image_inputs={k: inputs[k] for k in drafter.adapter.image_input_names}).logits
torch.save(logits, sys.argv[3])
try:
    MultimodalDrafter.from_pretrained("massv-test/not-in-the-cache", target=pair.target)
except FileNotFoundError as error:
    print("MISSING:", error)
"""


def test_push_to_hub_then_from_pretrained_by_hub_id_offline(tiny_pair, drafter, tmp_path, monkeypatch):
    """push_to_hub uploads the saved directory; from_pretrained("owner/name") reads it back through
    huggingface_hub, here from a pre-filled cache with HF_HUB_OFFLINE=1 set when the process starts."""
    if tiny_pair.target.config.model_type != "qwen2_5_vl":
        pytest.skip("the Hub path is family-independent; one family keeps the suite fast")
    import huggingface_hub

    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in drafter.projector.parameters():
            parameter.add_(torch.randn_like(parameter))
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    snapshot = cache / "models--massv-test--tiny-drafter" / "snapshots" / commit
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        uploads.append(("create_repo", repo_id, kwargs.get("private")))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):  # what the Hub would store: the folder's files
        uploads.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        shutil.copytree(folder_path, snapshot)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert drafter.push_to_hub(HUB_ID, private=True) == "commit-info"
    assert uploads[0] == ("create_repo", HUB_ID, True)
    assert uploads[1] == ("upload_folder", HUB_ID, ["README.md", "config.json", "language_model", CONFIG_NAME,
                                                   "projector.safetensors"])
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)

    inputs = _inputs(tiny_pair, seed=7)
    expected = drafter(inputs["input_ids"], image_inputs=_image_inputs(drafter, inputs)).logits
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", LOAD_FROM_HUB, "qwen2_5_vl", HUB_ID, str(tmp_path / "logits.pt")],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert "MISSING: massv-test/not-in-the-cache is not a local directory, and the Hub could not provide it" in result.stdout


def _resized_target(pair, factor: int = 2):
    """The tiny target with a wider LM (and so wider projected image features): 'another size' of the family."""
    config = copy.deepcopy(pair.target.config)
    config.text_config.hidden_size *= factor
    if config.model_type == "qwen2_5_vl":
        config.vision_config.out_hidden_size = config.text_config.hidden_size
    torch.manual_seed(0)
    return type(pair.target)(config).eval()


def test_drafter_for_another_target_size_is_refused_on_load(tiny_pair, drafter, tmp_path):
    path = drafter.save_pretrained(tmp_path / "final")
    bigger = _resized_target(tiny_pair)
    width = drafter.config.vision_feature_dim
    with pytest.raises(DrafterMismatchError, match=rf"vision feature width: drafter {width}, target {2 * width}"):
        MultimodalDrafter.from_pretrained(path, target=bigger)
    other_family = build_tiny_pair("gemma3" if drafter.config.family == "qwen2_5_vl" else "qwen2_5_vl").target
    with pytest.raises(DrafterMismatchError, match="was trained for a"):
        MultimodalDrafter.from_pretrained(path, target=other_family)


def test_broken_drafter_directories_say_what_and_where(tiny_pair, drafter, tmp_path):
    path = drafter.save_pretrained(tmp_path / "final")
    projector = path / "projector.safetensors"
    projector.write_bytes(projector.read_bytes()[:-7])
    with pytest.raises(CorruptFileError, match=rf"{projector} is not a complete safetensors file"):
        MultimodalDrafter.from_pretrained(path, target=tiny_pair.target)
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "train_state.json").write_text("{}")
    with pytest.raises(InputError, match=r"checkpoint-5 is a training checkpoint, not a drafter: .*massv export"):
        MultimodalDrafter.from_pretrained(checkpoint)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        MultimodalDrafter.from_pretrained(tmp_path / "nowhere" / "final")
