"""Pieces every benchmark loader shares: the sample record, file errors, prompt wording.

Loaders differ only in how a published file format maps onto `BenchmarkSample`; everything
about reading JSON, naming a missing file and phrasing the instruction lives here so that the
formats stay comparable (the speculative-decoding numbers depend on the exact prompt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from massv.errors import CorruptFileError, MissingInputError
from massv.io import read_json as _read_json

# Instructions appended to the question, worded as in the LLaVA-1.5 evaluation files, so the
# target model answers in the length regime the benchmark was designed for.
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


@dataclass(frozen=True)
class BenchmarkSample:
    """One image + user turn, uniform across benchmarks so the eval loop never branches on format."""

    sample_id: str
    image_path: Path  # absolute path of the image file
    prompt: str  # the user's text turn, instruction included, no image placeholder
    reference: str | None  # reference answer/caption where the format ships one


class BenchmarkFileError(MissingInputError):
    """A benchmark file or image is missing; the message says which, where, and how to get it."""


def require_file(path: Path, benchmark: str, hint: str) -> Path:
    """Fail early with the full expected path, since a bare KeyError/ENOENT deep in a loop
    tells the user nothing about which download they are missing."""
    if not path.is_file():
        raise BenchmarkFileError(f"{benchmark} needs {path.name} at {path} ({hint})")
    return path


def read_json(path: Path) -> Any:
    """Parsed JSON; a file in another encoding than UTF-8, or broken JSON, names the file and the line."""
    return _read_json(path, "benchmark file")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield one record per non-blank line; a broken line names its line number."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorruptFileError(f"benchmark file {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at "
                                       f"line {line_number}): re-save it as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise CorruptFileError(f"{path}:{line_number}: not valid JSON ({error})") from error


def short_answer_prompt(question: str) -> str:
    return f"{question.strip()}\n{SHORT_ANSWER_INSTRUCTION}"


def option_letter(index: int) -> str:
    return chr(ord("A") + index)


def multiple_choice_prompt(question: str, options: Sequence[str], context: str = "") -> str:
    """LLaVA-1.5 / lmms-eval layout: optional context, question, lettered options, instruction."""
    lines = [f"Context: {context.strip()}"] if context.strip() else []
    lines.append(question.strip())
    lines.extend(f"{option_letter(index)}. {str(option).strip()}" for index, option in enumerate(options))
    lines.append(MULTIPLE_CHOICE_INSTRUCTION)
    return "\n".join(lines)
