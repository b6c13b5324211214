"""Preprocessing once: the checked training records, built by the main process, cached on disk by content.

Before step 1 every record is loaded (image files checked and decoded) and encoded once to learn which
records fit and how long they are (`massv.train.data.check_records`). For LLaVA-Pretrain's 558k images
that is tens of minutes. Done on every process it is 8 times the CPU work on 8 GPUs, and a process that
finishes late makes the others' next collective time out; done at every start, each `--resume` pays it
again. So the main process does it once and writes the result (an Arrow dataset) under

    <data.cache_dir or <phase output_dir>/preprocessed>/phase<N>-<key>/

while the other processes wait (`accelerator.main_process_first()`, bounded by the configurable
process-group timeout) and then memory-map it. `key` is a hash of everything the result depends on:
the records' content (the data files' bytes, or the given records' rows), the image root, the tokenizer,
chat template and image processor, the family's image tokens, `data.max_length`, `strict_images` and
`truncated_answers`. The image files themselves are not hashed (558k files): after changing images in
place, delete the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from datasets import Dataset, load_from_disk
from transformers import ProcessorMixin

from massv.config import RunConfig
from massv.families import FamilyAdapter
from massv.io import atomic_directory
from massv.train.data import check_records

logger = logging.getLogger(__name__)

# Bump when `check_records` or the record format changes what a cached result means.
PREPROCESS_FORMAT_VERSION = 1
DONE_NAME = "preprocess.json"
RECORDS_DIR = "records"


def _sha256_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\n".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def records_digest(records: Dataset) -> str:
    """Hash of the rows that decide the training examples (for records given in memory)."""
    digest = hashlib.sha256()
    columns = [name for name in ("id", "image_path", "conversations", "truncated") if name in records.column_names]
    for row in records.select_columns(columns):
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def processor_digest(processor: ProcessorMixin) -> str:
    """Hash of what turns a conversation into ids and pixels: tokenizer, chat template, image processor."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "tokenizer": backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        "special_tokens": tokenizer.special_tokens_map,
        "chat_template": getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
        "image_processor": processor.image_processor.to_json_string()
        if getattr(processor, "image_processor", None) is not None else None,
        "processor": {key: getattr(processor, key) for key in ("image_seq_length",) if hasattr(processor, key)},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _source_digest(config: RunConfig, phase: int) -> dict[str, Any]:
    """The data files a phase reads, by content (phase 1: the captions JSON; phase 2: the distilled shards)."""
    data = config.data
    if phase == 1:
        if not data.pretrain_json:
            raise ValueError("data.pretrain_json is not set: phase 1 needs image-caption pairs (LLaVA-Pretrain)")
        return {"files": _sha256_files([Path(data.pretrain_json)]),
                "image_root": os.path.abspath(data.pretrain_image_root or os.path.dirname(data.pretrain_json))}
    directory = Path(data.distilled_dir)
    files = sorted(directory.glob("shard-*.jsonl"))
    manifest = directory / "manifest.json"
    return {"files": _sha256_files(([manifest] if manifest.is_file() else []) + files),
            "image_root": os.path.abspath(data.instruct_image_root) if data.instruct_image_root else None}


def preprocess_key(config: RunConfig, phase: int, processor: ProcessorMixin, adapter: FamilyAdapter,
                   records: Dataset | None) -> tuple[str, dict[str, Any]]:
    """(short key, what it hashes) for the checked records of `phase`."""
    parts = {
        "version": PREPROCESS_FORMAT_VERSION,
        "phase": phase,
        "source": {"records": records_digest(records)} if records is not None else _source_digest(config, phase),
        "processor": processor_digest(processor),
        "family": {"model_type": adapter.model_type, "image_token_id": adapter.image_token_id,
                   "image_block_token_ids": list(adapter.image_block_token_ids),
                   "end_of_turn_token": adapter.end_of_turn_token},
        "max_length": config.data.max_length,
        "strict_images": config.data.strict_images,
        "truncated_answers": config.data.truncated_answers,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return key, parts


def cache_root(config: RunConfig, output_dir: str | os.PathLike[str]) -> Path:
    return Path(config.data.cache_dir) if config.data.cache_dir else Path(output_dir) / "preprocessed"


def prepared_records(config: RunConfig, phase: int, output_dir: str | os.PathLike[str], processor: ProcessorMixin,
                     adapter: FamilyAdapter, accelerator: Accelerator, records: Dataset | None = None) -> Dataset:
    """The phase's checked records: from the cache when it holds them, else built by the main process.

    `records` given (tests, the demo) are used instead of the files the config names.
    """
    from massv.train.builders import load_phase_records

    key, parts = preprocess_key(config, phase, processor, adapter, records)
    directory = cache_root(config, output_dir) / f"phase{phase}-{key}"
    with accelerator.main_process_first():  # the others wait here, then find the result on disk
        if (directory / DONE_NAME).is_file():
            info = json.loads((directory / DONE_NAME).read_text())
            logger.info("preprocessed records from the cache %s (%d records)", directory, info["num_records"])
        else:
            if not accelerator.is_main_process:
                raise RuntimeError(f"the main process did not write {directory}: is data.cache_dir on a file system "
                                   "all processes share? (each machine needs the same path)")
            source = records if records is not None else load_phase_records(config, phase)[0]
            checked = check_records(source, processor, adapter, config.data.max_length,
                                    strict_images=config.data.strict_images, num_proc=config.data.num_workers,
                                    truncated_answers=config.data.truncated_answers, fingerprint=f"massv-{key}")
            _save(checked, directory, parts)
        return load_from_disk(str(directory / RECORDS_DIR))


def _save(checked: Dataset, directory: Path, parts: Mapping[str, Any]) -> None:
    """Write into a temporary sibling and rename: a killed job never leaves a half cache that looks done."""
    with atomic_directory(directory) as staging:  # replaces an earlier, unfinished attempt
        checked.save_to_disk(str(staging / RECORDS_DIR))
        info = {"num_records": len(checked), "key": dict(parts)}
        (staging / DONE_NAME).write_text(json.dumps(info, indent=2, sort_keys=True))
    logger.info("preprocessed %d records, cached in %s", len(checked), directory)
