"""A drafter with its own tokenizer: greedy output equals target.generate, through text and back.

The drafter's tokenizer (`build_foreign_tokenizer`) shares no id with the target's and merges across spaces,
so its token boundaries fall inside the target's tokens. Its LM is a tiny Qwen2 fitted in a second to the
target's own greedy answers on the test prompts (re-tokenized): it agrees with the target partly, so blocks
are accepted in part and the drafter's cache is cropped back to re-tokenized accepted text.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from massv.drafter import MultimodalDrafter
from massv.families import get_adapter
from massv.speculative import (
    CrossTokenizerDrafter,
    DrafterPairError,
    SpeculativeGenerator,
    UnsupportedSettingError,
)
from massv.speculative.proposers.token_bridge import TokenBridge, shared_vocabulary
from massv.tiny import DEFAULT_CORPUS, FOREIGN_IMAGE_TOKEN, build_foreign_tokenizer, build_tiny_pair
from massv.train.data import IGNORE_INDEX, encode_example
from massv.train.retokenize import cross_tokenizer_drafter, retokenize_example
from tests.conftest import prompt_inputs, random_image

PROMPTS = ["What colour is the square?", "How many triangles are there?", "Where is the orange circle?"]
MAX_NEW_TOKENS = 20


@pytest.fixture(scope="module")
def world():
    """Tiny Qwen2.5-VL target, a foreign tokenizer, and a MASSV drafter fitted to the target's answers."""
    torch.set_num_threads(1)
    pair = build_tiny_pair("qwen2_5_vl", seed=0)
    adapter = get_adapter(pair.target.config)
    tokenizer = build_foreign_tokenizer(DEFAULT_CORPUS, vocab_size=300, split_words=False)
    cases = [prompt_inputs(pair, prompt, image) for prompt in PROMPTS
             for image in (None, random_image(len(prompt)))]
    references = []
    for inputs in cases:
        output = pair.target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        references.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    torch.manual_seed(0)
    language_model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    language_model.generation_config.eos_token_id = tokenizer.eos_token_id
    drafter = cross_tokenizer_drafter(pair.target, language_model, tokenizer, FOREIGN_IMAGE_TOKEN)
    bridge = TokenBridge(pair.tokenizer, tokenizer, adapter, drafter.config.image_token_id)
    _fit(drafter, bridge, pair, cases, references)
    return pair, adapter, tokenizer, drafter.eval(), cases, references


