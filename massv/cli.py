"""The `massv` command: one entry point, each subcommand owned by the module that does the work.

Each subcommand's module exposes `main(argv) -> int` with its own argument parser, so
`massv train ...` and `python -m massv.train ...` (or `accelerate launch -m massv.train ...`) are the same
program. Modules are imported only when their command runs, so `massv --help` is instant.
"""

from __future__ import annotations

import importlib
import logging
import sys

# command -> (module with main(argv), one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("massv.demo", "run the whole MASSV pipeline on the embedded synthetic world and write a report"),
    "train": ("massv.train.__main__", "train a drafter: phase 1 (projector) or phase 2 (self-distilled tuning)"),
    "distill": ("massv.train.distill", "have the target VLM answer instruction prompts (self-distillation data)"),
    "eval": ("massv.evaluate", "measure speculative decoding (MAL, acceptance, speedup) on a benchmark"),
    "compress": ("massv.compress.recipe", "compress a drafter: angular-distance layer pruning or sparsity"),
    "world": ("massv.world_cli", "write the synthetic world's images and LLaVA-format JSONL splits"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: massv <command> [options]",
        "",
        "Multimodal drafters for lossless speculative decoding of vision-language models.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "Run 'massv <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand's module; unknown commands list the known ones."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
