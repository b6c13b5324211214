"""Target/drafter tokenizer compatibility."""

from __future__ import annotations

import re

import pytest

from massv.tiny import DEFAULT_CORPUS, build_gemma_tokenizer, build_qwen_tokenizer
from massv.vocab import TokenizerMismatchError, check_tokenizer_compatibility, draftable_vocab_size


def test_same_tokenizer_is_compatible():
    check_tokenizer_compatibility(build_qwen_tokenizer(), build_qwen_tokenizer())
    check_tokenizer_compatibility(build_gemma_tokenizer(), build_gemma_tokenizer())


def test_other_family_is_a_mismatch_naming_both_and_the_special_token():
    target, drafter = build_qwen_tokenizer(), build_gemma_tokenizer()
    target.name_or_path, drafter.name_or_path = "Qwen/Qwen2.5-VL-7B-Instruct", "google/gemma-3-1b-it"
    with pytest.raises(TokenizerMismatchError) as error:
        check_tokenizer_compatibility(target, drafter)
    message = str(error.value)
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in message and "google/gemma-3-1b-it" in message
    assert re.search(r"special token '<\|\w+\|>'", message)  # names the first Qwen special token that differs


def test_same_specials_different_merges_is_a_mismatch_at_first_differing_id():
    other_corpus = ["zebra quartz jumps over the lazy fox " * 3, "pack my box with five dozen liquor jugs"]
    target, drafter = build_qwen_tokenizer(), build_qwen_tokenizer(other_corpus)
    with pytest.raises(TokenizerMismatchError, match=r"id \d+ is '.*' in the target but '.*' in the drafter"):
        check_tokenizer_compatibility(target, drafter)


def test_image_token_past_the_drafter_vocabulary_is_allowed():
    # Gemma3: the VLM tokenizer has the soft image token one past the text models' vocabulary.
    target = build_gemma_tokenizer()
    text_only = build_gemma_tokenizer()
    assert target.convert_tokens_to_ids("<image_soft_token>") == len(target) - 1
    check_tokenizer_compatibility(target, text_only)
    assert draftable_vocab_size(len(target), len(target) - 1, len(target) + 63) == len(target) - 1


def test_draftable_size_is_the_smallest_real_range():
    assert draftable_vocab_size(151665, 151936, 152064) == 151665
    assert len(DEFAULT_CORPUS) > 0
