"""`massv eval`: speculative decoding measured on an image-QA / captioning benchmark.

For every sample it runs the target alone (`target.generate`) and the speculative engine with the same
settings, and records mean accepted length, acceptance rate and wall-clock speedup. Greedy runs also check
that the speculative output is token-for-token the target's own: mismatches are counted and their rate
reported (half precision on a GPU may flip near-tied tokens), never hidden. The demo uses `evaluate_samples`
directly on models it already holds.

Output directory (`--out`):
    run.json        what is measured (models, benchmark, settings, shard); a rerun with other settings is refused
    samples.jsonl   one line per sample, appended as soon as the sample is done: an interrupted run resumes
    summary.json    the aggregate, recomputed from samples.jsonl (so a resumed run reports all its samples)
    summary.md      the same as a short report, with the bad images it skipped
    summary.png     acceptance by draft position and the distribution of accepted lengths

`--shard i/N` measures samples i, i+N, i+2N, ... into `<out>/shard-i-of-N/` (one process or GPU each);
`--merge --out <out>` then joins the N shards into `<out>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from massv.benchmarks import BenchmarkSample, load_benchmark
from massv.chat import prompt_inputs
from massv.errors import InputError, MissingInputError
from massv.families import get_adapter
from massv.io import atomic_write_json, atomic_write_text
from massv.speculative import GenerationStats, SamplingConfig, SpeculativeGenerator
from massv.train.llava_data import ImageError, load_image

logger = logging.getLogger(__name__)

RUN_NAME = "run.json"
SAMPLES_NAME = "samples.jsonl"
SUMMARY_NAME = "summary.json"
REPORT_NAME = "summary.md"
PLOT_NAME = "summary.png"
BAD_IMAGE = "bad_image"
SHARD_DIR = "shard-{index}-of-{count}"


class BadImageError(InputError):
    """A sample's image is missing or does not decode; `--skip-bad-images` counts and skips such samples."""


@dataclass
class EvalSettings:
    """What is being measured: one setting of γ, temperature and length."""

    num_draft_tokens: int = 5
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None  # None: as generate() resolves it (the target's generation config, else 50); 0: off
    max_new_tokens: int = 128
    seed: int = 0
    check_lossless: bool = True  # greedy only: compare every output with target.generate
    strategy: str = "chain"  # "chain", "adaptive" or "tree" (massv.speculative.strategy)
    tree_size: int = 16  # tree only: nodes the target verifies per block
    tree_depth: int = 16  # tree only: at most this many drafter forwards per block
    tree_top_k: int = 3  # tree only: children per expanded node
    tree_min_probability: float = 0.4  # tree only: stop growing once every frontier path is less likely
    tree_width: int = 1  # tree only: nodes expanded per depth (0: tree_top_k, EAGLE-2)
    tree_min_node_probability: float = 0.1  # tree only: leave out nodes whose path is less likely (0: EAGLE-2)

    def strategy_kwargs(self) -> dict[str, Any]:
        """The `generate_from_inputs` arguments that choose the drafting strategy."""
        from massv.speculative.strategy import TreeShape

        kwargs: dict[str, Any] = {"strategy": self.strategy}
        if self.strategy == "tree":
            kwargs["tree"] = TreeShape(size=self.tree_size, depth=self.tree_depth, top_k=self.tree_top_k,
                                       min_probability=self.tree_min_probability, width=self.tree_width or None,
                                       min_node_probability=self.tree_min_node_probability)
        return kwargs


