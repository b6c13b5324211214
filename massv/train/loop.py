"""The training loop both phases share: Accelerate, AdamW, warm-up + cosine, clipping, resumable checkpoints.

The loop is plain PyTorch under `accelerate` (`train_loop` below; the step fits on one screen): it works on a
CPU, one GPU, or many GPUs under `accelerate launch` (DDP). What differs between the phases (which weights
train, which data, where the result goes) lives in the recipes `phase1.py` and `phase2.py`.

Checkpoints (`<output_dir>/checkpoint-<step>/`, every `save_every_steps` optimizer steps, the last
`keep_last_checkpoints` kept) hold exactly what is needed to continue as if never stopped:

    trainable.safetensors   the weights that train (frozen weights are rebuilt from the config)
    optimizer.pt            AdamW moments
    scheduler.pt            learning-rate schedule position
    rng_state_<rank>.pt     Python / NumPy / torch (CPU and CUDA) RNG states of every process
    train_state.json        step, epoch, micro-batches consumed in that epoch, and the data-order fingerprint

The final step is always checkpointed, so resuming a finished run trains nothing. A checkpoint is written
into a hidden staging directory and renamed into place (`massv.io`), so a job killed mid-save leaves the
previous checkpoint intact and never a half one, and a failed save (a full disk) removes its staging
directory. `resume=True` reloads the newest checkpoint that reads back whole (a corrupt newest one is skipped
with a warning, for the one before), and refuses when there is none; `resume="auto"` starts fresh then.
Each log line also goes to `<output_dir>/metrics.jsonl` (step, loss, learning rate, tokens/s), and to the
trackers of `report_to` through Accelerate. A resumed run
replays the same seeded data order and skips the micro-batches already consumed
(`accelerator.skip_first_batches`); on CPU the resumed run ends with bit-identical weights to an
uninterrupted one (tested). The data loader draws from its own seeded generator, never from the global RNG,
so restoring the global RNG state reproduces dropout masks too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from massv.config import TrainingConfig
from massv.train.batching import build_dataloader, resolve_accumulation
from massv.errors import InputError, MassvError
from massv.io import discard_staging, load_safetensors, prepare_staging, publish_directory, staging_path

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAIN_STATE_NAME = "train_state.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
METRICS_NAME = "metrics.jsonl"
# pip package of each Accelerate tracker, for the message when one is asked for but not installed.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


class ResumeError(MassvError, RuntimeError):
    """A checkpoint cannot continue this run (other data order, batch layout or process count), or there is
    none to continue from, or the output directory already holds a run that was not asked to be resumed."""


class CorruptCheckpointError(MassvError, RuntimeError):
    """A checkpoint's files do not read back whole (cut short by a full disk or a killed copy)."""


@dataclass
class TrainState:
    """Where training stands: enough, with the data-order fingerprint, to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` this process consumed
    fingerprint: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What `train_loop` did: its final state, the mean loss of every optimizer step it ran, and why it ended."""

    state: TrainState
    max_steps: int
    step_losses: list[float]  # this process's mean micro-batch loss per optimizer step run by this call
    finished: bool  # False: stopped by `stop_after_steps` (a simulated interruption)


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------


class UnsupportedDistributedModeError(RuntimeError):
    """The launch asks for a distributed mode whose checkpoints this loop cannot write (DeepSpeed, FSDP)."""


# Environment flags `accelerate launch` sets for the sharded modes.
_SHARDED_MODE_FLAGS = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP"}