def _fit(drafter: MultimodalDrafter, bridge: TokenBridge, pair, cases, references, steps: int = 40) -> None:
    """Overfit the drafter to the target's answers, in the views it drafts from (a second on the CPU)."""
    examples = []
    for inputs, reference in zip(cases, references):
        prompt = bridge.prompt_view(inputs["input_ids"][0].tolist())
        answer = bridge.drafter_ids(bridge.target_text(reference))
        features = None
        if "pixel_values" in inputs:
            features = drafter.encode_images({key: inputs[key] for key in ("pixel_values", "image_grid_thw")})
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + answer])
        examples.append((ids, labels, features))
    drafter.set_trainable("phase2")
    optimizer = torch.optim.Adam([p for p in drafter.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        for ids, labels, features in examples:
            drafter(input_ids=ids, labels=labels, image_features=features).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _generate(pair, drafter, inputs, num_draft_tokens: int):
    generator = SpeculativeGenerator(pair.target, drafter, pair.processor)
    return generator.generate_from_inputs(inputs, max_new_tokens=MAX_NEW_TOKENS, num_draft_tokens=num_draft_tokens)


# ---- greedy == target.generate ----------------------------------------------------------------------
@pytest.mark.parametrize("num_draft_tokens", [1, 5])
def test_massv_across_tokenizers_matches_target_generate(world, num_draft_tokens: int) -> None:
    pair, _, tokenizer, drafter, cases, references = world
    wrapped = CrossTokenizerDrafter(drafter, tokenizer)
    accepted = 0
    for inputs, reference in zip(cases, references):
        output = _generate(pair, wrapped, inputs, num_draft_tokens)
        assert output.generated_ids[0].tolist() == reference
        assert sum(output.stats.accepted_drafts) <= sum(output.stats.proposed_drafts)
        accepted += sum(output.stats.accepted_drafts)
    assert accepted > 0  # the fitted drafter agrees in part: partly accepted blocks were exercised


@pytest.mark.parametrize("heal", [True, False])
def test_text_only_across_tokenizers_matches_target_generate(world, heal: bool) -> None:
    pair, _, tokenizer, drafter, cases, references = world
    wrapped = CrossTokenizerDrafter(drafter.language_model, tokenizer, heal=heal)
    for inputs, reference in zip(cases, references):
        assert _generate(pair, wrapped, inputs, 4).generated_ids[0].tolist() == reference


def test_retokenization_moves_boundaries(world) -> None:
    """The drafter's tokens are not the target's: drafted text merges across the committed boundary, and
    re-tokenizing the accepted text rewrites drafter tokens the cache already held."""
    pair, _, tokenizer, drafter, cases, references = world
    wrapped = CrossTokenizerDrafter(drafter, tokenizer)
    merges = rewrites = drafted = candidates = healed = 0
    for inputs in cases:
        _generate(pair, wrapped, inputs, 5)
        stats = wrapped.last_stats
        merges, rewrites = merges + stats.boundary_merges, rewrites + stats.view_rewrites
        drafted, candidates = drafted + stats.drafter_tokens, candidates + stats.target_tokens
        healed += stats.healed
    assert merges > 0
    assert rewrites > 0
    assert drafted != candidates
    assert healed > 0  # drafts started one drafter token back, re-spelling it


def test_bridge_aligns_a_merge_across_the_boundary(world) -> None:
    pair, adapter, tokenizer, *_ = world
    bridge = TokenBridge(pair.tokenizer, tokenizer, adapter)
    whole = pair.tokenizer.encode(" square", add_special_tokens=False)
    assert len(whole) == 1  # one target token, committed here as two pieces
    committed = pair.tokenizer.encode("What colour is the", add_special_tokens=False) + \
        pair.tokenizer.encode(" squ", add_special_tokens=False)
    merged = bridge.candidates(committed, "are?")
    assert merged.boundary_merge  # re-encoding "… squ" + "are?" would rewrite the committed " squ"
    assert bridge.target_text(committed + merged.target_ids) == "What colour is the square?"
    clean = bridge.candidates(pair.tokenizer.encode("What colour", add_special_tokens=False), " is the square?")
    assert not clean.boundary_merge
    assert clean.target_ids == pair.tokenizer.encode(" is the square?", add_special_tokens=False)


def test_drafted_text_survives_split_characters(world) -> None:
    """A character split over two drafter tokens (byte-level) comes out whole, and an unfinished one not at all."""
    pair, adapter, tokenizer, *_ = world
    bridge = TokenBridge(pair.tokenizer, tokenizer, adapter)
    context = bridge.drafter_ids("The colour is")
    drafts = bridge.drafter_ids(" é")
    assert len(drafts) >= 2  # " " and the two bytes of "é" are no merge of this corpus
    assert bridge.drafted_text(context, drafts) == " é"
    assert bridge.drafted_text(context, drafts[:-1]) == " "


def test_prompt_view_has_one_placeholder_per_feature_row(world) -> None:
    pair, adapter, tokenizer, drafter, cases, _ = world
    bridge = TokenBridge(pair.tokenizer, tokenizer, adapter, drafter.config.image_token_id)
    inputs = cases[1]
    view = bridge.prompt_view(inputs["input_ids"][0].tolist())
    rows = int((inputs["input_ids"] == adapter.image_token_id).sum())
    assert view.count(drafter.config.image_token_id) == rows > 0
    text_view = TokenBridge(pair.tokenizer, tokenizer, adapter).prompt_view(inputs["input_ids"][0].tolist())
    assert tokenizer.decode(text_view) == pair.tokenizer.decode(adapter.strip_image_tokens(inputs["input_ids"])[0])


# ---- T > 0: lossless through the shared vocabulary ---------------------------------------------------------
def test_shared_vocabulary_maps_same_text_one_to_one(world) -> None:
    pair, adapter, tokenizer, drafter, _, _ = world
    bridge = TokenBridge(pair.tokenizer, tokenizer, adapter, drafter.config.image_token_id)
    drafter_ids, target_ids = shared_vocabulary(bridge, len(tokenizer), adapter.target_vocab_size)
    assert 100 < len(drafter_ids) < len(tokenizer)  # the byte alphabet and common pieces, not phrase tokens
    assert len(set(drafter_ids)) == len(drafter_ids)
    for drafter_id, target_id in zip(drafter_ids, target_ids):
        text = tokenizer.decode([drafter_id])
        assert pair.tokenizer.encode(text, add_special_tokens=False) == [target_id]
    assert drafter.config.image_token_id not in drafter_ids
    assert tokenizer.eos_token_id in drafter_ids  # "<|im_end|>" is the same text in both


@pytest.mark.parametrize("num_samples", [300, pytest.param(3000, marks=pytest.mark.slow)])
def test_sampling_across_tokenizers_follows_target_distribution(world, monkeypatch, num_samples: int) -> None:
    """Four sampled tokens (prefill, two drafts' positions, bonus) follow generate()'s law; a broken acceptance
    rule fails the same check (the test has teeth). See tests/test_speculative_sampling.py for the bound."""
    import massv.speculative.engine as engine_module
    from tests.test_speculative_sampling import (
        MAX_NEW_TOKENS as SAMPLED_TOKENS,
        _engine_counts,
        _exact_law,
        always_accept,
        total_variation,
        tv_bound,
    )

    pair, _, tokenizer, drafter, cases, _ = world
    wrapped = CrossTokenizerDrafter(drafter, tokenizer)
    inputs = cases[1]  # an image prompt: MASSV reads the projected features
    exact = _exact_law(pair.target, inputs, SAMPLED_TOKENS)
    counts, acceptance = _engine_counts(pair, wrapped, inputs, num_samples)
    assert acceptance > 0.1, acceptance  # drafts are accepted: the acceptance test itself is exercised
    assert total_variation(counts, exact, num_samples) < tv_bound(len(exact), num_samples)
    monkeypatch.setattr(engine_module, "accept_sampled", always_accept)
    broken, _ = _engine_counts(pair, wrapped, inputs, 150, first_seed=10**6)
    assert total_variation(broken, exact, 150) > tv_bound(len(exact), 150)


def test_sampling_without_shared_tokens_is_refused(world, monkeypatch) -> None:
    pair, _, tokenizer, drafter, cases, _ = world
    wrapped = CrossTokenizerDrafter(drafter, tokenizer)
    monkeypatch.setattr(wrapped, "shared_vocabulary", lambda *args: ([], []))
    generator = SpeculativeGenerator(pair.target, wrapped, pair.processor)
    with pytest.raises(UnsupportedSettingError, match="share no token"):
        generator.generate_from_inputs(cases[0], max_new_tokens=5, temperature=0.7)
    assert generator.generate_from_inputs(cases[0], max_new_tokens=5).generated_ids.shape[1] == 5  # greedy is fine


# ---- pairs: a foreign tokenizer only through the explicit wrapper -----------------------------------------
def test_bare_foreign_drafters_are_refused(world) -> None:
    pair, _, tokenizer, drafter, _, _ = world
    with pytest.raises(DrafterPairError, match="CrossTokenizerDrafter"):
        SpeculativeGenerator(pair.target, drafter.language_model, pair.processor)  # a qwen2 LM, other EOS id
    with pytest.raises(DrafterPairError, match="CrossTokenizerDrafter"):
        SpeculativeGenerator(pair.target, drafter, pair.processor)  # MASSV drafter with its own image token
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(DrafterPairError, match="CrossTokenizerDrafter"):
        SpeculativeGenerator(pair.target, llama, pair.processor)  # another family
    SpeculativeGenerator(pair.target, CrossTokenizerDrafter(llama, tokenizer), pair.processor)  # opted in: fine


def test_wrapper_checks_what_it_needs(world) -> None:
    pair, _, tokenizer, drafter, _, _ = world
    same_tokenizer = MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer))
    with pytest.raises(DrafterPairError, match="cross_tokenizer_drafter"):
        SpeculativeGenerator(pair.target, CrossTokenizerDrafter(same_tokenizer, tokenizer), pair.processor)
    with pytest.raises(DrafterPairError, match="processor"):
        SpeculativeGenerator(pair.target, CrossTokenizerDrafter(drafter, tokenizer), None)
    gemma = build_tiny_pair("gemma3", seed=0)
    with pytest.raises(DrafterPairError, match="qwen2_5_vl"):
        SpeculativeGenerator(gemma.target, CrossTokenizerDrafter(drafter, tokenizer), gemma.processor)