@dataclass
class EvalSummary:
    """Aggregates over a benchmark; MAL counts the bonus token (tokens emitted per target verification)."""

    num_samples: int
    mean_accepted_length: float
    mean_accepted_drafts: float
    acceptance_rate: float
    position_acceptance: list[float]
    target_seconds: float
    speculative_seconds: float
    speedup: float
    target_tokens_per_second: float
    speculative_tokens_per_second: float
    lossless_checked: int = 0
    lossless_mismatches: int = 0
    lossless_mismatch_rate: float = 0.0  # mismatches / checked
    skipped_bad_images: int = 0  # samples left out (not in num_samples) because their image is missing or corrupt
    settings: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def sample_inputs(processor: Any, adapter: Any, sample: BenchmarkSample) -> Any:
    """The processor outputs of one benchmark sample, as the target's own chat template builds them (the image
    read with `load_image`: a missing or corrupt one raises `ImageError`)."""
    image = load_image(sample.image_path, sample.sample_id)
    return prompt_inputs(processor, adapter.user_messages(sample.prompt), [image])  # no second <bos>


def _target_generate(target: Any, inputs: Any, decoding: SamplingConfig, max_new_tokens: int,
                     seed: int) -> tuple[list[int], float]:
    """The baseline: the target's own `generate`, timed end to end (vision and prefill included).

    `decoding` is what the engine resolved for the same request, passed in full, so the target's generation
    config cannot make the two sides decode differently (at T > 0 they sample the same distribution).
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        output = target.generate(**inputs.to(target.device), max_new_tokens=max_new_tokens,
                                 **decoding.generate_kwargs())
    elapsed = time.perf_counter() - start
    return output[0, inputs["input_ids"].shape[1]:].tolist(), elapsed


def bad_image_row(sample: BenchmarkSample, reason: str, index: int | None = None) -> dict[str, Any]:
    """The record of a sample left out for its image: counted and reported, never measured."""
    return {"sample_id": sample.sample_id, "index": index, "skipped": BAD_IMAGE, "image": str(sample.image_path),
            "reason": reason}


def evaluate_samples(target: Any, drafter: Any, processor: Any, samples: list[BenchmarkSample],
                     settings: EvalSettings, description: str = "eval",
                     baseline_cache: dict[tuple[Any, ...], tuple[list[int], float]] | None = None, *,
                     skip_bad_images: bool = False, completed: dict[str, dict[str, Any]] | None = None,
                     on_row: Callable[[dict[str, Any]], None] | None = None,
                     indices: list[int] | None = None, progress: bool = True) -> tuple[EvalSummary, list[dict[str, Any]]]:
    """Run target-alone and speculative generation on every sample; return the summary and per-sample rows.

    `baseline_cache` lets several drafters share one timed target run per sample and setting (the demo
    compares four drafters against the same target). `completed` (sample id -> row) holds samples a previous
    run already measured: they are not run again. `on_row` receives each new row as soon as it is done (the
    CLI appends it to samples.jsonl). A sample whose image is missing or corrupt raises `BadImageError`, or,
    with `skip_bad_images`, becomes a `skipped` row that the summary counts. `indices` are the samples'
    positions in the whole benchmark (shards), recorded in each row. `progress=False` hides the progress bar.
    """
    adapter = get_adapter(target.config)
    generator = SpeculativeGenerator(target, drafter, processor)
    rows: list[dict[str, Any]] = []
    for position, sample in enumerate(tqdm(samples, desc=description, unit="sample", disable=not progress)):
        index = indices[position] if indices is not None else position
        if completed is not None and sample.sample_id in completed:
            rows.append(completed[sample.sample_id])
            continue
        try:
            inputs = sample_inputs(processor, adapter, sample)
        except ImageError as error:
            if not skip_bad_images:
                raise BadImageError(f"sample {sample.sample_id}: {error.reason or error} ({sample.image_path}); "
                                    "--skip-bad-images counts and skips such samples (skip_bad_images=True in "
                                    "Python)") from error
            logger.warning("sample %s: skipping bad image %s (%s)", sample.sample_id, sample.image_path, error.reason)
            row = bad_image_row(sample, error.reason or str(error), index)
        else:
            row = _measure(target, generator, inputs, sample, settings, baseline_cache)
            row["index"] = index
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return summarize(rows, settings), rows


def _measure(target: Any, generator: Any, inputs: Any, sample: BenchmarkSample, settings: EvalSettings,
             baseline_cache: dict[tuple[Any, ...], tuple[list[int], float]] | None) -> dict[str, Any]:
    """One sample: the (possibly cached) target baseline, then speculative generation, as one JSON-ready row."""
    # One resolution of the decoding settings for both sides (call, then generation config, then HF defaults).
    decoding = generator.resolve_settings(settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    key = (sample.sample_id, decoding, settings.max_new_tokens, settings.seed)
    if baseline_cache is not None and key in baseline_cache:
        target_ids, elapsed = baseline_cache[key]
    else:
        target_ids, elapsed = _target_generate(target, inputs, decoding, settings.max_new_tokens, settings.seed)
        if baseline_cache is not None:
            baseline_cache[key] = (target_ids, elapsed)
    start = time.perf_counter()
    output = generator.generate_from_inputs(
        inputs, max_new_tokens=settings.max_new_tokens, num_draft_tokens=settings.num_draft_tokens,
        seed=settings.seed, **asdict(decoding), **settings.strategy_kwargs(),
    )
    speculative_seconds = time.perf_counter() - start
    output.stats.total_seconds = speculative_seconds  # include input transfer, as the baseline does
    speculative_ids = output.generated_ids[0].tolist()
    identical = speculative_ids == target_ids
    checked = settings.temperature == 0 and settings.check_lossless
    if checked and not identical:
        logger.warning("sample %s: speculative output differs from target.generate", sample.sample_id)
    return {
        "sample_id": sample.sample_id,
        "prompt": sample.prompt,
        "reference": sample.reference,
        "output": output.text,
        "identical_to_target": identical,
        "lossless_checked": checked,
        "target_new_tokens": len(target_ids),
        "target_seconds": elapsed,
        "speculative_seconds": speculative_seconds,
        "decoding": asdict(decoding),  # what both sides applied
        **output.stats.to_dict(),
    }


def stats_from_row(row: dict[str, Any]) -> GenerationStats:
    """The engine's counters of one sample, rebuilt from its samples.jsonl row (raw fields only)."""
    return GenerationStats(**{item.name: row[item.name] for item in dataclasses.fields(GenerationStats)
                              if item.name in row})