def refuse_sharded_training(distributed_type: Any = None) -> None:
    """Raise for DeepSpeed or FSDP (from the launcher's environment, or an Accelerator's distributed type).

    Their optimizer state is sharded over the processes, so the checkpoint written here (weights and AdamW
    state saved by the main process alone) would hang at the gather or store one shard as the whole.
    Nothing needs them: the trained drafter (<= 1B parameters, frozen vision tower) fits on one GPU with
    gradient checkpointing, and plain DDP (`accelerate launch --multi_gpu`) scales it over GPUs.
    """
    from accelerate.utils import DistributedType, parse_flag_from_env

    requested = [name for flag, name in _SHARDED_MODE_FLAGS.items() if parse_flag_from_env(flag)]
    if distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        requested.append(str(distributed_type).split(".")[-1])
    if requested:
        raise UnsupportedDistributedModeError(
            f"{requested[0]} is not supported by massv training: its sharded optimizer state cannot be saved by the "
            "checkpoints here (--resume would restore a wrong or partial state). Launch with plain DDP instead: "
            "`accelerate launch --multi_gpu --num_processes N -m massv.train ...` (or an accelerate config with "
            "distributed_type: MULTI_GPU); the drafter fits on one GPU, see docs/scaling.md."
        )


def make_accelerator(cfg: TrainingConfig) -> Accelerator:
    """Accelerator for one phase: DDP (never DeepSpeed/FSDP), the configured process-group timeout, the
    accumulation `global_batch_size` implies, TensorBoard logging only when asked for and installed."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    refuse_sharded_training()
    trackers = check_trackers(cfg)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=cfg.output_dir,
        # Seeded sampler: epoch e always visits the data in the same order, which is what makes resuming exact.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # A barrier (the main process preprocessing the data, or saving) may wait this long.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.process_group_timeout_minutes))],
    )
    refuse_sharded_training(accelerator.distributed_type)
    accelerator.gradient_accumulation_steps = resolve_accumulation(cfg, accelerator.num_processes).gradient_accumulation_steps
    return accelerator


def check_trackers(cfg: TrainingConfig) -> list[str]:
    """The installed trackers among `report_to`; one that is named but not installed is an error.

    The legacy `tensorboard: true` only warns when TensorBoard is missing, as it always did.
    """
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()}
    explicit = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to or [])
    chosen = []
    for name in cfg.trackers():
        if name == "all" or name in available:
            chosen.append(name)
        elif name in explicit:
            raise InputError(f"report_to names {name}, which is not installed: pip install {TRACKER_PACKAGES[name]} "
                             f"(or remove it from report_to; {METRICS_NAME} is written in any case)")
        else:
            logger.warning("tensorboard: true, but TensorBoard is not installed (pip install tensorboard); "
                           "logging to the console and %s only", METRICS_NAME)
    return chosen


def load_trainable_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor],
                           mismatch: Callable[[list[str], list[str]], Exception]) -> None:
    """Copy a checkpoint's trainable weights into `model`; `mismatch(missing, unexpected)` is raised when the
    names differ (another phase, other LoRA settings), before anything is copied."""
    params = trainable_parameters(model)
    if set(weights) != set(params):
        raise mismatch(sorted(set(params) - set(weights)), sorted(set(weights) - set(params)))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name].to(device=param.device, dtype=param.dtype))


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for everything that trains (what a checkpoint stores)."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable weights; biases and norm weights (1-D) are not decayed."""
    params = list(trainable_parameters(model).values())
    if not params:
        raise ValueError("no trainable parameter: was set_trainable() called?")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=cfg.learning_rate)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def train_loop(accelerator: Accelerator, model: torch.nn.Module, dataset: Dataset, collate_fn: Callable,
               cfg: TrainingConfig, *, resume: bool | str = False, num_workers: int = 0,
               stop_after_steps: int | None = None, run_name: str = "train",
               tracker_config: Mapping[str, Any] | None = None) -> TrainResult:
    """Train `model` (its `requires_grad` weights) on `dataset` as `cfg` says; checkpoints go to `cfg.output_dir`.

    `model(**batch)` must return an object with `.loss`. `resume`: False starts a new run (refused if
    `output_dir` holds checkpoints), True continues the newest readable checkpoint (refused if there is
    none), "auto" continues one if there is one. `stop_after_steps` ends the call after that many optimizer
    steps in total (checkpoints due by then are written): an interruption, for tests.
    """
    output_dir = Path(cfg.output_dir)
    cfg = resolve_accumulation(cfg, accelerator.num_processes)
    dataloader = build_dataloader(dataset, collate_fn, cfg, num_workers)
    optimizer = build_optimizer(model, cfg)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    num_processes = accelerator.num_processes
    steps_per_epoch = math.ceil(len(dataloader) / cfg.gradient_accumulation_steps)  # len: this process's share
    max_steps = cfg.max_steps or math.ceil(cfg.num_epochs * steps_per_epoch)
    # A prepared scheduler steps once per process per optimizer step, hence the factor (as in HF examples).
    scheduler = accelerator.prepare(get_scheduler(
        cfg.lr_scheduler, optimizer.optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * max_steps) * num_processes,
        num_training_steps=max_steps * num_processes))
    trainable = list(trainable_parameters(accelerator.unwrap_model(model)).values())

    fingerprint = {"dataset_size": len(dataset), "per_device_batch_size": cfg.per_device_batch_size,
                   "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "num_processes": num_processes,
                   "seed": cfg.seed, "max_steps": max_steps, "max_tokens_per_batch": cfg.max_tokens_per_batch}
    state = TrainState(fingerprint=fingerprint)
    check_output_dir(output_dir, resume)
    if accelerator.is_main_process:
        remove_stale_staging(output_dir)
    if resume and checkpoint_dirs(output_dir):
        state = resume_from_latest(output_dir, accelerator, model, optimizer, scheduler, fingerprint)
    elif resume:
        logger.info("--resume auto: no checkpoint in %s, starting from the beginning", output_dir)
    metrics_path = output_dir / METRICS_NAME
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        keep_metrics_through(metrics_path, state.step)
    if state.step >= max_steps:
        logger.info("%s: %s already finished at step %d of %d; nothing to train", run_name, output_dir, state.step,
                    max_steps)
    if tracker_config is not None and accelerator.log_with:
        accelerator.init_trackers(run_name, config=_scalar_config(tracker_config))
    logger.info("%s: %d examples, %d optimizer steps (%d per epoch), %d process(es) x batch %d x accumulation %d",
                run_name, len(dataset), max_steps, steps_per_epoch, num_processes, cfg.per_device_batch_size,
                cfg.gradient_accumulation_steps)

    step_losses: list[torch.Tensor] = []
    window = {"loss": torch.zeros((), device=accelerator.device), "micro": 0,
              "tokens": torch.zeros((), device=accelerator.device), "start": time.perf_counter()}
    step_loss, step_micro = torch.zeros((), device=accelerator.device), 0
    progress = tqdm(total=max_steps, initial=state.step, desc=run_name, unit="step", dynamic_ncols=True,
                    disable=not accelerator.is_local_main_process)
    model.train()
    while state.step < max_steps:
        dataloader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(dataloader, state.batches_in_epoch) if state.batches_in_epoch else dataloader
        for batch in batches:
            # ---- the training step ---------------------------------------------------------------------
            with accelerator.accumulate(model):
                loss = model(**batch, use_cache=False).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()  # a no-op until `gradient_accumulation_steps` micro-batches are in
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            # ---- bookkeeping ---------------------------------------------------------------------------
            state.batches_in_epoch += 1
            step_loss, step_micro = step_loss + loss.detach(), step_micro + 1
            window["tokens"] += batch["attention_mask"].sum()
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            step_losses.append(step_loss / step_micro)
            window["loss"], window["micro"] = window["loss"] + step_loss, window["micro"] + step_micro
            step_loss, step_micro = torch.zeros((), device=accelerator.device), 0
            progress.update(1)
            if state.step % cfg.log_every_steps == 0 or state.step == max_steps:
                _log(accelerator, window, scheduler.get_last_lr()[0], state, progress, metrics_path)
            due = bool(cfg.save_every_steps) and state.step % cfg.save_every_steps == 0
            if due or state.step == max_steps:  # the final step always: resuming a finished run trains nothing
                save_checkpoint(output_dir, state, accelerator, model, optimizer, scheduler, cfg.keep_last_checkpoints)
            if state.step >= max_steps or (stop_after_steps is not None and state.step >= stop_after_steps):
                break
        else:  # the epoch ran out before max_steps
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            continue
        break
    progress.close()
    losses = torch.stack(step_losses).tolist() if step_losses else []
    return TrainResult(state=state, max_steps=max_steps, step_losses=losses, finished=state.step >= max_steps)


