"""MASSV training for a drafter with its own tokenizer: the target's examples, re-tokenized through text.

Phase 1 captions and phase 2's self-distilled answers are the target's *text*; here they are re-encoded with
the drafter's tokenizer by the same `TokenBridge` the cross-tokenizer proposer reads prompts with, so the
drafter trains on exactly the views it drafts from: prompt text in its own tokens, one of its own image
placeholders per target image feature row (the projector maps the target's vision width to its hidden
size), the answer encoded on its own, loss on the answer tokens only.

The target-side dataset (`DrafterDataset`: conversation rendering, answer labels, image preprocessing,
cached vision features) is reused unchanged; `RetokenizedDataset` converts each of its examples.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel

from massv.config import TrainingConfig
from massv.drafter import MultimodalDrafter
from massv.speculative.proposers.token_bridge import TokenBridge
from massv.train.data import IGNORE_INDEX, DrafterCollator, DrafterDataset
from massv.train.loop import TrainResult, make_accelerator, train_loop

logger = logging.getLogger(__name__)


def cross_tokenizer_drafter(target: PreTrainedModel, language_model: PreTrainedModel, drafter_tokenizer: Any,
                            image_token: str, **projector_kwargs: Any) -> MultimodalDrafter:
    """A fresh MASSV drafter around an LM of another tokenizer: its own `image_token` marks the features."""
    image_token_id = drafter_tokenizer.convert_tokens_to_ids(image_token)
    if image_token_id is None or image_token_id == drafter_tokenizer.unk_token_id or \
            drafter_tokenizer.convert_ids_to_tokens(image_token_id) != image_token:
        raise ValueError(f"the drafter's tokenizer has no {image_token!r} token to mark image features with; add "
                         "it (tokenizer.add_special_tokens) and resize the LM's embeddings")
    drafter = MultimodalDrafter.from_target(target, language_model, len(drafter_tokenizer), **projector_kwargs)
    drafter.config.image_token_id = int(image_token_id)
    drafter.config.cross_tokenizer = True
    drafter.config.draftable_vocab_size = min(len(drafter_tokenizer), language_model.config.vocab_size)
    return drafter


def retokenize_example(bridge: TokenBridge, input_ids: torch.Tensor, labels: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One target example `(input_ids, labels)` in the drafter's ids, labels on the re-encoded answers."""
    drafter_ids: list[int] = []
    drafter_labels: list[int] = []
    ids, is_answer = input_ids.tolist(), (labels != IGNORE_INDEX).tolist()
    start = 0
    while start < len(ids):  # runs of prompt / answer tokens, each re-encoded on its own
        end = start
        while end < len(ids) and is_answer[end] == is_answer[start]:
            end += 1
        run = ids[start:end]
        view = bridge.drafter_ids(bridge.target_text(run)) if is_answer[start] else bridge.prompt_view(run)
        if start > 0 and bridge.drafter_prefix and view[: len(bridge.drafter_prefix)] == bridge.drafter_prefix:
            view = view[len(bridge.drafter_prefix):]  # the drafter's BOS opens the example, not each run
        drafter_ids.extend(view)
        drafter_labels.extend(view if is_answer[start] else [IGNORE_INDEX] * len(view))
        start = end
    return torch.tensor(drafter_ids, dtype=torch.long), torch.tensor(drafter_labels, dtype=torch.long)


class RetokenizedDataset(Dataset):
    """A target-side `DrafterDataset` whose examples come out in the drafter's tokens."""

    def __init__(self, source: DrafterDataset, bridge: TokenBridge) -> None:
        self.source = source
        self.bridge = bridge

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.source[index])
        item["input_ids"], item["labels"] = retokenize_example(self.bridge, item["input_ids"], item["labels"])
        return item


def train_cross_tokenizer_phase(drafter: MultimodalDrafter, source: DrafterDataset, target_tokenizer: Any,
                                drafter_tokenizer: Any, cfg: TrainingConfig, phase: int
                                ) -> tuple[MultimodalDrafter, TrainResult]:
    """Phase 1 (projector only) or phase 2 (projector + LM) on `source`'s examples, re-tokenized.

    The frozen vision features are computed once per image (small data sets: the world, tests).
    """
    drafter.set_trainable(f"phase{phase}")
    bridge = TokenBridge(target_tokenizer, drafter_tokenizer, drafter.adapter, drafter.config.image_token_id)
    source.cache_image_features(drafter.encode_images)
    pad = drafter_tokenizer.pad_token_id
    pad = drafter_tokenizer.eos_token_id if pad is None else pad
    collator = DrafterCollator(pad_token_id=int(pad), image_input_names=tuple(drafter.adapter.image_input_names))
    accelerator = make_accelerator(cfg)
    result = train_loop(accelerator, drafter, RetokenizedDataset(source, bridge), collator, cfg,
                        run_name=f"cross-tokenizer phase{phase}")
    drafter = accelerator.unwrap_model(drafter)
    drafter.eval()
    return drafter, result