def summarize(rows: Iterable[dict[str, Any]], settings: EvalSettings | dict[str, Any]) -> EvalSummary:
    """The aggregate of per-sample rows (pooled counts: ratios are token-weighted), skipped images counted apart."""
    rows = list(rows)
    measured = [row for row in rows if not row.get("skipped")]
    all_stats = [stats_from_row(row) for row in measured]
    merged = GenerationStats.merge(all_stats)
    target_seconds = sum(row["target_seconds"] for row in measured)
    speculative_seconds = sum(row["speculative_seconds"] for row in measured)
    target_tokens = sum(row.get("target_new_tokens", 0) for row in measured)
    checked = sum(1 for row in measured if row.get("lossless_checked"))
    mismatches = sum(1 for row in measured if row.get("lossless_checked") and not row["identical_to_target"])
    return EvalSummary(
        num_samples=len(measured),
        mean_accepted_length=merged.mean_accepted_length,
        mean_accepted_drafts=merged.mean_accepted_drafts,
        acceptance_rate=merged.acceptance_rate,
        position_acceptance=merged.position_acceptance,
        target_seconds=target_seconds,
        speculative_seconds=speculative_seconds,
        speedup=target_seconds / speculative_seconds if speculative_seconds else 0.0,
        target_tokens_per_second=target_tokens / target_seconds if target_seconds else 0.0,
        speculative_tokens_per_second=merged.new_tokens / speculative_seconds if speculative_seconds else 0.0,
        lossless_checked=checked,
        lossless_mismatches=mismatches,
        lossless_mismatch_rate=mismatches / checked if checked else 0.0,
        skipped_bad_images=len(rows) - len(measured),
        settings=asdict(settings) if isinstance(settings, EvalSettings) else dict(settings),
    )


