"""Tiny, randomly initialised instances of the real architectures, with offline tokenizers and processors.

No VLM weights can be downloaded where this project is proven, so the tests and the demo build the *real*
model classes (`Qwen2_5_VLForConditionalGeneration`, `Gemma3ForConditionalGeneration`, `Qwen2ForCausalLM`,
`Gemma3ForCausalLM`) from small configs. The tokenizers are byte-level BPEs trained on a given corpus with
each family's special tokens and chat template, and the vocabulary relations mirror the real pairs:

- Qwen: target and drafter share one tokenizer, and both embeddings are padded past it to *different* sizes
  (Qwen2.5-VL-7B: 152064 rows, Qwen2.5-0.5B: 151936).
- Gemma3: the soft image token gets the first id past the text vocabulary, so it lies *outside* the drafter's
  embedding (Gemma-3-12b: image token 262144, Gemma-3-1b: 262144 rows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL's chat template, reduced to images and text.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GEMMA_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
]
GEMMA_IMAGE_TOKEN = "<image_soft_token>"
# Gemma3's chat template, reduced to images and text.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# A small fixed corpus so fixtures need no data: words that a captioning world would use.
DEFAULT_CORPUS = [
    "There are two red circles at the top left and a small blue square in the center.",
    "What colour is the square? The square is blue.",
    "How many triangles are there? There are three green triangles.",
    "Describe the image. A large yellow star is at the bottom right next to a purple cross.",
    "Where is the orange circle? The orange circle is on the left side of the image.",
    "Are there more circles than squares? Yes, there are three circles and one square.",
]


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def train_bpe(corpus: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE trained offline: any text encodes, and the special tokens get the first ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    return tokenizer


def build_qwen_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 384,
                         adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A Qwen2-style tokenizer (same special tokens and chat template) trained on `corpus`.

    `adds_bos=True`: a variant that prepends `<|endoftext|>` as BOS whenever special tokens are added (the
    real Qwen tokenizer does not), so a test can see any code path that tokenizes a rendered chat with
    `add_special_tokens=True`.
    """
    bos = {"bos_token": "<|endoftext|>", "add_bos_token": True} if adds_bos else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(corpus, vocab_size, QWEN_SPECIAL_TOKENS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        **bos,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


FOREIGN_IMAGE_TOKEN = "<|image|>"


def build_foreign_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 300,
                            special_tokens: Iterable[str] = (*QWEN_SPECIAL_TOKENS, FOREIGN_IMAGE_TOKEN),
                            split_words: bool = True) -> PreTrainedTokenizerFast:
    """A drafter's own tokenizer: another vocabulary size, and its special tokens *after* the learned ones.

    Why: no id means the same as in the target's tokenizer (the special tokens shift every learned id), and
    another merge budget splits words at other boundaries, as a tokenizer of another family does. It spells
    the ChatML markers like Qwen (as SmolLM2 does), so a target's rendered prompt reads naturally, and has its
    own image placeholder `FOREIGN_IMAGE_TOKEN` for a cross-tokenizer MASSV drafter. `split_words=False`
    lets merges run across spaces: tokens of several words ("Ġon the left,"), whose boundaries fall inside
    the target's tokens as often as between them.
    """
    specials = list(special_tokens)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials), special_tokens=[], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_gemma_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 384,
                          adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A Gemma3-style tokenizer whose image soft token id is `vocab_size`: one past the text vocabulary.

    `adds_bos=True`: like the real Gemma3 tokenizer, it prepends `<bos>` whenever special tokens are added,
    while the chat template writes `<bos>` too: tokenizing a rendered chat with special tokens gives two.
    """
    backend = train_bpe(corpus, vocab_size, GEMMA_SPECIAL_TOKENS)
    text_vocab_size = backend.get_vocab_size()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": GEMMA_IMAGE_TOKEN,
        },
        **({"add_bos_token": True} if adds_bos else {}),
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    if tokenizer.convert_tokens_to_ids(GEMMA_IMAGE_TOKEN) != text_vocab_size:
        raise AssertionError("the Gemma image token must come right after the text vocabulary")
    return tokenizer


@dataclass
class TinyPair:
    """A target VLM, a same-family drafter LM, and the processor that prepares inputs for both."""

    target: PreTrainedModel
    drafter_lm: PreTrainedModel
    processor: ProcessorMixin

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer both models share (the processor's)."""
        return self.processor.tokenizer


def build_qwen_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 64, patch_size: int = 8) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL processor whose images map to (image_size / patch_size / 2)^2 image tokens."""
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch_size, temporal_patch_size=2, merge_size=2, min_pixels=pixels, max_pixels=pixels
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=patch_size, temporal_patch_size=2, merge_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_gemma_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 64, tokens_per_image: int = 16) -> Gemma3Processor:
    """Gemma3 processor: fixed-size images, `tokens_per_image` soft tokens each."""
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA_CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )


def qwen_target_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2,
                       vision_hidden_size: int = 32, vision_depth: int = 2, patch_size: int = 8,
                       num_heads: int = 4, intermediate_size: int | None = None) -> Qwen2_5_VLConfig:
    """Config of a small Qwen2.5-VL whose LM embedding is padded well past the tokenizer (like 152064)."""
    head_dim = hidden_size // num_heads
    # Real Qwen2.5-VL: head_dim 128 -> mrope_section [16, 24, 24] (temporal, height, width); same proportions.
    height_width = (head_dim // 2 - head_dim // 8) // 2
    mrope_section = [head_dim // 2 - 2 * height_width, height_width, height_width]
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": _round_up(len(tokenizer), 64) + 64,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size or hidden_size * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": max(1, num_heads // 2),
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": vision_hidden_size * 2,
            "num_heads": 2,
            "patch_size": patch_size,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": patch_size * 2 * 2,  # 2x2 merged tokens per window: exercises window attention
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def qwen_drafter_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 32, num_layers: int = 1,
                        num_heads: int = 2, intermediate_size: int | None = None) -> Qwen2Config:
    """Config of a small Qwen2 text LM, embedding padded to a different size than the target's (like 151936)."""
    return Qwen2Config(
        vocab_size=_round_up(len(tokenizer), 32),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )


