"""Checkpoints and logs of the training loop (the final step, --resume, corrupt checkpoints, failed saves,
metrics.jsonl, trackers, tqdm-aware logging) and `massv export` of a checkpoint into a drafter."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from massv import MultimodalDrafter
from massv.config import ConfigError, TrainingConfig
from massv.errors import InputError
from massv.train import loop as loop_module
from massv.train import train_phase
from massv.train.loop import ResumeError, check_output_dir, check_trackers, checkpoint_dirs, make_accelerator, train_loop
from tests.helpers_train import build_pair, one_thread, tiny_config, write_llava  # noqa: F401


# ---- the loop on a toy regression model: fast, and every rule of the loop applies --------------------------


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, x, y, attention_mask=None, use_cache=None):
        return SimpleNamespace(loss=((self.linear(x).squeeze(-1) - y) ** 2).mean())


def toy_data(size: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    xs = torch.randn(size, 4, generator=generator)
    return [{"x": x, "y": x.sum(), "attention_mask": torch.ones(3, dtype=torch.long)} for x in xs]


def toy_cfg(output_dir: Path, **changes) -> TrainingConfig:
    values = {"output_dir": str(output_dir), "max_steps": 6, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
              "learning_rate": 0.05, "warmup_ratio": 0.0, "mixed_precision": "no", "save_every_steps": 2,
              "keep_last_checkpoints": None, "log_every_steps": 1, "seed": 3}
    return TrainingConfig(**{**values, **changes})


def run_toy(cfg: TrainingConfig, **kwargs):
    model = Toy()
    result = train_loop(make_accelerator(cfg), model, toy_data(), None, cfg, **kwargs)
    return model, result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_final_step_is_checkpointed_and_resuming_a_finished_run_trains_nothing(tmp_path):
    cfg = toy_cfg(tmp_path / "run", max_steps=5)
    model, result = run_toy(cfg)
    assert result.finished and [path.name for path in checkpoint_dirs(cfg.output_dir)] == [
        "checkpoint-2", "checkpoint-4", "checkpoint-5"]  # 5 is not a multiple of 2: saved because it is the last
    history = metrics(tmp_path / "run")
    assert [line["step"] for line in history] == [1, 2, 3, 4, 5]
    assert [line["loss"] for line in history] == pytest.approx(result.step_losses, rel=1e-6)
    resumed_model, resumed = run_toy(cfg, resume=True)
    assert resumed.finished and resumed.step_losses == []  # nothing re-trained
    assert torch.equal(resumed_model.linear.weight, model.linear.weight)
    assert [line["step"] for line in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_resume_refuses_when_there_is_nothing_to_resume_unless_asked_to_start_fresh(tmp_path):
    with pytest.raises(ResumeError, match=r"nothing to resume, .*typo does not exist. Check output_dir"):
        check_output_dir(tmp_path / "typo", True)
    cfg = toy_cfg(tmp_path / "typo", max_steps=2)
    with pytest.raises(ResumeError, match="nothing to resume"):
        run_toy(cfg, resume=True)
    _, started = run_toy(cfg, resume="auto")  # --resume auto: continue if possible, else start fresh
    assert started.finished and len(started.step_losses) == 2
    with pytest.raises(ResumeError, match="already holds checkpoint-2: pass --resume"):
        run_toy(cfg)


@pytest.mark.parametrize("broken_file", ["trainable.safetensors", "optimizer.pt", "train_state.json"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, broken_file):
    uninterrupted, _ = run_toy(toy_cfg(tmp_path / "a"))
    cfg = toy_cfg(tmp_path / "b")
    run_toy(cfg, stop_after_steps=5)  # killed after step 5: checkpoints 2 and 4
    broken = tmp_path / "b" / "checkpoint-4" / broken_file
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])  # cut short by a full disk
    with caplog.at_level(logging.WARNING):
        resumed_model, resumed = run_toy(cfg, resume=True)
    assert re.search(rf"skipping checkpoint-4: .*{broken_file} does not read back.*falling back", caplog.text)
    assert resumed.finished and len(resumed.step_losses) == 4  # steps 3-6, from checkpoint-2
    assert torch.equal(resumed_model.linear.weight, uninterrupted.linear.weight)  # still bit-exact
    assert [line["step"] for line in metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]  # each step logged once


def test_no_readable_checkpoint_is_an_error(tmp_path):
    cfg = toy_cfg(tmp_path / "b", max_steps=2)
    run_toy(cfg)
    (tmp_path / "b" / "checkpoint-2" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ResumeError, match=r"none of the 1 checkpoint\(s\) .* reads back whole"):
        run_toy(cfg, resume=True)


def test_a_failed_save_leaves_no_staging_folder_and_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    cfg = toy_cfg(tmp_path / "run", max_steps=4)
    original, calls = loop_module.save_file, []

    def disk_full_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(loop_module, "save_file", disk_full_on_second)
    with pytest.raises(OSError, match="No space left"):
        run_toy(cfg)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    monkeypatch.setattr(loop_module, "save_file", original)
    _, resumed = run_toy(cfg, resume=True)
    assert resumed.finished and len(resumed.step_losses) == 2


def test_report_to_names_accelerate_trackers_and_a_missing_one_is_an_error(tmp_path):
    from accelerate.tracking import get_available_trackers

    with pytest.raises(ConfigError, match=r"report_to.*unknown tracker\(s\) \['tensorbord'\]"):
        from massv.config import load_config

        load_config({"model": {"target": "tiny:qwen2_5_vl", "drafter_lm": "tiny:qwen2_5_vl"},
                     "phase1": {"report_to": "tensorbord"}})
    cfg = toy_cfg(tmp_path / "run", max_steps=2, report_to=["tensorboard"])
    if "tensorboard" not in {str(getattr(t, "value", t)) for t in get_available_trackers()}:
        with pytest.raises(InputError, match="report_to names tensorboard, which is not installed: pip install tensorboard"):
            check_trackers(cfg)
        assert check_trackers(toy_cfg(tmp_path, tensorboard=True)) == []  # the old key only warns, as it did
    else:
        assert make_accelerator(cfg).log_with
        model = Toy()
        accelerator = make_accelerator(cfg)
        train_loop(accelerator, model, toy_data(), None, cfg, tracker_config={"lr": 0.05})
        accelerator.end_training()
        assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def _log_output(tmp_path: Path, handler_class) -> str:
    stream = io.StringIO()
    handler = handler_class(stream)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    original_tqdm = loop_module.tqdm
    try:  # the bar writes to the same stream, as a terminal's bar and log lines do
        loop_module.tqdm = lambda *a, **k: original_tqdm(*a, **{**k, "file": stream, "mininterval": 0})
        run_toy(toy_cfg(tmp_path, max_steps=3, save_every_steps=None))
    finally:
        loop_module.tqdm = original_tqdm
        root.removeHandler(handler)
        root.setLevel(previous_level)
    return stream.getvalue()


def test_log_lines_go_above_the_progress_bar_not_through_it(tmp_path):
    from massv.cli import TqdmLoggingHandler

    def starts_of_log_lines(text: str) -> list[str]:
        return [text[max(0, match.start() - 1)] for match in re.finditer(r"LOG step \d", text)]

    plain = starts_of_log_lines(_log_output(tmp_path / "plain", logging.StreamHandler))
    aware = starts_of_log_lines(_log_output(tmp_path / "aware", TqdmLoggingHandler))
    assert len(plain) == len(aware) == 3
    assert any(char not in "\r\n" for char in plain)  # a plain handler writes right after the bar's text
    assert all(char in "\r\n" for char in aware)  # through tqdm.write: the bar is cleared first


# ---- massv export: a checkpoint becomes a drafter -------------------------------------------------------------


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[key], state_b[key]) for key in state_a)


def test_export_turns_checkpoints_into_drafters_equal_to_final(tmp_path):
    from massv.export import main as export_main
    from massv.train.builders import build_drafter, load_phase_records

    data_json, image_root = write_llava(tmp_path, 4)
    config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root, [
        "phase1.max_steps=4", "phase1.save_every_steps=2", "phase1.keep_last_checkpoints=null",
        "phase2.max_steps=2", "phase2.save_every_steps=null", "phase2.lora.r=4",
        "phase2.lora.target_modules=[q_proj,v_proj]"])
    pair = build_pair("qwen2_5_vl")
    torch.manual_seed(0)
    drafter = build_drafter(config.model, pair.target, pair.drafter_lm, pair.processor)
    phase1 = train_phase(config, 1, target=pair.target, drafter=drafter, processor=pair.processor)
    records = load_phase_records(config, 1)[0]  # the captions stand in for the target's answers
    phase2 = train_phase(config, 2, target=pair.target, processor=pair.processor, dataset=records)

    phase1_dir, phase2_dir = Path(config.phase1.output_dir), Path(config.phase2.output_dir)
    assert export_main([str(phase1_dir / "checkpoint-4"), "--out", str(tmp_path / "p1-step4")]) == 0
    assert export_main([str(phase1_dir / "checkpoint-2"), "--out", str(tmp_path / "p1-step2")]) == 0
    assert export_main([str(phase2_dir / "checkpoint-2"), "--out", str(tmp_path / "p2-step2")]) == 0  # LoRA merged

    final1 = MultimodalDrafter.from_pretrained(phase1.final_path, target=pair.target)
    step4 = MultimodalDrafter.from_pretrained(tmp_path / "p1-step4", target=pair.target)
    step2 = MultimodalDrafter.from_pretrained(tmp_path / "p1-step2", target=pair.target)
    assert same_weights(step4, final1)  # the final step's checkpoint is the finished drafter
    assert not torch.equal(step2.projector.layers[0].weight, final1.projector.layers[0].weight)
    final2 = MultimodalDrafter.from_pretrained(phase2.final_path, target=pair.target)
    exported2 = MultimodalDrafter.from_pretrained(tmp_path / "p2-step2", target=pair.target)
    assert same_weights(exported2, final2)
    card = (tmp_path / "p2-step2" / "README.md").read_text()
    assert "exported from" in card and "checkpoint-2 (step 2 of 2)" in card

    with pytest.raises(InputError, match="is already a drafter directory"):
        export_main([str(phase1.final_path), "--out", str(tmp_path / "x")])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not a drafter directory"):
        export_main([str(phase1_dir / "checkpoint-4"), "--out", str(tmp_path / "notes")])
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert not os.path.exists(tmp_path / "x")


def test_resuming_a_finished_run_leaves_its_final_drafter_and_model_card_alone(tmp_path):
    """`--resume` on a finished run trains nothing and must not rewrite final/: the model card's MAL rows
    (`massv eval --record-in-model-card`) were lost when it did. A final/ that does not read back is rewritten."""
    from massv.drafter import record_evaluation
    from massv.model_card import evaluation_entry
    from massv.preflight import check_drafter_dir

    data_json, image_root = write_llava(tmp_path, 4)
    config = tiny_config(tmp_path, "qwen2_5_vl", data_json, image_root, ["phase1.max_steps=2",
                                                                         "phase1.save_every_steps=null"])
    pair = build_pair("qwen2_5_vl")
    first = train_phase(config, 1, target=pair.target, processor=pair.processor)
    summary = {"settings": {"num_draft_tokens": 5, "temperature": 0.0, "max_new_tokens": 64}, "num_samples": 40,
               "mean_accepted_length": 4.3912, "acceptance_rate": 0.71, "speedup": 1.93}
    record_evaluation(first.final_path, evaluation_entry("world", summary))
    files = {path: path.read_bytes() for path in first.final_path.rglob("*") if path.is_file()}

    resumed = train_phase(config, 1, target=pair.target, processor=pair.processor, resume=True)
    assert resumed.train.step_losses == [] and resumed.final_path == first.final_path
    assert {path: path.read_bytes() for path in first.final_path.rglob("*") if path.is_file()} == files
    assert "| world | 5 | 0 | 64 | 40 | 4.39 | 71.0% | 1.93x |" in (first.final_path / "README.md").read_text()

    projector = first.final_path / "projector.safetensors"
    projector.write_bytes(projector.read_bytes()[:-7])  # cut short: the finished drafter is written again
    train_phase(config, 1, target=pair.target, processor=pair.processor, resume=True)
    check_drafter_dir(first.final_path, "final drafter")
    assert projector.read_bytes() == files[projector]