# --------------------------------------------------------------------------------------------------
# The run directory: manifest, appended samples, resume, reports
# --------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a samples.jsonl; a line torn by a kill mid-write is dropped (that sample is simply run again)."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("dropping a partly written line of %s (interrupted mid-write)", path)
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One finished sample, flushed at once: a crash later loses nothing that was measured."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()


def check_run_directory(out: Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, dict[str, Any]]:
    """The samples a previous run in `out` finished (by id), after checking it measured the same thing.

    A different `run.json` is refused (its rows would be mixed with this run's), unless `overwrite`, which
    starts the directory over.
    """
    run_file, samples_file = out / RUN_NAME, out / SAMPLES_NAME
    if overwrite:
        for name in (RUN_NAME, SAMPLES_NAME, SUMMARY_NAME, REPORT_NAME, PLOT_NAME):
            (out / name).unlink(missing_ok=True)
        return {}
    if not run_file.exists():
        if samples_file.exists():
            raise InputError(f"{samples_file} exists without {RUN_NAME}: not written by this massv eval; choose "
                             "another --out or pass --overwrite")
        return {}
    previous = json.loads(run_file.read_text(encoding="utf-8"))
    differences = [f"{key}: {previous.get(key)!r} then, {value!r} now" for key, value in manifest.items()
                   if previous.get(key) != value]
    if differences:
        raise InputError(f"{out} holds a massv eval run with other settings ({'; '.join(differences)}): pass "
                         "--overwrite to start it over, or choose another --out")
    done = {row["sample_id"]: row for row in read_rows(samples_file)}
    if done:
        logger.info("resuming %s: %d sample(s) already measured", out, len(done))
    return done


def write_reports(out: Path, summary: EvalSummary, rows: list[dict[str, Any]], header: dict[str, Any]) -> dict[str, Any]:
    """summary.json, summary.md and summary.png for one run (or a merge of shards)."""
    summary_dict = {**header, **asdict(summary)}
    atomic_write_json(out / SUMMARY_NAME, summary_dict, sort_keys=False)
    atomic_write_text(out / REPORT_NAME, render_markdown(summary_dict, rows))
    plot_run(out / PLOT_NAME, summary_dict, rows)
    return summary_dict


