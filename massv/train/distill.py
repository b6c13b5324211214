"""Self-distillation data: the target VLM answers every instruction prompt with its image.

MASSV's phase 2 fine-tunes the drafter on the *target's* answers, not the dataset's: the drafter is judged by
how often the target accepts its guesses, so it should imitate the target's distribution, not GPT-4's.

    python -m massv.train.distill --config configs/qwen2_5_vl_7b.yaml      (= massv distill --config ...)
    accelerate launch -m massv.train.distill --config ...                  (shards claimed by the processes)

Output, in `config.data.distilled_dir`:
    manifest.json         generation settings; a restart with different settings is refused
    shard-00000.jsonl     LLaVA conversation records, the target's answers in place of the gpt turns,
    shard-00001.jsonl     `distill.shard_size` records each, in source order
    shard-00002.jsonl.partial   the shard being written: one line per finished record
    claims/<launch>/      which process of the current launch took which shard (removed when all are done)

Decoding: `massv.generation_settings` resolves `distill.temperature / top_k / top_p / repetition_penalty /
max_new_tokens` exactly as `target.generate()`, `massv eval` and the engine do (unset values from the
target's generation config, then Hugging Face's defaults), and the manifest records the result under
`generation`, so the drafter learns from the decoding it is measured against.

Interrupted and restarted, a run continues where it stopped with no duplicate and no missing record: a
finished shard is written atomically (temp file + rename) and never regenerated; the shard in progress is
appended to (flushed and fsynced) batch by batch, and on restart its records are recognised by their
`source_index` and skipped, a torn last line is discarded. `distill.batch_size` may change between restarts
(e.g. after running out of memory); everything that changes the answers may not.

Work is claimed, not split in advance: each process takes the next shard nobody of its launch has taken
(an exclusively created file under `claims/<launch>/`) and finishes by itself when none is left. No
process waits for the others at the end, so one that finishes hours early cannot hit the collective
timeout, and a slow process does not hold back shards another could answer.

With `all_turns: false` (default) only the first question is answered and the record keeps that one exchange:
the dataset's later turns were written in reply to the dataset's first answer, not the target's. With
`all_turns: true` the target answers every human turn, its own previous answers in the history. Each
record says, per answer, whether it was cut at `max_new_tokens` (`truncated`); phase 2 then does not teach
the drafter to stop there (`data.truncated_answers`).

Batched generation uses left padding. For the tiny test models batched greedy output equals unbatched
output token for token (tested); for bf16 models on GPU, padding can change rounding and so, rarely, a
near-tied greedy choice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, ProcessorMixin

from massv.chat import encode_rendered
from massv.config import RunConfig, load_config
from massv.errors import MassvError
from massv.families import FamilyAdapter, get_adapter
from massv.generation_settings import GenerationSettings, resolve_generation_settings
from massv.io import atomic_write_json
from massv.train.data import build_messages, render_prompt
from massv.train.distilled import MANIFEST_NAME, SHARD_PATTERN, DistillIncompleteError
from massv.train.llava_data import (
    GPT,
    HUMAN,
    IMAGE_TOKEN,
    LoadReport,
    load_image,
    load_llava_records,
    write_llava_jsonl,
)

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: resolved `generation` settings instead of the configured temperature / top_p
PARTIAL_SUFFIX = ".partial"
CLAIMS_DIR = "claims"
# Manifest keys that must match for a restart to continue an existing output directory.
SETTINGS_KEYS = ("target", "family", "source", "image_root", "num_records", "records_sha256", "generation",
                 "all_turns", "shard_size", "seed")


class DistillSettingsError(MassvError, ValueError):
    """The output directory was started with other settings; continuing would mix two distributions."""


@dataclass
class DistillResult:
    """What one `generate_responses` call did."""

    output_dir: Path
    num_records: int  # records to answer in total (after skipping bad ones)
    generated: int  # answered by this call
    already_done: int  # found answered on disk (finished shards, records of partial ones this process took)
    complete: bool  # this process found no shard left to take and finished the ones it took
    load_report: LoadReport | None = None
    shards_written: list[str] = field(default_factory=list)
    all_shards_finished: bool = False  # every shard of the run is on disk (seen by the last process to end)
    generation: GenerationSettings | None = None


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def generation_settings_for(config: RunConfig, target: PreTrainedModel) -> GenerationSettings:
    """The configured decoding with every unset value resolved as `target.generate()` (and the engine) would."""
    settings = config.distill
    return resolve_generation_settings(
        target.generation_config, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
        repetition_penalty=settings.repetition_penalty, max_new_tokens=settings.max_new_tokens,
    )


def generation_config_for(config: RunConfig, target: PreTrainedModel, processor: ProcessorMixin,
                          adapter: FamilyAdapter) -> GenerationConfig:
    """`GenerationConfig` for the resolved settings (`generation_settings_for`), stopping at end of turn."""
    tokenizer = processor.tokenizer
    eos_ids = {tokenizer.convert_tokens_to_ids(adapter.end_of_turn_token)}
    model_eos = target.generation_config.eos_token_id
    eos_ids.update(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return GenerationConfig(
        **generation_settings_for(config, target).generate_kwargs(),
        eos_token_id=sorted(eos_ids),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids),
    )


@torch.no_grad()
def generate_answers(target: PreTrainedModel, processor: ProcessorMixin, prompts: Sequence[str],
                     images: Sequence[Any], generation_config: GenerationConfig) -> list[tuple[str, bool]]:
    """(answer text, truncated) per prompt; one left-padded `generate` call per image / text-only group.

    Prompts with and without an image go to separate calls because processors want one image list per text.
    """
    results: list[tuple[str, bool] | None] = [None] * len(prompts)
    eos_ids = set(generation_config.eos_token_id)
    groups = ([i for i, image in enumerate(images) if image is not None],
              [i for i, image in enumerate(images) if image is None])
    for indices in groups:
        if not indices:
            continue
        group_images = [[images[i]] for i in indices] if images[indices[0]] is not None else None
        encoded = encode_rendered(processor, [prompts[i] for i in indices], group_images, padding=True,
                                  padding_side="left").to(target.device)
        output = target.generate(**encoded, generation_config=generation_config)
        new_tokens = output[:, encoded["input_ids"].shape[1]:].tolist()
        for index, tokens in zip(indices, new_tokens):
            finished = any(token in eos_ids for token in tokens)
            text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
            # A literal "<image>" in an answer would make the record invalid LLaVA data.
            results[index] = (text.replace(IMAGE_TOKEN, "").strip(), not finished)
    return [result for result in results if result is not None]


def answer_records(records: Sequence[dict[str, Any]], target: PreTrainedModel, processor: ProcessorMixin,
                   adapter: FamilyAdapter, generation_config: GenerationConfig, all_turns: bool,
                   seed: int) -> list[dict[str, Any]]:
    """The records with the target's answers in place of the gpt turns (first turn only unless all_turns)."""
    images = [load_image(record["image_path"], record["id"]) if record["image_path"] else None for record in records]
    questions = [[turn["value"] for turn in record["conversations"] if turn["from"] == HUMAN] for record in records]
    answers: list[list[str]] = [[] for _ in records]
    truncated: list[list[bool]] = [[] for _ in records]
    rounds = max(len(q) for q in questions) if all_turns else 1
    for turn in range(rounds):
        active = [i for i in range(len(records)) if turn < len(questions[i])]
        prompts = []
        for i in active:
            history = [item for q, a in zip(questions[i][:turn], answers[i]) for item in
                       ({"from": HUMAN, "value": q}, {"from": GPT, "value": a})]
            conversation = history + [{"from": HUMAN, "value": questions[i][turn]}]
            prompts.append(render_prompt(build_messages(conversation, images[i] is not None, adapter), processor))
        # Seeded per batch and turn: sampled answers are reproducible for a given batch composition.
        torch.manual_seed(seed + records[0]["source_index"] * 1009 + turn)
        outputs = generate_answers(target, processor, prompts, [images[i] for i in active], generation_config)
        for i, (text, was_truncated) in zip(active, outputs):
            answers[i].append(text)
            truncated[i].append(was_truncated)
    results = []
    for record, record_questions, record_answers, record_truncated in zip(records, questions, answers, truncated):
        conversations = [item for q, a in zip(record_questions, record_answers) for item in
                         ({"from": HUMAN, "value": q}, {"from": GPT, "value": a})]
        out = {"id": record["id"]}
        if record["image"] is not None:
            out["image"] = record["image"]
        out.update({"conversations": conversations, "source_index": record["source_index"],
                    "truncated": record_truncated})
        results.append(out)
    return results


