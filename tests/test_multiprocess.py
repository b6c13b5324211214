"""Two processes on the CPU (torchrun, gloo): phase 1 -> distill -> phase 2 at per-device batch 1 with text-only
records, and a phase 2 interrupted mid-run and resumed ends with identical weights (in the same launch in
the default suite, about 25 s; by a second launch, as after a kill, in the slow suite).

Batch 1 with text-only records is what made DDP crash: a micro-batch without an image leaves the projector
out of the graph, and the gradient all-reduce of that process meets one whose micro-batch had an image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from massv import MultimodalDrafter
from tests.helpers_train import REPO, TINY_CONFIG, one_thread, write_llava  # noqa: F401

SCRIPT = REPO / "tests" / "multiprocess_pipeline.py"


def _launch(stage: str, out: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               "--config", str(TINY_CONFIG), "--out", str(out), "--stage", stage, "--stop-after", "3",
               "--override", *overrides]
    completed = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, (completed.stdout[-2000:], completed.stderr[-6000:])
    return json.loads((out / f"timings_{stage}.json").read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return MultimodalDrafter.from_pretrained(path).state_dict()


OVERRIDES = [
    "phase1.max_steps=2", "phase1.per_device_batch_size=1", "phase1.save_every_steps=null",
    "distill.max_new_tokens=4", "distill.shard_size=2", "distill.batch_size=2",
    # 6 records (3 text-only) over 2 processes at batch 1: most steps mix an image and a text-only sample.
    "phase2.max_steps=6", "phase2.per_device_batch_size=1", "phase2.gradient_accumulation_steps=1",
    "phase2.save_every_steps=2", "phase2.keep_last_checkpoints=1", "phase2.log_every_steps=2",
]


def _paths(tmp_path: Path) -> list[str]:
    data_json, image_root = write_llava(tmp_path, 3, text_only=3)
    return [f"data.pretrain_json={data_json}", f"data.pretrain_image_root={image_root}",
            f"data.instruct_json={data_json}", f"data.instruct_image_root={image_root}",
            f"data.distilled_dir={tmp_path / 'distilled'}", f"phase1.output_dir={tmp_path / 'phase1'}",
            f"phase2.output_dir={tmp_path / 'phase2'}"]


def _check_outputs(tmp_path: Path) -> None:
    distilled = [json.loads(line) for path in sorted((tmp_path / "distilled").glob("shard-*.jsonl"))
                 for line in path.read_text().splitlines()]
    assert [record["source_index"] for record in distilled] == list(range(6))  # each record once, no shard lost
    assert sum("image" not in record for record in distilled) == 3  # the text-only prompts were answered too
    assert not (tmp_path / "distilled" / "claims").exists()  # the last process to finish cleaned up

    uninterrupted = _weights(tmp_path / "phase2" / "final")
    resumed = _weights(tmp_path / "phase2_resumed" / "final")
    phase1 = _weights(tmp_path / "phase1" / "final")
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[key], resumed[key]) for key in uninterrupted)
    assert not torch.equal(phase1["projector.layers.0.weight"], uninterrupted["projector.layers.0.weight"])
    assert not torch.equal(phase1["language_model.model.embed_tokens.weight"],
                           uninterrupted["language_model.model.embed_tokens.weight"])
    checkpoints = sorted(path.name for path in (tmp_path / "phase2_resumed").iterdir() if path.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-6"]  # interrupted after step 3 (latest: 2), resumed, finished 6: the final step is checkpointed


def test_two_processes_phase1_distill_phase2_with_text_only_batches_and_exact_resume(tmp_path: Path) -> None:
    timings = _launch("all", tmp_path, _paths(tmp_path) + OVERRIDES)
    print(f"two-process stage times (s): {timings}")
    assert timings["num_processes"] == 2 and timings["distributed_type"] == "DistributedType.MULTI_CPU"
    _check_outputs(tmp_path)


@pytest.mark.slow
def test_two_processes_resume_in_a_new_launch_ends_with_identical_weights(tmp_path: Path) -> None:
    overrides = _paths(tmp_path) + OVERRIDES
    first = _launch("first", tmp_path, overrides)
    second = _launch("resume", tmp_path, overrides)  # new processes: nothing survives but the checkpoint
    print(f"two-process stage times (s): {first} | {second}")
    assert second["num_processes"] == 2
    _check_outputs(tmp_path)
