"""Run configuration: one YAML file names everything a MASSV run needs.

A config is a tree of dataclasses (`RunConfig` with one section per concern). `load_config` reads
YAML (or a dict), applies dotted command-line overrides such as ``phase2.learning_rate=1e-5``, and
validates the result before any model is loaded, so a typo fails in a second with a message that
names the key, its section and the closest valid key instead of silently running with a default.

YAML is read with YAML 1.2 scalar rules: ``no``/``yes``/``on``/``off`` stay strings (so
``mixed_precision: no`` means "no", not ``False``), ``2:4`` stays a string (YAML 1.1 would read it
as the base-60 integer 124), and ``1e-3`` is a float (YAML 1.1 would read it as a string).
Relative paths are kept as written, i.e. relative to the working directory of the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from massv.errors import MassvError

logger = logging.getLogger(__name__)

RESOLVED_CONFIG_NAME = "resolved_config.yaml"


class ConfigError(MassvError, ValueError):
    """A run config is malformed: unknown key, wrong type, missing key or out-of-range value."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which target VLM to accelerate and how the drafter is assembled around it."""

    target: str  # hub id or local path of the target VLM, e.g. "Qwen/Qwen2.5-VL-7B-Instruct"
    drafter_lm: str  # hub id or local path of the small text LM, e.g. "Qwen/Qwen2.5-0.5B-Instruct"
    family: str | None = None  # None: detected from the target's config (model_type)
    # "projected": the target's vision tower output after its own merger/projector (what the target
    # LM sees); "pre_merger": patch features before it, projected by our MLP alone.
    vision_feature: Literal["projected", "pre_merger"] = "projected"
    projector_hidden_dim: int | None = None  # None: the drafter LM's hidden size
    projector_layers: int = 2
    projector_activation: str = "gelu"
    torch_dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    # "sdpa" or "flash_attention_2" (needs flash-attn); None: transformers' default. Without either, Qwen2.5-VL's
    # vision tower runs its window attention as a Python loop over windows.
    attn_implementation: str | None = None
    # Qwen2.5-VL's dynamic resolution: images are resized to between min_pixels and max_pixels pixels (None: the
    # processor's own limits, 3136 and 12845056). Each 28x28 pixel block is one image token, so max_pixels bounds
    # the image block (e.g. 1003520 = 1280 tokens). Applied wherever the target's processor is built here.
    min_pixels: int | None = None
    max_pixels: int | None = None

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.projector_hidden_dim is not None and self.projector_hidden_dim < 1:
            yield "projector_hidden_dim", "must be >= 1 (or null for the drafter's hidden size)"
        if self.projector_layers < 1:
            yield "projector_layers", "must be >= 1"
        if self.min_pixels is not None and self.min_pixels < 1:
            yield "min_pixels", "must be >= 1 (or null for the processor's default)"
        if self.max_pixels is not None and self.max_pixels < max(1, self.min_pixels or 1):
            yield "max_pixels", "must be >= min_pixels (or null for the processor's default)"


@dataclass
class DataConfig:
    """Where the LLaVA-format training data and the target's self-distilled answers live."""

    pretrain_json: str | None = None  # phase 1 captions, e.g. blip_laion_cc_sbu_558k.json
    pretrain_image_root: str | None = None
    instruct_json: str | None = None  # prompts for self-distillation, e.g. llava_v1_5_mix665k.json
    instruct_image_root: str | None = None
    distilled_dir: str = "data/distilled"  # the target's own answers (phase 2 training data)
    max_length: int = 2048  # tokens per training sequence, image tokens included
    strict_images: bool = False  # True: a missing or corrupt image aborts instead of being skipped
    num_workers: int = 4
    # Answers the target did not finish within distill.max_new_tokens: "mask_end" trains on their tokens but
    # not on the end-of-turn token the template adds at the cut; "drop" leaves such samples out.
    truncated_answers: Literal["mask_end", "drop"] = "mask_end"
    # Where the checked training records are cached (content-hashed, reused on --resume and by every
    # process); None: <output_dir>/preprocessed of each phase.
    cache_dir: str | None = None

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.max_length < 1:
            yield "max_length", "must be >= 1"
        if self.num_workers < 0:
            yield "num_workers", "must be >= 0"


