"""Run under a 2-process launcher on the CPU (gloo): phase 1 -> distill -> phase 2, as the real commands do.

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --nproc_per_node 2 tests/multiprocess_pipeline.py \
        --config configs/tiny.yaml --out DIR --stage all      [--override KEY=VALUE ...]

`first`: phase 1; `massv distill`; phase 2 to the end in `<out>/phase2`; phase 2 again in
`<out>/phase2_resumed`, stopped after `--stop-after` steps (a checkpoint was written before). `resume`:
continue that run from its latest checkpoint (a second launch, as after a kill). `all`: `first`, then
`resume` in the same launch. Every stage builds its objects from the config (the `tiny:` pair), exactly as
`massv train` / `massv distill` do. The main process writes each stage's wall time to
`<out>/timings_<stage>.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", choices=("all", "first", "resume"), required=True)
    parser.add_argument("--stop-after", type=int, default=2)
    parser.add_argument("--override", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)

    from accelerate import PartialState

    from massv.config import load_config
    from massv.train import train_phase
    from massv.train.distill import run_distillation

    resumed_dir = args.out / "phase2_resumed"
    config = load_config(args.config, args.override)
    resumed = load_config(args.config, args.override + [f"phase2.output_dir={resumed_dir}"])
    timings: dict[str, float] = {}

    def timed(name: str, run) -> None:
        start = time.perf_counter()
        run()
        timings[name] = round(time.perf_counter() - start, 2)

    if args.stage in ("all", "first"):
        timed("phase1", lambda: train_phase(config, 1))
        timed("distill", lambda: run_distillation(config))
        PartialState().wait_for_everyone()  # distillation has no final barrier: phase 2 needs every shard
        timed("phase2", lambda: train_phase(config, 2))
        timed("phase2_interrupted", lambda: train_phase(resumed, 2, stop_after_steps=args.stop_after))
    if args.stage in ("all", "resume"):
        timed("phase2_resume", lambda: train_phase(resumed, 2, resume=True))
    state = PartialState()
    if state.is_main_process:
        (args.out / f"timings_{args.stage}.json").write_text(json.dumps(
            {"num_processes": state.num_processes, "distributed_type": str(state.distributed_type), **timings}))


if __name__ == "__main__":
    main()
