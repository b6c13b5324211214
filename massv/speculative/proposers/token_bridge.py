"""Between two tokenizers through text: the drafter's view of target tokens, and target tokens for drafted text.

Why through text: a drafter of another family splits the same words into other tokens with other ids, so
the only thing both sides agree on is the string. Two rules keep the conversion faithful:

- *Views are built per segment.* A prompt is decoded segment by segment (text runs between image blocks)
  and re-encoded with the drafter's tokenizer; an image block becomes the drafter's own placeholder, once
  per target image feature row (or nothing, for a text-only drafter). Training (`massv.train.retokenize`)
  builds the very same views, so the drafter learns on what it reads at inference.
- *Drafts are aligned on a window.* Drafted text can merge with the committed text across the boundary
  ("squ" + "are" is one target token "square"). Like Hugging Face's universal assisted generation, the last
  few committed target tokens are decoded, the drafted text appended, the whole re-encoded, and the result
  aligned with the committed tokens on their longest common prefix; what follows is the candidate list. When
  the re-encoding would rewrite committed tokens (a merge across the boundary), the committed tokens stand
  (the target already emitted them) and the drafted text alone is encoded after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from massv.families import FamilyAdapter

# Committed target tokens re-encoded with each draft: enough for any merge that crosses the boundary.
DEFAULT_WINDOW = 4
REPLACEMENT_CHARACTER = "\ufffd"  # what a byte-level decoder writes for an unfinished UTF-8 character


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading ids the two sequences share."""
    length = 0
    for left, right in zip(first, second):
        if left != right:
            break
        length += 1
    return length


@dataclass
class Candidates:
    """Target ids for one block's drafted text, and whether the re-encoding wanted to rewrite the boundary."""

    target_ids: list[int]
    boundary_merge: bool  # tail + draft re-encoded into other tokens than the committed tail


