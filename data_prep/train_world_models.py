"""Train the world models (tokenizer, Qwen2.5-VL target, text-only Qwen2 drafter LM) and write them to a directory.

`python data_prep/train_world_models.py --out massv/assets/world` reproduces the shipped files. Any field of
`massv.pipelines.world_models.WorldRecipe` can be overridden, e.g. `--set target_steps=600 --set seed=1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from massv.pipelines.world_models import WorldRecipe, train_world_models  # noqa: E402


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`name=value` pairs typed after the recipe's own field types."""
    types = {field.name: type(field.default) for field in dataclasses.fields(WorldRecipe)}
    overrides: dict[str, object] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in types:
            raise SystemExit(f"unknown recipe field {name!r}; valid fields: {', '.join(sorted(types))}")
        overrides[name] = types[name](value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write (replaced atomically)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one WorldRecipe field (repeatable)")
    # One thread by default: on a CPU shared with other jobs, multi-threaded kernels spin at their barriers
    # and a training step ran several times slower with 2 threads than with 1.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--probe-every", type=int, default=200,
                        help="log held-out accuracy of the target on 48 questions every N steps (0: never)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    recipe = WorldRecipe(**parse_overrides(args.overrides))
    logging.info("recipe %s: %s", recipe.hash(), json.dumps(recipe.to_dict()))
    out = train_world_models(recipe, args.out, progress=not args.no_progress, probe_every=args.probe_every)
    metrics = json.loads((out / "metrics.json").read_text())
    print(json.dumps({"out": str(out), "heldout_target": metrics["heldout"]["target"],
                      "heldout_text_lm_all": metrics["heldout"]["text_lm"]["all"], "cost": metrics["cost"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