@dataclass
class DistillConfig:
    """How the target VLM generates the answers the drafter is fine-tuned on in phase 2."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0.0: greedy, the distribution the drafter must match at T=0
    # null: as target.generate() decides (the target's generation config, then Hugging Face's defaults), which
    # is also what `massv eval` and the engine do; resolved by massv.generation_settings and written to the
    # manifest. Qwen2.5-VL's config sets repetition_penalty 1.05 (applied to greedy decoding too) and top_k 1.
    top_p: float | None = None
    top_k: int | None = None  # 0 disables top-k
    repetition_penalty: float | None = None
    batch_size: int = 8
    all_turns: bool = False  # False: regenerate the first answer only; True: every gpt turn
    shard_size: int = 1000  # records per output file, so an interrupted run resumes per shard
    seed: int = 0
    process_group_timeout_minutes: float = 60.0  # collectives (the start-up barrier) wait this long

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.max_new_tokens < 1:
            yield "max_new_tokens", "must be >= 1"
        if self.temperature < 0:
            yield "temperature", "must be >= 0 (0 means greedy)"
        if self.top_p is not None and not 0 < self.top_p <= 1:
            yield "top_p", "must be in (0, 1] (or null for the target's generation config)"
        if self.top_k is not None and self.top_k < 0:
            yield "top_k", "must be >= 0 (0 disables it; null for the target's generation config)"
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            yield "repetition_penalty", "must be > 0 (1.0 disables it; null for the target's generation config)"
        if self.batch_size < 1:
            yield "batch_size", "must be >= 1"
        if self.shard_size < 1:
            yield "shard_size", "must be >= 1"
        if self.process_group_timeout_minutes <= 0:
            yield "process_group_timeout_minutes", "must be > 0"


@dataclass
class LoraConfig:
    """Low-rank adapters on the drafter LM (phase 2), instead of tuning all of its weights."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.r < 1:
            yield "r", "must be >= 1"
        if self.alpha <= 0:
            yield "alpha", "must be > 0"
        if not 0 <= self.dropout < 1:
            yield "dropout", "must be in [0, 1)"
        if not self.target_modules:
            yield "target_modules", "must name at least one module"


@dataclass
class LogitDistillationConfig:
    """Phase 2 on the target's distribution, not only its answers (`massv.train.soft_labels`).

    The loss is (1 - weight) x cross-entropy on the answer tokens + weight x KL(target || drafter) over the
    target's `top_k` most probable ids at each answer position, both softened by `temperature`.
    """

    weight: float = 1.0
    top_k: int = 50  # Hugging Face's default sampling top-k: the exact distribution a T = 1 target draws from
    temperature: float = 1.0
    batch_size: int = 8  # examples per teacher-forced target forward when the labels are computed

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.batch_size < 1:
            yield "batch_size", "must be >= 1"
        if not 0 <= self.weight <= 1:
            yield "weight", "must be in [0, 1] (0: answers only, 1: the target's distribution only)"
        if self.top_k < 1:
            yield "top_k", "must be >= 1"
        if self.temperature <= 0:
            yield "temperature", "must be > 0"