# ---- training data and persistence ---------------------------------------------------------------------
def test_retokenized_example_keeps_answer_text_and_image_rows(world) -> None:
    pair, adapter, tokenizer, drafter, _, _ = world
    answer = "There are two red circles at the top left."
    conversations = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": answer}]
    example = encode_example(conversations, random_image(3), pair.processor, adapter, max_length=256)
    bridge = TokenBridge(pair.tokenizer, tokenizer, adapter, drafter.config.image_token_id)
    ids, labels = retokenize_example(bridge, example.input_ids, example.labels)
    assert tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) == answer + "<|im_end|>"
    assert int((ids == drafter.config.image_token_id).sum()) == int((example.input_ids == adapter.image_token_id).sum())
    features = drafter.encode_images(example.image_inputs)
    loss = drafter(input_ids=ids[None], labels=labels[None], image_features=features).loss
    assert torch.isfinite(loss)


def test_cross_tokenizer_drafter_round_trips(world, tmp_path) -> None:
    pair, _, tokenizer, drafter, cases, references = world
    drafter.save_pretrained(tmp_path / "drafter")
    loaded = MultimodalDrafter.from_pretrained(tmp_path / "drafter", target=pair.target).eval()
    assert loaded.config.cross_tokenizer and loaded.config.image_token_id == drafter.config.image_token_id
    output = _generate(pair, CrossTokenizerDrafter(loaded, tokenizer), cases[1], 3)
    assert output.generated_ids[0].tolist() == references[1]


