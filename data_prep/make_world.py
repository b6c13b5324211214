"""Write one split of the synthetic world to disk as LLaVA-format training data (same as `massv world`).

    python data_prep/make_world.py --out data/world --split train --num 1000 --seed 0 --image-size 64

Produces `DIR/<split>.jsonl` (one LLaVA record per line, image paths relative to DIR), the PNGs under
`DIR/images/`, and `DIR/<split>.manifest.json`; rerunning with the same arguments does nothing.
"""

from __future__ import annotations

import logging
import sys

from massv.pipelines.world_cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main())
