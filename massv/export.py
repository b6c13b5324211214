"""`massv export CHECKPOINT --out DIR`: turn a training checkpoint into a drafter directory.

A checkpoint (`<output_dir>/checkpoint-<step>/`) stores only what trains, so that it can continue a run; it is
not a drafter. Export rebuilds the phase's drafter from the run's config (`resolved_config.yaml` next to the
checkpoints), puts the checkpoint's weights in (merging LoRA adapters, as the phase does at its end), and
saves it like a finished phase would: `MultimodalDrafter.save_pretrained`, model card included. Exporting
the final step's checkpoint gives the same weights as the phase's `final/`.

    massv export outputs/qwen7b/phase2/checkpoint-1500 --out drafters/qwen7b-step1500
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from massv.config import RESOLVED_CONFIG_NAME, RunConfig, load_config
from massv.drafter import CONFIG_NAME
from massv.errors import InputError, MissingInputError
from massv.io import check_safetensors, load_safetensors, read_json

logger = logging.getLogger(__name__)


def checkpoint_phase(checkpoint: Path, config: RunConfig) -> int:
    """Which phase wrote `checkpoint`: the one whose output_dir holds it."""
    parent = checkpoint.resolve().parent
    phases = [phase for phase, cfg in ((1, config.phase1), (2, config.phase2)) if Path(cfg.output_dir).resolve() == parent]
    if len(phases) != 1:
        raise InputError(f"cannot tell which phase wrote {checkpoint}: its directory is "
                         + ("both phases' output_dir" if phases else "neither phase1.output_dir nor phase2.output_dir")
                         + " of the config; pass --phase 1 or --phase 2")
    return phases[0]


def check_export_inputs(checkpoint: Path, out: Path) -> dict:
    """The checkpoint reads back (state, weights header) and `out` is free or a drafter; returns the train state."""
    from massv.train.loop import TRAIN_STATE_NAME, TRAINABLE_WEIGHTS

    if not checkpoint.is_dir():
        raise MissingInputError(f"checkpoint {checkpoint} does not exist")
    if not (checkpoint / TRAIN_STATE_NAME).is_file():
        if (checkpoint / CONFIG_NAME).is_file():
            raise InputError(f"{checkpoint} is already a drafter directory (it holds {CONFIG_NAME}): nothing to export")
        raise MissingInputError(f"{checkpoint} is not a training checkpoint: no {TRAIN_STATE_NAME} (written by "
                                "massv train into <output_dir>/checkpoint-<step>/)")
    check_safetensors(checkpoint / TRAINABLE_WEIGHTS)
    if out.resolve() == checkpoint.resolve() or checkpoint.resolve() in out.resolve().parents:
        raise InputError(f"--out {out} lies inside the checkpoint {checkpoint}: choose a directory outside it")
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
        raise InputError(f"--out {out} exists and is not a drafter directory: choose a new or empty directory "
                         "(an existing drafter there is replaced)")
    return read_json(checkpoint / TRAIN_STATE_NAME, "checkpoint state")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, config: RunConfig | None = None,
                      phase: int | None = None) -> Path:
    """Write the drafter of `checkpoint` to `out`; `config` defaults to the run's resolved_config.yaml."""
    from massv.loading import storage_dtype
    from massv.train.builders import keep_trainable_in_fp32, resolve_objects
    from massv.train.loop import TRAINABLE_WEIGHTS, load_trainable_weights

    checkpoint, out = Path(checkpoint), Path(out)
    state = check_export_inputs(checkpoint, out)
    if config is None:
        config_file = checkpoint.parent / RESOLVED_CONFIG_NAME
        if not config_file.is_file():
            raise MissingInputError(f"{config_file} not found: pass the run's config with --config")
        config = load_config(config_file)
    phase = phase or checkpoint_phase(checkpoint, config)
    if phase == 2:
        from massv.config import final_dir
        from massv.preflight import check_drafter_dir

        check_drafter_dir(final_dir(config.phase1.output_dir), "phase 2 checkpoints build on the phase-1 drafter")

    _, drafter, _ = resolve_objects(config, phase)
    drafter.set_trainable(f"phase{phase}")
    lora = config.phase2.lora if phase == 2 else None
    if lora is not None:
        from massv.train.phase2 import add_lora

        add_lora(drafter, lora)
    keep_trainable_in_fp32(drafter)  # as in training: the checkpoint holds float32 master weights
    load_trainable_weights(drafter, load_safetensors(checkpoint / TRAINABLE_WEIGHTS), lambda missing, unexpected: InputError(
        f"{checkpoint} holds other weights than a phase-{phase} drafter of this config (missing {missing[:3]}, "
        f"unexpected {unexpected[:3]}): pass the right --phase or --config"))
    if lora is not None:
        drafter.language_model = drafter.language_model.merge_and_unload()
    dtype = storage_dtype(config.model)  # what the phase's final/ is saved in
    if dtype is not None:
        stored = [drafter.projector] if phase == 1 else [drafter.language_model, drafter.projector]
        for module in stored:
            module.to(dtype=dtype)
    drafter.config.training_data[f"phase{phase}"] = (
        f"{drafter.config.training_data.get(f'phase{phase}', 'see the run config')}; exported from {checkpoint} "
        f"(step {state.get('step')} of {state.get('fingerprint', {}).get('max_steps')})"
    )
    drafter.eval()
    drafter.save_pretrained(out)
    logger.info("exported %s (phase %d, step %s) to %s", checkpoint, phase, state.get("step"), out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`massv export CHECKPOINT --out DIR [--config C] [--phase N]`."""
    from massv.cli import HelpFormatter, add_override_argument

    parser = argparse.ArgumentParser(prog="massv export", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint-<step>/ directory written by massv train")
    parser.add_argument("--out", type=Path, required=True, help="drafter directory to write")
    parser.add_argument("--config", help="the run's config (default: resolved_config.yaml next to the checkpoint)")
    add_override_argument(parser, "model.target=/models/qwen7b (where the target lives now)")
    parser.add_argument("--phase", type=int, choices=(1, 2), default=None,
                        help="the phase that wrote the checkpoint (default: the one whose output_dir holds it)")
    args = parser.parse_args(argv)
    config = None
    if args.config or args.override:
        source = args.config or args.checkpoint / RESOLVED_CONFIG_NAME
        config = load_config(source, args.override)
    path = export_checkpoint(args.checkpoint, args.out, config=config, phase=args.phase)
    print(path)
    return 0