def gemma_target_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2,
                        vision_hidden_size: int = 32, vision_layers: int = 2, image_size: int = 64,
                        patch_size: int = 8, tokens_per_image: int = 16, num_heads: int = 4,
                        sliding_window: int = 16) -> Gemma3Config:
    """Config of a small Gemma3 VLM; its vocabulary extends past the image token (like 262208 vs 262144)."""
    image_token_id = tokenizer.convert_tokens_to_ids(GEMMA_IMAGE_TOKEN)
    return Gemma3Config(
        text_config=_gemma_text_config_dict(tokenizer, image_token_id + 64, hidden_size, num_layers, num_heads, sliding_window),
        vision_config={
            "hidden_size": vision_hidden_size,
            "intermediate_size": vision_hidden_size * 2,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_use_head": False,
        },
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=image_token_id,
    )


def _gemma_text_config_dict(tokenizer: PreTrainedTokenizerFast, vocab_size: int, hidden_size: int, num_layers: int,
                            num_heads: int, sliding_window: int) -> dict[str, Any]:
    # Every other layer slides, so both cache layer kinds are exercised (real Gemma3: 5 local, 1 global).
    layer_types = ["sliding_attention" if index % 2 == 0 else "full_attention" for index in range(num_layers)]
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": max(1, num_heads // 2),
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": 2048,
        "sliding_window": sliding_window,
        "layer_types": layer_types,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<bos>"),
        "eos_token_id": [tokenizer.convert_tokens_to_ids("<eos>"), tokenizer.convert_tokens_to_ids("<end_of_turn>")],
        "pad_token_id": tokenizer.convert_tokens_to_ids("<pad>"),
    }


def gemma_drafter_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 32, num_layers: int = 2,
                         num_heads: int = 2, sliding_window: int = 16) -> Gemma3TextConfig:
    """Config of a small Gemma3 text LM whose embedding ends right before the image soft token."""
    text_vocab_size = tokenizer.convert_tokens_to_ids(GEMMA_IMAGE_TOKEN)
    return Gemma3TextConfig(**_gemma_text_config_dict(tokenizer, text_vocab_size, hidden_size, num_layers, num_heads, sliding_window))


def build_tiny_pair(family: str, seed: int = 0, corpus: Iterable[str] = DEFAULT_CORPUS, image_size: int = 64,
                    target_kwargs: dict[str, Any] | None = None, drafter_kwargs: dict[str, Any] | None = None,
                    vocab_size: int = 384, tokenizer_adds_bos: bool = False) -> TinyPair:
    """Randomly initialised target VLM + drafter LM + processor of `family` ("qwen2_5_vl" or "gemma3").

    `tokenizer_adds_bos=True` gives the family's BOS-adding tokenizer variant (see `build_qwen_tokenizer`,
    `build_gemma_tokenizer`); the weights are the same as without it.
    """
    torch.manual_seed(seed)
    target_kwargs = dict(target_kwargs or {})
    drafter_kwargs = dict(drafter_kwargs or {})
    if family == "qwen2_5_vl":
        tokenizer = build_qwen_tokenizer(corpus, vocab_size, adds_bos=tokenizer_adds_bos)
        processor = build_qwen_processor(tokenizer, image_size=image_size, patch_size=target_kwargs.get("patch_size", 8))
        target = Qwen2_5_VLForConditionalGeneration(qwen_target_config(tokenizer, **target_kwargs))
        drafter_lm = Qwen2ForCausalLM(qwen_drafter_config(tokenizer, **drafter_kwargs))
    elif family == "gemma3":
        tokenizer = build_gemma_tokenizer(corpus, vocab_size, adds_bos=tokenizer_adds_bos)
        config = gemma_target_config(tokenizer, image_size=image_size, **target_kwargs)
        processor = build_gemma_processor(tokenizer, image_size, config.mm_tokens_per_image)
        target = Gemma3ForConditionalGeneration(config)
        # Gemma3 initialises its projection to zeros (pretrained checkpoints overwrite it); a random tiny target
        # would otherwise be image-blind and give the drafter's projector no gradient.
        projection = target.model.multi_modal_projector.mm_input_projection_weight
        torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
        drafter_lm = Gemma3ForCausalLM(gemma_drafter_config(tokenizer, **drafter_kwargs))
    else:
        from massv.families import SUPPORTED_FAMILIES, UnsupportedFamilyError

        raise UnsupportedFamilyError(f"no tiny builder for {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    target.eval()
    drafter_lm.eval()
    target.generation_config.pad_token_id = tokenizer.pad_token_id
    drafter_lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return TinyPair(target=target, drafter_lm=drafter_lm, processor=processor)
