"""LLaVA conversations -> drafter training examples, tokenized exactly as the target sees its prompts.

The drafter shares the target's tokenizer and must predict the target's next token in the target's own
prompt layout, so examples are built with the TARGET's processor: its chat template, its image placeholder
expansion (one placeholder id per image feature) and its image preprocessing.

Which tokens carry loss: only the assistant answers, each including the end-of-turn token that closes it
(the drafter must learn when the target stops). Answer spans are found by rendering the conversation
prefix-by-prefix (`apply_chat_template(messages[:turn], add_generation_prompt=True)`): the tokens of each
prefix must be a prefix of the full conversation's tokens, which holds for the Qwen2.5-VL and Gemma3
templates; a template for which it does not hold raises `ConversationFormatError` rather than silently
putting loss on the wrong tokens.

Spans are computed on the text with the image still a single placeholder (cheap, no image needed) and then
shifted onto the processor's output with the expanded image block. That is exact because the image sits in
the first user turn, before every answer: the expanded and unexpanded sequences share the whole suffix that
holds the answers, which is checked token by token.

Truncation to `max_length` cuts the end of the conversation, never the image block: a sample whose image
block does not fit is dropped (counted and logged) because half an image would no longer match the
vision features spliced into it.

Answers the target did not finish (self-distillation cut them at `max_new_tokens`; the record says so in
`truncated`) end with the template's end-of-turn token too, but the target never chose to stop there.
`truncated_answers="mask_end"` (default) keeps their tokens as targets and takes the loss off that
end-of-turn token; `"drop"` drops the whole sample.

The up-front pass over all records (`check_records`) decodes every image once; `massv.train.preprocess`
runs it on the main process only and caches its result on disk under a content hash.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import ProcessorMixin

from massv.chat import encode_rendered, render_chat, tokenize_rendered
from massv.families import FamilyAdapter
from massv.train.loss import SoftLabelBatch
from massv.train.llava_data import GPT, HUMAN, IMAGE_TOKEN, ImageError, load_image

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_LOGGED_IDS = 10
TruncatedAnswers = Literal["mask_end", "drop"]


class ConversationFormatError(ValueError):
    """The chat template renders a conversation prefix that is not a token prefix of the whole conversation."""


# --------------------------------------------------------------------------------------------------
# Messages and labels
# --------------------------------------------------------------------------------------------------


def strip_image_placeholder(text: str) -> str:
    """The human turn without LLaVA's `<image>` marker: the chat template places the image itself."""
    return text.replace(IMAGE_TOKEN, "").strip()


def build_messages(conversations: Sequence[Mapping[str, str]], has_image: bool,
                   adapter: FamilyAdapter) -> list[dict[str, Any]]:
    """LLaVA turns -> chat messages, the image first in the first user turn (the layout both families expect)."""
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(conversations):
        if turn["from"] == HUMAN:
            num_images = 1 if has_image and index == 0 else 0
            messages += adapter.user_messages(strip_image_placeholder(turn["value"]), num_images=num_images)
        elif turn["from"] == GPT:
            # Stripped like the target's generated answers: leading newlines would tokenize differently
            # right after the generation prompt than on their own, breaking the prefix property.
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"].strip()}]})
        else:
            raise ConversationFormatError(f"turn {index} is from {turn['from']!r}; expected 'human' or 'gpt'")
    return messages


def render_prompt(messages: Sequence[Mapping[str, Any]], processor: ProcessorMixin) -> str:
    """The target's prompt text for the next assistant turn (what `generate` is given)."""
    return render_chat(processor, messages, add_generation_prompt=True)


@dataclass
class LabeledText:
    """A rendered conversation with loss masks, image block still one placeholder (no image needed yet)."""

    text: str  # the full chat text, input to the processor
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on answer tokens (end-of-turn token included)
    first_answer_start: int  # every token from here on follows the image block


