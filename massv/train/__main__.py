"""`python -m massv.train` (= `massv train`, and `accelerate launch -m massv.train ...`): run one phase.

    python -m massv.train --config configs/qwen2_5_vl_7b.yaml --phase 1
    accelerate launch -m massv.train --config configs/qwen2_5_vl_7b.yaml --phase 2 --resume
    python -m massv.train --config configs/tiny.yaml --phase 1 --override phase1.max_steps=5
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from massv.cli import HelpFormatter, add_override_argument, configure_logging
from massv.config import load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="massv train", description="Train a MASSV drafter: phase 1 (projector "
                                     "pretraining) or phase 2 (self-distilled instruction tuning).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--phase", required=True, choices=("1", "2"), help="1: projector; 2: projector + LM")
    parser.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), default=None,
                        help="continue from the latest checkpoint in output_dir; an error if there is none "
                        "(a mistyped output_dir?). '--resume auto': continue if there is one, else start fresh")
    add_override_argument(parser, "phase1.max_steps=100 data.max_length=1024")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load and validate the config (before any model loads), run the phase."""
    args = build_parser().parse_args(argv)
    # Not accelerate's PartialState here: created before the recipe's Accelerator it would fix the distributed
    # setup without the launcher's CPU flag. The launcher's LOCAL_RANK says which process logs.
    main_process = int(os.environ.get("LOCAL_RANK", "0")) == 0
    configure_logging(logging.INFO if main_process else logging.WARNING)
    config = load_config(args.config, args.override)
    from massv.train import train_phase
    from massv.preflight import check_training_inputs

    resume = {"yes": True, "auto": "auto", None: False}[args.resume]
    check_training_inputs(config, int(args.phase), resume)  # data, models, output_dir: before any model loads
    result = train_phase(config, int(args.phase), resume=resume)
    if main_process and result.final_path is not None:
        logging.getLogger("massv.train").info("final drafter: %s", result.final_path)
    from accelerate import PartialState

    PartialState().destroy_process_group()  # the phase leaves it up for scripts that run several in one launch
    return 0


if __name__ == "__main__":
    from massv.cli import run_main

    sys.exit(run_main("train", main))