# Accelerate's tracker names (accelerate.utils.LoggerType), listed here so a typo fails at config load.
TRACKERS = ("all", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class TrainingConfig:
    """One training phase (phase 1: projector pretraining; phase 2: fine-tuning on target answers)."""

    output_dir: str = "outputs/phase"
    num_epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides num_epochs when set
    per_device_batch_size: int = 8  # with max_tokens_per_batch: the most samples in one micro-batch
    gradient_accumulation_steps: int = 4  # ignored when global_batch_size is set
    # Samples per optimizer step over all processes: per_device_batch_size x processes x accumulation. When
    # set, the accumulation is derived from it for the number of processes of the launch (which must divide
    # it), so the same config trains with the same global batch on 1, 8 or 64 GPUs.
    global_batch_size: int | None = None
    # Micro-batches by token budget: similar-length samples grouped so that (samples x longest) <= this many
    # padded tokens per device, at most per_device_batch_size samples. None: plain shuffled batches.
    max_tokens_per_batch: int | None = None
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float | None = 1.0  # None: no clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    save_every_steps: int | None = 500  # None: save only at the end
    keep_last_checkpoints: int | None = 2  # None: keep all
    log_every_steps: int = 10
    seed: int = 42
    tensorboard: bool = False  # kept for old configs: the same as report_to: tensorboard
    # Accelerate experiment trackers: tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab,
    # trackio, or all (every one installed). <output_dir>/metrics.jsonl is written whatever this says.
    report_to: str | list[str] | None = None
    lora: LoraConfig | None = None  # phase 2 only: phase 1 trains the projector alone
    # Phase 2 only: also learn the target's next-token distribution (soft labels). None: its answers only.
    logit_distillation: LogitDistillationConfig | None = None
    gradient_checkpointing: bool = False
    # How long a collective (a barrier while the main process preprocesses or saves) waits before the job is
    # killed; torch's default for NCCL is 10 minutes.
    process_group_timeout_minutes: float = 60.0

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.num_epochs <= 0 and self.max_steps is None:
            yield "num_epochs", "must be > 0 (or set max_steps)"
        if self.max_steps is not None and self.max_steps < 1:
            yield "max_steps", "must be >= 1 (or null to train for num_epochs)"
        if self.per_device_batch_size < 1:
            yield "per_device_batch_size", "must be >= 1"
        if self.gradient_accumulation_steps < 1:
            yield "gradient_accumulation_steps", "must be >= 1"
        if self.global_batch_size is not None and (self.global_batch_size < 1
                                                   or self.global_batch_size % self.per_device_batch_size):
            yield "global_batch_size", "must be a positive multiple of per_device_batch_size (or null)"
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            yield "max_tokens_per_batch", "must be >= 1 (or null for plain batches)"
        if self.process_group_timeout_minutes <= 0:
            yield "process_group_timeout_minutes", "must be > 0"
        if self.learning_rate <= 0:
            yield "learning_rate", "must be > 0"
        if self.weight_decay < 0:
            yield "weight_decay", "must be >= 0"
        if not 0 <= self.warmup_ratio < 1:
            yield "warmup_ratio", "must be in [0, 1)"
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            yield "max_grad_norm", "must be > 0 (or null for no clipping)"
        if self.save_every_steps is not None and self.save_every_steps < 1:
            yield "save_every_steps", "must be >= 1 (or null to save only at the end)"
        if self.keep_last_checkpoints is not None and self.keep_last_checkpoints < 1:
            yield "keep_last_checkpoints", "must be >= 1 (or null to keep all)"
        if self.log_every_steps < 1:
            yield "log_every_steps", "must be >= 1"
        unknown = [name for name in self.trackers() if name not in TRACKERS]
        if unknown:
            yield "report_to", f"names unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}"

    def trackers(self) -> list[str]:
        """`report_to` as a list (the legacy `tensorboard: true` included)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        if self.tensorboard and "tensorboard" not in names:
            names.append("tensorboard")
        return [name for name in names if name != "none"]


@dataclass
class CompressConfig:
    """Shrinking the drafter LM further: drop whole layers, or prune weights to a sparsity."""

    method: Literal["layer_prune", "sparsity"]
    num_layers_to_drop: int | None = None  # layer_prune
    sparsity: float | None = None  # sparsity: fraction of weights set to zero
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    score: Literal["wanda", "magnitude"] = "wanda"
    calibration_samples: int = 128  # Wanda's activation statistics / layer importance
    recover: bool = True  # fine-tune briefly after compressing to recover acceptance length

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.method == "layer_prune" and (self.num_layers_to_drop is None or self.num_layers_to_drop < 1):
            yield "num_layers_to_drop", "must be >= 1 when method is 'layer_prune'"
        if self.method == "sparsity":
            if self.pattern == "2:4":
                if self.sparsity is not None and self.sparsity != 0.5:
                    yield "sparsity", "must be 0.5 (or omitted) when pattern is '2:4'"
            elif self.sparsity is None or not 0 < self.sparsity < 1:
                yield "sparsity", "must be in (0, 1) when method is 'sparsity'"
        if self.calibration_samples < 1:
            yield "calibration_samples", "must be >= 1"


@dataclass
class EvalConfig:
    """Speculative decoding benchmark settings."""

    benchmark: str  # a name (gqa, world, ...) or a path to a benchmark file / folder
    data_root: str | None = None  # the folder holding the benchmark's files (--data-root)
    split: str | None = None  # None: the benchmark's usual eval split
    num_draft_tokens: int = 5  # tokens the drafter proposes per target verification step
    temperature: float = 0.0
    max_new_tokens: int = 512
    limit: int | None = None  # None: the whole benchmark

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.num_draft_tokens < 1:
            yield "num_draft_tokens", "must be >= 1"
        if self.temperature < 0:
            yield "temperature", "must be >= 0"
        if self.max_new_tokens < 1:
            yield "max_new_tokens", "must be >= 1"
        if self.limit is not None and self.limit < 1:
            yield "limit", "must be >= 1 (or null for the whole benchmark)"


def _phase1_defaults() -> TrainingConfig:
    # LLaVA-1.5 projector pretraining: large learning rate, only the projector trains.
    return TrainingConfig(output_dir="outputs/phase1", learning_rate=1e-3)


def _phase2_defaults() -> TrainingConfig:
    return TrainingConfig(output_dir="outputs/phase2", learning_rate=2e-5)


@dataclass
class RunConfig:
    """Everything one MASSV run needs; a recipe reads this and nothing else."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    phase1: TrainingConfig = field(default_factory=_phase1_defaults)
    phase2: TrainingConfig = field(default_factory=_phase2_defaults)
    compress: CompressConfig | None = None
    eval: EvalConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe), the inverse of `load_config` on a dict."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the resolved config (defaults and overrides applied) so a run records what it used."""
        from massv.io import atomic_write_text

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        return atomic_write_text(path, text)