def render_markdown(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The run's report: what was measured, the numbers, and every sample left out for a bad image."""
    settings = summary.get("settings", {})
    checked, mismatches = summary["lossless_checked"], summary["lossless_mismatches"]
    lossless = (f"{checked - mismatches}/{checked} identical ({100 * summary['lossless_mismatch_rate']:.1f}% differ)"
                if checked else "not checked (sampled decoding)")
    lines = [
        f"# massv eval: {summary.get('benchmark')}",
        "",
        f"- target: `{summary.get('target')}`",
        f"- drafter: `{summary.get('drafter')}`",
        f"- γ = {settings.get('num_draft_tokens')}, T = {settings.get('temperature')}, top-p = {settings.get('top_p')}, "
        f"max new tokens = {settings.get('max_new_tokens')}, seed = {settings.get('seed')}, "
        f"strategy = {settings.get('strategy', 'chain')}",
        f"- device: {summary.get('device')}, dtype: {summary.get('dtype')}",
        "",
        "| samples | MAL | accepted drafts / step | acceptance rate | speedup vs target | target tok/s | "
        "speculative tok/s | greedy outputs vs target |",
        "|---|---|---|---|---|---|---|---|",
        f"| {summary['num_samples']} | {summary['mean_accepted_length']:.3f} | {summary['mean_accepted_drafts']:.3f} | "
        f"{100 * summary['acceptance_rate']:.1f}% | {summary['speedup']:.2f}x | "
        f"{summary['target_tokens_per_second']:.1f} | {summary['speculative_tokens_per_second']:.1f} | {lossless} |",
        "",
        "Acceptance by draft position: " + ", ".join(f"{index + 1}: {100 * value:.0f}%"
                                                     for index, value in enumerate(summary["position_acceptance"])),
        "",
        "MAL counts the target's own token: tokens emitted per target verification forward.",
        "",
    ]
    skipped = [row for row in rows if row.get("skipped")]
    if skipped:
        lines += [f"## {len(skipped)} sample(s) skipped for a bad image", "", "| sample | image | reason |", "|---|---|---|"]
        lines += [f"| {row['sample_id']} | `{row['image']}` | {row['reason']} |" for row in skipped]
        lines.append("")
    lines.append(f"![summary]({PLOT_NAME})")
    return "\n".join(lines) + "\n"


def plot_run(path: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Two panels: acceptance rate by draft position, and how many tokens each verification step emitted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [length for row in rows if not row.get("skipped") for length in row.get("accepted_lengths", [])]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    positions = summary["position_acceptance"]
    left.bar(range(1, len(positions) + 1), positions)
    left.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1), title="acceptance by position")
    if lengths:
        right.hist(lengths, bins=range(1, max(lengths) + 2), align="left", rwidth=0.8)
    right.set(xlabel="tokens per target forward", ylabel="verification steps",
              title=f"accepted lengths (MAL {summary['mean_accepted_length']:.2f})")
    figure.suptitle(f"massv eval: {summary.get('benchmark')}, {summary['num_samples']} samples")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`i/N` (0 <= i < N) as (i, N)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise InputError(f"--shard {text}: expected i/N with 0 <= i < N, e.g. --shard 0/4")
    return int(match.group(1)), int(match.group(2))


def shard_directory(out: Path, shard: tuple[int, int]) -> Path:
    return out / SHARD_DIR.format(index=shard[0], count=shard[1])


