"""Load a target VLM and a drafter (MASSV or plain text LM) from local paths or hub ids, with clear errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from massv.drafter import CONFIG_NAME, MultimodalDrafter
from massv.families import get_adapter
from massv.vocab import check_tokenizer_compatibility

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_dtype(name: str) -> Any:
    """Config strings to torch dtypes; an unknown name lists the valid ones."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_model_dtype(name: str, device: str | None) -> Any:
    """`resolve_dtype`, except that "auto" means float32 when the model will run on the CPU.

    Why: a half-precision checkpoint run on a CPU is slow, and its rounding differs between the target's
    k+1-token verification forward and `generate`'s one-token forwards, which flips greedy choices where two
    tokens are nearly tied: `massv eval` on the world's float16 target saw 2 of 40 outputs differ from
    `target.generate` in float16, none in float32.
    """
    if name == "auto" and (device is None or device.startswith("cpu")):  # load_target keeps device=None on CPU
        return torch.float32
    return resolve_dtype(name)


def load_target(name_or_path: str, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """The target VLM and its processor; the family is checked up front so an unsupported one fails fast."""
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=resolve_model_dtype(dtype, device))
    get_adapter(model.config)
    if device:
        model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model, processor


def is_massv_drafter(path: str | Path) -> bool:
    """A directory written by `MultimodalDrafter.save_pretrained` (else: a plain causal LM, the text-only baseline)."""
    return (Path(path) / CONFIG_NAME).is_file()


def load_drafter(name_or_path: str, target: Any, target_tokenizer: Any, dtype: str = "auto") -> Any:
    """A MASSV drafter sharing the target's vision encoder, or a plain causal LM checked against the tokenizer."""
    if is_massv_drafter(name_or_path):
        drafter = MultimodalDrafter.from_pretrained(name_or_path, target=target)
        return drafter.to(device=target.device)
    lm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_model_dtype(dtype, target.device.type))
    lm = lm.to(target.device).eval()
    check_drafter_tokenizer(name_or_path, target_tokenizer)
    return lm


def check_drafter_tokenizer(name_or_path: str | Path, target_tokenizer: Any) -> None:
    """When a drafter LM ships its own tokenizer, it must tokenize exactly like the target's.

    A local directory without tokenizer files is assumed to share the target's tokenizer (a warning says
    so): `AutoTokenizer` would otherwise invent a default one and report a false mismatch.
    """
    local = Path(name_or_path)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s; assuming it shares the target's tokenizer", local)
        return
    check_tokenizer_compatibility(target_tokenizer, AutoTokenizer.from_pretrained(str(name_or_path)))
