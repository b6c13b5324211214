"""Target/drafter tokenizer compatibility."""

from __future__ import annotations

import re

import pytest
from transformers import PreTrainedTokenizerFast

from massv.tiny import (
    DEFAULT_CORPUS,
    GEMMA_IMAGE_TOKEN,
    GEMMA_SPECIAL_TOKENS,
    build_gemma_tokenizer,
    build_qwen_tokenizer,
    train_bpe,
)
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


def _gemma_text_tokenizer(extra_special_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """What Gemma3's text models ship: the VLM tokenizer's vocabulary without the image soft token."""
    return PreTrainedTokenizerFast(tokenizer_object=train_bpe(DEFAULT_CORPUS, 384, GEMMA_SPECIAL_TOKENS),
                                   bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens=extra_special_tokens or {})


def test_image_token_past_the_drafter_vocabulary_is_allowed():
    # Gemma3: the VLM tokenizer has the soft image token one past the text models' vocabulary.
    target, text_only = build_gemma_tokenizer(), _gemma_text_tokenizer()
    image_token_id = target.convert_tokens_to_ids(GEMMA_IMAGE_TOKEN)
    assert GEMMA_IMAGE_TOKEN not in text_only.get_vocab()
    assert image_token_id == len(text_only) == len(target) - 1  # really past the drafter's vocabulary
    check_tokenizer_compatibility(target, text_only)
    check_tokenizer_compatibility(text_only, target)
    # The drafter may propose the text tokens only: never the image token, nor embedding padding rows.
    assert draftable_vocab_size(len(target), len(text_only), len(target) + 63) == image_token_id


def test_special_token_on_one_side_inside_the_shared_range_is_a_mismatch():
    # The drafter's own special token takes the id the target gives its image token: both tokenizers have it.
    target, drafter = build_gemma_tokenizer(), _gemma_text_tokenizer({"tool_token": "<tool>"})
    assert drafter.convert_tokens_to_ids("<tool>") == target.convert_tokens_to_ids(GEMMA_IMAGE_TOKEN)
    with pytest.raises(TokenizerMismatchError, match="special token '<(tool|image_soft_token)>' exists in only one"):
        check_tokenizer_compatibility(target, drafter)


def test_draftable_size_is_the_smallest_real_range():
    assert draftable_vocab_size(151665, 151936, 152064) == 151665
    assert len(DEFAULT_CORPUS) > 0
