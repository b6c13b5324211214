"""The one loader: target VLMs and drafters (MASSV or plain text LM) from local paths, Hub ids or `tiny:<family>`,
placed on a device in a dtype, with errors that say what and where.

Why one place: the CLI commands (eval, distill, compress, export) and the training builders must agree on
what a model name means, what `--dtype auto` means, and where a model goes; two resolutions drift apart.

Placement (`resolve_placement`):
    --device auto   CUDA when visible, with `device_map="auto"` (Accelerate spreads a target too big for one
                    GPU over all visible ones), else the CPU
    --device cuda / cuda:1 / cpu / mps   that one device
    --dtype auto    bfloat16 on CUDA (float16 where the GPU lacks bfloat16), float32 on the CPU: a
                    half-precision target on the CPU is slow, and its rounding differs between the target's
                    k+1-token verification forward and `generate`'s one-token forwards, which flips greedy
                    choices at near-ties (the world's float16 target: 2 of 40 outputs in float16, 0 in float32)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from massv.errors import InputError, MissingInputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

    from massv.config import ModelConfig

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES: dict[str, torch.dtype | str] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                         "float16": torch.float16, "auto": "auto"}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:<index>, mps"


# --------------------------------------------------------------------------------------------------
# Devices and dtypes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a model goes: `device` receives the inputs; `device_map` (for `from_pretrained`) may spread it."""

    device: torch.device
    dtype: torch.dtype
    device_map: str | dict[str, Any] | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """The `dtype` / `device_map` keyword arguments of a transformers `from_pretrained` call."""
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return kwargs


def resolve_device(name: str | torch.device | None = "auto") -> tuple[torch.device, str | dict[str, Any] | None]:
    """(input device, device_map) for a `--device` value; a device that is not there is an error now."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0), "auto"
        return torch.device("cpu"), None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name}: not a device; choose from {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False); "
                             "use --device cpu, or check CUDA_VISIBLE_DEVICES and the driver")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        device = torch.device("cuda", index)
        return device, {"": device}
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "mps"):
        raise InputError(f"--device {name}: unsupported device type {device.type!r}; choose from {DEVICE_CHOICES}")
    return device, None


def resolve_dtype(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """A dtype name (a config's `torch_dtype`, `--dtype`) as a torch dtype; "auto" depends on the device."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype != "auto":
        return dtype  # type: ignore[return-value]
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "mps":
        return torch.float16
    return torch.float32


def resolve_placement(device: str | torch.device | None = "auto", dtype: str | torch.dtype = "auto") -> Placement:
    """`--device` and `--dtype` together (see the module docstring)."""
    input_device, device_map = resolve_device(device)
    return Placement(device=input_device, dtype=resolve_dtype(dtype, input_device), device_map=device_map)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a (possibly dispatched) model takes its inputs: the device of its input embeddings."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------------
# Model names
# --------------------------------------------------------------------------------------------------


def tiny_family(name: str) -> str | None:
    """The family of a `tiny:<family>` name (massv.tiny's random real-architecture models), else None."""
    if not name.startswith(TINY_PREFIX):
        return None
    from massv.families import SUPPORTED_FAMILIES

    family = name[len(TINY_PREFIX):]
    if family not in SUPPORTED_FAMILIES:
        raise InputError(f"{name}: unknown tiny family {family!r}; choose from "
                         + ", ".join(TINY_PREFIX + known for known in SUPPORTED_FAMILIES))
    return family


def check_model_source(name: str, what: str = "model") -> str:
    """Check that `name` can name a model before anything is loaded or downloaded; returns its kind.

    "tiny", "local" (a directory with config.json) or "hub" (an `owner/name` id). A path that does not
    exist, a file, a directory without config.json, and a training checkpoint are errors that say so.
    """
    from massv.drafter import CHECKPOINT_STATE_NAME, CONFIG_NAME, looks_like_hub_id

    if tiny_family(name) is not None:
        return "tiny"
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / CHECKPOINT_STATE_NAME).is_file():
            raise InputError(f"{what} {name} is a training checkpoint, not a model: turn it into a drafter with "
                             f"'massv export {name} --out DIR' (or use the phase's final/ directory)")
        if not (path / "config.json").is_file() and not (path / CONFIG_NAME).is_file():
            raise MissingInputError(f"{what} {name} is a directory without config.json: not a Hugging Face model "
                                    "directory (or a MASSV drafter)")
        return "local"
    if path.exists():
        raise InputError(f"{what} {name} is a file; expected a model directory or a Hub id (owner/name)")
    if looks_like_hub_id(name):
        return "hub"
    raise MissingInputError(f"{what} {name}: no such directory, and not a Hub id (owner/name)")


