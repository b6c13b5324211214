"""The `massv` command as a new user meets it: one-line errors that say what and where (checked before any
model is built), `--debug`, `--help` with defaults, and the tiny config through every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from massv import MultimodalDrafter
from massv.cli import COMMANDS, main
from tests.helpers_train import one_thread  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
WORLD = REPO / "massv" / "assets" / "world"


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if any model is built: every input must be checked before."""
    import transformers

    import massv.tiny

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the inputs were checked")

    for loader in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(loader, "from_pretrained", refuse)
    monkeypatch.setattr(massv.tiny, "build_tiny_pair", refuse)


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.fixture(scope="module")
def saved_drafter(tmp_path_factory) -> Path:
    from massv.tiny import build_tiny_pair

    pair = build_tiny_pair("qwen2_5_vl", seed=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "drafter"
    MultimodalDrafter.from_target(pair.target, pair.drafter_lm, len(pair.tokenizer)).save_pretrained(path)
    return path


def test_eval_errors_name_what_and_where_before_any_model_loads(capsys, tmp_path, saved_drafter, no_model_loads):
    common = ["--benchmark", "world", "--data-root", str(REPO / "tests" / "data" / "benchmarks" / "world"),
              "--out", str(tmp_path / "out")]
    line = one_line_error(capsys, ["eval", "--target", "/nonexistent", "--drafter", str(WORLD / "text_lm"), *common])
    assert line == "massv eval: error: --target /nonexistent: no such directory, and not a Hub id (owner/name)"

    # The world is a benchmark like any other: written by `massv world` (a pipeline), read from --data-root.
    line = one_line_error(capsys, ["eval", "--target", str(WORLD / "target"), "--drafter", str(WORLD / "text_lm"),
                                   "--benchmark", "world", "--out", str(tmp_path / "out_world")])
    assert line.startswith("massv eval: error: --benchmark world needs --data-root DIR") and "massv world --out" in line

    checkpoint = tmp_path / "phase1" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.json").write_text("{}")
    line = one_line_error(capsys, ["eval", "--target", str(WORLD / "target"), "--drafter", str(checkpoint), *common])
    assert f"--drafter {checkpoint} is a training checkpoint, not a model" in line and "massv export" in line

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for item in saved_drafter.iterdir():
        (truncated / item.name).symlink_to(item)
    projector = truncated / "projector.safetensors"
    projector.unlink()
    projector.write_bytes((saved_drafter / "projector.safetensors").read_bytes()[:-10])
    line = one_line_error(capsys, ["eval", "--target", str(WORLD / "target"), "--drafter", str(truncated), *common])
    assert f"{projector} is not a complete safetensors file" in line

    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps([{"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nCaf\u00e9?"}, {"from": "gpt", "value": "Oui."}]}],
        ensure_ascii=False).encode("latin-1"))
    line = one_line_error(capsys, ["eval", "--target", str(WORLD / "target"), "--drafter", str(WORLD / "text_lm"),
                                   "--benchmark", str(latin), "--out", str(tmp_path / "o2")])
    assert f"benchmark file {latin} is not UTF-8 text (byte 0xe9 at line 1" in line

    line = one_line_error(capsys, ["eval", "--target", str(WORLD / "target"), "--drafter", str(WORLD / "text_lm"),
                                   *common, "--device", "cuda" if not torch.cuda.is_available() else "cuda:99"])
    assert "--device cuda" in line

    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, traceback and all
        main(["eval", "--target", "/nonexistent", "--drafter", str(WORLD / "text_lm"), *common, "--debug"])


