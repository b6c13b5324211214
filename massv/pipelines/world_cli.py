"""`massv world`: write the synthetic world to disk, for inspection or for training with your own configs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from massv.pipelines.world import DEFAULT_IMAGE_SIZE, SPLITS, write_world

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Write one split (images + LLaVA JSONL) so the world can be used like any LLaVA-format dataset."""
    from massv.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="massv world", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--num", type=int, default=1000, help="number of records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    args = parser.parse_args(argv)
    path = write_world(args.out, args.split, args.num, args.seed, image_size=args.image_size, progress=True)
    logger.info("wrote %s", path)
    return 0
