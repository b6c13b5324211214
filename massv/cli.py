"""The `massv` command: one entry point, each subcommand owned by the module that does the work.

Each subcommand's module exposes `main(argv) -> int` with its own argument parser, so
`massv train ...` and `python -m massv.train ...` (or `accelerate launch -m massv.train ...`) are the same
program. Modules are imported only when their command runs, so `massv --help` is instant.

A mistake the user can fix (`massv.errors.MassvError`: a missing file, a flag that does not fit, a config
typo) is printed as one line that names what and where; `--debug` (anywhere on the line) or `MASSV_DEBUG=1`
shows its traceback too. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import sys
from typing import Any

# command -> (module with main(argv), one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("massv.pipelines.demo", "run the whole MASSV pipeline on the embedded synthetic world and write a report"),
    "train": ("massv.train.__main__", "train a drafter: phase 1 (projector) or phase 2 (self-distilled tuning)"),
    "distill": ("massv.train.distill", "have the target VLM answer instruction prompts (self-distillation data)"),
    "eval": ("massv.evaluate", "measure speculative decoding (MAL, acceptance, speedup) on a benchmark"),
    "compress": ("massv.compress.recipe", "compress a drafter: angular-distance layer pruning or sparsity"),
    "export": ("massv.export", "turn a training checkpoint (checkpoint-N/) into a drafter directory"),
    "world": ("massv.pipelines.world_cli", "write the synthetic world's images and LLaVA-format JSONL splits"),
}
DEBUG_FLAG = "--debug"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# --------------------------------------------------------------------------------------------------
# What every subcommand's parser shares
# --------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default (`(default: 5)`), except where there is none to show.

    Also for options without help text (argparse prints no help line for them, default included) and for
    defaults that compare equal to False (0, 0.0).
    """

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        return not (default is None or default is False or default is argparse.SUPPRESS
                    or (isinstance(default, list) and not default))

    def _get_help_string(self, action: argparse.Action) -> str:
        if not self._shows_default(action) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def add_device_arguments(parser: argparse.ArgumentParser, from_config: bool = False) -> None:
    """`--device` and `--dtype`, with the same meaning in every command (massv.loading.resolve_placement).

    `from_config`: the command reads a config, whose `model.torch_dtype` is the default dtype.
    """
    parser.add_argument("--device", default="auto",
                        help="auto: CUDA when a GPU is visible (eval: device_map='auto', a target spread over every "
                        "visible GPU), else the CPU; or cpu, cuda, cuda:<index>, mps")
    dtype_help = "auto: bfloat16 on a GPU (float16 where bfloat16 is unsupported), float32 on the CPU"
    parser.add_argument("--dtype", default=None if from_config else "auto",
                        choices=("auto", "bfloat16", "float16", "float32"),
                        help=dtype_help + (" (default: the config's model.torch_dtype)" if from_config else ""))


def add_override_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """`--override KEY=VALUE ...`, as in every command that reads a config."""
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"config overrides, e.g. {example}")


class TqdmLoggingHandler(logging.StreamHandler):
    """Writes each record through `tqdm.write`, which clears the progress bars, writes the line and redraws them,
    so a log line never lands in the middle of a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise into the program
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """INFO to stderr, above tqdm's progress bars instead of through them.

    Does nothing if logging is set up already (a caller's own configuration wins).
    """
    if logging.getLogger().handlers:
        return
    handler = TqdmLoggingHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: massv <command> [options] [--debug]",
        "",
        "Multimodal drafters for lossless speculative decoding of vision-language models.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "Run 'massv <command> --help' for a command's options. Errors print as one line; --debug (or "
              "MASSV_DEBUG=1) adds the traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand's module; unknown commands list the known ones; user mistakes print one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("MASSV_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from massv import __version__

        print(f"massv {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"massv: unknown command {command!r}; choose from: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    configure_logging()
    return run_main(command, lambda args: importlib.import_module(COMMANDS[command][0]).main(args), rest, debug)


def run_main(command: str, command_main: Any, argv: list[str] | None = None, debug: bool | None = None) -> int:
    """Run a subcommand's `main(argv)`: a `MassvError` becomes one line on stderr (exit 2), unless `--debug`.

    Also what `python -m massv.train` and `python -m massv.train.distill` run, so they behave the same.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if debug is None:
        debug = DEBUG_FLAG in argv or os.environ.get("MASSV_DEBUG", "") not in ("", "0")
        argv = [arg for arg in argv if arg != DEBUG_FLAG]
    from massv.errors import MassvError, one_line

    try:
        return int(command_main(argv) or 0)
    except MassvError as error:
        if debug:
            raise
        print(f"massv {command}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"massv {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
