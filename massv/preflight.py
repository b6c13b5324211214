"""Checks of every input a command needs (files, output-directory state, models named, trackers) that run
before any model is built or downloaded.

Why: on a real target the model load is the expensive part (a 15 GB download, minutes of loading); a typo in
a data path found after it wastes all of that. Everything here reads file headers and directory listings
only, so a whole run's inputs are checked in about a second.
"""

from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path

from massv.config import RunConfig
from massv.errors import CorruptFileError, InputError, MissingInputError

logger = logging.getLogger(__name__)

_CHUNK = 16 << 20


def check_file(path: str | os.PathLike[str] | None, what: str) -> Path:
    """`path` is set, exists and is a file."""
    if not path:
        raise InputError(f"{what} is not set")
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    return path


def check_directory(path: str | os.PathLike[str] | None, what: str) -> Path:
    """`path` is set, exists and is a directory."""
    if not path:
        raise InputError(f"{what} is not set")
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"{what} {path} " + ("is not a directory" if path.exists() else "does not exist"))
    return path


def check_utf8(path: Path, what: str) -> None:
    """The whole file decodes as UTF-8 (streamed: about a second per GB, no JSON parsing)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                position = offset + error.start
                raise CorruptFileError(f"{what} {path} is not UTF-8 text (byte 0x{chunk[error.start]:02x} at offset "
                                       f"{position}): re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CorruptFileError(f"{what} {path} ends in the middle of a UTF-8 character (cut short?)") from None


def check_data_file(path: str | None, what: str) -> Path:
    """A LLaVA JSON/JSONL file: there, a file, UTF-8."""
    checked = check_file(path, what)
    check_utf8(checked, what)
    return checked


def check_models(config: RunConfig, with_drafter_lm: bool) -> None:
    """`model.target` (and `model.drafter_lm`) name something loadable: a directory, a Hub id or a tiny pair."""
    from massv.loading import check_model_source, tiny_family

    check_model_source(config.model.target, "model.target")
    if with_drafter_lm:
        check_model_source(config.model.drafter_lm, "model.drafter_lm")
        target_tiny, lm_tiny = tiny_family(config.model.target), tiny_family(config.model.drafter_lm)
        if (target_tiny is None) != (lm_tiny is None) or target_tiny != lm_tiny:
            raise InputError(f"model.target {config.model.target!r} and model.drafter_lm {config.model.drafter_lm!r}: "
                             "a tiny pair must name the same tiny family on both (e.g. tiny:qwen2_5_vl twice)")


def check_drafter_dir(path: str | os.PathLike[str], what: str) -> Path:
    """A finished MASSV drafter directory: config and every weight file (headers) read back."""
    from massv.drafter import check_drafter_files, read_drafter_config

    directory = Path(path)
    if not directory.is_dir():
        raise MissingInputError(f"{what} {directory} does not exist")
    check_drafter_files(directory, read_drafter_config(directory))
    return directory


def check_distilled_dir(path: str, what: str = "data.distilled_dir") -> Path:
    """A finished `massv distill` output: its manifest and every shard it lists."""
    from massv.io import read_json
    from massv.train.distilled import (
        MANIFEST_NAME,
        SHARD_PATTERN,
        DistillIncompleteError,
    )

    directory = Path(path)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DistillIncompleteError(f"{what} {directory} holds no {MANIFEST_NAME}: generate the phase-2 data first "
                                     "with 'massv distill --config ...' (or point data.distilled_dir at it)")
    manifest = read_json(manifest_path, "distill manifest")
    missing = [SHARD_PATTERN.format(index) for index in range(manifest.get("num_shards", 0))
               if not (directory / SHARD_PATTERN.format(index)).is_file()]
    if missing:
        raise DistillIncompleteError(f"self-distillation in {directory} is unfinished: {len(missing)} shard(s) missing "
                                     f"(e.g. {missing[0]}); rerun 'massv distill' with the same config to finish it")
    return directory


def check_training_inputs(config: RunConfig, phase: int, resume: bool | str) -> None:
    """Everything `massv train --phase N` reads or writes, checked before a model is built."""
    from massv.config import final_dir
    from massv.train.loop import check_output_dir, check_trackers

    cfg = config.phase1 if phase == 1 else config.phase2
    check_output_dir(cfg.output_dir, resume)
    check_trackers(cfg)
    check_models(config, with_drafter_lm=phase == 1)
    if phase == 1:
        check_data_file(config.data.pretrain_json, "data.pretrain_json")
        if config.data.pretrain_image_root:
            check_directory(config.data.pretrain_image_root, "data.pretrain_image_root")
    else:
        phase1_final = final_dir(config.phase1.output_dir)
        if not phase1_final.is_dir():
            raise MissingInputError(f"phase 2 starts from the phase-1 drafter, but {phase1_final} does not exist: run "
                                    "phase 1 first (massv train --config ... --phase 1) or set phase1.output_dir to "
                                    "where it was written")
        check_drafter_dir(phase1_final, "phase-1 drafter")
        check_distilled_dir(config.data.distilled_dir)
        if config.data.instruct_image_root:
            check_directory(config.data.instruct_image_root, "data.instruct_image_root")


def check_distill_inputs(config: RunConfig) -> None:
    """Everything `massv distill` reads, checked before the target is built."""
    check_models(config, with_drafter_lm=False)
    check_data_file(config.data.instruct_json, "data.instruct_json")
    if config.data.instruct_image_root:
        check_directory(config.data.instruct_image_root, "data.instruct_image_root")
