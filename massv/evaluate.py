"""`massv eval`: speculative decoding measured on an image-QA / captioning benchmark.

For every sample it runs the target alone (`target.generate`) and the speculative engine with the same
settings, and records mean accepted length, acceptance rate and wall-clock speedup. Greedy runs also check
that the speculative output is token-for-token the target's own: a mismatch is counted and reported, never
hidden. The demo uses `evaluate_samples` directly on models it already holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from massv.benchmarks import BenchmarkSample, load_benchmark
from massv.chat import prompt_inputs
from massv.families import get_adapter
from massv.speculative import GenerationStats, SpeculativeGenerator
from massv.train.llava_data import load_image

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """What is being measured: one setting of γ, temperature and length."""

    num_draft_tokens: int = 5
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    check_lossless: bool = True  # greedy only: compare every output with target.generate


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
    settings: dict[str, Any] = field(default_factory=dict)


def _inputs_for(processor: Any, adapter: Any, sample: BenchmarkSample) -> Any:
    image = load_image(sample.image_path, sample.sample_id)
    return prompt_inputs(processor, adapter.user_messages(sample.prompt), [image])  # no second <bos>


def _target_generate(target: Any, inputs: Any, settings: EvalSettings) -> tuple[list[int], float]:
    """The baseline: the target's own `generate`, timed end to end (vision and prefill included)."""
    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        if settings.temperature > 0 else {"do_sample": False}
    )
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    with torch.no_grad():
        output = target.generate(**inputs.to(target.device), max_new_tokens=settings.max_new_tokens, **sampling)
    elapsed = time.perf_counter() - start
    return output[0, inputs["input_ids"].shape[1]:].tolist(), elapsed


def evaluate_samples(target: Any, drafter: Any, processor: Any, samples: list[BenchmarkSample],
                     settings: EvalSettings, description: str = "eval",
                     baseline_cache: dict[tuple[Any, ...], tuple[list[int], float]] | None = None,
                     ) -> tuple[EvalSummary, list[dict[str, Any]]]:
    """Run target-alone and speculative generation on every sample; return the summary and per-sample rows.

    `baseline_cache` lets several drafters share one timed target run per sample and setting (the demo
    compares four drafters against the same target).
    """
    adapter = get_adapter(target.config)
    generator = SpeculativeGenerator(target, drafter, processor)
    rows: list[dict[str, Any]] = []
    all_stats: list[GenerationStats] = []
    target_seconds = target_tokens = 0.0
    mismatches = checked = 0
    for sample in tqdm(samples, desc=description, unit="sample"):
        inputs = _inputs_for(processor, adapter, sample)
        key = (sample.sample_id, settings.temperature, settings.top_p, settings.max_new_tokens, settings.seed)
        if baseline_cache is not None and key in baseline_cache:
            target_ids, elapsed = baseline_cache[key]
        else:
            target_ids, elapsed = _target_generate(target, inputs, settings)
            if baseline_cache is not None:
                baseline_cache[key] = (target_ids, elapsed)
        target_seconds += elapsed
        target_tokens += len(target_ids)
        start = time.perf_counter()
        output = generator.generate_from_inputs(
            inputs, max_new_tokens=settings.max_new_tokens, num_draft_tokens=settings.num_draft_tokens,
            temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
        )
        speculative_seconds = time.perf_counter() - start
        output.stats.total_seconds = speculative_seconds  # include input transfer, as the baseline does
        all_stats.append(output.stats)
        speculative_ids = output.generated_ids[0].tolist()
        identical = speculative_ids == target_ids
        if settings.temperature == 0 and settings.check_lossless:
            checked += 1
            if not identical:
                mismatches += 1
                logger.error("sample %s: speculative output differs from target.generate", sample.sample_id)
        rows.append({
            "sample_id": sample.sample_id,
            "prompt": sample.prompt,
            "reference": sample.reference,
            "output": output.text,
            "identical_to_target": identical,
            "target_seconds": elapsed,
            "speculative_seconds": speculative_seconds,
            **{k: v for k, v in output.stats.to_dict().items() if k not in {"judged_drafts"}},
        })
    merged = GenerationStats.merge(all_stats)
    speculative_seconds = sum(stats.total_seconds for stats in all_stats)
    summary = EvalSummary(
        num_samples=len(samples),
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
        settings=asdict(settings),
    )
    return summary, rows


def _world_samples(args: argparse.Namespace) -> list[BenchmarkSample]:
    """The synthetic world at any seed and split, written under the output directory first."""
    from massv.world import write_world

    root = args.out / "world_data"
    write_world(root, args.split or "heldout", args.world_num, args.world_seed)
    return load_benchmark("world", root, split=args.split or "heldout", limit=args.limit)


def main(argv: list[str] | None = None) -> int:
    """Evaluate one target/drafter pair on one benchmark; writes samples.jsonl and summary.json."""
    parser = argparse.ArgumentParser(prog="massv eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="target VLM: hub id or local path")
    parser.add_argument("--drafter", required=True, help="MASSV drafter directory, or a plain causal LM (text-only baseline)")
    parser.add_argument("--benchmark", required=True, help="benchmark name (coco_captions, gqa, llava_bench, mmmu, "
                        "scienceqa, chartqa, textvqa, world) or a path to a benchmark file/directory")
    parser.add_argument("--data-root", type=Path, default=None, help="directory holding the benchmark's files")
    parser.add_argument("--split", default=None)
    parser.add_argument("--num-draft-tokens", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-seed", type=int, default=1234, help="benchmark 'world' only: scene seed")
    parser.add_argument("--world-num", type=int, default=50, help="benchmark 'world' only: number of samples")
    parser.add_argument("--dtype", default="auto",
                        help="auto: the checkpoint's dtype on an accelerator, float32 on the CPU (default)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)

    from massv.loading import load_drafter, load_target

    args.out.mkdir(parents=True, exist_ok=True)
    if args.benchmark == "world" and args.data_root is None:
        samples = _world_samples(args)
    else:
        samples = load_benchmark(args.benchmark, args.data_root, split=args.split, limit=args.limit,
                                 cache_dir=args.out / "decoded_images")
    if not samples:
        raise SystemExit(f"benchmark {args.benchmark!r} has no samples (split={args.split}, limit={args.limit})")
    target, processor = load_target(args.target, dtype=args.dtype)
    drafter = load_drafter(args.drafter, target, processor.tokenizer, dtype=args.dtype)
    settings = EvalSettings(
        num_draft_tokens=args.num_draft_tokens, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    summary, rows = evaluate_samples(target, drafter, processor, samples, settings, description=args.benchmark)
    with open(args.out / "samples.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    summary_dict = {"benchmark": args.benchmark, "target": args.target, "drafter": args.drafter, **asdict(summary)}
    (args.out / "summary.json").write_text(json.dumps(summary_dict, indent=2))
    logger.info(
        "%s: MAL %.2f, acceptance %.1f%%, speedup %.2fx over %d samples (lossless mismatches: %d/%d)",
        args.benchmark, summary.mean_accepted_length, 100 * summary.acceptance_rate, summary.speedup,
        summary.num_samples, summary.lossless_mismatches, summary.lossless_checked,
    )
    return 1 if summary.lossless_mismatches else 0
