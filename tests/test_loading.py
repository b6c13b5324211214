"""The one loader: device and dtype placement (GPU logic proven with CUDA mocked), model names, tiny pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from massv import loading
from massv.errors import InputError, MissingInputError
from massv.loading import check_model_source, load_causal_lm, load_target, resolve_dtype, resolve_placement


@pytest.fixture()
def two_gpus(monkeypatch):
    """What torch reports on a machine with two bfloat16-capable GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def test_auto_places_on_every_gpu_in_bfloat16(two_gpus):
    placement = resolve_placement("auto", "auto")
    assert placement.device == torch.device("cuda", 0)
    assert placement.device_map == "auto"  # Accelerate spreads a target too big for one GPU over both
    assert placement.dtype == torch.bfloat16
    assert placement.from_pretrained_kwargs() == {"dtype": torch.bfloat16, "device_map": "auto"}
    one = resolve_placement("cuda:1", "float16")
    assert one.device == torch.device("cuda", 1) and one.device_map == {"": torch.device("cuda", 1)}
    assert one.dtype == torch.float16
    with pytest.raises(InputError, match="only 2 CUDA device"):
        resolve_placement("cuda:2")


def test_gpus_without_bfloat16_get_float16(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype("auto", "cuda") == torch.float16


def test_cpu_only_machine():
    if torch.cuda.is_available():
        pytest.skip("this checks a machine without CUDA")
    placement = resolve_placement("auto", "auto")
    assert placement.device == torch.device("cpu") and placement.device_map is None
    assert placement.dtype == torch.float32  # half precision on a CPU: slow, and near-ties flip (see loading)
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # an explicit dtype is respected
    with pytest.raises(InputError, match=r"--device cuda: no CUDA device is visible"):
        resolve_placement("cuda")
    with pytest.raises(InputError, match=r"--device gpu0: not a device"):
        resolve_placement("gpu0")
    with pytest.raises(InputError, match=r"unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_load_target_asks_transformers_for_the_placement(two_gpus, monkeypatch, tiny_pair, tmp_path):
    """On a GPU machine the target is loaded with device_map="auto" in bfloat16 (not float32 on the CPU)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    calls = {}

    def fake_from_pretrained(name, **kwargs):
        calls.update(name=name, **kwargs)
        return tiny_pair.target

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda name, **kwargs: tiny_pair.processor)
    (tmp_path / "config.json").write_text("{}")
    target, processor = load_target(str(tmp_path))
    assert calls == {"name": str(tmp_path), "dtype": torch.bfloat16, "device_map": "auto"}
    assert target is tiny_pair.target and processor is tiny_pair.processor


def test_model_names_are_checked_before_anything_loads(tmp_path):
    assert check_model_source("tiny:gemma3") == "tiny"
    assert check_model_source("Qwen/Qwen2.5-VL-7B-Instruct") == "hub"
    with pytest.raises(MissingInputError, match=r"--target /nonexistent: no such directory, and not a Hub id"):
        check_model_source("/nonexistent", "--target")
    with pytest.raises(MissingInputError, match="not a Hub id"):
        check_model_source("runs/x/phase1/final", "--drafter")  # a path, not owner/name
    with pytest.raises(MissingInputError, match="is a directory without config.json"):
        check_model_source(str(tmp_path), "--target")
    (tmp_path / "train_state.json").write_text("{}")
    with pytest.raises(InputError, match=r"is a training checkpoint, not a model: .*massv export"):
        check_model_source(str(tmp_path), "--drafter")
    with pytest.raises(InputError, match="unknown tiny family 'llama'"):
        check_model_source("tiny:llama")


def test_tiny_names_load_the_tiny_pair_in_the_asked_dtype():
    target, processor = load_target("tiny:qwen2_5_vl", dtype="float32", device="cpu")
    lm = load_causal_lm("tiny:qwen2_5_vl", dtype="bfloat16", device="cpu")
    assert target.config.model_type == "qwen2_5_vl" and target.dtype == torch.float32 and not target.training
    assert lm.dtype == torch.bfloat16 and processor.tokenizer is not None


def test_one_loader_for_training_and_loading():
    """Training, distillation, eval, compress and export build models and resolve dtype names in massv.loading
    alone: the training builders hold no model loading of their own."""
    import ast

    from massv.train import builders

    assert loading.config_dtype("bfloat16") == torch.bfloat16 and loading.config_dtype("auto") == "auto"
    assert loading.config_dtype("float32") is loading.resolve_dtype("float32")
    tree = ast.parse(Path(builders.__file__).read_text())
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
             for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not calls & {"resolve_dtype", "load_target", "load_causal_lm", "build_tiny_pair"}, calls
    with pytest.raises(ValueError, match="a tiny pair must name the same tiny family"):
        loading.tiny_pair_family(type("M", (), {"target": "tiny:qwen2_5_vl", "drafter_lm": "tiny:gemma3"})())