def _sliding_window_drafter(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)).eval()


@pytest.fixture(scope="module")
def gemma_world():
    pair = build_tiny_pair("gemma3", seed=0)
    tokenizer = build_foreign_tokenizer(DEFAULT_CORPUS, vocab_size=300, split_words=False)
    return pair, tokenizer, CrossTokenizerDrafter(_sliding_window_drafter(tokenizer), tokenizer)


def test_gemma3_target_with_a_drafter_of_another_tokenizer(gemma_world) -> None:
    """The reverse pair: a Gemma3 target, a drafter with a ChatML tokenizer and sliding-window layers."""
    pair, _, wrapped = gemma_world
    generator = SpeculativeGenerator(pair.target, wrapped, pair.processor)
    for prompt in PROMPTS[:2]:
        for image in (None, random_image(len(prompt))):
            inputs = prompt_inputs(pair, prompt, image)
            reference = pair.target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
            output = generator.generate_from_inputs(inputs, max_new_tokens=MAX_NEW_TOKENS, num_draft_tokens=4)
            assert output.generated_ids[0].tolist() == reference[0, inputs["input_ids"].shape[1]:].tolist()


def test_drafter_cache_after_rewrites_matches_recompute(gemma_world) -> None:
    """After many blocks of random verdicts, the drafter's logits equal a fresh drafter's on the same text,
    though re-tokenized accepted text rewrote cached tokens; so after a crop deeper than its sliding-window
    layers allow (the cache is rebuilt from the view)."""
    import numpy as np

    from massv.speculative import CommittedTokens, DraftRequest, SamplingConfig
    from massv.speculative.proposers import CrossTokenizerProposer

    pair, _, wrapped = gemma_world
    adapter = get_adapter(pair.target.config)
    inputs = prompt_inputs(pair, PROMPTS[0], None)
    request = DraftRequest(target=pair.target, adapter=adapter, prompt_ids=inputs["input_ids"], image_inputs={},
                           vision_features={}, settings=SamplingConfig(), eos_token_ids=frozenset(),
                           replacement_id=0, target_tokenizer=pair.tokenizer)
    text_ids = pair.tokenizer.encode(" ".join(DEFAULT_CORPUS), add_special_tokens=False)
    rng = np.random.default_rng(0)
    sequence = CommittedTokens(inputs["input_ids"], capacity=400)
    sequence.append([text_ids[0]])
    proposer = CrossTokenizerProposer(wrapped, request)
    proposer.prefill(sequence)
    position = 1
    with torch.no_grad():
        for _ in range(25):
            proposal = proposer.propose(sequence, 4)
            kept = int(rng.integers(0, len(proposal) + 1))
            proposer.commit(kept)
            # Accept a prefix of the drafts, then "the target's token": the corpus text, a piece at a time.
            sequence.append(proposal.token_list[:kept] + text_ids[position : position + 1])
            position += 1
        view = proposer.prompt_view + proposer.bridge.drafter_ids(proposer.bridge.target_text(sequence.generated))
        cached_logits = proposer._catch_up(view)
        fresh = CrossTokenizerProposer(wrapped, request)
        fresh.prefill(sequence)
        fresh_logits = fresh._catch_up(view)
        assert proposer.stats.view_rewrites > 0
        assert torch.allclose(cached_logits, fresh_logits, atol=1e-5, rtol=0)
        # Back to the prompt: further than its sliding-window layers can crop, so the cache is rebuilt.
        proposer._crop(len(proposer.cached) - len(proposer.prompt_view))
        assert proposer.stats.cache_rebuilds == 1
        assert torch.allclose(proposer._catch_up(view), fresh_logits, atol=1e-5, rtol=0)