def _from_pretrained(load: Any, name: str, what: str, **kwargs: Any) -> Any:
    """A transformers `from_pretrained` whose failures (hub, missing or corrupt files) name the model."""
    try:
        return load(name, **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load {what} {name}: {reason}") from error


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_target(name_or_path: str, dtype: str | torch.dtype = "auto", device: str | torch.device | None = "auto",
                attn_implementation: str | None = None) -> tuple[Any, Any]:
    """The target VLM (placed as `resolve_placement(device, dtype)` says) and its processor.

    `tiny:<family>` builds `massv.tiny.build_tiny_pair(family, seed=0)`'s target. The family is checked up
    front so an unsupported one fails fast.
    """
    from massv.families import get_adapter

    placement = resolve_placement(device, dtype)
    kind = check_model_source(name_or_path, "target")
    family = tiny_family(name_or_path)
    if family is not None:
        from massv.tiny import build_tiny_pair

        pair = build_tiny_pair(family, seed=0)
        model, processor = pair.target.to(device=placement.device, dtype=placement.dtype), pair.processor
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs = placement.from_pretrained_kwargs()
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        logger.info("loading target %s (%s, %s%s)", name_or_path, kind, placement.dtype,
                    f", device_map={placement.device_map}" if placement.device_map else f", {placement.device}")
        model = _from_pretrained(AutoModelForImageTextToText.from_pretrained, name_or_path, "target", **kwargs)
        if placement.device_map is None:
            model.to(placement.device)
        processor = _from_pretrained(AutoProcessor.from_pretrained, name_or_path, "the target's processor")
    get_adapter(model.config)
    model.eval()
    return model, processor


def load_causal_lm(name_or_path: str, dtype: str | torch.dtype = "auto", device: str | torch.device | None = "cpu",
                   attn_implementation: str | None = None) -> Any:
    """A plain causal LM (a drafter LM, or the text-only baseline drafter); `tiny:<family>` is the tiny pair's."""
    placement = resolve_placement(device, dtype)
    check_model_source(name_or_path, "drafter LM")
    family = tiny_family(name_or_path)
    if family is not None:
        from massv.tiny import build_tiny_pair

        return build_tiny_pair(family, seed=0).drafter_lm.to(device=placement.device, dtype=placement.dtype)
    from transformers import AutoModelForCausalLM

    kwargs = placement.from_pretrained_kwargs()
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, "drafter LM", **kwargs)
    if placement.device_map is None:
        model.to(placement.device)
    return model


def is_massv_drafter(name_or_path: str | Path) -> bool:
    """A directory (or Hub repository) written by `MultimodalDrafter.save_pretrained`; else a plain causal LM."""
    from massv.drafter import CONFIG_NAME, looks_like_hub_id

    path = Path(name_or_path)
    if path.is_dir() or path.exists():
        return (path / CONFIG_NAME).is_file()
    if tiny_family(str(name_or_path)) is not None or not looks_like_hub_id(str(name_or_path)):
        return False
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(str(name_or_path), CONFIG_NAME)
    except Exception:  # not on the Hub, no such file, or offline without a cached copy: a plain LM then
        return False
    return True


def load_drafter(name_or_path: str, target: Any, target_tokenizer: Any, dtype: str = "auto") -> Any:
    """A MASSV drafter sharing the target's vision encoder, or a plain causal LM checked against the tokenizer.

    Either way it goes to the device the target takes its inputs on, in `resolve_dtype(dtype, that device)`.
    """
    from massv.drafter import MultimodalDrafter

    check_model_source(name_or_path, "drafter")
    device = input_device(target)
    torch_dtype = resolve_dtype(dtype, device)
    if is_massv_drafter(name_or_path):
        drafter = MultimodalDrafter.from_pretrained(name_or_path, target=target, torch_dtype=torch_dtype)
        return drafter.to(device=device)
    lm = load_causal_lm(name_or_path, dtype=dtype, device=device).eval()
    check_drafter_tokenizer(name_or_path, target_tokenizer)
    return lm


def check_drafter_tokenizer(name_or_path: str | Path, target_tokenizer: Any) -> None:
    """When a drafter LM ships its own tokenizer, it must tokenize exactly like the target's.

    A local directory without tokenizer files (and a `tiny:` name) is assumed to share the target's
    tokenizer (a warning says so for a directory): `AutoTokenizer` would otherwise invent a default one
    and report a false mismatch.
    """
    from transformers import AutoTokenizer

    from massv.vocab import check_tokenizer_compatibility

    if tiny_family(str(name_or_path)) is not None:
        return
    local = Path(name_or_path)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s; assuming it shares the target's tokenizer", local)
        return
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, str(name_or_path), "the drafter's tokenizer")
    check_tokenizer_compatibility(target_tokenizer, tokenizer)


# --------------------------------------------------------------------------------------------------
# From a run config's model section (training, distillation, compression)
# --------------------------------------------------------------------------------------------------
# `model.target` / `model.drafter_lm` are hub ids or local paths. The special name ``tiny:<family>``
# (``tiny:qwen2_5_vl``, ``tiny:gemma3``) builds the tiny random real-architecture pair of
# `massv.tiny.build_tiny_pair(family, seed=0)` instead, so `configs/tiny.yaml` runs on a CPU with nothing
# downloaded; both names must then be tiny and of the same family. The pair is deterministic, so every
# process and every restart builds identical weights.