def merge_shards(out: Path) -> dict[str, Any]:
    """Join the `shard-i-of-N/` runs under `out` into one run in `out` (samples in benchmark order)."""
    shard_dirs = sorted(path for path in out.glob("shard-*-of-*") if path.is_dir())
    if not shard_dirs:
        raise MissingInputError(f"--merge: no shard-<i>-of-<N>/ directory in {out} (written by massv eval --shard i/N)")
    counts = {int(path.name.rsplit("-", 1)[1]) for path in shard_dirs}
    if len(counts) != 1:
        raise InputError(f"--merge: {out} holds shards of different splits ({sorted(counts)} shards)")
    (count,) = counts
    expected = [shard_directory(out, (index, count)) for index in range(count)]
    missing = [path.name for path in expected if not (path / SUMMARY_NAME).is_file()]
    if missing:
        raise InputError(f"--merge: shard(s) {', '.join(missing)} of {out} are missing or unfinished (no "
                         f"{SUMMARY_NAME}): run or resume them first")
    manifests = [json.loads((path / RUN_NAME).read_text(encoding="utf-8")) for path in expected]
    per_shard = ("shard", "samples_sha256")
    common = {key: value for key, value in manifests[0].items() if key not in per_shard}
    for path, manifest in zip(expected, manifests):
        other = {key: value for key, value in manifest.items() if key not in per_shard}
        if other != common:
            differing = sorted(key for key in set(other) | set(common) if other.get(key) != common.get(key))
            raise InputError(f"--merge: {path.name} measured other settings than {expected[0].name} ({differing})")
    rows = [row for path in expected for row in read_rows(path / SAMPLES_NAME)]
    ids = [row["sample_id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise InputError(f"--merge: shards of {out} share samples; were they run with the same --shard twice?")
    rows.sort(key=lambda row: row.get("index") or 0)
    atomic_write_text(out / SAMPLES_NAME, "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write_json(out / RUN_NAME, {**common, "shard": None, "merged_shards": count}, sort_keys=False)
    settings = dict(common["settings"])
    header = {key: common.get(key) for key in ("benchmark", "target", "drafter", "device", "dtype")}
    summary = summarize(rows, settings)
    summary_dict = write_reports(out, summary, rows, {**header, "merged_shards": count})
    logger.info("merged %d shards into %s: %d samples, MAL %.3f", count, out, summary.num_samples,
                summary.mean_accepted_length)
    return summary_dict


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from massv.cli import HelpFormatter, add_device_arguments

    parser = argparse.ArgumentParser(prog="massv eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", help="run config YAML: its model.target, <phase2.output_dir>/final and eval: "
                        "section are the defaults of --target, --drafter and the settings")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. eval.num_draft_tokens=3")
    parser.add_argument("--target", help="target VLM: hub id, local path or tiny:<family> (required without --config)")
    parser.add_argument("--drafter", help="MASSV drafter (directory or hub id), or a plain causal LM (the text-only "
                        "baseline); default with --config: <phase2.output_dir>/final")
    parser.add_argument("--benchmark", help="benchmark name (coco_captions, gqa, llava_bench, mmmu, scienceqa, chartqa, "
                        "textvqa, world) or a path to a benchmark file/directory (default with --config: eval.benchmark)")
    parser.add_argument("--data-root", type=Path, default=None, help="directory holding the benchmark's files")
    parser.add_argument("--split", default=None, help="benchmark split (default: the benchmark's usual one)")
    parser.add_argument("--num-draft-tokens", type=int, default=None, help="γ: drafts per verification (default: 5)")
    parser.add_argument("--strategy", choices=["chain", "adaptive", "tree"], default="chain",
                        help="drafting: a chain of γ, an adaptive chain (starts at γ; +2 / -1 and a drafter-confidence "
                        "stop), or an EAGLE-2 draft tree (default: chain)")
    parser.add_argument("--tree-size", type=int, default=16, help="tree: most nodes verified per block (default: 16)")
    parser.add_argument("--tree-depth", type=int, default=16, help="tree: most drafter forwards per block (default: 16)")
    parser.add_argument("--tree-top-k", type=int, default=3, help="tree: children per expanded node (default: 3)")
    parser.add_argument("--tree-min-probability", type=float, default=0.4,
                        help="tree: stop growing once no frontier path is this probable (0: fixed depth; default 0.4)")
    parser.add_argument("--tree-width", type=int, default=1,
                        help="tree: nodes expanded per depth; 1: the first-choice path with runner-up leaves, 0: "
                             "--tree-top-k as in EAGLE-2 (default: 1)")
    parser.add_argument("--tree-min-node-probability", type=float, default=0.1,
                        help="tree: verify only nodes whose path is at least this probable (0: EAGLE-2; default 0.1)")
    parser.add_argument("--temperature", type=float, default=None, help="0: greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None,
                        help="sampling top-k on both sides (0 = off; default: the target's generation config, else 50)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="(default: 128)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory (an interrupted run resumes there)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="count and skip samples whose image is missing or does not decode, instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="start --out over if it holds another run")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="measure samples I, I+N, ... (0 <= I < N) into <out>/shard-I-of-N/")
    parser.add_argument("--merge", action="store_true", help="join the shard-*-of-N/ runs under --out and exit")
    parser.add_argument("--max-mismatch-rate", type=float, default=None,
                        help="exit 1 when more than this fraction of greedy outputs differ from the target's "
                        "(default: only report the rate)")
    parser.add_argument("--record-in-model-card", action="store_true",
                        help="add the MAL of this run to the MASSV drafter's model card (README.md)")
    return parser


def _resolve_arguments(args: argparse.Namespace) -> EvalSettings:
    """Fill what --config supplies, then check that everything needed is there (before any model loads)."""
    if args.config:
        from massv.config import final_dir, load_config

        config = load_config(args.config, args.override)
        args.target = args.target or config.model.target
        args.drafter = args.drafter or str(final_dir(config.phase2.output_dir))
        if config.eval is not None:
            args.benchmark = args.benchmark or config.eval.benchmark
            args.data_root = args.data_root or (Path(config.eval.data_root) if config.eval.data_root else None)
            args.split = args.split or config.eval.split
            args.num_draft_tokens = args.num_draft_tokens if args.num_draft_tokens is not None else config.eval.num_draft_tokens
            args.temperature = args.temperature if args.temperature is not None else config.eval.temperature
            args.max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else config.eval.max_new_tokens
            args.limit = args.limit if args.limit is not None else config.eval.limit
    elif args.override:
        raise InputError("--override needs --config (it changes the config's keys)")
    missing = [flag for flag, value in (("--target", args.target), ("--drafter", args.drafter),
                                        ("--benchmark", args.benchmark)) if not value]
    if missing:
        raise InputError(f"massv eval needs {', '.join(missing)} (or a --config that names them)")
    settings = EvalSettings(
        num_draft_tokens=5 if args.num_draft_tokens is None else args.num_draft_tokens,
        temperature=0.0 if args.temperature is None else args.temperature,
        top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=128 if args.max_new_tokens is None else args.max_new_tokens, seed=args.seed,
        strategy=args.strategy, tree_size=args.tree_size, tree_depth=args.tree_depth, tree_top_k=args.tree_top_k,
        tree_min_probability=args.tree_min_probability, tree_width=args.tree_width,
        tree_min_node_probability=args.tree_min_node_probability,
    )
    if settings.num_draft_tokens < 1 or settings.max_new_tokens < 1 or settings.temperature < 0:
        raise InputError("--num-draft-tokens and --max-new-tokens must be >= 1, --temperature >= 0")
    if min(settings.tree_size, settings.tree_depth, settings.tree_top_k) < 1 or settings.tree_width < 0 \
            or not 0 <= settings.tree_min_probability < 1 or not 0 <= settings.tree_min_node_probability < 1:
        raise InputError("--tree-size, --tree-depth and --tree-top-k must be >= 1, --tree-width >= 0, "
                         "--tree-min-probability and --tree-min-node-probability in [0, 1)")
    return settings


def _check_drafter_directory(name: str) -> None:
    """A local MASSV drafter is read back in full (config, every weight file's header) before any model loads."""
    from massv.drafter import check_drafter_files, read_drafter_config
    from massv.loading import is_massv_drafter

    path = Path(name)
    if path.is_dir() and is_massv_drafter(path):
        check_drafter_files(path, read_drafter_config(path))


def _samples_digest(samples: list[BenchmarkSample]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.sample_id}\t{sample.image_path}\t{sample.prompt}\n".encode())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    """Evaluate one target/drafter pair on one benchmark; every input is checked before a model is loaded."""
    from massv.loading import check_model_source, load_drafter, load_target, resolve_placement

    args = build_parser().parse_args(argv)
    if args.merge:
        if not args.out.is_dir():
            raise MissingInputError(f"--merge: {args.out} does not exist")
        merge_shards(args.out)
        return 0
    settings = _resolve_arguments(args)
    shard = parse_shard(args.shard)
    out = shard_directory(args.out, shard) if shard else args.out
    # ---- every input checked first: models named right, devices there, data readable, out dir consistent ----
    check_model_source(args.target, "--target")
    check_model_source(args.drafter, "--drafter")
    _check_drafter_directory(args.drafter)
    if args.record_in_model_card and not _is_local_massv_drafter(args.drafter):
        raise InputError(f"--record-in-model-card: {args.drafter} is not a local MASSV drafter directory")
    placement = resolve_placement(args.device, args.dtype)
    out.mkdir(parents=True, exist_ok=True)
    missing_images: list[BenchmarkSample] = []
    if args.benchmark == "world" and args.data_root is None:
        raise InputError("--benchmark world needs --data-root DIR holding the world's splits; write one with "
                         "`massv world --out DIR --split heldout --num 50 --seed 1234` and pass --split heldout")
    samples = load_benchmark(args.benchmark, args.data_root, split=args.split, limit=args.limit,
                             cache_dir=out / "decoded_images", skip_missing_images=args.skip_bad_images,
                             skipped=missing_images)
    if not samples and not missing_images:
        raise InputError(f"benchmark {args.benchmark!r} has no samples (split={args.split}, limit={args.limit})")
    indices = list(range(len(samples)))
    if shard:
        indices = indices[shard[0]::shard[1]]
        samples = [samples[index] for index in indices]
    manifest = {"target": args.target, "drafter": args.drafter, "benchmark": args.benchmark,
                "data_root": str(args.data_root) if args.data_root else None, "split": args.split,
                "limit": args.limit,
                "samples_sha256": _samples_digest(samples), "settings": asdict(settings),
                "device": args.device, "dtype": args.dtype, "shard": args.shard}
    completed = check_run_directory(out, manifest, args.overwrite)
    atomic_write_json(out / RUN_NAME, manifest, sort_keys=False)
    samples_file = out / SAMPLES_NAME
    for sample in missing_images:  # --skip-bad-images: missing files are counted like corrupt ones
        if sample.sample_id not in completed:
            completed[sample.sample_id] = bad_image_row(sample, "file does not exist")
            append_row(samples_file, completed[sample.sample_id])
    # ---- the models ----
    logger.info("placing models on %s in %s%s", placement.device, placement.dtype,
                f" (device_map={placement.device_map})" if placement.device_map else "")
    target, processor = load_target(args.target, dtype=args.dtype, device=args.device)
    drafter = load_drafter(args.drafter, target, processor.tokenizer, dtype=args.dtype)
    # ---- the run: one line per sample, appended as it finishes ----
    summary, rows = evaluate_samples(target, drafter, processor, samples, settings, description=args.benchmark,
                                     skip_bad_images=args.skip_bad_images, completed=completed,
                                     on_row=lambda row: append_row(samples_file, row), indices=indices)
    rows += [row for row in completed.values() if row.get("skipped") and row["sample_id"] not in
             {sample.sample_id for sample in samples}]
    summary = summarize(rows, settings)
    header = {"benchmark": args.benchmark, "target": args.target, "drafter": args.drafter,
              "device": str(placement.device), "dtype": str(placement.dtype).removeprefix("torch."),
              "shard": args.shard}
    write_reports(out, summary, rows, header)
    if args.record_in_model_card:
        _record_in_model_card(args, summary)
    logger.info(
        "%s: MAL %.2f, acceptance %.1f%%, speedup %.2fx over %d samples; greedy outputs differing from the "
        "target: %d/%d (%.1f%%); bad images skipped: %d. Report: %s",
        args.benchmark, summary.mean_accepted_length, 100 * summary.acceptance_rate, summary.speedup,
        summary.num_samples, summary.lossless_mismatches, summary.lossless_checked,
        100 * summary.lossless_mismatch_rate, summary.skipped_bad_images, out / REPORT_NAME,
    )
    if args.max_mismatch_rate is not None and summary.lossless_mismatch_rate > args.max_mismatch_rate:
        logger.error("greedy mismatch rate %.3f is above --max-mismatch-rate %.3f", summary.lossless_mismatch_rate,
                     args.max_mismatch_rate)
        return 1
    return 0


def _is_local_massv_drafter(name: str) -> bool:
    from massv.loading import is_massv_drafter

    return Path(name).is_dir() and is_massv_drafter(name)


def _record_in_model_card(args: argparse.Namespace, summary: EvalSummary) -> None:
    from massv.drafter import record_evaluation
    from massv.model_card import evaluation_entry

    record_evaluation(args.drafter, evaluation_entry(args.benchmark, asdict(summary)))
    logger.info("recorded MAL %.3f in %s/README.md", summary.mean_accepted_length, args.drafter)