def label_conversation(messages: Sequence[Mapping[str, Any]], processor: ProcessorMixin,
                       end_of_turn_id: int, open_answers: Sequence[bool] = ()) -> LabeledText:
    """Render with the chat template and mark the assistant answers, prefix by prefix (see module docstring).

    `open_answers[k]` True: the k-th answer was cut off, so its end-of-turn token carries no loss.
    """
    text = render_chat(processor, messages, add_generation_prompt=False)
    input_ids = tokenize_rendered(processor, text)
    labels = [IGNORE_INDEX] * len(input_ids)
    first_answer_start = -1
    previous_end = 0
    answer_number = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix_ids = tokenize_rendered(processor, render_prompt(messages[:index], processor))
        if input_ids[: len(prefix_ids)] != prefix_ids or len(prefix_ids) < previous_end:
            mismatch = next((i for i, (a, b) in enumerate(zip(prefix_ids, input_ids)) if a != b), len(prefix_ids))
            raise ConversationFormatError(
                f"the chat template's prompt for assistant turn {index} is not a token prefix of the whole "
                f"conversation (first difference at token {mismatch}: prompt "
                f"{processor.tokenizer.decode(prefix_ids[mismatch:mismatch + 8])!r} vs conversation "
                f"{processor.tokenizer.decode(input_ids[mismatch:mismatch + 8])!r}); answer tokens cannot be "
                "located, so loss masks would be wrong. Use the target's own chat template."
            )
        start = len(prefix_ids)
        try:
            end = input_ids.index(end_of_turn_id, start)  # inclusive: the drafter learns when the target stops
        except ValueError:
            raise ConversationFormatError(
                f"assistant turn {index} is not closed by the end-of-turn token id {end_of_turn_id}"
            ) from None
        is_open = answer_number < len(open_answers) and open_answers[answer_number]
        labels[start : end + 1] = input_ids[start : end + 1]
        if is_open:  # the target did not stop here: no "stop" to learn
            labels[end] = IGNORE_INDEX
        answer_number += 1
        first_answer_start = start if first_answer_start < 0 else first_answer_start
        previous_end = end + 1
    if first_answer_start < 0:
        raise ConversationFormatError("the conversation has no assistant turn: nothing to learn from")
    return LabeledText(text=text, input_ids=input_ids, labels=labels, first_answer_start=first_answer_start)


# --------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------


@dataclass
class EncodedExample:
    """One training example: the target processor's ids (image expanded), labels and image inputs."""

    input_ids: torch.Tensor  # (seq_len,)
    labels: torch.Tensor  # (seq_len,)
    image_inputs: dict[str, torch.Tensor] | None  # processor outputs named by adapter.image_input_names


class ExampleDropped(Exception):
    """This sample cannot become a training example; `reason`: "too_long" (image block or every answer
    past max_length) or "truncated" (an unfinished answer, with truncated_answers="drop")."""

    def __init__(self, message: str, reason: str = "too_long") -> None:
        super().__init__(message)
        self.reason = reason