def config_dtype(name: str) -> torch.dtype | str:
    """A config's `model.torch_dtype`: "auto" stays "auto" (as saved / as trained), any other name resolved."""
    return "auto" if name == "auto" else resolve_dtype(name)


def tiny_pair_family(model_config: ModelConfig) -> str | None:
    """The tiny family both model names name, None for real models; a half-tiny or mixed pair is an error."""
    target_tiny = model_config.target.startswith(TINY_PREFIX)
    drafter_tiny = model_config.drafter_lm.startswith(TINY_PREFIX)
    if target_tiny != drafter_tiny or (target_tiny and model_config.target != model_config.drafter_lm):
        raise ValueError(
            f"model.target {model_config.target!r} and model.drafter_lm {model_config.drafter_lm!r}: a tiny "
            "pair must name the same tiny family on both (e.g. tiny:qwen2_5_vl twice)"
        )
    return model_config.target[len(TINY_PREFIX):] if target_tiny else None


def build_models(model_config: ModelConfig, device: str | torch.device | None = None,
                 with_drafter_lm: bool = True) -> tuple[PreTrainedModel, PreTrainedModel | None, ProcessorMixin]:
    """(target VLM, drafter LM or None, target processor), the tokenizers checked to agree.

    The target stays on `device` (default CPU): in training only its vision encoder is used, and the recipe
    moves just that to the accelerator, so a 7B-12B target LM never occupies GPU memory there.
    """
    family = tiny_pair_family(model_config)
    if family is not None:
        from massv.tiny import build_tiny_pair

        pair = build_tiny_pair(family, seed=0)
        target, processor = pair.target, pair.processor
        drafter_lm = pair.drafter_lm if with_drafter_lm else None
        if model_config.torch_dtype != "auto":
            for model in (target, drafter_lm):
                if model is not None:
                    model.to(dtype=config_dtype(model_config.torch_dtype))
    else:
        # Loaded on the CPU (see above), in the dtype the computation will use: "auto" resolves for the device
        # training runs on (bfloat16 on CUDA, float32 on the CPU).
        compute_device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(model_config.torch_dtype, compute_device)
        target, processor = load_target(model_config.target, dtype=dtype, device="cpu",
                                        attn_implementation=model_config.attn_implementation)
        drafter_lm = None
        if with_drafter_lm:
            logger.info("loading drafter LM %s", model_config.drafter_lm)
            drafter_lm = load_causal_lm(model_config.drafter_lm, dtype=dtype, device="cpu",
                                        attn_implementation=model_config.attn_implementation)
            check_drafter_tokenizer(model_config.drafter_lm, processor.tokenizer)
    if model_config.family is not None and target.config.model_type != model_config.family:
        raise ValueError(f"model.family is {model_config.family!r} but {model_config.target} is a "
                         f"{target.config.model_type!r} model")
    apply_pixel_limits(processor, model_config.min_pixels, model_config.max_pixels)
    if device is not None:
        target.to(device)
    target.eval()
    return target, drafter_lm, processor


def apply_pixel_limits(processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set Qwen2.5-VL's resize range (`model.min_pixels` / `model.max_pixels`) on the processor, in place.

    The range decides each image's token count, so training, distillation and evaluation must all use the
    processor it was set on (the resolved config records it).
    """
    if min_pixels is None and max_pixels is None:
        return
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    current = {key: (size.get(key) if isinstance(size, dict) else getattr(size, key, None))
               for key in ("shortest_edge", "longest_edge")}
    if current["longest_edge"] is None:
        raise ValueError(f"model.min_pixels / model.max_pixels are set, but the target's image processor "
                         f"({type(image_processor).__name__}) has no pixel range to set: they apply to Qwen2.5-VL's "
                         "dynamic resolution (Gemma3 resizes every image to one fixed size); remove them")
    limits = {"shortest_edge": min_pixels if min_pixels is not None else current["shortest_edge"],
              "longest_edge": max_pixels if max_pixels is not None else current["longest_edge"]}
    if limits["shortest_edge"] is not None and limits["shortest_edge"] > limits["longest_edge"]:
        raise ValueError(f"model.min_pixels {limits['shortest_edge']} exceeds max_pixels {limits['longest_edge']}")
    if isinstance(size, dict):
        image_processor.size = {**size, **limits}
    else:
        from transformers.image_utils import SizeDict

        image_processor.size = SizeDict(**limits)
    logger.info("image resize range: %s to %s pixels", limits["shortest_edge"], limits["longest_edge"])


def build_target_and_processor(model_config: ModelConfig,
                               device: str | torch.device | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The target and its processor alone (self-distillation needs no drafter); CUDA when available."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target, _, processor = build_models(model_config, device=device, with_drafter_lm=False)
    return target, processor


def storage_dtype(model_config: ModelConfig) -> torch.dtype | None:
    """The dtype the finished drafter is saved in (None for "auto": as trained)."""
    dtype = config_dtype(model_config.torch_dtype)
    return None if dtype == "auto" else dtype