# --------------------------------------------------------------------------------------------------
# Resumable sharded output
# --------------------------------------------------------------------------------------------------


def _records_fingerprint(records: Dataset) -> str:
    digest = hashlib.sha256()
    for sample_id, image_path in zip(records["id"], records["image_path"]):
        digest.update(f"{sample_id}\t{image_path}\n".encode())
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)


def check_or_write_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest of a new run, or make sure an existing one was written with the same settings."""
    path = output_dir / MANIFEST_NAME
    if not path.exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, manifest)
        return
    existing = json.loads(path.read_text(encoding="utf-8"))
    differences = []
    for key in SETTINGS_KEYS:
        old, new = existing.get(key), manifest.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # name the setting inside, e.g. generation.temperature
            differences += [f"{key}.{name}: existing {old.get(name)!r}, now {new.get(name)!r}"
                            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        else:
            differences.append(f"{key}: existing {old!r}, now {new!r}")
    if differences:
        raise DistillSettingsError(
            f"{output_dir} holds self-distillation output generated with other settings ({'; '.join(differences)}). "
            "Continuing would mix two answer distributions: restore the settings, or choose another "
            "data.distilled_dir (or delete this one) to start over."
        )


def _read_partial(path: Path, shard_indices: range) -> dict[int, dict[str, Any]]:
    """Finished records of an interrupted shard by source index; a torn (unparsable) line is dropped."""
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("dropping a partly written line of %s (interrupted mid-write)", path)
            continue
        index = record.get("source_index")
        if isinstance(index, int) and index in shard_indices:
            done.setdefault(index, record)
    return done


def _append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _relative_image(image_path: str | None, image_root: str | None) -> str | None:
    if image_path is None:
        return None
    if image_root and os.path.commonpath([image_path, image_root]) == image_root:
        return os.path.relpath(image_path, image_root)
    return image_path


def _claim_shard(output_dir: Path, launch_id: str, shard: int, process_index: int) -> bool:
    """Take `shard` for this process if no process of this launch has: an exclusively created claim file.

    Claims of earlier launches live in other folders and are ignored: their unfinished shards are taken again
    (and continued from their partial file) by whoever comes first now.
    """
    folder = output_dir / CLAIMS_DIR / launch_id
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / SHARD_PATTERN.format(shard), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps({"process_index": process_index, "host": socket.gethostname(), "pid": os.getpid()}))
    return True


def _shard_range(shard: int, shard_size: int, num_records: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, num_records))


def generate_responses(config: RunConfig, *, target: PreTrainedModel | None = None,
                       processor: ProcessorMixin | None = None, records: Dataset | None = None,
                       output_dir: str | os.PathLike[str] | None = None, max_items: int | None = None,
                       device: str | torch.device | None = None, process_index: int = 0,
                       num_processes: int = 1, launch_id: str | None = None) -> DistillResult:
    """Answer every record of `config.data.instruct_json` with the target into sharded JSONL (resumable).

    `target`/`processor`/`records` may be given already built (tests, demo); otherwise they come from the config.
    `max_items` stops after that many newly answered records (a smoke test, or a simulated interruption).
    `device` is where a target built here goes (default: CUDA when available). The processes of one launch
    share `launch_id` (one call alone needs none) and claim shards from each other as they go.
    """
    from massv.loading import build_target_and_processor

    settings = config.distill
    output_dir = Path(output_dir if output_dir is not None else config.data.distilled_dir)
    launch_id = launch_id or uuid.uuid4().hex
    load_report = None
    image_root = None
    if records is None:
        if not config.data.instruct_json:
            raise ValueError("data.instruct_json is not set: there are no prompts to answer")
        image_root = os.path.abspath(config.data.instruct_image_root or os.path.dirname(config.data.instruct_json))
        records, load_report = load_llava_records(
            config.data.instruct_json, image_root, strict=config.data.strict_images, require_image=False,
            num_workers=config.data.num_workers,
        )
    if target is None or processor is None:
        target, processor = build_target_and_processor(config.model, device=device)
    adapter = get_adapter(target.config)
    generation = generation_settings_for(config, target)
    generation_config = generation_config_for(config, target, processor, adapter)

    num_records = len(records)
    manifest = {
        "massv_distill_version": MANIFEST_VERSION,
        "target": config.model.target,
        "family": adapter.model_type,
        "source": os.path.abspath(config.data.instruct_json) if config.data.instruct_json and load_report else None,
        "image_root": image_root,
        "num_records": num_records,
        "records_sha256": _records_fingerprint(records),
        "generation": generation.to_dict(),
        "all_turns": settings.all_turns,
        "shard_size": settings.shard_size,
        "seed": settings.seed,
        "num_shards": math.ceil(num_records / settings.shard_size),
        "source_report": None if load_report is None else {
            "total": load_report.total, "kept": load_report.kept, "missing_images": len(load_report.missing_images),
            "corrupt_images": len(load_report.corrupt_images), "invalid_records": len(load_report.invalid_records),
        },
    }
    # Every process checks (the first one to get there writes; identical content, atomic rename).
    check_or_write_manifest(output_dir, manifest)
    logger.info("decoding: %s", generation)

    num_shards = manifest["num_shards"]
    result = DistillResult(output_dir=output_dir, num_records=num_records, generated=0, already_done=0,
                           complete=False, load_report=load_report, generation=generation)
    progress = tqdm(total=num_records, unit="record", desc="target answers", disable=process_index != 0,
                    dynamic_ncols=True)
    target.eval()
    try:
        for shard in range(num_shards):
            final_path = output_dir / SHARD_PATTERN.format(shard)
            indices = _shard_range(shard, settings.shard_size, num_records)
            if final_path.exists():
                result.already_done += len(indices)
                progress.update(len(indices))
                continue
            if not _claim_shard(output_dir, launch_id, shard, process_index) or final_path.exists():
                continue  # another process of this launch has it (or just finished it)
            partial_path = final_path.with_name(final_path.name + PARTIAL_SUFFIX)
            done = _read_partial(partial_path, indices)
            if partial_path.exists():  # rewrite without a torn line, so appends start on a clean line
                write_llava_jsonl([done[index] for index in sorted(done)], partial_path)
            result.already_done += len(done)
            progress.update(len(done))
            pending = [index for index in indices if index not in done]
            todo = pending if max_items is None else pending[: max_items - result.generated]
            for start in range(0, len(todo), settings.batch_size):
                batch = [{**records[index], "source_index": index,
                          "image": _relative_image(records[index]["image_path"], image_root)}
                         for index in todo[start:start + settings.batch_size]]
                answered = answer_records(batch, target, processor, adapter, generation_config,
                                          settings.all_turns, settings.seed)
                _append_records(partial_path, answered)
                result.generated += len(answered)
                progress.update(len(answered))
            if len(todo) < len(pending):  # stopped by max_items: the shard stays partial
                return result
            _finish_shard(partial_path, final_path, indices)
            result.shards_written.append(final_path.name)
    finally:
        progress.close()
    result.complete = True
    result.all_shards_finished = all((output_dir / SHARD_PATTERN.format(shard)).exists() for shard in range(num_shards))
    if result.all_shards_finished:
        shutil.rmtree(output_dir / CLAIMS_DIR, ignore_errors=True)
    logger.info("self-distillation: %d records answered by this process, %d found answered; %s; output in %s",
                result.generated, result.already_done,
                "every shard is finished" if result.all_shards_finished else "other processes are still answering",
                output_dir)
    return result


def _finish_shard(partial_path: Path, final_path: Path, indices: range) -> None:
    """Turn a complete partial file into its shard (atomically, in source order) after checking it."""
    done = _read_partial(partial_path, indices)
    missing = [index for index in indices if index not in done]
    if missing:
        raise RuntimeError(f"{partial_path} lacks records {missing[:10]}; refusing to write {final_path.name}")
    write_llava_jsonl([done[index] for index in indices], final_path)
    partial_path.unlink()


# --------------------------------------------------------------------------------------------------
# Reading the output (phase 2)
# --------------------------------------------------------------------------------------------------


def load_distilled_records(distilled_dir: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None,
                           strict: bool = False, num_workers: int = 4) -> tuple[Dataset, LoadReport]:
    """All shards of a finished self-distillation run as one LLaVA records dataset (see `load_llava_records`).

    Raises `DistillIncompleteError` if a shard is missing: training on part of the data should be a decision.
    """
    directory = Path(distilled_dir)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.exists():
        raise DistillIncompleteError(
            f"{manifest_path} not found: generate the phase-2 data first with `massv distill --config ...`"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    shards = [directory / SHARD_PATTERN.format(shard) for shard in range(manifest["num_shards"])]
    missing = [shard.name for shard in shards if not shard.exists()]
    if missing:
        raise DistillIncompleteError(
            f"self-distillation in {directory} is unfinished: {len(missing)} of {len(shards)} shards missing "
            f"(e.g. {missing[0]}); rerun `massv distill` with the same config to finish it"
        )
    root = os.fspath(image_root) if image_root is not None else (manifest.get("image_root") or str(directory))
    datasets, reports = [], []
    for shard in shards:
        dataset, report = load_llava_records(shard, root, strict=strict, require_image=False, num_workers=num_workers)
        datasets.append(dataset)
        reports.append(report)
    merged = LoadReport(
        total=sum(r.total for r in reports), kept=sum(r.kept for r in reports),
        missing_images=[i for r in reports for i in r.missing_images],
        corrupt_images=[i for r in reports for i in r.corrupt_images],
        invalid_records=[i for r in reports for i in r.invalid_records],
        invalid_reasons={k: v for r in reports for k, v in r.invalid_reasons.items()},
    )
    return concatenate_datasets(datasets), merged


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from massv.cli import HelpFormatter, add_device_arguments, add_override_argument

    parser = argparse.ArgumentParser(
        prog="massv distill",
        description="Have the target VLM answer the instruction prompts (phase-2 self-distillation data). "
        "Resumable: rerun the same command after an interruption.", formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", required=True, help="run config YAML (model, data, distill sections)")
    add_override_argument(parser, "distill.batch_size=16 data.distilled_dir=data/x")
    add_device_arguments(parser, from_config=True)
    parser.add_argument("--max-items", type=int, default=None,
                        help="stop after answering this many records (smoke test); rerun to continue")
    return parser


def run_distillation(config: RunConfig, max_items: int | None = None,
                     device: torch.device | str | None = None) -> DistillResult:
    """`massv distill` in this process of the launch (every process of a launch calls it).

    The processes agree on a launch id once, at the start; after that they never wait for each other.
    """
    from datetime import timedelta

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),  # `accelerate launch --cpu` / torchrun
                         timeout=timedelta(minutes=config.distill.process_group_timeout_minutes))
    launch = [uuid.uuid4().hex]
    if state.num_processes > 1:
        broadcast_object_list(launch)  # the main process's id, so claims of this launch share one folder
    return generate_responses(config, max_items=max_items, device=device or state.device,
                              process_index=state.process_index,
                              num_processes=state.num_processes, launch_id=launch[0])


def main(argv: Sequence[str] | None = None) -> int:
    """`massv distill`: generate (or finish generating) the target's answers for phase 2."""
    from massv.cli import configure_logging
    from massv.loading import resolve_device
    from massv.preflight import check_distill_inputs

    args = build_parser().parse_args(argv)
    configure_logging()
    overrides = list(args.override) + ([f"model.torch_dtype={args.dtype}"] if args.dtype else [])
    config = load_config(args.config, overrides)
    check_distill_inputs(config)  # prompts, images, target name: before the target is built
    device = None if args.device == "auto" else resolve_device(args.device)[0]
    result = run_distillation(config, max_items=args.max_items, device=device)
    if not result.complete:
        logger.info("stopped after %d records (--max-items); rerun the same command to continue", result.generated)
    from accelerate import PartialState

    PartialState().destroy_process_group()  # local: no process waits for another here
    return 0


if __name__ == "__main__":
    from massv.cli import run_main

    raise SystemExit(run_main("distill", main))