class TokenBridge:
    """Converts between the target's and the drafter's tokens through text (batch size 1, host lists)."""

    def __init__(self, target_tokenizer: Any, drafter_tokenizer: Any, adapter: FamilyAdapter,
                 image_placeholder_id: int | None = None, window: int = DEFAULT_WINDOW) -> None:
        if target_tokenizer is None:
            raise ValueError("drafting with another tokenizer needs the target's tokenizer: pass the processor "
                             "to SpeculativeGenerator")
        self.target_tokenizer = target_tokenizer
        self.drafter_tokenizer = drafter_tokenizer
        self.adapter = adapter
        self.image_placeholder_id = image_placeholder_id
        self.window = window
        self.image_block_ids = frozenset(adapter.image_block_token_ids)
        self.drafter_prefix = list(drafter_tokenizer("", add_special_tokens=True)["input_ids"])  # e.g. <bos>

    # ---- text <-> ids ------------------------------------------------------------------------------------
    def target_text(self, target_ids: Sequence[int]) -> str:
        """Target ids as text, special tokens spelled out (a foreign tokenizer may know them by name)."""
        return self.target_tokenizer.decode(list(target_ids), skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)

    def drafter_ids(self, text: str) -> list[int]:
        return list(self.drafter_tokenizer.encode(text, add_special_tokens=False)) if text else []

    def drafter_text(self, drafter_ids: Sequence[int]) -> str:
        return self.drafter_tokenizer.decode(list(drafter_ids), skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False)

    def target_ids(self, text: str) -> list[int]:
        return list(self.target_tokenizer.encode(text, add_special_tokens=False)) if text else []

    # ---- views -------------------------------------------------------------------------------------------
    def segments(self, target_ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        """`("text", ids)` runs and `("image", ids)` blocks, in order."""
        runs: list[tuple[str, list[int]]] = []
        for token in target_ids:
            kind = "image" if int(token) in self.image_block_ids else "text"
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(int(token))
            else:
                runs.append((kind, [int(token)]))
        return runs

    def image_block_view(self, block: Sequence[int]) -> list[int]:
        """The drafter's placeholders for one target image block: one per image feature row, or none."""
        if self.image_placeholder_id is None:
            return []
        rows = sum(1 for token in block if token == self.adapter.image_token_id)
        return [self.image_placeholder_id] * rows

    def prompt_view(self, target_ids: Sequence[int]) -> list[int]:
        """The drafter's ids for a target prompt (its BOS first, if its tokenizer adds one)."""
        view: list[int] = []
        for kind, ids in self.segments(target_ids):
            view.extend(self.image_block_view(ids) if kind == "image" else self.drafter_ids(self.target_text(ids)))
        prefix = self.drafter_prefix
        return view if prefix and view[: len(prefix)] == prefix else prefix + view

    # ---- drafts -> target ids ----------------------------------------------------------------------------
    def drafted_text(self, drafter_context: Sequence[int], drafts: Sequence[int]) -> str:
        """The text `drafts` add after `drafter_context` (decoded with a little context: a SentencePiece
        piece's leading space and a byte-level character split over two tokens come out right)."""
        context = list(drafter_context[-self.window :])
        before = self.drafter_text(context)
        after = self.drafter_text(context + list(drafts))
        if not after.startswith(before):  # a context character completed by the drafts: keep what follows it
            common = 0
            while common < min(len(before), len(after)) and before[common] == after[common]:
                common += 1
            before = before[:common]
        return after[len(before) :].rstrip(REPLACEMENT_CHARACTER)

    def candidates(self, committed: Sequence[int], text: str) -> Candidates:
        """Target ids continuing `committed` (target ids) with `text`, aligned on the committed tail."""
        if not text:
            return Candidates([], False)
        tail = list(committed[-self.window :])
        encoded = self.target_ids(self.target_text(tail) + text)
        shared = common_prefix_length(encoded, tail)
        if shared == len(tail):
            return Candidates(encoded[shared:], False)
        return Candidates(self.target_ids(text), True)


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each id's text *inside* a text (decoded after an anchor, so a SentencePiece piece keeps its space)."""
    anchor = list(tokenizer.encode("a", add_special_tokens=False))[:1]
    start = len(tokenizer.decode(anchor, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    texts = tokenizer.batch_decode([anchor + [int(index)] for index in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return [text[start:] for text in texts]


def shared_vocabulary(bridge: TokenBridge, drafter_vocab_size: int, target_vocab_size: int
                      ) -> tuple[list[int], list[int]]:
    """Drafter ids and the target ids that stand for exactly the same text, one to one (`(drafter, target)`).

    Why: a drafter restricted to these tokens proposes target tokens one for one, so its distribution is a
    distribution over target tokens and speculative sampling stays exact (the vocabulary-intersection
    variant of universal speculative decoding). A string counts only if the target's tokenizer encodes it
    as that single token and decodes the token back to it; unfinished UTF-8 pieces never count.
    """
    excluded = set(bridge.image_block_ids) | ({bridge.image_placeholder_id} - {None})
    drafter_ids = [index for index in range(drafter_vocab_size) if index not in excluded]
    strings = token_strings(bridge.drafter_tokenizer, drafter_ids)
    encoded = bridge.target_tokenizer(strings, add_special_tokens=False)["input_ids"]
    candidates = [(drafter_id, ids[0], text) for drafter_id, text, ids in zip(drafter_ids, strings, encoded)
                  if text and REPLACEMENT_CHARACTER not in text and len(ids) == 1 and ids[0] < target_vocab_size
                  and ids[0] not in excluded]
    round_trip = token_strings(bridge.target_tokenizer, [target_id for _, target_id, _ in candidates])
    pairs = [(drafter_id, target_id) for (drafter_id, target_id, text), back in zip(candidates, round_trip)
             if back == text]
    return [drafter_id for drafter_id, _ in pairs], [target_id for _, target_id in pairs]