FINAL_DIR = "final"


def final_dir(output_dir: str | os.PathLike[str]) -> Path:
    """Where a phase writes its finished drafter (`MultimodalDrafter.save_pretrained` format): the
    convention every command that reads a phase's result (eval, export, compress, phase 2) relies on."""
    return Path(output_dir) / FINAL_DIR


def save_resolved_config(config: RunConfig, output_dir: str | os.PathLike[str]) -> Path:
    """Save `config` as `<output_dir>/resolved_config.yaml`, next to the checkpoints it produced."""
    return config.save(Path(output_dir) / RESOLVED_CONFIG_NAME)


# --------------------------------------------------------------------------------------------------
# YAML 1.2 scalars
# --------------------------------------------------------------------------------------------------


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans/ints/floats (see the module docstring for why)."""


_BOOL_TAG, _INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first_char: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG)]
    for first_char, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] | None = None,
) -> RunConfig:
    """Read, override and validate a run config, failing early with a message that says what to fix.

    `source` is a YAML file path or an already-parsed dict. `overrides` are ``section.key=value``
    strings (nested: ``phase2.lora.r=8``), values parsed as YAML, applied on top of the file.
    """
    if isinstance(source, Mapping):
        raw: Any = dict(source)
        where = "config dict"
    else:
        where = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {where} does not exist") from None
        try:
            raw = _yaml_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{where} is not valid YAML: {error}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of sections (model, data, ...), got {type(raw).__name__}")
    raw = _deep_copy_mapping(raw)
    for override in overrides or ():
        _apply_override(raw, override)
    if overrides:
        where = f"{where} (with overrides)"
    config = _build_dataclass(RunConfig, raw, section="", where=where, base=None)
    _check_values(config, where)
    _check_across_sections(config, where)
    if config.phase1.lora is not None:
        logger.warning("phase1.lora is set but phase 1 trains only the projector; it will be ignored")
    if config.phase1.logit_distillation is not None:
        logger.warning("phase1.logit_distillation is set but phase 1 trains on captions, not on the target's "
                       "answers; it will be ignored")
    return config


def _deep_copy_mapping(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _deep_copy_mapping(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy_mapping(item) for item in value]
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_label(section: str) -> str:
    return f"section '{section}'" if section else "the top level"


def _unknown_key_message(key: str, valid: Sequence[str], section: str, where: str) -> str:
    kind = "key" if section else "section"
    message = f"unknown {kind} '{key}' in {_section_label(section)} of {where}"
    close = difflib.get_close_matches(str(key), valid, n=1)
    if close:
        message += f" — did you mean '{close[0]}'?"
    return message + f" Valid {kind}s: {', '.join(valid)}"


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside `tp` (``X`` or ``X | None``), or None if `tp` is not a section type."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        for member in typing.get_args(tp):
            if dataclasses.is_dataclass(member) and isinstance(member, type):
                return member
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _build_dataclass(cls: type, raw: Any, section: str, where: str, base: Any) -> Any:
    """Construct `cls` from `raw`, on top of `base` (the section's defaults) when given."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{_section_label(section)} of {where} must be a mapping of keys, got {type(raw).__name__} {raw!r}"
        )
    hints = _field_types(cls)
    fields = {item.name: item for item in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key_message(key, list(fields), section, where))
    values: dict[str, Any] = {}
    for name, item in fields.items():
        child_section = f"{section}.{name}" if section else name
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], name, section, child_section, where, base, item)
        elif base is not None:
            values[name] = getattr(base, name)
        elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            kind = "key" if section else "section"
            raise ConfigError(f"missing required {kind} '{name}' in {_section_label(section)} of {where}")
    return cls(**values)