def _log(accelerator: Accelerator, window: dict[str, Any], lr: float, state: TrainState, progress: tqdm,
         metrics_path: Path) -> None:
    """Loss (mean over the window's micro-batches and processes), learning rate and tokens/s since the last log:
    to the console, the trackers and `metrics.jsonl`."""
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    loss = accelerator.reduce(window["loss"] / max(window["micro"], 1), reduction="mean").item()
    tokens = accelerator.reduce(window["tokens"], reduction="sum").item()
    metrics = {"train/loss": loss, "train/lr": lr, "train/tokens_per_second": tokens / elapsed}
    logger.info("step %d: loss %.4f, lr %.3g, %.0f tokens/s", state.step, loss, lr, tokens / elapsed)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    accelerator.log(metrics, step=state.step)
    if accelerator.is_main_process:
        record = {"step": state.step, "epoch": state.epoch, "loss": loss, "learning_rate": lr,
                  "tokens_per_second": tokens / elapsed, "time": time.time()}
        with metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    window.update(loss=torch.zeros_like(window["loss"]), micro=0, tokens=torch.zeros_like(window["tokens"]),
                  start=time.perf_counter())


def keep_metrics_through(metrics_path: Path, step: int) -> None:
    """Drop `metrics.jsonl` lines past `step` (a resumed run logs those steps again; a new run starts empty)."""
    if not metrics_path.exists():
        return
    kept = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
    from massv.io import atomic_write_text

    atomic_write_text(metrics_path, "".join(kept))