def test_train_checks_data_and_output_dir_before_any_model(capsys, tmp_path, no_model_loads):
    line = one_line_error(capsys, ["train", "--config", TINY, "--phase", "1", "--override",
                                   "data.pretrain_json=/nonexistent/captions.json", f"phase1.output_dir={tmp_path / 'p1'}"])
    assert line == "massv train: error: data.pretrain_json /nonexistent/captions.json does not exist"
    # The real config: the data path is looked at before any Hub download is tried.
    line = one_line_error(capsys, ["train", "--config", str(REPO / "configs" / "qwen2_5_vl_7b.yaml"), "--phase", "1",
                                   "--override", f"phase1.output_dir={tmp_path / 'q'}"])
    assert "data.pretrain_json" in line and "does not exist" in line
    line = one_line_error(capsys, ["train", "--config", TINY, "--phase", "1", "--resume", "--override",
                                   f"phase1.output_dir={tmp_path / 'typo'}"])
    assert "--resume: nothing to resume" in line and "typo does not exist" in line
    line = one_line_error(capsys, ["train", "--config", TINY, "--phase", "2", "--override",
                                   f"phase1.output_dir={tmp_path / 'none'}", f"phase2.output_dir={tmp_path / 'p2'}"])
    assert "phase 2 starts from the phase-1 drafter, but" in line and "run phase 1 first" in line
    line = one_line_error(capsys, ["train", "--config", TINY, "--phase", "1", "--override", "phase1.learning_rat=1"])
    assert "unknown key 'learning_rat' in section 'phase1'" in line and "did you mean 'learning_rate'" in line


def test_help_shows_defaults_for_every_command(capsys):
    expected = {"demo": "(default: runs/demo)", "eval": "(default: auto)", "distill": "(default: auto)",
                "compress": "(default: last)", "world": "(default: 1000)", "train": "--resume [{yes,auto}]",
                "export": "--phase {1,2}"}
    assert set(expected) == set(COMMANDS)
    for command, text in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert text in " ".join(capsys.readouterr().out.split()), command
    main(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_help_shows_every_default_including_options_without_help_and_zero(monkeypatch, capsys):
    """Each option's own --help entry names its default: also where the option has no help text (argparse
    prints no default for those) and where the default is 0 or 0.0 (equal to False)."""
    import argparse

    parsers = {}
    monkeypatch.setattr(argparse.ArgumentParser, "print_help",
                        lambda self, file=None: parsers.setdefault(self.prog, self))
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
    assert len(parsers) == len(COMMANDS)
    hidden = []
    for prog, parser in parsers.items():
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default is None or default is False or default == [] \
                    or default is argparse.SUPPRESS:
                continue
            formatter = parser._get_formatter()
            formatter.add_argument(action)
            if "default" not in formatter.format_help():
                hidden.append(f"{prog} {action.option_strings[-1]}={default!r}")
    assert hidden == []
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED (default: 0)" in text and "--top-p TOP_P (default: 1.0)" in text


def test_tiny_config_through_every_command(capsys, tmp_path):
    """train 1 -> distill -> train 2 -> export -> eval --config -> compress, all from configs/tiny.yaml."""
    paths = [f"phase1.output_dir={tmp_path / 'phase1'}", f"phase2.output_dir={tmp_path / 'phase2'}",
             f"data.distilled_dir={tmp_path / 'distilled'}", "phase1.max_steps=2", "phase2.max_steps=2",
             "distill.max_new_tokens=4"]
    assert main(["train", "--config", TINY, "--phase", "1", "--override", *paths]) == 0
    assert main(["distill", "--config", TINY, "--device", "cpu", "--override", *paths]) == 0
    assert main(["train", "--config", TINY, "--phase", "2", "--override", *paths]) == 0
    assert main(["train", "--config", TINY, "--phase", "2", "--resume", "--override", *paths]) == 0  # finished: no-op
    assert main(["export", str(tmp_path / "phase2" / "checkpoint-2"), "--out", str(tmp_path / "exported")]) == 0
    assert main(["eval", "--config", TINY, "--override", *paths, "eval.max_new_tokens=4", "--limit", "1",
                 "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    assert main(["compress", "--config", TINY, "--override", *paths, "--device", "cpu",
                 "--out", str(tmp_path / "compressed")]) == 0
    report = json.loads((tmp_path / "compressed" / "compression.json").read_text())
    assert report["method"] == "sparsity" and report["macs_after"]["per_token"] < report["macs_before"]["per_token"]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["num_samples"] == 1
    history = [json.loads(line) for line in (tmp_path / "phase2" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in history] == [1, 2]
