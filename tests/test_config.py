"""Run configs: valid files load, and every kind of mistake fails with a message that says what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from massv.config import (
    RESOLVED_CONFIG_NAME,
    ConfigError,
    LoraConfig,
    RunConfig,
    load_config,
    save_resolved_config,
)

VALID_YAML = """\
model:
  target: Qwen/Qwen2.5-VL-7B-Instruct
  drafter_lm: Qwen/Qwen2.5-0.5B-Instruct
  vision_feature: projected
  torch_dtype: bfloat16
data:
  pretrain_json: data/blip_laion_cc_sbu_558k.json
  pretrain_image_root: data/llava_pretrain/images
  max_length: 1024
phase1:
  learning_rate: 1e-3
  mixed_precision: no
phase2:
  learning_rate: 2e-5
  num_epochs: 1
  lora:
    r: 8
compress:
  method: sparsity
  sparsity: 0.5
  pattern: 2:4
eval:
  benchmark: llava_bench
  limit: 10
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_file_loads_with_defaults_and_yaml12_scalars(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID_YAML))
    assert isinstance(config, RunConfig)
    assert config.model.target == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert config.model.family is None and config.model.projector_layers == 2
    assert config.data.max_length == 1024 and config.data.strict_images is False
    # "1e-3" is a float, "no" is not False, "2:4" is not the base-60 integer 124.
    assert config.phase1.learning_rate == pytest.approx(1e-3)
    assert config.phase1.mixed_precision == "no"
    assert config.compress is not None and config.compress.pattern == "2:4"
    # An int is accepted where a float is expected.
    assert isinstance(config.phase2.num_epochs, float) and config.phase2.num_epochs == 1.0
    # A partially given section keeps its own section's defaults.
    assert config.phase1.output_dir == "outputs/phase1" and config.phase2.output_dir == "outputs/phase2"
    assert config.phase2.lora == LoraConfig(r=8)
    assert config.phase1.lora is None
    assert config.eval is not None and config.eval.num_draft_tokens == 5 and config.eval.limit == 10
    assert config.distill.temperature == 0.0


def test_typo_names_key_section_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, VALID_YAML.replace("  learning_rate: 2e-5", "  learning_rat: 2e-5"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "unknown key 'learning_rat' in section 'phase2'" in message
    assert str(path) in message
    assert "did you mean 'learning_rate'?" in message
    assert "Valid keys:" in message and "weight_decay" in message


def test_typo_in_nested_and_top_level_sections() -> None:
    base = {"model": {"target": "t", "drafter_lm": "d"}}
    with pytest.raises(ConfigError, match=r"unknown key 'rank' in section 'phase2.lora'"):
        load_config({**base, "phase2": {"lora": {"rank": 8}}})
    with pytest.raises(ConfigError, match=r"unknown section 'phse2' .* did you mean 'phase2'\?"):
        load_config({**base, "phse2": {}})


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("phase2", {"learning_rate": "fast"}, r"key 'learning_rate' in section 'phase2' .* must be a number"),
        ("data", {"max_length": 2048.5}, r"key 'max_length' in section 'data' .* must be an integer"),
        ("data", {"strict_images": "yes"}, r"key 'strict_images' .* must be true or false"),
        ("phase1", {"mixed_precision": "bf61"}, r"must be one of 'no', 'bf16', 'fp16'.* did you mean 'bf16'\?"),
        ("phase2", {"lora": 5}, r"section 'phase2.lora' .* must be a mapping"),
        ("phase2", {"warmup_ratio": 1.5}, r"key 'warmup_ratio' in section 'phase2' .* must be in \[0, 1\)"),
    ],
)
def test_wrong_type_or_value_is_rejected(section: str, values: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config({"model": {"target": "t", "drafter_lm": "d"}, section: values})


def test_float_accepts_string_scientific_notation() -> None:
    config = load_config({"model": {"target": "t", "drafter_lm": "d"}, "phase2": {"learning_rate": "1e-5"}})
    assert config.phase2.learning_rate == pytest.approx(1e-5)


def test_missing_required_key_and_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'drafter_lm' in section 'model'"):
        load_config({"model": {"target": "t"}})
    with pytest.raises(ConfigError, match=r"missing required section 'model'"):
        load_config(write(tmp_path, "data:\n  max_length: 10\n"))
    with pytest.raises(ConfigError, match=r"missing required key 'method' in section 'compress'"):
        load_config({"model": {"target": "t", "drafter_lm": "d"}, "compress": {"sparsity": 0.5}})


def test_dotted_overrides_apply_on_top(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, VALID_YAML),
        overrides=[
            "phase2.learning_rate=1e-5",
            "phase2.lora.target_modules=[q_proj, v_proj]",
            "phase1.lora.r=4",  # creates a section that the file leaves out
            "eval=null",
            "model.attn_implementation=sdpa",
        ],
    )
    assert config.phase2.learning_rate == pytest.approx(1e-5)
    assert config.phase2.lora == LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    assert config.phase1.lora == LoraConfig(r=4)
    assert config.eval is None
    assert config.model.attn_implementation == "sdpa"


def test_bad_overrides_are_reported() -> None:
    base = {"model": {"target": "t", "drafter_lm": "d"}}
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat' .* did you mean 'learning_rate'\?"):
        load_config(base, overrides=["phase2.learning_rat=1e-5"])
    with pytest.raises(ConfigError, match=r"must look like section.key=value"):
        load_config(base, overrides=["phase2.learning_rate"])
    with pytest.raises(ConfigError, match=r"'phase2.seed' is a value, not a section"):
        load_config(base, overrides=["phase2.seed.x=1"])
    with pytest.raises(ConfigError, match=r"must be an integer"):
        load_config(base, overrides=["phase2.seed=abc"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID_YAML), overrides=["phase1.mixed_precision=no"])
    saved = save_resolved_config(config, tmp_path / "outputs")
    assert saved == tmp_path / "outputs" / RESOLVED_CONFIG_NAME
    assert load_config(saved) == config
    assert load_config(config.to_dict()) == config