def _scalar_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattened scalar config for the tracker's hyper-parameter table."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_scalar_config(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Finished checkpoints, oldest first (temporary directories of interrupted saves are not listed)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / TRAIN_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_output_dir(output_dir: str | os.PathLike[str], resume: bool | str) -> None:
    """Refuse an output directory whose state does not fit `resume`, before anything is built or trained.

    No `resume` over existing checkpoints would silently restart (and later overwrite) a run; `resume=True`
    with no checkpoint is usually a mistyped `output_dir`, and would silently start from scratch.
    """
    output_dir = Path(output_dir)
    found = checkpoint_dirs(output_dir)
    if found and not resume:
        raise ResumeError(f"{output_dir} already holds {found[-1].name}: pass --resume to continue that run, or "
                          "choose another output_dir (or delete it) to start over")
    if resume is True and not found:
        where = "does not exist" if not output_dir.exists() else "holds no checkpoint-<step>/"
        raise ResumeError(f"--resume: nothing to resume, {output_dir} {where}. Check output_dir (a typo?); to start "
                          "a new run there drop --resume, or pass --resume auto to continue if possible and start "
                          "fresh otherwise")


def remove_stale_staging(output_dir: Path) -> None:
    """Staging directories of saves killed mid-way (SIGKILL leaves no chance to clean up) are never read: drop them."""
    if not output_dir.is_dir():
        return
    for path in output_dir.glob(f".{CHECKPOINT_PREFIX}*"):
        if path.is_dir() and path.name.endswith((".staging", ".tmp", ".old")):
            logger.info("removing %s, left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(output_dir: Path, state: TrainState, accelerator: Accelerator, model: torch.nn.Module,
                    optimizer: Any, scheduler: Any, keep_last: int | None) -> Path:
    """Write `checkpoint-<step>` atomically (staging directory + rename) and drop the oldest beyond `keep_last`.

    A failed write (a full disk, an interrupt) removes the staging directory and re-raises: the previous
    checkpoints stay as they were and nothing half-written is left.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.step}"
    staging = staging_path(final)  # a fixed name: every process writes its RNG state into it
    if accelerator.is_main_process:
        prepare_staging(staging)
    accelerator.wait_for_everyone()
    try:
        torch.save(_rng_state(), staging / f"rng_state_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            weights = {name: param.detach().contiguous().cpu()
                       for name, param in trainable_parameters(accelerator.unwrap_model(model)).items()}
            save_file(weights, str(staging / TRAINABLE_WEIGHTS))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            (staging / TRAIN_STATE_NAME).write_text(json.dumps(asdict(state), indent=2, sort_keys=True))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish_directory(staging, final)
    except BaseException:
        if accelerator.is_main_process:
            discard_staging(staging)
        raise
    if accelerator.is_main_process:
        if keep_last is not None:
            for old in checkpoint_dirs(output_dir)[:-keep_last]:
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


@dataclass
class _CheckpointContents:
    """Everything a checkpoint holds, read into memory before any of it is applied (a corrupt file must not
    leave the model half restored)."""

    state: TrainState
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def read_checkpoint(path: Path, process_index: int = 0) -> _CheckpointContents:
    """Read every file of a checkpoint, or raise `CorruptCheckpointError` naming the file that does not read."""
    current = path / TRAIN_STATE_NAME
    try:
        state = TrainState(**json.loads(current.read_text(encoding="utf-8")))
        current = path / TRAINABLE_WEIGHTS
        weights = load_safetensors(current)
        current = path / "optimizer.pt"
        optimizer = torch.load(current, map_location="cpu", weights_only=True)
        current = path / "scheduler.pt"
        scheduler = torch.load(current, map_location="cpu", weights_only=False)
        current = path / f"rng_state_{process_index}.pt"
        rng = torch.load(current, map_location="cpu", weights_only=False)
    except Exception as error:  # json, safetensors, torch's zip reader, a missing file: all mean "cut short"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptCheckpointError(f"{current} does not read back ({type(error).__name__}: {reason})") from error
    return _CheckpointContents(state, weights, optimizer, scheduler, rng)


def resume_from_latest(output_dir: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any,
                       scheduler: Any, fingerprint: Mapping[str, Any]) -> TrainState:
    """Continue from the newest checkpoint that reads back whole; a corrupt one is skipped with a warning."""
    found = checkpoint_dirs(output_dir)
    for path in reversed(found):
        try:
            contents = read_checkpoint(path, accelerator.process_index)
        except CorruptCheckpointError as error:
            logger.warning("skipping %s: %s; falling back to the checkpoint before it", path.name, error)
            continue
        return load_checkpoint(path, accelerator, model, optimizer, scheduler, fingerprint, contents)
    raise ResumeError(f"--resume: none of the {len(found)} checkpoint(s) in {output_dir} reads back whole "
                      f"({', '.join(path.name for path in found)}); delete them to start over")


def load_checkpoint(path: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    fingerprint: Mapping[str, Any], contents: _CheckpointContents | None = None) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from `path`; refuse if the data order would differ."""
    contents = contents or read_checkpoint(path, accelerator.process_index)
    state = contents.state
    differences = {key: (state.fingerprint.get(key), value) for key, value in fingerprint.items()
                   if state.fingerprint.get(key) != value}
    if differences:
        detail = ", ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in differences.items())
        raise ResumeError(f"cannot resume from {path}: {detail}. Resuming needs the same data, batch layout, "
                          "seed and number of processes, or the data order (and the result) would differ.")
    load_trainable_weights(accelerator.unwrap_model(model), contents.weights, lambda missing, unexpected: ResumeError(
        f"{path} trains other weights than this run (missing {missing[:5]}, unexpected {unexpected[:5]}): was it "
        "written by the other phase or with other LoRA settings?"))
    optimizer.load_state_dict(contents.optimizer)
    scheduler.load_state_dict(contents.scheduler)
    _set_rng_state(contents.rng)
    logger.info("resumed from %s: step %d, epoch %d, %d micro-batches into it", path, state.step, state.epoch,
                state.batches_in_epoch)
    return state