def _coerce(
    value: Any,
    tp: Any,
    key: str,
    section: str,
    child_section: str,
    where: str,
    base: Any,
    item: dataclasses.Field[Any],
) -> Any:
    section_cls = _dataclass_in(tp)
    if section_cls is not None:
        if value is None and _is_union(tp):
            return None
        # A partially given section keeps the defaults of the keys it does not name (phase1 and phase2
        # share a dataclass but not their defaults, so the defaults come from the field's factory).
        if base is not None:
            section_base = getattr(base, key)
        elif item.default_factory is not dataclasses.MISSING:
            section_base = item.default_factory()
        else:
            section_base = None
        if section_base is not None and not isinstance(section_base, section_cls):
            section_base = None
        return _build_dataclass(section_cls, value, child_section, where, section_base)
    try:
        return _coerce_scalar(value, tp)
    except _TypeMismatch as mismatch:
        message = (
            f"key '{key}' in {_section_label(section)} of {where} must be {mismatch.expected}, "
            f"got {type(value).__name__} {value!r}"
        )
        if mismatch.suggestion is not None:
            message += f" — did you mean '{mismatch.suggestion}'?"
        raise ConfigError(message) from None


class _TypeMismatch(Exception):
    def __init__(self, expected: str, suggestion: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.suggestion = suggestion


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number (e.g. 0.5 or 1e-3)"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(tp))
    if origin is list:
        (item_type,) = typing.get_args(tp)
        return f"a list of {_describe(item_type).removeprefix('a ').removeprefix('an ')}s"
    if _is_union(tp):
        return " or ".join(_describe(member) for member in typing.get_args(tp))
    return str(tp)


def _coerce_scalar(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, accepting only lossless conversions (int -> float, "1e-3" -> float)."""
    if _is_union(tp):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        suggestion = None
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce_scalar(value, member)
            except _TypeMismatch as mismatch:
                suggestion = suggestion or mismatch.suggestion
        raise _TypeMismatch(_describe(tp), suggestion)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and isinstance(value, str):
            return value
        close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
        raise _TypeMismatch(_describe(tp), close[0] if close else None)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _TypeMismatch(_describe(tp))
        return [_coerce_scalar(item, item_type) for item in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch(_describe(tp))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _TypeMismatch(_describe(tp))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _TypeMismatch(_describe(tp))
    if tp is str:
        if isinstance(value, str):
            return value
        raise _TypeMismatch(_describe(tp))
    raise TypeError(f"config field type {tp!r} is not supported by the loader")


def _check_values(config: Any, where: str, section: str = "") -> None:
    """Range checks each section declares in `_problems`, reported like the type errors."""
    for item in dataclasses.fields(config):
        child = getattr(config, item.name)
        if dataclasses.is_dataclass(child):
            _check_values(child, where, f"{section}.{item.name}" if section else item.name)
    problems = getattr(config, "_problems", None)
    if problems is None:
        return
    for key, problem in problems():
        value = getattr(config, key)
        raise ConfigError(f"key '{key}' in {_section_label(section)} of {where} {problem}, got {value!r}")


def _check_across_sections(config: RunConfig, where: str) -> None:
    """Checks that involve two sections (each section's own checks are in its `_problems`)."""
    for name in ("phase1", "phase2"):
        budget = getattr(config, name).max_tokens_per_batch
        if budget is not None and budget < config.data.max_length:
            raise ConfigError(f"key 'max_tokens_per_batch' in section '{name}' of {where} is {budget}, below "
                              f"data.max_length {config.data.max_length}: a sample of the longest allowed length "
                              "would not fit in a micro-batch")


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in `raw`, checking the path against the schema so typos are caught here."""
    path, separator, value_text = override.partition("=")
    path = path.strip()
    if not separator or not path:
        raise ConfigError(f"override '{override}' must look like section.key=value (e.g. phase2.learning_rate=1e-5)")
    try:
        value = _yaml_load(value_text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{override}': value is not valid YAML: {error}") from None
    keys = path.split(".")
    where = f"override '{override}'"
    cls: type = RunConfig
    node = raw
    for depth, key in enumerate(keys):
        section = ".".join(keys[:depth])
        fields = {item.name: item for item in dataclasses.fields(cls)}
        if key not in fields:
            raise ConfigError(_unknown_key_message(key, list(fields), section, where))
        if depth == len(keys) - 1:
            node[key] = value
            return
        child_cls = _dataclass_in(_field_types(cls)[key])
        if child_cls is None:
            raise ConfigError(f"{where}: '{'.'.join(keys[: depth + 1])}' is a value, not a section")
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
        cls = child_cls
