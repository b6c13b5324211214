"""Activation memory a training forward keeps for backward, per token, for the real-size Qwen drafter.

`bench_train_memory.py` measures a whole step's peak; at a CPU-sized batch that peak is set by constants
(fp32 gradients of the 0.5B LM, autocast's bf16 weight copies) and hides the per-token cost. Here the
forward alone runs under the CPU profiler and what it allocated and still holds at its end is counted: the
tensors saved for backward, plus the loss. Two sequence lengths give the per-token slope; the constant
part (autocast weight copies, the answer-only loss's one chunk) is the intercept.

Phase 1 keeps the drafter LM frozen in bf16 (only the projector trains, as `massv.train` does); phase 2
trains the LM in float32 master weights. Image features are given precomputed (the frozen vision tower's
own activations are freed before the LM runs, so they never add to the LM's).

    python eval/bench_activation_memory.py --seq-lens 256 512 --out eval/results/activation_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_memory import (
    loss_after,
    loss_before,
    make_batch,
    real_size_qwen_drafter,
)


def retained_after_forward(step) -> tuple[Any, int]:
    """(output, bytes allocated during `step` and still alive when it returns), CPU profiler memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        output = step()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = os.path.join(folder, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())
    return output, (sum(sizes[-1]) if sizes else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--answer-fraction", type=float, default=0.5)
    parser.add_argument("--phases", nargs="+", choices=("phase1", "phase2"), default=["phase1", "phase2"])
    parser.add_argument("--variants", nargs="+", choices=("before", "after"), default=["before", "after"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    drafter = real_size_qwen_drafter(device)
    rows = []
    for phase in args.phases:
        drafter.set_trainable(phase)
        drafter.projector.float()
        # as massv.train: the trainable weights in float32, the frozen LM of phase 1 in bf16
        drafter.language_model.to(torch.float32 if phase == "phase2" else torch.bfloat16)
        drafter.train()
        for checkpointing in (False, True):
            if checkpointing:
                drafter.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                drafter.language_model.gradient_checkpointing_disable()
            for seq_len in args.seq_lens:
                batch = make_batch(drafter, 1, seq_len, seq_len, args.image_tokens, args.answer_fraction, device)
                for variant in args.variants:
                    compute = loss_before if variant == "before" else loss_after
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss, retained = retained_after_forward(lambda compute=compute, batch=batch: compute(drafter, batch))
                    row = {"phase": phase, "gradient_checkpointing": checkpointing, "seq_len": seq_len,
                           "variant": variant, "retained_bytes": retained, "loss": float(loss.detach()),
                           "answer_tokens": int((batch["labels"] != -100).sum()),
                           "vocab": drafter.language_model.get_output_embeddings().out_features}
                    del loss
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                                        "command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
