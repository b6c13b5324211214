"""Sampled (T = 1) MAL of the drafters `eval/cross_tokenizer_world.py` saved: the shared-vocabulary path.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python eval/cross_tokenizer_sampled.py runs/cross_tokenizer/full_words400 \
        eval/results/cross_tokenizer_world_words400_T1.json

At T > 0 a cross-tokenizer drafter drafts only tokens whose text is exactly one target token, so speculative
sampling stays exact (tests/test_cross_tokenizer.py checks the law); this measures what that costs in MAL.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from massv.benchmarks import load_benchmark  # noqa: E402
from massv.drafter import MultimodalDrafter  # noqa: E402
from massv.evaluate import EvalSettings, evaluate_samples  # noqa: E402
from massv.speculative import CrossTokenizerDrafter  # noqa: E402
from massv.pipelines.world_models import load_world_models  # noqa: E402


def main(run_dir: Path, out_file: Path) -> int:
    models = load_world_models()
    target = models.target.eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "drafter_tokenizer")
    drafters = {"text-only": AutoModelForCausalLM.from_pretrained(run_dir / "text_lm").eval(),
                "MASSV": MultimodalDrafter.from_pretrained(run_dir / "massv_drafter", target=target).eval()}
    samples = load_benchmark("world", run_dir / "world", split="heldout")
    settings = EvalSettings(num_draft_tokens=5, temperature=1.0, max_new_tokens=96, seed=0)
    results = {}
    for name, drafter in drafters.items():
        summary, _ = evaluate_samples(target, CrossTokenizerDrafter(drafter, tokenizer), models.processor, samples,
                                      settings, description=name)
        results[name] = {"mal": summary.mean_accepted_length, "acceptance_rate": summary.acceptance_rate,
                         "num_samples": summary.num_samples}
        print(name, results[name], flush=True)
    out_file.write_text(json.dumps({"run": str(run_dir.name), "temperature": 1.0, "num_draft_tokens": 5,
                                    "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2])))
