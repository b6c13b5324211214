"""Training: answer-only labels, phase 1 freezing, phase 2 learning, exact resume, configs, accelerate launch.

All on the tiny random real-architecture models of both families (CPU, a few steps each).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from massv import MultimodalDrafter
from massv.config import ConfigError, load_config
from massv.families import get_adapter
from massv.tiny import build_tiny_pair
from massv.train import train_phase
from massv.train.builders import build_drafter, load_phase1_drafter, load_phase_records
from massv.train.data import (
    IGNORE_INDEX,
    ConversationFormatError,
    DrafterCollator,
    ExampleDropped,
    encode_example,
    pad_token_id,
)
from massv.train.distill import generate_responses
from massv.train.llava_data import ImageError
from massv.train.loop import ResumeError, checkpoint_dirs
from tests.conftest import random_image
from tests.helpers_train import REPO, TINY_CONFIG, build_pair, one_thread, tiny_config, turn, write_llava  # noqa: F401

FAMILIES = ("qwen2_5_vl", "gemma3")
CONVERSATION = [turn("human", "<image>\nWhat colour is the square?"), turn("gpt", "The square is blue."),
                turn("human", "How many triangles are there?"), turn("gpt", "There are three.")]


def fresh_drafter(pair, config) -> MultimodalDrafter:
    torch.manual_seed(0)
    return build_drafter(config.model, pair.target, pair.drafter_lm, pair.processor)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# --------------------------------------------------------------------------------------------------
# Data: labels, truncation, collation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_only_on_answers_with_end_of_turn(family: str) -> None:
    pair = build_tiny_pair(family)
    adapter = get_adapter(pair.target.config)
    example = encode_example(CONVERSATION, random_image(0), pair.processor, adapter, max_length=1024)
    tokenizer = pair.processor.tokenizer
    eot = adapter.end_of_turn_token
    answer_text = tokenizer.decode(example.labels[example.labels != IGNORE_INDEX])
    assert answer_text == f"The square is blue.{eot}There are three.{eot}"
    # Labels are aligned with input_ids, and the image block is expanded by the processor (one id per feature).
    supervised = example.labels != IGNORE_INDEX
    assert torch.equal(example.input_ids[supervised], example.labels[supervised])
    expected_image_tokens = (adapter.tokens_per_image if family == "gemma3" else
                             int(example.image_inputs["image_grid_thw"].prod()) // 4)
    assert int((example.input_ids == adapter.image_token_id).sum()) == expected_image_tokens
    # The same ids the target's processor produces for the whole conversation.
    messages = [*adapter.user_messages("What colour is the square?"),
                {"role": "assistant", "content": [{"type": "text", "text": "The square is blue."}]},
                *adapter.user_messages("How many triangles are there?", num_images=0),
                {"role": "assistant", "content": [{"type": "text", "text": "There are three."}]}]
    text = pair.processor.apply_chat_template(messages, tokenize=False)
    reference = pair.processor(text=[text], images=[[random_image(0)]], add_special_tokens=False, return_tensors="pt")
    assert torch.equal(example.input_ids, reference["input_ids"][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_keeps_the_image_block_or_drops_the_sample(family: str) -> None:
    pair = build_tiny_pair(family)
    adapter = get_adapter(pair.target.config)
    full = encode_example(CONVERSATION, random_image(0), pair.processor, adapter, max_length=1024)
    length = int(full.input_ids.shape[0])
    cut = encode_example(CONVERSATION, random_image(0), pair.processor, adapter, max_length=length - 3)
    assert torch.equal(cut.input_ids, full.input_ids[: length - 3])
    assert torch.equal(cut.labels, full.labels[: length - 3])
    last_image_position = int((full.input_ids == adapter.image_token_id).nonzero().max())
    with pytest.raises(ExampleDropped, match="image block"):
        encode_example(CONVERSATION, random_image(0), pair.processor, adapter, max_length=last_image_position)


@pytest.mark.parametrize("family", FAMILIES)
def test_collator_pads_right_and_joins_images(family: str) -> None:
    pair = build_tiny_pair(family)
    adapter = get_adapter(pair.target.config)
    long = encode_example(CONVERSATION, random_image(0), pair.processor, adapter, 1024)
    short = encode_example(CONVERSATION[:2], random_image(1), pair.processor, adapter, 1024)
    text = encode_example([turn("human", "Hi"), turn("gpt", "Hello.")], None, pair.processor, adapter, 1024)
    items = [{"input_ids": e.input_ids, "labels": e.labels, "image_inputs": e.image_inputs} for e in (long, short, text)]
    batch = DrafterCollator(pad_token_id(pair.processor), adapter.image_input_names)(items)
    n_long, n_short = len(long.input_ids), len(short.input_ids)
    assert batch["input_ids"].shape == (3, n_long)
    assert batch["attention_mask"][1].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert (batch["input_ids"][1, n_short:] == pad_token_id(pair.processor)).all()
    assert (batch["labels"][1, n_short:] == IGNORE_INDEX).all()
    for name in adapter.image_input_names:  # two images, in batch order; the text-only sample adds none
        assert torch.equal(batch["image_inputs"][name], torch.cat([long.image_inputs[name], short.image_inputs[name]]))
    # The drafter accepts the batch: placeholders and image features line up.
    drafter = fresh_drafter(pair, load_config(TINY_CONFIG))
    assert torch.isfinite(drafter(**batch).loss)


def test_template_whose_prompt_is_not_a_prefix_is_refused() -> None:
    pair = build_tiny_pair("qwen2_5_vl")
    adapter = get_adapter(pair.target.config)
    processor = copy.copy(pair.processor)
    # The generation prompt says "assistant" but answers are rendered under another role name.
    processor.chat_template = pair.processor.chat_template.replace(
        "<|im_start|>{{ message['role'] }}", "<|im_start|>{{ 'bot' if message['role'] == 'assistant' else message['role'] }}"
    )
    with pytest.raises(ConversationFormatError, match="not a token prefix"):
        encode_example(CONVERSATION, random_image(0), processor, adapter, 1024)


def test_missing_and_corrupt_images_are_skipped_and_counted_or_raise_when_strict(tmp_path: Path) -> None:
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": [turn("human", "<image>\nHi"), turn("gpt", "Hi.")]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [turn("human", "<image>\nHi"), turn("gpt", "Hi.")]},
    ]
    data_json, image_root = write_llava(tmp_path, 3, extra=bad)
    (image_root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root)
    records, report = load_phase_records(config, 1)
    assert (report.total, report.kept, len(records)) == (5, 3, 3)
    assert report.missing_images == ["missing"] and report.corrupt_images == ["corrupt"]
    strict = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root, ["data.strict_images=true"])
    with pytest.raises(ImageError, match="missing|corrupt"):
        load_phase_records(strict, 1)


# --------------------------------------------------------------------------------------------------
# Phase 1 and phase 2
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_phase1_trains_only_the_projector_and_saves_a_loadable_drafter(tmp_path: Path, family: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    data_json, image_root = write_llava(tmp_path, 4)
    config = tiny_config(tmp_path, family, data_json, image_root,
                         ["phase1.max_steps=3", "phase1.save_every_steps=null", "phase1.tensorboard=true"])
    pair = build_pair(family)
    drafter = fresh_drafter(pair, config)
    lm_before, projector_before = snapshot(drafter.language_model), snapshot(drafter.projector)
    vision_before = {name: snapshot(module) for name, module in drafter.vision_modules.items()}

    result = train_phase(config, 1, target=pair.target, drafter=drafter, processor=pair.processor)

    assert result.train.finished and result.train.state.step == 3
    if importlib.util.find_spec("tensorboard") is None:  # optional: training goes on without it
        assert "TensorBoard is not installed" in caplog.text
    assert same(snapshot(result.drafter.language_model), lm_before)  # frozen LM: bit-identical
    for name, module in result.drafter.vision_modules.items():  # frozen vision encoder: bit-identical
        assert same(snapshot(module), vision_before[name])
    projector_after = snapshot(result.drafter.projector)
    assert all(not torch.equal(projector_after[key], projector_before[key]) for key in projector_before)
    loaded = MultimodalDrafter.from_pretrained(result.final_path, target=pair.target)
    assert same(snapshot(loaded.projector), projector_after)
    assert same(snapshot(loaded.language_model), lm_before)
    assert (Path(config.phase1.output_dir) / "resolved_config.yaml").is_file()
    # Phase 2 picks the phase-1 drafter up from phase1.output_dir/final.
    assert same(snapshot(load_phase1_drafter(config, pair.target).projector), projector_after)


@pytest.mark.parametrize("family", FAMILIES)
def test_phase2_loss_falls_on_target_generated_answers(tmp_path: Path, family: str) -> None:
    data_json, image_root = write_llava(tmp_path, 4)
    config = tiny_config(tmp_path, family, data_json, image_root, [
        "distill.max_new_tokens=12", "phase2.max_steps=40", "phase2.learning_rate=3e-3",
        "phase2.save_every_steps=null", "phase2.log_every_steps=10",
    ])
    pair = build_pair(family)
    distilled = generate_responses(config, target=pair.target, processor=pair.processor)
    assert distilled.complete and distilled.num_records == 4
    drafter = fresh_drafter(pair, config)  # stands in for the phase-1 drafter
    lm_before = snapshot(drafter.language_model)

    result = train_phase(config, 2, target=pair.target, drafter=drafter, processor=pair.processor,
                         cache_image_features=True)

    losses = result.train.step_losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{family}: phase-2 loss {first:.3f} -> {last:.3f} ({1 - last / first:.0%} lower) over {len(losses)} steps")
    assert len(losses) == 40
    assert last <= 0.7 * first  # at least 30% lower
    assert not same(snapshot(result.drafter.language_model), lm_before)  # phase 2 tunes the LM too
    loaded = MultimodalDrafter.from_pretrained(result.final_path, target=pair.target)
    assert same(snapshot(loaded.language_model), snapshot(result.drafter.language_model))


@pytest.mark.parametrize(("family", "lora"), [("qwen2_5_vl", False), ("gemma3", True)])
def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path: Path, family: str, lora: bool) -> None:
    # 9 samples, batch 2 -> 5 micro-batches per epoch; accumulation 2 -> 3 optimizer steps per epoch (the last
    # one on a single micro-batch). Checkpoint 4 sits mid-epoch, so resuming skips micro-batches.
    data_json, image_root = write_llava(tmp_path, 9)
    settings = ["phase2.max_steps=7", "phase2.gradient_accumulation_steps=2", "phase2.save_every_steps=2",
                "phase2.keep_last_checkpoints=1", "phase2.warmup_ratio=0.2", "phase2.weight_decay=0.01"]
    if lora:  # dropout draws from the global RNG, so this also checks that RNG states are restored
        settings += ["phase2.lora.r=4", "phase2.lora.dropout=0.1", "phase2.lora.target_modules=[q_proj,v_proj]"]

    def run(output_dir: Path, **kwargs):
        config = tiny_config(tmp_path, family, data_json, image_root, settings + [f"phase2.output_dir={output_dir}"])
        pair = build_pair(family)  # a new process would rebuild exactly these weights
        records = load_phase_records(config, 1)[0]  # the captions stand in for target answers here
        return train_phase(config, 2, target=pair.target, drafter=fresh_drafter(pair, config),
                           processor=pair.processor, dataset=records, cache_image_features=True, **kwargs)

    uninterrupted = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", stop_after_steps=5)  # "killed" after step 5; checkpoint-4 is the latest
    assert not interrupted.train.finished and interrupted.final_path is None
    assert [path.name for path in checkpoint_dirs(tmp_path / "b")] == ["checkpoint-4"]  # keep_last_checkpoints=1
    resumed = run(tmp_path / "b", resume=True)

    assert resumed.train.finished and resumed.train.state.step == 7
    assert len(resumed.train.step_losses) == 3  # steps 5, 6, 7
    assert resumed.train.step_losses == uninterrupted.train.step_losses[4:]
    assert same(snapshot(resumed.drafter), snapshot(uninterrupted.drafter))
    final_a = MultimodalDrafter.from_pretrained(uninterrupted.final_path)
    final_b = MultimodalDrafter.from_pretrained(resumed.final_path)
    assert same(snapshot(final_a), snapshot(final_b))

    with pytest.raises(ResumeError, match="already holds checkpoint-"):  # no silent restart over a run
        run(tmp_path / "b")
    config_other_batch = settings + ["phase2.per_device_batch_size=3"]
    with pytest.raises(ResumeError, match="per_device_batch_size"):
        config = tiny_config(tmp_path, family, data_json, image_root,
                             config_other_batch + [f"phase2.output_dir={tmp_path / 'b'}"])
        pair = build_pair(family)
        train_phase(config, 2, target=pair.target, drafter=fresh_drafter(pair, config), processor=pair.processor,
                    dataset=load_phase_records(config, 1)[0], resume=True)


def test_phase2_without_phase1_result_says_to_run_phase1(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "qwen2_5_vl")
    with pytest.raises(FileNotFoundError, match="run phase 1 first"):
        load_phase1_drafter(config, build_tiny_pair("qwen2_5_vl").target)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def test_misspelled_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(TINY_CONFIG.read_text().replace("learning_rate: 1e-3\n  warmup_ratio", "learnig_rate: 1e-3\n  warmup_ratio", 1))
    with pytest.raises(ConfigError, match="unknown key 'learnig_rate' in section 'phase1'.*did you mean 'learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key 'max_step'.*did you mean 'max_steps'"):
        load_config(TINY_CONFIG, ["phase1.max_step=3"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_config_loads_and_validates(path: Path) -> None:
    config = load_config(path)  # no weights are downloaded: only the YAML is read and checked
    assert config.model.target and config.model.drafter_lm


def test_release_configs_follow_the_paper() -> None:
    expected = {
        "qwen2_5_vl_7b.yaml": ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        "qwen2_5_vl_3b.yaml": ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        "gemma3_12b.yaml": ("google/gemma-3-12b-it", "google/gemma-3-1b-it"),
        "gemma3_4b.yaml": ("google/gemma-3-4b-it", "google/gemma-3-270m"),
    }
    for name, (target, drafter_lm) in expected.items():
        config = load_config(REPO / "configs" / name)
        assert (config.model.target, config.model.drafter_lm) == (target, drafter_lm)
        assert config.phase1.learning_rate == pytest.approx(1e-3) and config.phase2.learning_rate == pytest.approx(2e-5)
        assert config.phase1.num_epochs == 1 and config.phase2.num_epochs == 1
        assert config.phase1.lr_scheduler == config.phase2.lr_scheduler == "cosine"
        assert config.phase1.warmup_ratio == config.phase2.warmup_ratio == pytest.approx(0.03)


# --------------------------------------------------------------------------------------------------
# accelerate launch
# --------------------------------------------------------------------------------------------------


def _overrides(tmp_path: Path, data_json: Path, image_root: Path) -> list[str]:
    return [f"data.pretrain_json={data_json}", f"data.pretrain_image_root={image_root}",
            f"data.instruct_json={data_json}", f"data.instruct_image_root={image_root}",
            f"data.distilled_dir={tmp_path / 'distilled'}", f"phase1.output_dir={tmp_path / 'phase1'}",
            f"phase2.output_dir={tmp_path / 'phase2'}", "phase1.max_steps=2", "phase2.max_steps=2",
            "distill.max_new_tokens=4"]


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def test_accelerate_launch_phase1_on_cpu(tmp_path: Path) -> None:
    data_json, image_root = write_llava(tmp_path, 4)
    _run(LAUNCH + ["-m", "massv.train", "--config", str(TINY_CONFIG), "--phase", "1",
                   "--override", *_overrides(tmp_path, data_json, image_root)], tmp_path)
    drafter = MultimodalDrafter.from_pretrained(tmp_path / "phase1" / "final", target=build_tiny_pair("qwen2_5_vl").target)
    assert drafter.config.family == "qwen2_5_vl"
    assert (tmp_path / "phase1" / "resolved_config.yaml").is_file()


@pytest.mark.slow
def test_accelerate_launch_runs_phase1_distill_phase2_on_cpu(tmp_path: Path) -> None:
    data_json, image_root = write_llava(tmp_path, 4)
    overrides = _overrides(tmp_path, data_json, image_root)
    _run(LAUNCH + ["-m", "massv.train", "--config", str(TINY_CONFIG), "--phase", "1", "--override", *overrides], tmp_path)
    _run([sys.executable, str(REPO / "data_prep" / "generate_responses.py"), "--config", str(TINY_CONFIG),
          "--override", *overrides], tmp_path)
    _run(LAUNCH + ["-m", "massv.train", "--config", str(TINY_CONFIG), "--phase", "2", "--override", *overrides], tmp_path)
    target = build_tiny_pair("qwen2_5_vl").target
    phase1 = MultimodalDrafter.from_pretrained(tmp_path / "phase1" / "final", target=target)
    phase2 = MultimodalDrafter.from_pretrained(tmp_path / "phase2" / "final", target=target)
    assert not torch.equal(phase1.projector.layers[0].weight, phase2.projector.layers[0].weight)
