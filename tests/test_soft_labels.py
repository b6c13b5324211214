"""Logit distillation in phase 2: the soft labels are the target's own distribution at each answer position,
the mixed loss is the stated formula, and training on them pulls the drafter towards the target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from massv.chat import encode_rendered
from massv.config import ConfigError, LogitDistillationConfig
from massv.families import get_adapter
from massv.train import train_phase
from massv.train.builders import build_drafter, load_phase_records
from massv.train.llava_data import load_llava_records
from massv.train.loss import SoftLabelBatch, answer_token_loss
from massv.train.soft_labels import SOFT_LABELS_FILE, example_soft_labels, supervised_positions
from tests.conftest import random_image
from tests.helpers_train import build_pair, one_thread, tiny_config, write_llava  # noqa: F401

FAMILIES = ["qwen2_5_vl", "gemma3"]


def _greedy_example(pair, image_seed: int, max_new_tokens: int = 10):
    """An image prompt, the target's greedy answer to it (ids, no text round trip) and its per-step logits."""
    adapter = get_adapter(pair.target.config)
    text = pair.processor.apply_chat_template(adapter.user_messages("Describe the image."), add_generation_prompt=True,
                                              tokenize=False)
    encoded = encode_rendered(pair.processor, [text], [[random_image(image_seed)]])
    out = pair.target.generate(**encoded, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
    prompt_length = encoded["input_ids"].shape[1]
    ids = out.sequences[0]
    labels = torch.full_like(ids, -100)
    labels[prompt_length:] = ids[prompt_length:]
    images = {name: encoded[name] for name in adapter.image_input_names}
    return adapter, ids, labels, images, torch.cat(out.logits)  # logits: (max_new_tokens, vocab)


@pytest.mark.parametrize("family", FAMILIES)
def test_soft_labels_are_the_distribution_generate_sampled_from(family: str) -> None:
    """Teacher-forced on its own greedy answer, the target's soft labels put the answer token first at every
    position and equal generate()'s step logits: positions (Qwen's 3-D rotary, Gemma's image block) line up."""
    pair = build_pair(family)
    adapter, ids, labels, images, step_logits = _greedy_example(pair, image_seed=3)
    vocab_limit = step_logits.shape[-1]
    full = example_soft_labels(pair.target, adapter, ids, labels, images, vocab_limit,
                               LogitDistillationConfig(top_k=vocab_limit))
    answer = ids[labels != -100]
    assert full.ids.shape == (answer.shape[0], vocab_limit)
    assert torch.equal(full.ids[:, 0].long(), answer)
    expected = torch.log_softmax(step_logits.float(), dim=-1).gather(1, full.ids.long())
    torch.testing.assert_close(full.logprobs, expected, atol=2e-4, rtol=0)

    top = example_soft_labels(pair.target, adapter, ids, labels, images, vocab_limit, LogitDistillationConfig(top_k=4))
    assert torch.equal(top.ids, full.ids[:, :4])
    torch.testing.assert_close(top.logprobs.exp().sum(-1), torch.ones(answer.shape[0]))  # renormalised over the 4
    torch.testing.assert_close(top.logprobs, torch.log_softmax(full.logprobs[:, :4], dim=-1))

    hot = example_soft_labels(pair.target, adapter, ids, labels, images, vocab_limit,
                              LogitDistillationConfig(top_k=vocab_limit, temperature=2.0))
    torch.testing.assert_close(hot.logprobs.gather(1, torch.argsort(hot.ids.long())),
                               torch.log_softmax(step_logits.float() / 2.0, dim=-1), atol=2e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_soft_labels_equal_one_example_at_a_time(tmp_path: Path, family: str) -> None:
    """Right-padded batches that mix image and text-only examples of different lengths give every example the
    labels of its own forward (the model's own position handling, as in training)."""
    from massv.train.builders import build_train_dataset
    from massv.train.data import pad_token_id
    from massv.train.soft_labels import batch_soft_labels

    data_json, image_root = write_llava(tmp_path, 3, multi_turn=True, text_only=2)
    config = tiny_config(tmp_path, family, data_json, image_root)
    pair = build_pair(family)
    drafter = build_drafter(config.model, pair.target, pair.drafter_lm, pair.processor)
    records = load_llava_records(data_json, image_root, require_image=False, num_workers=0)[0]
    data, _ = build_train_dataset(config, records, pair.processor, drafter)
    examples = [data.encoded(index) for index in range(len(data))]
    assert len({int(example.input_ids.shape[0]) for example in examples}) > 1
    assert any(example.image_inputs is None for example in examples) and any(example.image_inputs for example in examples)
    vocab = drafter.config.draftable_vocab_size
    settings = LogitDistillationConfig(top_k=vocab)
    batched = batch_soft_labels(pair.target, drafter.adapter, examples, vocab, settings, pad_token_id(pair.processor))
    for example, labels in zip(examples, batched):
        alone = example_soft_labels(pair.target, drafter.adapter, example.input_ids, example.labels,
                                    example.image_inputs, vocab, settings)
        by_id = lambda soft: soft.logprobs.gather(1, torch.argsort(soft.ids.long()))  # noqa: E731
        torch.testing.assert_close(by_id(labels), by_id(alone), atol=2e-4, rtol=0)


def test_soft_labels_give_ids_past_the_draftable_vocabulary_no_mass() -> None:
    pair = build_pair("qwen2_5_vl")
    adapter, ids, labels, images, step_logits = _greedy_example(pair, image_seed=5, max_new_tokens=4)
    limit = int(step_logits.argmax(-1).max()) + 1  # every greedy answer token stays proposable
    labels_cut = example_soft_labels(pair.target, adapter, ids, labels, images, limit, LogitDistillationConfig(top_k=10**6))
    assert labels_cut.ids.shape[1] == limit and int(labels_cut.ids.max()) < limit
    expected = torch.log_softmax(step_logits[:, :limit].float(), dim=-1).gather(1, labels_cut.ids.long())
    torch.testing.assert_close(labels_cut.logprobs, expected, atol=2e-4, rtol=0)


def _loss_case(num_rows: int = 7, vocab: int = 11, hidden_size: int = 5, k: int = 4):
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(2, num_rows, hidden_size, requires_grad=True)
    labels = torch.full((2, num_rows), -100)
    labels[0, 2:5], labels[1, 1:num_rows] = torch.tensor([1, 4, 9]), torch.randint(0, vocab, (num_rows - 1,))
    rows = int((labels[:, 1:] != -100).sum())
    teacher = torch.log_softmax(torch.randn(rows, vocab), dim=-1)
    top = teacher.topk(k, dim=-1)
    return head, hidden, labels, top.indices, torch.log_softmax(top.values, dim=-1)


def test_mixed_loss_is_cross_entropy_plus_weighted_kl_over_the_target_top_k() -> None:
    head, hidden, labels, soft_ids, soft_logprobs = _loss_case()
    vocab = head.out_features
    shift = labels[:, 1:]
    supervised = shift != -100
    logits = head(hidden[:, :-1][supervised]).float()
    hard = torch.nn.functional.cross_entropy(logits, shift[supervised])

    def kl(temperature: float) -> torch.Tensor:
        drafter = torch.log_softmax(logits / temperature, dim=-1).gather(1, soft_ids)
        return (soft_logprobs.exp() * (soft_logprobs - drafter)).sum(-1).mean()

    def loss(weight: float, temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
        return answer_token_loss(hidden, labels, head, vocab, chunk_tokens=chunk,
                                 soft_labels=SoftLabelBatch(soft_ids, soft_logprobs, weight, temperature))

    torch.testing.assert_close(loss(0.0), hard)
    torch.testing.assert_close(loss(1.0), kl(1.0))
    torch.testing.assert_close(loss(0.3), 0.7 * hard + 0.3 * kl(1.0))
    torch.testing.assert_close(loss(0.5, temperature=2.0), 0.5 * hard + 0.5 * 4.0 * kl(2.0))
    torch.testing.assert_close(loss(0.5, chunk=3), loss(0.5))  # chunked rows keep their own soft labels
    (gradient,) = torch.autograd.grad(loss(1.0, chunk=3), hidden)
    (expected,) = torch.autograd.grad(kl(1.0), hidden)
    torch.testing.assert_close(gradient, expected)
    # A teacher that is the drafter itself costs nothing beyond its own cross-entropy term.
    own = torch.log_softmax(logits.detach(), dim=-1)
    ids = torch.arange(vocab).expand(own.shape[0], -1)
    assert float(answer_token_loss(hidden, labels, head, vocab, soft_labels=SoftLabelBatch(ids, own, 1.0))) < 1e-6


def test_soft_labels_for_other_examples_are_refused() -> None:
    head, hidden, labels, soft_ids, soft_logprobs = _loss_case()
    with pytest.raises(ValueError, match="soft-label rows for"):
        answer_token_loss(hidden, labels, head, head.out_features,
                          soft_labels=SoftLabelBatch(soft_ids[1:], soft_logprobs[1:], 1.0))


def test_supervised_positions_predict_the_labelled_tokens() -> None:
    labels = torch.tensor([-100, -100, 7, 8, -100, 9])
    assert supervised_positions(labels).tolist() == [1, 2, 4]  # position t predicts labels[t + 1]


@pytest.mark.parametrize("key, value, message", [("weight", 1.5, "must be in"), ("top_k", 0, "must be >= 1"),
                                                 ("temperature", 0, "must be > 0")])
def test_bad_logit_distillation_settings_are_named(tmp_path: Path, key: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}.*{message}|{message}.*{key}"):
        tiny_config(tmp_path, "qwen2_5_vl", overrides=[f"phase2.logit_distillation.{key}={value}"])


def _drafter_kl_to_target(drafter, train_data, collator) -> float:
    """Mean KL(target || drafter) over every answer token of the training set (weight 1: the soft term alone)."""
    collator.soft_label_weight = 1.0
    batch = collator([train_data[index] for index in range(len(train_data))])
    drafter.eval()
    with torch.no_grad():
        return float(drafter(**batch).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_phase2_on_soft_labels_pulls_the_drafter_towards_the_target(tmp_path: Path, family: str) -> None:
    """Phase 2 with `logit_distillation` computes the labels once (cached on disk) and trains on them: from
    the same start and data, it ends much closer to the target's distribution than phase 2 on the answers."""
    from massv.train.builders import build_train_dataset
    from massv.train.soft_labels import compute_soft_labels

    data_json, image_root = write_llava(tmp_path, 4)
    settings = LogitDistillationConfig(weight=1.0, top_k=64)

    def run(name: str, weight: float | None):
        overrides = ["phase2.max_steps=40", "phase2.learning_rate=1e-2", "phase2.save_every_steps=null",
                     f"phase2.output_dir={tmp_path / name}"]
        if weight is not None:
            overrides += [f"phase2.logit_distillation.weight={weight}", f"phase2.logit_distillation.top_k={settings.top_k}"]
        config = tiny_config(tmp_path, family, data_json, image_root, overrides)
        pair = build_pair(family)
        records = load_phase_records(config, 1)[0]  # the captions stand in for the target's answers
        torch.manual_seed(0)
        drafter = build_drafter(config.model, pair.target, pair.drafter_lm, pair.processor)
        return pair, drafter, records, config, train_phase(config, 2, target=pair.target, drafter=drafter,
                                                           processor=pair.processor, dataset=records,
                                                           cache_image_features=True)

    _, _, records, config, on_answers = run("answers", None)
    _, _, _, _, on_distribution = run("distribution", 1.0)
    pair = build_pair(family)  # training tuned the earlier pairs' drafter LMs in place
    torch.manual_seed(0)
    untrained = build_drafter(config.model, pair.target, pair.drafter_lm, pair.processor)
    train_data, collator = build_train_dataset(config, records, pair.processor, untrained)
    train_data.attach_soft_labels(compute_soft_labels(pair.target, untrained.adapter, train_data,
                                                      untrained.config.draftable_vocab_size, settings))
    kl = {name: _drafter_kl_to_target(drafter, train_data, collator) for name, drafter in
          (("untrained", untrained), ("answers", on_answers.drafter), ("distribution", on_distribution.drafter))}
    print(f"{family}: KL(target || drafter) on the answers {kl}")
    assert kl["distribution"] < 0.5 * kl["untrained"]
    assert kl["distribution"] < 0.5 * kl["answers"]
    assert len(list((tmp_path / "distribution" / "preprocessed").glob(f"soft-labels-*/{SOFT_LABELS_FILE}"))) == 1
    assert not list((tmp_path / "answers" / "preprocessed").glob("soft-labels-*"))