def encode_example(conversations: Sequence[Mapping[str, str]], image: Any, processor: ProcessorMixin,
                   adapter: FamilyAdapter, max_length: int, truncated: Sequence[bool] = (),
                   truncated_answers: TruncatedAnswers = "mask_end") -> EncodedExample:
    """Tokenize one conversation (and its PIL image, or None) as the target would, with answer-only labels.

    `truncated`: per answer, whether the target was cut off there (see the module docstring for
    `truncated_answers`). Raises `ExampleDropped` when the image block does not fit in `max_length`, no
    answer token does, or an answer is unfinished and `truncated_answers="drop"`.
    """
    if truncated_answers == "drop" and any(truncated):
        raise ExampleDropped("an answer was cut at max_new_tokens (truncated_answers: drop)", reason="truncated")
    end_of_turn_id = processor.tokenizer.convert_tokens_to_ids(adapter.end_of_turn_token)
    messages = build_messages(conversations, image is not None, adapter)
    labeled = label_conversation(messages, processor, end_of_turn_id, open_answers=truncated)
    if image is None:
        input_ids = torch.tensor(labeled.input_ids, dtype=torch.long)
        labels = torch.tensor(labeled.labels, dtype=torch.long)
        image_inputs = None
    else:
        encoded = encode_rendered(processor, [labeled.text], [[image]])
        input_ids = encoded["input_ids"][0]
        image_inputs = {name: encoded[name] for name in adapter.image_input_names}
        # Everything from the first answer on lies after the image block, so it is the same tokens, shifted.
        shift = input_ids.shape[0] - len(labeled.input_ids)
        tail = labeled.input_ids[labeled.first_answer_start :]
        if shift < 0 or input_ids[labeled.first_answer_start + shift :].tolist() != tail:
            raise ConversationFormatError(
                "expanding the image placeholder changed the tokens after the image block; answer positions "
                "cannot be mapped onto the processor's output (is the image in the first user turn?)"
            )
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[labeled.first_answer_start + shift :] = torch.tensor(labeled.labels[labeled.first_answer_start :])
    if input_ids.shape[0] > max_length:
        image_positions = torch.isin(input_ids, torch.tensor(adapter.image_block_token_ids)).nonzero()
        if image_positions.numel() and int(image_positions.max()) >= max_length:
            raise ExampleDropped(
                f"image block ends at token {int(image_positions.max()) + 1} > max_length {max_length}"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not bool((labels != IGNORE_INDEX).any()):
        raise ExampleDropped(f"no answer token within max_length {max_length}")
    return EncodedExample(input_ids=input_ids, labels=labels, image_inputs=image_inputs)


@dataclass
class EncodeReport:
    """What `DrafterDataset` kept and dropped, by sample id (ids past the first few are only counted)."""

    total: int = 0
    kept: int = 0
    too_long: list[str] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # dropped for an unfinished answer (truncated_answers: drop)
    num_tokens: int = 0  # all kept tokens, image placeholders included
    num_answer_tokens: int = 0  # tokens that carry loss
    num_open_answers: int = 0  # kept unfinished answers whose end-of-turn token carries no loss


def _check_example(record: Mapping[str, Any], processor: ProcessorMixin, adapter: FamilyAdapter,
                   max_length: int, strict: bool, truncated_answers: TruncatedAnswers) -> dict[str, Any]:
    """One validation-pass row: the drop reason (or None) and the sizes of the kept example."""
    row: dict[str, Any] = {"drop_reason": None, "num_tokens": 0, "num_answer_tokens": 0, "num_open_answers": 0}
    truncated = record.get("truncated") or []
    try:
        image = load_image(record["image_path"], record["id"]) if record["image_path"] else None
        example = encode_example(record["conversations"], image, processor, adapter, max_length, truncated,
                                 truncated_answers)
    except ImageError:
        if strict:
            raise
        row["drop_reason"] = "image"
        return row
    except ExampleDropped as dropped:
        row["drop_reason"] = dropped.reason
        return row
    except ConversationFormatError as error:
        raise ConversationFormatError(f"sample {record['id']}: {error}") from None
    row["num_tokens"] = int(example.input_ids.shape[0])
    row["num_answer_tokens"] = int((example.labels != IGNORE_INDEX).sum())
    row["num_open_answers"] = sum(bool(flag) for flag in truncated)
    return row


def check_records(records: Dataset, processor: ProcessorMixin, adapter: FamilyAdapter, max_length: int,
                  strict_images: bool = False, num_proc: int | None = None,
                  truncated_answers: TruncatedAnswers = "mask_end", fingerprint: str | None = None) -> Dataset:
    """The up-front pass: every record encoded once (images decoded), with its drop reason and sizes.

    Returns `records` plus the columns drop_reason (None, "too_long", "image", "truncated"), num_tokens,
    num_answer_tokens and num_open_answers. `fingerprint` names the result for `datasets` (a content hash,
    see `massv.train.preprocess`); without one a random name is used, since hashing the processor is slow.
    """
    return records.map(
        _check_example,
        fn_kwargs={"processor": processor, "adapter": adapter, "max_length": max_length, "strict": strict_images,
                   "truncated_answers": truncated_answers},
        num_proc=num_proc if num_proc and num_proc > 1 and len(records) >= 256 else None,
        desc="tokenizing",
        new_fingerprint=fingerprint or f"massv-check-{uuid.uuid4().hex}",
    )


class DrafterDataset(torch.utils.data.Dataset):
    """LLaVA records -> `EncodedExample`s, checked once up front to drop what does not fit, then lazily per item.

    The up-front pass (`check_records`, parallel over `num_proc` processes for large files) decides which
    records are usable and how long they are, so the number of steps is known before training and no batch
    is ever short of a sample; pass its result as `checked` to skip it (`massv.train.preprocess` caches it).
    Items are re-encoded on access (deterministic, so identical), which keeps pixel tensors out of memory;
    the image decode + preprocessing it repeats is cheap next to a training step.
    """

    def __init__(self, records: Dataset | None, processor: ProcessorMixin, adapter: FamilyAdapter, max_length: int,
                 strict_images: bool = False, num_proc: int | None = None,
                 truncated_answers: TruncatedAnswers = "mask_end", checked: Dataset | None = None) -> None:
        self.processor = processor
        self.adapter = adapter
        self.max_length = max_length
        self.truncated_answers = truncated_answers
        if checked is None:
            if records is None:
                raise ValueError("DrafterDataset needs records or their checked version")
            checked = check_records(records, processor, adapter, max_length, strict_images, num_proc,
                                    truncated_answers)
        reasons = checked["drop_reason"]
        ids = checked["id"]
        self.report = EncodeReport(total=len(checked))
        for sample_id, reason in zip(ids, reasons):
            if reason is not None:
                {"too_long": self.report.too_long, "image": self.report.bad_images,
                 "truncated": self.report.truncated}[reason].append(sample_id)
        keep = [index for index, reason in enumerate(reasons) if reason is None]
        self.records = checked.select(keep)
        self.report.kept = len(keep)
        self.report.num_tokens = int(sum(self.records["num_tokens"])) if keep else 0
        self.report.num_answer_tokens = int(sum(self.records["num_answer_tokens"])) if keep else 0
        if keep and "num_open_answers" in self.records.column_names:
            self.report.num_open_answers = int(sum(self.records["num_open_answers"]))
        self.lengths = list(self.records["num_tokens"]) if keep else []
        self.image_features: dict[str, torch.Tensor] | None = None  # see cache_image_features
        self.soft_labels: list[Any] | None = None  # see attach_soft_labels
        for what, dropped in (("an image block longer than max_length", self.report.too_long),
                              ("an unreadable image", self.report.bad_images),
                              ("an answer cut at max_new_tokens (truncated_answers: drop)", self.report.truncated)):
            if dropped:
                more = f" and {len(dropped) - MAX_LOGGED_IDS} more" if len(dropped) > MAX_LOGGED_IDS else ""
                logger.warning("dropped %d of %d samples with %s: %s%s", len(dropped), len(checked), what,
                               ", ".join(dropped[:MAX_LOGGED_IDS]), more)
        if self.report.num_open_answers:
            logger.info("%d answers were cut at max_new_tokens: their end-of-turn token carries no loss",
                        self.report.num_open_answers)
        logger.info("%d training examples, %d tokens, %d of them answer tokens (loss)",
                    self.report.kept, self.report.num_tokens, self.report.num_answer_tokens)
        if not keep:
            raise ValueError(f"no usable training example among {len(checked)} records (see warnings above)")

    def __len__(self) -> int:
        return len(self.records)

    def _encode(self, record: Mapping[str, Any], image: Any) -> EncodedExample:
        return encode_example(record["conversations"], image, self.processor, self.adapter, self.max_length,
                              record.get("truncated") or [], self.truncated_answers)

    def encoded(self, index: int) -> EncodedExample:
        """Example `index` as the target's processor encodes it (image loaded and preprocessed)."""
        record = self.records[index]
        image = load_image(record["image_path"], record["id"]) if record["image_path"] else None
        return self._encode(record, image)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.encoded(index)
        item = {"input_ids": example.input_ids, "labels": example.labels, "image_inputs": example.image_inputs}
        image_path = self.records[index]["image_path"]
        if self.image_features is not None and image_path:
            item["image_inputs"], item["image_features"] = None, self.image_features[image_path]
        if self.soft_labels is not None:
            item["soft_labels"] = self.soft_labels[index]
        return item

    def attach_soft_labels(self, soft_labels: Sequence[Any]) -> None:
        """Serve each example with the target's distribution at its answer positions (`massv.train.soft_labels`)."""
        if len(soft_labels) != len(self):
            raise ValueError(f"{len(soft_labels)} soft labels for {len(self)} examples")
        self.soft_labels = list(soft_labels)

    def cache_image_features(self, encode: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
        """Run the frozen vision encoder once per distinct image and serve its features instead of pixels.

        The encoder never trains, so its output per image is fixed; caching skips it on every later step.
        Features live in CPU memory (tokens x feature_dim per image): right for small sets such as the demo's
        and the tests', not for LLaVA-Pretrain's 558k images.
        """
        features: dict[str, torch.Tensor] = {}
        for record in self.records:
            path = record["image_path"]
            if not path or path in features:
                continue
            example = self._encode(record, load_image(path, record["id"]))
            features[path] = encode(example.image_inputs).detach().cpu()
        self.image_features = features
        logger.info("cached frozen vision features of %d images", len(features))


@dataclass
class DrafterCollator:
    """Right-pads a batch and joins its image inputs the way the family's vision encoder takes them.

    Both families' processors return image inputs with one leading row block per image (Qwen2.5-VL:
    `pixel_values` (patches, dim) + `image_grid_thw` (1, 3); Gemma3: `pixel_values` (1, 3, H, W)), so
    concatenating along dim 0 is Qwen's patch concatenation and Gemma's stacking alike, in prompt order.
    Text-only samples contribute no image rows. Samples served with cached vision features (see
    `DrafterDataset.cache_image_features`) give `image_features` instead of `image_inputs`.
    """

    pad_token_id: int
    image_input_names: tuple[str, ...]
    soft_label_weight: float = 0.0  # with soft labels: the loss's share of KL(target || drafter)
    soft_label_temperature: float = 1.0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        max_len = max(int(example["input_ids"].shape[0]) for example in examples)
        input_ids = torch.full((len(examples), max_len), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), max_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), max_len), dtype=torch.long)
        for row, example in enumerate(examples):
            length = int(example["input_ids"].shape[0])
            input_ids[row, :length] = example["input_ids"]
            labels[row, :length] = example["labels"]
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if examples[0].get("soft_labels") is not None:  # rows in the loss's order: sample by sample, position order
            batch["soft_labels"] = SoftLabelBatch(
                ids=torch.cat([example["soft_labels"].ids for example in examples]).long(),
                logprobs=torch.cat([example["soft_labels"].logprobs for example in examples]),
                weight=self.soft_label_weight, temperature=self.soft_label_temperature)
        cached = [example["image_features"] for example in examples if example.get("image_features") is not None]
        if cached:  # precomputed features (num_image_tokens, dim) per sample: row order = placeholder order
            batch["image_features"] = torch.cat(cached)
            return batch
        with_images = [example["image_inputs"] for example in examples if example["image_inputs"] is not None]
        batch["image_inputs"] = None
        if with_images:
            batch["image_inputs"] = {name: torch.cat([inputs[name] for inputs in with_images])
                                     for name in self.image_input_names}
        return batch


def pad_token_id(processor: ProcessorMixin) -> int:
    """The tokenizer's pad id (eos when it has none): padded positions are masked, so any valid id works."""
    tokenizer = processor.tokenizer
    token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the target's tokenizer has neither a pad nor an eos token to pad batches with")
    return int(token_id)