def test_phase1_across_tokenizers_trains_the_projector_only(world, tmp_path) -> None:
    """Phase 1 on re-tokenized captions: the projector moves, the LM stays; the loss is the drafter's own."""
    import copy

    from massv.config import TrainingConfig
    from massv.train.data import DrafterDataset
    from massv.train.llava_data import load_llava_records
    from massv.train.retokenize import train_cross_tokenizer_phase
    from tests.helpers_train import write_llava

    pair, adapter, tokenizer, fitted, _, _ = world
    drafter = cross_tokenizer_drafter(pair.target, copy.deepcopy(fitted.language_model), tokenizer, FOREIGN_IMAGE_TOKEN)
    before = {name: value.clone() for name, value in drafter.state_dict().items()}
    json_path, image_root = write_llava(tmp_path / "data", 4)
    records, _ = load_llava_records(json_path, image_root)
    config = TrainingConfig(output_dir=str(tmp_path / "phase1"), max_steps=3, per_device_batch_size=2,
                            gradient_accumulation_steps=1, learning_rate=1e-2, mixed_precision="no",
                            save_every_steps=None, warmup_ratio=0.0)
    trained, result = train_cross_tokenizer_phase(drafter, DrafterDataset(records, pair.processor, adapter, 256),
                                                  pair.tokenizer, tokenizer, config, phase=1)
    assert result.finished and len(result.step_losses) == 3
    changed = {name for name, value in trained.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(name.startswith("projector.") for name in changed)
