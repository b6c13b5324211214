"""Write one split of the synthetic world to disk as LLaVA-format training data.

    python data_prep/make_world.py --out data/world --split train --num 1000 --seed 0 --image-size 64

Produces `DIR/<split>.jsonl` (one LLaVA record per line, image paths relative to DIR), the PNGs under
`DIR/images/`, and `DIR/<split>.manifest.json`; rerunning with the same arguments does nothing.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from massv.world import DEFAULT_IMAGE_SIZE, SPLITS, write_world

logger = logging.getLogger("make_world")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (images/ and <split>.jsonl)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="pretrain: captions only")
    parser.add_argument("--num", type=int, default=1000, help="number of records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="square image side, pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.info(
        "writing %d %s records (seed %d, %dpx) to %s", args.num, args.split, args.seed, args.image_size, args.out
    )
    return write_world(args.out, args.split, args.num, args.seed, image_size=args.image_size, progress=True)


if __name__ == "__main__":
    main()
