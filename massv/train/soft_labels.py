"""Soft labels for phase 2: the target's own next-token distribution at every answer position.

Why: the target's answers teach one token per position, the one it emitted; a sampled answer is one draw
from a distribution the drafter never sees. Sampled speculative decoding accepts a draft x with probability
min(1, p(x) / q(x)), so the expected acceptance per position is 1 - TV(p, q): what pays is matching the
target's distribution p itself, not one draw of it (DistillSpec). Greedy decoding rewards the argmax, which
the distribution holds too, with the margins the hard label hides.

One teacher-forced target forward per training example gives p at every answer position, far cheaper than
the generation that wrote the answers. It runs once, before step 1, on the main process; the result is
cached on disk by content like the preprocessed records (`massv.train.preprocess`), so every process and
every `--resume` reads the same labels. Each position keeps the `top_k` most probable ids (renormalised):
with top_k equal to the serving top-k (Hugging Face's default 50) and temperature 1, that is exactly the
distribution the sampling target draws from. Ids the drafter must never propose (at or past its draftable
vocabulary) get no mass.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from massv.config import LogitDistillationConfig
from massv.families import FamilyAdapter
from massv.io import atomic_directory
from massv.train.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

SOFT_LABELS_FORMAT_VERSION = 1
SOFT_LABELS_FILE = "soft_labels.safetensors"
DONE_NAME = "soft_labels.json"


@dataclass
class SoftLabels:
    """The target's top-k distribution at each supervised position of one example, in position order.

    Row r belongs to the r-th position t with `labels[t + 1] != -100` (the order in which the loss gathers
    them): `ids: (num_answer_tokens, k)`, `logprobs: (num_answer_tokens, k)`, renormalised over the k ids.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token `labels[t + 1]` carries loss: `(num_answer_tokens,)`."""
    return torch.nonzero(labels[1:] != IGNORE_INDEX).flatten()


@torch.no_grad()
def example_soft_labels(target: PreTrainedModel, adapter: FamilyAdapter, input_ids: torch.Tensor,
                        labels: torch.Tensor, image_inputs: dict[str, torch.Tensor] | None, vocab_limit: int,
                        settings: LogitDistillationConfig) -> SoftLabels:
    """One teacher-forced forward of the whole example, the family's prompt inputs as the engine passes them."""
    device = next(target.parameters()).device
    ids = input_ids.view(1, -1).to(device)
    images = {name: value.to(device) for name, value in (image_inputs or {}).items()}
    positions = supervised_positions(labels).to(device)
    kwargs, _ = adapter.target_prefill_kwargs(ids, images, target)
    logits = target(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=positions,
                    **images, **kwargs).logits[0, :, :vocab_limit]
    return top_k_labels(logits, settings)


def top_k_labels(logits: torch.Tensor, settings: LogitDistillationConfig) -> SoftLabels:
    """`logits: (positions, draftable ids)` -> their `top_k` ids at `temperature`, renormalised over those k."""
    logprobs = torch.log_softmax(logits.float() / settings.temperature, dim=-1)
    top = logprobs.topk(min(settings.top_k, logprobs.shape[-1]), dim=-1)
    return SoftLabels(ids=top.indices.to(torch.int32).cpu(), logprobs=torch.log_softmax(top.values, dim=-1).cpu())


