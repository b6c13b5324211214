"""Target/drafter vocabulary compatibility: the precondition for drafting tokens the target can verify.

MASSV drafts with a small LM of the target's family, so both sides must map every token to the same id.
Embedding matrices padded to different sizes are fine (Qwen2.5-VL-7B: 152064 rows, Qwen2.5-0.5B: 151936,
one tokenizer of 151665 tokens); ids that exist on only one side are simply never drafted.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from massv.errors import MassvError


class TokenizerMismatchError(MassvError, ValueError):
    """Target and drafter tokenize differently; speculative decoding would verify the wrong tokens."""


def _name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    specials = list(tokenizer.all_special_tokens)
    specials += [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return list(dict.fromkeys(specials))


def check_tokenizer_compatibility(
    target_tokenizer: PreTrainedTokenizerBase, drafter_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Raise `TokenizerMismatchError` naming both tokenizers and the first special token (or id) that differs.

    Compared: every special token of either side must have the same id on both; then every id present in
    both vocabularies must be the same token. A longer vocabulary on one side is allowed (padding, or
    Gemma3's image soft token past the text models' vocabulary).
    """
    target_name, drafter_name = _name(target_tokenizer), _name(drafter_tokenizer)
    target_ids, drafter_ids = target_tokenizer.get_vocab(), drafter_tokenizer.get_vocab()
    shared_size = min(len(target_tokenizer), len(drafter_tokenizer))
    for token in _special_tokens(target_tokenizer) + _special_tokens(drafter_tokenizer):
        target_id, drafter_id = target_ids.get(token), drafter_ids.get(token)
        if target_id is None or drafter_id is None:
            # On one side only: allowed past the other's vocabulary (Gemma3's image soft token).
            present_id = drafter_id if target_id is None else target_id
            if present_id < shared_size:
                raise TokenizerMismatchError(
                    f"tokenizer mismatch between target {target_name!r} and drafter {drafter_name!r}: special "
                    f"token {token!r} exists in only one of them. MASSV needs a drafter of the target's family."
                )
            continue
        if target_id != drafter_id:
            raise TokenizerMismatchError(
                f"tokenizer mismatch between target {target_name!r} and drafter {drafter_name!r}: special token "
                f"{token!r} has id {target_id} in the target and {drafter_id} in the drafter. MASSV needs a "
                "drafter of the target's family (e.g. Qwen2.5-0.5B-Instruct for Qwen2.5-VL-7B-Instruct)."
            )
    target_vocab = {index: token for token, index in target_ids.items()}
    drafter_vocab = {index: token for token, index in drafter_ids.items()}
    for index in sorted(set(target_vocab) & set(drafter_vocab)):
        if target_vocab[index] != drafter_vocab[index]:
            raise TokenizerMismatchError(
                f"tokenizer mismatch between target {target_name!r} and drafter {drafter_name!r}: id {index} is "
                f"{target_vocab[index]!r} in the target but {drafter_vocab[index]!r} in the drafter."
            )
    if len(set(target_vocab) & set(drafter_vocab)) == 0:
        raise TokenizerMismatchError(f"target {target_name!r} and drafter {drafter_name!r} share no token ids")


def draftable_vocab_size(tokenizer_size: int, drafter_vocab_size: int, target_vocab_size: int) -> int:
    """Ids below this are real tokens both models have rows for; the drafter may propose only these.

    Rows past the tokenizer are padding (never trained) and the Gemma3 image token lies past the drafter's
    embedding; masking them keeps the drafter from wasting proposals the target can never agree with.
    """
    return min(tokenizer_size, drafter_vocab_size, target_vocab_size)
