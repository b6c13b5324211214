"""Training at real scale, proven on the tiny pairs: answer-only loss, DDP-safe text-only batches, truncated
answers, preprocessing once, token-budget batches, global batch, timeouts, refused sharded modes, the
target's LM released, Qwen's pixel range, and distillation's claimed shards."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import massv.train.preprocess as preprocess
from massv import MultimodalDrafter
from massv.chat import prompt_inputs
from massv.config import ConfigError, load_config
from massv.families import get_adapter
from massv.tiny import build_tiny_pair
from massv.train import train_phase
from massv.train.batching import TokenBudgetBatchSampler, resolve_accumulation
from massv.loading import build_models
from massv.train.builders import build_drafter, resolve_objects
from massv.train.data import IGNORE_INDEX, DrafterCollator, DrafterDataset, ExampleDropped, encode_example, pad_token_id
from massv.train.distill import CLAIMS_DIR, generate_responses
from massv.train.llava_data import load_llava_records
from massv.train.loop import UnsupportedDistributedModeError, make_accelerator
from massv.train.loss import answer_token_loss
from tests.conftest import random_image
from tests.helpers_train import TINY_CONFIG, build_pair, one_thread, tiny_config, turn, write_llava  # noqa: F401

FAMILIES = ("qwen2_5_vl", "gemma3")


def fresh_drafter(pair, config=None) -> MultimodalDrafter:
    torch.manual_seed(0)
    return build_drafter((config or load_config(TINY_CONFIG)).model, pair.target, pair.drafter_lm, pair.processor)


def image_batch(pair, drafter) -> dict:
    """Two samples with images, the second padded; answers at the end."""
    adapter = get_adapter(pair.target.config)

    examples = [encode_example([turn("human", "<image>\nDescribe the image."), turn("gpt", text)], random_image(i),
                               pair.processor, adapter, 1024)
                for i, text in enumerate(["There are two red circles at the top left.", "A blue square."])]
    items = [{"input_ids": e.input_ids, "labels": e.labels, "image_inputs": e.image_inputs} for e in examples]
    return DrafterCollator(pad_token_id(pair.processor), adapter.image_input_names)(items)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_only_loss_and_gradients_equal_full_logit_cross_entropy(family: str) -> None:
    pair = build_pair(family)
    if family == "gemma3":  # Gemma 2-style final soft-capping must be applied exactly as the model applies it
        pair.drafter_lm.config.final_logit_softcapping = 5.0
    drafter = fresh_drafter(pair)
    drafter.set_trainable("phase2")
    batch = image_batch(pair, drafter)

    def grads() -> dict[str, torch.Tensor]:
        found = {name: param.grad.clone() for name, param in drafter.named_parameters() if param.grad is not None}
        drafter.zero_grad(set_to_none=True)
        return found

    output = drafter(**batch)
    assert output.logits is None  # no full-vocabulary logits in training
    output.loss.backward()
    ours = grads()
    logits = drafter(batch["input_ids"], attention_mask=batch["attention_mask"],
                     image_inputs=batch["image_inputs"]).logits  # -inf past the draftable ids
    labels = batch["labels"][:, 1:]
    reference = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=IGNORE_INDEX)
    reference.backward()
    theirs = grads()
    torch.testing.assert_close(output.loss, reference, rtol=1e-6, atol=1e-6)
    assert ours.keys() == theirs.keys() and any(name.startswith("projector.") for name in ours)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


def test_chunked_head_gives_the_same_loss_and_gradient_for_any_chunk_size() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    labels = torch.randint(0, 40, (3, 7))
    labels[0, :3] = IGNORE_INDEX
    head = nn.Linear(16, 50, bias=False)
    results = []
    for chunk in (1, 4, 1000):
        loss = answer_token_loss(hidden, labels, head, vocab_limit=40, chunk_tokens=chunk)
        gradient = torch.autograd.grad(loss, [hidden, head.weight])
        results.append((loss.detach(), gradient))
    logits = head(hidden)[:, :-1, :40]
    expected = nn.functional.cross_entropy(logits.reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    for loss, gradient in results:
        torch.testing.assert_close(loss, expected.detach())
        for ours, theirs in zip(gradient, results[0][1]):
            torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="outside the 10 ids"):
        answer_token_loss(hidden, labels.clamp(min=0) + 30, head, vocab_limit=10)


def test_text_only_micro_batch_gives_the_projector_an_exact_zero_gradient() -> None:
    # Under DDP every process must produce every trainable weight's gradient each step (tests/test_multiprocess.py).
    pair = build_pair("qwen2_5_vl")
    drafter = fresh_drafter(pair)
    drafter.set_trainable("phase2")
    adapter = get_adapter(pair.target.config)
    example = encode_example([turn("human", "How many?"), turn("gpt", "There are three.")], None, pair.processor,
                             adapter, 1024)
    loss = drafter(example.input_ids[None], labels=example.labels[None]).loss
    loss.backward()
    for param in drafter.projector.parameters():
        assert param.grad is not None and not param.grad.any()
    assert drafter.language_model.get_input_embeddings().weight.grad.any()


# --------------------------------------------------------------------------------------------------
# Data: truncated answers, preprocessing once
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_an_answer_cut_at_max_new_tokens_does_not_teach_stopping(family: str) -> None:
    pair = build_pair(family)
    adapter = get_adapter(pair.target.config)
    eot = pair.processor.tokenizer.convert_tokens_to_ids(adapter.end_of_turn_token)
    conversation = [turn("human", "<image>\nDescribe."), turn("gpt", "There are two red"),
                    turn("human", "And?"), turn("gpt", "A blue square.")]
    finished = encode_example(conversation, random_image(0), pair.processor, adapter, 1024, truncated=[False, False])
    cut = encode_example(conversation, random_image(0), pair.processor, adapter, 1024, truncated=[True, False])
    eot_positions = (finished.input_ids == eot).nonzero().flatten().tolist()
    answer_ends = [p for p in eot_positions if finished.labels[p] != IGNORE_INDEX]
    assert len(answer_ends) == 2
    assert cut.labels[answer_ends[0]] == IGNORE_INDEX and cut.labels[answer_ends[1]] == eot  # only the cut one
    changed = (finished.labels != cut.labels).nonzero().flatten().tolist()
    assert changed == [answer_ends[0]]  # every answer token still carries loss
    with pytest.raises(ExampleDropped) as dropped:
        encode_example(conversation, random_image(0), pair.processor, adapter, 1024, truncated=[True, False],
                       truncated_answers="drop")
    assert dropped.value.reason == "truncated"


def test_distilled_truncation_flags_reach_the_training_examples(tmp_path: Path) -> None:
    data_json, image_root = write_llava(tmp_path, 3)
    records = json.loads(data_json.read_text())
    records[0]["truncated"], records[1]["truncated"] = [True], [False]
    records[2]["truncated"] = [True, True]  # one flag per gpt turn: this record is invalid
    data_json.write_text(json.dumps(records))
    loaded, report = load_llava_records(data_json, image_root)
    assert loaded["truncated"] == [[True], [False]] and len(report.invalid_records) == 1
    pair = build_pair("qwen2_5_vl")
    adapter = get_adapter(pair.target.config)
    masked = DrafterDataset(loaded, pair.processor, adapter, 1024)
    assert masked.report.kept == 2 and masked.report.num_open_answers == 1
    dropped = DrafterDataset(loaded, pair.processor, adapter, 1024, truncated_answers="drop")
    assert dropped.report.kept == 1 and dropped.report.truncated == ["sample-0"]


def test_preprocessing_runs_once_on_the_main_process_and_is_reused_on_resume(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data_json, image_root = write_llava(tmp_path, 4)
    calls: list[int] = []
    real_check = preprocess.check_records

    def counting_check(records, *args, **kwargs):
        calls.append(len(records))
        return real_check(records, *args, **kwargs)

    monkeypatch.setattr(preprocess, "check_records", counting_check)
    settings = ["phase1.max_steps=3", "phase1.save_every_steps=2"]

    def run(extra: list[str], **kwargs):
        config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root, settings + extra)
        pair = build_pair("qwen2_5_vl")
        return train_phase(config, 1, target=pair.target, drafter=fresh_drafter(pair, config),
                           processor=pair.processor, **kwargs)

    run([], stop_after_steps=2)
    assert calls == [4]
    assert run([], resume=True).train.finished
    assert calls == [4]  # the resumed run read the checked records from the cache
    cached = sorted((tmp_path / "phase1" / "preprocessed").iterdir())
    assert len(cached) == 1 and (cached[0] / preprocess.DONE_NAME).is_file()
    run(["data.max_length=200", f"phase1.output_dir={tmp_path / 'other'}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert calls == [4, 4]  # another max_length is another key
    assert len(list((tmp_path / "cache").iterdir())) == 1


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def test_token_budget_batches_hold_every_sample_once_within_budget_in_fixed_batches() -> None:
    lengths = [5, 50, 7, 49, 20, 21, 3, 48, 22, 6, 51, 19]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=100, max_samples=3, seed=0)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    for batches in epochs:
        assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
        assert all(len(batch) <= 3 and len(batch) * max(lengths[i] for i in batch) <= 100 for batch in batches)
        assert len(batches) == len(sampler)
    assert sorted(map(sorted, epochs[0])) == sorted(map(sorted, epochs[1]))  # the same batches ...
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # ... in another order
    long_ones = next(batch for batch in epochs[0] if 50 in [lengths[i] for i in batch])
    assert all(lengths[i] >= 48 for i in long_ones)  # similar lengths share a batch


def test_resume_with_token_budget_batches_is_bit_exact(tmp_path: Path) -> None:
    data_json, image_root = write_llava(tmp_path, 6, text_only=3)
    settings = ["phase2.max_steps=5", "phase2.save_every_steps=2", "phase2.max_tokens_per_batch=512",
                "phase2.per_device_batch_size=3", "phase2.gradient_accumulation_steps=1"]

    def run(output_dir: Path, **kwargs):
        config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root, settings + [f"phase2.output_dir={output_dir}"])
        pair = build_pair("qwen2_5_vl")
        records = load_llava_records(data_json, image_root, require_image=False)[0]
        return train_phase(config, 2, target=pair.target, drafter=fresh_drafter(pair, config),
                           processor=pair.processor, dataset=records, **kwargs)

    uninterrupted = run(tmp_path / "a")
    run(tmp_path / "b", stop_after_steps=3)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.train.step_losses == uninterrupted.train.step_losses[2:]
    a, b = uninterrupted.drafter.state_dict(), resumed.drafter.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_global_batch_size_sets_the_accumulation_for_the_process_count() -> None:
    config = load_config(TINY_CONFIG, ["phase2.global_batch_size=16", "phase2.per_device_batch_size=2"])
    assert resolve_accumulation(config.phase2, 1).gradient_accumulation_steps == 8
    assert resolve_accumulation(config.phase2, 8).gradient_accumulation_steps == 1
    with pytest.raises(ValueError, match="not a multiple of per_device_batch_size 2 x 16 processes"):
        resolve_accumulation(config.phase2, 16)
    assert make_accelerator(config.phase2).gradient_accumulation_steps == 8
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(TINY_CONFIG, ["phase2.global_batch_size=5", "phase2.per_device_batch_size=2"])
    with pytest.raises(ConfigError, match="max_tokens_per_batch.*below data.max_length"):
        load_config(TINY_CONFIG, ["phase2.max_tokens_per_batch=100"])


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "name"), [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_deepspeed_and_fsdp_are_refused_with_a_clear_error(flag: str, name: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(flag, "true")
    with pytest.raises(UnsupportedDistributedModeError, match=f"{name} is not supported.*plain DDP"):
        make_accelerator(load_config(TINY_CONFIG).phase2)


def test_process_group_timeout_reaches_accelerate() -> None:
    accelerator = make_accelerator(load_config(TINY_CONFIG, ["phase1.process_group_timeout_minutes=7"]).phase1)
    assert accelerator.init_handler.timeout == timedelta(minutes=7)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_target_built_for_training_keeps_only_its_vision_weights(tmp_path: Path, family: str) -> None:
    config = tiny_config(tmp_path, family)
    target, drafter, _ = resolve_objects(config, 1)
    vision = {id(param) for module in drafter.vision_modules.values() for param in module.parameters()}
    kept = [param for param in target.parameters() if id(param) in vision]
    released = [param for param in target.parameters() if id(param) not in vision]
    assert kept and all(param.device.type == "cpu" for param in kept)
    assert released and all(param.device.type == "meta" for param in released)
    pair = build_pair(family)  # the same deterministic weights, nothing released
    inputs = prompt_inputs(pair.processor, get_adapter(pair.target.config).user_messages("x"), [random_image(0)])
    image_inputs = {name: inputs[name] for name in drafter.adapter.image_input_names}
    whole = MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer))
    assert torch.equal(drafter.encode_images(image_inputs), whole.encode_images(image_inputs))  # vision unchanged


def test_qwen_pixel_range_is_set_from_the_config_and_refused_for_gemma(tmp_path: Path) -> None:
    image = random_image(0, size=64)
    grids = {}
    for max_pixels in (None, 32 * 32):
        overrides = [] if max_pixels is None else ["model.min_pixels=256", f"model.max_pixels={max_pixels}"]
        _, _, processor = build_models(tiny_config(tmp_path, "qwen2_5_vl", overrides=overrides).model,
                                       with_drafter_lm=False)
        grids[max_pixels] = processor.image_processor(image)["image_grid_thw"].tolist()
    assert grids[None] == [[1, 8, 8]] and grids[32 * 32] == [[1, 4, 4]]  # 64x64 pixels -> at most 32x32
    with pytest.raises(ValueError, match="Qwen2.5-VL's dynamic resolution"):
        build_models(tiny_config(tmp_path, "gemma3", overrides=["model.max_pixels=1024"]).model, with_drafter_lm=False)


# --------------------------------------------------------------------------------------------------
# Distillation: shards claimed, not split
# --------------------------------------------------------------------------------------------------


def test_processes_of_a_launch_claim_shards_and_a_new_launch_takes_over_unfinished_ones(tmp_path: Path) -> None:
    data_json, image_root = write_llava(tmp_path, 5)
    config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root,
                         ["distill.max_new_tokens=2", "distill.shard_size=2", "distill.batch_size=1"])
    pair = build_pair("qwen2_5_vl")
    out = Path(config.data.distilled_dir)
    # Process 0 of launch A takes shard 0 and is stopped inside it (a slow process, still working).
    first = generate_responses(config, target=pair.target, processor=pair.processor, max_items=1, launch_id="A",
                               process_index=0, num_processes=2)
    assert (first.generated, first.complete) == (1, False)
    # Process 1 of the same launch leaves shard 0 to its owner and answers everything else.
    second = generate_responses(config, target=pair.target, processor=pair.processor, launch_id="A",
                                process_index=1, num_processes=2)
    assert second.complete and not second.all_shards_finished and second.generated == 3
    assert second.shards_written == ["shard-00001.jsonl", "shard-00002.jsonl"]
    assert (out / "shard-00000.jsonl.partial").exists() and (out / CLAIMS_DIR / "A").is_dir()
    # A later launch (process 0 was killed) continues the unfinished shard from its partial file.
    third = generate_responses(config, target=pair.target, processor=pair.processor, launch_id="B")
    assert third.all_shards_finished and third.generated == 1 and third.already_done == 4
    assert not (out / CLAIMS_DIR).exists()
    records = [json.loads(line) for path in sorted(out.glob("shard-*.jsonl")) for line in path.read_text().splitlines()]
    assert [record["source_index"] for record in records] == [0, 1, 2, 3, 4]