def soft_labels_key(preprocess_key: str, target: PreTrainedModel, vocab_limit: int,
                    settings: LogitDistillationConfig) -> str:
    """Hash of what the labels depend on: the examples (their preprocess key), the target, k and temperature."""
    target_id = {"name_or_path": getattr(target.config, "_name_or_path", ""),
                 "config": target.config.to_json_string(use_diff=False),
                 "weights": _weights_digest(target)}
    parts = {"version": SOFT_LABELS_FORMAT_VERSION, "records": preprocess_key, "target": target_id,
             "vocab_limit": vocab_limit, "top_k": settings.top_k, "temperature": settings.temperature}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _weights_digest(model: PreTrainedModel) -> str:
    """A cheap fingerprint of the weights (a few values per tensor): the same path may hold another training."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        if param.device.type == "meta":
            raise ValueError(f"the target's weight {name} was released; soft labels need the whole target")
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def batch_soft_labels(target: PreTrainedModel, adapter: FamilyAdapter, examples: list[Any], vocab_limit: int,
                      settings: LogitDistillationConfig, pad_token_id: int) -> list[SoftLabels]:
    """`example_soft_labels` of several examples in one right-padded forward (the model places the tokens
    itself, as in training: padding sits after every real token, so no real token attends to it)."""
    device = next(target.parameters()).device
    length = max(int(example.input_ids.shape[0]) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : example.input_ids.shape[0]] = example.input_ids
        attention_mask[row, : example.input_ids.shape[0]] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with_images = [example.image_inputs for example in examples if example.image_inputs is not None]
    images = ({name: torch.cat([inputs[name] for inputs in with_images]).to(device) for name in adapter.image_input_names}
              if with_images else {})
    derived = {name: adapter.modality_type_ids(input_ids) for name in adapter.derived_input_names}
    positions = [supervised_positions(example.labels) for example in examples]
    kept = torch.unique(torch.cat(positions))  # sorted: one logits row per position any example needs
    logits = target(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    logits_to_keep=kept.to(device), **images, **derived).logits[..., :vocab_limit]
    return [top_k_labels(logits[row, torch.searchsorted(kept, rows).to(device)], settings)
            for row, rows in enumerate(positions)]


def compute_soft_labels(target: PreTrainedModel, adapter: FamilyAdapter, dataset: Any, vocab_limit: int,
                        settings: LogitDistillationConfig, pad_token_id: int = 0) -> list[SoftLabels]:
    """Soft labels of every example of `dataset` (a `DrafterDataset`), in its order, `settings.batch_size`
    examples per target forward."""
    was_training = target.training
    target.eval()
    results: list[SoftLabels] = []
    with tqdm(total=len(dataset), desc="soft labels (teacher-forced target)", unit="example") as progress:
        for start in range(0, len(dataset), settings.batch_size):
            examples = [dataset.encoded(index) for index in range(start, min(start + settings.batch_size, len(dataset)))]
            results += batch_soft_labels(target, adapter, examples, vocab_limit, settings, pad_token_id)
            progress.update(len(examples))
    target.train(was_training)
    return results


def cached_soft_labels(target: PreTrainedModel, adapter: FamilyAdapter, dataset: Any, vocab_limit: int,
                       settings: LogitDistillationConfig, cache_dir: Path, preprocess_key: str,
                       accelerator: Accelerator, pad_token_id: int = 0) -> list[SoftLabels]:
    """`compute_soft_labels`, computed once by the main process and read from `cache_dir` by everyone."""
    key = soft_labels_key(preprocess_key, target, vocab_limit, settings)
    directory = cache_dir / f"soft-labels-{key}"
    with accelerator.main_process_first():
        if not (directory / DONE_NAME).is_file():
            if not accelerator.is_main_process:
                raise RuntimeError(f"the main process did not write {directory}: is data.cache_dir on a file system "
                                   "all processes share?")
            labels = compute_soft_labels(target, adapter, dataset, vocab_limit, settings, pad_token_id)
            _save(labels, directory, {"key": key, "num_examples": len(labels), "top_k": settings.top_k,
                                      "temperature": settings.temperature})
        else:
            logger.info("soft labels from the cache %s", directory)
        return _load(directory, len(dataset))


def _save(labels: list[SoftLabels], directory: Path, info: dict[str, Any]) -> None:
    """One file: every example's rows concatenated, plus where each example starts."""
    lengths = torch.tensor([0] + [label.ids.shape[0] for label in labels], dtype=torch.int64)
    tensors = {"ids": torch.cat([label.ids for label in labels]), "logprobs": torch.cat([label.logprobs for label in labels]),
               "offsets": lengths.cumsum(0)}
    with atomic_directory(directory) as staging:
        save_file(tensors, str(staging / SOFT_LABELS_FILE))
        (staging / DONE_NAME).write_text(json.dumps(info, indent=2, sort_keys=True))
    logger.info("soft labels of %d examples (%d positions, top %d) cached in %s", len(labels),
                int(lengths.sum()), info["top_k"], directory)


def _load(directory: Path, num_examples: int) -> list[SoftLabels]:
    tensors = load_file(str(directory / SOFT_LABELS_FILE))
    offsets = tensors["offsets"].tolist()
    if len(offsets) != num_examples + 1:
        raise ValueError(f"{directory} holds soft labels of {len(offsets) - 1} examples, the data has {num_examples}: "
                         "delete the directory to recompute them")
    return [SoftLabels(ids=tensors["ids"][start:end], logprobs=tensors["logprobs"][start:end])
            for start, end in zip(offsets[:-1], offsets[1:])]


def attach_soft_labels(config: Any, accelerator: Accelerator, target: PreTrainedModel, drafter: Any,
                       processor: Any, train_data: Any, collator: Any, records: Any = None) -> None:
    """Phase 2 setup with `phase2.logit_distillation` set: every example served with its soft labels, the
    collator told how to mix them into the loss. The target runs on the accelerator's device for the pass."""
    from massv.train.preprocess import cache_root, preprocess_key

    settings = config.phase2.logit_distillation
    record_key, _ = preprocess_key(config, 2, processor, drafter.adapter, records)
    device = accelerator.device
    if next(target.parameters()).device != device:
        target.to(device)
    labels = cached_soft_labels(target, drafter.adapter, train_data, drafter.config.draftable_vocab_size, settings,
                                cache_root(config, config.phase2.output_dir), record_key, accelerator,
                                collator.pad_token_id)
    train_data.attach_soft_labels(labels)
    collator.soft_label_weight = settings.weight
    collator.soft_label_temperature = settings.temperature
