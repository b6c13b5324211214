"""Have the target VLM answer the instruction prompts: phase 2's self-distilled training data.

Same program as `massv distill` / `python -m massv.train.distill` (see massv/train/distill.py):

    python data_prep/generate_responses.py --config configs/qwen2_5_vl_7b.yaml
    python data_prep/generate_responses.py --config configs/tiny.yaml --override distill.max_new_tokens=8
    accelerate launch data_prep/generate_responses.py --config ...     # shards split over the GPUs

Reads `data.instruct_json` (+ `data.instruct_image_root`), writes `data.distilled_dir/shard-*.jsonl` in LLaVA
conversation format with the target's answers and `manifest.json` with the generation settings. Interrupted,
rerun the same command: it continues where it stopped, every record written exactly once.
"""

from __future__ import annotations

import logging
import sys

from massv.train.distill import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main())
